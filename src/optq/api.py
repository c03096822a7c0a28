"""The Python API: quantize a model folder or GGUF file into a GPTQ checkpoint; load any model for use."""

from __future__ import annotations

import csv
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import __version__
from .calibration import calibration_windows
from .config import QuantizeConfig
from .errors import OptqError
from .formats.gptq import LOG_FILE, AtomicFolder, checkpoint_tensors, is_quantized_checkpoint, parse_size, write_checkpoint
from .models.loading import TOKENIZER_FILES, SourceModel, load_source_model, load_tokenizer, parse_dtype
from .pipeline import ModuleLog, QuantizedModel, quantize_model
from .resume import RunState, fault_point, windows_digest


@dataclass
class QuantizeReport:
    path: Path
    result: QuantizedModel
    seconds: float


def _copy_tokenizer(src: SourceModel, folder: Path) -> None:
    if src.is_gguf:
        src.tokenizer.save_pretrained(str(folder))
        gen = getattr(src.model, "generation_config", None)
        if gen is not None:
            gen.save_pretrained(str(folder))
        return
    for name in TOKENIZER_FILES:
        f = src.path / name
        if f.is_file():
            shutil.copyfile(f, folder / name)


def write_log_csv(path: Path, rows: list[ModuleLog]) -> None:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(ModuleLog.FIELDS)
        for r in rows:
            w.writerow(r.row())


def _model_config_dict(model) -> dict:
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg["use_cache"] = True
    if not cfg.get("architectures"):
        cfg["architectures"] = [type(model).__name__]
    return cfg


def quantize(
    model: str | os.PathLike,
    out: str | os.PathLike,
    config: QuantizeConfig | None = None,
    dataset: str = "pydoc",
    nsamples: int = 128,
    seqlen: int = 2048,
    seed: int = 0,
    max_shard_size: str | int = "4GB",
    dtype: str | torch.dtype = "float16",
    compute_dtype: str | torch.dtype | None = None,
    device: str = "cpu",
    overwrite: bool = False,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    progress: bool = True,
    on_module=None,
    resume: bool = False,
    allow_rtn_fallback: bool = False,
) -> QuantizeReport:
    """Quantize `model` (a Hugging Face folder or a .gguf file) and write a GPTQ checkpoint to `out`.

    Finished layers are kept beside `out` until the checkpoint is complete; `resume=True` continues an
    interrupted run from them (same model, config and calibration), byte-identically. A module GPTQ cannot
    solve is an error unless `allow_rtn_fallback`, which rounds it to nearest and lists it in the
    checkpoint's quantization_config.meta.rtn_fallback."""
    started = time.perf_counter()
    config = config or QuantizeConfig()
    out_dtype = parse_dtype(dtype)
    shard_bytes = parse_size(max_shard_size)
    folder = AtomicFolder(out, overwrite=overwrite)  # fails now, not after the work, if `out` is unusable
    src = load_source_model(model, "float32", allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    windows = None
    if config.method == "gptq":
        windows = calibration_windows(src.tokenizer, dataset, nsamples, seqlen, seed)
    cdtype = parse_dtype(compute_dtype) if compute_dtype else None
    fingerprint = {"optq": __version__, "model": str(src.path), "config": config.to_hf(),
                   "calibration tokens": windows_digest(windows), "compute dtype": str(cdtype), "device": device,
                   "model config": _model_config_dict(src.model)}
    if allow_rtn_fallback:  # only when set, so that runs interrupted before the option existed still resume
        fingerprint["allow rtn fallback"] = True
    state = RunState(out, fingerprint, resume=resume, overwrite=overwrite)
    fault_point("calibration")
    result = quantize_model(src.model, windows, config, device=device, compute_dtype=cdtype, progress=progress,
                            on_module=on_module, state=state, allow_rtn_fallback=allow_rtn_fallback)
    calibration = None
    if windows is not None:
        calibration = {"dataset": str(dataset), "nsamples": nsamples, "seqlen": seqlen, "seed": seed}
    save_quantized(src.model, result, folder, out_dtype, shard_bytes, calibration,
                   extra_files=lambda tmp: _copy_tokenizer(src, tmp))
    state.finish()
    return QuantizeReport(Path(out), result, time.perf_counter() - started)


def save_quantized(
    model,
    result: QuantizedModel,
    out: str | os.PathLike | AtomicFolder,
    dtype: str | torch.dtype = "float16",
    max_shard_size: str | int = "4GB",
    calibration: dict | None = None,
    extra_files=None,
    overwrite: bool = False,
) -> Path:
    """Write the checkpoint of a model quantized in memory by `quantize_model` (atomically)."""
    folder = out if isinstance(out, AtomicFolder) else AtomicFolder(out, overwrite=overwrite)
    out_dtype = parse_dtype(dtype)
    meta = {"quantizer": [f"optq:{__version__}"], "method": result.config.method}
    if calibration:
        meta["calibration"] = calibration
    if result.rtn_fallback:
        meta["rtn_fallback"] = result.rtn_fallback
    tensors = checkpoint_tensors(model.state_dict(), result.modules, out_dtype)
    with folder as tmp:
        write_checkpoint(tmp, _model_config_dict(model), result.config.to_hf(meta), tensors,
                         parse_size(max_shard_size), out_dtype)
        if extra_files is not None:
            extra_files(tmp)
        write_log_csv(tmp / LOG_FILE, result.log)
        fault_point("save")
    return folder.dest


def load_any(path: str | os.PathLike, dtype: str | torch.dtype = "auto", allow_pickle: bool = False,
             trust_remote_code: bool = False, backend: str = "auto"):
    """(model, tokenizer) for a quantized checkpoint, a float model folder or a .gguf file."""
    from .models.loading import resolve_model_path
    from .runtime.load import canonical_lm_head_input, load

    p = resolve_model_path(path)
    if is_quantized_checkpoint(p):
        model = load(p, dtype=dtype, trust_remote_code=trust_remote_code, backend=backend)
        return model, load_tokenizer(p, False, trust_remote_code)
    src = load_source_model(p, dtype, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    canonical_lm_head_input(src.model)
    return src.model, src.tokenizer


__all__ = ["quantize", "load_any", "QuantizeReport", "OptqError"]
