"""vLLM's CPU build on optq's checkpoints, side by side with optq's runtime: does it load them, does its greedy
text match optq's, and how fast is each at batch 1 and batch 16.

vLLM lives in its own venv (benchmarks/vllm_env.sh; --vllm-python points at its python). For each checkpoint
(default: SmolLM2-135M-Instruct 4-bit with optq's defaults, i.e. act-order + static groups, and the same with
--no-desc-act; both written here unless --checkpoints names existing ones), one child process in vLLM's venv per
mode (eager, compiled) loads it, answers --prompts chat prompts of the quality report greedily (--answer-tokens),
and times decoding --new tokens per sequence (EOS ignored, median of --runs, prompt included) for one sequence
and for --batch sequences at once. optq does the same in this process (`optq.load`, Transformers' generate).
Same prompt token ids on both sides (the chat template applied here). vLLM's CPU default VLLM_CPU_INT4_W4A8=1
also rounds activations to int8; this script sets 0 (the checkpoint's math) unless --w4a8.

Usage: python benchmarks/vllm_serving.py [--vllm-python /tmp/optq-vllm-venv/bin/python]
       [--checkpoints DIR ...] [--modes eager compiled] [--batch 16]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, machine_info  # noqa: E402

OUT = REPO / "bench-output" / "vllm"
CHECKPOINTS = {"smollm2-4bit-default": [], "smollm2-4bit-no-desc-act": ["--no-desc-act"]}


def default_checkpoints() -> list[Path]:
    paths = []
    for name, flags in CHECKPOINTS.items():
        path = OUT / name
        if not (path / "config.json").exists():
            subprocess.run([sys.executable, "-m", "optq", "quantize", "smollm2", str(path), "--bits", "4",
                            "--quiet", "--overwrite", "--no-report", *flags], check=True)
        paths.append(path)
    return paths


def chat_prompt_ids(tokenizer, count: int) -> list[list[int]]:
    from optq.chat_prompts import CHAT_PROMPTS
    from optq.generation import prompt_ids

    return [prompt_ids(tokenizer, p)[0].tolist() for p, _ in CHAT_PROMPTS[:count]]


def run_vllm(python: str, checkpoint: Path, prompts: list[list[int]], mode: str, a) -> dict:
    env = {**os.environ, "VLLM_CPU_INT4_W4A8": "1" if a.w4a8 else "0",
           "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    req = {"checkpoint": str(checkpoint), "prompts": prompts, "answer_tokens": a.answer_tokens, "dtype": a.dtype,
           "eager": mode == "eager", "new_tokens": a.new, "runs": a.runs, "batch": a.batch}
    log = OUT / f"{checkpoint.name}.vllm-{mode}.log"
    proc = subprocess.run([python, str(Path(__file__).with_name("vllm_child.py"))], input=json.dumps(req),
                          capture_output=True, text=True, env=env)
    log.write_text(proc.stdout + proc.stderr)
    line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
    if line is None:
        tail = [l for l in proc.stderr.splitlines() if "Error" in l][-1:] or proc.stderr.splitlines()[-1:]
        return {"loaded": False, "error": tail[0] if tail else f"exit {proc.returncode}", "log": str(log)}
    return {"loaded": True, **json.loads(line[len("RESULT "):])}


def run_optq(checkpoint: Path, prompts: list[list[int]], a) -> dict:
    import torch

    import optq
    from optq.generation import greedy_answers

    t0 = time.perf_counter()
    model, tokenizer = optq.load(checkpoint, dtype=a.dtype), None
    load_s = time.perf_counter() - t0
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    answers = greedy_answers(model, tokenizer, [torch.tensor([p]) for p in prompts], a.answer_tokens, batch=1)

    def tok_s(ids: torch.Tensor) -> float:
        def gen():
            with torch.inference_mode():
                model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                               max_new_tokens=a.new, min_new_tokens=a.new, pad_token_id=tokenizer.eos_token_id)
        gen()  # warm-up
        times = []
        for _ in range(a.runs):
            t = time.perf_counter()
            gen()
            times.append(time.perf_counter() - t)
        return ids.shape[0] * a.new / statistics.median(times)

    first = torch.tensor([prompts[0]])
    return {"loaded": True, "load_s": load_s, "answers": answers, "batch1_tok_s": tok_s(first),
            "batchN_tok_s": tok_s(first.repeat(a.batch, 1)), "model": model}


def divergences(model, prompts, ours, theirs, eos: set[int]) -> list[dict]:
    """Where each differing answer parts: the position, both tokens, and optq's own logit gap between its token
    and vLLM's there (a small gap: a near-tie that bf16 rounding in either runtime can tip)."""
    import torch

    out = []
    for i, (p, x, y) in enumerate(zip(prompts, ours, theirs)):
        x, y, n = parting(x, y, eos)
        if x == y:
            continue
        if n >= min(len(x), len(y)):  # one is a prefix of the other (an end-of-turn token taken)
            out.append({"prompt": i, "position": n, "note": "one answer ends earlier"})
            continue
        with torch.inference_mode():
            logits = model(torch.tensor([p + x[:n]])).logits[0, -1].float()
        out.append({"prompt": i, "position": n, "optq_token": x[n], "vllm_token": y[n],
                    "optq_logit_gap": float(logits[x[n]] - logits[y[n]]),
                    "optq_top2_gap": float(logits.topk(2).values[0] - logits.topk(2).values[1])})
    return out


