import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from optq.calibration import load_documents, sample_windows, tokenize_joined
from optq.errors import OptqError
from optq.evaluate import perplexity_of_ids


def test_txt_documents_split_on_blank_lines(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("first doc\nline two\n\n\nsecond doc\n   \nthird\n")
    assert load_documents(str(f)) == ["first doc\nline two", "second doc", "third"]


def test_wikitext_raw_rows(tmp_path):
    f = tmp_path / "wiki.test.raw"
    f.write_text(" \n = Title = \n \n Body text . \n")
    # As the Hugging Face rows: blank lines empty, others keep their newline.
    assert load_documents(str(f)) == ["", " = Title = \n", "", " Body text . \n"]


def test_jsonl_and_folder(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.jsonl").write_text(json.dumps({"text": "alpha"}) + "\n\n" + json.dumps({"text": "beta"}))
    (tmp_path / "d" / "b.txt").write_text("gamma\n\ndelta")
    (tmp_path / "d" / "skip.bin").write_bytes(b"\x00")
    assert load_documents(str(tmp_path / "d")) == ["alpha", "beta", "gamma", "delta"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"txt": "x"}\n')
    with pytest.raises(OptqError, match="bad.jsonl:1 has neither a string field 'text'"):
        load_documents(str(bad))
    bad.write_text("{not json\n")
    with pytest.raises(OptqError, match="not valid JSON"):
        load_documents(str(bad))
    binary = tmp_path / "windows.safetensors"  # a binary file passed as text
    binary.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{\"a\":\xc1\xff}")
    with pytest.raises(OptqError, match="windows.safetensors is not UTF-8 text"):
        load_documents(str(binary))


def test_pydoc_builtin_and_unknown_names():
    docs = load_documents("pydoc")
    assert len(docs) > 50 and sum(map(len, docs)) > 100_000
    with pytest.raises(OptqError, match="neither a file"):
        load_documents("no-such-dataset")


def test_hub_names_fail_clearly_offline(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_datasets(name, *a, **k):
        if name == "datasets":
            raise ImportError("no datasets")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    with pytest.raises(OptqError, match="datasets.*local"):
        load_documents("wikitext2")


def test_sampling_is_seeded_and_in_range():
    ids = torch.arange(1000).unsqueeze(0)
    a = sample_windows(ids, 10, 64, seed=3)
    b = sample_windows(ids, 10, 64, seed=3)
    c = sample_windows(ids, 10, 64, seed=4)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    for w in a:  # contiguous slices of the stream
        assert w.shape == (1, 64) and torch.equal(w[0], torch.arange(int(w[0, 0]), int(w[0, 0]) + 64))
    with pytest.raises(OptqError, match="has 1000 tokens.*at most 999"):
        sample_windows(ids, 1, 1000, seed=0)


def test_perplexity_protocol_matches_manual(tinystories_model, tinystories_text):
    model = AutoModelForCausalLM.from_pretrained(str(tinystories_model)).eval()
    tok = AutoTokenizer.from_pretrained(str(tinystories_model))
    ids = tokenize_joined(tok, load_documents(str(tinystories_text)))
    res = perplexity_of_ids(model, ids, 128, max_windows=5, progress=False)
    # Independent: log-softmax by hand, token by token, mean per window, then exp of the mean of windows.
    nlls = []
    with torch.no_grad():
        for i in range(5):
            w = ids[0, i * 128 : (i + 1) * 128]
            logp = torch.log_softmax(model(w[None]).logits[0].double(), -1)
            nlls.append(-sum(float(logp[t, w[t + 1]]) for t in range(127)) / 127)
    assert res.perplexity == pytest.approx(math.exp(sum(nlls) / 5), rel=1e-5)
    assert res.tokens == 5 * 128 and res.windows == 5
