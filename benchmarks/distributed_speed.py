"""Quantization on one process against two (torchrun, gloo): wall time, and what N processes would give.

Runs, one after another, on SmolLM2-135M (the float folder quality_smollm2.py makes) with the same calibration:
  1 process, all threads      (the plain single-process run)
  1 process, 1 thread         (the reference the distributed run must equal byte for byte)
  N processes, 1 thread each  (torchrun --nproc_per_node N)
and checks the N-process checkpoint against the 1-thread single process, byte for byte.

The projection for N GPUs comes from the single-process run's split of time: the per-module solve seconds
(quant_log.csv) and the rest (forward passes, Hessians, I/O). Forward and Hessian work divides by N (the
windows are split); the solves of a group run side by side (module i of a group on rank i % N), so a layer's
solve time becomes the sum over groups of the slowest rank's share. Communication is not modelled.

Usage:
  python benchmarks/distributed_speed.py --nsamples 32 --seqlen 512 [--nproc 2]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, SHARED, machine_info, run_timed  # noqa: E402


def solve_seconds(log: Path) -> list[dict]:
    with log.open() as f:
        return [r for r in csv.DictReader(f)]


def projected(rows: list[dict], total: float, n: int, groups: list[tuple[str, ...]]) -> float:
    """Wall time on n ranks from one rank's run (see the module docstring)."""
    solve = sum(float(r["seconds"]) for r in rows)
    by_layer: dict[str, dict[str, float]] = defaultdict(dict)
    parallel_solve = 0.0
    for r in rows:
        parts = r["module"].split(".")
        i = next((k for k, p in enumerate(parts) if p.isdigit()), None)
        if i is None:  # the lm_head: one module, one rank
            parallel_solve += float(r["seconds"])
        else:
            by_layer[".".join(parts[:i + 1])][".".join(parts[i + 1:])] = float(r["seconds"])
    for modules in by_layer.values():
        for group in groups:
            present = [modules[m] for m in group if m in modules]
            ranks = [sum(present[i::n]) for i in range(n)]
            parallel_solve += max(ranks) if ranks else 0.0
    return (total - solve) / n + parallel_solve


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--flags", default="--bits 4 --group-size 128", help="optq quantize flags")
    ap.add_argument("--work", default=str(REPO / "bench-output" / "distributed"))
    a = ap.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    from quality_smollm2 import export_float

    model = REPO / "bench-output" / "quality" / "smollm2-float"
    export_float(model)
    cal = SHARED / "wikitext-2-tokens" / "wiki2.valid.txt"
    quantize = ["-m", "optq", "quantize", str(model), None, "--dataset", str(cal), "--nsamples", str(a.nsamples),
                "--seqlen", str(a.seqlen), "--overwrite", "--quiet", *a.flags.split()]
    threads = os.cpu_count()

    def run(name: str, nproc: int, nthreads: int) -> dict:
        args = [str(work / name) if x is None else x for x in quantize]
        cmd = [sys.executable, *args] if nproc == 1 else \
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
             "--nproc_per_node", str(nproc), *args]
        timing = run_timed(cmd, work / f"{name}.log", env={"OMP_NUM_THREADS": str(nthreads)})
        print(f"{name}: {timing['seconds']:.1f} s", flush=True)
        return {"run": name, "processes": nproc, "threads_per_process": nthreads, **timing}

    rows = [run("one-process", 1, threads), run("one-process-1-thread", 1, 1),
            run(f"{a.nproc}-processes", a.nproc, max(1, threads // a.nproc))]
    ref, many = work / "one-process-1-thread", work / f"{a.nproc}-processes"
    same = all((ref / f.name).read_bytes() == f.read_bytes() for f in many.glob("*.safetensors"))
    if threads // a.nproc != 1:
        same = None  # the reference has one thread; other thread counts may round the Cholesky differently

    log = solve_seconds(work / "one-process" / "quant_log.csv")
    total = rows[0]["seconds"]
    solve = sum(float(r["seconds"]) for r in log)
    groups = [("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
              ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",)]
    projection = {n: total / projected(log, total, n, groups) for n in (2, 4, 8)}

    print(f"\nSmolLM2-135M, calibration {a.nsamples} x {a.seqlen}, {a.flags}; {threads} cores")
    print(f"{'run':24s} {'procs':>5s} {'threads':>7s} {'wall s':>8s} {'peak RSS MB/proc':>16s}")
    for r in rows:
        print(f"{r['run']:24s} {r['processes']:5d} {r['threads_per_process']:7d} {r['seconds']:8.1f} "
              f"{r['peak_rss_mb']:16.0f}")
    print(f"{a.nproc} processes vs one: {rows[0]['seconds'] / rows[2]['seconds']:.2f}x; "
          f"byte-identical to the 1-thread single process: {same}")
    print(f"single process: solves {solve:.1f} s of {total:.1f} s ({solve / total:.0%}); the rest (forward, "
          f"Hessians, I/O) divides by N")
    print("projected speed-up on N devices (no communication cost): " +
          ", ".join(f"N={n}: {s:.2f}x" for n, s in projection.items()))
    result = {"benchmark": "distributed_speed", "machine": machine_info(), "args": vars(a), "rows": rows,
              "byte_identical": same, "solve_seconds": solve, "projected_speedup": projection}
    (work / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
