"""QuantLinear backends agree with the reference dequantize-and-matmul path."""

import pytest
import torch

from optq.core.gptq import gptq_solve
from optq.core.hessian import HessianAccumulator
from optq.core.grid import GridSpec
from optq.formats.gptq import pack_module
from optq.runtime import native
from optq.core.hardware import amx_bf16
from optq.runtime.quant_linear import DENSE_MIN_ROWS, INT8_MAX_ROWS, QuantLinear


def make_quant_linear(in_f, out_f, bits, group_size, desc_act=False, sym=True, fmt="gptq", bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g)
    x = torch.randn(256, in_f, generator=g) * (torch.rand(in_f, generator=g) + 0.1)
    acc = HessianAccumulator(in_f)
    acc.add(x)
    signed, sym = sym == "signed", bool(sym)  # "signed": llama.cpp's scale rule, negative scales included
    spec = GridSpec(bits=bits, sym=sym, min_zero=1 if (not sym and fmt == "gptq") else 0, signed_scale=signed)
    qw = gptq_solve(w, acc.hessian(), spec, group_size=group_size, desc_act=desc_act).weight
    ql = QuantLinear(in_f, out_f, bits, group_size, bias, fmt)
    for k, v in pack_module(qw, fmt).items():
        ql._buffers[k] = v
    if bias:
        ql._buffers["bias"] = torch.randn(out_f, generator=g).half()
    return ql, qw


CASES = [
    (576, 192, 128, False, True, "gptq"),  # SmolLM2: K = 4.5 x 128, last group 64
    (576, 64, 128, True, True, "gptq"),  # act-order: non-monotone g_idx
    (256, 96, -1, False, False, "gptq"),  # per channel, asymmetric v1
    (160, 64, 32, True, False, "gptq_v2"),
    (384, 128, 96, False, True, "gptq"),  # group 96: int4 kernel blocks of 32
    (576, 96, 128, True, "signed", "gptq"),  # negative scales (--signed-scale)
]
KERNEL_OF_BITS = {2: "int4", 3: "int4", 4: "int4", 8: "int8"}


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("in_f,out_f,group_size,desc_act,sym,fmt", CASES)
def test_kernels_match_reference(bits, in_f, out_f, group_size, desc_act, sym, fmt):
    if bits == 3 and out_f % 32:
        out_f = 96  # 3-bit qzeros pack 32 outputs per 3 words
    ql, qw = make_quant_linear(in_f, out_f, bits, group_size, desc_act, sym, fmt)
    # The reference path itself against the solver's own dequantized weight.
    torch.testing.assert_close(ql.dequantize_weight(), qw.dequantize(), atol=0, rtol=0)
    x = torch.randn(3, 5, in_f)
    assert ql.prepare("reference") == "reference"
    ref32 = ql(x)
    torch.testing.assert_close(ref32, x @ qw.dequantize().T + ql.bias.float(), atol=1e-4, rtol=1e-4)
    kernels = [KERNEL_OF_BITS[bits]]
    if native.load():
        kernels.insert(0, "native")
    assert ql.prepare("auto", torch.float32) == kernels[0]
    ql.prepare("reference")
    ref16 = ql(x.bfloat16()).float()
    long_x = torch.randn(1, INT8_MAX_ROWS + 7, in_f)
    for kernel in kernels:
        assert ql.prepare(kernel, torch.float32) == kernel
        torch.testing.assert_close(ql(x), ref32, atol=2e-4, rtol=1e-4)
        # Prefill-length inputs (the int8 path switches to a dense matmul above INT8_MAX_ROWS): same answer.
        torch.testing.assert_close(ql(long_x), long_x @ qw.dequantize().T + ql.bias.float(), atol=2e-4, rtol=1e-4)
        if kernel == "native" and bits != 8 and not native.bf16_supported():
            # bf16 activations without AVX-512 BF16: PyTorch's int4 kernel takes them (checked next round)
            assert ql.prepare("auto", torch.bfloat16) == "int4"
            continue
        # bf16 activations: the kernel's error stays of the order of the reference path's own bf16 error.
        assert ql.prepare(kernel, torch.bfloat16) == kernel
        out = ql(x.bfloat16()).float()
        assert out.shape == (3, 5, out_f)
        err = (out - ref32).abs().max() / ref32.abs().max()
        err_ref16 = (ref16 - ref32).abs().max() / ref32.abs().max()
        assert err < 3 * err_ref16 + 1e-3, (kernel, float(err), float(err_ref16))
    # Released packed tensors: the kernel still answers, the reference path says why it cannot.
    ql.prepare("auto", torch.float32, release_packed=True)
    assert ql.qweight.numel() == 0
    torch.testing.assert_close(ql(x), ref32, atol=2e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="released"):
        ql.dequantize_weight()


