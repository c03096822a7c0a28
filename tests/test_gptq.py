import logging

import pytest
import torch

from optq.core.gptq import NotPositiveDefiniteError, gptq_solve
from optq.core.hessian import HessianAccumulator
from optq.core.grid import GridSpec, dequantize, find_params, quantize, rtn_quantize


def reference_gptq(w, h, spec, group_size, desc_act=False, static_groups=False, damp=0.01, block=128):
    """The paper's update written directly: one column at a time, full inverse Hessian kept explicitly and the
    quantized column eliminated from it (Gaussian elimination), float64, no Cholesky, no lazy updates.
    As in the reference code, a dynamic group's parameters come from its columns as they stood at the start of
    the `block`-column block holding the group's first column."""
    w = w.double().clone()
    h = h.double().clone()
    cols = w.shape[1]
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    order = torch.argsort(torch.diag(h), descending=True, stable=True) if desc_act else torch.arange(cols)
    fixed = None
    if group_size == -1:
        fixed = {0: find_params(w.float(), spec)}
    elif static_groups:
        fixed = {g: find_params(w[:, g * group_size : (g + 1) * group_size].float(), spec)
                 for g in range((cols + group_size - 1) // group_size)}
    h = h + damp * torch.mean(torch.diag(h)) * torch.eye(cols, dtype=h.dtype)
    hinv = torch.linalg.inv(h)
    q = torch.zeros(w.shape, dtype=torch.int64)
    g_idx = torch.zeros(cols, dtype=torch.int64)
    loss = 0.0
    params = None
    for pos in range(cols):
        if pos % block == 0:
            snapshot = w.clone()
        c = int(order[pos])
        if group_size == -1:
            params, g_idx[c] = fixed[0], 0
        elif static_groups:
            params, g_idx[c] = fixed[c // group_size], c // group_size
        else:
            if pos % group_size == 0:
                group_cols = order[pos : pos + group_size]
                params = find_params(snapshot[:, group_cols].float(), spec)
            g_idx[c] = pos // group_size
        scale, zero = (p.double() for p in params)
        qc = quantize(w[:, c], scale, zero, spec.maxq)
        deq = dequantize(qc, scale, zero)
        q[:, c] = qc.long()
        d = hinv[c, c]
        loss += float(((w[:, c] - deq) ** 2).sum() / d / 2)
        err = (w[:, c] - deq) / d
        w -= err[:, None] * hinv[c, :][None, :]
        hinv = hinv - torch.outer(hinv[:, c], hinv[c, :]) / d
    return q, g_idx, loss


def correlated_inputs(n, cols, seed, structure_seed=0):
    """Samples of one correlated distribution (fixed by structure_seed); seed picks the samples."""
    gs = torch.Generator().manual_seed(1000 + structure_seed)
    mix = torch.randn(cols, cols, generator=gs) / cols**0.5 + torch.eye(cols)
    scale = torch.rand(cols, generator=gs) * 3 + 0.1
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, cols, generator=g) @ mix) * scale


def hessian_of(x):
    acc = HessianAccumulator(x.shape[1])
    acc.add(x)
    return acc.hessian()


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("group_size", [-1, 16, 40])
def test_identity_hessian_equals_rtn(sym, group_size):
    # Uncorrelated inputs: no error is moved, every column is rounded to nearest.
    w = torch.randn(24, 80, generator=torch.Generator().manual_seed(0))
    spec = GridSpec(bits=4, sym=sym)
    res = gptq_solve(w, torch.eye(80), spec, group_size=group_size, block_size=32)
    rtn = rtn_quantize(w, spec, group_size)
    assert torch.equal(res.weight.qweight, rtn.qweight)
    assert torch.equal(res.weight.scales, rtn.scales)
    assert torch.equal(res.weight.zeros, rtn.zeros)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_gptq_beats_rtn_on_held_out_inputs(bits):
    cols, rows = 96, 48
    x_train = correlated_inputs(2048, cols, 1)
    x_test = correlated_inputs(1024, cols, 2)
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(3))
    spec = GridSpec(bits=bits)
    for group_size in (-1, 32):
        gptq = gptq_solve(w, hessian_of(x_train), spec, group_size=group_size).weight.dequantize()
        rtn = rtn_quantize(w, spec, group_size).dequantize()
        err_gptq = ((x_test @ (w - gptq).T) ** 2).mean()
        err_rtn = ((x_test @ (w - rtn).T) ** 2).mean()
        assert err_gptq < 0.8 * err_rtn, (group_size, float(err_gptq), float(err_rtn))


