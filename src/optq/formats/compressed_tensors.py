"""Reading llm-compressor's compressed-tensors "pack-quantized" checkpoints (integer weight-only).

Per quantized module the file holds `weight_packed` int32 [out, ceil(in * bits / 32)] (each row a little-endian
bit stream of the codes, stored with an offset of 2^(bits-1) so that they are unsigned), `weight_scale`
[out, groups] (float), `weight_shape` [2] = (out, in), and when asymmetric `weight_zero_point` packed the same
way along dim 0 ([ceil(out * bits / 32), groups]); symmetric schemes have no zero point (it is 0, i.e. the
offset). `weight_g_idx` [in], if present, gives each input column's group (activation ordering).
The weight is scale * (code - zero), with both code and zero in the unsigned range.

The loader converts each module, as it streams the file, into the GPTQ tensors optq's QuantLinear runs
(gptq_v2 zero points: the unsigned zero is stored as it is), so every kernel serves these checkpoints too.
Anything the format can say that optq cannot honour is an error naming the field.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from ..config import QuantizeConfig
from ..core.grid import QuantizedWeight
from ..core.packing import unpack, unpack_cols, values_per_period
from ..errors import OptqError

log = logging.getLogger("optq")

QUANT_METHOD = "compressed-tensors"
LEAVES = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point", "weight_g_idx")
_FP16_MIN_NORMAL = 2.0**-14


@dataclass(frozen=True)
class Scheme:
    bits: int
    group_size: int  # -1: per output channel
    sym: bool
    targets: tuple[str, ...]


def is_compressed_tensors(quant: dict[str, Any] | None) -> bool:
    return isinstance(quant, dict) and str(quant.get("quant_method", "")).lower() == QUANT_METHOD


def _scheme(name: str, group: Any, top_format: Any) -> Scheme:
    where = f"quantization_config.config_groups.{name}"
    if not isinstance(group, dict):
        raise OptqError(f"{where} must be an object")
    fmt = group.get("format") or top_format
    if fmt != "pack-quantized":
        raise OptqError(f"{where}: format {fmt!r} is not supported: optq reads compressed-tensors "
                        "'pack-quantized' (integer, weight-only) checkpoints")
    for act in ("input_activations", "output_activations"):
        if group.get(act):
            raise OptqError(f"{where}.{act} is set: optq runs weight-only quantization (W4A16 and the like), "
                            "not quantized activations")
    w = group.get("weights")
    if not isinstance(w, dict):
        raise OptqError(f"{where}.weights must be an object describing the weight quantization")
    if w.get("type", "int") != "int":
        raise OptqError(f"{where}.weights.type={w.get('type')!r}: optq reads integer weights only")
    bits = w.get("num_bits")
    if bits not in (2, 3, 4, 8):
        raise OptqError(f"{where}.weights.num_bits={bits!r}: optq runs 2, 3, 4 and 8 bits")
    if w.get("dynamic"):
        raise OptqError(f"{where}.weights.dynamic is set: dynamic weight scales are not a checkpoint optq can run")
    strategy = w.get("strategy")
    if strategy == "channel":
        group_size = -1
    elif strategy == "group":
        group_size = w.get("group_size")
        if not isinstance(group_size, int) or group_size <= 0:
            raise OptqError(f"{where}.weights.group_size={group_size!r} must be a positive integer")
    else:
        raise OptqError(f"{where}.weights.strategy={strategy!r}: optq reads 'group' and 'channel' strategies")
    targets = group.get("targets") or []
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        raise OptqError(f"{where}.targets must be a list of strings")
    return Scheme(bits, group_size, bool(w.get("symmetric", True)), tuple(targets))


def _matches(pattern: str, name: str) -> bool:
    if pattern.startswith("re:"):
        return re.match(pattern[3:], name) is not None
    return pattern == name or name.endswith("." + pattern)


def read_config(quant: dict[str, Any], module_names: list[str]) -> QuantizeConfig:
    """A QuantizeConfig that gives each quantized module its scheme (as `dynamic` overrides where the
    config's groups differ), stored as gptq_v2 since the zero points are already unsigned."""
    groups = quant.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise OptqError("quantization_config.config_groups is missing: the compressed-tensors config is incomplete")
    if quant.get("sparsity_config"):
        raise OptqError("quantization_config.sparsity_config is set: optq does not read sparse checkpoints")
    if quant.get("transform_config"):
        raise OptqError("quantization_config.transform_config is set: optq does not apply compressed-tensors "
                        "transforms (rotations)")
    schemes = [_scheme(n, g, quant.get("format")) for n, g in groups.items()]

    def scheme_of(module: str) -> Scheme:
        named = [s for s in schemes if any(t != "Linear" and _matches(t, module) for t in s.targets)]
        if named:
            return named[0]
        linear = [s for s in schemes if "Linear" in s.targets]
        if linear:
            return linear[0]
        raise OptqError(f"module {module} has packed weights but no config group targets it")

    per_module = {m: scheme_of(m) for m in module_names}
    base = per_module[module_names[0]] if module_names else schemes[0]
    dynamic = {f"+:^{re.escape(m)}$": {"bits": s.bits, "group_size": s.group_size, "sym": s.sym}
               for m, s in per_module.items() if s != base}
    try:
        return QuantizeConfig(bits=base.bits, group_size=base.group_size, sym=base.sym, checkpoint_format="gptq_v2",
                              dynamic=dynamic)
    except OptqError as e:
        raise OptqError(f"compressed-tensors quantization_config: {e}") from None


def quantized_module_names(tensor_names) -> list[str]:
    return sorted({k[: -len(".weight_packed")] for k in tensor_names if k.endswith(".weight_packed")})


def _unpack_rows(packed: torch.Tensor, bits: int, n: int, what: str) -> torch.Tensor:
    """compressed-tensors' packing along dim 1 of [rows, words] -> values [rows, n] (the same bit stream as
    optq's packing along dim 0, so it is optq's unpack on the transpose, padded to whole periods)."""
    words = math.ceil(n * bits / 32)
    if packed.dim() != 2 or packed.shape[1] != words or packed.dtype != torch.int32:
        raise OptqError(f"{what} is {packed.dtype} {tuple(packed.shape)}, expected int32 [..., {words}] for {n} "
                        f"{bits}-bit values")
    period_words = values_per_period(bits) * bits // 32
    pad = -words % period_words
    t = packed.T
    if pad:
        t = torch.cat([t, torch.zeros(pad, t.shape[1], dtype=torch.int32)])
    return unpack(t.contiguous(), bits, n).T


def convert_module(name: str, pieces: dict[str, torch.Tensor], cfg: QuantizeConfig, in_f: int,
                   out_f: int) -> QuantizedWeight:
    """One module's compressed-tensors tensors -> QuantizedWeight (codes and zeros unsigned)."""
    bits, gs = cfg.bits, cfg.group_size
    for leaf in ("weight_packed", "weight_scale"):
        if leaf not in pieces:
            raise OptqError(f"the checkpoint has no tensor {name}.{leaf}: it is incomplete")
    if "weight_shape" in pieces and tuple(int(x) for x in pieces["weight_shape"].tolist()) != (out_f, in_f):
        raise OptqError(f"{name}.weight_shape is {pieces['weight_shape'].tolist()}, but the model's {name} is "
                        f"[{out_f}, {in_f}]")
    groups = 1 if gs == -1 else math.ceil(in_f / gs)
    codes = _unpack_rows(pieces["weight_packed"], bits, in_f, f"{name}.weight_packed")
    if codes.shape[0] != out_f:
        raise OptqError(f"{name}.weight_packed has {codes.shape[0]} rows, expected {out_f}")
    scale = pieces["weight_scale"]
    if not scale.is_floating_point() or tuple(scale.shape) != (out_f, groups):
        raise OptqError(f"{name}.weight_scale is {scale.dtype} {tuple(scale.shape)}, expected a float "
                        f"[{out_f}, {groups}] for group size {gs}")
    scale = scale.float()
    if not torch.isfinite(scale).all() or scale.abs().max() > torch.finfo(torch.float16).max:
        raise OptqError(f"{name}.weight_scale holds values float16 cannot hold (inf, NaN or > 65504)")
    tiny = (scale.abs() < _FP16_MIN_NORMAL) & (scale != 0)
    if tiny.any():
        log.warning("%s: %d scales below 6.1e-5 lose precision as float16 (optq's scale dtype)", name,
                    int(tiny.sum()))
    offset = 1 << (bits - 1)
    if cfg.sym:
        zeros = torch.full((groups, out_f), float(offset))
    else:
        if "weight_zero_point" not in pieces:
            raise OptqError(f"the checkpoint has no tensor {name}.weight_zero_point, which an asymmetric scheme "
                            "needs: it is incomplete")
        zp = pieces["weight_zero_point"]
        if zp.dtype != torch.int32:
            raise OptqError(f"{name}.weight_zero_point has dtype {zp.dtype}: optq reads packed (int32) zero points")
        zeros = _unpack_rows(zp.T.contiguous(), bits, out_f, f"{name}.weight_zero_point (transposed)").float()
        if tuple(zeros.shape) != (groups, out_f):
            raise OptqError(f"{name}.weight_zero_point holds {tuple(zeros.shape)} zero points, expected "
                            f"({groups}, {out_f})")
    if "weight_g_idx" in pieces:
        g_idx = pieces["weight_g_idx"].to(torch.int64)
        if tuple(g_idx.shape) != (in_f,) or (g_idx.numel() and (g_idx.min() < 0 or g_idx.max() >= groups)):
            raise OptqError(f"{name}.weight_g_idx must hold {in_f} group indices in [0, {groups})")
    else:
        g_idx = torch.arange(in_f) // (in_f if gs == -1 else gs)
    return QuantizedWeight(codes.to(torch.int32).contiguous(), scale.T.contiguous(), zeros, g_idx.to(torch.int32),
                           bits, gs)


def iter_converted(tensors: Iterator[tuple[str, torch.Tensor]], cfg: QuantizeConfig, shapes: dict[str, tuple[int, int]],
                   pack) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream (name, tensor) pairs, turning each quantized module's pieces, once all have arrived, into
    GPTQ tensors through `pack` (QuantizedWeight -> {qweight, qzeros, scales, g_idx}). `shapes` maps each
    quantized module to its (in, out) features."""
    pending: dict[str, dict[str, torch.Tensor]] = {}
    needs = {m: {"weight_packed", "weight_scale"} | ({"weight_zero_point"} if not cfg.for_module(m).sym else set())
             for m in shapes}
    for key, t in tensors:
        module, _, leaf = key.rpartition(".")
        if module in shapes and leaf in LEAVES:
            pending.setdefault(module, {})[leaf] = t
            continue
        yield key, t
    for module, (in_f, out_f) in shapes.items():
        pieces = pending.pop(module, {})
        missing = needs[module] - set(pieces)
        if missing:
            raise OptqError(f"the checkpoint has no tensor {module}.{sorted(missing)[0]}: it is incomplete")
        qw = convert_module(module, pieces, cfg.for_module(module), in_f, out_f)
        for leaf, tensor in pack(qw).items():
            yield f"{module}.{leaf}", tensor
