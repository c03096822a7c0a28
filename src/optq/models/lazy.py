"""A model whose weights stay on disk until asked for: the skeleton on the meta device, and the tensors of a
safetensors folder read one at a time (or a range of rows at a time) when a module's turn comes."""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from ..errors import OptqError
from ..formats.safetensors_writer import DTYPE_NAMES, INDEX_FILE


class StreamingUnsupported(OptqError):
    """This model cannot be streamed (its tensors do not map one-to-one onto the model's); load it whole."""


_DTYPES = {name: dtype for dtype, name in DTYPE_NAMES.items()}  # safetensors' names -> torch dtypes


class SafetensorsSource:
    """The tensors of a model folder's safetensors files, by the model's own state-dict names.

    Tensors are read with pread into fresh memory, not through a memory map: pages of a map that were read
    stay in the process's resident set until it is closed, so reading every layer of a model through one
    map (as safetensors' safe_open does) makes peak RSS grow with the model, which streaming must not."""

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
        self._entry: dict[str, tuple[Path, torch.dtype, tuple[int, ...], int]] = {}  # name -> file, dtype, shape, offset
        self._shape: dict[str, tuple[int, ...]] = {}
        self._fds: dict[Path, int] = {}
        for f in files:
            if not f.is_file():
                raise OptqError(f"{f} is listed in the index but missing: the model folder is incomplete")
            try:  # safetensors validates the header (offsets, sizes, dtypes) as it opens the file
                with safe_open(str(f), framework="pt"):
                    pass
            except Exception as e:  # safetensors raises its own error types for bad headers
                raise OptqError(f"{f} is not a valid safetensors file ({e}): the file is truncated or corrupt") \
                    from None
            with f.open("rb") as fh:
                n = struct.unpack("<Q", fh.read(8))[0]
                header = json.loads(fh.read(n))
            header.pop("__metadata__", None)
            for k, v in header.items():
                if v["dtype"] not in _DTYPES:
                    raise StreamingUnsupported(f"{f}: tensor {k} has dtype {v['dtype']}, which optq does not read")
                shape = tuple(v["shape"])
                self._entry[k] = (f, _DTYPES[v["dtype"]], shape, 8 + n + v["data_offsets"][0])
                self._shape[k] = shape
            self._fds[f] = os.open(f, os.O_RDONLY)
        self._names: dict[str, str] = {}  # model name -> file name

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 (interpreter shutdown)
            pass

    def _read(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        f, dtype, shape, offset = self._entry[name]
        rows = shape[0] if shape else 1
        stop = rows if stop is None else min(stop, rows)
        out_shape = (stop - start, *shape[1:]) if shape else ()
        out = torch.empty(out_shape, dtype=dtype)
        row_bytes = math.prod(shape[1:]) * out.element_size() if shape else out.element_size()
        view = memoryview(out.reshape(-1).view(torch.uint8).numpy()) if out.numel() else memoryview(b"")
        pos = offset + start * row_bytes
        while len(view):
            got = os.preadv(self._fds[f], [view], pos)
            if got == 0:
                raise OptqError(f"{f} ends inside tensor {name}: the file is truncated")
            view, pos = view[got:], pos + got
        return out

    def bind(self, model: nn.Module) -> None:
        """Map the model's state-dict names onto the files' (which may lack the base model prefix, as
        Transformers allows). Anything the model has that no file holds makes streaming impossible."""
        prefix = getattr(model, "base_model_prefix", "") or ""
        state = model.state_dict(keep_vars=True)

        def in_files(key: str) -> str | None:
            candidates = [key]
            if prefix and key.startswith(prefix + "."):
                candidates.append(key[len(prefix) + 1:])
            return next((c for c in candidates if c in self._entry), None)

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
            if self._shape[found] != tuple(t.shape):
                raise OptqError(f"{key} has shape {self._shape[found]} in the files, the model's config says "
                                f"{tuple(t.shape)}: config.json and the weights disagree")
            self._names[key] = found

    def has(self, key: str) -> bool:
        return key in self._names

    def get(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The tensor `key`; floating point ones go through float32 (as a float32 load would) to `dtype`."""
        t = self._read(self._names[key])
        if dtype is not None and t.is_floating_point() and t.dtype != dtype:
            t = t.to(torch.float32).to(dtype)
        return t

    def rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        return self._read(self._names[key], start, stop)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._shape[self._names[key]]


def build_skeleton(folder: Path, dtype: torch.dtype, trust_remote_code: bool = False) -> nn.Module:
    """The causal LM of `folder`'s config.json with its parameters on the meta device (nothing allocated) and
    its non-persistent buffers (rotary tables) computed as usual."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(folder), local_files_only=True, trust_remote_code=trust_remote_code)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    model.tie_weights()  # from_config leaves tying to the weight load; tied tensors must be one object here
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
