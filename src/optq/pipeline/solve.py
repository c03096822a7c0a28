"""One module's solve: GPTQ (or RTN), the fallback for unsolvable modules, the held-out RTN guard."""

from __future__ import annotations

import logging

import torch

from ..config import QuantizeConfig
from ..core.gptq import NotPositiveDefiniteError, Owned, all_finite, gptq_solve
from ..core.hessian import HessianAccumulator
from ..core.grid import QuantizedWeight, output_error, round_on_grid, rtn_quantize
from ..errors import OptqError
from .records import RTN_FALLBACK, RTN_GUARD

log = logging.getLogger("optq")

# The held-out guard keeps every RTN_GUARD_EVERY-th calibration window out of the Hessians (so that the windows
# it holds out span the calibration set's parts), when there are at least RTN_GUARD_MIN_WINDOWS of them.
RTN_GUARD_EVERY = 16


RTN_GUARD_MIN_WINDOWS = 16


def _solve_one(
    w, h, mcfg: QuantizeConfig, cross_term: torch.Tensor | None = None,
) -> tuple[QuantizedWeight, float, float, str]:
    """(weight, loss, damp, log note); the note gives the scale refit's change of the output error."""
    spec = mcfg.grid()
    if mcfg.method == "rtn":
        return rtn_quantize(w.take() if isinstance(w, Owned) else w, spec, mcfg.group_size), 0.0, 0.0, ""
    res = gptq_solve(
        w, h, spec, group_size=mcfg.group_size, desc_act=mcfg.desc_act, static_groups=mcfg.static_groups,
        damp_percent=mcfg.damp_percent, cross_term=cross_term if mcfg.gptaq else None, gptaq_alpha=mcfg.gptaq_alpha,
        refit=mcfg.refit_scales,
    )
    note = ""
    if res.refit_error is not None and res.refit_error[0] > 0:
        before, after = res.refit_error
        note = f"scale refit {100 * (after - before) / before:+.2f}%"
    return res.weight, res.loss, res.damp_percent, note


# An MoE expert that fewer than this share of a layer's calibration tokens reach is rounded to nearest: a
# Hessian of a few dozen tokens fits them, not the expert's inputs (GPTQModel's threshold is the same 0.5%).
MIN_EXPERT_TOKEN_SHARE = 0.005


def few_tokens(acc: HessianAccumulator | None, layer_tokens: int) -> str:
    """Why an expert's linear is rounded instead of solved ("" when it has tokens enough)."""
    tokens = acc.tokens if acc is not None else 0
    least = MIN_EXPERT_TOKEN_SHARE * layer_tokens
    if tokens >= least:
        return ""
    return f"{tokens} calibration tokens routed to this expert, fewer than {least:.0f} (0.5% of the layer's)"


def _solve_module(
    w, acc: HessianAccumulator | None, mcfg: QuantizeConfig, where: str, allow_rtn_fallback: bool,
    last_user: bool = True, reload=None, rounded: str = "",
) -> tuple[QuantizedWeight, float, float, str]:
    """(weight, loss, damp, log note) for one module. A module GPTQ cannot solve (no calibration tokens
    reached it, or a Hessian no damping makes positive definite) is an error, or with `allow_rtn_fallback` is
    rounded to nearest and says so in its note. `rounded` (an MoE expert too few tokens reach: `few_tokens`)
    rounds it to nearest whatever the flag, with that note. An `Owned` w is given up to the solver (one weight
    copy fewer); `reload` then gives it again for RTN."""
    if rounded and mcfg.method == "gptq":
        w = w.take() if isinstance(w, Owned) else w
        return rtn_quantize(w, mcfg.grid(), mcfg.group_size), 0.0, 0.0, f"{RTN_FALLBACK}: {rounded}"
    if mcfg.method == "rtn" or acc is None:
        return _solve_one(w, None, mcfg)
    if acc.tokens == 0:
        reason = "no calibration tokens reached it"
    else:
        cross = acc.cross_term()
        # The last module reading this accumulator gives it up to the solver: one d x d copy fewer.
        h = Owned(acc.take_hessian() if last_user else acc.hessian())
        if not all_finite(h.tensor):
            raise OptqError(f"{where}: its inputs on the calibration data hold NaN or Inf; check the model's "
                            "weights, or calibrate in float32 (--compute-dtype float32) if float16 overflows")
        try:
            return _solve_one(w, h, mcfg, cross)
        except NotPositiveDefiniteError as e:
            reason = str(e)
    if not allow_rtn_fallback:
        raise OptqError(f"{where}: GPTQ cannot solve it: {reason}; pass --allow-rtn-fallback to round it to "
                        "nearest instead (recorded in the checkpoint's quantization_config.meta.rtn_fallback)")
    log.warning("%s: %s; rounded to nearest instead (--allow-rtn-fallback)", where, reason)
    if isinstance(w, Owned):
        w = w.take() if w.tensor is not None else reload()
    return rtn_quantize(w, mcfg.grid(), mcfg.group_size), 0.0, 0.0, f"{RTN_FALLBACK}: {reason}"


def split_held_out(windows: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(calibration windows, windows held out of the Hessians for the RTN guard): every RTN_GUARD_EVERY-th."""
    held = [w for i, w in enumerate(windows) if i % RTN_GUARD_EVERY == RTN_GUARD_EVERY - 1]
    return [w for i, w in enumerate(windows) if i % RTN_GUARD_EVERY != RTN_GUARD_EVERY - 1], held


def _guard(w: torch.Tensor, qw: QuantizedWeight, held: HessianAccumulator | None, note: str) -> tuple[QuantizedWeight, str]:
    """GPTQ's weight, or RTN's on the same grid where that has the smaller output error on the held-out
    windows (GPTQ fit the calibration windows' Hessian too closely: the module would be better rounded)."""
    if held is None or held.tokens == 0:
        return qw, note
    h = held.hessian()
    rtn = round_on_grid(w, qw)
    gptq_error, rtn_error = output_error(w, qw, h), output_error(w, rtn, h)
    if rtn_error >= gptq_error:
        return qw, note
    guard = f"{RTN_GUARD}: held-out output error GPTQ {gptq_error:.4g} > RTN {rtn_error:.4g}"
    return rtn, f"{guard}; {note}" if note else guard
