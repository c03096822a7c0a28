"""Which loaders take a GPTQ checkpoint, by the rules in their own source; `optq inspect` prints the verdicts.

vLLM (vllm/model_executor/layers/quantization/gptq.py, gptq_marlin.py, utils/gptq_utils.py, read for
vLLM 0.1x-0.3x):
- `desc_act: true` is refused ("GPTQ group activation ordering (desc_act=True) is no longer supported");
  act-order with static groups has g_idx = column // group_size and is written with desc_act false.
- Each linear allocates `in_features // group_size` rows of scales and zeros and checks that the group size
  divides its input size, so a shorter last group fails in weight loading.
- Per-module settings come from `dynamic`, whose regexes vLLM matches against its own module names, where
  q/k/v are one `qkv_proj` and gate/up one `gate_up_proj`: an override must give the fused module's parts
  one group size.
- GPU Marlin (the fast kernel): 4 or 8 bits symmetric, group size -1/32/64/128, output features a multiple
  of 64 and input features of 128 per module; other checkpoints run on vLLM's slower GPTQ kernel.
GPTQModel (and Transformers through it) reads any group layout; version 7.7 refuses asymmetric v1
checkpoints. llama.cpp runs what `optq export-gguf` writes: exactly for 4/8-bit group-32 checkpoints,
otherwise with `--requantize`.
"""

from __future__ import annotations

import re
from typing import Any

# vLLM's fused modules and the checkpoint modules they are made of
VLLM_FUSED = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj",
              "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj"}
MARLIN_GROUP_SIZES = (-1, 32, 64, 128)
LOADERS = ("vllm", "vllm-marlin", "gptqmodel", "llama.cpp")


def vllm_name(name: str) -> str:
    """The module name vLLM gives a checkpoint module (its fused name for q/k/v and gate/up)."""
    head, _, last = name.rpartition(".")
    fused = VLLM_FUSED.get(last)
    return f"{head}.{fused}" if fused else name


def dynamic_override(dynamic: dict[str, dict], name: str, key: str, default: Any) -> Any:
    """vLLM's reading of `dynamic` for one module: the first matching rule wins ('-:' = left in float)."""
    for pattern, override in dynamic.items():
        if re.match(pattern[2:], name):
            return None if pattern.startswith("-:") else override.get(key, default)
    return default


def vllm_refusal(quant: dict[str, Any], modules: list[dict]) -> str | None:
    """Why vLLM cannot load the checkpoint, None when it can."""
    if quant.get("desc_act"):
        return "desc_act is true (act-order without static groups): vLLM no longer loads reordered groups"
    dynamic = quant.get("dynamic") or {}
    for m in modules:
        fused = vllm_name(m["name"])
        g = dynamic_override(dynamic, fused, "group_size", quant.get("group_size", 128))
        if g is None:
            continue
        if g != m["group_size"]:
            return (f"{m['name']}: vLLM reads it as part of {fused} with group size {g} (dynamic rules match the "
                    f"fused name), the checkpoint has {m['group_size']}")
        if g != -1 and m["in_features"] % g:
            return (f"{m['name']}: group size {g} does not divide its {m['in_features']} inputs (a shorter last "
                    "group): quantize without --partial-groups")
    return None


def marlin_refusal(quant: dict[str, Any], modules: list[dict]) -> str | None:
    why = vllm_refusal(quant, modules)
    if why:
        return why
    if not quant.get("sym", True):
        return "asymmetric: Marlin takes symmetric GPTQ only (vLLM runs it on its GPTQ kernel)"
    for m in modules:
        if m["bits"] not in (4, 8):
            return f"{m['name']}: {m['bits']}-bit (Marlin takes 4 and 8)"
        if m["group_size"] not in MARLIN_GROUP_SIZES:
            return f"{m['name']}: group size {m['group_size']} (Marlin takes -1, 32, 64, 128)"
        if m["out_features"] % 64 or m["in_features"] % 128:
            return (f"{m['name']}: {m['in_features']} x {m['out_features']} (Marlin needs inputs a multiple of 128 "
                    "and outputs of 64)")
    return None


def gptqmodel_refusal(quant: dict[str, Any], modules: list[dict]) -> str | None:
    if not quant.get("sym", True) and quant.get("checkpoint_format", "gptq") == "gptq":
        return "asymmetric v1 checkpoint: GPTQModel 7.7 refuses it (write --format gptq_v2)"
    return None


def gguf_refusal(quant: dict[str, Any], modules: list[dict]) -> str | None:
    for m in modules:
        if m["bits"] not in (4, 8) or m["group_size"] != 32:
            return (f"{m['name']}: {m['bits']}-bit group {m['group_size']}: export-gguf needs --requantize "
                    "(exact only for 4/8-bit group 32)")
    return None


def loader_support(quant: dict[str, Any], modules: list[dict]) -> dict[str, str | None]:
    """Per loader: None where it takes the checkpoint, else why not. `modules`: name, in_features,
    out_features, bits, group_size of each quantized module."""
    return {"vllm": vllm_refusal(quant, modules), "vllm-marlin": marlin_refusal(quant, modules),
            "gptqmodel": gptqmodel_refusal(quant, modules), "llama.cpp": gguf_refusal(quant, modules)}
