"""The layer-by-layer driver: capture the first decoder layer's inputs, then for each layer quantize its
linear modules group by group (true-sequential) and feed the quantized layer's outputs to the next layer."""

from __future__ import annotations

import contextlib
import copy
import logging
import re
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..config import QuantizeConfig
from ..core.gptq import Owned
from ..core.hessian import HessianAccumulator
from ..core.grid import QuantizedWeight
from ..distributed import Cluster, ShardedHessians, shard_plan, share_solution
from ..settings import HESSIAN_SHARDS
from ..errors import OptqError
from ..formats.gptq import pack_module
from ..models.moe import is_routed, unfuse_experts
from ..models.registry import arch_spec, get_submodule
from ..resume import RunState, fault_point
from ..runtime import native
from ..runtime.attention import native_causal_attention
from ..sysmem import MAPPED_TEMPORARIES, available_memory, map_large_allocations, return_freed_memory
from . import replay, solve
from .activations import LayerInputs, SpillFiles
from .capture import _CaptureStore, _layer_output, capture_layer_inputs
from .hessians import FloatReference, _GroupCollector
from .linears import _is_conv1d, linear_shape, linear_weight, set_linear_weight
from .plan import _module_plan, _output_projection, _untie
from .records import ModuleLog, QuantizedModel
from .replay import _BlockReplay, _DeadModuleSkip, _replay_candidates
from .solve import RTN_GUARD_MIN_WINDOWS, _guard, _solve_module, few_tokens

log = logging.getLogger("optq")

class _Layers:
    """Where the layers come from and where their checkpoint tensors go: the model in memory (its layers moved
    to the compute device in turn, the packed tensors collected), or a `streaming.StreamedModel` (each layer read
    from disk when its turn comes, its tensors written as soon as they exist, the layer freed after). Only the
    writer (rank 0 of a cluster) packs and keeps tensors."""

    def __init__(self, model: nn.Module, layers: nn.ModuleList, stream, device, compute_dtype, writer: bool):
        self.model, self.layers, self.stream, self.device, self.writer = model, layers, stream, device, writer
        self.model_dtype = next(model.parameters()).dtype
        self.compute_dtype = compute_dtype or self.model_dtype
        self.packed: dict[str, dict[str, torch.Tensor]] = {}

    def prepare_capture(self) -> None:
        if self.stream is not None:
            self.stream.prepare_capture(self.model, self.model_dtype)

    def after_capture(self) -> None:
        if self.stream is not None:
            self.stream.after_capture(self.model)

    def load(self, index: int, prefix: str) -> tuple[nn.Module, nn.Module]:
        """(layer, work): the layer whose weights become the quantized ones, and the one the calibration runs
        through (a copy in the compute dtype when that differs from the model's; else the layer itself)."""
        if self.stream is not None:
            layer = self.stream.load_layer(self.layers[index], prefix, self.compute_dtype, self.device)
            return layer, layer
        layer = self.layers[index].to(self.device)
        return layer, layer if self.compute_dtype == self.model_dtype else copy.deepcopy(layer).to(self.compute_dtype)

    def weight(self, module: nn.Module, full: str) -> torch.Tensor:
        """The float32 [out, in] weight to quantize: the source's own values."""
        if self.stream is None:
            return linear_weight(module).float()
        w = self.stream.source_weight(full)
        return w.T if _is_conv1d(module) else w

    def weight_to_solve(self, module: nn.Module, full: str):
        """The weight for the solver; a fresh tensor read from disk is handed over (Owned): one copy fewer."""
        w = self.weight(module, full)
        return Owned(w) if self.stream is not None else w

    def emit(self, full: str, qw: QuantizedWeight, mcfg: QuantizeConfig) -> None:
        if not self.writer:
            return
        tensors = pack_module(qw, mcfg.checkpoint_format)
        if self.stream is not None:
            self.stream.emit(full, tensors)
        else:
            self.packed[full] = tensors

    def finish(self, index: int, layer: nn.Module, prefix: str) -> None:
        if self.stream is not None:
            self.stream.finish_layer(layer, prefix)
        elif self.device.type != "cpu":
            self.layers[index] = layer.to("cpu")


