"""Where each architecture keeps its decoder layers and in what order their linear modules are quantized.

A sequential group is a list of modules that read the same input (so they share one Hessian); groups are
quantized in order, so later groups see the outputs of already-quantized earlier ones (true-sequential).
In a group's names, `*` stands for every index of a ModuleList (a mixture-of-experts layer's experts, see
`models.moe`; none where the list is absent) and a trailing `?` marks a module some layers lack (the dense MLP
of a sparse model's dense layers): `layer_groups` resolves both for one layer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ..errors import OptqError
from .moe import EXPERT_LINEARS

_ATTENTION = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",))
_LLAMA_GROUPS = _ATTENTION + (("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))


def _moe_groups(model_type: str, shared: str | None = None) -> tuple[tuple[str, ...], ...]:
    """Attention, then the experts' gate/up (each expert's pair reads the tokens routed to it), then their
    down; a shared expert with them; the dense MLP of layers without experts, where a model has such layers."""
    gate, up, down = EXPERT_LINEARS[model_type]
    shared_in = (f"mlp.{shared}.gate_proj", f"mlp.{shared}.up_proj") if shared else ()
    shared_out = (f"mlp.{shared}.down_proj",) if shared else ()
    return _ATTENTION + (
        (f"mlp.experts.*.{gate}", f"mlp.experts.*.{up}", *shared_in, "mlp.gate_proj?", "mlp.up_proj?"),
        (f"mlp.experts.*.{down}", *shared_out, "mlp.down_proj?"),
    )


@dataclass(frozen=True)
class ArchSpec:
    layers: str  # dotted path from the CausalLM to the ModuleList of decoder layers
    groups: tuple[tuple[str, ...], ...]
    final_norm: str = "model.norm"  # what turns the last layer's output into the output projection's input
    # (module name infix, checkpoint name infix) after a layer's prefix: where published checkpoints name a
    # module otherwise than Transformers' module tree (Mixtral's `block_sparse_moe`, which Transformers 5
    # renames `mlp`); see CheckpointNames
    checkpoint_names: tuple[tuple[str, str], ...] = ()


ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": ArchSpec("model.layers", _LLAMA_GROUPS),
    "mistral": ArchSpec("model.layers", _LLAMA_GROUPS),
    "qwen2": ArchSpec("model.layers", _LLAMA_GROUPS),
    "qwen3": ArchSpec("model.layers", _LLAMA_GROUPS),
    "gemma": ArchSpec("model.layers", _LLAMA_GROUPS),
    "gemma2": ArchSpec("model.layers", _LLAMA_GROUPS),
    "gemma3_text": ArchSpec("model.layers", _LLAMA_GROUPS),
    "qwen2_moe": ArchSpec("model.layers", _moe_groups("qwen2_moe", shared="shared_expert")),
    "qwen3_moe": ArchSpec("model.layers", _moe_groups("qwen3_moe")),
    "olmoe": ArchSpec("model.layers", _moe_groups("olmoe")),
    "mixtral": ArchSpec("model.layers", _moe_groups("mixtral"),
                        checkpoint_names=((".mlp.", ".block_sparse_moe."),)),
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


class CheckpointNames:
    """Module tensor names <-> the names a published checkpoint of the architecture uses (ArchSpec's
    checkpoint_names, applied under the decoder layers' prefix): identity for most architectures."""

    def __init__(self, spec: ArchSpec | None):
        pairs = spec.checkpoint_names if spec is not None else ()
        prefix = re.escape(spec.layers) + r"\.\d+" if spec is not None else ""
        self._out = [(re.compile(f"^({prefix}){re.escape(a)}"), b) for a, b in pairs]
        self._in = [(re.compile(f"^({prefix}){re.escape(b)}"), a) for a, b in pairs]

    @staticmethod
    def _apply(rules, name: str) -> str:
        for pattern, infix in rules:
            name = pattern.sub(lambda m: m.group(1) + infix, name, count=1)
        return name

    def to_checkpoint(self, name: str) -> str:
        return self._apply(self._out, name)

    def to_model(self, name: str) -> str:
        return self._apply(self._in, name)


def checkpoint_names(model_type: str | None) -> CheckpointNames:
    return CheckpointNames(ARCHITECTURES.get(model_type or ""))


def layer_groups(groups: tuple[tuple[str, ...], ...], layer: torch.nn.Module) -> tuple[tuple[str, ...], ...]:
    """`groups` with `*` and `?` resolved for this layer (see module docs); groups left empty are dropped."""
    resolved = []
    for group in groups:
        names = []
        for name in group:
            if name.endswith("?"):
                if _has_submodule(layer, name[:-1]):
                    names.append(name[:-1])
            elif "*" in name:
                head, _, tail = name.partition(".*.")
                if _has_submodule(layer, head):
                    names += [f"{head}.{i}.{tail}" for i in range(len(layer.get_submodule(head)))]
            else:
                names.append(name)
        if names:
            resolved.append(tuple(names))
    return tuple(resolved)


def _has_submodule(root: torch.nn.Module, path: str) -> bool:
    try:
        root.get_submodule(path)
        return True
    except AttributeError:
        return False


def get_submodule(root: torch.nn.Module, path: str) -> torch.nn.Module:
    try:
        return root.get_submodule(path)
    except AttributeError:
        raise OptqError(f"the model has no module {path!r}: its layout does not match its model_type") from None


def decoder_layers(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    """(dotted prefix, ModuleList) of the model's decoder layers."""
    spec = arch_spec(model.config.model_type)
    return spec.layers, get_submodule(model, spec.layers)
