"""The GPTQ solver (Frantar et al., 2023): quantize a weight column by column, moving each column's rounding
error onto the columns not yet quantized through the upper Cholesky factor of H^-1, with lazy block updates.

This follows the reference implementation (IST-DASLab/gptq). As there, a group's scale and zero come from
its columns as they stood when the current block began (earlier blocks' updates applied, this block's
pending ones not). That is not an oversight to fix: computing them from the fully updated columns was
measured worse (held-out output error at 2-bit g32 ~1.5x higher, 3-bit ~5% higher), since error feedback
widens the range the grid must cover. One deliberate difference: scales are rounded to float16 before the
integers are chosen, because the checkpoint stores float16 scales.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from .grid import GridSpec, QuantizedWeight, fp16_round, find_params, group_bounds, quantize

log = logging.getLogger("optq")

BLOCK_SIZE = 128
# Damping tried after `damp_percent` fails: each step doubles it, up to this ceiling.
MAX_DAMP_PERCENT = 1.0


class NotPositiveDefiniteError(RuntimeError):
    """The Hessian stayed non-positive-definite for every damping in the schedule."""


class Owned:
    """A tensor handed over to a callee, which takes it (`take`) so that no caller's frame keeps it alive: the
    solver overwrites the Hessian in place rather than holding a second d x d copy."""

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor

    def take(self) -> torch.Tensor:
        t, self.tensor = self.tensor, None
        if t is None:
            raise RuntimeError("the tensor was already taken")
        return t


@dataclass
class SolveResult:
    weight: QuantizedWeight
    loss: float  # sum over rows and columns of (w - q)^2 / [H^-1]_cc / 2, as the reference reports it
    damp_percent: float  # the damping that made H positive definite
    # with refit: the layer's summed output error (w - what)^T H (w - what) before and after the refit
    refit_error: tuple[float, float] | None = None


def all_finite(t: torch.Tensor, rows: int = 512) -> bool:
    """torch.isfinite(t).all(), a slice of rows at a time: on a 14336 x 14336 factor the one-shot check's
    temporaries were ~0.6 GB at the solve's memory peak."""
    return all(bool(torch.isfinite(t[i:i + rows]).all()) for i in range(0, t.shape[0], rows))


