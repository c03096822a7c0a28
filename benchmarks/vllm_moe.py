"""Does vLLM's CPU build load optq's MoE checkpoints, and answer as optq does?

Tiny random-weight Qwen3-MoE and Mixtral models (seeded; shapes vLLM's CPU kernels take: head size 64, group
size 128), quantized by `optq quantize` with its defaults at 4 bits (pydoc calibration), then loaded by vLLM
(benchmarks/vllm_env.sh's venv, through vllm_child.py) and by optq: greedy continuations of a few random
prompts compared token by token. Random weights: a loading and agreement check, not quality.

Usage: python benchmarks/vllm_moe.py [--vllm-python /work/vllm-env/venv/bin/python]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, machine_info, optq_cmd, run_timed, save_random_model  # noqa: E402

SHAPES = {
    "qwen3_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=256, head_dim=64),
    "mixtral": dict(num_local_experts=8, num_experts_per_tok=2),
}
BASE = dict(vocab_size=2048, hidden_size=512, intermediate_size=256, num_hidden_layers=2, num_attention_heads=8,
            num_key_value_heads=4, max_position_embeddings=1024, tie_word_embeddings=False)


def build(kind: str, folder: Path) -> None:
    from transformers import AutoConfig

    save_random_model(folder, AutoConfig.for_model(kind, **BASE, **SHAPES[kind]), std=0.05)


def optq_answers(model, prompts: list[list[int]], tokens: int) -> list[list[int]]:
    import torch

    out = []
    for ids in prompts:
        gen = model.generate(torch.tensor([ids]), max_new_tokens=tokens, do_sample=False)
        out.append(gen[0, len(ids):].tolist())
    return out


def margin(model, prompt: list[int], mine: list[int], theirs: list[int], at: int) -> float:
    """optq's log-probability of its own token minus vLLM's token at the first difference (a near-tie is ~0)."""
    import torch

    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([prompt + mine[:at]])).logits[0, -1].float(), -1)
    return float(logp[mine[at]] - logp[theirs[at]])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vllm-python", default=os.environ.get("VLLM_PYTHON", "/tmp/optq-vllm-venv/bin/python"))
    ap.add_argument("--work", default=str(REPO / "bench-output" / "vllm-moe"))
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="both sides' dtype")
    a = ap.parse_args()
    import torch

    work = Path(a.work).resolve()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, BASE["vocab_size"], (24,), generator=g).tolist() for _ in range(4)]
    rows = []
    for kind in SHAPES:
        folder, ckpt = work / kind, work / f"{kind}-gptq4"
        build(kind, folder)
        if not (ckpt / "config.json").exists():
            run_timed(optq_cmd("quantize", str(folder), str(ckpt), "--bits", "4", "--dataset", "pydoc",
                               "--nsamples", "32", "--seqlen", "256", "--no-report"), ckpt.with_suffix(".log"))
        import optq

        model = optq.load(ckpt, dtype=a.dtype)
        mine = optq_answers(model, prompts, a.tokens)
        req = {"checkpoint": str(ckpt), "dtype": a.dtype, "eager": True, "batch": 1, "prompts": prompts,
               "answer_tokens": a.tokens, "new_tokens": 8, "runs": 1}
        env = {**os.environ, "VLLM_CPU_INT4_W4A8": "0", "VLLM_CPU_KVCACHE_SPACE": "1"}
        child = subprocess.run([a.vllm_python, str(Path(__file__).parent / "vllm_child.py")], input=json.dumps(req),
                               capture_output=True, text=True, env=env)
        line = next((x for x in child.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            err = [x for x in child.stderr.splitlines() if "Error" in x or "error" in x]
            rows.append({"model": kind, "loaded": False, "error": (err[-1] if err else child.stderr[-500:])})
        else:
            theirs = json.loads(line[7:])["answers"]
            same = sum(x == y for x, y in zip(mine, theirs))
            first = [next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), None) for x, y in zip(mine, theirs)]
            margins = [None if d is None else round(margin(model, p, x, y, d), 4)
                       for p, x, y, d in zip(prompts, mine, theirs, first)]
            rows.append({"model": kind, "loaded": True, "identical": same, "of": len(prompts),
                         "first_difference": first, "logprob_margin_there": margins})
        print(json.dumps(rows[-1]), flush=True)
    print(json.dumps({"machine": machine_info(), "rows": rows}))


if __name__ == "__main__":
    main()
