"""The quantization grid: per-row scale and zero point, quantize, dequantize, round-to-nearest.

Conventions (shared with the checkpoint spec):
    q = clamp(round(w / scale) + zero, 0, maxq)        w ~= scale * (q - zero)
Scales are rounded to float16 as soon as they are computed, because that is how the checkpoint stores
them: the integers chosen here are then exactly the ones a reader dequantizes with.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SUPPORTED_BITS = (2, 3, 4, 8)

# MSE shrink search over the GPTQ reference code's factors (1 - i/100 of the range for i < 80, L2.4 norm),
# coarse to fine: every 8th factor, then 4, 2 and 1 steps either side of each row's best so far. 16 passes instead
# of 80; on SmolLM2's weights the rows' error is within 0.07% of the exhaustive search's (same factor for 96% of
# rows), and the search was a fifth of a run's time exhaustive (BENCHMARKS.md, "Quality by default, session 19").
MSE_GRID = 100
MSE_MAX_SHRINK = 0.8
MSE_NORM = 2.4
MSE_COARSE_STEP = 8


@dataclass(frozen=True)
class GridSpec:
    """How one weight group is mapped to integers."""

    bits: int = 4
    sym: bool = True
    mse: bool = False
    # Smallest zero point allowed. The v1 ("gptq") checkpoint stores zero - 1, so it cannot hold 0: asymmetric
    # v1 checkpoints quantize with min_zero=1 (see docs/design.md).
    min_zero: int = 0
    # Symmetric grid only: scale = the group's signed extreme / -(maxq + 1) / 2, so the largest-magnitude weight
    # sits exactly on the end level (code 0) and the step is |extreme| / 8 at 4 bits instead of 2 |extreme| / 15:
    # llama.cpp's Q4_0 / Q8_0 rule. Scales are negative where the extreme is positive.
    signed_scale: bool = False

    def __post_init__(self):
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits={self.bits} is not supported; use one of {SUPPORTED_BITS}")
        if self.min_zero not in (0, 1):
            raise ValueError("min_zero must be 0 or 1")
        if self.signed_scale and not self.sym:
            raise ValueError("signed_scale needs a symmetric grid")

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Integer codes (as float) for w; scale and zero broadcast against w."""
    return torch.clamp(torch.round(w / scale) + zero, 0, maxq)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return scale * (q - zero)


