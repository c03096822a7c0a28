"""`import optq`, then Transformers' own from_pretrained / pipeline / save_pretrained on GPTQ checkpoints."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import optq  # noqa: F401  (registers optq's quantizer for Transformers' `gptq` method)
from optq.runtime.quant_linear import QuantLinear

FIXTURES = Path(__file__).parent / "fixtures" / "gptqmodel"
GPTQMODEL = sorted(p for p in FIXTURES.iterdir() if (p / "reference.safetensors").exists())


def _from_pretrained(path, **kw):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), **kw)


@pytest.mark.parametrize("folder", GPTQMODEL, ids=[p.name for p in GPTQMODEL])
def test_gptqmodel_checkpoints_load_in_transformers(folder):
    """Each GPTQModel 7.7 checkpoint (v1/v2, act-order, 2/3/4/8 bits, dynamic) gives GPTQModel's own logits."""
    with safe_open(str(folder / "reference.safetensors"), framework="pt") as f:
        ids, want = f.get_tensor("input_ids"), f.get_tensor("logits")
    model = _from_pretrained(folder, dtype=torch.float32)
    assert any(isinstance(m, QuantLinear) for m in model.modules())
    with torch.no_grad():
        got = model(ids).logits
    assert (got - want).abs().max() <= 0.01 * want.abs().max()


def test_optq_checkpoint_generate_pipeline_and_save(tinystories_model, tinystories_text, tmp_path):
    from transformers import AutoTokenizer, pipeline

    ckpt = tmp_path / "q"
    optq.quantize(tinystories_model, ckpt, optq.QuantizeConfig(bits=4, group_size=32), dataset=str(tinystories_text),
                  nsamples=16, seqlen=128, progress=False)
    ours = optq.load(ckpt, dtype="float32")
    model = _from_pretrained(ckpt, dtype=torch.float32, device_map="cpu")
    tok = AutoTokenizer.from_pretrained(str(ckpt))
    ids = tok("Once upon a time", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ours(ids).logits, rtol=0, atol=1e-5)
    greedy = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(greedy, ours.generate(ids, max_new_tokens=8, do_sample=False))
    text = pipeline("text-generation", model=str(ckpt), dtype=torch.float32)("Once upon a time", max_new_tokens=8,
                                                                              do_sample=False)[0]["generated_text"]
    assert text == tok.decode(greedy[0], skip_special_tokens=True)
    # save_pretrained writes a checkpoint that loads again, with optq's quantization_config intact
    model.save_pretrained(str(tmp_path / "saved"))
    cfg = json.loads((tmp_path / "saved" / "config.json").read_text())["quantization_config"]
    assert cfg["bits"] == 4 and cfg["group_size"] == 32 and cfg["meta"]["act_order"] is True
    again = optq.load(tmp_path / "saved", dtype="float32")
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, ours(ids).logits, rtol=0, atol=1e-5)


def test_hand_back_to_transformers(monkeypatch):
    from optq import hf_integration

    monkeypatch.setenv("OPTQ_TRANSFORMERS", "0")
    assert not hf_integration.takes_over()
    monkeypatch.setenv("OPTQ_TRANSFORMERS", "1")
    assert hf_integration.takes_over()


def test_quantize_on_load_with_gptqconfig(tinystories_model, tinystories_text, tmp_path):
    """from_pretrained(float, quantization_config=GPTQConfig(...)) runs optq's GPTQ; save_pretrained writes a
    checkpoint optq loads to the same logits; the quantized model is closer to float than RTN is."""
    from transformers import AutoTokenizer, GPTQConfig

    tok = AutoTokenizer.from_pretrained(str(tinystories_model))
    texts = Path(tinystories_text).read_text().split("<|endoftext|>")
    model = _from_pretrained(tinystories_model, dtype=torch.float32,
                             quantization_config=GPTQConfig(bits=3, group_size=32, dataset=texts, tokenizer=tok,
                                                            model_seqlen=64))
    assert isinstance(model.model.layers[0].mlp.down_proj, QuantLinear)
    model.save_pretrained(str(tmp_path / "q"))
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert (cfg["bits"], cfg["group_size"], cfg["meta"]["act_order"]) == (3, 32, True)
    ids = tok(texts[3][:400], return_tensors="pt").input_ids
    again = optq.load(tmp_path / "q", dtype="float32")
    float_model = _from_pretrained(tinystories_model, dtype=torch.float32)
    rtn = optq.quantize(tinystories_model, tmp_path / "rtn", optq.QuantizeConfig(bits=3, group_size=32, method="rtn"),
                        progress=False).path
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits, rtol=0, atol=1e-5)
        ref = torch.log_softmax(float_model(ids).logits, -1)

        def kl(m):
            return (ref.exp() * (ref - torch.log_softmax(m(ids).logits, -1))).sum(-1).mean()

        assert kl(model) < kl(optq.load(rtn, dtype="float32"))