@pytest.mark.parametrize(
    "group_size,desc_act,static_groups,sym",
    [(-1, False, False, True), (8, False, False, True), (12, False, False, False), (12, True, False, True),
     (8, True, True, False), (-1, True, False, False)],
)
def test_matches_direct_column_by_column_reference(group_size, desc_act, static_groups, sym):
    cols, rows = 40, 10
    x = correlated_inputs(512, cols, 7)
    x[:, 5] = 0  # a dead input column
    h = hessian_of(x)
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(8))
    spec = GridSpec(bits=3, sym=sym)
    # block_size 16 with group 12 puts group starts inside blocks and groups across block edges.
    res = gptq_solve(w, h, spec, group_size=group_size, desc_act=desc_act, static_groups=static_groups,
                     damp_percent=0.01, block_size=16)
    q_ref, g_ref, loss_ref = reference_gptq(w, h, spec, group_size, desc_act, static_groups, 0.01, block=16)
    assert torch.equal(res.weight.g_idx.long(), g_ref)
    mismatch = (res.weight.qweight.long() != q_ref)
    # float32 blocked vs float64 direct: a rare rounding tie may flip one code, never more than one step.
    assert mismatch.float().mean() <= 0.01
    assert (res.weight.qweight.long() - q_ref).abs().max() <= 1
    assert res.loss == pytest.approx(loss_ref, rel=1e-3)
    if desc_act and not static_groups and group_size != -1:
        assert not torch.all(res.weight.g_idx[1:] >= res.weight.g_idx[:-1]), "act-order g_idx should be non-monotone"


def test_dead_columns_quantize_to_zero():
    x = correlated_inputs(256, 32, 4)
    x[:, [3, 17]] = 0
    w = torch.randn(8, 32)
    res = gptq_solve(w, hessian_of(x), GridSpec(bits=4), group_size=16)
    deq = res.weight.dequantize()
    assert torch.equal(deq[:, [3, 17]], torch.zeros(8, 2))


def test_damping_raised_and_logged(caplog):
    x = torch.randn(4, 32)  # rank 4 < 32 columns: H is singular
    w = torch.randn(8, 32)
    with caplog.at_level(logging.WARNING, logger="optq"):
        res = gptq_solve(w, hessian_of(x), GridSpec(bits=4), group_size=-1, damp_percent=0.0)
    assert res.damp_percent > 0
    assert "not positive definite" in caplog.text


def test_not_positive_definite_raises():
    with pytest.raises(NotPositiveDefiniteError):
        gptq_solve(torch.randn(4, 16), -torch.eye(16), GridSpec(bits=4), group_size=-1)


def test_hessian_masks_padding():
    x = torch.randn(2, 10, 16)
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[1, 6:] = False
    masked = HessianAccumulator(16)
    masked.add(x, mask)
    direct = HessianAccumulator(16)
    direct.add(x[0])
    direct.add(x[1, :6])
    assert masked.tokens == 16
    torch.testing.assert_close(masked.hessian(), direct.hessian())
    # H = 2 X^T X / n, computed independently.
    flat = torch.cat([x[0], x[1, :6]])
    torch.testing.assert_close(masked.hessian(), 2 * flat.T @ flat / 16)


# ---- GPTAQ (asymmetric calibration) --------------------------------------------------------------------------


def drifted(x, seed):
    """x as the float model would have seen it: the quantized model's inputs plus a systematic drift."""
    cols = x.shape[1]
    r = torch.randn(cols, cols, generator=torch.Generator().manual_seed(seed)) / cols**0.5
    return x @ (torch.eye(cols) + 0.15 * r)


def asymmetric_terms(x, x_ref):
    acc = HessianAccumulator(x.shape[1], asymmetric=True)
    acc.add(x, x_ref=x_ref)
    return acc.hessian(), acc.cross_term()


def test_gptaq_cross_term_matches_definition():
    x = correlated_inputs(300, 20, 11)
    x_ref = drifted(x, 12)
    h, d = asymmetric_terms(x, x_ref)
    assert torch.allclose(d, 2 * (x_ref - x).T @ x / 300, rtol=1e-4, atol=1e-4)
    assert torch.allclose(h, 2 * x.T @ x / 300, rtol=1e-4, atol=1e-4)


def test_gptaq_without_drift_is_gptq():
    x = correlated_inputs(512, 48, 13)
    w = torch.randn(16, 48, generator=torch.Generator().manual_seed(14))
    h, d = asymmetric_terms(x, x.clone())
    assert torch.count_nonzero(d) == 0
    spec = GridSpec(bits=3)
    plain = gptq_solve(w, h, spec, group_size=16, desc_act=True)
    asym = gptq_solve(w, h, spec, group_size=16, desc_act=True, cross_term=d, gptaq_alpha=1.0)
    assert torch.equal(plain.weight.qweight, asym.weight.qweight)


