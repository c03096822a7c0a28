"""Checkpoints every loader takes by default: the written config and tensor shapes against vLLM's loading
rules (optq.formats.loaders cites its source), checked from the checkpoint's own files."""

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from transformers import LlamaConfig, LlamaForCausalLM

import optq
from optq.inspect import inspect_checkpoint

from conftest import shared_path


@pytest.fixture(scope="module")
def odd_width_model(tmp_path_factory):
    """A random Llama whose hidden size (192) a group of 128 does not divide, as SmolLM2's 576."""
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=192, intermediate_size=512, num_hidden_layers=2, num_attention_heads=3,
                      num_key_value_heads=1, vocab_size=2048, max_position_embeddings=256)
    path = tmp_path_factory.mktemp("odd") / "model"
    LlamaForCausalLM(cfg).save_pretrained(path)
    for f in shared_path("models", "TinyStories-656K").glob("*token*"):
        shutil.copy(f, path / f.name)
    return path


def quantize(model, out, text, **kw):
    optq.quantize(str(model), out, optq.QuantizeConfig(bits=4, group_size=128, **kw), dataset=str(text),
                  nsamples=4, seqlen=64, progress=False)
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    tensors = {}
    for f in out.glob("*.safetensors"):
        with safe_open(str(f), "pt") as sf:
            tensors.update({k: sf.get_tensor(k) for k in sf.keys()})
    return cfg, tensors


def vllm_shapes(in_f, out_f, group_size, bits=4):
    """What vLLM's GPTQLinearMethod.create_weights allocates for one linear (and whether it accepts it)."""
    g = in_f if group_size == -1 else group_size
    assert in_f % g == 0, "vLLM: the input size is not aligned with the quantized weight shape"
    pack = 32 // bits
    return {"qweight": (in_f // pack, out_f), "scales": (in_f // g, out_f), "qzeros": (in_f // g, out_f // pack),
            "g_idx": (in_f,)}


@pytest.mark.parametrize("flags", [{"desc_act": False}, {}])
def test_default_checkpoint_fits_vllm(odd_width_model, tinystories_text, tmp_path, flags):
    cfg, tensors = quantize(odd_width_model, tmp_path / "q", tinystories_text, **flags)
    assert cfg["desc_act"] is False  # vLLM refuses desc_act true; static groups keep g_idx = column // group
    assert cfg["group_size"] == 64  # the largest of 128/64/32 dividing 192 and 512
    assert cfg["meta"].get("act_order", False) == (flags != {"desc_act": False})
    modules = sorted({k.rsplit(".", 1)[0] for k in tensors if k.endswith(".qweight")})
    assert len(modules) == 2 * 7
    for m in modules:
        out_f = tensors[f"{m}.scales"].shape[1]
        in_f = tensors[f"{m}.g_idx"].shape[0]
        for part, shape in vllm_shapes(in_f, out_f, cfg["group_size"]).items():
            assert tuple(tensors[f"{m}.{part}"].shape) == shape, (m, part)
        # vLLM builds g_idx itself as column // group_size: the stored one must say the same
        assert torch.equal(tensors[f"{m}.g_idx"].long(), torch.arange(in_f) // cfg["group_size"])
    info = inspect_checkpoint(tmp_path / "q")
    assert info["loaders"]["vllm"] is None and info["loaders"]["gptqmodel"] is None
    # 192 inputs are not a multiple of Marlin's 128: named, not hidden
    assert "Marlin needs inputs a multiple of 128" in info["loaders"]["vllm-marlin"]


def test_partial_groups_on_request(odd_width_model, tinystories_text, tmp_path):
    cfg, tensors = quantize(odd_width_model, tmp_path / "q", tinystories_text, partial_groups=True)
    assert cfg["group_size"] == 128
    assert tensors["model.layers.0.self_attn.q_proj.scales"].shape[0] == 2  # ceil(192 / 128)
    with pytest.raises(AssertionError, match="not aligned"):
        vllm_shapes(192, 192, 128)
    assert "shorter last group" in inspect_checkpoint(tmp_path / "q")["loaders"]["vllm"]


def test_act_order_checkpoint_is_named_for_vllm(odd_width_model, tinystories_text, tmp_path):
    cfg, _ = quantize(odd_width_model, tmp_path / "q", tinystories_text, desc_act=True,
                      static_groups=False)
    assert cfg["desc_act"] is True
    assert "desc_act is true" in inspect_checkpoint(tmp_path / "q")["loaders"]["vllm"]
    # optq reads it back as act-order, and the static-groups one as act-order too (meta.act_order)
    assert optq.QuantizeConfig.from_hf(cfg).desc_act