def _require_native():
    """Skip where the machine cannot run the native kernel (no AVX-512 or no compiler); a failed build is a
    failure, not a skip."""
    reason = native.why_unavailable()
    if reason is not None:
        if "failed" in reason:
            pytest.fail(f"the native kernel did not build: {reason}")
        pytest.skip(f"optq's native kernel is unavailable here: {reason}")  # the int4/int8 tests still run


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("in_f,out_f,group_size,desc_act,sym,fmt", CASES)
def test_native_kernel_float32_matches_float64(bits, in_f, out_f, group_size, desc_act, sym, fmt):
    """float32 activations (the AVX-512 path, or the AVX2 one on CPUs without AVX-512) against exact sums."""
    _require_native()
    if bits == 3 and out_f % 32:
        out_f = 96
    ql, qw = make_quant_linear(in_f, out_f, bits, group_size, desc_act, sym, fmt, bias=False)
    assert ql.prepare("auto", torch.float32) == "native"
    w = qw.dequantize().T.double()  # [in, out]
    # The kernel sums x * code and x per group, then s * (sum x c - z sum x): float32 rounding of terms of size
    # |x| |s| (c + |z|), K of them at most (unit roundoff 2^-24, a factor 4 of slack).
    g = qw.g_idx.long()
    terms = (qw.scales[g].abs() * (qw.qweight.T.abs() + qw.zeros[g].abs())).double()  # [in, out]
    for rows in (1, 2, 71):
        x = torch.randn(rows, in_f)
        exact = x.double() @ w
        out = ql(x)
        assert out.dtype == torch.float32 and out.shape == (rows, out_f)
        bound = in_f * 2 ** -22 * (x.double().abs() @ terms)
        assert bool(((out.double() - exact).abs() <= bound).all()), float(((out.double() - exact).abs() - bound).max())
        # and far tighter than what any misplaced code would give
        assert float((out.double() - exact).abs().max()) < 1e-3 * float(exact.abs().max())


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("in_f,out_f,group_size,desc_act,sym,fmt", CASES)
def test_native_kernel_matches_reference(bits, in_f, out_f, group_size, desc_act, sym, fmt):
    _require_native()
    if not native.bf16_supported():
        pytest.skip("bf16 activations on the native kernel need AVX-512 BF16 (the float32 test runs here)")
    if bits == 3 and out_f % 32:
        out_f = 96
    ql, qw = make_quant_linear(in_f, out_f, bits, group_size, desc_act, sym, fmt, bias=False)
    assert ql.prepare("auto", torch.bfloat16) == "native"
    w = qw.dequantize().T  # [in, out], float32
    # Rows 1 and 2 take the kernel's one- and two-row loops, 63 both (31 pairs and a single row; from
    # DENSE_MIN_ROWS on, AMX CPUs take the dense path, tested below).
    for rows in (1, 2, min(71, DENSE_MIN_ROWS - 1)):
        x = torch.randn(rows, in_f).bfloat16()
        exact = x.double() @ w.double()  # the same bf16 inputs, exact products and sums
        out = ql(x)
        assert out.dtype == torch.bfloat16 and out.shape == (rows, out_f)
        # Float32 accumulation (relative 2^-24 per term, K terms), then one rounding to bf16 (unit roundoff 2^-8).
        bound = 2 ** -8 * exact.abs() + in_f * 2 ** -22 * (x.double().abs() @ w.double().abs())
        assert bool(((out.double() - exact).abs() <= bound).all()), float(((out.double() - exact).abs() - bound).max())
    ql.prepare("native", torch.bfloat16, release_packed=True)
    torch.testing.assert_close(ql(x), out, atol=0, rtol=0)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("in_f,out_f,group_size,desc_act,sym,fmt", CASES)
