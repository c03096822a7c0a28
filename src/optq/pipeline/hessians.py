"""Hessian collection for one sequential group of modules over the calibration windows."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..core.hessian import HessianAccumulator
from ..distributed import ShardedHessians
from ..models.moe import is_routed
from ..models.registry import get_submodule
from . import replay
from .activations import HiddenStates, LayerInputs
from .capture import _layer_output
from .linears import linear_shape
from .records import _StopForward
from .replay import _BlockReplay, _DeadModuleSkip, _module_inputs


class FloatReference:
    """GPTAQ's float layer on the float stream: each module's reference input (the float model's input to it)
    and the layer's float output, per window.

    Each sequential group needs its modules' reference inputs and the next layer needs the output; run for each
    separately, the float layer's attention is recomputed for every later group and the whole layer again for
    the output (~2.4x one forward for a Llama layer). With a memory budget for it, one forward per window keeps
    every later group's reference inputs and the output until asked for (same values: the same layer on the
    same inputs); past the budget, each request runs the layer as far as it needs."""

    def __init__(self, layer: nn.Module, inputs: LayerInputs, names: list[str], widths: list[int],
                 budget: int):
        self.layer, self.inputs, self.names = layer, inputs, names
        hidden = inputs.hidden
        tokens = sum(math.prod(shape[:-1]) for shape in hidden.shapes)
        item = torch.empty((), dtype=hidden.dtype).element_size()
        self.keep = bool(names) and not hidden.spilled and tokens * item * sum(widths) <= budget
        self._kept: dict[int, dict[str, torch.Tensor]] = {}

    def module_inputs(self, j: int, names: list[str]) -> dict[str, torch.Tensor]:
        if not self.keep:
            return _module_inputs(self.layer, names, self.inputs[j])
        if j not in self._kept:
            self._kept[j] = self._forward(j)
        kept = self._kept[j]
        return {n: kept.pop(n) for n in names if n in kept}  # a module the forward never reached has none

    def output(self, j: int) -> torch.Tensor:
        kept = self._kept.pop(j, None)
        if kept is not None:
            return kept["output"]
        hidden, args, kwargs = self.inputs[j]
        return _layer_output(self.layer(hidden, *args, **kwargs))

    def _forward(self, j: int) -> dict[str, torch.Tensor]:
        found: dict[str, torch.Tensor] = {}
        handles = [get_submodule(self.layer, n).register_forward_pre_hook(
            lambda module, args, n=n: found.__setitem__(n, args[0])) for n in self.names]
        hidden, args, kwargs = self.inputs[j]
        try:
            found["output"] = _layer_output(self.layer(hidden, *args, **kwargs))
        finally:
            for h in handles:
                h.remove()
        return found


class _GroupCollector:
    """Forward pre-hooks that accumulate Hessians for a group of modules; modules reading the same input
    tensor share one accumulator. The forward pass stops once every module of the group has been reached.

    When the first window shows every module of the group reading one tensor (q/k/v, gate/up), their outputs
    go unread in the pass: it stops at the last one's input, and none of them feeds another (their common
    input existed before any ran). From the next window on they return an uninitialised tensor of their
    output's shape instead of computing it: q and k of q/k/v, gate of gate/up, ~28% of a Llama layer's linear
    work over its passes. (A later window whose modules read different tensors is an error, as before.)"""

    def __init__(self, modules: dict[str, nn.Module], device, asymmetric: bool = False,
                 keep: dict[str, "HiddenStates"] | None = None):
        self.modules = modules
        self.device = device
        self.asymmetric = asymmetric
        self.keep = keep or {}  # module -> where its input of each window is kept (for a block replay)
        self.window = 0
        self.acc: dict[str, HessianAccumulator] = {}
        self._seen: set[str] = set()
        self._inputs: list[tuple[torch.Tensor, HessianAccumulator]] = []
        self._reference: dict[str, torch.Tensor] = {}
        self._handles = [m.register_forward_pre_hook(self._hook(name)) for name, m in modules.items()]
        self._stubbed: list[nn.Module] = []

    def _hook(self, name):
        def hook(module, args):
            x = args[0]
            if name in self.keep:
                self.keep[name][self.window] = x
            # an expert's float-model input would be other tokens (the float router routes differently): no
            # cross term, i.e. plain GPTQ for experts (see docs/design.md, "Mixture of experts")
            asymmetric = self.asymmetric and not is_routed(name)
            x_ref = self._reference[name] if asymmetric else None
            shared = next((a for t, a in self._inputs if t is x), None)
            if name not in self.acc:
                if shared is None:
                    self.acc[name] = HessianAccumulator(x.shape[-1], device=self.device, asymmetric=asymmetric)
                    self.acc[name].add(x, x_ref=x_ref)
                    self._inputs.append((x, self.acc[name]))
                else:
                    self.acc[name] = shared
            elif shared is not self.acc[name]:
                if any(a is self.acc[name] for _, a in self._inputs):
                    raise RuntimeError(f"module {name} shares a Hessian with a module that read other inputs")
                self.acc[name].add(x, x_ref=x_ref)
                self._inputs.append((x, self.acc[name]))
            self._seen.add(name)
            if len(self._seen) == len(self.modules):
                raise _StopForward

        return hook

    def run(self, layer: nn.Module, inputs: "LayerInputs", rounds: list[range], hessians: ShardedHessians,
            reference: FloatReference | None = None,
            replays: list["_BlockReplay"] = ()) -> dict[str, HessianAccumulator]:
        """Each module's Hessian accumulator over `inputs`, summed shard by shard: after each of `rounds` (the
        windows of one calibration shard) `hessians` takes the shard's sums. When asymmetric, `reference` (the
        float layer on the float model's hidden states) gives each module's reference inputs."""
        dense = [n for n in self.modules if not is_routed(n)]
        dead = _DeadModuleSkip(layer, replays)
        try:
            with torch.no_grad():
                for windows in rounds:
                    for j in windows:
                        hidden, args, kwargs = inputs[j]
                        self.window = j
                        for r in replays:
                            r.window = j
                        if self.asymmetric and dense:
                            self._reference = reference.module_inputs(j, dense)
                        self._seen.clear()
                        self._inputs.clear()
                        stopped = False
                        try:
                            with dead.window():
                                layer(hidden, *args, **kwargs)
                        except _StopForward:
                            stopped = True
                        del hidden
                        if (replay.BLOCK_REPLAY and stopped and not self._stubbed and len(self.modules) > 1
                                and len({id(a) for a in self.acc.values()}) == 1):
                            self._stub_outputs()
                    self._inputs.clear()
                    self._reference = {}
                    hessians.end_round(self.acc)
        finally:
            dead.remove()
            self._unstub()
        return hessians.finish()

    def _stub_outputs(self) -> None:
        for module in self.modules.values():
            out_features = linear_shape(module)[1]
            module.forward = lambda x, *args, _out=out_features, **kwargs: x.new_empty(*x.shape[:-1], _out)
            self._stubbed.append(module)

    def _unstub(self) -> None:
        for module in self._stubbed:
            module.__dict__.pop("forward", None)
        self._stubbed.clear()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._unstub()
