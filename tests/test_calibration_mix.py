"""The default calibration set (`mix`), chat-formatted calibration data and the held-out RTN guard."""

import difflib
import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import optq
from optq.calibration import MIX_SHARES, load_documents, mix_windows, tokenize_joined
from optq.chat_prompts import CALIBRATION_PROMPTS, CHAT_PROMPTS
from optq.core.gptq import gptq_solve
from optq.core.hessian import HessianAccumulator
from optq.core.grid import GridSpec
from optq.errors import OptqError
from optq.pipeline import RTN_GUARD, _guard
from optq.texts import stdlib_code

# A chat template written for these tests: the expected text of a conversation is then known independently.
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture
def chat_model(tinystories_model, tmp_path):
    """TinyStories-656K with a chat template (a copy: the shared fixture is never written)."""
    folder = tmp_path / "chat-model"
    shutil.copytree(tinystories_model, folder)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg["chat_template"] = TEMPLATE
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    return folder


def test_calibration_prompts_are_not_the_reports():
    report = [p for p, _ in CHAT_PROMPTS]
    assert len(CALIBRATION_PROMPTS) >= 100 and len(set(CALIBRATION_PROMPTS)) == len(CALIBRATION_PROMPTS)
    for p in CALIBRATION_PROMPTS:
        assert not difflib.get_close_matches(p, report, n=1, cutoff=0.9), p


def test_calibration_code_is_not_the_reports():
    report, _ = stdlib_code(200_000, held_out=True)
    calibration, source = stdlib_code(2_000_000, held_out=False)
    assert "package modules" in source
    rng = random.Random(0)
    for _ in range(20):  # slices of the report's code never occur in the calibration code
        i = rng.randrange(len(report) - 400)
        piece = report[i:i + 400]
        if piece.strip():
            assert piece not in calibration


def test_chat_jsonl_is_formatted_with_the_template(chat_model, tmp_path):
    from optq.models.loading import load_tokenizer

    tok = load_tokenizer(chat_model, False, False)
    data = tmp_path / "chats.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "Once upon a time?"},
                                             {"role": "assistant", "content": "There was a cat."}]}) + "\n"
                    + json.dumps({"text": "A plain story."}) + "\n")
    docs = load_documents(str(data))
    ids = tokenize_joined(tok, docs)
    text = tok.decode(ids[0], skip_special_tokens=False)
    assert "A plain story." in text
    assert "<|user|>Once upon a time?\n<|assistant|>There was a cat.\n" in text.replace(" <", "<")
    # the plain text comes first, the conversation after it
    assert text.index("A plain story.") < text.index("Once upon a time?")


def test_chat_jsonl_bad_input(tinystories_model, tmp_path):
    from optq.models.loading import load_tokenizer

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user"}]}) + "\n")
    with pytest.raises(OptqError, match="bad.jsonl:1 has neither"):
        load_documents(str(bad))
    chats = tmp_path / "chats.jsonl"
    chats.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    tok = load_tokenizer(tinystories_model, False, False)  # no chat template
    with pytest.raises(OptqError, match="no chat template"):
        tokenize_joined(tok, load_documents(str(chats)))


def test_mix_has_every_part_and_is_deterministic(chat_model):
    from optq.models.loading import load_source_model

    src = load_source_model(chat_model)
    windows, counts = mix_windows(src.tokenizer, src.model, 32, 64, seed=0)
    assert sum(counts.values()) == len(windows) == 32
    assert set(counts) >= {"prose", "code", "chat"} and counts["chat"] > 0
    assert all(w.shape == (1, 64) for w in windows)
    again, _ = mix_windows(src.tokenizer, src.model, 32, 64, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(windows, again))
    # without a model (or a chat template) there is no chat part, and the others take its windows
    plain, counts = mix_windows(src.tokenizer, None, 32, 64, seed=0)
    assert "chat" not in counts and len(plain) == 32
    assert set(MIX_SHARES) >= set(counts)


