"""The Hugging Face "gptq" checkpoint (../shared/spec/gptq-checkpoint.md): tensors of one quantized module,
sharded safetensors, config files, atomic write, and validated reading.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import shutil
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..config import QuantizeConfig
from ..core.grid import QuantizedWeight
from ..core.packing import pack, pack_cols, packable, unpack, unpack_cols
from ..errors import OptqError
from ..models.registry import CheckpointNames, checkpoint_names
from . import compressed_tensors
from .safetensors_reader import SafetensorsFiles
from .safetensors_writer import INDEX_FILE, SINGLE_FILE, TensorSpec, write_tensors

QUANT_TENSORS = ("qweight", "qzeros", "scales", "g_idx")
QUANT_DTYPES = {"qweight": torch.int32, "qzeros": torch.int32, "scales": torch.float16, "g_idx": torch.int32}
QUANTIZE_CONFIG_FILE = "quantize_config.json"
LOG_FILE = "quant_log.csv"


# ---- one module ------------------------------------------------------------------------------------------


def module_packable(in_features: int, out_features: int, bits: int) -> str | None:
    """None if the module fits the int32 layout, else why not (qweight packs `in`, qzeros packs `out`)."""
    for what, n in (("in_features", in_features), ("out_features", out_features)):
        if not packable(n, bits):
            step = 32 // bits if 32 % bits == 0 else 32
            return f"{what}={n} is not a multiple of {step}, which {bits}-bit int32 packing needs"
    return None


def pack_module(qw: QuantizedWeight, checkpoint_format: str) -> dict[str, torch.Tensor]:
    """QuantizedWeight -> the checkpoint tensors of one module (without bias)."""
    zeros = qw.zeros.round().to(torch.int64)
    if checkpoint_format == "gptq":
        if zeros.numel() and zeros.min() < 1:
            raise OptqError("a zero point of 0 cannot be stored in the v1 'gptq' format: use gptq_v2")
        zeros = zeros - 1
    return {
        "qweight": pack(qw.qweight.T.contiguous(), qw.bits),
        "qzeros": pack_cols(zeros, qw.bits),
        "scales": qw.scales.to(torch.float16).contiguous(),
        "g_idx": qw.g_idx.to(torch.int32).contiguous(),
    }


def unpack_module(
    tensors: dict[str, torch.Tensor], bits: int, in_features: int, out_features: int, checkpoint_format: str
) -> QuantizedWeight:
    """The checkpoint tensors of one module -> QuantizedWeight (codes [out, in], true zero points)."""
    q = unpack(tensors["qweight"], bits, in_features).T.contiguous()
    zeros = unpack_cols(tensors["qzeros"], bits, out_features).to(torch.float32)
    if checkpoint_format == "gptq":
        zeros = zeros + 1
    return QuantizedWeight(
        qweight=q,
        scales=tensors["scales"].to(torch.float32),
        zeros=zeros,
        g_idx=tensors["g_idx"].to(torch.int32),
        bits=bits,
        group_size=-1,
    )


def expected_shapes(in_features: int, out_features: int, bits: int, group_size: int) -> dict[str, tuple[int, ...]]:
    groups = 1 if group_size == -1 else math.ceil(in_features / group_size)
    return {
        "qweight": (in_features * bits // 32, out_features),
        "qzeros": (groups, out_features * bits // 32),
        "scales": (groups, out_features),
        "g_idx": (in_features,),
    }


# ---- writing ---------------------------------------------------------------------------------------------


def parse_size(size: str | int) -> int:
    """'4GB', '500MB', '10KB' or a byte count -> bytes (decimal units, as Transformers uses)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(size), re.IGNORECASE)
    if not m:
        raise OptqError(f"size {size!r} is not understood: write it like 4GB, 500MB or a number of bytes")
    unit = (m.group(2) or "B").upper()
    mult = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    return int(float(m.group(1)) * mult[unit])


SAFETENSORS_METADATA = {"format": "pt"}


def write_safetensors(folder: Path, tensors: dict[str, torch.Tensor], max_shard_size: int) -> list[str]:
    """Write `tensors` (in their given order) as one file or shards plus an index; returns the file names."""
    return write_tensors(folder, tensors, max_shard_size, SAFETENSORS_METADATA)


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """safetensors' save_file, with its I/O failures (reported as SafetensorError text) raised as OSError."""
    try:
        save_file(tensors, str(path), metadata=metadata)
    except Exception as e:
        code = re.search(r"os error (\d+)", str(e))
        if code is None:
            raise
        raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) from None