@pytest.mark.parametrize("alpha", [0.25, 1.0])
@pytest.mark.parametrize("desc_act", [False, True])
def test_gptaq_tracks_float_outputs_on_held_out_inputs(alpha, desc_act):
    # The target is the float layer's output W x_ref; the quantized layer sees x. GPTAQ must get closer to it
    # than GPTQ, which only aims at W x.
    cols, rows = 96, 48
    x_train, x_test = correlated_inputs(4096, cols, 15), correlated_inputs(2048, cols, 16)
    ref_train, ref_test = drifted(x_train, 17), drifted(x_test, 17)
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(18))
    h, d = asymmetric_terms(x_train, ref_train)
    spec = GridSpec(bits=4)
    plain = gptq_solve(w, h, spec, group_size=32, desc_act=desc_act).weight.dequantize()
    asym = gptq_solve(w, h, spec, group_size=32, desc_act=desc_act, cross_term=d,
                      gptaq_alpha=alpha).weight.dequantize()
    target = ref_test @ w.T
    err_plain = ((target - x_test @ plain.T) ** 2).mean()
    err_asym = ((target - x_test @ asym.T) ** 2).mean()
    assert err_asym < 0.9 * err_plain, (float(err_asym), float(err_plain))


@pytest.mark.parametrize("group_size", [-1, 12])
def test_gptaq_lazy_blocks_match_unblocked(group_size):
    # The cross term's block-end update must equal applying it column by column (one block = whole matrix).
    # Static groups: dynamic group parameters depend on the block edges by design (see gptq.py).
    cols = 40
    x = correlated_inputs(512, cols, 19)
    h, d = asymmetric_terms(x, drifted(x, 20))
    w = torch.randn(10, cols, generator=torch.Generator().manual_seed(21))
    spec = GridSpec(bits=3)
    kw = dict(group_size=group_size, static_groups=group_size != -1, cross_term=d, gptaq_alpha=0.5)
    blocked = gptq_solve(w, h, spec, block_size=16, **kw).weight.qweight.long()
    whole = gptq_solve(w, h, spec, block_size=cols, **kw).weight.qweight.long()
    assert (blocked != whole).float().mean() <= 0.01
    assert (blocked - whole).abs().max() <= 1


@pytest.mark.parametrize("columns", [150, 600, 2100])  # 1, 6 (uneven) and 8 column blocks of the symmetric sum
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_hessian_is_float32_accurate_for_bf16_and_float32_inputs(dtype, columns):
    """bf16 inputs take the bf16-multiply / float32-accumulate path (exact products); float32 inputs must not
    (their bf16 rounding would cost ~1e-3). Both must match a float64 sum to float32 accuracy, everywhere: only
    the upper block triangle is summed, the rest is mirrored, so the result must also be exactly symmetric.
    On a CPU with native bf16 the bf16 case goes through optq's native X^T X kernel, as in the pipeline."""
    from optq.runtime import native

    native.load()
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(4096, columns, generator=g) * torch.linspace(0.1, 30, columns)).to(dtype)
    acc = HessianAccumulator(columns)
    for chunk in x.split(1024):
        acc.add(chunk)
    ref = 2 * x.double().T @ x.double() / x.shape[0]
    h = acc.hessian()
    rel = ((h.double() - ref).abs().max() / ref.abs().max()).item()
    assert rel < 2e-6, rel
    assert torch.equal(h, h.T)
    assert torch.equal(acc.take_hessian(), h)


def brute_force_scales(w, h_damped, codes, g_idx, n_groups, target_matrix=None):
    """Per row, the scales minimising (w - M s)^T H (w - M s) (M[j, g] = code_j where column j is in group g),
    or with target_matrix T the scales minimising s^T M^T H M s - 2 s^T M^T T^T w, solved directly in float64
    by lstsq on the Cholesky-weighted system (target_matrix None) or the normal equations."""
    rows, cols = w.shape
    h = h_damped.double()
    out = torch.zeros(n_groups, rows, dtype=torch.float64)
    for r in range(rows):
        m = torch.zeros(cols, n_groups, dtype=torch.float64)
        m[torch.arange(cols), g_idx.long()] = codes[r].double()
        used = m.abs().sum(0) > 0
        m = m[:, used]
        t = h if target_matrix is None else target_matrix.double()
        s = torch.linalg.solve(m.T @ h @ m, m.T @ t @ w[r].double())
        out[used, r] = s
    return out


