"""QuantLinear: a linear layer whose weight is held in the GPTQ checkpoint layout.

Backends (chosen once, at load time, by `prepare`):
- "reference": dequantize the weight on each call and run a dense matmul in the activation dtype. Handles every
  bits / group size / act-order combination the format can express.
- "int4": 4-bit weights repacked once for PyTorch's CPU int4 matmul (`_weight_int4pack_mm_for_cpu`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..core.packing import unpack, unpack_cols

BACKENDS = ("auto", "reference", "int4")
# Above this many rows (tokens) a dense matmul on the dequantized weight beats the int4 kernel, which is built
# for decoding: measured at 2048 rows, int4 took ~3.5x the time of dequantize + bf16 matmul.
INT4_MAX_ROWS = 32
_INT4_KERNEL_GROUPS = (256, 128, 64, 32)  # group sizes the int4 CPU kernel takes


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
        self.backend = "reference"
        self._int4 = None  # (packed weight, kernel group size, scale-and-zero [K/gk, N, 2], input permutation)

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
        return (s * (q - z)).T.to(dtype)

    # ---- backends ----------------------------------------------------------------------------------------

    def prepare(self, backend: str = "auto", dtype: torch.dtype = torch.float32) -> str:
        """Choose and build the backend for activations of `dtype`; returns the backend used."""
        if backend not in BACKENDS:
            raise ValueError(f"backend {backend!r} is unknown: use one of {BACKENDS}")
        self.backend, self._int4 = "reference", None
        if backend in ("auto", "int4") and self.bits == 4 and self.qweight.device.type == "cpu":
            self._int4 = self._build_int4(dtype)
            if self._int4 is not None:
                self.backend = "int4"
        if backend == "int4" and self.backend != "int4":
            raise ValueError(f"the int4 backend cannot run this module ({self.extra_repr()})")
        return self.backend

    def _build_int4(self, dtype: torch.dtype):
        """Repack for the int4 kernel, which computes w = (q - 8) * scale + offset per group of gk inputs.

        GPTQ's w = s * (q - z) = s * (q - 8) + s * (8 - z): the same codes q, scale s, offset s * (8 - z),
        exact up to the rounding of s * (8 - z) to the activation dtype. Act-order inputs are sorted by g_idx
        once here, so each group is a contiguous run, and activations are gathered in that order at run time.
        The kernel group gk is the largest supported size whose blocks each fall in one GPTQ group: g128 with a
        last partial group of 64 (K = 576) runs as gk = 64, every block keeping its group's scale.
        """
        k = self.in_features
        g_idx = self.g_idx.long()
        perm = None
        if bool((g_idx[1:] < g_idx[:-1]).any()):
            perm = torch.argsort(g_idx, stable=True)
            g_idx = g_idx[perm]
        gk = next((g for g in _INT4_KERNEL_GROUPS if k % g == 0 and
                   bool((g_idx.view(-1, g) == g_idx.view(-1, g)[:, :1]).all())), None)
        if gk is None:
            return None
        q = unpack(self.qweight, 4, k)  # [K, N]
        if perm is not None:
            q = q[perm]
        block_group = g_idx[::gk]  # GPTQ group of each kernel block
        s = self.scales.float()[block_group]  # [K/gk, N]
        z = self.zero_points().float()[block_group]
        scale_offset = torch.stack([s, s * (8 - z)], dim=-1).to(dtype).contiguous()
        packed = torch._convert_weight_to_int4pack_for_cpu(q.T.contiguous(), 2)
        return packed, gk, scale_offset, perm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.bias.to(x.dtype) if self.bias is not None else None
        if self._int4 is not None and x.numel() <= INT4_MAX_ROWS * self.in_features:
            packed, gk, scale_offset, perm = self._int4
            x2 = x.reshape(-1, self.in_features)
            if perm is not None:
                x2 = x2[:, perm]
            if x2.dtype != scale_offset.dtype:
                x2 = x2.to(scale_offset.dtype)
            y = torch._weight_int4pack_mm_for_cpu(x2.contiguous(), packed, gk, scale_offset).to(x.dtype)
            if b is not None:
                y = y + b
            return y.reshape(*x.shape[:-1], self.out_features)
        w = self.dequantize_weight(x.dtype)
        return F.linear(x, w, b)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, bias={self.bias is not None}, format={self.checkpoint_format}, "
            f"backend={self.backend}"
        )
