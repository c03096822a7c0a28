"""Where each architecture keeps its decoder layers and in what order their linear modules are quantized.

A sequential group is a list of modules that read the same input (so they share one Hessian); groups are
quantized in order, so later groups see the outputs of already-quantized earlier ones (true-sequential).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import OptqError

_LLAMA_GROUPS = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)


@dataclass(frozen=True)
class ArchSpec:
    layers: str  # dotted path from the CausalLM to the ModuleList of decoder layers
    groups: tuple[tuple[str, ...], ...]
    final_norm: str = "model.norm"  # what turns the last layer's output into the output projection's input


ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": ArchSpec("model.layers", _LLAMA_GROUPS),
    "mistral": ArchSpec("model.layers", _LLAMA_GROUPS),
    "qwen2": ArchSpec("model.layers", _LLAMA_GROUPS),
    "qwen3": ArchSpec("model.layers", _LLAMA_GROUPS),
    "gemma": ArchSpec("model.layers", _LLAMA_GROUPS),
    "gemma2": ArchSpec("model.layers", _LLAMA_GROUPS),
    "gemma3_text": ArchSpec("model.layers", _LLAMA_GROUPS),
    "phi3": ArchSpec(
        "model.layers",
        (("self_attn.qkv_proj",), ("self_attn.o_proj",), ("mlp.gate_up_proj",), ("mlp.down_proj",)),
    ),
    "opt": ArchSpec(
        "model.decoder.layers",
        (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.out_proj",), ("fc1",), ("fc2",)),
        "model.decoder.final_layer_norm",
    ),
    "gpt2": ArchSpec("transformer.h", (("attn.c_attn",), ("attn.c_proj",), ("mlp.c_fc",), ("mlp.c_proj",)),
                     "transformer.ln_f"),
    "gpt_neox": ArchSpec(
        "gpt_neox.layers",
        (
            ("attention.query_key_value",),
            ("attention.dense",),
            ("mlp.dense_h_to_4h",),
            ("mlp.dense_4h_to_h",),
        ),
        "gpt_neox.final_layer_norm",
    ),
}


def arch_spec(model_type: str) -> ArchSpec:
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        raise OptqError(
            f"architecture {model_type!r} is not supported; supported model types: {', '.join(sorted(ARCHITECTURES))}"
        ) from None


def get_submodule(root: torch.nn.Module, path: str) -> torch.nn.Module:
    try:
        return root.get_submodule(path)
    except AttributeError:
        raise OptqError(f"the model has no module {path!r}: its layout does not match its model_type") from None


def decoder_layers(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    """(dotted prefix, ModuleList) of the model's decoder layers."""
    spec = arch_spec(model.config.model_type)
    return spec.layers, get_submodule(model, spec.layers)