def _inverse_cholesky(h: torch.Tensor, damp_percent: float) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor U of (H + damp * mean(diag H) * I)^-1 (so the inverse is U^T U), raising damp until
    it exists. H is left as it was.

    The three factorisations run in place in one d x d buffer: LAPACK works on column-major storage in place,
    and the transposed view of a row-major buffer is column-major, so torch's out= forms write into it without
    the column-major copy a row-major argument costs (measured: the d x d peak is one buffer, not two). The
    factor is returned as that column-major view."""
    diag = torch.diag(h)
    mean_diag = torch.mean(diag).item()
    buf = torch.empty_like(h)
    f = buf.T
    info = torch.empty((), dtype=torch.int32, device=h.device)
    damp = damp_percent
    while True:
        buf.copy_(h)
        buf.diagonal().add_(damp * mean_diag)
        torch.linalg.cholesky_ex(f, out=(f, info))
        if info.item() == 0:
            torch.cholesky_inverse(f, out=f)
            torch.linalg.cholesky_ex(f, upper=True, out=(f, info))
            if info.item() == 0 and all_finite(buf):
                if damp != damp_percent:
                    log.warning("Hessian not positive definite at damp %.4g; used damp %.4g", damp_percent, damp)
                return f, damp
            raise NotPositiveDefiniteError(
                f"the inverse Hessian is not positive definite at damp_percent={damp:g}; check the calibration "
                "data and the layer for NaN/Inf")
        next_damp = damp * 2 if damp > 0 else 0.01
        if next_damp > MAX_DAMP_PERCENT:
            raise NotPositiveDefiniteError(
                f"the Hessian is not positive definite even with damp_percent={damp:g}; "
                "check the calibration data and the layer for NaN/Inf"
            )
        damp = next_damp


# Rows of the weight handled at once by the scale refit (bounds its [rows, d] temporaries).
REFIT_ROWS = 512


def refit_scales(
    w: torch.Tensor,
    h: torch.Tensor,
    q: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    cross_term: torch.Tensor | None = None,
    alpha: float = 0.0,
) -> tuple[torch.Tensor, float, float]:
    """Least-squares scales for fixed integer codes: for each row, the scales s minimising
    (w - what)^T H (w - what) with what_j = s_g(j) * (q_j - z_g(j)), i.e. the layer's output error on the
    calibration inputs, cross-group terms of H included (GPTQ moved each group's error onto the groups after it).

    w [out, d]: the weight before quantization (any float dtype); h [d, d]: the damped Hessian; q [out, d]: the
    integer codes; scales, zeros [G, out]. Columns are in an order where group k holds columns
    k*group_size .. (k+1)*group_size - 1. With GPTAQ's cross term D the target is the float model's output:
    the linear term uses w (H + alpha D) instead of w H.

    The normal equations are G x G per row. A row keeps its old scales unless the new ones, rounded to float16
    as the checkpoint stores them, are finite and lower its error. A scale may change sign (the format's scales
    are signed): with static groups, error feedback can leave a group's codes pointing against its weights.
    Returns the scales and the summed error before and after (exact for GPTQ; for GPTAQ, w^T (H + alpha D) w
    stands in for the float output's own term, the same in both)."""
    rows, cols = w.shape
    n_groups = scales.shape[0]
    size = cols if group_size == -1 else group_size
    new_scales = scales.clone()
    before = after = 0.0
    for r0 in range(0, rows, REFIT_ROWS):
        r1 = min(r0 + REFIT_ROWS, rows)
        n = r1 - r0
        wc = w[r0:r1].to(torch.float32)
        c = q[r0:r1].to(torch.float32) - zeros[:, r0:r1].T.repeat_interleave(size, dim=1)[:, :cols]
        target = wc @ h
        if cross_term is not None:
            target.addmm_(wc, cross_term, alpha=alpha)
        a = torch.zeros(n, n_groups, n_groups, dtype=torch.float64, device=w.device)
        for g in range(n_groups):
            lo, hi = g * size, min((g + 1) * size, cols)
            # row r: c_g^T H[g, k] c_k for the groups k >= g (A is symmetric)
            prod = (c[:, lo:hi] @ h[lo:hi, lo:]).mul_(c[:, lo:])
            a[:, g, g:] = _group_sums(prod, size)
            a[:, g + 1:, g] = a[:, g, g + 1:]
            del prod
        b = _group_sums(c * target, size).double()
        base = (wc * target).sum(1, dtype=torch.float64)
        del wc, c, target
        old = scales[:, r0:r1].T.double()
        empty = a.diagonal(dim1=1, dim2=2) == 0  # every code of the group at the zero point: scale is free
        a_solve = a.clone()
        a_solve.diagonal(dim1=1, dim2=2)[empty] = 1.0
        lower, info = torch.linalg.cholesky_ex(a_solve)
        del a_solve
        solved = torch.cholesky_solve(torch.where(empty, old, b).unsqueeze(-1), lower).squeeze(-1)
        new = fp16_round(torch.where(torch.isfinite(solved), solved, old).float()).double()

        def objective(s: torch.Tensor) -> torch.Tensor:  # error minus w^T H w
            return (s.unsqueeze(1) @ a @ s.unsqueeze(-1)).view(-1) - 2 * (b * s).sum(1)

        f_old, f_new = objective(old), objective(new)
        better = (info == 0) & (f_new < f_old)
        before += float((base + f_old).sum())
        after += float((base + torch.where(better, f_new, f_old)).sum())
        new_scales[:, r0:r1] = torch.where(better[:, None], new, old).T.float()
    return new_scales, before, after


def _group_sums(x: torch.Tensor, size: int) -> torch.Tensor:
    """Sums of x [n, m] over consecutive column groups of `size` (the last one may be shorter)."""
    n, m = x.shape
    full = m // size
    parts = [x[:, : full * size].reshape(n, full, size).sum(-1)] if full else []
    if m % size:
        parts.append(x[:, full * size:].sum(-1, keepdim=True))
    return torch.cat(parts, dim=1)


def gptq_solve(
    w: torch.Tensor,
    h: torch.Tensor,
    spec: GridSpec,
    group_size: int = 128,
    desc_act: bool = False,
    static_groups: bool = False,
    damp_percent: float = 0.01,
    block_size: int = BLOCK_SIZE,
    cross_term: torch.Tensor | None = None,
    gptaq_alpha: float = 0.25,
    refit: bool = False,
) -> SolveResult:
    """Quantize w [out, in] given the Hessian h [in, in] of its inputs (an `Owned` w or h is taken and
    overwritten instead of copied).

    With `cross_term` D = 2 (X_ref - X)^T X / n (X_ref: the float model's inputs of this module, X: the
    partly quantized model's) the solver follows GPTAQ (Li et al., ICML 2025, "asymmetric calibration"):
    it aims the quantized layer at the float model's output W X_ref instead of W X, which also undoes error
    carried in from earlier layers. Every column update gains a term w_i P[i, i:] with
    P = alpha * triu(D U^T, 1) U (U the upper Cholesky factor of H^-1); alpha damps the cross term, which is
    estimated from the same few samples as H.

    With `refit`, the scales are then fitted to the chosen integer codes by least squares on the layer's
    output error (`refit_scales`): the codes, zeros and g_idx stay GPTQ's, the error can only go down. The
    solver holds two d x d matrices at most either way (H and the factor's buffer)."""
    if damp_percent < 0:
        raise ValueError("damp_percent must be >= 0")
    if group_size != -1 and group_size <= 0:
        raise ValueError("group_size must be -1 or positive")
    owned_w = isinstance(w, Owned)
    source = w.take() if owned_w else w.detach()
    w = source.to(torch.float32)
    if w.data_ptr() == source.data_ptr() and (refit or not owned_w):
        w = w.clone()  # the solver updates w in place; the refit needs the weight as given
    # The refit's reference weight: the tensor as given (a bf16 source stays bf16, exact and half the memory).
    w_before = source if refit else None
    del source
    h = h.take() if isinstance(h, Owned) else h.detach().clone()
    h = h.to(torch.float32)
    rows, cols = w.shape
    maxq = spec.maxq

    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    if cross_term is not None:
        cross_term = cross_term.detach().to(torch.float32).clone()
        cross_term[:, dead] = 0

    # Group parameters fixed before any update: per-channel always, per-group with static_groups.
    fixed_params = None
    if group_size == -1:
        fixed_params = [find_params(w, spec)]
    elif static_groups:
        fixed_params = [find_params(w[:, s:e], spec) for s, e in group_bounds(cols, group_size)]

    perm = None
    if desc_act:
        perm = torch.argsort(torch.diag(h), descending=True, stable=True)
        w = w[:, perm]
        h = h[perm]
        h = h[:, perm]
        if cross_term is not None:
            cross_term = cross_term[perm][:, perm]

    hinv, damp_used = _inverse_cholesky(h, damp_percent)
    if not refit:
        del h
    # GPTAQ's correction; strictly upper triangular, so a column's own update is unchanged.
    p = None
    if cross_term is not None:
        p = gptaq_alpha * torch.triu(cross_term @ hinv.T, diagonal=1) @ hinv
        if not refit:
            del cross_term

    q_all = torch.zeros(rows, cols, dtype=torch.uint8 if maxq < 256 else torch.int32, device=w.device)
    losses = torch.zeros(rows, dtype=torch.float64, device=w.device)
    n_groups = 1 if group_size == -1 else math.ceil(cols / group_size)
    scales = torch.zeros(n_groups, rows, dtype=torch.float32, device=w.device)
    zeros = torch.zeros(n_groups, rows, dtype=torch.float32, device=w.device)
    if fixed_params is not None:
        for g, (s, z) in enumerate(fixed_params):
            scales[g], zeros[g] = s, z
    # Group of each column in processing order.
    orig_index = perm if perm is not None else torch.arange(cols, device=w.device)
    if group_size == -1:
        group_of_pos = torch.zeros(cols, dtype=torch.long, device=w.device)
    elif static_groups:
        group_of_pos = orig_index // group_size
    else:
        group_of_pos = torch.arange(cols, device=w.device) // group_size
    group_list = group_of_pos.tolist()

    scale_col = zero_col = None
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        count = i2 - i1
        # The block transposed: column i is the contiguous row w1t[i], and the update of the columns after it
        # is one in-place rank-1 update (BLAS ger) of contiguous rows, with no temporary.
        w1t = w[:, i1:i2].T.contiguous()
        q1t = torch.empty_like(w1t)
        err1t = torch.empty_like(w1t)
        pre1t = w1t.clone() if p is not None else None  # columns as they stand when quantized (filled below)
        hinv1 = hinv[i1:i2, i1:i2]
        p1 = p[i1:i2, i1:i2] if p is not None else None
        diag = hinv1.diagonal().tolist()
        for i in range(count):
            col = i1 + i
            if fixed_params is not None:
                g = group_list[col]
                scale_col, zero_col = scales[g], zeros[g]
            elif col % group_size == 0:
                scale_col, zero_col = find_params(w[:, col : col + group_size], spec)
                scales[col // group_size], zeros[col // group_size] = scale_col, zero_col
            wc = w1t[i]
            qc = quantize(wc, scale_col, zero_col, maxq)
            q1t[i] = qc
            e = err1t[i]
            torch.sub(wc, scale_col * (qc - zero_col), out=e)
            e.div_(diag[i])
            if i + 1 < count:
                w1t[i + 1:].addr_(hinv1[i, i + 1:], e, alpha=-1)
                if p1 is not None:
                    pre1t[i] = wc
                    w1t[i + 1:].addr_(p1[i, i + 1:], wc, alpha=1)
            elif p1 is not None:
                pre1t[i] = wc
        # loss: (w - q)^2 / [H^-1]_cc^2 / 2 summed, i.e. e^2 / 2
        losses += err1t.double().pow(2).sum(0) / 2
        q_all[:, i1:i2] = q1t.T
        if i2 < cols:
            w[:, i2:].addmm_(err1t.T, hinv[i1:i2, i2:], alpha=-1)
            if p is not None:
                # The same column values as the in-block updates used, so lazy blocks equal column-by-column
                # updates (the GPTAQ reference uses the quantized values here; they differ by (w - q) P,
                # second order).
                w[:, i2:].addmm_(pre1t.T, p[i1:i2, i2:])

    # the last block's views keep the factor's buffer alive: let it go before the refit's temporaries
    del hinv, p, w, hinv1, p1, w1t, q1t, err1t, pre1t
    inv = torch.argsort(perm) if perm is not None else None
    refit_error = None
    if refit:
        if bool(dead.any()):
            w_before = w_before.clone()
            w_before[:, dead] = 0
        if perm is not None and static_groups:  # static groups are contiguous in the original column order
            q_fit, h = q_all[:, inv], h[inv][:, inv]
            cross_term = cross_term[inv][:, inv] if cross_term is not None else None
        else:  # other orders keep each group's columns contiguous in processing order
            q_fit = q_all
            w_before = w_before[:, perm] if perm is not None else w_before
        h.diagonal().add_(damp_used * torch.mean(torch.diag(h)).item())  # the damped H the solve used
        scales, before, after = refit_scales(w_before, h, q_fit, scales, zeros, group_size, cross_term,
                                             gptaq_alpha)
        refit_error = (before, after)
        del w_before, h, q_fit, cross_term
    if perm is not None:
        q_all = q_all[:, inv]
        g_idx = group_of_pos[inv]
    else:
        g_idx = group_of_pos
    qw = QuantizedWeight(
        qweight=q_all.to(torch.int32),
        scales=scales,
        zeros=zeros,
        g_idx=g_idx.to(torch.int32),
        bits=spec.bits,
        group_size=group_size,
        perm=perm,
    )
    return SolveResult(weight=qw, loss=float(losses.sum()), damp_percent=damp_used, refit_error=refit_error)
