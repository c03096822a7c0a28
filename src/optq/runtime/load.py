"""optq.load: a GPTQ checkpoint -> a Transformers model whose quantized linears are QuantLinear modules."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from ..errors import OptqError
from ..formats.gptq import QUANT_DTYPES as _QUANT_DTYPES
from ..formats.gptq import CheckpointInfo, expected_shapes, iter_tensors, open_checkpoint, quantized_module_names
from ..models.loading import parse_dtype
from ..models.moe import unfuse_experts
from ..sysmem import return_freed_memory
from .attention import use_decode_attention
from .quant_linear import QuantLinear



def _build_skeleton(info: CheckpointInfo, dtype: torch.dtype, trust_remote_code: bool) -> nn.Module:
    """The model with parameters on the meta device (nothing allocated) and real non-persistent buffers."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(info.config)
    model_type = cfg.pop("model_type", None)
    if not model_type:
        raise OptqError(f"{info.path}/config.json has no model_type")
    for k in ("dtype", "torch_dtype", "transformers_version"):
        cfg.pop(k, None)
    # Transformers validates config values with its own exception types (ValueError, TypeError, strict
    # dataclass errors, ...); for a file read from disk every one of them means "config.json is wrong".
    try:
        config = AutoConfig.for_model(str(model_type), **cfg)
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise OptqError(f"{info.path}/config.json cannot describe a {model_type!r} model: {first}") from None
    unfuse_experts(model)  # a checkpoint stores an MoE layer's experts one by one, as optq quantizes them
    return model


def _install_quant_linear(model: nn.Module, name: str, mcfg, has_bias: bool, checkpoint_format: str) -> QuantLinear:
    """Put a QuantLinear with placeholder (meta) tensors in place of the linear `name`."""
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise OptqError(f"the checkpoint quantizes {name}, which this model architecture does not have") from None
    if isinstance(module, nn.Linear):
        in_f, out_f = module.in_features, module.out_features
    elif type(module).__name__ == "Conv1D":
        in_f, out_f = module.weight.shape
    else:
        raise OptqError(f"{name} is a {type(module).__name__}, not a linear layer: cannot hold a quantized weight")
    with torch.device("meta"):  # placeholders only: the checkpoint's tensors replace every buffer
        ql = QuantLinear(in_f, out_f, mcfg.bits, mcfg.group_size, has_bias, checkpoint_format)
    parent_name, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, leaf, ql)
    return ql


def _replace_modules(model: nn.Module, info: CheckpointInfo) -> dict[str, QuantLinear]:
    quant = info.quant
    replaced = {}
    for name in quantized_module_names(info):
        mcfg = quant.for_module(name)
        if mcfg is None:
            raise OptqError(f"module {name} has quantized tensors but the config's dynamic rules leave it in float")
        replaced[name] = _install_quant_linear(model, name, mcfg, f"{name}.bias" in info.tensor_files,
                                               quant.checkpoint_format)
    return replaced


def replace_linears(model: nn.Module, quant) -> dict[str, QuantLinear]:
    """QuantLinear placeholders for every linear a GPTQ checkpoint of this architecture quantizes under `quant`
    (a QuantizeConfig): the decoder layers' linears the registry names, less those `dynamic` leaves in float,
    and the output projection when `quant.lm_head`. For loaders that fill the tensors by name (Transformers)."""
    from ..models.registry import arch_spec, layer_groups

    spec = arch_spec(model.config.model_type)
    layers = model.get_submodule(spec.layers)
    names = [f"{spec.layers}.{i}.{loc}" for i, layer in enumerate(layers)
             for group in layer_groups(spec.groups, layer) for loc in group]
    if quant.lm_head:
        head = model.get_output_embeddings()
        names.append(next(n for n, m in model.named_modules() if m is head))
    replaced = {}
    for name in names:
        mcfg = quant.for_module(name)
        if mcfg is not None:
            has_bias = getattr(model.get_submodule(name), "bias", None) is not None
            replaced[name] = _install_quant_linear(model, name, mcfg, has_bias, quant.checkpoint_format)
    return replaced


