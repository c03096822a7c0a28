"""Skipping work nothing reads: replayed blocks, dead modules, module inputs of a float layer."""

from __future__ import annotations

import logging

import torch
from torch import nn

from ..models.moe import is_routed
from ..models.registry import get_submodule
from .activations import HiddenStates
from .records import _StopForward

log = logging.getLogger("optq")

# Skip work whose result nothing reads: replay finished attention/MLP blocks in later passes instead of
# recomputing them (_BlockReplay), skip the modules only a replaying block reads (_DeadModuleSkip) and the
# outputs of a group's modules that share one input (_GroupCollector). The result is bit-identical either way
# (tests/test_streaming.py and tests/test_architectures.py switch it off to check).
BLOCK_REPLAY = True


class _BlockReplay:
    """Replays a finished block of a layer (attention, MLP) instead of recomputing it.

    Once every linear of a block is quantized and the block's input is final, the block's output is its last
    linear applied to that linear's input, which the pass that collected its Hessian saw and kept. So the
    later passes over the layer (the next groups' and the output pass) skip the block's work (q/k/v and
    attention; gate/up), and give the same bits: the same module meets the same tensor. Whether the block's
    output really is that linear's output (not a copy, a sum, ...) is checked on the first window, which runs
    normally; a block that fails the check runs normally throughout."""

    def __init__(self, name: str, block: nn.Module, linear: nn.Module, kept: "HiddenStates"):
        self.name, self.block, self.linear, self.kept = name, block, linear, kept
        self.window = 0
        self.slot: int | None = None  # where the linear's output sits in the block's output tuple (-1: it is it)
        self.template = None
        self.state = "verify"
        self.outputs: set[int] = set()  # windows whose `kept` entry now holds the linear's output

    def install(self) -> None:
        original = type(self.block).forward.__get__(self.block)

        def forward(*args, **kwargs):
            if self.state == "on":
                j = self.window
                if j in self.outputs:  # a copy: the caller may write into what it gets
                    y = self.kept[j].clone()
                else:
                    y = self.linear(self.kept[j])
                    if y.shape == self.kept.shapes[j] and y.dtype == self.kept.dtype:
                        # a square linear (o_proj): its output replaces its input, so the later passes
                        # read it instead of recomputing it (2 of o_proj's 3 replays)
                        self.kept[j] = y if self.kept.spilled else y.clone()
                        self.outputs.add(j)
                if self.slot == -1:
                    return y
                return (*self.template[:self.slot], y, *self.template[self.slot + 1:])
            if self.state == "off":
                return original(*args, **kwargs)
            seen = []
            handle = self.linear.register_forward_hook(lambda m, a, out: seen.append(out))
            try:
                out = original(*args, **kwargs)
            finally:
                handle.remove()
            self.state = "off"
            if len(seen) == 1:
                if out is seen[0]:
                    self.slot, self.state = -1, "on"
                elif isinstance(out, tuple):
                    hits = [i for i, o in enumerate(out) if o is seen[0]]
                    others = [o for i, o in enumerate(out) if i not in hits]
                    if len(hits) == 1 and not any(isinstance(o, torch.Tensor) for o in others):
                        self.slot, self.template, self.state = hits[0], out, "on"
            if self.state == "off":
                log.debug("%s: its output is not its last linear's; recomputed in every pass", self.name)
            return out

        self.block.forward = forward

    def remove(self) -> None:
        self.block.__dict__.pop("forward", None)


def _tensors(obj) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [t for o in obj for t in _tensors(o)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in _tensors(o)]
    return []


