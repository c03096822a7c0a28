"""optq export-gguf: the GGUF file, read back by the gguf library and by Transformers' GGUF loader (two
independent readers), holds the checkpoint's weights: exactly for Q4_0/Q8_0, to fp16 rounding of m for Q4_1."""

import logging

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

import optq
from optq.cli import main as cli
from optq.config import QuantizeConfig
from optq.errors import OptqError
from optq.formats.gguf_export import export_gguf
from optq.runtime.quant_linear import QuantLinear

CAL = dict(nsamples=8, seqlen=128, progress=False)
IDS = torch.randint(3, 2000, (1, 40), generator=torch.Generator().manual_seed(0))


def _ckpt(model, text, out, **cfg):
    optq.quantize(model, out, QuantizeConfig(**cfg), dataset=str(text), **CAL)
    return out


def _compare_with_transformers(ckpt, gguf_file, atol):
    """Transformers dequantizes the GGUF with the gguf library and undoes llama.cpp's q/k row order."""
    ours = optq.load(ckpt, dtype="float32", backend="reference")
    theirs = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
    params = dict(theirs.named_parameters())
    n = 0
    for name, m in ours.named_modules():
        if isinstance(m, QuantLinear):
            torch.testing.assert_close(params[f"{name}.weight"].detach(), m.dequantize_weight(), rtol=0, atol=atol,
                                       msg=lambda s: f"{name}: {s}")
            n += 1
    assert n == 14
    with torch.no_grad():
        a, b = ours(IDS).logits, theirs(IDS).logits
    return (a - b).abs().max().item() / a.abs().max().item()


@pytest.mark.parametrize("cfg,types", [
    (dict(bits=4, group_size=32), {"Q4_0"}),
    (dict(bits=8, group_size=32), {"Q8_0"}),
    (dict(bits=4, group_size=32, desc_act=True, static_groups=True), {"Q4_0"}),
    (dict(bits=4, group_size=32, signed_scale=True), {"Q4_0"}),  # llama.cpp's own scale rule, negative d
    (dict(bits=8, group_size=32, signed_scale=True), {"Q8_0"}),
])
def test_exact_types_round_trip(cfg, types, tinystories_model, tinystories_text, tmp_path):
    ckpt = _ckpt(tinystories_model, tinystories_text, tmp_path / "q", **cfg)
    out = tmp_path / "m.gguf"
    counts = export_gguf(ckpt, out)
    assert {k for k in counts if k.startswith("Q")} == types and sum(counts[t] for t in types) == 14
    assert _compare_with_transformers(ckpt, out, atol=0) == 0.0


def test_asymmetric_is_q4_1_with_m_rounded_to_fp16(tinystories_model, tinystories_text, tmp_path):
    ckpt = _ckpt(tinystories_model, tinystories_text, tmp_path / "q", bits=4, group_size=32, sym=False,
                 checkpoint_format="gptq_v2")
    out = tmp_path / "m.gguf"
    assert export_gguf(ckpt, out)["Q4_1"] == 14
    # w = d*q + m with m = -d*z rounded to fp16: off by at most half an ulp of m (|m| <= 15 d)
    model = optq.load(ckpt, dtype="float32", backend="reference")
    bound = max(m.dequantize_weight().abs().max().item() for m in model.modules() if isinstance(m, QuantLinear))
    err = _compare_with_transformers(ckpt, out, atol=2 * bound * 2**-11)
    assert err < 2e-3  # relative to the largest logit


def test_file_has_what_llama_cpp_needs(tinystories_model, tinystories_text, tmp_path):
    ckpt = _ckpt(tinystories_model, tinystories_text, tmp_path / "q", bits=4, group_size=32)
    out = tmp_path / "m.gguf"
    export_gguf(ckpt, out)
    r = gguf.GGUFReader(str(out))
    f = {x.name: x.contents() for x in r.fields.values()}
    assert f["general.architecture"] == "llama" and f["llama.block_count"] == 2
    assert f["llama.attention.head_count_kv"] == 4 and f["llama.embedding_length"] == 128
    assert len(f["tokenizer.ggml.tokens"]) == 2048 and f["tokenizer.ggml.model"] in ("llama", "gpt2")
    names = {t.name for t in r.tensors}
    assert {"token_embd.weight", "output_norm.weight", "blk.1.ffn_down.weight", "blk.0.attn_k.weight"} <= names
    assert "output.weight" not in names  # tied: llama.cpp reads token_embd
    types = {t.name: t.tensor_type.name for t in r.tensors}
    assert types["blk.0.attn_norm.weight"] == "F32" and types["token_embd.weight"] == "F16"
    # the gguf library's own dequantizer on one block agrees with the spec's Q4_0 formula on our bytes
    t = next(x for x in r.tensors if x.name == "blk.0.ffn_up.weight")
    raw = np.asarray(t.data).reshape(-1, 18)[0]
    d = raw[:2].view(np.float16)[0].astype(np.float32)
    q = np.concatenate([raw[2:] & 0xF, raw[2:] >> 4]).astype(np.float32)
    lib = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(-1)[:32]
    np.testing.assert_array_equal(lib, d * (q - 8))


def test_refusals_and_requantize(tinystories_model, tinystories_text, tmp_path, caplog):
    g128 = _ckpt(tinystories_model, tinystories_text, tmp_path / "g128", bits=4, group_size=64)
    with pytest.raises(OptqError, match=r"no exact GGUF type.*--requantize"):
        export_gguf(g128, tmp_path / "a.gguf")
    assert not (tmp_path / "a.gguf").exists() and not list(tmp_path.glob(".*optq-tmp"))
    with caplog.at_level(logging.WARNING, logger="optq"):
        counts = export_gguf(g128, tmp_path / "a.gguf", requantize=True)
    assert counts["Q4_0"] == 14 and "rounding again" in caplog.text
    act = _ckpt(tinystories_model, tinystories_text, tmp_path / "act", bits=4, group_size=32, desc_act=True,
                static_groups=False)
    with pytest.raises(OptqError, match="act-order without static groups"):
        export_gguf(act, tmp_path / "b.gguf", requantize=True)
    with pytest.raises(OptqError, match="already exists"):
        export_gguf(g128, tmp_path / "a.gguf", requantize=True)


def test_cli_export_and_quantize_format_gguf(tinystories_model, tinystories_text, tmp_path, capsys):
    cal = ["--dataset", str(tinystories_text), "--nsamples", "8", "--seqlen", "128", "--quiet"]
    (tmp_path / "direct").mkdir()
    (tmp_path / "two-step").mkdir()
    assert cli(["quantize", str(tinystories_model), str(tmp_path / "direct" / "m.gguf"), "--format", "gguf",
                *cal]) == 0
    assert cli(["quantize", str(tinystories_model), str(tmp_path / "ckpt"), "--group-size", "32",
                "--format", "gptq_v2", "--signed-scale", *cal]) == 0
    assert cli(["export-gguf", str(tmp_path / "ckpt"), str(tmp_path / "two-step" / "m.gguf")]) == 0
    # the shortcut is quantize (on llama.cpp's Q4_0 grid, its default there) + export: the same bytes
    assert (tmp_path / "direct" / "m.gguf").read_bytes() == (tmp_path / "two-step" / "m.gguf").read_bytes()
    assert [p.name for p in (tmp_path / "direct").iterdir()] == ["m.gguf"]
    assert cli(["quantize", str(tinystories_model), str(tmp_path / "x.gguf"), "--format", "gguf",
                "--group-size", "128", *cal]) == 2
    assert "group size 32" in capsys.readouterr().err
