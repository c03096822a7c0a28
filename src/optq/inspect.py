"""Describe a checkpoint: its quantization config, each module's bits and groups, size against 16 bits."""

from __future__ import annotations

import os
from pathlib import Path

from safetensors import safe_open

from .formats.gptq import open_checkpoint, quantized_module_names
from .formats.loaders import loader_support


def inspect_checkpoint(path: str | os.PathLike) -> dict:
    info = open_checkpoint(Path(path))
    shapes: dict[str, tuple[int, ...]] = {}
    for f in info.weight_files:
        with safe_open(str(f), framework="pt") as sf:
            for k in sf.keys():
                shapes[k] = tuple(sf.get_slice(k).get_shape())
    modules = []
    fp16_bytes = 0
    quant_names = quantized_module_names(info)
    for name in quant_names:
        mcfg = info.quant.for_module(name) or info.quant
        if info.source == "gptq":
            in_f = shapes[f"{name}.g_idx"][0]
            groups, out_f = shapes[f"{name}.scales"]
        else:  # compressed-tensors: weight_scale [out, groups], weight_shape (out, in)
            out_f, groups = shapes[f"{name}.weight_scale"]
            with safe_open(str(info.tensor_files[f"{name}.weight_packed"]), framework="pt") as sf:
                in_f = (int(sf.get_tensor(f"{name}.weight_shape")[1]) if f"{name}.weight_shape" in sf.keys()
                        else groups * mcfg.group_size)
        modules.append({"name": name, "in_features": in_f, "out_features": out_f, "bits": mcfg.bits,
                        "group_size": mcfg.group_size, "groups": groups})
        fp16_bytes += 2 * in_f * out_f
    quant_prefixes = tuple(f"{n}." for n in quant_names)
    for k, shp in shapes.items():
        if not k.startswith(quant_prefixes) or k.endswith(".bias"):
            n = 1
            for d in shp:
                n *= d
            fp16_bytes += 2 * n
    size = sum(f.stat().st_size for f in info.weight_files)
    float_modules = sorted(k[2:] for k in info.quant.dynamic if k.startswith("-:"))
    return {
        "path": str(info.path),
        "format": info.source,
        "quantization_config": info.quant_raw,
        "modules": modules,
        "float_modules": float_modules,
        "size_bytes": size,
        "fp16_bytes": fp16_bytes,
        # which loaders take it (None) or why not; compressed-tensors checkpoints are vLLM's own format
        "loaders": loader_support(info.quant_raw, modules) if info.source == "gptq" else {},
    }