class _DeadModuleSkip:
    """Skips the modules of a layer whose output only replayed blocks would read (the attention's input norm
    once attention is replayed: 2.8 ms of a 2048-token SmolLM2 window, 8 norms a layer over its passes).

    Which modules those are is watched, not assumed (a parallel-attention layer feeds one norm to attention
    and MLP): on the first window of a pass whose replays are all settled, a torch function mode and global
    module hooks record every use of every module's output; a module whose output nothing used (no op, no
    module call other than a replaying block, not the layer's result) and has its input's shape then returns
    a meta tensor for the rest of the pass. Anything that did read it would fail loudly, never compute with
    stale values."""

    def __init__(self, layer: nn.Module, replays: list["_BlockReplay"]):
        self.layer, self.replays = layer, list(replays)
        self.state = "wait" if BLOCK_REPLAY else "done"
        self.skipped: list[str] = []
        self._originals: list[nn.Module] = []

    def window(self):
        import contextlib

        if self.state == "wait" and self.replays and all(r.state in ("on", "off") for r in self.replays):
            if any(r.state == "on" for r in self.replays):
                return self._probe()
            self.state = "done"
        return contextlib.nullcontext()

    def _probe(self):
        import contextlib

        from torch.overrides import TorchFunctionMode

        replaying = {id(r.block) for r in self.replays if r.state == "on"}
        inside_replayed = {id(m) for r in self.replays if r.state == "on" for m in r.block.modules()}
        modules = [(name, m) for name, m in self.layer.named_modules()
                   if m is not self.layer and id(m) not in inside_replayed]
        outputs: dict[int, torch.Tensor] = {}  # id -> output of a watched module (held: ids stay unique)
        calls: dict[str, list[tuple[int, bool]]] = {}  # module -> (id of its output, shaped as its input)
        used: set[int] = set()

        def mark(obj) -> None:
            for t in _tensors(obj):
                if id(t) in outputs:
                    used.add(id(t))

        class Uses(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                mark(args)
                mark(kwargs or {})
                return func(*args, **(kwargs or {}))

        def pre_hook(module, args, kwargs):
            if id(module) not in replaying:
                mark(args)
                mark(kwargs)

        def post_hook(name):
            def hook(module, args, out):
                ok = isinstance(out, torch.Tensor) and bool(args) and isinstance(args[0], torch.Tensor) \
                    and args[0].shape == out.shape and args[0].dtype == out.dtype
                if isinstance(out, torch.Tensor):
                    outputs[id(out)] = out
                calls.setdefault(name, []).append((id(out), ok))

            return hook

        @contextlib.contextmanager
        def probe():
            # prepended, so they see a module's inputs before a collector's hook can stop the pass
            handles = [m.register_forward_pre_hook(pre_hook, with_kwargs=True, prepend=True) for _, m in modules]
            handles += [m.register_forward_hook(post_hook(name)) for name, m in modules]
            handles.append(self.layer.register_forward_hook(lambda m, a, out: mark(out)))
            finished = False
            try:
                with Uses():
                    yield
                finished = True
            except _StopForward:
                finished = True
                raise
            finally:
                for h in handles:
                    h.remove()
                if finished:
                    self._skip(sorted(name for name, seen in calls.items()
                                      if all(ok and t not in used for t, ok in seen)))
                outputs.clear()

        return probe()

    def _skip(self, names: list[str]) -> None:
        # outermost only: a dead module's own children are not called anyway
        names = [n for n in names if not any(n.startswith(o + ".") for o in names if o != n)]
        for name in names:
            module = get_submodule(self.layer, name)
            module.forward = lambda x, *args, **kwargs: torch.empty_like(x, device="meta")
            self._originals.append(module)
        self.skipped = names
        self.state = "done"
        if names:
            log.debug("skipped while their readers replay: %s", ", ".join(names))

    def remove(self) -> None:
        for module in self._originals:
            module.__dict__.pop("forward", None)
        self._originals.clear()


def _replay_candidates(groups: list) -> dict[int, tuple[str, str]]:
    """Group index -> (block, linear) where that group quantizes the block's last unquantized linear and is
    that linear alone in the block (o_proj of self_attn, down_proj of mlp)."""
    out = {}
    for gi, members in enumerate(groups):
        for loc, _, _ in members:
            block, _, leaf = loc.rpartition(".")
            if not block or is_routed(loc):  # an expert's input is its routed tokens, not the block's
                continue
            in_block = [m for m, _, _ in members if m.rpartition(".")[0] == block]
            later = [m for g in groups[gi + 1:] for m, _, _ in g if m.rpartition(".")[0] == block]
            if in_block == [loc] and not later:
                out[gi] = (block, loc)
    return out


def _module_inputs(layer: nn.Module, names: list[str], entry) -> dict[str, torch.Tensor]:
    """The input tensor of each named module of `layer` for one window (the forward stops once all are seen)."""
    found: dict[str, torch.Tensor] = {}

    def make_hook(name):
        def hook(module, args):
            found[name] = args[0]
            if len(found) == len(names):
                raise _StopForward

        return hook

    handles = [get_submodule(layer, n).register_forward_pre_hook(make_hook(n)) for n in names]
    hidden, args, kwargs = entry
    try:
        layer(hidden, *args, **kwargs)
    except _StopForward:
        pass
    finally:
        for h in handles:
            h.remove()
    return found
