"""The Python API: quantize a model folder or GGUF file into a GPTQ checkpoint; load any model for use."""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import __version__
from .calibration import MIX, calibration_windows, mix_windows
from .config import QuantizeConfig
from .errors import OptqError
from .formats.gptq import (LOG_FILE, AtomicFolder, checkpoint_tensors, is_quantized_checkpoint, parse_size,
                           write_config_files, write_safetensors)
from .models.registry import checkpoint_names
from .models.loading import TOKENIZER_FILES, SourceModel, load_source_model, load_tokenizer, parse_dtype
from .distributed import Cluster
from .pipeline import ModuleLog, QuantizedModel, quantize_model
from .resume import RunState, fault_point, partial_dir, windows_digest
from .settings import RunSettings
from .sysmem import available_memory, return_freed_memory

log = logging.getLogger("optq")


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
    settings: RunSettings | None = None,
    *,
    progress: bool = True,
    on_module=None,
    **options,
) -> QuantizeReport:
    """Quantize `model` (a Hugging Face folder or a .gguf file) and write a GPTQ checkpoint to `out`.

    `config` says what the checkpoint is (bits, groups, order, ...); `settings` (optq.settings.RunSettings) or
    its fields as keyword options (`dataset=`, `nsamples=`, `seqlen=`, `seed=`, `dtype=`, `compute_dtype=`,
    `device=`, `stream=`, `max_activation_memory=`, `max_shard_size=`, `hessian_shards=`, `overwrite=`,
    `resume=`, `allow_rtn_fallback=`, `allow_pickle=`, `trust_remote_code=`) say how it is made.

    Finished layers are kept beside `out` until the checkpoint is complete; `resume=True` continues an
    interrupted run from them (same model, config and calibration), byte-identically. A module GPTQ cannot
    solve is an error unless `allow_rtn_fallback`, which rounds it to nearest and lists it in the
    checkpoint's quantization_config.meta.rtn_fallback.

    `stream` (default: whenever the source is a safetensors folder) keeps the model on disk and reads one
    decoder layer at a time, writing the checkpoint as it goes: peak memory is one layer plus the calibration
    hidden states, which spill to a file next to `out` beyond `max_activation_memory` (None: no limit).
    The checkpoint is byte-identical to the one loading the whole model gives.

    Started by torchrun on several processes (or machines), the processes share the work and rank 0 writes
    the checkpoint: the same bytes as one process (see `optq.distributed`; `hessian_shards` bounds the number
    of processes and is part of what makes the bytes)."""
    started = time.perf_counter()
    config = config or QuantizeConfig()
    settings = RunSettings.from_options(settings, **options)
    cluster = Cluster.from_env(settings.device)
    try:
        result = _quantize(model, out, config, settings, progress, on_module, cluster)
    finally:
        if cluster is not None:
            cluster.close()
    return QuantizeReport(Path(out), result, time.perf_counter() - started)


