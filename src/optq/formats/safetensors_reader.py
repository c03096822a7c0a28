"""Reading safetensors files with pread, one tensor (or a range of its rows) at a time, into fresh memory.

Not through a memory map: pages of a map that were read stay in the process's resident set until it is closed,
so reading every tensor of a model through one map (as safetensors' safe_open does) makes peak RSS grow with
the model, which streamed quantization and loading must not."""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import OptqError
from .safetensors_writer import DTYPE_NAMES

DTYPES = {name: dtype for dtype, name in DTYPE_NAMES.items()}  # safetensors' names -> torch dtypes


class UnreadableDtype(OptqError):
    """A tensor of a dtype optq does not read."""


class SafetensorsFiles:
    """The tensors of some safetensors files by name (a later file's tensor of the same name wins)."""

    def __init__(self, files: list[Path]):
        self._entry: dict[str, tuple[Path, torch.dtype, tuple[int, ...], int]] = {}  # file, dtype, shape, offset
        self._fds: dict[Path, int] = {}
        for f in files:
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
            for k, v in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
                if v["dtype"] not in DTYPES:
                    raise UnreadableDtype(f"{f}: tensor {k} has dtype {v['dtype']}, which optq does not read")
                self._entry[k] = (f, DTYPES[v["dtype"]], tuple(v["shape"]), 8 + n + v["data_offsets"][0])
            self._fds[f] = os.open(f, os.O_RDONLY)

    def names(self) -> list[str]:
        """Every tensor, file by file, in the order of their bytes in the file."""
        return list(self._entry)

    def __contains__(self, name: str) -> bool:
        return name in self._entry

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry[name][2]

    def read(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Tensor `name`, or its rows start:stop."""
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

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 (interpreter shutdown)
            pass
