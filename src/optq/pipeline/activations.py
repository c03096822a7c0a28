"""Calibration hidden states between layers: in memory, or spilled to files beyond a limit."""

from __future__ import annotations

import torch

from ..errors import OptqError


def _dedupe(obj, seen: dict[tuple, list[torch.Tensor]]):
    """`obj` with each tensor replaced by an equal one already in `seen` (position embeddings, masks: the same
    for every window of one length), so such arguments are held once rather than once per window."""
    if isinstance(obj, torch.Tensor):
        tag = (obj.dtype, tuple(obj.shape), obj.device)
        for t in seen.setdefault(tag, []):
            if t is obj or torch.equal(t, obj):
                return t
        seen[tag].append(obj)
        return obj
    if isinstance(obj, tuple):
        return tuple(_dedupe(o, seen) for o in obj)
    if isinstance(obj, list):
        return [_dedupe(o, seen) for o in obj]
    if isinstance(obj, dict):
        return {k: _dedupe(v, seen) for k, v in obj.items()}
    return obj


class _SpillFile:
    """One spill file, written with pwrite and read with pread."""

    def __init__(self, fd: int, nbytes: int):
        import os
        import weakref

        self.fd, self.nbytes = fd, nbytes
        weakref.finalize(self, os.close, fd)

    def write(self, offset: int, t: torch.Tensor) -> None:
        import os

        data = memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy())
        while len(data):
            n = os.pwrite(self.fd, data, offset)
            data, offset = data[n:], offset + n

    def read(self, offset: int, out: torch.Tensor) -> None:
        """Fill `out` (a contiguous uint8 tensor) from `offset`."""
        import os

        data = memoryview(out.numpy())
        while len(data):
            n = os.preadv(self.fd, [data], offset)
            if n == 0:
                raise OptqError("a calibration activation spill file ended early: was its folder changed under "
                                "the run?")
            data, offset = data[n:], offset + n


class SpillFiles:
    """The files that spilled activations live in during one quantization run, each unlinked as soon as it is
    opened (nothing is left behind). Windows are written with pwrite and read back with pread into one
    buffer per store: reading through a memory map instead cost a page fault per 4 KiB read and an madvise
    per window to keep the pages out of the process, ~2 s per SmolLM2 layer at 128 x 2048 (see
    docs/design.md).

    A store that is done with (a replayed block's kept inputs) gives its file back, and the next store of the
    same size takes it: rewriting a file's cached pages is ~30x cheaper than writing fresh ones. A new file's
    blocks are allocated up front (fallocate), which turns a full disk into a clear error at once."""

    def __init__(self, folder):
        self.folder = folder
        self._free: dict[int, list[_SpillFile]] = {}

    def take(self, nbytes: int) -> _SpillFile:
        """A file of `nbytes` (a multiple of the page size)."""
        free = self._free.get(nbytes)
        if free:
            return free.pop()
        import os
        import tempfile

        fd, path = tempfile.mkstemp(prefix=".optq-activations-", dir=self.folder)
        try:
            _allocate(fd, nbytes, self.folder)
            return _SpillFile(fd, nbytes)
        except BaseException:
            os.close(fd)
            raise
        finally:
            os.unlink(path)

    def give_back(self, file: _SpillFile) -> None:
        self._free.setdefault(file.nbytes, []).append(file)


def _allocate(fd: int, nbytes: int, folder) -> None:
    """Give the file `nbytes` of disk blocks now (Linux fallocate), or at least that size (ftruncate: blocks
    allocated at first write) where the filesystem cannot."""
    import ctypes
    import errno
    import os

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fallocate = libc.fallocate
        fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    except (OSError, AttributeError):
        fallocate = None
    if fallocate is not None and fallocate(fd, 0, 0, nbytes) != 0:
        err = ctypes.get_errno()
        if err == errno.ENOSPC:
            raise OptqError(f"no room for {nbytes / 1e6:.0f} MB of spilled calibration activations in {folder}: "
                            "free disk space there, or give more memory to --max-activation-memory, or fewer "
                            "or shorter calibration windows (--nsamples, --seqlen)")
        fallocate = None  # not supported by this filesystem
    if fallocate is None:
        os.ftruncate(fd, nbytes)


