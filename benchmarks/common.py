"""Shared helpers of the benchmark scripts: machine info and timed child processes."""

from __future__ import annotations

import json
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


# Peak RSS of a command, measured cleanly: Linux carries a process's ru_maxrss across exec, so a command
# started straight from this (large, torch-importing) process would report at least this process's size. This
# small trampoline forks first (a fork starts a fresh maximum) and reports the grandchild's own peak.
_TRAMPOLINE = """
import json, os, sys
out, cmd = sys.argv[1], sys.argv[2:]
pid = os.fork()
if pid == 0:
    try:
        os.execvp(cmd[0], cmd)
    finally:
        os._exit(127)
_, status, usage = os.wait4(pid, 0)
json.dump({"peak_rss_kb": usage.ru_maxrss, "code": os.waitstatus_to_exitcode(status)}, open(out, "w"))
sys.exit(min(255, abs(os.waitstatus_to_exitcode(status))))
"""


def run_timed(cmd: list[str], log: Path, env: dict | None = None) -> dict:
    """Run `cmd`, output to `log`; wall seconds and the command's own peak RSS (from the kernel, via wait4)."""
    usage_file = log.with_name(log.name + ".usage.json")
    t0 = time.perf_counter()
    with log.open("w") as f:
        p = subprocess.run([sys.executable, "-c", _TRAMPOLINE, str(usage_file), *cmd], stdout=f,
                           stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    seconds = time.perf_counter() - t0
    usage = json.loads(usage_file.read_text())
    usage_file.unlink()
    if usage["code"] != 0 or p.returncode != 0:
        tail = log.read_text()[-3000:]
        raise RuntimeError(f"{' '.join(cmd)} failed with {usage['code']}; log {log}:\n{tail}")
    return {"seconds": seconds, "peak_rss_mb": usage["peak_rss_kb"] / 1024}


def save_random_model(folder: Path, config, std: float) -> None:
    """A seeded random-weight bf16 model of `config` (a Transformers config) in `folder` (once: kept if there),
    matrices drawn from N(0, std), with TinyStories-656K's tokenizer (only token ids matter to speed and
    loading checks). Never for quality."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    if (folder / "config.json").exists():
        return
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, std)
    model.save_pretrained(folder)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(SHARED / "models" / "TinyStories-656K" / f, folder / f)


def optq_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "optq", *args]
