"""Weights of nn.Linear and GPT-2's Conv1D as [out, in] tensors."""

from __future__ import annotations

import torch
from torch import nn


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D"


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The weight as [out, in], whatever the module stores."""
    w = module.weight.data
    return w.T if _is_conv1d(module) else w


def set_linear_weight(module: nn.Module, w_out_in: torch.Tensor) -> None:
    w = w_out_in.T if _is_conv1d(module) else w_out_in
    module.weight.data.copy_(w.to(module.weight.dtype))


def linear_shape(module: nn.Module) -> tuple[int, int]:
    out_f, in_f = linear_weight(module).shape
    return in_f, out_f
