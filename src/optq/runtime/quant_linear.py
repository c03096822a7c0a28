"""QuantLinear: a linear layer whose weight is held in the GPTQ checkpoint layout.

This is the reference path: dequantize the weight on each call and run a dense matmul in the activation
dtype. It handles every bits / group size / act-order combination the format can express.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..core.packing import unpack, unpack_cols


class QuantLinear(nn.Module):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int,
        bias: bool,
        checkpoint_format: str = "gptq",
    ):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.bits = bits
        self.group_size = group_size
        self.checkpoint_format = checkpoint_format
        groups = 1 if group_size == -1 else -(-in_features // group_size)
        self.register_buffer("qweight", torch.zeros(in_features * bits // 32, out_features, dtype=torch.int32))
        self.register_buffer("qzeros", torch.zeros(groups, out_features * bits // 32, dtype=torch.int32))
        self.register_buffer("scales", torch.zeros(groups, out_features, dtype=torch.float16))
        self.register_buffer("g_idx", torch.zeros(in_features, dtype=torch.int32))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float16))
        else:
            self.bias = None

    def zero_points(self) -> torch.Tensor:
        """True zero points [G, out] (v1 checkpoints store zero - 1)."""
        z = unpack_cols(self.qzeros, self.bits, self.out_features)
        return z + 1 if self.checkpoint_format == "gptq" else z

    def dequantize_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """w[o, i] = scales[g_idx[i], o] * (q[i, o] - z[g_idx[i], o]) as a dense [out, in] tensor."""
        q = unpack(self.qweight, self.bits, self.in_features)  # [in, out]
        g = self.g_idx.long()
        z = self.zero_points()[g]  # [in, out]
        s = self.scales.float()[g]
        return (s * (q - z).float()).T.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.dequantize_weight(x.dtype)
        b = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, w, b)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, bias={self.bias is not None}, format={self.checkpoint_format}"
        )
