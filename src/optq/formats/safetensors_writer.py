"""A safetensors writer that takes tensors one at a time, in any order, in pieces.

safetensors' own `save_file` needs every tensor of a file in memory at once; a streamed quantization of a
model larger than RAM produces its tensors layer by layer and must not hold a 4 GB shard. Every tensor's name,
dtype and shape is known before the first one is computed, so the whole layout (shard of each tensor, header,
offsets) is fixed up front: each file gets its header and its full size at open, and every tensor (or a range
of its rows) is written at its offset when it is ready. Both the in-memory and the streamed paths write
through this class, so the two produce the same bytes by construction.

Format (https://github.com/huggingface/safetensors): 8-byte little-endian header length N, N bytes of JSON
(padded with spaces to a multiple of 8), then the tensors' bytes, contiguous and without gaps. Tensors are laid
out by decreasing element size, as safetensors does, so every tensor is aligned to its element size.
"""

from __future__ import annotations

import json
import math
import os
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

DTYPE_NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()

    @property
    def row_bytes(self) -> int:
        """Bytes of one index along the first dimension (the unit of a partial write)."""
        return self.nbytes // self.shape[0] if self.shape and self.shape[0] else self.nbytes


def shard_plan(specs: list[TensorSpec], max_shard_size: int) -> list[list[TensorSpec]]:
    """Tensors in their given order, cut into files of at most `max_shard_size` bytes (a larger tensor gets a
    file of its own), as Transformers shards."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for s in specs:
        if shards[-1] and size + s.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(s)
        size += s.nbytes
    return shards


def shard_file_names(count: int) -> list[str]:
    if count == 1:
        return [SINGLE_FILE]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def _header(specs: list[TensorSpec], metadata: dict[str, str] | None) -> tuple[bytes, dict[str, int]]:
    """The padded header (with its length prefix) and each tensor's offset in the data section."""
    order = sorted(range(len(specs)), key=lambda i: -torch.empty((), dtype=specs[i].dtype).element_size())
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = metadata
    offsets: dict[str, int] = {}
    pos = 0
    for i in order:  # stable: the given order within one element size
        s = specs[i]
        if s.dtype not in DTYPE_NAMES:
            raise ValueError(f"tensor {s.name}: dtype {s.dtype} has no safetensors name")
        header[s.name] = {"dtype": DTYPE_NAMES[s.dtype], "shape": list(s.shape), "data_offsets": [pos, pos + s.nbytes]}
        offsets[s.name] = pos
        pos += s.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text, offsets


class SafetensorsWriter:
    """Write the tensors of `specs` into `folder` (one file, or shards plus an index) in any order.

    `write(name, tensor, row=0)` puts `tensor` at rows [row, row + len) of tensor `name`; `close()` checks
    that every byte of every tensor was written and writes the index. An OSError (disk full, ...) propagates."""

    def __init__(self, folder: str | os.PathLike, specs: list[TensorSpec], max_shard_size: int,
                 metadata: dict[str, str] | None = None):
        if sys.byteorder != "little":
            raise RuntimeError("safetensors is little-endian; writing it on a big-endian machine is not supported")
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise ValueError("duplicate tensor names")
        self.folder = Path(folder)
        self.specs = {s.name: s for s in specs}
        self.shards = shard_plan(specs, max_shard_size)
        self.files = shard_file_names(len(self.shards))
        self._where: dict[str, tuple[int, int]] = {}  # name -> (fd, absolute offset of its first byte)
        self._path_of: dict[int, Path] = {}
        self._written: dict[str, int] = {s.name: 0 for s in specs}
        self._fds: list[int] = []
        try:
            for fname, shard in zip(self.files, self.shards):
                header, offsets = _header(shard, metadata)
                path = self.folder / fname
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
                self._fds.append(fd)
                self._path_of[fd] = path
                with _naming(path):
                    os.pwrite(fd, header, 0)
                    # The full length now, so a tensor written late fills a hole rather than growing the file.
                    os.ftruncate(fd, len(header) + sum(s.nbytes for s in shard))
                for s in shard:
                    self._where[s.name] = (fd, len(header) + offsets[s.name])
        except BaseException:
            self._close_fds()
            raise

    def write(self, name: str, tensor: torch.Tensor, row: int = 0) -> None:
        spec = self.specs.get(name)
        if spec is None:
            raise KeyError(f"tensor {name} is not in this checkpoint's layout")
        if tensor.dtype != spec.dtype:
            raise ValueError(f"tensor {name}: dtype {tensor.dtype}, the layout says {spec.dtype}")
        if tuple(tensor.shape[1:]) != spec.shape[1:] or (spec.shape and row + tensor.shape[0] > spec.shape[0]) \
                or (not spec.shape and (tuple(tensor.shape) != () or row)):
            raise ValueError(f"tensor {name}: rows [{row}, {row + (tensor.shape[0] if tensor.dim() else 1)}) of "
                             f"shape {tuple(tensor.shape)} do not fit {spec.shape}")
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        fd, start = self._where[name]
        offset = start + row * spec.row_bytes
        view = memoryview(data)
        with _naming(self._path_of[fd]):
            while len(view):
                n = os.pwrite(fd, view, offset)
                view = view[n:]
                offset += n
        self._written[name] += data.nbytes

    def missing(self) -> list[str]:
        return [n for n, s in self.specs.items() if self._written[n] != s.nbytes]

    def close(self) -> list[str]:
        """Finish the files (and the index, when sharded); returns the file names."""
        try:
            missing = self.missing()
            if missing:
                raise RuntimeError(f"{len(missing)} tensors were not (fully) written, e.g. {missing[:3]}")
            for fd in self._fds:
                with _naming(self._path_of[fd]):
                    os.fsync(fd)
        finally:
            self._close_fds()
        if len(self.files) == 1:
            return list(self.files)
        weight_map = {s.name: fname for fname, shard in zip(self.files, self.shards) for s in shard}
        index = {"metadata": {"total_size": sum(s.nbytes for s in self.specs.values())},
                 "weight_map": dict(sorted(weight_map.items()))}
        (self.folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        return self.files + [INDEX_FILE]

    def _close_fds(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []


class _naming:
    """Give an OSError without a file name (pwrite, ftruncate) the name of the file being written."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if isinstance(exc, OSError) and not exc.filename:
            raise OSError(exc.errno, exc.strerror, str(self.path)) from None
        return False


def write_tensors(folder: str | os.PathLike, tensors: dict[str, torch.Tensor], max_shard_size: int,
                  metadata: dict[str, str] | None = None) -> list[str]:
    """Write a dict of tensors held in memory (in the dict's order) through SafetensorsWriter."""
    specs = [TensorSpec(k, t.dtype, tuple(t.shape)) for k, t in tensors.items()]
    writer = SafetensorsWriter(folder, specs, max_shard_size, metadata)
    try:
        for k, t in tensors.items():
            writer.write(k, t)
    except BaseException:
        writer._close_fds()
        raise
    return writer.close()