def _solved(seed, rank):
    """A weight, its GPTQ solution on inputs confined to `rank` directions, and a Hessian accumulator."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(48, 64, generator=g)
    basis = torch.randn(rank, 64, generator=g)
    x = torch.randn(2048, rank, generator=g) @ basis
    h = 2 * x.T @ x / x.shape[0]
    res = gptq_solve(w, h, GridSpec(bits=3, sym=True), group_size=32, damp_percent=0.01)
    return w, res.weight, basis


def _held(x):
    acc = HessianAccumulator(x.shape[-1])
    acc.add(x[None])
    return acc


def test_guard_keeps_gptq_where_it_generalizes_and_rtn_where_it_does_not():
    w, qw, basis = _solved(0, rank=8)
    g = torch.Generator().manual_seed(1)
    # held-out inputs from the calibration distribution: GPTQ's integers stay
    same = torch.randn(512, 8, generator=g) @ basis
    kept, note = _guard(w, qw, _held(same), "")
    assert kept is qw and note == ""
    # held-out inputs orthogonal to everything GPTQ saw: the error it moved there makes it lose to rounding
    q, _ = torch.linalg.qr(basis.T, mode="complete")
    other = torch.randn(512, 56, generator=g) @ q[:, 8:].T
    kept, note = _guard(w, qw, _held(other), "")
    assert note.startswith(RTN_GUARD)
    # RTN on GPTQ's grid, computed here from the scales and zeros directly
    s, z = qw.scales[qw.g_idx.long()].T, qw.zeros[qw.g_idx.long()].T
    expected = torch.clamp(torch.round(w / s) + z, 0, 7)
    assert torch.equal(kept.qweight.float(), expected) and torch.equal(kept.scales, qw.scales)
    # an independent check of the decision: the output errors on the held-out inputs
    err = lambda q: ((other @ (q.dequantize() - w).T) ** 2).sum()  # noqa: E731
    assert err(kept) < err(qw)


def test_guard_in_a_run(tinystories_model, tinystories_text, tmp_path):
    """Calibration text of one repeated word and held-out windows of stories: GPTQ overfits the first, the
    guard gives some modules RTN's integers, lists them in meta.rtn_guard and quant_log.csv; the guarded
    modules' integers are those of rounding the float weights on the checkpoint's grid."""
    from optq.formats.gptq import read_quantization_config

    text = tmp_path / "calib.txt"
    stories = Path(tinystories_text).read_text()
    # windows 0..14 of each 16: one sentence repeated; every 16th (held out): stories
    repeated = "the cat sat. " * 4000
    text.write_text(repeated)
    out = tmp_path / "q"
    import optq.pipeline.solve as solve

    real_split = solve.split_held_out

    def split(windows):
        cal, held = real_split(windows)
        from optq.models.loading import load_tokenizer

        tok = load_tokenizer(tinystories_model, False, False)
        ids = tok(stories, return_tensors="pt").input_ids
        L = held[0].shape[1]
        return cal, [ids[:, i * L:(i + 1) * L] for i in range(len(held))]

    solve.split_held_out = split
    try:
        optq.quantize(tinystories_model, out, optq.QuantizeConfig(bits=3, group_size=32), dataset=str(text),
                      nsamples=32, seqlen=64, progress=False)
    finally:
        solve.split_held_out = real_split
    _, quant = read_quantization_config(out)
    guarded = quant["meta"]["rtn_guard"]
    assert guarded, "a calibration set this narrow must lose to rounding somewhere"
    log = (out / "quant_log.csv").read_text()
    assert all(any(m in line and RTN_GUARD in line for line in log.splitlines()) for m in guarded)
    tensors = {}
    for f in out.glob("*.safetensors"):
        tensors.update(load_file(f))
    float_weights = load_file(Path(tinystories_model) / "model.safetensors")
    from optq.formats.gptq import unpack_module

    for m in guarded:
        w = float_weights[m + ".weight"].float()
        parts = {k: tensors[f"{m}.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx")}
        qw = unpack_module(parts, 3, w.shape[1], w.shape[0], "gptq")
        s, z = qw.scales[qw.g_idx.long()].T, qw.zeros[qw.g_idx.long()].T
        expected = torch.clamp(torch.round(w / s) + z, 0, 7)
        assert torch.equal(qw.qweight.float(), expected), m


def test_default_runs_are_byte_identical(chat_model, tmp_path):
    """optq's defaults (the mix with self-generated chat answers, act-order, static groups, the guard) give
    the same bytes twice."""
    from optq.formats.gptq import read_quantization_config

    outs = []
    for name in ("a", "b"):
        out = tmp_path / name
        optq.quantize(chat_model, out, optq.QuantizeConfig(bits=4, group_size=32), nsamples=16, seqlen=128,
                      progress=False)
        outs.append(out)
    files = sorted(p.name for p in outs[0].iterdir() if p.suffix in (".safetensors", ".json"))
    assert "model.safetensors" in files and "config.json" in files
    for f in files:  # (quant_log.csv holds each module's seconds)
        assert (outs[0] / f).read_bytes() == (outs[1] / f).read_bytes(), f
    _, quant = read_quantization_config(outs[0])
    assert quant["meta"]["calibration"]["dataset"] == "mix" and quant["meta"]["calibration"]["parts"]["chat"] > 0
    assert isinstance(quant["meta"]["rtn_guard"], list) and quant["meta"]["act_order"] is True


def test_chat_answers_are_cached_per_model(chat_model, tmp_path, monkeypatch):
    import optq.calibration as calibration
    from optq.models.loading import load_source_model

    monkeypatch.setenv("OPTQ_CACHE", str(tmp_path / "cache"))
    src = load_source_model(chat_model)
    prompts = ["Tell me a story.", "What is a cat?"]
    first = calibration.chat_samples(src.model, src.tokenizer, prompts, answer_tokens=8)
    assert len(list((tmp_path / "cache" / "chat-answers").glob("*.json"))) == 1
    calls = []
    real = calibration.greedy_answers
    monkeypatch.setattr(calibration, "greedy_answers", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = calibration.chat_samples(src.model, src.tokenizer, prompts, answer_tokens=8)
    assert torch.equal(first, again) and not calls  # read back, not generated
    with torch.no_grad():  # another model (one weight changed): its own answers
        next(src.model.parameters()).add_(1.0)
    calibration.chat_samples(src.model, src.tokenizer, prompts, answer_tokens=8)
    assert calls and len(list((tmp_path / "cache" / "chat-answers").glob("*.json"))) == 2


def test_sampled_text_stays_in_the_nucleus(tinystories_model):
    """Every sampled token is one of the likeliest tokens holding top_p of the probability at its position
    (the model's float64 softmax on the sampled text, teacher-forced), never a banned one; seeded."""
    from optq.generation import sampled_text
    from optq.models.loading import load_source_model

    src = load_source_model(tinystories_model)
    start, banned = src.tokenizer.bos_token_id or 1, (src.tokenizer.eos_token_id,)
    ids = sampled_text(src.model, start, count=4, length=40, seed=3, top_p=0.9, top_k=64, banned=banned)
    assert ids.shape == (4, 41) and (ids[:, 0] == start).all()
    assert torch.equal(ids, sampled_text(src.model, start, count=4, length=40, seed=3, top_p=0.9, top_k=64,
                                         banned=banned))
    assert not torch.isin(ids[:, 1:], torch.tensor(banned)).any()
    with torch.no_grad():
        logits = src.model(ids).logits.double()
    logits[..., list(banned)] = float("-inf")
    probs = torch.softmax(logits, dim=-1)[:, :-1]
    drawn = ids[:, 1:]
    p_drawn = probs.gather(-1, drawn[..., None])[..., 0]
    # the mass of tokens strictly likelier than the drawn one is below top_p: it is inside the nucleus
    above = (probs * (probs > p_drawn[..., None])).sum(-1)
    assert (above < 0.9 + 1e-4).all()
    rank = (probs > p_drawn[..., None]).sum(-1)
    assert (rank < 64).all()


def test_own_text_part_of_the_mix_is_cached(chat_model, tmp_path, monkeypatch):
    import optq.calibration as calibration
    from optq.models.loading import load_source_model

    monkeypatch.setenv("OPTQ_CACHE", str(tmp_path / "cache"))
    src = load_source_model(chat_model)
    windows, counts = mix_windows(src.tokenizer, src.model, 40, 64, seed=0)
    assert counts["sampled"] >= 8 and len(windows) == 40  # 20% of the windows (more without Django's part)
    own = windows[-counts["sampled"]:]
    assert all(w.shape == (1, 64) and w[0, 0] == src.tokenizer.bos_token_id for w in own)
    assert len(list((tmp_path / "cache" / "sampled-text").glob("*.json"))) == 1
    monkeypatch.setattr(calibration, "sampled_text", lambda *a, **k: pytest.fail("generated again"))
    again, _ = mix_windows(src.tokenizer, src.model, 40, 64, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(windows, again))