def write_failure(dest: Path, e: OSError) -> str:
    """One line for an OS error while writing `dest`: what failed and what to do."""
    what = e.strerror or str(e)
    hint = {errno.ENOSPC: "free disk space", errno.EDQUOT: "free space in your disk quota",
            errno.EFBIG: "raise the file size limit (ulimit -f)", errno.EACCES: "fix the folder's permissions",
            errno.EPERM: "fix the folder's permissions", errno.EROFS: "write to a writable file system"}
    return (f"writing {dest} failed: {what} ({e.filename or dest}); nothing was left at {dest}: "
            f"{hint.get(e.errno, 'fix the cause')} and run again (--resume keeps the layers already quantized)")


class AtomicFolder:
    """Build a folder under a temporary name next to its destination and rename it into place at the end.

    A reader never sees a half-written checkpoint at `dest`: it appears only when complete.
    """

    def __init__(self, dest: str | os.PathLike, overwrite: bool = False):
        self.dest = Path(dest)
        self.overwrite = overwrite
        if self.dest.exists() and not overwrite:
            raise OptqError(f"output folder {self.dest} already exists: choose another path or pass --overwrite")
        parent = self.dest.parent
        if not parent.exists():
            raise OptqError(f"the parent folder of {self.dest} does not exist: create it first")
        if not os.access(parent, os.W_OK):
            raise OptqError(f"no permission to write in {parent}: choose another output folder or fix its "
                            "permissions")
        self.tmp = parent / f".{self.dest.name}.optq-tmp-{uuid.uuid4().hex[:8]}"

    def __enter__(self) -> Path:
        try:
            self.tmp.mkdir()
        except OSError as e:
            raise OptqError(write_failure(self.dest, e)) from None
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            if isinstance(exc, OSError):  # disk full, file size limit, permissions changed under us
                if exc.filename and Path(exc.filename).parent == self.tmp:  # name the file as the user knows it
                    exc = OSError(exc.errno, exc.strerror, str(self.dest / Path(exc.filename).name))
                raise OptqError(write_failure(self.dest, exc)) from None
            return False
        # safetensors creates files readable by the owner only; a checkpoint is meant to be shared.
        umask = os.umask(0)
        os.umask(umask)
        self.tmp.chmod(0o777 & ~umask)
        for f in self.tmp.iterdir():
            f.chmod(0o666 & ~umask)
        if self.dest.exists():
            old = self.dest.parent / f".{self.dest.name}.optq-old-{uuid.uuid4().hex[:8]}"
            os.replace(self.dest, old)
            os.replace(self.tmp, self.dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.tmp, self.dest)
        return False


# ---- reading ---------------------------------------------------------------------------------------------


@dataclass
class CheckpointInfo:
    path: Path
    config: dict[str, Any]  # config.json without quantization_config
    quant: QuantizeConfig
    quant_raw: dict[str, Any]
    weight_files: list[Path]
    tensor_files: dict[str, Path]  # tensor name (as the model names it: see CheckpointNames) -> file
    source: str = "gptq"  # how the quantized modules are stored: "gptq" or "compressed-tensors"


