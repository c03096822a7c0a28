"""QuantLinear: a linear layer whose weight is held in the GPTQ checkpoint layout.

Backends (chosen once, at load time, by `prepare`):
- "reference": dequantize the weight on each call and run a dense matmul in the activation dtype. Handles every
  bits / group size / act-order combination the format can express.
- "native": 2/3/4/8-bit codes repacked once for optq's own AVX-512 / AVX2 kernels (runtime/native.py): bf16
  activations where the CPU has AVX-512 BF16, float32 on any CPU with AVX2 and FMA.
- "int4": 2/3/4-bit codes repacked once for PyTorch's CPU int4 matmul (`_weight_int4pack_mm_for_cpu`).
- "int8": 8-bit codes as int8 for PyTorch's `_weight_int8pack_mm`, one call per group.
Once a kernel is built the checkpoint-layout tensors can be released (`optq.load` does), so a loaded model
holds each weight once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..core.hardware import amx_bf16
from ..core.packing import unpack, unpack_cols

BACKENDS = ("auto", "reference", "native", "int4", "int8")
# Above this many rows (tokens) the int8 path dequantizes its int8 weight and runs one dense matmul, which
# beats the per-group int8 kernel calls there (K=2048, N=8192, bf16: 512 rows 44 ms against 127 ms; 4 rows
# 1.4 ms against 24 ms). The int4 kernel serves every length: at 512 rows it takes 52 ms, a dense bf16 matmul
# 23 ms, but no dense weight exists to run one without unpacking (150 ms).
INT8_MAX_ROWS = 64
# On CPUs with AMX, a 4-bit call with bf16 activations and at least this many rows (a prompt) dequantizes its
# weight to bf16 (native q4_dequant) and runs PyTorch's AMX matmul instead of q4_gemm, whose time grows with
# the rows: 576 x 1536 at 512 rows 0.81 ms against 5.0 ms, 2048 x 8192 20 ms against 94 ms; the crossover is
# at ~48 rows for the first and ~96 for the second (Xeon, 2 threads). The bf16 weight rounds s * (q - z) once
# (2^-9 relative), as a bf16 model's weights are; decode steps keep q4_gemm's exact weight.
DENSE_MIN_ROWS = 128


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
        self._kernel: NativeKernel | Int4Kernel | Int8Kernel | None = None
        self.released = False

    def zero_points(self) -> torch.Tensor:
        """True zero points [G, out] (v1 checkpoints store zero - 1)."""
        z = unpack_cols(self.qzeros, self.bits, self.out_features)
        return z + 1 if self.checkpoint_format == "gptq" else z

    def dequantize_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """w[o, i] = scales[g_idx[i], o] * (q[i, o] - z[g_idx[i], o]) as a dense [out, in] tensor."""
        if self.released:
            raise ValueError("this module's packed tensors were released after its kernel was built")
        q = unpack(self.qweight, self.bits, self.in_features)  # [in, out]
        g = self.g_idx.long()
        z = self.zero_points()[g]  # [in, out]
        s = self.scales.float()[g]
        return (s * (q - z)).T.to(dtype)

    # ---- backends ----------------------------------------------------------------------------------------

    def prepare(self, backend: str = "auto", dtype: torch.dtype = torch.float32, release_packed: bool = False) -> str:
        """Choose and build the backend for activations of `dtype`; returns the backend used. With
        `release_packed`, a module that got a kernel drops its checkpoint-layout tensors (it cannot be
        prepared again or dequantized afterwards)."""
        if backend not in BACKENDS:
            raise ValueError(f"backend {backend!r} is unknown: use one of {BACKENDS}")
        if self.released:
            raise ValueError("this module's packed tensors were released after its kernel was built")
        self.backend, self._kernel = "reference", None
        on_cpu = self.qweight.device.type == "cpu"
        if backend in ("auto", "native") and self.bits in NativeKernel.BITS and on_cpu:
            self._kernel = NativeKernel.build(self, dtype)
        if self._kernel is None and backend in ("auto", "int4") and self.bits in Int4Kernel.BITS and on_cpu:
            self._kernel = Int4Kernel.build(self, dtype)
        if self._kernel is None and backend in ("auto", "int8") and self.bits == 8 and on_cpu:
            self._kernel = Int8Kernel.build(self, dtype)
        if self._kernel is not None:
            self.backend = self._kernel.name
        if backend not in ("auto", "reference") and self.backend != backend:
            raise ValueError(f"the {backend} backend cannot run this module ({self.extra_repr()})")
        if release_packed and self._kernel is not None:
            for name in ("qweight", "qzeros", "scales", "g_idx"):
                self._buffers[name] = torch.empty(0, dtype=self._buffers[name].dtype)
            self.released = True
        return self.backend

    def bytes_per_call(self) -> int:
        """Bytes of weight data one decode-sized call reads."""
        if self._kernel is not None:
            return self._kernel.nbytes()
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.qzeros, self.scales, self.g_idx))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.bias.to(x.dtype) if self.bias is not None else None
        kernel = self._kernel
        if kernel is not None:
            x2 = x.reshape(-1, self.in_features)
            if kernel.perm is not None:
                x2 = x2[:, kernel.perm]
            if x2.dtype != kernel.dtype:
                x2 = x2.to(kernel.dtype)
            y = kernel(x2.contiguous()).to(x.dtype)
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


def _sorted_codes(ql: QuantLinear) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """(input permutation or None, g_idx and codes [K, N] in that order): act-order inputs sorted so each
    group is one contiguous run."""
    g_idx = ql.g_idx.long()
    q = unpack(ql.qweight, ql.bits, ql.in_features)
    if bool((g_idx[1:] < g_idx[:-1]).any()):
        perm = torch.argsort(g_idx, stable=True)
        return perm, g_idx[perm], q[perm]
    return None, g_idx, q


class NativeKernel:
    """optq's AVX-512 / AVX2 kernels (native/q4_gemm.cpp, where their layouts and algebra are written down).

    Codes are stored as they are (2/3-bit codes are 4-bit codes that use part of the range; 8-bit codes one
    byte each), with float32 s and z + 128 per group and output, so w = s * (q - z) carries no rounding beyond
    the checkpoint's own. 4-bit activations run in bf16 where the CPU has AVX-512 BF16, else in float32
    (float16 ones are widened; bf16 ones without AVX-512 BF16 go to PyTorch's int4 kernel, fast in bf16);
    8-bit computes in float32 and returns bf16 results only where the CPU rounds to bf16 natively.
    Act-order inputs are sorted by group once, as for Int4Kernel; groups must start at multiples of 4 inputs
    (true for every group size that is a multiple of 4); outputs are padded to a multiple of 64 with
    zero-scale columns.
    """

    name = "native"
    BITS = (2, 3, 4, 8)
    TILE_N = 64

    def __init__(self, packed, scale, zp, starts, perm, out_features, dtype, op, dense_rows=None):
        self.packed, self.scale, self.zp, self.starts, self.perm = packed, scale, zp, starts, perm
        self.out_features, self.dtype, self.op = out_features, dtype, op
        self.dense_rows = dense_rows  # calls with at least this many rows dequantize and run a dense matmul

    @classmethod
    def build(cls, ql: QuantLinear, dtype: torch.dtype) -> NativeKernel | None:
        from . import native

        k, n = ql.in_features, ql.out_features
        if k % 4 or not native.load():
            return None
        if ql.bits == 8:
            kernel_dtype = torch.bfloat16 if dtype == torch.bfloat16 and native.bf16_supported() else torch.float32
        elif dtype == torch.bfloat16 and native.bf16_supported():
            kernel_dtype = torch.bfloat16
        elif dtype == torch.bfloat16:
            return None  # bf16 activations without VDPBF16PS: PyTorch's int4 kernel serves them
        else:
            kernel_dtype = torch.float32
        perm, g_idx, q = _sorted_codes(ql)  # q: [K, N]
        starts = [0] + (torch.nonzero(g_idx[1:] != g_idx[:-1]).flatten() + 1).tolist() + [k]
        if any(a % 4 for a in starts):
            return None
        run_group = g_idx[starts[:-1]]  # the GPTQ group of each contiguous run
        s = ql.scales.float()[run_group]  # [R, N]
        zp = ql.zero_points().float()[run_group] + 128
        pad = -n % cls.TILE_N
        tiles = (n + pad) // cls.TILE_N
        q = F.pad(q, (0, pad)).to(torch.uint8)
        s, zp = F.pad(s, (0, pad)), F.pad(zp, (0, pad))
        if ql.bits == 8:
            packed = q.view(k, tiles, cls.TILE_N).permute(1, 0, 2).contiguous()  # [tile, k, 64]
            op = torch.ops.optq_native.q8_gemm
        else:
            # q[k, n] -> [k/4, half (k%4 >= 2), e (k%2), tile, subtile, lane]; the low nibble takes half 0.
            c = q.view(k // 4, 2, 2, tiles, 4, 16)
            packed = (c[:, 0] | (c[:, 1] << 4)).permute(2, 0, 3, 4, 1).reshape(tiles, k // 4, 128).contiguous()
            op = torch.ops.optq_native.q4_gemm
        per_tile = lambda t: t.view(-1, tiles, cls.TILE_N).permute(1, 0, 2).contiguous()  # noqa: E731
        starts_t = torch.tensor(starts, dtype=torch.int32)
        dense = DENSE_MIN_ROWS if ql.bits != 8 and kernel_dtype == torch.bfloat16 and amx_bf16() else None
        return cls(packed, per_tile(s), per_tile(zp), starts_t, perm, n, kernel_dtype, op, dense)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scale, self.zp))

    def dense(self) -> torch.Tensor:
        """The weight [out, in] in bf16, inputs in the kernel's order (4-bit layout)."""
        w = torch.ops.optq_native.q4_dequant(self.packed, self.scale, self.zp, self.starts)
        return w[: self.out_features]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.dense_rows is not None and x.shape[0] >= self.dense_rows:
            return F.linear(x, self.dense())
        y = self.op(x, self.packed, self.scale, self.zp, self.starts)
        return y if y.shape[1] == self.out_features else y[:, : self.out_features]


class Int4Kernel:
    """PyTorch's CPU int4 matmul, which computes w = (q - 8) * scale + offset per block of gk inputs.

    GPTQ's w = s * (q - z) = s * (q - 8) + s * (8 - z): the same codes q, scale s, offset s * (8 - z), exact
    up to the rounding of s * (8 - z) to the activation dtype. That rounding cancels badly in bf16 (2-bit:
    an offset 6s against codes near -8s), so each kernel block's codes are stored shifted by t, as q + t with
    w = s * (q + t - 8) + s * (8 - z - t), taking t as close to 8 - z as keeps q + t in [0, 15]: the offset
    is exactly zero for 2/3-bit codes and symmetric 4-bit ones, and small where a 4-bit block uses few codes.
    Act-order inputs are sorted by g_idx once, so each group is a contiguous
    run, and activations are gathered in that order at run time. The kernel block gk is the largest supported
    size whose blocks each fall in one GPTQ group: g128 with a last partial group of 64 (K = 576) runs as
    gk = 64, every block keeping its group's scale.
    """

    name = "int4"
    BITS = (2, 3, 4)
    KERNEL_GROUPS = (256, 128, 64, 32)

    def __init__(self, packed, gk, scale_offset, perm):
        self.packed, self.gk, self.scale_offset, self.perm = packed, gk, scale_offset, perm
        self.dtype = scale_offset.dtype

    @classmethod
    def build(cls, ql: QuantLinear, dtype: torch.dtype) -> Int4Kernel | None:
        k = ql.in_features
        perm, g_idx, q = _sorted_codes(ql)  # q: [K, N]
        gk = next((g for g in cls.KERNEL_GROUPS if k % g == 0 and
                   bool((g_idx.view(-1, g) == g_idx.view(-1, g)[:, :1]).all())), None)
        if gk is None:
            return None
        block_group = g_idx[::gk]  # GPTQ group of each kernel block
        s = ql.scales.float()[block_group]  # [K/gk, N]
        z = ql.zero_points()[block_group]
        blocks = q.view(k // gk, gk, -1)
        shift = torch.minimum(torch.maximum(8 - z, -blocks.amin(dim=1)), 15 - blocks.amax(dim=1))
        q = (blocks + shift.unsqueeze(1)).view(k, -1)
        scale_offset = torch.stack([s, s * (8 - z - shift).float()], dim=-1).to(dtype).contiguous()
        packed = torch._convert_weight_to_int4pack_for_cpu(q.T.contiguous(), 2)
        return cls(packed, gk, scale_offset, perm)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scale_offset))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch._weight_int4pack_mm_for_cpu(x, self.packed, self.gk, self.scale_offset)