def _quantize(model, out, config: QuantizeConfig, s: RunSettings, progress: bool, on_module,
              cluster) -> QuantizedModel:
    writer = cluster is None or cluster.rank == 0  # of several processes, rank 0 writes the checkpoint
    if cluster is not None and s.resume:
        raise OptqError("--resume works in one process only: run the interrupted quantization without torchrun")
    # fails now, not after the work, if `out` is unusable; a finished one is checked once the run is known
    finished = s.resume and writer and is_quantized_checkpoint(Path(out)) and not partial_dir(out).exists()
    folder = AtomicFolder(out, overwrite=s.overwrite) if writer and not finished else None
    src, why = _open_streamed(model, s.trust_remote_code) if s.stream is not False else (None, "")
    if src is None:
        if s.stream:
            raise OptqError(f"{model} cannot be streamed ({why}): drop --stream to load it whole")
        src = load_source_model(model, "float32", allow_pickle=s.allow_pickle, trust_remote_code=s.trust_remote_code)
    config = _loadable_config(src.model, config)
    windows, mix = None, None
    if config.method == "gptq":
        if s.dataset == MIX:
            windows, mix = mix_windows(src.tokenizer, _generation_model(src, s.trust_remote_code), s.nsamples,
                                       s.seqlen, s.seed)
            log.info("calibration mix (windows per part): %s", ", ".join(f"{k} {v}" for k, v in mix.items()))
        else:
            windows = calibration_windows(src.tokenizer, s.dataset, s.nsamples, s.seqlen, s.seed)
        return_freed_memory()  # the tokenizer's working memory for the whole text (~150 MB for WikiText-2)
    cdtype = parse_dtype(s.compute_dtype) if s.compute_dtype else None
    fingerprint = {"optq": __version__, "model": str(src.path), "config": config.to_hf(), "rtn guard": config.rtn_guard,
                   "calibration tokens": windows_digest(windows), "compute dtype": str(cdtype),
                   "model config": _model_config_dict(src.model), **s.fingerprint()}
    digest = _run_digest(fingerprint, src.path)
    if finished:
        return _already_complete(Path(out), digest, config)
    state = RunState(out, fingerprint, resume=s.resume, overwrite=s.overwrite) if cluster is None else None
    fault_point("calibration")
    calibration = None
    if windows is not None:
        calibration = s.calibration_meta()
        if mix is not None:
            calibration["parts"] = mix
    run_meta = {"calibration": calibration, "run_digest": digest}
    act_limit = parse_size(s.max_activation_memory) if s.max_activation_memory is not None else None
    run = dict(device=s.device, compute_dtype=cdtype, progress=progress and writer,
               on_module=on_module if writer else None, state=state, allow_rtn_fallback=s.allow_rtn_fallback,
               max_activation_memory=act_limit, spill_dir=Path(out).resolve().parent, cluster=cluster,
               hessian_shards=s.hessian_shards)
    out_dtype, shard_bytes = parse_dtype(s.dtype), parse_size(s.max_shard_size)
    if src.is_streamed:
        from .streaming import StreamedModel

        if not writer:
            result = quantize_model(src.model, windows, config,
                                    stream=StreamedModel(src.model, src.source, config, out_dtype, None, shard_bytes),
                                    **run)
            return result
        with folder as tmp:
            streamed = StreamedModel(src.model, src.source, config, out_dtype, tmp, shard_bytes)
            try:
                result = quantize_model(src.model, windows, config, stream=streamed, **run)
                streamed.close()
            except BaseException:
                streamed.abort()
                raise
            _write_metadata(tmp, src.model, result, out_dtype, run_meta)
            _copy_tokenizer(src, tmp)
            fault_point("save")
    else:
        result = quantize_model(src.model, windows, config, **run)
        if writer:
            save_quantized(src.model, result, folder, out_dtype, shard_bytes, run_meta,
                           extra_files=lambda tmp: _copy_tokenizer(src, tmp))
    if state is not None:
        state.finish()
    return result


def _loadable_config(model, config: QuantizeConfig) -> QuantizeConfig:
    """The config with a group size every loader takes for this model's widths (QuantizeConfig.fit_group_size)."""
    from .pipeline import planned_modules

    widths = [in_f for in_f, _, mcfg in planned_modules(model, config).values() if mcfg.group_size == config.group_size]
    fitted, note = config.fit_group_size(widths)
    if note:
        log.warning("%s", note)
    return fitted


def _generation_model(src: SourceModel, trust_remote_code: bool):
    """The float model that writes the generated parts of the default calibration (its own text, and its chat
    answers where it has a chat template): the loaded one, or for a streamed source the whole model in bfloat16
    when it fits in half the available memory (else None: no generated parts)."""
    if not src.is_streamed:
        return src.model
    size = sum(f.stat().st_size for f in src.path.glob("*.safetensors"))
    available = available_memory()
    if available is not None and size > available // 2:
        log.warning("calibration: the model's own text and chat answers are left out of the default set (the "
                    "float model, %.1f GB, does not fit in half the available memory): pass --dataset with text "
                    "(and chat JSONL, 'messages') of your own to calibrate on", size / 1e9)
        return None
    return load_source_model(src.path, "bfloat16", trust_remote_code=trust_remote_code).model