@dataclass
class _Calibration:
    """The calibration stream through the layers: each window's hidden states at the current layer (and the
    float model's, for GPTAQ), this process's shards of windows, and the held-out windows of the RTN guard."""

    inputs: LayerInputs
    float_inputs: LayerInputs | None
    rounds: list[range]  # this process's windows, one range per Hessian shard
    held_round: range  # the held-out windows (empty without the guard)
    tokens: int  # the calibration tokens of every process (held-out ones not counted)
    reference_budget: int = 0  # bytes GPTAQ's float reference may keep (see hessians.FloatReference)

    @property
    def asymmetric(self) -> bool:
        return self.float_inputs is not None


def _capture(model, layers, layers_path, spec, windows, config, guard, cluster, hessian_shards, device,
             compute_dtype, max_activation_memory, spill_dir) -> _Calibration:
    """Run the windows up to the first decoder layer and keep its inputs (spilled to a file past the memory
    limit); GPTAQ's float stream starts as the same states."""
    asymmetric = config.gptaq
    # A layer's inputs, which its outputs replace window by window (and the float stream's too, for GPTAQ), and
    # the inputs of the blocks' last linears that the later passes replay (see _BlockReplay).
    first_plan, _ = _module_plan(layers[0], f"{layers_path}.0", spec.groups, config, [], 0, quiet=True)
    replay_widths = sum(linear_shape(get_submodule(layers[0], loc))[0]
                        for _, loc in _replay_candidates(first_plan).values()) if replay.BLOCK_REPLAY else 0
    calibration, held_out = solve.split_held_out(windows) if guard else (windows, [])
    shards = shard_plan(len(calibration), hessian_shards, *((cluster.rank, cluster.world) if cluster else ()))
    # this process's windows in its order, then the held-out ones, which every process runs: its guard
    # decisions are then the others' without a message
    windows = [calibration[i] for i in shards.windows] + held_out
    tokens = sum(w.shape[-1] for w in windows)

    planned = {"need": 0}

    def spill(width: int, item: int) -> bool:
        need = planned["need"] = tokens * item * (width * (2 if asymmetric else 1) + replay_widths)
        if max_activation_memory is None or need <= max_activation_memory:
            return False
        log.info("calibration activations (%.0f MB per layer) spill to a file in %s", need / 1e6, spill_dir)
        return True

    captured = capture_layer_inputs(model, layers, windows, device, compute_dtype,
                                    _CaptureStore([w.shape[-1] for w in windows], spill, SpillFiles(spill_dir)))
    # what the activation budget leaves (a quarter of the free memory without one) for GPTAQ's float reference
    free = available_memory()
    budget = (max_activation_memory - planned["need"] if max_activation_memory is not None
              else (free // 4 if free is not None else 0))
    inputs = LayerInputs(captured.hidden, captured.extras)
    float_inputs = LayerInputs(inputs.hidden.alias(), captured.extras) if asymmetric else None
    return _Calibration(inputs, float_inputs, shards.rounds, range(len(shards.windows), len(windows)),
                        sum(w.shape[-1] for w in calibration), max(0, budget) if asymmetric else 0)


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
    unfuse_experts(model)  # a model loaded by Transformers itself (quantize on load) keeps its experts fused
    layers = get_submodule(model, spec.layers)
    needs_data = config.method == "gptq"
    if needs_data and not windows:
        raise OptqError("GPTQ needs calibration data: give --dataset, or use --rtn")
    if windows and device.type == "cpu":
        # a window's float32 temporaries at the widest linear: past MAPPED_TEMPORARIES they would pile up in
        # glibc's heap at the peak; below it, mmapping them costs a page fault per 4 KB (8.5% of a SmolLM2 run)
        linears = [m for m in layers[0].modules() if isinstance(m, nn.Linear) or _is_conv1d(m)]
        widest = max((max(linear_shape(m)) for m in linears), default=0)
        if max(w.shape[-1] for w in windows) * widest * 4 >= MAPPED_TEMPORARIES:
            map_large_allocations()
    guard = needs_data and config.rtn_guard and len(windows) >= RTN_GUARD_MIN_WINDOWS
    if needs_data and device.type == "cpu":
        native.load()  # before the first window: its X^T X kernel sums every bf16 Hessian (core.hessian._native_gram)
    source = _Layers(model, layers, stream, device, compute_dtype, writer=cluster is None or cluster.rank == 0)
    source.prepare_capture()
    cal = None
    if needs_data:
        cal = _capture(model, layers, spec.layers, spec, windows, config, guard, cluster, hessian_shards, device,
                       source.compute_dtype, max_activation_memory, spill_dir)
    source.after_capture()

    run = _LayerRun(source, config, spec, cal, device, cluster, state, allow_rtn_fallback, on_module)
    bar = tqdm(range(len(layers)), desc="Quantizing layers", unit="layer", disable=not progress)
    # causal attention of the calibration windows on optq's native kernel (faster than torch's), where it applies
    attention = native_causal_attention(model) if needs_data and device.type == "cpu" else contextlib.nullcontext()
    with attention:
        for index in bar:
            run.layer(index)
    if config.lm_head:
        run.head(model)

    out_config = copy.deepcopy(config)
    out_config.dynamic = {**config.dynamic, **{f"-:^{re.escape(full)}$": {} for full in run.left_float}}
    return QuantizedModel(source.packed, out_config, run.rows, time.perf_counter() - started)


class _LayerRun:
    """One decoder layer after another: plan its modules, restore or solve them group by group (true-sequential:
    each group's Hessians come from the layer as the earlier groups left it), then run the calibration windows
    through the finished layer to make the next layer's inputs."""

    def __init__(self, source: _Layers, config: QuantizeConfig, spec, cal: _Calibration | None, device, cluster,
                 state: RunState | None, allow_rtn_fallback: bool, on_module):
        self.source, self.config, self.spec, self.cal, self.device = source, config, spec, cal, device
        self.cluster, self.state, self.allow_rtn_fallback, self.on_module = cluster, state, allow_rtn_fallback, on_module
        self.rows: list[ModuleLog] = []
        self.left_float: dict[str, str] = {}
        self._routing_logged: set[int] = set()

    def layer(self, index: int) -> None:
        prefix = f"{self.spec.layers}.{index}"
        layer, work = self.source.load(index, prefix)
        plan, skipped = _module_plan(layer, prefix, self.spec.groups, self.config, self.rows, index)
        self.left_float.update(skipped)
        reference = self._float_reference(plan, work) if self.cal is not None and self.cal.asymmetric else None
        saved = self.state.load(index) if self.state is not None else None
        if saved is not None:
            self._restore(saved, plan, layer, work)
            plan = []  # nothing left to solve in this layer
        replays: list[_BlockReplay] = []
        solved: dict[str, QuantizedWeight] = {}
        solved_rows: list[ModuleLog] = []
        candidates = _replay_candidates(plan) if self.cal is not None and replay.BLOCK_REPLAY else {}
        for gi, members in enumerate(plan):
            keep = {}
            if gi in candidates:
                block, loc = candidates[gi]
                keep[loc] = self.cal.inputs.hidden.empty_like(last_dim=linear_shape(get_submodule(work, loc))[0])
            accs, held = self._hessians(members, work, reference, replays, keep)
            self._solve_group(index, members, layer, work, accs, held, solved, solved_rows)
            if keep:  # the block is final from here on: later passes replay it
                block, loc = candidates[gi]
                replays.append(_BlockReplay(f"{prefix}.{block}", get_submodule(work, block), get_submodule(work, loc),
                                            keep[loc]))
                replays[-1].install()
            del keep
        if self.state is not None and saved is None:
            self.state.save(index, solved, solved_rows)
            fault_point(f"layer:{index}")
        del solved
        if self.cal is not None:
            self._propagate(index, work, reference, replays)
        for r in replays:
            r.remove()
            r.kept.recycle()
        del replays, reference
        self.source.finish(index, layer, prefix)
        del work, layer
        return_freed_memory()

    def _float_reference(self, plan, work: nn.Module) -> FloatReference:
        """GPTAQ's float layer (a copy of the unquantized one) for the dense modules of `plan`; what keeping its
        results costs per token: each later group's input width (a group's modules read one tensor) and the
        output's."""
        dense = [loc for members in plan for loc, _, _ in members if not is_routed(loc)]
        firsts = [next((loc for loc, _, _ in members if not is_routed(loc)), None) for members in plan[1:]]
        widths = [linear_shape(get_submodule(work, loc))[0] for loc in firsts if loc is not None]
        return FloatReference(copy.deepcopy(work), self.cal.float_inputs, dense,
                              [*widths, self.cal.inputs.hidden.shapes[0][-1]], self.cal.reference_budget)

    def _restore(self, saved, plan, layer: nn.Module, work: nn.Module) -> None:
        """A layer a previous run finished (resume): its saved weights instead of a solve."""
        weights, saved_rows = saved
        for members in plan:
            for loc, full, mcfg in members:
                deq = weights[full].dequantize()
                set_linear_weight(get_submodule(layer, loc), deq)
                if work is not layer:
                    set_linear_weight(get_submodule(work, loc), deq)
                self.source.emit(full, weights[full], mcfg)
        self.rows.extend(ModuleLog(**r) for r in saved_rows)

    def _hessians(self, members, work: nn.Module, reference, replays, keep):
        """Each module's Hessian accumulator over this process's windows (and over the held-out ones for the
        guard); a module the forward never reached (an MoE expert no token was routed to) gets an empty one."""
        if self.cal is None:
            return {}, {}
        cal, device = self.cal, self.device
        collector = _GroupCollector({loc: get_submodule(work, loc) for loc, _, _ in members}, device,
                                    asymmetric=cal.asymmetric, keep=keep)
        columns = {loc: linear_shape(get_submodule(work, loc))[0] for loc, _, _ in members}
        names = [loc for loc, _, _ in members]
        held = {}
        try:
            accs = collector.run(work, cal.inputs, cal.rounds,
                                 ShardedHessians(names, columns, device, cal.asymmetric, self.cluster),
                                 reference, replays)
            if len(cal.held_round):
                held = collector.run(work, cal.inputs, [cal.held_round],
                                     ShardedHessians(names, columns, device, cal.asymmetric),
                                     reference, replays)
        finally:
            collector.remove()
        return_freed_memory()  # the forward passes' temporaries, before the solves' d x d matrices
        return accs, held

    def _solve_group(self, index, members, layer, work, accs, held, solved, solved_rows) -> None:
        self._routing_statistics(index, members, accs)
        for position, (loc, full, mcfg) in enumerate(members):
            t0 = time.perf_counter()
            module = get_submodule(layer, loc)
            acc = accs.pop(loc, None)
            rounded = few_tokens(acc, self.cal.tokens) if self.cal is not None and is_routed(loc) else ""
            # with several processes, module i of the group is solved on rank i % world and shared
            owner = position % self.cluster.world if self.cluster is not None and self.cal is not None else None
            result = None
            if owner is None or owner == self.cluster.rank:
                w = self.source.weight_to_solve(module, full)
                if not torch.isfinite(w.tensor if isinstance(w, Owned) else w).all():
                    raise OptqError(f"layer {index} module {full}: the weight holds NaN or Inf")
                result = _solve_module(w, acc, mcfg, f"layer {index} module {full}", self.allow_rtn_fallback,
                                       not any(a is acc for a in accs.values()),
                                       reload=lambda: self.source.weight(module, full), rounded=rounded)
                del w
            if owner is not None:
                result = share_solution(self.cluster, owner, result, *linear_shape(module), mcfg.bits,
                                        mcfg.group_size)
            qw, loss, damp, note = result
            del result
            if loc in held and mcfg.method == "gptq" and not rounded:
                qw, note = _guard(self.source.weight(module, full), qw, held[loc], note)
            return_freed_memory()  # the solve's d x d temporaries: give them back before the next module
            deq = qw.dequantize()
            set_linear_weight(module, deq)
            if work is not layer:
                set_linear_weight(get_submodule(work, loc), deq)
            del deq
            self.source.emit(full, qw, mcfg)
            entry = ModuleLog(index, full, mcfg.bits, mcfg.group_size, loss, damp,
                              acc.tokens if acc is not None else 0, time.perf_counter() - t0, note)
            del acc
            self._log(entry)
            solved[full] = qw
            solved_rows.append(entry)
            fault_point(f"module:{index}")
        accs.clear()
        held.clear()

    def _routing_statistics(self, index: int, members, accs) -> None:
        """Tokens per expert (min / median / max) of a group of MoE experts' linears, in the log."""
        routed = {}
        for loc, _, _ in members:
            if is_routed(loc):
                acc = accs.get(loc)
                routed[loc.rpartition(".")[0]] = acc.tokens if acc is not None else 0
        if not routed or self.cal is None or index in self._routing_logged:
            return
        self._routing_logged.add(index)  # once a layer: its down projections see the same routing
        counts = sorted(routed.values())
        rounded = sum(1 for loc, _, _ in members if is_routed(loc) and few_tokens(accs.get(loc), self.cal.tokens))
        log.info("layer %d: %d experts, calibration tokens per expert min %d / median %d / max %d; %d of its "
                 "expert linears rounded to nearest (too few tokens)", index, len(counts), counts[0],
                 counts[len(counts) // 2], counts[-1], rounded)

    def _log(self, entry: ModuleLog) -> None:
        self.rows.append(entry)
        if self.on_module:
            self.on_module(entry)

    def _propagate(self, index: int, work: nn.Module, reference, replays) -> None:
        """Each window's outputs of the finished layer replace its inputs (one store); GPTAQ's float stream
        goes through the float layer."""
        inputs = self.cal.inputs
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
                    inputs.hidden[j] = out
                    del out
        finally:
            dead.remove()
        if reference is not None:
            with torch.no_grad():
                for j in range(len(self.cal.float_inputs)):
                    self.cal.float_inputs.hidden[j] = reference.output(j)

    def head(self, model: nn.Module) -> None:
        """The output projection (--lm-head), after the last layer: its Hessian from the final norm applied to
        the quantized stream (GPTAQ's cross term from the float stream)."""
        head_name, head_cfg = _output_projection(model, self.spec, self.config)
        last = len(self.source.layers)
        saved = self.state.load(last) if self.state is not None else None
        if head_cfg is None:
            self.left_float[head_name] = "dynamic: left in float"
            return
        head = get_submodule(model, head_name)
        if saved is not None:
            _untie(model, head)
            if self.source.stream is None:
                set_linear_weight(head, saved[0][head_name].dequantize())
            self.source.emit(head_name, saved[0][head_name], head_cfg)
            self.rows.extend(ModuleLog(**r) for r in saved[1])
            return
        t0 = time.perf_counter()
        acc = self._head_hessian(model, head_name, linear_shape(head)[0]) if self.cal is not None else None
        _untie(model, head)
        result = None
        if self.cluster is None or self.cluster.rank == 0:
            result = _solve_module(self.source.weight(head, head_name), acc, head_cfg, f"module {head_name}",
                                   self.allow_rtn_fallback)
        if self.cluster is not None:
            result = share_solution(self.cluster, 0, result, *linear_shape(head), head_cfg.bits, head_cfg.group_size)
        qw, loss, damp, note = result
        if self.source.stream is None:
            set_linear_weight(head, qw.dequantize())
        self.source.emit(head_name, qw, head_cfg)
        entry = ModuleLog(last, head_name, head_cfg.bits, head_cfg.group_size, loss, damp,
                          acc.tokens if acc is not None else 0, time.perf_counter() - t0, note)
        self._log(entry)
        if self.state is not None:
            self.state.save(last, {head_name: qw}, [entry])
            fault_point(f"layer:{last}")

    def _head_hessian(self, model: nn.Module, head_name: str, columns: int) -> HessianAccumulator:
        cal = self.cal
        norm = copy.deepcopy(get_submodule(model, self.spec.final_norm)).to(device=self.device,
                                                                             dtype=self.source.compute_dtype)
        hessians = ShardedHessians([head_name], {head_name: columns}, self.device, cal.asymmetric, self.cluster)
        part = {head_name: HessianAccumulator(columns, device=self.device, asymmetric=cal.asymmetric)}
        with torch.no_grad():
            for windows_of_round in cal.rounds:
                for j in windows_of_round:
                    part[head_name].add(norm(cal.inputs.hidden[j]),
                                        x_ref=norm(cal.float_inputs.hidden[j]) if cal.asymmetric else None)
                hessians.end_round(part)
        return hessians.finish()[head_name]