def parting(x: list[int], y: list[int], eos: set[int]) -> tuple[list[int], list[int], int]:
    """Both answers without stop tokens (vLLM drops the stop token from its output, optq keeps it) and the
    length of their common prefix."""
    x, y = [t for t in x if t not in eos], [t for t in y if t not in eos]
    return x, y, next((i for i, (u, v) in enumerate(zip(x, y)) if u != v), min(len(x), len(y)))


def agreement(ours: list[list[int]], theirs: list[list[int]], eos: set[int]) -> dict:
    parts = [parting(x, y, eos) for x, y in zip(ours, theirs)]
    return {"identical": sum(x == y for x, y, _ in parts), "of": len(ours),
            "median_common_prefix": statistics.median(n for _, _, n in parts)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vllm-python", default=os.environ.get("VLLM_PYTHON", "/tmp/optq-vllm-venv/bin/python"))
    ap.add_argument("--checkpoints", nargs="*", type=Path)
    ap.add_argument("--modes", nargs="+", default=["eager", "compiled"], choices=["eager", "compiled"])
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--answer-tokens", type=int, default=48)
    ap.add_argument("--new", type=int, default=128, help="decoded tokens per sequence in the speed runs")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--w4a8", action="store_true", help="leave vLLM's int8-activation CPU path on")
    a = ap.parse_args()
    if not Path(a.vllm_python).exists():
        sys.exit(f"no vLLM venv at {a.vllm_python}: run benchmarks/vllm_env.sh first (or pass --vllm-python)")
    OUT.mkdir(parents=True, exist_ok=True)
    from transformers import AutoTokenizer

    rows = []
    for ckpt in a.checkpoints or default_checkpoints():
        tokenizer = AutoTokenizer.from_pretrained(ckpt)
        prompts = chat_prompt_ids(tokenizer, a.prompts)
        eos = {tokenizer.eos_token_id}
        ours = run_optq(ckpt, prompts, a)
        rows.append({"checkpoint": ckpt.name, "runtime": "optq",
                     **{k: v for k, v in ours.items() if k not in ("answers", "model")}})
        for mode in a.modes:
            theirs = run_vllm(a.vllm_python, ckpt, prompts, mode, a)
            row = {"checkpoint": ckpt.name, "runtime": f"vllm-{mode}",
                   **{k: v for k, v in theirs.items() if k != "answers"}}
            if theirs["loaded"]:
                row["greedy_vs_optq"] = agreement(ours["answers"], theirs["answers"], eos)
                row["divergences"] = divergences(ours["model"], prompts, ours["answers"], theirs["answers"], eos)
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\nbatch-1 and batch-{a.batch} decode tokens/s ({a.new} new tokens, {a.dtype}, "
          f"VLLM_CPU_INT4_W4A8={int(a.w4a8)}); greedy answers to {a.prompts} chat prompts against optq's")
    print(f"| checkpoint | runtime | loads | batch 1 tok/s | batch {a.batch} tok/s | same answers | median common prefix |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        g = r.get("greedy_vs_optq")
        print(f"| {r['checkpoint']} | {r['runtime']} | {'yes' if r['loaded'] else 'no: ' + r['error']} | "
              + (f"{r['batch1_tok_s']:.1f} | {r['batchN_tok_s']:.1f} | " if r["loaded"] else "- | - | ")
              + (f"{g['identical']}/{g['of']} | {g['median_common_prefix']} |" if g else "- | - |"))
    result = {"machine": machine_info(), "settings": {k: str(v) for k, v in vars(a).items()}, "rows": rows}
    (OUT / "results.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result["machine"]))


if __name__ == "__main__":
    main()
