"""The layer-by-layer driver: capture the first decoder layer's inputs, then for each layer quantize its
linear modules group by group (true-sequential) and feed the quantized layer's outputs to the next layer."""

from __future__ import annotations

import contextlib
import copy
import logging
import re
import time
from typing import Callable

import torch
from torch import nn

from ..config import QuantizeConfig
from ..core.gptq import HessianAccumulator, Owned
from ..core.grid import QuantizedWeight
from ..distributed import Cluster, ShardedHessians, shard_plan, share_solution
from ..settings import HESSIAN_SHARDS
from ..errors import OptqError
from ..formats.gptq import pack_module
from ..models.registry import arch_spec, get_submodule
from ..resume import RunState, fault_point
from ..runtime import native
from ..runtime.attention import native_causal_attention
from ..sysmem import MAPPED_TEMPORARIES, map_large_allocations, return_freed_memory
from . import replay, solve
from .activations import LayerInputs, SpillFiles
from .capture import _CaptureStore, _layer_output, capture_layer_inputs
from .hessians import _GroupCollector
from .linears import _is_conv1d, linear_shape, linear_weight, set_linear_weight
from .plan import _module_plan, _output_projection, _untie
from .records import ModuleLog, QuantizedModel
from .replay import _BlockReplay, _DeadModuleSkip, _replay_candidates
from .solve import RTN_GUARD_MIN_WINDOWS, _guard, _solve_module

log = logging.getLogger("optq")

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
                            for _, loc in _replay_candidates(first_plan).values()) if replay.BLOCK_REPLAY else 0
        calibration, held_out = solve.split_held_out(windows) if guard else (windows, [])
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
            candidates = _replay_candidates(plan) if needs_data and replay.BLOCK_REPLAY else {}
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
