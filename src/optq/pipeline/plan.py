"""Which modules of a layer are quantized, in which sequential groups, with which config."""

from __future__ import annotations

import logging

from torch import nn

from ..config import QuantizeConfig
from ..errors import OptqError
from ..formats.gptq import module_packable
from ..models.registry import arch_spec, get_submodule, layer_groups
from .linears import linear_shape
from .records import ModuleLog

log = logging.getLogger("optq")

def _module_plan(layer: nn.Module, prefix: str, spec_groups, config: QuantizeConfig, rows: list[ModuleLog], index: int,
                 quiet: bool = False):
    """Groups of (local name, full name, module config) to quantize; modules left in float are logged."""
    groups = layer_groups(spec_groups, layer)
    groups = groups if config.true_sequential else (tuple(n for g in groups for n in g),)
    plan = []
    skipped = {}
    for group in groups:
        members = []
        for local in group:
            full = f"{prefix}.{local}"
            module = get_submodule(layer, local)
            mcfg = config.for_module(full)
            if mcfg is None:
                rows.append(ModuleLog(index, full, 16, 0, 0.0, 0.0, 0, 0.0, "dynamic: left in float"))
                continue
            in_f, out_f = linear_shape(module)
            why = module_packable(in_f, out_f, mcfg.bits)
            if why:
                skipped[full] = why
                rows.append(ModuleLog(index, full, 16, 0, 0.0, 0.0, 0, 0.0, f"left in float: {why}"))
                if not quiet:
                    log.warning("%s left in float: %s", full, why)
                continue
            members.append((local, full, mcfg))
        if members:
            plan.append(members)
    return plan, skipped


def planned_modules(model: nn.Module, config: QuantizeConfig) -> dict[str, tuple[int, int, QuantizeConfig]]:
    """Every module the pipeline will quantize: full name -> (in_features, out_features, its config). Works on
    a skeleton on the meta device, so a streamed run can lay out its checkpoint before the first layer."""
    spec = arch_spec(model.config.model_type)
    layers = get_submodule(model, spec.layers)
    out: dict[str, tuple[int, int, QuantizeConfig]] = {}
    for index in range(len(layers)):
        plan, _ = _module_plan(layers[index], f"{spec.layers}.{index}", spec.groups, config, [], index, quiet=True)
        for members in plan:
            for loc, full, mcfg in members:
                out[full] = (*linear_shape(get_submodule(layers[index], loc)), mcfg)
    if config.lm_head:
        name, mcfg = _output_projection(model, spec, config)
        if mcfg is not None:
            out[name] = (*linear_shape(get_submodule(model, name)), mcfg)
    return out


def _output_projection(model: nn.Module, spec, config: QuantizeConfig) -> tuple[str, QuantizeConfig | None]:
    """(name, config) of the output projection (lm_head) that config.lm_head asks to quantize."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    name = next((n for n, m in model.named_modules() if m is head), None) if head is not None else None
    if name is None or not isinstance(head, nn.Linear):
        raise OptqError("lm_head quantization: this model has no linear output projection; drop --lm-head")
    try:
        get_submodule(model, spec.final_norm)
    except (AttributeError, OptqError):
        raise OptqError(f"lm_head quantization: {spec.final_norm} (the final norm) is missing from this model "
                        "(e.g. OPT with project_out); drop --lm-head") from None
    mcfg = config.for_module(name)
    in_f, out_f = linear_shape(head)
    why = module_packable(in_f, out_f, mcfg.bits) if mcfg is not None else None
    if why:
        raise OptqError(f"lm_head quantization: {name} cannot be packed ({why}); drop --lm-head")
    return name, mcfg


def _untie(model: nn.Module, head: nn.Module) -> None:
    """Give the output projection its own weight: quantizing it must not change the input embeddings it may
    share storage with; the checkpoint then stores both and says they are not tied."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is not None and getattr(emb, "weight", None) is not None and \
            emb.weight.data_ptr() == head.weight.data_ptr():
        head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)
    if getattr(model.config, "tie_word_embeddings", False):
        model.config.tie_word_embeddings = False
