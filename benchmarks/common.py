"""Shared helpers of the benchmark scripts: machine info and timed child processes."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"


def machine_info() -> dict:
    import torch

    caps = torch.cpu.get_capabilities()
    model = ""
    try:
        model = next(l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                     if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "memory_gib": round(mem / 2**30, 1),
        "avx512": bool(caps.get("avx512_f")),
        "amx_bf16": bool(caps.get("amx_bf16")),
        "avx512_bf16": bool(caps.get("avx512_bf16")),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }


def run_timed(cmd: list[str], log: Path, env: dict | None = None) -> dict:
    """Run `cmd`, output to `log`; wall seconds and the child's own peak RSS (from the kernel, via wait4)."""
    t0 = time.perf_counter()
    with log.open("w") as f:
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        _, status, usage = os.wait4(p.pid, 0)
    seconds = time.perf_counter() - t0
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        tail = log.read_text()[-3000:]
        raise RuntimeError(f"{' '.join(cmd)} failed with {code}; log {log}:\n{tail}")
    return {"seconds": seconds, "peak_rss_mb": usage.ru_maxrss / 1024}


def optq_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "optq", *args]