def install_packed(model: nn.Module, modules: dict[str, dict[str, torch.Tensor]], quant) -> dict[str, QuantLinear]:
    """Replace each named linear of an in-memory model by a QuantLinear holding its packed checkpoint tensors
    (`modules`: name -> qweight/qzeros/scales/g_idx, as a quantization run returns them); biases move over."""
    replaced = {}
    for name, tensors in modules.items():
        old = model.get_submodule(name)
        bias = getattr(old, "bias", None)
        ql = _install_quant_linear(model, name, quant.for_module(name), bias is not None, quant.checkpoint_format)
        for leaf, t in tensors.items():
            ql._buffers[leaf] = t
        if bias is not None:
            ql._buffers["bias"] = bias.detach().to(torch.float16)
        replaced[name] = ql
    return replaced


def finish_loading(model: nn.Module, qmods: dict[str, QuantLinear], dtype: torch.dtype, backend: str = "auto",
                   release_packed: bool = False) -> None:
    """After every tensor is in place: check the quantized ones, build the kernels, set up decoding."""
    for name, ql in qmods.items():
        for leaf in _QUANT_DTYPES:
            t = ql._buffers.get(leaf)
            if t is None or t.device.type == "meta":
                raise OptqError(f"the checkpoint has no tensor {name}.{leaf}: it is incomplete")
            _check_quant_tensor(name, leaf, t, ql)
        if ql.g_idx.numel() and (ql.g_idx.min() < 0 or ql.g_idx.max() >= ql.scales.shape[0]):
            raise OptqError(f"{name}.g_idx holds group indices outside [0, {ql.scales.shape[0]})")
        for leaf in ("scales", "bias"):
            if ql._buffers.get(leaf) is not None:
                ql._buffers[leaf] = ql._buffers[leaf].to(torch.float16)
    for name, ql in qmods.items():
        try:
            ql.prepare(backend, dtype, release_packed=release_packed)
        except ValueError as e:
            raise OptqError(f"{name}: {e}") from None
    canonical_lm_head_input(model)
    if device_is_cpu(model):
        use_decode_attention(model)
    return_freed_memory()


def _check_quant_tensor(name: str, leaf: str, t: torch.Tensor, ql: QuantLinear) -> None:
    if leaf == "bias":
        if tuple(t.shape) != (ql.out_features,):
            raise OptqError(f"{name}.bias has shape {tuple(t.shape)}, expected ({ql.out_features},)")
        return
    want = expected_shapes(ql.in_features, ql.out_features, ql.bits, ql.group_size)[leaf]
    if tuple(t.shape) != want:
        raise OptqError(
            f"{name}.{leaf} has shape {tuple(t.shape)}, expected {want} for {ql.bits}-bit group size "
            f"{ql.group_size}: the tensors disagree with quantization_config"
        )
    if t.dtype != _QUANT_DTYPES[leaf] and not (leaf == "scales" and t.is_floating_point()):
        raise OptqError(f"{name}.{leaf} has dtype {t.dtype}, expected {_QUANT_DTYPES[leaf]}")


