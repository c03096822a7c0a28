"""Transformers' `from_pretrained` on GPTQ checkpoints through optq: an HfQuantizer for the `gptq` method.

Transformers' own `gptq` quantizer needs optimum and GPTQModel, and a GPU without GPTQModel. After `import optq`,
optq's quantizer takes the `gptq` method over where optimum or gptqmodel is missing, or everywhere when
OPTQ_TRANSFORMERS=1 (OPTQ_TRANSFORMERS=0: never); it says so once in the log. It replaces the quantized linears
with optq's QuantLinear before the weights are read, so Transformers' loader fills qweight/qzeros/scales/g_idx,
and builds the kernels after. The registration waits for `transformers.quantizers.auto` to be imported, so
`import optq` stays as fast as before.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import logging
import os
import sys
from pathlib import Path

log = logging.getLogger("optq")
_AUTO = "transformers.quantizers.auto"


def takes_over() -> bool:
    """Whether optq serves Transformers' `gptq` method here (see the module docstring)."""
    choice = os.environ.get("OPTQ_TRANSFORMERS", "")
    if choice in ("0", "1"):
        return choice == "1"
    return importlib.util.find_spec("optimum") is None or importlib.util.find_spec("gptqmodel") is None


def register() -> None:
    """Serve `gptq` in Transformers' quantizer registry now if Transformers' registry is loaded, else as soon
    as it is."""
    if not takes_over():
        return
    if _AUTO in sys.modules:
        _install(sys.modules[_AUTO])
    elif not any(isinstance(f, _AfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport())


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs _install right after transformers.quantizers.auto is executed."""

    def find_spec(self, name, path, target=None):
        if name != _AUTO:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_install(module):
            exec_module(module)
            _install(module)

        spec.loader.exec_module = exec_then_install
        return spec


def _install(auto) -> None:
    auto.AUTO_QUANTIZER_MAPPING["gptq"] = _quantizer_class()


_CLASS = None


def _quantizer_class():
    global _CLASS
    if _CLASS is None:
        _CLASS = _make_quantizer_class()
    return _CLASS


def _make_quantizer_class():
    import torch
    from transformers.quantizers.base import HfQuantizer

    class OptqGptqHfQuantizer(HfQuantizer):
        """Loads GPTQ checkpoints (optq's, GPTQModel's, AutoGPTQ's) with optq's QuantLinear and CPU kernels."""

        requires_calibration = False
        _announced = False

        def validate_environment(self, *args, **kwargs):
            if not type(self)._announced:
                log.warning("optq serves Transformers' GPTQ loading (OPTQ_TRANSFORMERS=0 hands it back to "
                            "optimum/gptqmodel where they are installed)")
                type(self)._announced = True

        def update_device_map(self, device_map):
            return {"": torch.device("cpu")} if device_map is None else device_map

        def _process_model_before_weight_loading(self, model, **kwargs):
            if not self.pre_quantized:
                return model
            from .config import QuantizeConfig
            from .errors import OptqError
            from .formats.gptq import read_quantization_config
            from .runtime.load import replace_linears

            # the checkpoint's own object: Transformers' GPTQConfig drops `dynamic`, `lm_head` and `meta`
            files = kwargs.get("checkpoint_files") or []
            raw = read_quantization_config(Path(files[0]).parent)[1] if files else None
            if not raw:
                raw = {**self.quantization_config.to_dict(), "checkpoint_format": self.quantization_config.format}
            self._raw_config = {**raw, "quant_method": "gptq"}
            try:
                self._optq_modules = replace_linears(model, QuantizeConfig.from_hf(self._raw_config))
            except OptqError as e:
                raise ValueError(str(e)) from None
            return model

        def _process_model_after_weight_loading(self, model, **kwargs):
            if not self.pre_quantized:
                return _quantize_loaded(model, self.quantization_config)
            from .errors import OptqError
            from .runtime.load import finish_loading

            dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
            try:
                finish_loading(model, self._optq_modules, dtype)
            except OptqError as e:
                raise ValueError(str(e)) from None
            model.config.quantization_config = self._raw_config  # what save_pretrained writes back
            return model

        @property
        def is_trainable(self) -> bool:
            return False

        def is_serializable(self):
            return True

    return OptqGptqHfQuantizer


def _quantize_loaded(model, gptq_config):
    """`from_pretrained(float_model, quantization_config=GPTQConfig(...))`: optq's GPTQ on the loaded model, in
    memory, then QuantLinear modules with the packed result. GPTQConfig's bits, group_size, sym and dataset
    are honoured (dataset None: optq's `mix`; a list of texts; 'wikitext2'/'c4' through `datasets`); the column
    order, damping, guard and calibration size are optq's defaults (GPTQConfig's own defaults, natural order and
    damp 0.1, are GPTQModel's and measured worse here)."""
    from transformers import AutoTokenizer

    from .api import _loadable_config
    from .calibration import MIX, calibration_windows, mix_windows, sample_windows, tokenize_joined
    from .config import QuantizeConfig
    from .pipeline import quantize_model
    from .runtime.load import finish_loading, install_packed
    from .settings import RunSettings

    tok = gptq_config.tokenizer or model.name_or_path
    if isinstance(tok, str):
        tok = AutoTokenizer.from_pretrained(tok)
    config = _loadable_config(model, QuantizeConfig(bits=gptq_config.bits, group_size=gptq_config.group_size,
                                                    sym=gptq_config.sym))
    run = RunSettings()
    limit = getattr(model.config, "max_position_embeddings", None) or run.seqlen
    seqlen = min(gptq_config.model_seqlen or run.seqlen, limit)
    nsamples, seed = run.nsamples, run.seed
    dataset = gptq_config.dataset
    if dataset is None:
        windows, _ = mix_windows(tok, model, nsamples, seqlen, seed)
        dataset = MIX
    elif isinstance(dataset, list):
        windows = sample_windows(tokenize_joined(tok, dataset), nsamples, seqlen, seed)
    else:
        windows = calibration_windows(tok, dataset, nsamples, seqlen, seed)
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    result = quantize_model(model, windows, config, compute_dtype=dtype)
    qmods = install_packed(model, result.modules, result.config)
    finish_loading(model, qmods, dtype)
    calibration = {"dataset": dataset if isinstance(dataset, str) else f"{len(dataset)} texts",
                   "nsamples": nsamples, "seqlen": seqlen, "seed": seed}
    from .api import _checkpoint_meta

    model.config.quantization_config = result.config.to_hf(_checkpoint_meta(result, {"calibration": calibration}))
    model.is_quantized = True
    return model