def test_native_dense_path_for_prompts(bits, in_f, out_f, group_size, desc_act, sym, fmt):
    """Prompts on AMX CPUs: the weight dequantized to bf16 (the checkpoint's s (q - z), rounded once) and one
    matmul."""
    _require_native()
    if not (native.bf16_supported() and amx_bf16()):
        pytest.skip("the dense prompt path runs on CPUs with AMX")
    if bits == 3 and out_f % 32:
        out_f = 96
    ql, qw = make_quant_linear(in_f, out_f, bits, group_size, desc_act, sym, fmt, bias=False)
    assert ql.prepare("auto", torch.bfloat16) == "native"
    kernel = ql._kernel
    w = qw.dequantize()  # [out, in], float32
    order = kernel.perm if kernel.perm is not None else torch.arange(in_f)
    assert torch.equal(kernel.dense(), w[:, order].bfloat16())
    x = torch.randn(DENSE_MIN_ROWS + 3, in_f).bfloat16()
    exact = x.double() @ w.T.double()
    out = ql(x)
    assert out.dtype == torch.bfloat16 and out.shape == (x.shape[0], out_f)
    # weights rounded to bf16 (2^-9), float32 accumulation, one rounding of the result
    bound = 2 ** -8 * exact.abs() + (2 ** -8 + in_f * 2 ** -22) * (x.double().abs() @ w.T.double().abs())
    assert bool(((out.double() - exact).abs() <= bound).all())


def test_native_kernel_refuses_groups_off_its_grid():
    _require_native()
    ql, _ = make_quant_linear(48, 64, 4, 6)  # groups start at 6, 12, ...: not multiples of 4
    with pytest.raises(ValueError, match="native backend cannot run"):
        ql.prepare("native", torch.float32)
    assert ql.prepare("auto", torch.float32) == "reference"


def test_kernels_refuse_what_they_cannot_run():
    ql, _ = make_quant_linear(40, 32, 4, -1)  # K = 40: no int4 kernel block size divides it
    assert ql.prepare("auto") == ("native" if native.load() else "reference")
    with pytest.raises(ValueError, match="int4 backend cannot run"):
        ql.prepare("int4")
    with pytest.raises(ValueError, match="int8 backend cannot run"):
        ql.prepare("int8")
    ql8, _ = make_quant_linear(64, 32, 8, 32)
    with pytest.raises(ValueError, match="int4 backend cannot run"):
        ql8.prepare("int4")


@pytest.mark.parametrize("in_f,group_size,desc_act", [(172, 128, False), (172, 32, True), (40, -1, False)])
def test_int8_rows_not_multiple_of_16(in_f, group_size, desc_act):
    # stories260K's down_proj: K = 172 = 128 + 44. torch's int8 kernel misreads such rows unless padded.
    ql, qw = make_quant_linear(in_f, 64, 8, group_size, desc_act)
    assert ql.prepare("int8", torch.float32) == "int8"
    for rows in (1, 3, INT8_MAX_ROWS + 1):
        x = torch.randn(rows, in_f)
        torch.testing.assert_close(ql(x), x @ qw.dequantize().T + ql.bias.float(), atol=2e-4, rtol=1e-4)


def test_lm_head_input_gets_canonical_strides():
    from torch import nn

    from optq.runtime.load import canonical_lm_head_input

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.lm_head = nn.Linear(64, 96, bias=False).requires_grad_(False)

        def get_output_embeddings(self):
            return self.lm_head

    model = Tiny()
    seen = []
    canonical_lm_head_input(model)
    model.lm_head.register_forward_pre_hook(lambda m, args: seen.append(args[0].stride()))
    hidden = torch.randn(1, 7, 64)
    last = hidden[:, -1:, :]  # generation's first-step view: batch stride 7 * 64
    assert last.stride() == (7 * 64, 64, 1)
    torch.testing.assert_close(model.lm_head(last), last @ model.lm_head.weight.T, atol=0, rtol=0)
    assert seen == [(64, 64, 1)]
    canonical_lm_head_input(model)  # idempotent: one hook
    model.lm_head(last)
    assert seen[-1] == (64, 64, 1) and len(model.lm_head._forward_pre_hooks) == 2


