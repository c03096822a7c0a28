"""Mixture-of-experts layers as one module per expert.

Transformers 5 keeps a layer's experts fused in 3-D parameters (`gate_up_proj` [E, 2I, H], `down_proj`
[E, H, I]) behind one forward(hidden_states, top_k_index, top_k_weights). GPTQ needs each expert's linears as
modules of their own (a Hessian from exactly the tokens routed to that expert; one packed tensor set per
expert, named as published GPTQ MoE checkpoints name them), so `unfuse_experts` replaces every such module by
an `ExpertList`: an nn.ModuleList of `ExpertMLP`s whose forward routes and weights exactly as the fused one.
The router (the block's `gate`) is untouched and stays in float.

Architectures: Qwen2-MoE, Qwen3-MoE, OLMoE (gate_proj / up_proj / down_proj) and Mixtral (w1 / w3 / w2), which
share the fused layout above. gpt-oss is left out: its experts interleave gate and up columns, add biases and
clamp inside a custom activation, and its published checkpoints are MXFP4, not GPTQ.
"""

from __future__ import annotations

import re

import torch
from torch import nn

# model_type -> the names of one expert's (gate, up, down) linears, as the published checkpoints have them
EXPERT_LINEARS = {
    "qwen2_moe": ("gate_proj", "up_proj", "down_proj"),
    "qwen3_moe": ("gate_proj", "up_proj", "down_proj"),
    "olmoe": ("gate_proj", "up_proj", "down_proj"),
    "mixtral": ("w1", "w3", "w2"),
}


def is_routed(name: str) -> bool:
    """Whether a module name is an expert's linear (`...experts.E.<linear>`): it sees only the tokens routed
    to its expert, and the float model routes other tokens there than the quantized one."""
    return re.search(r"(^|\.)experts\.\d+\.[^.]+$", name) is not None


class ExpertMLP(nn.Module):
    """One expert: down(act(gate(x)) * up(x))."""

    def __init__(self, names: tuple[str, str, str], hidden: int, intermediate: int, act_fn: nn.Module,
                 dtype: torch.dtype, device):
        super().__init__()
        self.names = names
        self.act_fn = act_fn
        for name, (i, o) in zip(names, ((hidden, intermediate), (hidden, intermediate), (intermediate, hidden))):
            setattr(self, name, nn.Linear(i, o, bias=False, dtype=dtype, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up, down = (getattr(self, n) for n in self.names)
        return down(self.act_fn(gate(x)) * up(x))


class ExpertList(nn.ModuleList):
    """A layer's experts, one module each, computing what the fused Transformers module does: each expert on
    the tokens routed to it, its output times the token's routing weight, summed per token."""

    def __init__(self, experts: list[ExpertMLP]):
        super().__init__(experts)
        self.num_experts = len(experts)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        with torch.no_grad():
            # index num_experts marks a masked slot in some routers: it selects no expert
            mask = nn.functional.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)
            hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
        for (e,) in hit.tolist():
            if e == self.num_experts:
                continue
            slot, token = torch.where(mask[e])
            y = self[e](hidden_states[token]) * top_k_weights[token, slot, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out


def _is_fused_experts(module: nn.Module) -> bool:
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    return (isinstance(gate_up, torch.Tensor) and isinstance(down, torch.Tensor) and gate_up.dim() == 3
            and down.dim() == 3 and hasattr(module, "act_fn") and not isinstance(module, ExpertList))


def unfuse_experts(model: nn.Module) -> int:
    """Replace each fused experts module of `model` by an ExpertList holding the same weights (on the meta
    device too, for a skeleton). Returns how many layers changed; 0 for dense models."""
    names = EXPERT_LINEARS.get(getattr(model.config, "model_type", ""))
    if names is None:
        return 0
    fused = [(n, m) for n, m in model.named_modules() if _is_fused_experts(m)]
    count = len(fused)
    while fused:  # popped so that each fused module is freed as soon as it is replaced
        path, module = fused.pop(0)
        experts, (_, two_i, hidden) = module.gate_up_proj.shape[0], module.gate_up_proj.shape
        inter = two_i // 2
        if tuple(module.down_proj.shape) != (experts, hidden, inter):
            raise ValueError(f"{path}: down_proj has shape {tuple(module.down_proj.shape)}, expected "
                             f"{(experts, hidden, inter)}")
        gate_up, down = module.gate_up_proj.data, module.down_proj.data
        replacement = ExpertList([ExpertMLP(names, hidden, inter, module.act_fn, gate_up.dtype, gate_up.device)
                                  for _ in range(experts)])
        if gate_up.device.type != "meta":
            with torch.no_grad():
                for e, expert in enumerate(replacement):
                    getattr(expert, names[0]).weight.copy_(gate_up[e, :inter])
                    getattr(expert, names[1]).weight.copy_(gate_up[e, inter:])
                    getattr(expert, names[2]).weight.copy_(down[e])
        parent, _, attr = path.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, replacement)
        del module, gate_up, down
    return count