class Int8Kernel:
    """PyTorch's CPU int8 matmul (y = x @ w^T * scale, one scale per output) applied group by group.

    GPTQ's w = s * (q - z) = s * (q - 128) + s * (128 - z): q - 128 fits int8 exactly, so a group's part of
    the output is int8mm(x_g, q_g - 128, s_g) + sum(x_g) * s_g * (128 - z_g); the second term vanishes for
    symmetric checkpoints (z = 128). Per-channel checkpoints are one group, one call. The kernel reads past
    the end of rows whose length is not a multiple of 16 (torch 2.13: NaN or a crash), so such a group's
    weight gets zero columns up to the next multiple and its activations are zero-padded to match.
    """

    name = "int8"
    max_rows = INT8_MAX_ROWS

    def __init__(self, runs, weights, scales, offsets, perm, dtype):
        self.runs, self.weights, self.scales, self.offsets = runs, weights, scales, offsets
        self.perm, self.dtype = perm, dtype

    @classmethod
    def build(cls, ql: QuantLinear, dtype: torch.dtype) -> Int8Kernel | None:
        perm, g_idx, q = _sorted_codes(ql)  # q: [K, N]
        w = (q - 128).to(torch.int8).T.contiguous()  # [N, K]
        starts = [0] + (torch.nonzero(g_idx[1:] != g_idx[:-1]).flatten() + 1).tolist() + [ql.in_features]
        z = ql.zero_points().float()
        runs, weights, scales, offsets = [], [], [], []
        for a, b in zip(starts[:-1], starts[1:]):
            g = int(g_idx[a])
            s = ql.scales[g].float()
            off = s * (128 - z[g])
            runs.append((a, b))
            weights.append(F.pad(w[:, a:b], (0, -(b - a) % 16)).contiguous())
            scales.append(s.to(dtype).contiguous())
            offsets.append(off.to(dtype) if bool(off.any()) else None)
        return cls(runs, weights, scales, offsets, perm, dtype)

    def nbytes(self) -> int:
        tensors = self.weights + self.scales + [o for o in self.offsets if o is not None]
        return sum(t.numel() * t.element_size() for t in tensors)

    def dense(self) -> torch.Tensor:
        """The dequantized weight [N, K] in the kernel's input order and dtype."""
        parts = []
        for (a, b), w, s, off in zip(self.runs, self.weights, self.scales, self.offsets):
            part = w[:, : b - a].to(self.dtype) * s.unsqueeze(1)
            parts.append(part if off is None else part + off.unsqueeze(1))
        return torch.cat(parts, dim=1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > self.max_rows:
            return F.linear(x, self.dense())
        y = None
        for (a, b), w, s, off in zip(self.runs, self.weights, self.scales, self.offsets):
            xg = x[:, a:b] if len(self.runs) > 1 else x
            padded = F.pad(xg, (0, w.shape[1] - (b - a))) if w.shape[1] != b - a else xg
            part = torch._weight_int8pack_mm(padded.contiguous(), w, s)
            if off is not None:
                part = part + xg.sum(dim=-1, keepdim=True) * off
            y = part if y is None else y.add_(part)
        return y