def test_native_kernel_builds_where_it_can():
    _require_native()  # skips without AVX2 or a compiler, fails if the build itself failed
    assert native.load()


def test_decode_attention_matches_sdpa(stories260k_model, tinystories_model, monkeypatch):
    import transformers.integrations.sdpa_attention as sdpa_module

    from optq.api import load_any
    from optq.runtime.attention import NAME, use_decode_attention

    for source in (stories260k_model, tinystories_model):
        model, tok = load_any(source, "float32")
        assert model.config._attn_implementation == "sdpa"
        # Two prompts of different lengths, left-padded: the decode steps carry a padding mask.
        tok.padding_side = "left"
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token or tok.unk_token
        batch = tok(["Once upon a time there was", "The dog"], return_tensors="pt", padding=True)
        kw = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False, output_scores=True,
                  return_dict_in_generate=True, pad_token_id=tok.pad_token_id)
        with torch.no_grad():
            ref = model.generate(**batch, **kw)
            assert use_decode_attention(model) and model.config._attn_implementation == NAME
            fallbacks = []
            real = sdpa_module.sdpa_attention_forward
            monkeypatch.setattr(sdpa_module, "sdpa_attention_forward",
                                lambda *a, **k: fallbacks.append(a[1].shape[2]) or real(*a, **k))
            out = model.generate(**batch, **kw)
            monkeypatch.undo()
        # Only the prompt (one call per layer) went to sdpa; every single-token step took the decode path.
        assert len(fallbacks) == model.config.num_hidden_layers and all(q > 1 for q in fallbacks)
        assert torch.equal(out.sequences, ref.sequences)
        for a, b in zip(out.scores, ref.scores):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def _attention_float64(q, k, v, scale):
    """Causal softmax attention in float64, brute force: [B, L, H, D]."""
    groups = q.shape[1] // k.shape[1]
    k = k.double().repeat_interleave(groups, 1)
    v = v.double().repeat_interleave(groups, 1)
    s = (q.double() @ k.transpose(-1, -2)) * scale
    length = q.shape[2]
    s = s.masked_fill(torch.ones(length, length, dtype=torch.bool).triu(1), float("-inf"))
    return (s.softmax(-1) @ v).transpose(1, 2)


@pytest.mark.parametrize("tokens,columns", [(2048, 576), (4096, 100), (7, 48), (1, 1), (301, 172), (600, 1000)])
def test_native_gram_matches_float64(tokens, columns):
    """optq's bf16 X^T X kernel against a float64 product: every entry on and above the diagonal is the old
    value plus the exact sum to float32 accuracy (odd token counts, widths off its 48-column tiles, several
    128-pair passes); nothing outside the matrix is touched, and the thread count does not change a bit."""
    _require_native()
    if not native.bf16_supported():
        pytest.skip("no AVX-512 BF16 here")
    g = torch.Generator().manual_seed(tokens + columns)
    x = (torch.randn(tokens, columns, generator=g) * torch.linspace(0.1, 30, columns)).bfloat16()
    start = torch.randn(columns, columns, generator=g)
    buffer = torch.full((columns + 2, columns), float("nan"))  # rows around the matrix must stay NaN
    out = buffer[1:-1]
    out.copy_(start)
    got = torch.ops.optq_native.gram_bf16_(out, x)
    assert got.data_ptr() == out.data_ptr()
    ref = start.double() + x.double().T @ x.double()
    upper = torch.triu(torch.ones(columns, columns, dtype=torch.bool))
    err = (out.double() - ref)[upper].abs().max().item()
    assert err <= 1e-6 * ref.abs().max().item(), err  # 128-pair passes: ~4e-7; 256-pair ones would fail (~1.3e-6)
    assert buffer[0].isnan().all() and buffer[-1].isnan().all()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = torch.ops.optq_native.gram_bf16_(start.clone(), x)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, torch.ops.optq_native.gram_bf16_(start.clone(), x))


