"""The layer-by-layer driver: capture the first decoder layer's inputs, then for each layer quantize its linear
modules group by group (true-sequential) and feed the quantized layer's outputs to the next layer.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from .config import QuantizeConfig
from .core.gptq import HessianAccumulator, NotPositiveDefiniteError, Owned, all_finite, gptq_solve
from .core.grid import QuantizedWeight, output_error, round_on_grid, rtn_quantize
from .distributed import HESSIAN_SHARDS, Cluster, ShardedHessians, shard_plan, share_solution
from .errors import OptqError
from .formats.gptq import module_packable, pack_module
from .models.registry import arch_spec, get_submodule
from .resume import RunState, fault_point
from .runtime import native
from .runtime.attention import native_causal_attention
from .sysmem import MAPPED_TEMPORARIES, map_large_allocations, return_freed_memory

log = logging.getLogger("optq")


class _StopForward(Exception):
    """Raised from a hook once everything needed from a forward pass has been seen."""


@dataclass
class ModuleLog:
    layer: int
    module: str
    bits: int
    group_size: int
    loss: float
    damp: float
    samples: int  # calibration tokens seen
    seconds: float
    note: str = ""

    FIELDS = ("layer", "module", "bits", "group_size", "loss", "damp", "samples", "seconds", "note")

    def row(self) -> list[Any]:
        return [self.layer, self.module, self.bits, self.group_size, f"{self.loss:.6g}", f"{self.damp:.4g}",
                self.samples, f"{self.seconds:.3f}", self.note]


RTN_FALLBACK = "rtn fallback"  # ModuleLog.note prefix of a module rounded to nearest instead of solved
RTN_GUARD = "rtn guard"  # ModuleLog.note prefix of a module whose GPTQ integers lost to RTN's on held-out windows
# The held-out guard keeps every RTN_GUARD_EVERY-th calibration window out of the Hessians (so that the windows
# it holds out span the calibration set's parts), when there are at least RTN_GUARD_MIN_WINDOWS of them.
RTN_GUARD_EVERY = 16
RTN_GUARD_MIN_WINDOWS = 16
# Skip work whose result nothing reads: replay finished attention/MLP blocks in later passes instead of
# recomputing them (_BlockReplay), skip the modules only a replaying block reads (_DeadModuleSkip) and the
# outputs of a group's modules that share one input (_GroupCollector). The result is bit-identical either way
# (tests/test_streaming.py and tests/test_architectures.py switch it off to check).
BLOCK_REPLAY = True


@dataclass
class QuantizedModel:
    """What the pipeline produced: the packed tensors of each quantized module, plus the record."""

    modules: dict[str, dict[str, torch.Tensor]]  # full module name -> qweight/qzeros/scales/g_idx
    config: QuantizeConfig  # with `dynamic` extended by modules left in float
    log: list[ModuleLog] = field(default_factory=list)
    seconds: float = 0.0
    already_complete: bool = False  # --resume found this run finished: nothing was done

    @property
    def rtn_guard(self) -> list[str]:
        """Modules that keep RTN's integers because GPTQ's had the larger output error on held-out windows."""
        return [r.module for r in self.log if r.note.startswith(RTN_GUARD)]

    @property
    def rtn_fallback(self) -> dict[str, str]:
        """Modules GPTQ could not solve that were rounded to nearest (--allow-rtn-fallback), with the reason."""
        return {r.module: r.note.removeprefix(RTN_FALLBACK + ": ") for r in self.log
                if r.note.startswith(RTN_FALLBACK)}


# ---- weights of Linear and GPT-2's Conv1D ---------------------------------------------------------------


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D"


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The weight as [out, in], whatever the module stores."""
    w = module.weight.data
    return w.T if _is_conv1d(module) else w


def set_linear_weight(module: nn.Module, w_out_in: torch.Tensor) -> None:
    w = w_out_in.T if _is_conv1d(module) else w_out_in
    module.weight.data.copy_(w.to(module.weight.dtype))


def linear_shape(module: nn.Module) -> tuple[int, int]:
    out_f, in_f = linear_weight(module).shape
    return in_f, out_f


# ---- moving captured inputs ------------------------------------------------------------------------------


def _to(obj, device, dtype=None):
    if isinstance(obj, torch.Tensor):
        if dtype is not None and obj.is_floating_point():
            return obj.to(device=device, dtype=dtype)
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device, dtype) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device, dtype) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device, dtype) for k, v in obj.items()}
    return obj