class HiddenStates:
    """The hidden states of every calibration window at one point of the model, in memory or, when they
    would exceed --max-activation-memory, in a file of `spill`.

    A spilled window is read into one buffer of the store: what `store[j]` returns is valid until the next
    read of the same store (every reader uses a window and is done with it before reading the next)."""

    def __init__(self, shapes: list[tuple[int, ...]], dtype: torch.dtype, device, spill: SpillFiles | None = None):
        self.shapes, self.dtype, self.device, self.spill = shapes, dtype, device, spill
        self._tensors: list[torch.Tensor | None] = [None] * len(shapes)
        self._file = None
        self._buffer: torch.Tensor | None = None
        if spill is not None:
            import os

            self._item = torch.empty((), dtype=dtype).element_size()
            page = os.sysconf("SC_PAGE_SIZE")
            self._offsets, pos = [], 0
            for shape in shapes:
                self._offsets.append(pos)
                pos += -(-self._bytes(shape) // page) * page
            self._file = spill.take(max(pos, page))

    def _bytes(self, shape: tuple[int, ...]) -> int:
        import math

        return math.prod(shape) * self._item

    def copy(self) -> "HiddenStates":
        out = self.empty_like()
        for j in range(len(self)):
            out[j] = self[j]
        return out

    def empty_like(self, last_dim: int | None = None) -> "HiddenStates":
        """A store of the same windows (with another last dimension, if given), in memory or spilled alike."""
        shapes = self.shapes if last_dim is None else [(*s[:-1], last_dim) for s in self.shapes]
        return HiddenStates(shapes, self.dtype, self.device, self.spill)

    def alias(self) -> "HiddenStates":
        """Another store holding the same windows now, which writes to either leave the other alone: a
        shallow copy in memory, a full copy when spilled."""
        if self.spilled:
            return self.copy()
        out = HiddenStates(self.shapes, self.dtype, self.device)
        out._tensors = list(self._tensors)
        return out

    def recycle(self) -> None:
        """Done with: the file goes back to `spill` for the next store (memory is just dropped)."""
        if self._file is not None:
            self.spill.give_back(self._file)
        self._file = self._buffer = None
        self._tensors = [None] * len(self.shapes)
        self.shapes = []

    def __len__(self) -> int:
        return len(self.shapes)

    @property
    def spilled(self) -> bool:
        return self._file is not None

    def __getitem__(self, j: int) -> torch.Tensor:
        if self._file is None:
            return self._tensors[j]
        n = self._bytes(self.shapes[j])
        if self._buffer is None:
            self._buffer = torch.empty(max(self._bytes(s) for s in self.shapes), dtype=torch.uint8)
        self._file.read(self._offsets[j], self._buffer[:n])
        return self._buffer[:n].view(self.dtype).view(self.shapes[j]).to(self.device)

    def __setitem__(self, j: int, t: torch.Tensor) -> None:
        """Window j is now `t` (in memory the tensor itself is held: its owner must not write into it later)."""
        if self._file is None:
            self._tensors[j] = t
        else:
            if tuple(t.shape) != tuple(self.shapes[j]):
                raise ValueError(f"window {j}: shape {tuple(t.shape)}, expected {tuple(self.shapes[j])}")
            self._file.write(self._offsets[j], t.to(device="cpu", dtype=self.dtype))


class LayerInputs:
    """(hidden, positional args, kwargs) of each calibration window at the input of the current layer."""

    def __init__(self, hidden: HiddenStates, extras: list[tuple]):
        self.hidden, self.extras = hidden, extras

    def __len__(self) -> int:
        return len(self.extras)

    def __getitem__(self, j: int):
        return (self.hidden[j], *self.extras[j])

    def __iter__(self):
        for j, (args, kwargs) in enumerate(self.extras):
            yield self.hidden[j], args, kwargs

    def with_hidden(self, hidden: HiddenStates) -> "LayerInputs":
        return LayerInputs(hidden, self.extras)
