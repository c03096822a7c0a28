"""Numerical faults: NaN/Inf, a Hessian no damping fixes, a module no calibration token reaches."""

import json

import pytest
import torch
from torch import nn

import optq
from optq.api import save_quantized
from optq.calibration import calibration_windows
from optq.config import QuantizeConfig
from optq.core.hessian import HessianAccumulator
from optq.core.grid import rtn_quantize
from optq.errors import OptqError
from optq.models.loading import load_source_model
from optq.pipeline import RTN_FALLBACK, _solve_module, quantize_model


def _source(tinystories_model, tinystories_text):
    src = load_source_model(tinystories_model)
    windows = calibration_windows(src.tokenizer, str(tinystories_text), 4, 64, 0)
    return src, windows


class _UnroutedMlp(nn.Module):
    """An MLP block whose experts no token is routed to: it holds the linears but never calls them."""

    def __init__(self, mlp: nn.Module):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = mlp.gate_proj, mlp.up_proj, mlp.down_proj

    def forward(self, x):
        return torch.zeros_like(x)


def test_module_without_tokens_is_an_error_or_rtn_fallback(tinystories_model, tinystories_text, tmp_path):
    cfg = QuantizeConfig(bits=4, group_size=32)
    src, windows = _source(tinystories_model, tinystories_text)
    src.model.model.layers[1].mlp = _UnroutedMlp(src.model.model.layers[1].mlp)
    with pytest.raises(OptqError, match=r"layer 1 module model\.layers\.1\.mlp\.gate_proj: .*no calibration tokens"
                                        r".*--allow-rtn-fallback"):
        quantize_model(src.model, windows, cfg, progress=False)

    src, windows = _source(tinystories_model, tinystories_text)
    originals = {n: src.model.model.layers[1].mlp.get_submodule(n).weight.detach().clone()
                 for n in ("gate_proj", "up_proj", "down_proj")}
    src.model.model.layers[1].mlp = _UnroutedMlp(src.model.model.layers[1].mlp)
    result = quantize_model(src.model, windows, cfg, progress=False, allow_rtn_fallback=True)
    fallen = {f"model.layers.1.mlp.{n}" for n in originals}
    assert set(result.rtn_fallback) == fallen
    out = save_quantized(src.model, result, tmp_path / "q", dtype="float32")
    meta = json.loads((out / "config.json").read_text())["quantization_config"]["meta"]
    assert set(meta["rtn_fallback"]) == fallen and all("no calibration tokens" in v for v in meta["rtn_fallback"].values())
    loaded = optq.load(out, dtype="float32", backend="reference")
    for n, w in originals.items():
        expect = rtn_quantize(w.float(), cfg.grid(), cfg.group_size).dequantize()
        got = loaded.get_submodule(f"model.layers.1.mlp.{n}").dequantize_weight()
        torch.testing.assert_close(got, expect, rtol=1e-3, atol=1e-6)  # scales stored in float16
    # the other modules were solved by GPTQ: a real loss, tokens seen, no note
    solved = [r for r in result.log if r.layer == 1 and r.module.endswith("q_proj")]
    assert solved and solved[0].samples == 4 * 64 and solved[0].loss > 0 and not solved[0].note


def test_indefinite_hessian_error_or_rtn_fallback():
    torch.manual_seed(0)
    cfg = QuantizeConfig(bits=4, group_size=16)
    w = torch.randn(8, 32)
    acc = HessianAccumulator(32)
    acc.add(torch.randn(100, 32))
    acc.xtx = -acc.xtx  # negative definite: no damping up to 100% of the mean diagonal makes it PD
    with pytest.raises(OptqError, match=r"layer 3 module m: GPTQ cannot solve it: .*not positive definite"
                                        r".*--allow-rtn-fallback"):
        _solve_module(w, acc, cfg, "layer 3 module m", allow_rtn_fallback=False, last_user=False)
    qw, loss, damp, note = _solve_module(w, acc, cfg, "layer 3 module m", allow_rtn_fallback=True, last_user=False)
    assert note.startswith("rtn fallback: ") and "not positive definite" in note
    torch.testing.assert_close(qw.dequantize(), rtn_quantize(w, cfg.grid(), 16).dequantize(), rtol=0, atol=0)
    # a positive definite one is solved, not rounded
    acc.xtx = -acc.xtx
    _, loss, _, note = _solve_module(w, acc, cfg, "layer 3 module m", allow_rtn_fallback=True)
    assert not note.startswith(RTN_FALLBACK) and loss > 0


def test_nan_in_activations_names_layer_and_module(tinystories_model, tinystories_text):
    src, windows = _source(tinystories_model, tinystories_text)
    with torch.no_grad():
        src.model.model.layers[1].post_attention_layernorm.weight[3] = float("nan")
    with pytest.raises(OptqError, match=r"layer 1 module model\.layers\.1\.mlp\.gate_proj: its inputs .*NaN or Inf"):
        quantize_model(src.model, windows, QuantizeConfig(bits=4, group_size=32), progress=False,
                       allow_rtn_fallback=True)  # not a fallback case: the model itself is broken


def test_nan_in_weights_names_layer_and_module(tinystories_model, tinystories_text):
    src, windows = _source(tinystories_model, tinystories_text)
    with torch.no_grad():
        src.model.model.layers[0].self_attn.o_proj.weight[0, 0] = float("inf")
    with pytest.raises(OptqError, match=r"layer 0 module model\.layers\.0\.self_attn\.o_proj: the weight holds"):
        quantize_model(src.model, windows, QuantizeConfig(method="rtn"), progress=False)