class _Catcher(nn.Module):
    """Stands in for decoder layer 0: records its inputs, then stops the forward pass."""

    def __init__(self, layer: nn.Module, store: list, device=None, dtype=None):
        super().__init__()
        self.layer = layer
        self.store = store
        self.device, self.dtype = device, dtype

    def __getattr__(self, name):
        # Models read attributes of their layers (e.g. Gemma's attention_type): answer for the real layer.
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["layer"], name)

    def forward(self, *args, **kwargs):
        if args:
            hidden, args = args[0], args[1:]
        else:
            hidden = kwargs.pop("hidden_states")
        kwargs["use_cache"] = False
        for cache_arg in ("past_key_values", "past_key_value", "layer_past"):
            if kwargs.get(cache_arg) is not None:
                raise OptqError("decoder layer received a KV cache during calibration; this model is not supported")
        entry = (hidden.detach(), args, kwargs)
        # converted window by window: all windows in the model's dtype at once would double the peak
        self.store.append(_to(entry, self.device, self.dtype) if self.device is not None else entry)
        raise _StopForward


class _CaptureStore:
    """Where the capture puts each window as it is caught: its hidden states straight into a `HiddenStates`
    (in memory, or spilled to a file as `spill(width, item_size)` decides on the first window, so the
    activations are never all in memory at once), its arguments deduplicated against the earlier windows'."""

    def __init__(self, lengths: list[int], spill, files: "SpillFiles"):
        self.lengths, self.spill, self.files = lengths, spill, files
        self.hidden: HiddenStates | None = None
        self.extras: list[tuple] = []
        self._seen: dict[tuple, list[torch.Tensor]] = {}

    def append(self, entry) -> None:
        hidden, args, kwargs = entry
        j = len(self.extras)
        if self.hidden is None:
            shapes = [(*hidden.shape[:-2], n, hidden.shape[-1]) for n in self.lengths]
            spill = self.spill(hidden.shape[-1], hidden.element_size())
            self.hidden = HiddenStates(shapes, hidden.dtype, hidden.device, self.files if spill else None)
        if tuple(hidden.shape) != self.hidden.shapes[j]:
            raise OptqError(f"calibration window {j}: decoder layer 0 received hidden states of shape "
                            f"{tuple(hidden.shape)}, expected {self.hidden.shapes[j]}")
        self.hidden[j] = hidden
        self.extras.append((_dedupe(args, self._seen), _dedupe(kwargs, self._seen)))


def _layer_output(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def capture_layer_inputs(model: nn.Module, layers: nn.ModuleList, windows: list[torch.Tensor], device,
                         dtype: torch.dtype | None = None, store=None):
    """(hidden_states, positional args, kwargs) of each calibration window at the input of decoder layer 0,
    moved to `device` and, if given, their floating point tensors converted to `dtype`: appended to `store`
    (a list unless given)."""
    store = [] if store is None else store
    first = layers[0]
    layers[0] = _Catcher(first, store, torch.device(device) if dtype is not None else None, dtype)
    moved = device != torch.device("cpu")
    try:
        if moved:  # everything but the decoder layers goes to the device for this one pass
            stash = [layers[i] for i in range(1, len(layers))]
            for i in range(1, len(layers)):
                layers[i] = nn.Identity()
            model.to(device)
        with torch.no_grad():
            for ids in windows:
                try:
                    model(input_ids=ids.to(device), use_cache=False)
                except _StopForward:
                    pass
    finally:
        layers[0] = first
        if moved:
            model.to("cpu")
            for i, layer in enumerate(stash, start=1):
                layers[i] = layer
    return store


# ---- calibration hidden states ----------------------------------------------------------------------------


def _dedupe(obj, seen: dict[tuple, list[torch.Tensor]]):
    """`obj` with each tensor replaced by an equal one already in `seen` (position embeddings, masks: the same
    for every window of one length), so such arguments are held once rather than once per window."""
    if isinstance(obj, torch.Tensor):
        tag = (obj.dtype, tuple(obj.shape), obj.device)
        for t in seen.setdefault(tag, []):
            if t is obj or torch.equal(t, obj):
                return t
        seen[tag].append(obj)
        return obj
    if isinstance(obj, tuple):
        return tuple(_dedupe(o, seen) for o in obj)
    if isinstance(obj, list):
        return [_dedupe(o, seen) for o in obj]
    if isinstance(obj, dict):
        return {k: _dedupe(v, seen) for k, v in obj.items()}
    return obj


class _SpillFile:
    """One spill file, written with pwrite and read with pread."""

    def __init__(self, fd: int, nbytes: int):
        import os
        import weakref

        self.fd, self.nbytes = fd, nbytes
        weakref.finalize(self, os.close, fd)

    def write(self, offset: int, t: torch.Tensor) -> None:
        import os

        data = memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy())
        while len(data):
            n = os.pwrite(self.fd, data, offset)
            data, offset = data[n:], offset + n

    def read(self, offset: int, out: torch.Tensor) -> None:
        """Fill `out` (a contiguous uint8 tensor) from `offset`."""
        import os

        data = memoryview(out.numpy())
        while len(data):
            n = os.preadv(self.fd, [data], offset)
            if n == 0:
                raise OptqError("a calibration activation spill file ended early: was its folder changed under "
                                "the run?")
            data, offset = data[n:], offset + n


