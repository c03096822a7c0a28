"""Handing freed memory back to the operating system."""

from __future__ import annotations


def return_freed_memory() -> None:
    """Give freed heap memory back to the OS. glibc keeps freed blocks mapped and, after large frees, raises
    its mmap threshold so later large blocks come from the heap: a streamed run that frees one layer and
    reads the next then grew ~15 MB of RSS per layer (0.4 of a layer), and a loaded 1B 4-bit model kept
    ~0.7 GB of unpacking temporaries. malloc_trim releases both."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to do


def available_memory() -> int | None:
    """MemAvailable of /proc/meminfo in bytes (None where there is none)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


# Calibration runs whose per-window float32 temporaries reach this size map large allocations (8B-class
# layers: 512 tokens x 14336 x 4 B = 29 MB); smaller ones (SmolLM2: 2048 x 1536 x 4 B = 12.6 MB) keep glibc's
# default, whose heap reuses them window after window.
MAPPED_TEMPORARIES = 16 << 20

# glibc's mallopt parameter number of M_MMAP_THRESHOLD.
_M_MMAP_THRESHOLD = -3
LARGE_ALLOCATION = 4 << 20


def map_large_allocations() -> None:
    """Serve every allocation of LARGE_ALLOCATION bytes or more with its own mmap, returned to the OS as soon as
    it is freed. glibc otherwise raises its threshold up to 32 MB after large frees, so a forward pass's
    per-window activations (15-60 MB for an 8B layer) pile up in the heap between malloc_trim calls, on top of
    the next allocation: they were a few hundred MB of the 8B run's peak. Setting it also turns off glibc's
    dynamic adjustment; the cost is a page fault per 4 KB of each large tensor, small beside its arithmetic."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, LARGE_ALLOCATION)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to do