def output_error(w, what, h):
    e = (w - what).double()
    return float(torch.einsum("ri,ij,rj->", e, h.double(), e))


@pytest.mark.parametrize(
    "group_size,desc_act,static_groups,sym",
    [(-1, False, False, True), (8, False, False, True), (12, False, False, False), (12, True, False, True),
     (8, True, True, False), (12, True, True, True), (-1, True, False, False)],
)
def test_refit_scales_are_the_least_squares_scales(group_size, desc_act, static_groups, sym):
    cols, rows = 40, 10
    x = correlated_inputs(512, cols, 7)
    x[:, 5] = 0  # a dead input column
    x[:, 0] *= 30  # an outlier channel, as massive activations make
    h = hessian_of(x)
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(8))
    spec = GridSpec(bits=3, sym=sym)
    kw = dict(group_size=group_size, desc_act=desc_act, static_groups=static_groups, block_size=16)
    plain = gptq_solve(w, h, spec, **kw).weight
    res = gptq_solve(w, h, spec, refit=True, **kw)
    fitted = res.weight
    # The integers, zero points and groups are GPTQ's; only the scales move.
    assert torch.equal(fitted.qweight, plain.qweight)
    assert torch.equal(fitted.zeros, plain.zeros)
    assert torch.equal(fitted.g_idx, plain.g_idx)
    assert not torch.equal(fitted.scales, plain.scales)
    # Against scales solved directly per row (the solver's damped H, dead column set to 1 as GPTQ does).
    hd = h.clone().double()
    dead = torch.diag(hd) == 0
    hd[dead, dead] = 1
    hd += 0.01 * torch.mean(torch.diag(hd)) * torch.eye(cols, dtype=hd.dtype)
    w_live = w.clone()
    w_live[:, dead] = 0
    codes = fitted.qweight.double() - fitted.zeros.double().T[:, fitted.g_idx.long()]
    best = brute_force_scales(w_live, hd, codes, fitted.g_idx, fitted.scales.shape[0])
    # float16 storage: within half a float16 step of the exact optimum, relative
    assert torch.allclose(fitted.scales.double(), best, rtol=2 ** -10, atol=0)
    err_plain = output_error(w_live, plain.dequantize(), hd)
    err_fit = output_error(w_live, fitted.dequantize(), hd)
    assert err_fit < err_plain
    assert res.refit_error[0] == pytest.approx(err_plain, rel=1e-4)
    assert res.refit_error[1] == pytest.approx(err_fit, rel=1e-4)


def test_refit_lowers_held_out_output_error():
    cols, rows = 96, 48
    x_train = correlated_inputs(4096, cols, 1)
    x_test = correlated_inputs(2048, cols, 2)
    for x in (x_train, x_test):
        x[:, :3] *= 20
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(3))
    for bits, group_size, desc_act in ((4, 32, True), (3, 32, False), (4, -1, False)):
        spec = GridSpec(bits=bits)
        errs = []
        for refit in (False, True):
            deq = gptq_solve(w, hessian_of(x_train), spec, group_size=group_size, desc_act=desc_act,
                             refit=refit).weight.dequantize()
            errs.append(float(((x_test @ (w - deq).T) ** 2).mean()))
        assert errs[1] < errs[0], (bits, group_size, desc_act, errs)


def test_refit_with_gptaq_aims_at_the_float_outputs():
    # GPTAQ's objective: the quantized layer on drifted inputs X against the float layer on X_ref. With
    # alpha = 1 the refit's scales are the least-squares scales of ||X_ref w - X what||^2 + damp ||w - what||^2.
    cols, rows = 32, 6
    x_ref = correlated_inputs(1024, cols, 5)
    x = x_ref + 0.2 * correlated_inputs(1024, cols, 6, structure_seed=1)
    acc = HessianAccumulator(cols, asymmetric=True)
    acc.add(x, x_ref=x_ref)
    h, d = acc.hessian(), acc.cross_term()
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(9))
    res = gptq_solve(w, h, GridSpec(bits=4), group_size=8, cross_term=d, gptaq_alpha=1.0, refit=True).weight
    hd = h.double() + 0.01 * torch.mean(torch.diag(h.double())) * torch.eye(cols, dtype=torch.float64)
    codes = res.qweight.double() - res.zeros.double().T[:, res.g_idx.long()]
    # X^T X_ref on the Hessian's scale is H + D^T; GPTQ's damping adds its ridge to both sides
    cross = hd + d.T.double()
    best = brute_force_scales(w, hd, codes, res.g_idx, res.scales.shape[0], target_matrix=cross)
    assert torch.allclose(res.scales.double(), best, rtol=2 ** -10, atol=0)
