"""Kernels chosen by measurement: the fastest of several implementations of one operation, timed on this
machine at the shape the run uses.

Which kernel wins depends on the CPU more than on its instruction set: on an AMD EPYC with AVX-512 BF16 optq's
native X^T X and causal attention beat PyTorch's by 2-4x, on an Intel Xeon with AMX PyTorch's oneDNN paths beat
them by 3.5x (BENCHMARKS.md, "Kernels chosen per CPU"). So each operation offers its candidates, all exact
enough for the run (the tests bound each against float64), and the first use of an (operation, shape) times
them. The first candidate is the default; another is taken only when it is at least MARGIN faster, so that
near-ties do not flip between runs. The choice is remembered in a JSON file keyed by CPU and torch version
(`remember_in`, set by the runtime beside its native build), so every later run on the machine takes the same
path without timing again: the same bytes run after run (the candidates sum in different orders, so their
last bits differ; see docs/design.md). Processes under torchrun never measure: they take the remembered choice
or the default, so that all of them take the same path. OPTQ_KERNELS=default runs the defaults, whatever
was remembered.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

log = logging.getLogger("optq")

MARGIN = 1.2
REPEATS = 5

_chosen: dict[str, str] = {}
_timings: dict[str, dict[str, float]] = {}
_store: Path | None = None


def machine_key() -> str:
    """What a remembered choice holds for: the CPU model, its core count and the torch version."""
    model = platform.processor() or ""
    try:
        model = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model} x{os.cpu_count()} torch {torch.__version__} threads {torch.get_num_threads()}"


def remember_in(path: Path | None) -> None:
    """Keep choices in `path` (a JSON file shared by the runs on this machine); None keeps them in memory."""
    global _store
    _store = path


def _stored() -> dict:
    if _store is None or not _store.is_file():
        return {}
    try:
        return json.loads(_store.read_text()).get(machine_key(), {})
    except (OSError, ValueError):
        return {}


def _save(key: str, name: str) -> None:
    if _store is None:
        return
    try:
        data = json.loads(_store.read_text()) if _store.is_file() else {}
    except (OSError, ValueError):
        data = {}
    data.setdefault(machine_key(), {})[key] = name
    try:
        _store.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=_store.parent, delete=False, suffix=".tmp") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(f.name, _store)
    except OSError as e:  # a read-only cache costs a re-measure next run, nothing else
        log.debug("kernel choice not saved: %s", e)


def _median_ms(fn: Callable[[], object]) -> float:
    fn()  # warm-up: first-call allocation and kernel selection inside the library
    times = []
    for _ in range(REPEATS):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def fastest(op: str, shape: tuple, names: list[str], trials: Callable[[], dict[str, Callable[[], object]]]) -> str:
    """The name (of `names`, the first being the default) of the implementation to use for `op` at `shape`:
    remembered, or measured now on `trials()`, a callable per name that runs it on the run's tensors without
    changing the run's state (called REPEATS + 1 times each; built only when measuring)."""
    key = f"{op} {'x'.join(map(str, shape))}"
    if os.environ.get("OPTQ_KERNELS") == "default":  # the defaults, whatever was remembered
        return names[0]
    if key in _chosen and _chosen[key] in names:
        return _chosen[key]
    remembered = _stored().get(key)
    if remembered in names:
        _chosen[key] = remembered
        return remembered
    if len(names) == 1 or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # under torchrun every process must take the same path (the bytes must be one process's): measuring in
        # each could disagree, so processes use what a one-process run on the machine remembered, or the default
        _chosen[key] = names[0]
        return names[0]
    times = {name: _median_ms(fn) for name, fn in trials().items()}
    best = min(times, key=times.get)
    choice = best if times[best] * MARGIN < times[names[0]] else names[0]
    _chosen[key], _timings[key] = choice, times
    log.info("kernel for %s: %s (%s)", key, choice, ", ".join(f"{n} {t:.2f} ms" for n, t in times.items()))
    _save(key, choice)
    return choice


def remembered() -> dict[str, str]:
    """The choices remembered for this machine: {"operation shape": kernel}."""
    return dict(_stored())


def choices() -> dict[str, dict]:
    """The choices this process made or read, with the timings it measured (for benchmarks' JSON)."""
    return {key: {"chosen": name, "ms": _timings.get(key)} for key, name in _chosen.items()}


def forget() -> None:
    """Drop this process's choices (tests; the remembered file is left alone)."""
    _chosen.clear()
    _timings.clear()
