"""QuantizeConfig: what to quantize and how, and its `quantization_config` form in a checkpoint.

The field names and their meaning in `config.json` live here and nowhere else.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

from .core.grid import MSE_NORM, SUPPORTED_BITS, GridSpec
from .errors import OptqError

CHECKPOINT_FORMATS = ("gptq", "gptq_v2")
# Group sizes every GPTQ loader and kernel takes (vLLM's Marlin: -1, 32, 64, 128); a width they do not divide
# leaves a shorter last group, which vLLM refuses (it allocates in_features // group_size groups).
LOADABLE_GROUP_SIZES = (128, 64, 32)
METHODS = ("gptq", "rtn")


@dataclass
class QuantizeConfig:
    bits: int = 4
    group_size: int = 128
    # act-order with static groups by default: on SmolLM2 natural order loses to RTN (BENCHMARKS.md, "Quality
    # by default"); static groups keep g_idx natural, which every loader reads fast.
    desc_act: bool = True
    sym: bool = True
    static_groups: bool = True
    true_sequential: bool = True
    damp_percent: float = 0.01
    # Each group's range shrunk to the factor that minimizes its rounding error (core.grid.find_params). On by
    # default: SmolLM2 3-bit 0.65-0.74x the KL on every report domain, 4-bit 0.93-0.97x; its coarse-to-fine
    # search costs ~5% of a run (BENCHMARKS.md, "Quality by default, session 19"). RTN (--rtn) searches too.
    mse: bool = True
    # llama.cpp's Q4_0 scale rule in the symmetric grid (see GridSpec.signed_scale): exact in GGUF Q4_0 / Q8_0.
    signed_scale: bool = False
    # GPTAQ asymmetric calibration (GPTQModel calls it "v2"): aim each layer at the float model's outputs. On by
    # default: 0.69-0.95x the KL of plain GPTQ on every report domain of 3 models, at 1.8x a whole run's time
    # (2.4x without the calibration's generation; BENCHMARKS.md, "Quality by default, continued").
    gptaq: bool = True
    gptaq_alpha: float = 0.25
    # After GPTQ picks the integers, fit each row's group scales to them by least squares on the layer's
    # output error (core.gptq.refit_scales). The checkpoint format is unchanged. Off by default: -1% perplexity
    # in two SmolLM2 ablations, +0.26% at the full 128 x 2048 protocol (BENCHMARKS.md).
    refit_scales: bool = False
    checkpoint_format: str = "gptq"
    lm_head: bool = False
    method: str = "gptq"  # "rtn": round-to-nearest, same checkpoint format
    # Hold every 16th calibration window out of the Hessians and keep RTN's integers for a module where GPTQ's
    # have the larger output error on them (pipeline._guard); the modules are listed in meta.rtn_guard.
    rtn_guard: bool = True
    # Keep the asked group size where it does not divide a module's width (a shorter last group, which
    # vLLM cannot load) instead of the largest loadable size that divides every width (fit_group_size).
    partial_groups: bool = False
    # GPTQModel's per-module overrides: {"+:regex": {"bits": 8, ...}, "-:regex": {}} ("-:" = left in float).
    dynamic: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self):
        if self.group_size == -1:
            self.static_groups = False  # one group per row: nothing to fix in advance
        self.validate()

    def validate(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise OptqError(f"bits={self.bits} is not supported: use one of {', '.join(map(str, SUPPORTED_BITS))}")
        if not isinstance(self.group_size, int) or (self.group_size != -1 and self.group_size <= 0):
            raise OptqError(f"group_size={self.group_size} is invalid: use -1 (per channel) or a positive size")
        if not isinstance(self.damp_percent, (int, float)) or not (0 <= self.damp_percent <= 1):
            raise OptqError(f"damp_percent={self.damp_percent} is out of range: use a value in [0, 1] (default 0.01)")
        if self.checkpoint_format not in CHECKPOINT_FORMATS:
            raise OptqError(
                f"checkpoint_format={self.checkpoint_format!r} is unknown: use one of {', '.join(CHECKPOINT_FORMATS)}"
            )
        if self.method not in METHODS:
            raise OptqError(f"method={self.method!r} is unknown: use one of {', '.join(METHODS)}")
        if not isinstance(self.gptaq_alpha, (int, float)) or not (0 <= self.gptaq_alpha <= 1):
            raise OptqError(f"gptaq_alpha={self.gptaq_alpha} is out of range: use a value in [0, 1] (default 0.25)")
        if self.signed_scale and not self.sym:
            raise OptqError("signed_scale is a symmetric grid's scale rule: drop --asym or --signed-scale")
        if not isinstance(self.dynamic, dict) or not all(isinstance(v, dict) for v in self.dynamic.values()):
            raise OptqError("dynamic must map '+:regex' / '-:regex' keys to objects of overrides")
        for key, override in self.dynamic.items():
            if not (key.startswith("+:") or key.startswith("-:")):
                raise OptqError(f"dynamic key {key!r} must start with '+:' (override) or '-:' (skip)")
            try:
                re.compile(key[2:])
            except re.error as e:
                raise OptqError(f"dynamic key {key!r} is not a valid regular expression: {e}") from None
            unknown = set(override) - {"bits", "group_size", "sym", "desc_act", "damp_percent", "mse", "static_groups"}
            if unknown:
                raise OptqError(f"dynamic override {key!r} has fields optq cannot honour: {sorted(unknown)}")

    def grid(self) -> GridSpec:
        # v1 stores zero - 1 and so cannot hold zero = 0: asymmetric v1 checkpoints keep zero >= 1.
        min_zero = 1 if (not self.sym and self.checkpoint_format == "gptq") else 0
        return GridSpec(bits=self.bits, sym=self.sym, mse=self.mse, min_zero=min_zero, signed_scale=self.signed_scale)

    def for_module(self, name: str) -> QuantizeConfig | None:
        """The config that applies to module `name` after `dynamic` overrides; None if it stays in float."""
        for key, override in self.dynamic.items():
            if re.match(key[2:], name):
                if key.startswith("-:"):
                    return None
                # an override to an asymmetric grid leaves the symmetric grid's scale rule behind
                signed = self.signed_scale and override.get("sym", self.sym)
                return dataclasses.replace(self, dynamic={}, **{"signed_scale": signed, **override})
        return self

    @property
    def reorders_groups(self) -> bool:
        """Whether g_idx is other than column // group_size: act-order whose groups follow the processing
        order. Static groups (and per-channel) keep the natural layout whatever order GPTQ visits the columns
        in, so such a checkpoint says desc_act false, which is what loaders (vLLM, Marlin) read it by."""
        return self.desc_act and not self.static_groups and self.group_size != -1

    def fit_group_size(self, in_features: list[int]) -> tuple[QuantizeConfig, str | None]:
        """This config with a group size that divides every quantized width, so that every loader takes the
        checkpoint (see LOADABLE_GROUP_SIZES), and a note of the change (None when there is none)."""
        g = self.group_size
        widths = sorted(set(in_features))
        odd = [w for w in widths if g != -1 and w % g]
        if not odd or self.partial_groups:
            return self, None
        fits = [s for s in LOADABLE_GROUP_SIZES if s < g and all(w % s == 0 for w in widths)]
        if not fits:
            return self, (f"group size {g} leaves a shorter last group in widths {odd} and no loadable size "
                          f"({', '.join(map(str, LOADABLE_GROUP_SIZES))}) divides them all: vLLM cannot load "
                          "this checkpoint (use --group-size -1 for one it can)")
        return dataclasses.replace(self, group_size=fits[0]), (
            f"group size {fits[0]} instead of {g}: {g} does not divide the width of some modules ({odd}), and "
            f"vLLM refuses a shorter last group (--partial-groups keeps {g})")

    def to_hf(self, meta: dict[str, Any] | None = None) -> dict[str, Any]:
        """The `quantization_config` object of config.json (and the body of quantize_config.json)."""
        d = {
            "quant_method": "gptq",
            "bits": self.bits,
            "group_size": self.group_size,
            "desc_act": self.reorders_groups,
            "sym": self.sym,
            "static_groups": self.static_groups,
            "true_sequential": self.true_sequential,
            "damp_percent": self.damp_percent,
            "checkpoint_format": self.checkpoint_format,
            "lm_head": self.lm_head,
            "dynamic": self.dynamic,
            # GPTQModel's field: the norm of the shrink search, 0.0 = off.
            "mse": MSE_NORM if self.mse else 0.0,
        }
        d["meta"] = dict(meta or {})
        if self.desc_act and not self.reorders_groups and self.method == "gptq":  # how GPTQ visited the columns
            d["meta"]["act_order"] = True
        if self.gptaq:  # how the weights were found, not how to read them: kept out of the standard fields
            d["meta"]["gptaq_alpha"] = self.gptaq_alpha
        if self.signed_scale:
            d["meta"]["signed_scale"] = True
        if self.refit_scales and self.method == "gptq":
            d["meta"]["refit_scales"] = True
        return d

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> QuantizeConfig:
        """Read a checkpoint's quantization_config; unknown fields are ignored, unusable values rejected."""
        method = d.get("quant_method", "gptq")
        if str(method).lower() != "gptq":
            raise OptqError(f"quantization_config.quant_method={method!r}: optq reads only 'gptq' checkpoints")
        fmt = d.get("checkpoint_format", d.get("format", "gptq"))
        if d.get("is_marlin_format") or str(fmt).lower() == "marlin":
            raise OptqError("quantization_config says the weights are repacked for the Marlin kernel "
                            "(checkpoint_format='marlin' / is_marlin_format=true): optq reads GPTQ's own packing "
                            "only; load the checkpoint this one was converted from")
        try:
            kwargs = cls._hf_kwargs(d, fmt)
        except (TypeError, ValueError) as e:
            raise OptqError(f"checkpoint quantization_config holds a value of the wrong type: {e}") from None
        if kwargs["bits"] is None:
            raise OptqError("quantization_config has no 'bits' field: the checkpoint is incomplete")
        try:
            return cls(**kwargs)
        except OptqError as e:
            raise OptqError(f"checkpoint quantization_config: {e}") from None

    @staticmethod
    def _hf_kwargs(d: dict[str, Any], fmt: Any) -> dict[str, Any]:
        return {
            "bits": d.get("bits"),
            "group_size": d.get("group_size", 128),
            # a static-groups act-order checkpoint says desc_act false (see reorders_groups) and meta.act_order
            "desc_act": bool(d.get("desc_act", False)) or bool((d.get("meta") or {}).get("act_order", False)),
            "sym": bool(d.get("sym", True)),
            "static_groups": bool(d.get("static_groups", False)),
            "true_sequential": bool(d.get("true_sequential", True)),
            "damp_percent": float(d.get("damp_percent", 0.01)),
            "checkpoint_format": fmt,
            "lm_head": bool(d.get("lm_head", False)),
            "dynamic": d.get("dynamic") or {},
            "mse": bool(d.get("mse", 0)),
            # how the weights were found (optq's meta), not how to read them
            "gptaq": "gptaq_alpha" in (d.get("meta") or {}),
            "gptaq_alpha": float((d.get("meta") or {}).get("gptaq_alpha", 0.25)),
        }
