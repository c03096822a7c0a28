"""The GPTQ Hessian H = 2 X^T X / n of a module's calibration inputs, summed window by window in float32
(HessianAccumulator), with GPTAQ's cross term (X_ref - X)^T X, and the kernels those sums are computed with:
exact products of bf16 activations summed in float32, the fastest on this CPU chosen by measurement
(core.choice)."""

from __future__ import annotations

import torch

from . import choice
from .hardware import bf16_math_for_exact_inputs, native_bf16


# Column blocks of the upper-triangular X^T X sums: about this many columns each (narrower blocks skip more of the
# lower triangle but make smaller GEMMs), at most this many blocks.
SYMMETRIC_BLOCK = 96
SYMMETRIC_MAX_BLOCKS = 8


def _blocks(columns: int) -> list[tuple[int, int]]:
    count = min(SYMMETRIC_MAX_BLOCKS, max(1, columns // SYMMETRIC_BLOCK))
    bounds = [columns * i // count for i in range(count + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def _native_gram():
    """optq's AVX-512 BF16 X^T X kernel (runtime/native/gram.cpp: upper triangle, added in place) once the
    runtime has loaded it on a CPU with native bf16, else None. core imports torch only, so it finds the
    kernel through torch.ops; the pipeline loads it before the first layer, so every window of a run takes
    the same path."""
    if not native_bf16():
        return None
    try:
        return torch.ops.optq_native.gram_bf16_
    except (AttributeError, RuntimeError):
        return None


def _symmetric(m: torch.Tensor) -> torch.Tensor:
    """Fill `m`'s lower triangle from its upper one, in place, a block column at a time (no d x d temporary).
    The diagonal blocks were whole GEMM results; they are made exactly symmetric too."""
    for lo, hi in _blocks(m.shape[0]):
        m[hi:, lo:hi].copy_(m[lo:hi, hi:].T)
        block = m[lo:hi, lo:hi]
        lower = torch.tril_indices(hi - lo, hi - lo, -1, device=m.device)
        block[lower[0], lower[1]] = block[lower[1], lower[0]]
    return m


def _size_class(x: torch.Tensor) -> tuple[int, int]:
    """The shape a kernel choice is made for: the token count rounded up to a power of two (an MoE expert
    sees another count in every window; a choice per count would measure again and again)."""
    rows, columns = x.shape
    return 1 << max(0, rows - 1).bit_length(), columns


class HessianAccumulator:
    """Running sum of X^T X in float32 over calibration tokens; H = 2 X^T X / n (the GPTQ Hessian).

    With `asymmetric=True` it also sums (X_ref - X)^T X, where X_ref are the same module's inputs in the
    float model: the cross term of GPTAQ's asymmetric calibration (see `gptq_solve`).

    Sums of several accumulators (the calibration shards, see `absorb`) are made in a fixed order, so the
    Hessian's bits do not depend on how many processes computed the shards."""

    def __init__(self, columns: int, device: torch.device | str = "cpu", asymmetric: bool = False):
        self.columns, self.device, self.asymmetric = columns, device, asymmetric
        self.xtx: torch.Tensor | None = None  # allocated by the first add (or absorb)
        self.dxtx: torch.Tensor | None = None
        self.tokens = 0

    def add(self, x: torch.Tensor, token_mask: torch.Tensor | None = None, x_ref: torch.Tensor | None = None) -> None:
        """x: [..., columns] layer inputs; token_mask: bool [...] (False for padding tokens, which are skipped);
        x_ref: the float model's inputs for the same tokens (needed when asymmetric)."""
        if (x_ref is None) == self.asymmetric:
            raise ValueError("x_ref must be given exactly when the accumulator is asymmetric")
        x = x.reshape(-1, x.shape[-1])
        if x_ref is not None:
            x_ref = x_ref.reshape(-1, x_ref.shape[-1])
            if x_ref.shape != x.shape:
                raise ValueError(f"x_ref has shape {tuple(x_ref.shape)}, x has {tuple(x.shape)}")
        if token_mask is not None:
            keep = token_mask.reshape(-1).to(x.device)
            x = x[keep]
            x_ref = x_ref[keep] if x_ref is not None else None
        if x.shape[0] == 0:
            return
        if self.xtx is None:
            self.xtx = torch.zeros(self.columns, self.columns, dtype=torch.float32, device=self.device)
            self.dxtx = torch.zeros_like(self.xtx) if self.asymmetric else None
        exact_bf16 = x.dtype == torch.bfloat16 and x.device.type == "cpu"
        if exact_bf16:
            kernels = _bf16_gram_kernels()

            def trials():
                scratch = torch.zeros_like(self.xtx)
                return {name: (lambda k=k: k(scratch, x)) for name, k in kernels.items()}

            kernels[choice.fastest("X^T X bf16", _size_class(x), list(kernels), trials)](self.xtx, x)
        else:
            _upper_gram(self.xtx, x.to(torch.float32), bf16_math=False)
        if x_ref is not None:
            x = x.to(torch.float32)
            dx = x_ref.to(torch.float32) - x
            kernels = _cross_kernels(exact_bf16)

            def cross_trials():
                scratch = torch.zeros_like(self.dxtx)
                return {name: (lambda k=k: k(scratch, dx.clone(), x)) for name, k in kernels.items()}

            kernels[choice.fastest("(X_ref - X)^T X", _size_class(x), list(kernels), cross_trials)](self.dxtx, dx, x)
        self.tokens += x.shape[0]

    def absorb(self, other: "HessianAccumulator") -> None:
        """Add `other`'s sums to this one's and empty `other` (its buffers move here when this one holds none).
        An accumulator without tokens adds nothing, so the result is the same whichever shards were empty."""
        if other.tokens == 0:
            return
        if self.xtx is None:
            self.xtx, self.dxtx = other.xtx, other.dxtx
        else:
            self.xtx.add_(other.xtx)
            if self.dxtx is not None:
                self.dxtx.add_(other.dxtx)
        self.tokens += other.tokens
        other.xtx = other.dxtx = None
        other.tokens = 0

    def hessian(self) -> torch.Tensor:
        if self.tokens == 0:
            raise ValueError("no calibration tokens reached this module")
        return _symmetric(self.xtx) * (2.0 / self.tokens)

    def take_hessian(self) -> torch.Tensor:
        """The Hessian, made in place from the running sum, which the accumulator gives up (no second d x d
        copy: 822 MB for an 8B model's down_proj)."""
        if self.tokens == 0:
            raise ValueError("no calibration tokens reached this module")
        h, self.xtx = self.xtx, None
        return _symmetric(h).mul_(2.0 / self.tokens)

    def cross_term(self) -> torch.Tensor | None:
        """2 (X_ref - X)^T X / n, on the Hessian's scale; None unless asymmetric."""
        if self.dxtx is None:
            return None
        if self.tokens == 0:
            raise ValueError("no calibration tokens reached this module")
        return self.dxtx * (2.0 / self.tokens)


# ---- the X^T X and (X_ref - X)^T X kernels the accumulator chooses from (core.choice) ---------------------


def _upper_gram(acc: torch.Tensor, x: torch.Tensor, bf16_math: bool) -> None:
    """acc's blocks on and above the diagonal += X^T X (x float32). X^T X is symmetric: block column i against
    the rows up to its end is ~56% of the full product's work (column blocks of ~d/8 ran 12-17% faster than row
    blocks of 128 on a 2-core AVX2 EPYC); `_symmetric` fills the rest. `bf16_math`: x holds bf16 values, whose
    products the bf16 math mode computes exactly (float32 sums)."""
    with bf16_math_for_exact_inputs(bf16_math):
        for lo, hi in _blocks(acc.shape[0]):
            acc[:hi, lo:hi].addmm_(x[:, :hi].T, x[:, lo:hi])


def _full_gram_bf16(acc: torch.Tensor, x: torch.Tensor) -> None:
    """acc += X^T X in one GEMM in the bf16 math mode: twice the products of the upper blocks, but one large call
    (oneDNN's AMX kernels on CPUs with AMX: 3.5x the native kernel on a Xeon, BENCHMARKS.md)."""
    xf = x.to(torch.float32)
    with bf16_math_for_exact_inputs(True):
        acc.addmm_(xf.T, xf)


def _bf16_gram_kernels() -> dict:
    """X^T X of bf16 activations, exact products summed in float32; the first is the default."""
    kernels = {}
    native = _native_gram()
    if native is not None:  # optq's AVX-512 BF16 kernel (upper triangle): 2.1-2.3x torch's on an EPYC
        kernels["native-bf16"] = lambda acc, x: native(acc, x.contiguous())
    kernels["torch-bf16-upper"] = lambda acc, x: _upper_gram(acc, x.to(torch.float32), bf16_math=True)
    kernels["torch-bf16-full"] = _full_gram_bf16
    return kernels


def _cross_float32(acc: torch.Tensor, dx: torch.Tensor, x: torch.Tensor) -> None:
    acc.addmm_(dx.T, x)


def _cross_bf16_split(acc: torch.Tensor, dx: torch.Tensor, x: torch.Tensor) -> None:
    """acc += dx^T x with x holding bf16 values: dx is split into two bf16-exact parts (dx = hi + lo, 16
    significant bits, ample for a correction term), so both products run in the bf16 math mode with float32
    sums. No drift (dx = 0) still adds exact zeros, so GPTAQ without drift stays GPTQ. dx is overwritten."""
    hi = dx.to(torch.bfloat16).to(torch.float32)
    lo = dx.sub_(hi).to(torch.bfloat16).to(torch.float32)
    with bf16_math_for_exact_inputs(True):
        acc.addmm_(hi.T, x)
        acc.addmm_(lo.T, x)


def _cross_kernels(exact_bf16: bool) -> dict:
    kernels = {"float32": _cross_float32}
    if exact_bf16:
        kernels["torch-bf16-split"] = _cross_bf16_split
    return kernels
