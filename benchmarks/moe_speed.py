"""Mixture-of-experts quantization: time, peak RSS and the share of the FLOP floor on a Qwen3-MoE-shaped model.

A random-weight Qwen3-MoE (seeded; Qwen3-30B-A3B's shapes by default: hidden 2048, 128 experts of
intermediate 768, 8 routed per token, 32 query / 4 key-value heads of 128, vocabulary 151936) cut to --layers
decoder layers (every layer has the same shapes, so time per layer extrapolates to the 48 of the real model),
written as bf16 safetensors in the published per-expert layout, then quantized by `optq quantize` (streamed,
defaults, --dataset pydoc; the tokenizer is TinyStories-656K's from ../shared/data: only token ids matter here).
Random weights: this measures speed and memory, never quality.

The floor is the arithmetic at this machine's measured matmul rates: the forward (attention and the 8 routed
experts per token) at the bf16 rate, the Hessians (each token's input to each of its experts' gate/up and down,
and the attention inputs) at the float32 rate, and the solves (4/3 d^3 + out d^2 per module).

Usage: python benchmarks/moe_speed.py [--layers 2] [--nsamples 32] [--seqlen 2048] [--experts 128]
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, machine_info, optq_cmd, run_timed, save_random_model  # noqa: E402
from quantize_speed import matmul_rate  # noqa: E402

SHAPE = dict(hidden_size=2048, moe_intermediate_size=768, intermediate_size=6144, num_attention_heads=32,
             num_key_value_heads=4, head_dim=128, vocab_size=151936, max_position_embeddings=4096)


def build(folder: Path, layers: int, experts: int, top_k: int) -> dict:
    from transformers import AutoConfig

    cfg = AutoConfig.for_model("qwen3_moe", **SHAPE, num_hidden_layers=layers, num_experts=experts,
                               num_experts_per_tok=top_k, norm_topk_prob=True, tie_word_embeddings=False)
    save_random_model(folder, cfg, std=0.02)
    return cfg.to_dict()


def flop_floor(cfg: dict, tokens: int, seqlen: int) -> dict:
    h, inter, layers = cfg["hidden_size"], cfg["moe_intermediate_size"], cfg["num_hidden_layers"]
    q, kv = cfg["num_attention_heads"] * cfg["head_dim"], cfg["num_key_value_heads"] * cfg["head_dim"]
    experts = cfg.get("num_experts") or cfg["num_local_experts"]  # Transformers 5 writes the second name
    top_k = cfg["num_experts_per_tok"]
    attention_linear = h * (q + 2 * kv) + q * h
    routed = top_k * 3 * h * inter + h * experts
    attention = 2 * 2 * q * (seqlen + 1) / 2
    forward = layers * tokens * (2 * (attention_linear + routed) + attention)
    hessian = layers * 2 * tokens * (h * h + q * q + top_k * (h * h + inter * inter))
    modules = [(h, q), (h, kv), (h, kv), (q, h)] + experts * [(h, inter), (h, inter), (inter, h)]
    solve = layers * sum(4 / 3 * d**3 + o * d * d for d, o in modules)
    return {"forward": forward, "hessian": hessian, "solve": solve}


def routing(log: Path) -> dict:
    """Tokens per expert (from each expert's gate/up row in quant_log.csv), and the experts rounded."""
    rows = list(csv.DictReader(log.open()))
    tokens = [int(r["samples"]) for r in rows if ".experts." in r["module"] and r["module"].endswith("gate_proj")]
    rounded = sum(1 for r in rows if ".experts." in r["module"] and r["note"].startswith("rtn fallback"))
    return {"min": min(tokens), "median": statistics.median(tokens), "max": max(tokens),
            "expert_linears_rounded": rounded}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--work", default=str(REPO / "bench-output" / "moe-speed"))
    a = ap.parse_args()
    import torch

    work = Path(a.work).resolve()
    model = work / f"qwen3moe-{a.layers}l-{a.experts}e-top{a.top_k}"
    cfg = build(model, a.layers, a.experts, a.top_k)
    out = work / f"{model.name}-gptq4"
    cmd = optq_cmd("quantize", str(model), str(out), "--bits", "4", "--dataset", "pydoc", "--nsamples",
                   str(a.nsamples), "--seqlen", str(a.seqlen), "--overwrite", "--no-report", "--stream")
    timing_file = out.with_suffix(".timing.json")
    if not timing_file.exists() or not (out / "config.json").exists():
        timing_file.write_text(json.dumps(run_timed(cmd, out.with_suffix(".log"))))
    timing = json.loads(timing_file.read_text())
    flops = flop_floor(cfg, a.nsamples * a.seqlen, a.seqlen)
    rates = {"bf16": matmul_rate(torch.bfloat16, 2048, 2048, 2048), "fp32": matmul_rate(torch.float32, 2048, 2048, 2048)}
    floor = flops["forward"] / rates["bf16"] + (flops["hessian"] + flops["solve"]) / rates["fp32"]
    size_gb = sum(f.stat().st_size for f in model.glob("*.safetensors")) / 1e9
    route = routing(out / "quant_log.csv")
    row = {**timing, "floor_seconds": floor, "floor_share": floor / timing["seconds"],
           "seconds_per_layer": timing["seconds"] / a.layers, "model_gb": size_gb, "routing": route}
    print(f"Qwen3-MoE shape, {a.layers} layers x {a.experts} experts (top {a.top_k}), {size_gb:.1f} GB bf16; "
          f"calibration {a.nsamples} x {a.seqlen} (pydoc)")
    print("| wall s | s per layer | peak RSS MB | FLOP floor s | floor share | tokens per expert min / median / max "
          "| expert linears rounded |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {timing['seconds']:.0f} | {row['seconds_per_layer']:.1f} | {timing['peak_rss_mb']:.0f} | {floor:.0f} | "
          f"{row['floor_share']:.1%} | {route['min']} / {route['median']:.0f} / {route['max']} | "
          f"{route['expert_linears_rounded']} |")
    print(json.dumps({"machine": machine_info(), "settings": vars(a), "flops": flops, "rates": rates, **row}))


if __name__ == "__main__":
    main()
