"""Streamed quantization (one layer at a time from disk) against loading the whole model; the streaming
safetensors writer against safetensors' own reader; peak memory that does not grow with the layer count."""

import csv
import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import optq
from optq import QuantizeConfig
from optq.errors import OptqError
from optq.formats.safetensors_writer import SafetensorsWriter, TensorSpec, write_tensors

CAL = dict(nsamples=8, seqlen=64, progress=False)


def _log_without_seconds(path):
    rows = list(csv.reader(path.open()))
    col = rows[0].index("seconds")
    return [r[:col] + r[col + 1:] for r in rows]


def _same_checkpoint(a, b):
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        if name == "quant_log.csv":  # the seconds column is wall time
            assert _log_without_seconds(a / name) == _log_without_seconds(b / name)
        else:
            assert (a / name).read_bytes() == (b / name).read_bytes(), name


@pytest.mark.parametrize("cfg, extra", [
    (dict(bits=4, group_size=32), {}),
    # act-order, a quantized (tied, so untied) lm_head, hidden states spilled to disk
    (dict(bits=3, group_size=32, desc_act=True, static_groups=True, lm_head=True), dict(max_activation_memory=1000)),
    # GPTAQ's float stream spilled too, asymmetric v2, several shards
    (dict(bits=4, group_size=64, sym=False, checkpoint_format="gptq_v2", gptaq=True),
     dict(max_activation_memory=1000, max_shard_size="100KB")),
    (dict(bits=8, group_size=-1, method="rtn"), {}),
])
def test_streamed_equals_whole_model(tinystories_model, tinystories_text, tmp_path, cfg, extra, monkeypatch):
    import optq.pipeline

    kw = dict(dataset=str(tinystories_text), **CAL, **extra)
    # The whole-model run recomputes every block and holds its activations in memory; the streamed one
    # replays finished blocks from kept (and, with a tiny --max-activation-memory, spilled) inputs: equal
    # bytes check both.
    monkeypatch.setattr(optq.pipeline.replay, "BLOCK_REPLAY", False)
    whole = {k: v for k, v in kw.items() if k != "max_activation_memory"}
    optq.quantize(tinystories_model, tmp_path / "whole", QuantizeConfig(**cfg), stream=False, **whole)
    monkeypatch.setattr(optq.pipeline.replay, "BLOCK_REPLAY", True)
    optq.quantize(tinystories_model, tmp_path / "streamed", QuantizeConfig(**cfg), stream=True, **kw)
    _same_checkpoint(tmp_path / "whole", tmp_path / "streamed")
    if "max_shard_size" in extra:
        assert len(list((tmp_path / "streamed").glob("model-*.safetensors"))) > 1


def test_whole_model_resume_matches_streamed(tinystories_model, tinystories_text, tmp_path):
    """tests/test_resume.py kills and resumes streamed runs (the default for a folder); here the whole-model
    path is killed mid-layer and resumed, and must equal an uninterrupted streamed run."""
    def run(out, *extra, fault=""):
        return subprocess.run([sys.executable, "-m", "optq", "quantize", str(tinystories_model), str(out),
                               "--dataset", str(tinystories_text), "--bits", "4", "--group-size", "32", "--desc-act",
                               "--nsamples", "8", "--seqlen", "64", "--quiet", *extra],
                              env={**os.environ, "OPTQ_FAULT": fault}, capture_output=True, text=True)

    assert run(tmp_path / "ref").returncode == 0
    killed = run(tmp_path / "q", "--no-stream", fault="module:1")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    resumed = run(tmp_path / "q", "--no-stream", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    _same_checkpoint(tmp_path / "ref", tmp_path / "q")


def test_stream_refuses_gguf(tmp_path):
    with pytest.raises(OptqError, match="cannot be streamed .*GGUF.*drop --stream"):
        optq.quantize("smollm2", tmp_path / "q", QuantizeConfig(method="rtn"), stream=True, progress=False)


# ---- the writer ------------------------------------------------------------------------------------------


def _sample_tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "b.float": torch.randn(7, 5, generator=g),
        "a.half": torch.randn(3, 9, generator=g).half(),
        "c.bf16": torch.randn(11, generator=g).bfloat16(),
        "d.int32": torch.randint(-2**31, 2**31 - 1, (4, 6), generator=g, dtype=torch.int32),
        "e.int64": torch.arange(5, dtype=torch.int64),
        "f.uint8": torch.randint(0, 255, (13,), generator=g, dtype=torch.uint8),
        "g.bool": torch.rand(3, 3, generator=g) > 0.5,
        "h.empty": torch.zeros(0, 4),
        "i.scalar": torch.tensor(3.5),
    }


def test_writer_read_by_safetensors(tmp_path):
    tensors = _sample_tensors()
    names = write_tensors(tmp_path, tensors, max_shard_size=10**9, metadata={"format": "pt"})
    assert names == ["model.safetensors"]
    back = load_file(str(tmp_path / "model.safetensors"))
    assert set(back) == set(tensors)
    for k, t in tensors.items():
        assert back[k].dtype == t.dtype and torch.equal(back[k], t), k
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}