def _open_streamed(model, trust_remote_code: bool) -> tuple[SourceModel | None, str]:
    """The model as a skeleton bound to its safetensors files, or (None, why) where it cannot be streamed (a
    GGUF file, pickle weights, tensors not named as the model's)."""
    from .models.lazy import SafetensorsSource, StreamingUnsupported, build_skeleton
    from .models.loading import check_model_folder, resolve_model_path

    path = resolve_model_path(model)
    if not path.is_dir():
        return None, "it is a GGUF file, which Transformers dequantizes whole"
    if not any(path.glob("*.safetensors")):
        return None, "it has no safetensors files"
    check_model_folder(path, allow_pickle=False)
    from transformers import AutoConfig

    from .models.registry import arch_spec

    config = AutoConfig.from_pretrained(str(path), local_files_only=True, trust_remote_code=trust_remote_code)
    arch_spec(config.model_type)  # unsupported architectures fail before anything else
    try:
        skeleton = build_skeleton(path, torch.float32, trust_remote_code)
        source = SafetensorsSource(path)
        source.bind(skeleton)
    except StreamingUnsupported as e:
        log.info("loading the whole model (it cannot be streamed: %s)", e)
        return None, str(e)
    src = SourceModel(model=skeleton, tokenizer=load_tokenizer(path, False, trust_remote_code), path=path,
                      is_gguf=False)
    src.source = source
    return src, ""


def _run_digest(fingerprint: dict, source: Path) -> str:
    """The run's fingerprint as stored in the checkpoint: the source named by its weight files' names and sizes,
    not its path, so that the bytes do not depend on where the model lies."""
    files = [source] if source.is_file() else sorted(f for f in source.iterdir()
                                                     if f.suffix in (".safetensors", ".gguf", ".bin"))
    run = {**fingerprint, "model": [[f.name, f.stat().st_size] for f in files]}
    return hashlib.sha256(json.dumps(run, sort_keys=True, default=str).encode()).hexdigest()


def _already_complete(out: Path, digest: str, config: QuantizeConfig) -> QuantizedModel:
    """--resume of a run that finished: nothing to do when `out` was made by the same run, else an error."""
    from .formats.gptq import read_quantization_config

    _, quant = read_quantization_config(out)
    if (quant or {}).get("meta", {}).get("run_digest") != digest:
        raise OptqError(f"{out} is a finished checkpoint of another run (model, config or calibration differ): "
                        "choose another path, or pass --overwrite to replace it")
    log.warning("%s is already complete (same model, config and calibration): nothing to do", out)
    return QuantizedModel({}, config, already_complete=True)


def _checkpoint_meta(result: QuantizedModel, run: dict | None) -> dict:
    meta = {"quantizer": [f"optq:{__version__}"], "method": result.config.method}
    run = run or {}
    if run.get("calibration"):
        meta["calibration"] = run["calibration"]
    if run.get("run_digest"):  # what --resume compares to call a finished output complete
        meta["run_digest"] = run["run_digest"]
    if result.rtn_fallback:
        meta["rtn_fallback"] = result.rtn_fallback
    if result.config.method == "gptq" and result.config.rtn_guard:
        meta["rtn_guard"] = result.rtn_guard
    return meta


def _write_metadata(tmp: Path, model, result: QuantizedModel, dtype: torch.dtype, run: dict | None) -> None:
    """config.json, quantize_config.json and quant_log.csv of a checkpoint (`run`: calibration, run_digest)."""
    write_config_files(tmp, _model_config_dict(model), result.config.to_hf(_checkpoint_meta(result, run)),
                       dtype)
    write_log_csv(tmp / LOG_FILE, result.log)


def save_quantized(
    model,
    result: QuantizedModel,
    out: str | os.PathLike | AtomicFolder,
    dtype: str | torch.dtype = "float16",
    max_shard_size: str | int = "4GB",
    run: dict | None = None,
    extra_files=None,
    overwrite: bool = False,
) -> Path:
    """Write the checkpoint of a model quantized in memory by `quantize_model` (atomically)."""
    folder = out if isinstance(out, AtomicFolder) else AtomicFolder(out, overwrite=overwrite)
    out_dtype = parse_dtype(dtype)
    tensors = checkpoint_tensors(model.state_dict(), result.modules, out_dtype,
                                 checkpoint_names(model.config.model_type))
    with folder as tmp:
        write_safetensors(tmp, tensors, parse_size(max_shard_size))
        _write_metadata(tmp, model, result, out_dtype, run)
        if extra_files is not None:
            extra_files(tmp)
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