class SpillFiles:
    """The files that spilled activations live in during one quantization run, each unlinked as soon as it is
    opened (nothing is left behind). Windows are written with pwrite and read back with pread into one
    buffer per store: reading through a memory map instead cost a page fault per 4 KiB read and an madvise
    per window to keep the pages out of the process, ~2 s per SmolLM2 layer at 128 x 2048 (see
    docs/design.md).

    A store that is done with (a replayed block's kept inputs) gives its file back, and the next store of the
    same size takes it: rewriting a file's cached pages is ~30x cheaper than writing fresh ones. A new file's
    blocks are allocated up front (fallocate), which turns a full disk into a clear error at once."""

    def __init__(self, folder):
        self.folder = folder
        self._free: dict[int, list[_SpillFile]] = {}

    def take(self, nbytes: int) -> _SpillFile:
        """A file of `nbytes` (a multiple of the page size)."""
        free = self._free.get(nbytes)
        if free:
            return free.pop()
        import os
        import tempfile

        fd, path = tempfile.mkstemp(prefix=".optq-activations-", dir=self.folder)
        try:
            _allocate(fd, nbytes, self.folder)
            return _SpillFile(fd, nbytes)
        except BaseException:
            os.close(fd)
            raise
        finally:
            os.unlink(path)

    def give_back(self, file: _SpillFile) -> None:
        self._free.setdefault(file.nbytes, []).append(file)


def _allocate(fd: int, nbytes: int, folder) -> None:
    """Give the file `nbytes` of disk blocks now (Linux fallocate), or at least that size (ftruncate: blocks
    allocated at first write) where the filesystem cannot."""
    import ctypes
    import errno
    import os

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fallocate = libc.fallocate
        fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    except (OSError, AttributeError):
        fallocate = None
    if fallocate is not None and fallocate(fd, 0, 0, nbytes) != 0:
        err = ctypes.get_errno()
        if err == errno.ENOSPC:
            raise OptqError(f"no room for {nbytes / 1e6:.0f} MB of spilled calibration activations in {folder}: "
                            "free disk space there, or give more memory to --max-activation-memory, or fewer "
                            "or shorter calibration windows (--nsamples, --seqlen)")
        fallocate = None  # not supported by this filesystem
    if fallocate is None:
        os.ftruncate(fd, nbytes)