def test_hessian_of_bf16_inputs_takes_the_native_kernel():
    """With the library loaded on a bf16 CPU, HessianAccumulator sums bf16 windows with gram_bf16_ (the same
    bits as calling it directly), and float32 windows do not go through it."""
    _require_native()
    if not native.bf16_supported():
        pytest.skip("no AVX-512 BF16 here")
    g = torch.Generator().manual_seed(5)
    windows = [torch.randn(1, 300, 200, generator=g).bfloat16() for _ in range(3)]
    acc = HessianAccumulator(200)
    direct = torch.zeros(200, 200)
    for w in windows:
        acc.add(w)
        torch.ops.optq_native.gram_bf16_(direct, w[0])
    upper = torch.triu(torch.ones(200, 200, dtype=torch.bool))
    assert torch.equal(acc.xtx[upper], direct[upper])
    as_float = HessianAccumulator(200)
    for w in windows:
        as_float.add(w.float())
    assert not torch.equal(as_float.xtx[upper], direct[upper])  # another summation order: not the kernel's bits
    torch.testing.assert_close(as_float.hessian(), acc.hessian(), rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize("batch,heads,kv_heads,length,dim,spread", [
    (1, 9, 3, 300, 64, 2.0), (2, 4, 2, 100, 128, 2.0), (1, 2, 1, 1, 64, 1.0), (1, 4, 4, 65, 96, 1.0),
    (1, 8, 2, 130, 256, 1.0), (2, 4, 2, 70, 16, 1.0), (1, 2, 2, 200, 80, 1.0), (1, 4, 1, 129, 32, 8.0)])
def test_native_causal_attention_matches_float64(batch, heads, kv_heads, length, dim, spread):
    """optq's causal attention kernel against float64 brute force, beside torch's own bf16 kernel: its error
    must be no larger than torch's (both round the probabilities and the output to bf16)."""
    import torch.nn.functional as F

    _require_native()
    if not native.bf16_supported():
        pytest.skip("no AVX-512 BF16 here")
    g = torch.Generator().manual_seed(length * dim + heads)
    # queries as Transformers hands them over: a transposed view of [B, L, H, D]
    q = (torch.randn(batch, length, heads, dim, generator=g) * spread).bfloat16().transpose(1, 2)
    k = (torch.randn(batch, kv_heads, length, dim, generator=g) * spread).bfloat16()
    v = torch.randn(batch, kv_heads, length, dim, generator=g).bfloat16()
    scale = dim ** -0.5
    out = torch.ops.optq_native.causal_attention(q, k, v, scale)
    assert out.shape == (batch, length, heads, dim) and out.is_contiguous()
    exact = _attention_float64(q, k, v, scale)
    theirs = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True).transpose(1, 2)
    ours_err, theirs_err = (out.double() - exact).abs(), (theirs.double() - exact).abs()
    assert ours_err.max() <= theirs_err.max() * 1.25 + 1e-6, (ours_err.max(), theirs_err.max())
    assert ours_err.mean() <= theirs_err.mean() * 1.25 + 1e-6, (ours_err.mean(), theirs_err.mean())
    # the first query sees only its own key: its output is that value row, rounded once
    groups = heads // kv_heads
    torch.testing.assert_close(out[:, 0].float(), v[:, :, 0].repeat_interleave(groups, 1).float(), rtol=0, atol=0)


def test_native_causal_attention_independent_of_threads():
    _require_native()
    if not native.bf16_supported():
        pytest.skip("no AVX-512 BF16 here")
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, h, 500, 64, generator=g).bfloat16() for h in (6, 2, 2))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = torch.ops.optq_native.causal_attention(q, k, v, 0.125)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, torch.ops.optq_native.causal_attention(q, k, v, 0.125))


@pytest.mark.parametrize("batch,heads,kv_heads,length,dim,spread", [
    (1, 9, 3, 300, 64, 2.0), (2, 4, 2, 100, 128, 2.0), (1, 2, 1, 1, 64, 1.0), (1, 4, 4, 65, 96, 1.0),
    (1, 8, 2, 130, 256, 1.0), (2, 4, 2, 70, 16, 1.0), (1, 4, 1, 129, 32, 8.0)])
