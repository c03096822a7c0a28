"""Does torch.compile of the decode step pay on CPU? Eager (dynamic cache) against Transformers' own compiled
decode (static cache + torch.compile of the forward, inductor), same checkpoint, same process.

Per-step time = (generate 1 + N new tokens - generate 1 new token) / N, median of --runs; the first compiled
generate (compilation) is reported separately.
Usage: python benchmarks/compile_decode.py CHECKPOINT [--new-tokens 64] [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info  # noqa: E402


def step_ms(model, ids, new: int, runs: int) -> float:
    kw = dict(do_sample=False, pad_token_id=0)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=new + 1, min_new_tokens=new + 1, **kw)
        long = time.perf_counter() - t
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)
        times.append((long - (time.perf_counter() - t)) / new * 1e3)
    return sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args()

    import torch

    from optq.api import load_any
    from optq.runtime.compiled import use_compiled_decode

    model, _ = load_any(a.checkpoint, "auto")
    ids = torch.randint(0, 1000, (1, 32), generator=torch.Generator().manual_seed(0))
    rows = {}
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
        rows["eager"] = step_ms(model, ids, a.new_tokens, a.runs)
        use_compiled_decode(model)  # what `optq generate/bench --compile` does
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=a.new_tokens + 1, min_new_tokens=a.new_tokens + 1, do_sample=False,
                       pad_token_id=0)
        model.generate(ids, max_new_tokens=1, min_new_tokens=1, do_sample=False, pad_token_id=0)
        compile_s = time.perf_counter() - t
        rows["compiled (static cache)"] = step_ms(model, ids, a.new_tokens, a.runs)
    print(f"{'mode':26s} {'ms / decode step':>16s} {'tokens/s':>9s}")
    for k, v in rows.items():
        print(f"{k:26s} {v:16.2f} {1e3 / v:9.1f}")
    print(f"first compiled generate (compilation): {compile_s:.1f} s")
    print(json.dumps({"benchmark": "compile_decode", "machine": machine_info(), "args": vars(a),
                      "step_ms": rows, "compile_seconds": compile_s}))


if __name__ == "__main__":
    main()
