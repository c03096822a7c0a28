"""Microbenchmarks of the two kernels that dominate quantization after the linears, at SmolLM2's calibration
shapes (one 2048-token window), median of many calls:

- causal self-attention of 9 query heads over 3 KV heads, head dim 64: optq's native kernel (bf16 with AVX-512
  BF16, float32 on AVX2-only CPUs) against PyTorch's sdpa (its CPU flash kernel), in the dtype
  `--compute-dtype auto` picks here;
- the Hessian sum X^T X of one window, 576 and 1536 columns (SmolLM2's q/k/v, o, gate/up and down inputs):
  optq's HessianAccumulator.add (upper block triangle) against one full float32 `addmm`, and for bf16
  activations every candidate core.choice measures (native, oneDNN bf16 upper/full) at 512 and 2048 tokens;
- GPTAQ's (X_ref - X)^T X: float32 against the bf16 hi/lo split.

Usage: python benchmarks/calibration_kernels.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info  # noqa: E402
from kernel_speed import median_us  # noqa: E402


def median_ms(fn, calls: int) -> float:
    return median_us(fn, calls) / 1e3


def main() -> None:
    import torch
    import torch.nn.functional as F

    from optq.core.hessian import HessianAccumulator, _bf16_gram_kernels, _cross_kernels
    from optq.models.loading import parse_dtype
    from optq.runtime import native

    dtype = parse_dtype("auto")
    tokens, heads, kv_heads, dim = 2048, 9, 3, 64
    rows = []
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, tokens, heads, dim, generator=g).to(dtype).transpose(1, 2)
    k = torch.randn(1, kv_heads, tokens, dim, generator=g).to(dtype)
    v = torch.randn(1, kv_heads, tokens, dim, generator=g).to(dtype)
    flops = 4 * heads * dim * tokens * (tokens + 1) / 2
    where = f"attention {heads}/{kv_heads} heads x {tokens} x {dim}"
    sdpa = median_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True), 15)
    rows.append({"kernel": "torch sdpa (flash)", "dtype": str(dtype)[6:], "case": where, "ms": sdpa,
                 "gflops": flops / sdpa / 1e6})
    usable = native.load() and (native.bf16_supported() if dtype == torch.bfloat16 else native.cpu_supported())
    if usable:
        ours = median_ms(lambda: torch.ops.optq_native.causal_attention(q, k, v, dim ** -0.5), 15)
        rows.append({"kernel": "optq native causal_attention", "dtype": str(dtype)[6:], "case": where, "ms": ours,
                     "gflops": flops / ours / 1e6})
    for columns in (576, 1536):
        x = torch.randn(tokens, columns, generator=g)
        acc = HessianAccumulator(columns)
        full = torch.zeros(columns, columns)
        work = 2 * tokens * columns * columns
        case = f"X^T X, {tokens} x {columns}"
        t_full = median_ms(lambda: full.addmm_(x.T, x), 21)
        t_ours = median_ms(lambda: acc.add(x), 21)
        rows.append({"kernel": "full addmm", "dtype": "float32", "case": case, "ms": t_full, "gflops": work / t_full / 1e6})
        rows.append({"kernel": "optq HessianAccumulator.add", "dtype": "float32", "case": case, "ms": t_ours,
                     "gflops": work / t_ours / 1e6})
        # the candidates core.choice picks from for bf16 activations, at a calibration window of 512 tokens too
        for n in (512, tokens):
            xb = x[:n].to(torch.bfloat16)
            xf = xb.float()
            dx = (xf + 0.01 * torch.randn(n, columns, generator=g)) - xf
            for name, kernel in _bf16_gram_kernels().items():
                t = median_ms(lambda: kernel(full, xb), 21)
                rows.append({"kernel": f"X^T X {name}", "dtype": "bfloat16", "case": f"X^T X, {n} x {columns}",
                             "ms": t, "gflops": 2 * n * columns * columns / t / 1e6})
            for name, kernel in _cross_kernels(True).items():
                t = median_ms(lambda: kernel(full, dx.clone(), xf), 21)
                rows.append({"kernel": f"(X_ref-X)^T X {name}", "dtype": "bfloat16",
                             "case": f"(X_ref-X)^T X, {n} x {columns}", "ms": t,
                             "gflops": 2 * n * columns * columns / t / 1e6})
    print(f"{'kernel':32s} {'dtype':9s} {'case':34s} {'ms':>8s} {'GFLOP/s*':>9s}")
    for r in rows:
        print(f"{r['kernel']:32s} {r['dtype']:9s} {r['case']:34s} {r['ms']:8.2f} {r['gflops']:9.0f}")
    print("* useful FLOPs (causal half; the full X^T X) per second")
    print(json.dumps({"benchmark": "calibration_kernels", "machine": machine_info(), "rows": rows}))


if __name__ == "__main__":
    main()
