import pytest
import torch

from optq.core.grid import GridSpec, dequantize, find_params, quantize, rtn_quantize


def _within_half_step(w, spec):
    scale, zero = find_params(w, spec)
    q = quantize(w, scale[:, None], zero[:, None], spec.maxq)
    err = (dequantize(q, scale[:, None], zero[:, None]) - w).abs()
    return err, scale, zero, q


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
def test_min_max_grid(bits, sym):
    w = torch.randn(16, 40, generator=torch.Generator().manual_seed(bits))
    spec = GridSpec(bits=bits, sym=sym)
    err, scale, zero, q = _within_half_step(w, spec)
    assert torch.equal(zero, zero.round())
    assert q.min() >= 0 and q.max() <= 2**bits - 1
    # Scales are float16 values.
    assert torch.equal(scale, scale.half().float())
    if sym:
        assert (zero == 2 ** (bits - 1)).all()
        # The largest magnitude may clip by one step at the top of a symmetric grid; all others within half.
        assert (err <= scale[:, None] * 1.0001).all()
    else:
        assert (err <= scale[:, None] * 0.5001).all()


def test_v1_min_zero_keeps_range():
    # All-positive rows would get zero 0; v1 cannot store it, so zero >= 1 and the top still fits.
    w = torch.rand(8, 32) + 0.1
    spec = GridSpec(bits=4, sym=False, min_zero=1)
    err, scale, zero, _ = _within_half_step(w, spec)
    assert (zero >= 1).all()
    assert (err <= scale[:, None] * 0.5001).all()
    assert (find_params(w, GridSpec(bits=4, sym=False))[1] == 0).any()


def test_mse_search_does_not_increase_error():
    w = torch.randn(32, 128, generator=torch.Generator().manual_seed(1))
    w[:, 0] *= 8  # outliers make shrinking worthwhile
    for sym in (True, False):
        plain = GridSpec(bits=3, sym=sym)
        mse = GridSpec(bits=3, sym=sym, mse=True)

        def norm_err(spec):
            s, z = find_params(w, spec)
            q = quantize(w, s[:, None], z[:, None], spec.maxq)
            return (dequantize(q, s[:, None], z[:, None]) - w).abs().pow(2.4).sum(1)

        e_plain, e_mse = norm_err(plain), norm_err(mse)
        assert (e_mse <= e_plain * (1 + 1e-6)).all()
        assert (e_mse < e_plain).any()


def test_mse_search_close_to_exhaustive():
    """The coarse-to-fine search against trying all 80 shrink factors (errors in float64)."""
    from optq.core.grid import MSE_COARSE_STEP, MSE_GRID, MSE_MAX_SHRINK, MSE_NORM, _params_from_range

    g = torch.Generator().manual_seed(2)
    w = torch.randn(256, 128, generator=g) * torch.rand(256, 1, generator=g)
    w[torch.rand(w.shape, generator=g) < 0.01] *= 6  # a few outliers per row, as real weights have
    for spec in (GridSpec(bits=3, mse=True), GridSpec(bits=4, sym=False, mse=True)):
        def err(scale, zero):
            q = torch.clamp(torch.round(w.double() / scale[:, None].double()) + zero[:, None].double(), 0, spec.maxq)
            return (scale[:, None].double() * (q - zero[:, None].double()) - w.double()).abs().pow(MSE_NORM).sum(1)

        xmin = torch.minimum(w.min(1).values, torch.zeros(1))
        xmax = torch.maximum(w.max(1).values, torch.zeros(1))
        every = torch.stack([err(*_params_from_range((1 - i / MSE_GRID) * xmin, (1 - i / MSE_GRID) * xmax, spec))
                             for i in range(int(MSE_MAX_SHRINK * MSE_GRID))])
        found = err(*find_params(w, spec))
        # never worse than any factor of the coarse pass, and within 0.2% of the exhaustive optimum overall
        assert (found <= every[::MSE_COARSE_STEP].min(0).values * (1 + 1e-5)).all()
        assert found.sum() <= every.min(0).values.sum() * 1.002
        assert (found <= every[0] * (1 + 1e-5)).all()  # the min/max range is a candidate


def test_rtn_partial_last_group():
    w = torch.randn(6, 172)
    qw = rtn_quantize(w, GridSpec(bits=4), group_size=64)
    assert qw.scales.shape == (3, 6)
    assert qw.g_idx.tolist() == [i // 64 for i in range(172)]
    # The last group (44 columns) has its own parameters, computed from exactly those columns.
    s, z = find_params(w[:, 128:], GridSpec(bits=4))
    assert torch.equal(qw.scales[2], s)
    assert torch.equal(qw.zeros[2], z)


def test_per_channel_group():
    w = torch.randn(4, 50)
    qw = rtn_quantize(w, GridSpec(bits=8), group_size=-1)
    assert qw.scales.shape == (1, 4)
    assert (qw.g_idx == 0).all()
    assert (qw.dequantize() - w).abs().max() <= qw.scales.max()


def test_bad_bits():
    with pytest.raises(ValueError):
        GridSpec(bits=5)


def test_signed_scale_is_llama_cpp_q4_0():
    """RTN with the signed-extreme scale against the gguf library's Q4_0 (its port of llama.cpp's reference
    quantizer): the same scales, the same codes except where llama.cpp's unrounded d puts a value on the other
    side of a rounding boundary, and no larger error."""
    import gguf
    import numpy as np

    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 256, generator=g) * torch.rand(64, 1, generator=g)
    w[::3, 5] = 4.0  # rows whose extreme is positive: negative scales
    qw = rtn_quantize(w, GridSpec(bits=4, signed_scale=True), 32)
    blocks = gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType.Q4_0)
    theirs = torch.from_numpy(gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType.Q4_0).copy()).reshape(64, 256)
    their_d = torch.from_numpy(blocks.reshape(64, 8, 18)[:, :, :2].copy().view(np.float16).astype(np.float32))
    assert torch.equal(qw.scales.T, their_d.reshape(64, 8))
    assert bool((qw.scales < 0).any()) and bool((qw.scales > 0).any())
    ours = qw.dequantize()
    assert (ours == theirs).float().mean() > 0.99
    assert ((ours - w) ** 2).sum() <= ((theirs - w) ** 2).sum()
    # the extreme of each block is on the grid (to the fp16 rounding of the scale)
    ext = w.reshape(64, 8, 32).abs().argmax(-1, keepdim=True)
    torch.testing.assert_close(ours.reshape(64, 8, 32).gather(-1, ext), w.reshape(64, 8, 32).gather(-1, ext),
                               rtol=2e-3, atol=0)
    # the usual symmetric grid is coarser: a larger error on the same weights
    plain = rtn_quantize(w, GridSpec(bits=4), 32).dequantize()
    assert ((ours - w) ** 2).sum() < ((plain - w) ** 2).sum()
