"""int32 bit packing of the GPTQ checkpoint (the one place this layout lives).

Values are written as a little-endian bit stream along dim 0: value i occupies bits [bits*i, bits*(i+1)) of
the stream and stream bit b lives in word b // 32 at offset b % 32. For 2/4/8 bits this is "value i in word
i // (32/bits) at offset bits * (i % (32/bits))"; for 3 bits it is the spec's 32-values-in-3-words layout,
with values 10 and 21 straddling two words. In every case 32 values fill exactly `bits` words.
"""

from __future__ import annotations

import torch

from .grid import SUPPORTED_BITS

_MASK32 = (1 << 32) - 1


def values_per_period(bits: int) -> int:
    """The smallest run of values that fills whole words: 32 / bits for 2/4/8 bits, 32 for 3 bits."""
    _check_bits(bits)
    return 32 // bits if 32 % bits == 0 else 32


def words_per_period(bits: int) -> int:
    return values_per_period(bits) * bits // 32


def packable(n: int, bits: int) -> bool:
    return n % values_per_period(bits) == 0


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits} is not supported; use one of {SUPPORTED_BITS}")


def _layout(bits: int):
    """For each value j of a period: list of (word, shift into word, shift out of value, nbits)."""
    for j in range(values_per_period(bits)):
        start = bits * j
        pieces = []
        taken = 0
        while taken < bits:
            bit = start + taken
            word, off = divmod(bit, 32)
            n = min(bits - taken, 32 - off)
            pieces.append((word, off, taken, n))
            taken += n
        yield j, pieces


def pack(values: torch.Tensor, bits: int) -> torch.Tensor:
    """values: integer tensor [n, m] in [0, 2**bits) -> int32 [n * bits / 32, m], packed along dim 0."""
    vpp, wpp = values_per_period(bits), words_per_period(bits)
    n = values.shape[0]
    if n % vpp:
        raise ValueError(f"{bits}-bit packing needs a multiple of {vpp} values along the packed dimension, got {n}")
    v = values.to(torch.int64)
    if v.numel() and (v.min() < 0 or v.max() >= 2**bits):
        raise ValueError(f"values out of range for {bits} bits")
    v = v.reshape(n // vpp, vpp, *values.shape[1:])
    words = torch.zeros(n // vpp, wpp, *values.shape[1:], dtype=torch.int64, device=values.device)
    for j, pieces in _layout(bits):
        for word, off, taken, nb in pieces:
            part = (v[:, j] >> taken) & ((1 << nb) - 1)
            words[:, word] |= part << off
    words = words.reshape(n // vpp * wpp, *values.shape[1:])
    # Reinterpret unsigned 32-bit words as signed int32 (two's complement).
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32)


def unpack(packed: torch.Tensor, bits: int, n: int | None = None) -> torch.Tensor:
    """int32 [w, m] -> int32 values [w * 32 / bits, m] (the first n rows if n is given)."""
    vpp, wpp = values_per_period(bits), words_per_period(bits)
    if packed.shape[0] % wpp:
        raise ValueError(f"{bits}-bit data needs a multiple of {wpp} words along the packed dimension")
    if wpp == 1:
        # No value straddles words: one shift-and-mask over all positions at once (the arithmetic shift of a
        # negative word fills with ones, which the mask drops).
        shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=packed.device)
        shifts = shifts.view(1, vpp, *([1] * (packed.dim() - 1)))
        out = (packed.unsqueeze(1) >> shifts) & ((1 << bits) - 1)
        out = out.reshape(packed.shape[0] * vpp, *packed.shape[1:])
        return out if n is None else out[:n]
    words = packed.to(torch.int64) & _MASK32
    periods = packed.shape[0] // wpp
    words = words.reshape(periods, wpp, *packed.shape[1:])
    out = torch.zeros(periods, vpp, *packed.shape[1:], dtype=torch.int64, device=packed.device)
    for j, pieces in _layout(bits):
        for word, off, taken, nb in pieces:
            out[:, j] |= ((words[:, word] >> off) & ((1 << nb) - 1)) << taken
    out = out.reshape(periods * vpp, *packed.shape[1:]).to(torch.int32)
    return out if n is None else out[:n]


def pack_cols(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack along dim 1 ([G, out] zero points -> [G, out * bits / 32])."""
    return pack(values.T, bits).T.contiguous()


def unpack_cols(packed: torch.Tensor, bits: int, n: int | None = None) -> torch.Tensor:
    return unpack(packed.T, bits, n).T.contiguous()