def load(
    path: str | os.PathLike,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
    backend: str = "auto",
) -> nn.Module:
    """Load a GPTQ checkpoint folder; activations and unquantized weights in `dtype` ("auto": bfloat16 where
    the CPU has native bf16, else float32).

    backend: "auto" (the fastest that can run each module), "reference" (dequantize + matmul), "native"
    (optq's AVX-512 or AVX2 kernel, 2/3/4/8-bit), "int4" (PyTorch's CPU int4 kernel, 2/3/4-bit) or "int8" (PyTorch's CPU int8 kernel, 8-bit); a forced kernel is
    an error for modules it cannot run."""
    path = Path(path)
    torch_dtype = parse_dtype(dtype)
    info = open_checkpoint(path)
    model = _build_skeleton(info, torch_dtype, trust_remote_code)
    qmods = _replace_modules(model, info)
    loaded: set[str] = set()
    shapes = {name: (ql.in_features, ql.out_features) for name, ql in qmods.items()}
    for key, t in iter_tensors(info, shapes):
        module_name, _, leaf = key.rpartition(".")
        if module_name in qmods:
            ql = qmods[module_name]
            _check_quant_tensor(module_name, leaf, t, ql)
            if leaf == "g_idx":
                groups = ql.scales.shape[0]
                if t.numel() and (t.min() < 0 or t.max() >= groups):
                    raise OptqError(f"{key} holds group indices outside [0, {groups})")
            ql._buffers[leaf] = t.to(torch.float16) if leaf in ("scales", "bias") else t
            loaded.add(key)
            continue
        try:
            owner = model.get_submodule(module_name) if module_name else model
        except AttributeError:
            raise OptqError(f"tensor {key} does not belong to this model architecture") from None
        if leaf in owner._parameters:
            cur = owner._parameters[leaf]
            if tuple(cur.shape) != tuple(t.shape):
                raise OptqError(f"{key} has shape {tuple(t.shape)}, expected {tuple(cur.shape)}")
            # copy=True: a tensor still backed by the file's memory map would keep the whole map,
            # every page already read included, in the process's RSS (+0.5 GB on a 1B model).
            owner._parameters[leaf] = nn.Parameter(t.to(torch_dtype, copy=True), requires_grad=False)
        elif leaf in owner._buffers:
            owner._buffers[leaf] = t.to(torch_dtype if t.is_floating_point() else t.dtype, copy=True)
        else:
            raise OptqError(f"tensor {key} does not belong to this model architecture")
    absent = [f"{n}.{leaf}" for n in qmods for leaf in _QUANT_DTYPES if f"{n}.{leaf}" not in loaded]
    if absent:
        raise OptqError(f"the checkpoint has no tensor {absent[0]} ({len(absent)} missing): it is incomplete")
    if not isinstance(model.get_output_embeddings(), QuantLinear):
        model.tie_weights()  # a quantized lm_head has no float weight to tie (GPTQModel may leave the flag set)
    meta = [n for n, p in [*model.named_parameters(), *model.named_buffers()] if p.device.type == "meta"]
    if meta:
        raise OptqError(f"the checkpoint has no tensor for {meta[0]} ({len(meta)} missing): it is incomplete")
    model.eval()
    model.to(device)
    finish_loading(model, qmods, torch_dtype, backend, release_packed=True)
    return model


def device_is_cpu(model: nn.Module) -> bool:
    return all(p.device.type == "cpu" for p in model.parameters())


def canonical_lm_head_input(model: nn.Module) -> None:
    """Give the output projection its input with canonical strides. Generation's first step feeds it the last
    position of the prompt, hidden[:, -1:, :], a [1, 1, K] view whose batch stride is the prompt's; torch 2.13's
    bf16 linear, given such an input and a weight that does not require grad (as loaded here), runs a batched
    matmul that copies the whole weight: 0.64 s instead of 0.008 s for a 49152 x 2048 head (benchmarks saw it
    as slow prefill). A copy of the few activations avoids it."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(head, nn.Linear) and not getattr(head, "_optq_canonical_input", False):
        head.register_forward_pre_hook(_canonical_input)
        head._optq_canonical_input = True


def _canonical_input(module: nn.Module, args: tuple) -> tuple:
    x = args[0]
    if x.dim() > 2:
        canonical, step = [], 1
        for size in reversed(x.shape):
            canonical.append(step)
            step *= size
        if x.stride() != tuple(reversed(canonical)):
            return (x.clone(memory_format=torch.contiguous_format), *args[1:])
    return args