def test_native_causal_attention_float32_matches_float64(batch, heads, kv_heads, length, dim, spread):
    """The float32 (AVX2) path against float64 brute force: float32 accuracy, no worse than torch's float32 sdpa
    (within a factor), and threads do not change a bit."""
    import torch.nn.functional as F

    _require_native()
    g = torch.Generator().manual_seed(length * dim + heads + 1)
    q = (torch.randn(batch, length, heads, dim, generator=g) * spread).transpose(1, 2)
    k = torch.randn(batch, kv_heads, length, dim, generator=g) * spread
    v = torch.randn(batch, length, kv_heads, dim, generator=g).transpose(1, 2)  # strided values, read in place
    scale = dim ** -0.5
    out = torch.ops.optq_native.causal_attention(q, k, v, scale)
    assert out.shape == (batch, length, heads, dim) and out.dtype == torch.float32 and out.is_contiguous()
    exact = _attention_float64(q, k, v, scale)
    theirs = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True).transpose(1, 2)
    ours_err, theirs_err = (out.double() - exact).abs(), (theirs.double() - exact).abs()
    assert ours_err.max() <= theirs_err.max() * 4 + 1e-6, (ours_err.max(), theirs_err.max())
    assert ours_err.max() <= 1e-5 * exact.abs().max(), ours_err.max()
    groups = heads // kv_heads
    torch.testing.assert_close(out[:, 0], v[:, :, 0].repeat_interleave(groups, 1), rtol=0, atol=0)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = torch.ops.optq_native.causal_attention(q, k, v, scale)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, out)


def test_float32_causal_attention_in_models_matches_sdpa(tinystories_model, monkeypatch):
    """On an AVX2-only CPU a float32 model's calibration prompts take the float32 kernel; logits match sdpa's to
    float32 accuracy."""
    import optq.runtime.attention as attention
    from optq.api import load_any

    _require_native()
    if native.avx512():
        pytest.skip("the float32 kernel is used on AVX2-only CPUs (its op is tested directly above)")
    model, tok = load_any(tinystories_model, "float32")
    ids = tok(["Once upon a time there was a little girl who loved to play outside in the sun"],
              return_tensors="pt").input_ids
    taken = []
    real = attention._native_causal_applies
    monkeypatch.setattr(attention, "_native_causal_applies", lambda *a: taken.append(real(*a)) or taken[-1])
    with torch.no_grad():
        ref = model(ids).logits
        with attention.native_causal_attention(model) as switched:
            assert switched
            out = model(ids).logits
    assert taken and all(taken)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


def test_causal_attention_in_models_matches_sdpa(tinystories_model, monkeypatch):
    """Under native_causal_attention a bf16 model's unmasked prompts take the native kernel and padded ones
    fall back to sdpa; the logits match sdpa's within bf16 noise."""
    import optq.runtime.attention as attention
    from optq.api import load_any

    _require_native()
    if not native.bf16_supported():
        pytest.skip("no AVX-512 BF16 here")
    model, tok = load_any(tinystories_model, "bfloat16")
    ids = tok(["Once upon a time there was a little girl who loved to play outside in the sun"],
              return_tensors="pt").input_ids
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    padded = tok(["Once upon a time there was", "The dog"], return_tensors="pt", padding=True)
    with torch.no_grad():
        ref, ref_padded = model(ids).logits.float(), model(**padded).logits.float()
        taken = []
        real = attention._native_causal_applies
        monkeypatch.setattr(attention, "_native_causal_applies", lambda *a: taken.append(real(*a)) or taken[-1])
        with attention.native_causal_attention(model) as switched:
            assert switched
            out = model(ids).logits.float()
            assert taken and all(taken)
            taken.clear()
            out_padded = model(**padded).logits.float()
            assert taken and not any(taken)
        assert model.config._attn_implementation == "sdpa"  # restored
    scale = ref.abs().max()
    assert (out - ref).abs().max() <= 0.02 * scale, ((out - ref).abs().max(), scale)
    assert torch.equal(out_padded, ref_padded)