def test_writer_any_order_in_pieces_and_shards(tmp_path):
    tensors = _sample_tensors()
    specs = [TensorSpec(k, t.dtype, tuple(t.shape)) for k, t in tensors.items()]
    w = SafetensorsWriter(tmp_path, specs, max_shard_size=100)
    for k in reversed(list(tensors)):
        t = tensors[k]
        if t.dim() and t.shape[0] > 2:  # row ranges, last first
            w.write(k, t[2:], row=2)
            w.write(k, t[:2])
        else:
            w.write(k, t)
    files = w.close()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert files[-1] == "model.safetensors.index.json" and len(files) > 3
    for k, t in tensors.items():
        back = load_file(str(tmp_path / index["weight_map"][k]))[k]
        assert torch.equal(back, t), k
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())


def test_writer_checks(tmp_path):
    w = SafetensorsWriter(tmp_path, [TensorSpec("x", torch.float32, (4, 2))], max_shard_size=10**9)
    with pytest.raises(ValueError, match="dtype"):
        w.write("x", torch.zeros(4, 2, dtype=torch.float16))
    with pytest.raises(ValueError, match="do not fit"):
        w.write("x", torch.zeros(2, 2), row=3)
    with pytest.raises(KeyError):
        w.write("y", torch.zeros(1))
    w.write("x", torch.zeros(3, 2))
    with pytest.raises(RuntimeError, match="not .*fully.* written"):
        w.close()


# ---- memory ----------------------------------------------------------------------------------------------

_PEAK = textwrap.dedent("""
    import json, sys
    import optq
    from optq import QuantizeConfig
    model, out, stream, text = sys.argv[1], sys.argv[2], sys.argv[3] == "1", sys.argv[4]
    optq.quantize(model, out, QuantizeConfig(bits=4, group_size=128), dataset=text, nsamples=2, seqlen=32,
                  stream=stream, progress=False, compute_dtype="float32")
    # VmHWM: this process's own peak. (ru_maxrss would not do: Linux carries it across exec, so a child of a
    # large pytest process reports pytest's size.)
    hwm = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    print(json.dumps(int(hwm.split()[1]) * 1024))
""")


def _random_llama(folder, layers):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=2048, hidden_size=768, intermediate_size=3072, num_hidden_layers=layers,
                      num_attention_heads=12, num_key_value_heads=12, tie_word_embeddings=False)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(str(folder), safe_serialization=True)
    from transformers import AutoTokenizer

    from conftest import shared_path

    AutoTokenizer.from_pretrained(str(shared_path("models", "TinyStories-656K"))).save_pretrained(str(folder))


def _peak(model, out, stream, text):
    r = subprocess.run([sys.executable, "-c", _PEAK, str(model), str(out), "1" if stream else "0", str(text)],
                       capture_output=True, text=True, check=True)
    return int(r.stdout.strip().splitlines()[-1])


def test_streamed_peak_memory_does_not_grow_with_layers(tmp_path, tinystories_text):
    """Peak RSS of a streamed run is the same for 4 and 16 layers of 38 MB (float32); loading the whole
    model (the negative control) grows by about the 12 extra layers."""
    for n in (4, 16):
        _random_llama(tmp_path / f"m{n}", n)
    layer_bytes = 4 * (4 * 768 * 768 + 3 * 768 * 3072)
    extra = 12 * layer_bytes

    def growth(stream, tag):
        return (_peak(tmp_path / "m16", tmp_path / f"{tag}16", stream, tinystories_text)
                - _peak(tmp_path / "m4", tmp_path / f"{tag}4", stream, tinystories_text))

    streamed, whole = growth(True, "s"), growth(False, "w")
    assert whole > 0.75 * extra, (whole, extra)
    assert streamed < 0.15 * extra, (streamed, extra)


def test_spilled_stores_reuse_files(tmp_path):
    """A recycled store's file goes to the next store of its size (stale contents overwritten, read back
    exactly, windows written in any order); other sizes get a new file; no file is ever visible."""
    from optq.pipeline import HiddenStates, SpillFiles

    files = SpillFiles(tmp_path)
    shapes = [(1, 5, 8), (1, 3, 8), (1, 700, 8)]  # the last crosses a page boundary
    first = HiddenStates(shapes, torch.float32, "cpu", files)
    for j, s in enumerate(shapes):
        first[j] = torch.randn(s)
    storage = first._file
    first.recycle()
    assert len(first) == 0 and not first.spilled
    second = HiddenStates(shapes, torch.float32, "cpu", files)
    assert second._file is storage
    new = [torch.randn(s) for s in shapes]
    for j in (2, 0, 1):
        second[j] = new[j]
    assert all(torch.equal(second[j], t) for j, t in enumerate(new))
    other = HiddenStates([(1, 4096, 8)], torch.float32, "cpu", files)
    assert other._file is not storage
    assert not list(tmp_path.iterdir())


def test_alias_keeps_its_windows(tmp_path):
    """Writing a window of a store leaves its alias's window as it was, in memory and spilled."""
    from optq.pipeline import HiddenStates, SpillFiles

    shapes = [(1, 4, 8), (1, 6, 8)]
    before = [torch.randn(s) for s in shapes]
    for spill in (None, SpillFiles(tmp_path)):
        store = HiddenStates(shapes, torch.float32, "cpu", spill)
        for j, t in enumerate(before):
            store[j] = t.clone()
        twin = store.alias()
        store[1] = torch.zeros(shapes[1])
        assert torch.equal(twin[0], before[0]) and torch.equal(twin[1], before[1])
        assert torch.equal(store[1], torch.zeros(shapes[1])) and torch.equal(store[0], before[0])
