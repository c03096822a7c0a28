"""A model whose weights stay on disk until asked for: the skeleton on the meta device, and the tensors of a
safetensors folder read one at a time (or a range of rows at a time) when a module's turn comes."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..errors import OptqError
from ..formats.safetensors_reader import SafetensorsFiles, UnreadableDtype
from ..formats.safetensors_writer import INDEX_FILE
from .moe import unfuse_experts
from .registry import checkpoint_names


class StreamingUnsupported(OptqError):
    """This model cannot be streamed (its tensors do not map one-to-one onto the model's); load it whole."""


class SafetensorsSource:
    """The tensors of a model folder's safetensors files, by the model's own state-dict names, read with pread
    (see `formats.safetensors_reader`)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        index = self.folder / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise OptqError(f"{index} is malformed ({e}): it needs a 'weight_map' object") from None
            files = sorted({self.folder / f for f in weight_map.values()})
        else:
            files = sorted(self.folder.glob("*.safetensors"))
        if not files:
            raise StreamingUnsupported(f"{self.folder} has no safetensors files")
        for f in files:
            if not f.is_file():
                raise OptqError(f"{f} is listed in the index but missing: the model folder is incomplete")
        try:
            self.files = SafetensorsFiles(files)
        except UnreadableDtype as e:
            raise StreamingUnsupported(str(e)) from None
        self._names: dict[str, str] = {}  # model name -> file name

    def close(self) -> None:
        self.files.close()

    def bind(self, model: nn.Module) -> None:
        """Map the model's state-dict names onto the files' (which may lack the base model prefix, as
        Transformers allows). Anything the model has that no file holds makes streaming impossible."""
        prefix = getattr(model, "base_model_prefix", "") or ""
        state = model.state_dict(keep_vars=True)

        published = checkpoint_names(getattr(model.config, "model_type", None))

        def in_files(key: str) -> str | None:
            candidates = [key, published.to_checkpoint(key)]  # Mixtral's files say block_sparse_moe for mlp
            if prefix and key.startswith(prefix + "."):
                candidates.append(key[len(prefix) + 1:])
            return next((c for c in candidates if c in self.files), None)

        # Tied tensors (lm_head and the embeddings) are one object under several names; the files may hold
        # it under any of them: the first name present serves them all, as loading with tied weights does.
        by_object: dict[int, str] = {}
        for key, t in state.items():
            found = in_files(key)
            if found is not None:
                by_object.setdefault(id(t), found)
        for key, t in state.items():
            found = by_object.get(id(t))
            if found is None:
                if t.device.type != "meta":
                    continue  # a buffer the model computes itself
                raise StreamingUnsupported(f"{key} is not in the model's safetensors files under that name")
            if self.files.shape(found) != tuple(t.shape):
                raise OptqError(f"{key} has shape {self.files.shape(found)} in the files, the model's config says "
                                f"{tuple(t.shape)}: config.json and the weights disagree")
            self._names[key] = found

    def has(self, key: str) -> bool:
        return key in self._names

    def get(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The tensor `key`; floating point ones go through float32 (as a float32 load would) to `dtype`."""
        t = self.files.read(self._names[key])
        if dtype is not None and t.is_floating_point() and t.dtype != dtype:
            t = t.to(torch.float32).to(dtype)
        return t

    def rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        return self.files.read(self._names[key], start, stop)

    def shape(self, key: str) -> tuple[int, ...]:
        return self.files.shape(self._names[key])


def build_skeleton(folder: Path, dtype: torch.dtype, trust_remote_code: bool = False) -> nn.Module:
    """The causal LM of `folder`'s config.json with its parameters on the meta device (nothing allocated) and
    its non-persistent buffers (rotary tables) computed as usual."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(folder), local_files_only=True, trust_remote_code=trust_remote_code)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    model.tie_weights()  # from_config leaves tying to the weight load; tied tensors must be one object here
    unfuse_experts(model)  # named as the checkpoint names an MoE layer's experts (one module each)
    model.eval()
    return model


def materialize(module: nn.Module, prefix: str, source: SafetensorsSource, dtype: torch.dtype,
                device: torch.device | str = "cpu", recurse: bool = True) -> None:
    """Give `module` (named `prefix` in the model) its parameters and persistent buffers from `source`:
    floating point ones in `dtype`, through float32 as a float32 load followed by `.to(dtype)` would, and its
    computed buffers converted to `dtype`. `recurse=False`: the module's own tensors only, as they are."""
    if recurse:
        tensors = list(module.state_dict(keep_vars=True).items())
    else:
        tensors = [(k, t) for k, t in [*module._parameters.items(), *module._buffers.items()]
                   if t is not None and t.device.type == "meta"]
    for name, t in tensors:
        key = f"{prefix}.{name}" if prefix else name
        owner_name, _, leaf = name.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        if not source.has(key):
            if t.device.type == "meta":
                raise StreamingUnsupported(f"{key} is not in the model's safetensors files")
            continue
        value = source.get(key, dtype if t.is_floating_point() else None).to(device)
        if leaf in owner._parameters:
            owner._parameters[leaf] = nn.Parameter(value, requires_grad=False)
        else:
            owner._buffers[leaf] = value
    for b_owner in module.modules() if recurse else ():  # computed buffers (rotary tables), as .to(dtype) does
        for leaf, b in b_owner._buffers.items():
            if b is not None and b.is_floating_point() and b.device.type != "meta" and b.dtype != dtype:
                b_owner._buffers[leaf] = b.to(dtype)


def release(module: nn.Module) -> None:
    """Drop `module`'s tensors (back to the meta device), freeing their memory."""
    module.to("meta")
