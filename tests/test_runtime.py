"""QuantLinear backends agree with the reference dequantize-and-matmul path."""

import pytest
import torch

from optq.core.gptq import HessianAccumulator, gptq_solve
from optq.core.grid import GridSpec
from optq.formats.gptq import pack_module
from optq.runtime.quant_linear import QuantLinear


def make_quant_linear(in_f, out_f, bits, group_size, desc_act=False, sym=True, fmt="gptq", bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g)
    x = torch.randn(256, in_f, generator=g) * (torch.rand(in_f, generator=g) + 0.1)
    acc = HessianAccumulator(in_f)
    acc.add(x)
    spec = GridSpec(bits=bits, sym=sym, min_zero=1 if (not sym and fmt == "gptq") else 0)
    qw = gptq_solve(w, acc.hessian(), spec, group_size=group_size, desc_act=desc_act).weight
    ql = QuantLinear(in_f, out_f, bits, group_size, bias, fmt)
    for k, v in pack_module(qw, fmt).items():
        ql._buffers[k] = v
    if bias:
        ql._buffers["bias"] = torch.randn(out_f, generator=g).half()
    return ql, qw


@pytest.mark.parametrize(
    "in_f,out_f,group_size,desc_act,sym,fmt",
    [
        (576, 192, 128, False, True, "gptq"),  # SmolLM2: K = 4.5 x 128, last group 64
        (576, 64, 128, True, True, "gptq"),  # act-order: non-monotone g_idx
        (256, 96, -1, False, False, "gptq"),  # per channel, asymmetric v1
        (160, 64, 32, True, False, "gptq_v2"),
        (384, 128, 96, False, True, "gptq"),  # group 96: kernel blocks of 32
    ],
)
def test_int4_matches_reference(in_f, out_f, group_size, desc_act, sym, fmt):
    ql, qw = make_quant_linear(in_f, out_f, 4, group_size, desc_act, sym, fmt)
    # The reference path itself against the solver's own dequantized weight.
    torch.testing.assert_close(ql.dequantize_weight(), qw.dequantize(), atol=0, rtol=0)
    x = torch.randn(3, 5, in_f)
    assert ql.prepare("reference") == "reference"
    ref32 = ql(x)
    torch.testing.assert_close(ref32, x @ qw.dequantize().T + ql.bias.float(), atol=1e-4, rtol=1e-4)
    assert ql.prepare("auto", torch.float32) == "int4"
    torch.testing.assert_close(ql(x), ref32, atol=2e-4, rtol=1e-4)
    ql.prepare("int4", torch.bfloat16)
    xb = x.bfloat16()
    out = ql(xb).float()
    assert out.dtype == torch.float32 and out.shape == (3, 5, out_f)
    err = (out - ref32).abs().max() / ref32.abs().max()
    assert err < 0.02, float(err)


def test_int4_refuses_what_it_cannot_run():
    ql, _ = make_quant_linear(40, 32, 4, -1)  # K = 40: no kernel group size divides it
    assert ql.prepare("auto") == "reference"
    with pytest.raises(ValueError, match="int4 backend cannot run"):
        ql.prepare("int4")
    ql3, _ = make_quant_linear(64, 32, 3, 32)
    assert ql3.prepare("auto") == "reference"