def read_quantization_config(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise OptqError(f"{path} has no config.json: it is not a checkpoint folder")
    try:
        config = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise OptqError(f"{cfg_path} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise OptqError(f"{cfg_path} must hold a JSON object")
    quant = config.pop("quantization_config", None)
    if quant is None and (path / QUANTIZE_CONFIG_FILE).is_file():
        try:
            quant = json.loads((path / QUANTIZE_CONFIG_FILE).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise OptqError(f"{path / QUANTIZE_CONFIG_FILE} is not valid JSON: {e}") from None
    if quant is not None and not isinstance(quant, dict):
        raise OptqError("quantization_config must be a JSON object")
    return config, quant


def is_quantized_checkpoint(path: str | os.PathLike) -> bool:
    p = Path(path)
    if not p.is_dir() or not (p / "config.json").is_file():
        return False
    try:
        _, quant = read_quantization_config(p)
    except OptqError:
        return True  # let the reader report the problem
    return quant is not None


def open_checkpoint(path: str | os.PathLike) -> CheckpointInfo:
    """Validate a checkpoint's config and locate its tensors (nothing large is read yet)."""
    path = Path(path)
    config, quant_raw = read_quantization_config(path)
    if quant_raw is None:
        raise OptqError(f"{path} has no quantization_config in config.json nor a quantize_config.json")
    source = compressed_tensors.QUANT_METHOD if compressed_tensors.is_compressed_tensors(quant_raw) else "gptq"
    quant = QuantizeConfig.from_hf(quant_raw) if source == "gptq" else None
    files = _weight_files(path, quant_raw)
    names = checkpoint_names(config.get("model_type"))
    tensor_files: dict[str, Path] = {}
    for f in files:
        if not f.is_file():
            raise OptqError(f"{f} is listed in the index but missing: the checkpoint is incomplete")
        try:
            with safe_open(str(f), framework="pt") as sf:
                for k in sf.keys():
                    tensor_files[names.to_model(k)] = f
        except Exception as e:  # safetensors raises its own error types for bad headers
            raise OptqError(f"{f} is not a valid safetensors file ({e}): the file is truncated or corrupt") from None
    if quant is None:
        quant = compressed_tensors.read_config(quant_raw, compressed_tensors.quantized_module_names(tensor_files))
    return CheckpointInfo(path, config, quant, quant_raw, files, tensor_files, source)


def _weight_files(path: Path, quant_raw: dict[str, Any]) -> list[Path]:
    """The checkpoint's safetensors files: the index's, else model.safetensors, else AutoGPTQ's single file
    (`model_file_base_name`, or its default `gptq_model-<bits>bit-<group>g`), else the folder's only one."""
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise OptqError(f"{index} is malformed ({e}): it needs a 'weight_map' object") from None
        return sorted({path / f for f in weight_map.values()})
    names = [SINGLE_FILE]
    if quant_raw.get("model_file_base_name"):
        names.append(f"{quant_raw['model_file_base_name']}.safetensors")
    if "bits" in quant_raw:
        names.append(f"gptq_model-{quant_raw['bits']}bit-{quant_raw.get('group_size', 128)}g.safetensors")
    for name in names:
        if (path / name).is_file():
            return [path / name]
    found = sorted(path.glob("*.safetensors"))
    if len(found) > 1:
        raise OptqError(f"{path} holds several safetensors files ({', '.join(f.name for f in found)}) and no "
                        f"{INDEX_FILE}: keep only the checkpoint's file, or add an index that lists its shards")
    if not found:
        raise OptqError(f"{path} has no safetensors weight files: the checkpoint is incomplete (copy its "
                        "*.safetensors files in) or this folder is not a checkpoint")
    return found


def quantized_module_names(info: CheckpointInfo) -> list[str]:
    if info.source == compressed_tensors.QUANT_METHOD:
        return compressed_tensors.quantized_module_names(info.tensor_files)
    return sorted({k[: -len(".qweight")] for k in info.tensor_files if k.endswith(".qweight")})


def iter_tensors(info: CheckpointInfo, shapes: dict[str, tuple[int, int]]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of every tensor of the checkpoint, file by file; the quantized modules (`shapes`: name ->
    (in, out) features) as GPTQ tensors, whatever format the checkpoint stores them in."""

    names = checkpoint_names(info.config.get("model_type"))

    def raw() -> Iterator[tuple[str, torch.Tensor]]:
        # pread, not safe_open's memory map: its pages stayed resident (13.6 GB to load an 8B checkpoint)
        for file in info.weight_files:
            files = SafetensorsFiles([file])
            try:
                for key in files.names():
                    yield names.to_model(key), files.read(key)
            finally:
                files.close()

    if info.source != compressed_tensors.QUANT_METHOD:
        yield from raw()
        return

    def pack(qw: QuantizedWeight) -> dict[str, torch.Tensor]:
        try:
            return pack_module(qw, info.quant.checkpoint_format)
        except ValueError as e:  # a shape the GPTQ layout (and so optq's kernels) cannot hold
            raise OptqError(f"a {qw.bits}-bit module of shape {tuple(qw.qweight.shape)} cannot be run by optq: {e}") \
                from None

    yield from compressed_tensors.iter_converted(raw(), info.quant, shapes, pack)


@dataclass(frozen=True)
class PlannedTensor:
    """One tensor of a checkpoint: what it is and where its values come from."""

    spec: TensorSpec
    key: str  # the state-dict key it is cast from; for a packed tensor, the module's weight key
    module: str = ""  # the quantized module whose packed tensor this is ("" for float tensors)


def packed_layout(in_features: int, out_features: int, bits: int, group_size: int) -> dict[str, tuple]:
    """(dtype, shape) of each checkpoint tensor of one quantized module."""
    shapes = expected_shapes(in_features, out_features, bits, group_size)
    return {leaf: (QUANT_DTYPES[leaf], shapes[leaf]) for leaf in QUANT_TENSORS}


def checkpoint_plan(state: dict[str, torch.Tensor], quantized: dict[str, dict[str, tuple]], dtype: torch.dtype,
                    names: CheckpointNames | None = None) -> list[PlannedTensor]:
    """The checkpoint's tensors in state-dict order: each quantized module's `.weight` becomes its packed
    tensors (`quantized`: module -> leaf -> (dtype, shape)), its bias float16; tied duplicates are dropped
    (the state dict may hold meta tensors, taken with keep_vars=True so that tied ones are one object);
    other float tensors are cast to `dtype`. Tensors are named as `names` (the architecture's published
    checkpoints) names them."""
    out = _checkpoint_plan(state, quantized, dtype)
    if names is None:
        return out
    return [replace(p, spec=replace(p.spec, name=names.to_checkpoint(p.spec.name))) for p in out]


def _checkpoint_plan(state, quantized, dtype) -> list[PlannedTensor]:
    out: list[PlannedTensor] = []
    seen: set = set()
    for key, t in state.items():
        module, _, leaf = key.rpartition(".")
        if module in quantized:
            if leaf == "weight":
                for name in QUANT_TENSORS:
                    qdtype, shape = quantized[module][name]
                    out.append(PlannedTensor(TensorSpec(f"{module}.{name}", qdtype, tuple(shape)), key, module))
            elif leaf == "bias":
                out.append(PlannedTensor(TensorSpec(key, torch.float16, tuple(t.shape)), key))
            continue
        tag = id(t) if t.device.type == "meta" else (t.data_ptr(), tuple(t.shape))
        if t.numel() and tag in seen:
            continue  # tied to a tensor already written (e.g. lm_head and embed_tokens)
        seen.add(tag)
        out.append(PlannedTensor(TensorSpec(key, dtype if t.is_floating_point() else t.dtype, tuple(t.shape)), key))
    names = {p.module for p in out}
    missing = [m for m in quantized if m not in names]
    if missing:
        raise OptqError(f"quantized modules not found in the model: {missing[:3]}")
    return out


def checkpoint_value(p: PlannedTensor, t: torch.Tensor) -> torch.Tensor:
    """The float tensor `t` (of state-dict key p.key) as the checkpoint stores it."""
    if not t.is_floating_point():
        return t.contiguous()
    if p.spec.dtype == torch.float16 and t.numel() and t.abs().max() > torch.finfo(torch.float16).max:
        raise OptqError(f"tensor {p.key} exceeds the float16 range: write the checkpoint with --dtype bfloat16")
    return t.to(p.spec.dtype).contiguous()


def checkpoint_tensors(
    state_dict: dict[str, torch.Tensor], packed: dict[str, dict[str, torch.Tensor]], dtype: torch.dtype,
    names: CheckpointNames | None = None,
) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors (see `checkpoint_plan`) of a model held in memory."""
    quantized = {m: {leaf: (t.dtype, tuple(t.shape)) for leaf, t in ts.items()} for m, ts in packed.items()}
    return {p.spec.name: packed[p.module][p.spec.name.rpartition(".")[2]] if p.module
            else checkpoint_value(p, state_dict[p.key]) for p in checkpoint_plan(state_dict, quantized, dtype, names)}


def write_config_files(folder: Path, model_config: dict[str, Any], quant_config: dict[str, Any],
                       dtype: torch.dtype) -> None:
    """config.json (with quantization_config) and quantize_config.json."""
    cfg = dict(model_config)
    cfg["quantization_config"] = quant_config
    dtype_name = str(dtype).removeprefix("torch.")
    cfg["dtype"] = dtype_name
    cfg["torch_dtype"] = dtype_name  # older readers (Transformers 4, vLLM) look here
    write_json(folder / "config.json", cfg)
    write_json(folder / QUANTIZE_CONFIG_FILE, quant_config)
