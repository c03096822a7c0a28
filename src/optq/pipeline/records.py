"""What a run produces: the per-module log rows and the quantized model record."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..config import QuantizeConfig


class _StopForward(Exception):
    """Raised from a hook once everything needed from a forward pass has been seen."""


@dataclass
class ModuleLog:
    layer: int
    module: str
    bits: int
    group_size: int
    loss: float
    damp: float
    samples: int  # calibration tokens seen
    seconds: float
    note: str = ""

    FIELDS = ("layer", "module", "bits", "group_size", "loss", "damp", "samples", "seconds", "note")

    def row(self) -> list[Any]:
        return [self.layer, self.module, self.bits, self.group_size, f"{self.loss:.6g}", f"{self.damp:.4g}",
                self.samples, f"{self.seconds:.3f}", self.note]


RTN_FALLBACK = "rtn fallback"  # ModuleLog.note prefix of a module rounded to nearest instead of solved


RTN_GUARD = "rtn guard"  # ModuleLog.note prefix of a module whose GPTQ integers lost to RTN's on held-out windows


@dataclass
class QuantizedModel:
    """What the pipeline produced: the packed tensors of each quantized module, plus the record."""

    modules: dict[str, dict[str, torch.Tensor]]  # full module name -> qweight/qzeros/scales/g_idx
    config: QuantizeConfig  # with `dynamic` extended by modules left in float
    log: list[ModuleLog] = field(default_factory=list)
    seconds: float = 0.0
    already_complete: bool = False  # --resume found this run finished: nothing was done

    @property
    def rtn_guard(self) -> list[str]:
        """Modules that keep RTN's integers because GPTQ's had the larger output error on held-out windows."""
        return [r.module for r in self.log if r.note.startswith(RTN_GUARD)]

    @property
    def rtn_fallback(self) -> dict[str, str]:
        """Modules GPTQ could not solve that were rounded to nearest (--allow-rtn-fallback), with the reason."""
        return {r.module: r.note.removeprefix(RTN_FALLBACK + ": ") for r in self.log
                if r.note.startswith(RTN_FALLBACK)}