class HiddenStates:
    """The hidden states of every calibration window at one point of the model, in memory or, when they
    would exceed --max-activation-memory, in a file of `spill`.

    A spilled window is read into one buffer of the store: what `store[j]` returns is valid until the next
    read of the same store (every reader uses a window and is done with it before reading the next)."""

    def __init__(self, shapes: list[tuple[int, ...]], dtype: torch.dtype, device, spill: SpillFiles | None = None):
        self.shapes, self.dtype, self.device, self.spill = shapes, dtype, device, spill
        self._tensors: list[torch.Tensor | None] = [None] * len(shapes)
        self._file = None
        self._buffer: torch.Tensor | None = None
        if spill is not None:
            import os

            self._item = torch.empty((), dtype=dtype).element_size()
            page = os.sysconf("SC_PAGE_SIZE")
            self._offsets, pos = [], 0
            for shape in shapes:
                self._offsets.append(pos)
                pos += -(-self._bytes(shape) // page) * page
            self._file = spill.take(max(pos, page))

    def _bytes(self, shape: tuple[int, ...]) -> int:
        import math

        return math.prod(shape) * self._item

    def copy(self) -> "HiddenStates":
        out = self.empty_like()
        for j in range(len(self)):
            out[j] = self[j]
        return out

    def empty_like(self, last_dim: int | None = None) -> "HiddenStates":
        """A store of the same windows (with another last dimension, if given), in memory or spilled alike."""
        shapes = self.shapes if last_dim is None else [(*s[:-1], last_dim) for s in self.shapes]
        return HiddenStates(shapes, self.dtype, self.device, self.spill)

    def alias(self) -> "HiddenStates":
        """Another store holding the same windows now, which writes to either leave the other alone: a
        shallow copy in memory, a full copy when spilled."""
        if self.spilled:
            return self.copy()
        out = HiddenStates(self.shapes, self.dtype, self.device)
        out._tensors = list(self._tensors)
        return out

    def recycle(self) -> None:
        """Done with: the file goes back to `spill` for the next store (memory is just dropped)."""
        if self._file is not None:
            self.spill.give_back(self._file)
        self._file = self._buffer = None
        self._tensors = [None] * len(self.shapes)
        self.shapes = []

    def __len__(self) -> int:
        return len(self.shapes)

    @property
    def spilled(self) -> bool:
        return self._file is not None

    def __getitem__(self, j: int) -> torch.Tensor:
        if self._file is None:
            return self._tensors[j]
        n = self._bytes(self.shapes[j])
        if self._buffer is None:
            self._buffer = torch.empty(max(self._bytes(s) for s in self.shapes), dtype=torch.uint8)
        self._file.read(self._offsets[j], self._buffer[:n])
        return self._buffer[:n].view(self.dtype).view(self.shapes[j]).to(self.device)

    def __setitem__(self, j: int, t: torch.Tensor) -> None:
        """Window j is now `t` (in memory the tensor itself is held: its owner must not write into it later)."""
        if self._file is None:
            self._tensors[j] = t
        else:
            if tuple(t.shape) != tuple(self.shapes[j]):
                raise ValueError(f"window {j}: shape {tuple(t.shape)}, expected {tuple(self.shapes[j])}")
            self._file.write(self._offsets[j], t.to(device="cpu", dtype=self.dtype))


class LayerInputs:
    """(hidden, positional args, kwargs) of each calibration window at the input of the current layer."""

    def __init__(self, hidden: HiddenStates, extras: list[tuple]):
        self.hidden, self.extras = hidden, extras

    def __len__(self) -> int:
        return len(self.extras)

    def __getitem__(self, j: int):
        return (self.hidden[j], *self.extras[j])

    def __iter__(self):
        for j, (args, kwargs) in enumerate(self.extras):
            yield self.hidden[j], args, kwargs

    def with_hidden(self, hidden: HiddenStates) -> "LayerInputs":
        return LayerInputs(hidden, self.extras)


# ---- Hessian collection for one group --------------------------------------------------------------------


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
            x_ref = self._reference.get(name) if self.asymmetric else None
            shared = next((a for t, a in self._inputs if t is x), None)
            if name not in self.acc:
                if shared is None:
                    self.acc[name] = HessianAccumulator(x.shape[-1], device=self.device, asymmetric=self.asymmetric)
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
            reference_layer: nn.Module | None = None, reference_inputs: "LayerInputs | None" = None,
            replays: list["_BlockReplay"] = ()) -> dict[str, HessianAccumulator]:
        """Each module's Hessian accumulator over `inputs`, summed shard by shard: after each of `rounds` (the
        windows of one calibration shard) `hessians` takes the shard's sums. When asymmetric,
        `reference_layer` (the float layer) run on `reference_inputs` (the float model's hidden states) gives
        each module's reference inputs."""
        dead = _DeadModuleSkip(layer, replays)
        try:
            with torch.no_grad():
                for windows in rounds:
                    for j in windows:
                        hidden, args, kwargs = inputs[j]
                        self.window = j
                        for r in replays:
                            r.window = j
                        if self.asymmetric:
                            self._reference = _module_inputs(reference_layer, list(self.modules),
                                                             reference_inputs[j])
                        self._seen.clear()
                        self._inputs.clear()
                        stopped = False
                        try:
                            with dead.window():
                                layer(hidden, *args, **kwargs)
                        except _StopForward:
                            stopped = True
                        del hidden
                        if (BLOCK_REPLAY and stopped and not self._stubbed and len(self.modules) > 1
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
            if not block:
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


# ---- the driver ------------------------------------------------------------------------------------------


def _module_plan(layer: nn.Module, prefix: str, spec_groups, config: QuantizeConfig, rows: list[ModuleLog], index: int,
                 quiet: bool = False):
    """Groups of (local name, full name, module config) to quantize; modules left in float are logged."""
    groups = spec_groups if config.true_sequential else (tuple(n for g in spec_groups for n in g),)
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


def _solve_one(
    w, h, mcfg: QuantizeConfig, cross_term: torch.Tensor | None = None,
) -> tuple[QuantizedWeight, float, float, str]:
    """(weight, loss, damp, log note); the note gives the scale refit's change of the output error."""
    spec = mcfg.grid()
    if mcfg.method == "rtn":
        return rtn_quantize(w.take() if isinstance(w, Owned) else w, spec, mcfg.group_size), 0.0, 0.0, ""
    res = gptq_solve(
        w, h, spec, group_size=mcfg.group_size, desc_act=mcfg.desc_act, static_groups=mcfg.static_groups,
        damp_percent=mcfg.damp_percent, cross_term=cross_term if mcfg.gptaq else None, gptaq_alpha=mcfg.gptaq_alpha,
        refit=mcfg.refit_scales,
    )
    note = ""
    if res.refit_error is not None and res.refit_error[0] > 0:
        before, after = res.refit_error
        note = f"scale refit {100 * (after - before) / before:+.2f}%"
    return res.weight, res.loss, res.damp_percent, note


def _solve_module(
    w, acc: HessianAccumulator | None, mcfg: QuantizeConfig, where: str, allow_rtn_fallback: bool,
    last_user: bool = True, reload=None,
) -> tuple[QuantizedWeight, float, float, str]:
    """(weight, loss, damp, log note) for one module. A module GPTQ cannot solve (no calibration tokens
    reached it, as happens to an MoE expert no token is routed to, or a Hessian no damping makes positive
    definite) is an error, or with `allow_rtn_fallback` is rounded to nearest and says so in its note.
    An `Owned` w is given up to the solver (one weight copy fewer); `reload` then gives it again for RTN."""
    if mcfg.method == "rtn" or acc is None:
        return _solve_one(w, None, mcfg)
    if acc.tokens == 0:
        reason = "no calibration tokens reached it"
    else:
        cross = acc.cross_term()
        # The last module reading this accumulator gives it up to the solver: one d x d copy fewer.
        h = Owned(acc.take_hessian() if last_user else acc.hessian())
        if not all_finite(h.tensor):
            raise OptqError(f"{where}: its inputs on the calibration data hold NaN or Inf; check the model's "
                            "weights, or calibrate in float32 (--compute-dtype float32) if float16 overflows")
        try:
            return _solve_one(w, h, mcfg, cross)
        except NotPositiveDefiniteError as e:
            reason = str(e)
    if not allow_rtn_fallback:
        raise OptqError(f"{where}: GPTQ cannot solve it: {reason}; pass --allow-rtn-fallback to round it to "
                        "nearest instead (recorded in the checkpoint's quantization_config.meta.rtn_fallback)")
    log.warning("%s: %s; rounded to nearest instead (--allow-rtn-fallback)", where, reason)
    if isinstance(w, Owned):
        w = w.take() if w.tensor is not None else reload()
    return rtn_quantize(w, mcfg.grid(), mcfg.group_size), 0.0, 0.0, f"{RTN_FALLBACK}: {reason}"


def split_held_out(windows: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(calibration windows, windows held out of the Hessians for the RTN guard): every RTN_GUARD_EVERY-th."""
    held = [w for i, w in enumerate(windows) if i % RTN_GUARD_EVERY == RTN_GUARD_EVERY - 1]
    return [w for i, w in enumerate(windows) if i % RTN_GUARD_EVERY != RTN_GUARD_EVERY - 1], held


def _guard(w: torch.Tensor, qw: QuantizedWeight, held: HessianAccumulator | None, note: str) -> tuple[QuantizedWeight, str]:
    """GPTQ's weight, or RTN's on the same grid where that has the smaller output error on the held-out
    windows (GPTQ fit the calibration windows' Hessian too closely: the module would be better rounded)."""
    if held is None or held.tokens == 0:
        return qw, note
    h = held.hessian()
    rtn = round_on_grid(w, qw)
    gptq_error, rtn_error = output_error(w, qw, h), output_error(w, rtn, h)
    if rtn_error >= gptq_error:
        return qw, note
    guard = f"{RTN_GUARD}: held-out output error GPTQ {gptq_error:.4g} > RTN {rtn_error:.4g}"
    return rtn, f"{guard}; {note}" if note else guard


def quantize_model(
    model: nn.Module,
    windows: list[torch.Tensor] | None,
    config: QuantizeConfig,
    device: str | torch.device = "cpu",
    compute_dtype: torch.dtype | None = None,
    progress: bool = True,
    on_module: Callable[[ModuleLog], None] | None = None,
    state: RunState | None = None,
    allow_rtn_fallback: bool = False,
    stream=None,
    max_activation_memory: int | None = None,
    spill_dir=None,
    cluster: Cluster | None = None,
    hessian_shards: int = HESSIAN_SHARDS,
) -> QuantizedModel:
    """Quantize `model` in place (its linear weights become the dequantized values) and return the packed
    tensors. `windows` are calibration token windows [1, L]; RTN needs none. With `state`, each finished
    layer is saved there, and layers it already holds are restored instead of solved (resume).

    With `stream` (a `streaming.StreamedModel`) the model is a skeleton on the meta device: each layer's
    weights are read from disk when its turn comes, its checkpoint tensors are written as soon as it is done,
    and it is freed; the returned `modules` is then empty. Calibration hidden states beyond
    `max_activation_memory` bytes live in a file in `spill_dir` instead of memory.

    The calibration windows are summed in `hessian_shards` shards (see `distributed`); with `cluster` (several
    processes under torchrun) each process computes its own shards' windows, the modules' solves are spread
    over the processes, and only rank 0 emits the checkpoint's tensors: the same bytes as one process."""
    from tqdm.auto import tqdm

    started = time.perf_counter()
    device = torch.device(device)
    spec = arch_spec(model.config.model_type)
    layers_path = spec.layers
    layers = get_submodule(model, layers_path)
    if windows and device.type == "cpu":
        # a window's float32 temporaries at the widest linear: past MAPPED_TEMPORARIES they would pile up in
        # glibc's heap at the peak; below it, mmapping them costs a page fault per 4 KB (8.5% of a SmolLM2 run)
        linears = [m for m in layers[0].modules() if isinstance(m, nn.Linear) or _is_conv1d(m)]
        widest = max((max(linear_shape(m)) for m in linears), default=0)
        if max(w.shape[-1] for w in windows) * widest * 4 >= MAPPED_TEMPORARIES:
            map_large_allocations()
    needs_data = config.method == "gptq"
    if needs_data and not windows:
        raise OptqError("GPTQ needs calibration data: give --dataset, or use --rtn")
    guard = needs_data and config.rtn_guard and len(windows) >= RTN_GUARD_MIN_WINDOWS
    if needs_data and device.type == "cpu":
        native.load()  # before the first window: its X^T X kernel sums every bf16 Hessian (core.gptq._native_gram)
    model_dtype = next(model.parameters()).dtype
    compute_dtype = compute_dtype or model_dtype
    packed: dict[str, dict[str, torch.Tensor]] = {}

    writer = cluster is None or cluster.rank == 0

    def emit(full: str, qw: QuantizedWeight, mcfg: QuantizeConfig) -> None:
        if not writer:
            return
        tensors = pack_module(qw, mcfg.checkpoint_format)
        if stream is not None:
            stream.emit(full, tensors)
        else:
            packed[full] = tensors

    def source_weight(module: nn.Module, full: str) -> torch.Tensor:
        """The float32 [out, in] weight to quantize: the source's own values."""
        if stream is None:
            return linear_weight(module).float()
        w = stream.source_weight(full)
        return w.T if _is_conv1d(module) else w

    if stream is not None:
        stream.prepare_capture(model, model_dtype)
    # GPTAQ follows the float model's hidden states alongside the quantized model's.
    asymmetric = needs_data and config.gptaq
    inputs = float_inputs = None
    if needs_data:
        # A layer's inputs, which its outputs replace window by window (and the float stream's too, for GPTAQ),
        # and the inputs of the blocks' last linears that the later passes replay (see _BlockReplay).
        first_plan, _ = _module_plan(layers[0], f"{layers_path}.0", spec.groups, config, [], 0, quiet=True)
        replay_widths = sum(linear_shape(get_submodule(layers[0], loc))[0]
                            for _, loc in _replay_candidates(first_plan).values()) if BLOCK_REPLAY else 0
        calibration, held_out = split_held_out(windows) if guard else (windows, [])
        shards = shard_plan(len(calibration), hessian_shards, *((cluster.rank, cluster.world) if cluster else ()))
        # this process's windows in its order, then the held-out ones, which every process runs: its guard
        # decisions are then the others' without a message
        windows = [calibration[i] for i in shards.windows] + held_out
        held_round = range(len(shards.windows), len(windows))
        tokens = sum(w.shape[-1] for w in windows)

        def spill(width: int, item: int) -> bool:
            need = tokens * item * (width * (2 if asymmetric else 1) + replay_widths)
            if max_activation_memory is None or need <= max_activation_memory:
                return False
            log.info("calibration activations (%.0f MB per layer) spill to a file in %s", need / 1e6, spill_dir)
            return True

        captured = capture_layer_inputs(model, layers, windows, device, compute_dtype,
                                        _CaptureStore([w.shape[-1] for w in windows], spill, SpillFiles(spill_dir)))
        if stream is not None:
            stream.after_capture(model)
        inputs = LayerInputs(captured.hidden, captured.extras)
        if asymmetric:
            float_inputs = LayerInputs(inputs.hidden.alias(), captured.extras)
        del captured
    elif stream is not None:
        stream.after_capture(model)

    rows: list[ModuleLog] = []
    left_float: dict[str, str] = {}
    bar = tqdm(range(len(layers)), desc="Quantizing layers", unit="layer", disable=not progress)
    # causal attention of the calibration windows on optq's native kernel (faster than torch's), where it applies
    attention = native_causal_attention(model) if needs_data and device.type == "cpu" else contextlib.nullcontext()
    with attention:
        for index in bar:
            prefix = f"{layers_path}.{index}"
            if stream is not None:
                layer = stream.load_layer(layers[index], prefix, compute_dtype, device)
                work = layer
            else:
                layer = layers[index].to(device)
                work = layer if compute_dtype == model_dtype else copy.deepcopy(layer).to(compute_dtype)
            plan, skipped = _module_plan(layer, prefix, spec.groups, config, rows, index)
            left_float.update(skipped)
            float_layer = copy.deepcopy(work) if asymmetric else None
            saved = state.load(index) if state is not None else None
            layer_weights: dict[str, QuantizedWeight] = {}
            layer_rows: list[ModuleLog] = []
            if saved is not None:
                weights, saved_rows = saved
                for members in plan:
                    for loc, full, mcfg in members:
                        deq = weights[full].dequantize()
                        set_linear_weight(get_submodule(layer, loc), deq)
                        if work is not layer:
                            set_linear_weight(get_submodule(work, loc), deq)
                        emit(full, weights[full], mcfg)
                rows.extend(ModuleLog(**r) for r in saved_rows)
                plan = []  # nothing left to solve in this layer
            candidates = _replay_candidates(plan) if needs_data and BLOCK_REPLAY else {}
            replays: list[_BlockReplay] = []
            for gi, members in enumerate(plan):
                accs: dict[str, HessianAccumulator] = {}
                held: dict[str, HessianAccumulator] = {}
                keep = {}
                if gi in candidates:
                    block, loc = candidates[gi]
                    in_f = linear_shape(get_submodule(work, loc))[0]
                    keep[loc] = inputs.hidden.empty_like(last_dim=in_f)
                if needs_data:
                    collector = _GroupCollector({loc: get_submodule(work, loc) for loc, _, _ in members}, device,
                                                asymmetric=asymmetric, keep=keep)
                    # a module the forward never reached (an MoE expert no token was routed to) gets an empty one
                    hessians = ShardedHessians([loc for loc, _, _ in members],
                                               {loc: linear_shape(get_submodule(work, loc))[0] for loc, _, _ in members},
                                               device, asymmetric, cluster)
                    try:
                        accs = collector.run(work, inputs, shards.rounds, hessians, float_layer, float_inputs, replays)
                        if guard:
                            held = collector.run(work, inputs, [held_round],
                                                 ShardedHessians(hessians.names, hessians.columns, device, asymmetric),
                                                 float_layer, float_inputs, replays)
                    finally:
                        collector.remove()
                    return_freed_memory()  # the forward passes' temporaries, before the solves' d x d matrices
                for position, (loc, full, mcfg) in enumerate(members):
                    t0 = time.perf_counter()
                    module = get_submodule(layer, loc)
                    acc = accs.pop(loc, None)
                    # with several processes, module i of the group is solved on rank i % world and shared
                    owner = position % cluster.world if cluster is not None and needs_data else None
                    solved = None
                    if owner is None or owner == cluster.rank:
                        w = source_weight(module, full)
                        if not torch.isfinite(w).all():
                            raise OptqError(f"layer {index} module {full}: the weight holds NaN or Inf")
                        if stream is not None:  # a fresh tensor read from disk: the solver may take it
                            w = Owned(w)
                        solved = _solve_module(
                            w, acc, mcfg, f"layer {index} module {full}", allow_rtn_fallback,
                            not any(a is acc for a in accs.values()), reload=lambda: source_weight(module, full))
                        del w
                    if owner is not None:
                        solved = share_solution(cluster, owner, solved, *linear_shape(module), mcfg.bits,
                                                mcfg.group_size)
                    qw, loss, damp, note = solved
                    del solved
                    if loc in held and mcfg.method == "gptq":
                        qw, note = _guard(source_weight(module, full), qw, held[loc], note)
                    return_freed_memory()  # the solve's d x d temporaries: give them back before the next module
                    deq = qw.dequantize()
                    set_linear_weight(module, deq)
                    if work is not layer:
                        set_linear_weight(get_submodule(work, loc), deq)
                    del deq
                    emit(full, qw, mcfg)
                    entry = ModuleLog(index, full, mcfg.bits, mcfg.group_size, loss, damp,
                                      acc.tokens if acc is not None else 0, time.perf_counter() - t0, note)
                    del acc
                    rows.append(entry)
                    layer_weights[full] = qw
                    layer_rows.append(entry)
                    if on_module:
                        on_module(entry)
                    fault_point(f"module:{index}")
                accs.clear()
                held.clear()
                if keep:  # the block is final from here on: later passes replay it
                    block, loc = candidates[gi]
                    replays.append(_BlockReplay(f"{prefix}.{block}", get_submodule(work, block),
                                                get_submodule(work, loc), keep[loc]))
                    replays[-1].install()
                del keep
            if state is not None and saved is None:
                state.save(index, layer_weights, layer_rows)
                fault_point(f"layer:{index}")
            del layer_weights
            if needs_data:
                dead = _DeadModuleSkip(work, replays)
                try:
                    with torch.no_grad():
                        for j, (hidden, args, kwargs) in enumerate(inputs):
                            for r in replays:
                                r.window = j
                            with dead.window():
                                out = _layer_output(work(hidden, *args, **kwargs))
                            if not torch.isfinite(out).all():
                                raise OptqError(f"layer {index}: its outputs hold NaN or Inf on the calibration data")
                            # the window's outputs replace its inputs, which nothing reads again: one store
                            inputs.hidden[j] = out
                            del out
                finally:
                    dead.remove()
                if asymmetric:
                    with torch.no_grad():
                        for j, (hidden, args, kwargs) in enumerate(float_inputs):
                            float_inputs.hidden[j] = _layer_output(float_layer(hidden, *args, **kwargs))
                    del float_layer
            for r in replays:
                r.remove()
                r.kept.recycle()
            del replays
            if stream is not None:
                stream.finish_layer(layer, prefix)
            elif device.type != "cpu":
                layers[index] = layer.to("cpu")
            del work, layer
            return_freed_memory()

    if config.lm_head:
        head_name, head_cfg = _output_projection(model, spec, config)
        saved = state.load(len(layers)) if state is not None else None
        if head_cfg is None:
            left_float[head_name] = "dynamic: left in float"
        elif saved is not None:
            head = get_submodule(model, head_name)
            _untie(model, head)
            if stream is None:
                set_linear_weight(head, saved[0][head_name].dequantize())
            emit(head_name, saved[0][head_name], head_cfg)
            rows.extend(ModuleLog(**r) for r in saved[1])
        else:
            t0 = time.perf_counter()
            head = get_submodule(model, head_name)
            acc = None
            if needs_data:
                norm = copy.deepcopy(get_submodule(model, spec.final_norm)).to(device=device, dtype=compute_dtype)
                hessians = ShardedHessians([head_name], {head_name: linear_shape(head)[0]}, device, asymmetric,
                                           cluster)
                part = {head_name: HessianAccumulator(linear_shape(head)[0], device=device, asymmetric=asymmetric)}
                with torch.no_grad():
                    for windows_of_round in shards.rounds:
                        for j in windows_of_round:
                            part[head_name].add(norm(inputs.hidden[j]),
                                                x_ref=norm(float_inputs.hidden[j]) if asymmetric else None)
                        hessians.end_round(part)
                acc = hessians.finish()[head_name]
            _untie(model, head)
            solved = None
            if cluster is None or cluster.rank == 0:
                solved = _solve_module(source_weight(head, head_name), acc, head_cfg, f"module {head_name}",
                                       allow_rtn_fallback)
            if cluster is not None:
                solved = share_solution(cluster, 0, solved, *linear_shape(head), head_cfg.bits, head_cfg.group_size)
            qw, loss, damp, note = solved
            if stream is None:
                set_linear_weight(head, qw.dequantize())
            emit(head_name, qw, head_cfg)
            entry = ModuleLog(len(layers), head_name, head_cfg.bits, head_cfg.group_size, loss, damp,
                              acc.tokens if acc is not None else 0, time.perf_counter() - t0, note)
            rows.append(entry)
            if on_module:
                on_module(entry)
            if state is not None:
                state.save(len(layers), {head_name: qw}, [entry])
                fault_point(f"layer:{len(layers)}")

    dynamic = dict(config.dynamic)
    for full in left_float:
        dynamic[f"-:^{re.escape(full)}$"] = {}
    out_config = copy.deepcopy(config)
    out_config.dynamic = dynamic
    return QuantizedModel(packed, out_config, rows, time.perf_counter() - started)
