"""The settings of one quantization run besides its QuantizeConfig (which is what the checkpoint's config
says): where the calibration comes from, how the run executes and what it writes. One object shared by the
CLI (its flags carry the same names), the Python API, quantize-on-load through Transformers and resume's
fingerprint, so adding an option touches this file and the code that uses it."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from .errors import OptqError

# Calibration shards of every run, one process or many: up to this many processes give the same bytes
# (optq.distributed).
HESSIAN_SHARDS = 8


@dataclass(frozen=True)
class RunSettings:
    # calibration: 'mix' (prose, code, the model's own chat answers, other languages), 'pydoc', a file, a folder,
    # a hub name; windows of `seqlen` tokens at seeded offsets (512 beat 2048 on every report domain)
    dataset: str = "mix"
    nsamples: int = 128
    seqlen: int = 512
    seed: int = 0
    # the checkpoint: shards of at most this size, unquantized tensors in this dtype
    max_shard_size: str | int = "4GB"
    dtype: str = "float16"
    # execution: dtype of the calibration passes ("auto": bf16 where the CPU has it), device of the solved layer,
    # streaming from safetensors (None: whenever possible), hidden states kept in memory up to this size
    compute_dtype: str | None = "auto"
    device: str = "cpu"
    stream: bool | None = None
    max_activation_memory: str | int | None = "4GB"
    # Hessian sums in this many fixed shards: runs on up to this many processes give the same bytes
    hessian_shards: int = HESSIAN_SHARDS
    # what the run may do
    overwrite: bool = False
    resume: bool = False
    allow_rtn_fallback: bool = False
    allow_pickle: bool = False
    trust_remote_code: bool = False

    def __post_init__(self):
        if self.nsamples <= 0 or self.seqlen <= 0:
            raise OptqError(f"nsamples and seqlen must be positive (got {self.nsamples} and {self.seqlen})")
        if self.hessian_shards is None:  # an unset CLI flag
            object.__setattr__(self, "hessian_shards", HESSIAN_SHARDS)

    @classmethod
    def from_options(cls, base: "RunSettings | None" = None, **options: Any) -> "RunSettings":
        """`base` (default: the defaults) with `options` replaced; an unknown name is an error that lists the
        known ones."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - names)
        if unknown:
            raise OptqError(f"unknown quantization setting(s) {', '.join(unknown)}: use {', '.join(sorted(names))}")
        return replace(base or cls(), **options)

    @classmethod
    def from_args(cls, args) -> "RunSettings":
        """The settings of a parsed `optq quantize` command line (flags named as the fields)."""
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)})

    def calibration_meta(self) -> dict:
        """What the checkpoint's quantization_config.meta.calibration records."""
        return {"dataset": str(self.dataset), "nsamples": self.nsamples, "seqlen": self.seqlen, "seed": self.seed,
                "hessian_shards": self.hessian_shards}

    def fingerprint(self) -> dict:
        """The settings that change a checkpoint's bytes beyond the model, config and calibration tokens, in the
        form resume fingerprints have always had (options at their defaults leave no trace, so runs interrupted
        before an option existed still resume)."""
        fp: dict[str, Any] = {"device": self.device}
        if self.allow_rtn_fallback:
            fp["allow rtn fallback"] = True
        if self.hessian_shards != HESSIAN_SHARDS:
            fp["hessian shards"] = self.hessian_shards
        return fp

    def as_dict(self) -> dict:
        return asdict(self)