def _params_from_range(xmin: torch.Tensor, xmax: torch.Tensor, spec: GridSpec):
    """Scale and zero for per-row ranges [xmin, xmax] (xmin <= 0 <= xmax)."""
    maxq = spec.maxq
    if spec.signed_scale:
        half = (maxq + 1) // 2
        extreme = torch.where(xmin.abs() > xmax, xmin, xmax)
        extreme = torch.where(extreme == 0, -torch.ones_like(extreme), extreme)
        return fp16_round(extreme / -half), torch.full_like(extreme, half)
    if spec.sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = -xmax
    degenerate = (xmin == 0) & (xmax == 0)
    xmin = torch.where(degenerate, -torch.ones_like(xmin), xmin)
    xmax = torch.where(degenerate, torch.ones_like(xmax), xmax)
    scale = (xmax - xmin) / maxq
    if spec.sym:
        zero = torch.full_like(scale, (maxq + 1) // 2)
    else:
        zero = torch.round(-xmin / scale)
        if spec.min_zero:
            # zero would round to 0: keep z = 1 and stretch the scale so xmax is still reachable at q = maxq.
            low = zero < spec.min_zero
            scale = torch.where(low, xmax / (maxq - spec.min_zero), scale)
            zero = torch.where(low, torch.full_like(zero, spec.min_zero), zero)
    scale = fp16_round(scale)
    return scale, zero


def fp16_round(scale: torch.Tensor) -> torch.Tensor:
    # float16 keeps ~3 decimal digits; a scale that underflows to 0 would divide by zero, so floor its magnitude.
    tiny = torch.finfo(torch.float16).tiny
    magnitude = scale.abs().clamp(min=tiny, max=torch.finfo(torch.float16).max)
    return torch.copysign(magnitude, scale).to(torch.float16).to(scale.dtype)


def find_params(w: torch.Tensor, spec: GridSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row scale and zero ([rows]) for the columns of w ([rows, cols]), by min/max or MSE shrink search."""
    w = w.float()
    zeros = torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)
    xmin = torch.minimum(w.min(dim=1).values, zeros)
    xmax = torch.maximum(w.max(dim=1).values, zeros)
    if not spec.mse:
        return _params_from_range(xmin, xmax, spec)
    return _shrink_search(w, xmin, xmax, spec)


def _shrink_search(w: torch.Tensor, xmin: torch.Tensor, xmax: torch.Tensor, spec: GridSpec):
    """Scale and zero of each row's shrink factor with the least L2.4 rounding error (MSE_* above)."""
    last = int(MSE_MAX_SHRINK * MSE_GRID) - 1
    best_err = torch.full_like(xmin, float("inf"))
    best_index = torch.zeros(w.shape[0], dtype=torch.long, device=w.device)
    scale = zero = None

    def consider(index: torch.Tensor) -> None:
        nonlocal best_err, best_index, scale, zero
        shrink = (1 - index.double() / MSE_GRID).to(w.dtype)
        s1, z1 = _params_from_range(shrink * xmin, shrink * xmax, spec)
        q = quantize(w, s1[:, None], z1[:, None], spec.maxq)
        err = dequantize(q, s1[:, None], z1[:, None]).sub_(w).abs_().pow_(MSE_NORM).sum(dim=1)
        better = err < best_err  # strict: of equal errors the first tried (the wider range) stays
        best_err = torch.where(better, err, best_err)
        best_index = torch.where(better, index, best_index)
        scale = s1 if scale is None else torch.where(better, s1, scale)
        zero = z1 if zero is None else torch.where(better, z1, zero)

    for i in range(0, last + 1, MSE_COARSE_STEP):
        consider(torch.full_like(best_index, i))
    step = MSE_COARSE_STEP // 2
    while step:
        centre = best_index
        for offset in (-step, step):
            consider((centre + offset).clamp(0, last))
        step //= 2
    return scale, zero


def group_bounds(columns: int, group_size: int) -> list[tuple[int, int]]:
    """[start, end) of each group; group_size -1 is one group; the last group may be shorter."""
    if group_size == -1:
        return [(0, columns)]
    return [(s, min(s + group_size, columns)) for s in range(0, columns, group_size)]


@dataclass
class QuantizedWeight:
    """A quantized [out, in] weight in checkpoint terms.

    qweight: int codes [out, in] (int32); scales, zeros: [G, out] (float32 holding fp16 values, integer zeros);
    g_idx: group of each input column [in]; perm: processing order used (act-order) or None.
    """

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor
    bits: int
    group_size: int
    perm: torch.Tensor | None = None

    def dequantize(self) -> torch.Tensor:
        g = self.g_idx.long()
        s = self.scales[g].T  # [out, in]
        z = self.zeros[g].T
        return s * (self.qweight.float() - z)


def rtn_quantize(w: torch.Tensor, spec: GridSpec, group_size: int) -> QuantizedWeight:
    """Round-to-nearest baseline: each group quantized independently, no error feedback."""
    w = w.float()
    out_f, in_f = w.shape
    bounds = group_bounds(in_f, group_size)
    q = torch.empty_like(w)
    scales = torch.empty(len(bounds), out_f)
    zeros = torch.empty(len(bounds), out_f)
    for g, (s, e) in enumerate(bounds):
        sc, z = find_params(w[:, s:e], spec)
        q[:, s:e] = quantize(w[:, s:e], sc[:, None], z[:, None], spec.maxq)
        scales[g], zeros[g] = sc, z
    g_idx = torch.arange(in_f, dtype=torch.int32) // (in_f if group_size == -1 else group_size)
    return QuantizedWeight(q.to(torch.int32), scales, zeros, g_idx.to(torch.int32), spec.bits, group_size)


def round_on_grid(w: torch.Tensor, qw: QuantizedWeight) -> QuantizedWeight:
    """Round-to-nearest of `w` on `qw`'s grid (its scales, zeros and groups): what GPTQ's integers are
    compared with by the held-out guard; the checkpoint tensors other than qweight stay the same."""
    g = qw.g_idx.long()
    q = quantize(w.float(), qw.scales[g].T, qw.zeros[g].T, 2 ** qw.bits - 1)
    return QuantizedWeight(q.to(torch.int32), qw.scales, qw.zeros, qw.g_idx, qw.bits, qw.group_size, qw.perm)


def output_error(w: torch.Tensor, qw: QuantizedWeight, h: torch.Tensor) -> float:
    """tr((Q - W) H (Q - W)^T): the squared output error of the quantized weight on inputs whose X^T X is h."""
    d = qw.dequantize() - w.float()
    return float(((d @ h) * d).sum())
