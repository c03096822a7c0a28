"""Kernel microbenchmarks behind the runtime's choices: one QuantLinear-sized matmul, median of many calls.

Rows: optq's native 4-bit kernel, PyTorch's int4 kernel (`_weight_int4pack_mm_for_cpu`) and a dense matmul, in
bf16 and float32, at 1 row (decode) and 512 rows (prefill), for a 2048 x 8192 weight (in cache: the same
weight every call) and for 1.2 GB of such weights read in turn (streamed from memory, as decode does); and the
single-query attention of runtime/attention.py against PyTorch's sdpa (32 heads over 8 KV heads, 100 cached).
Usage: python benchmarks/kernels.py
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info  # noqa: E402


def clone_kernel(kernel):
    import copy

    import torch

    c = copy.copy(kernel)
    for name, value in vars(kernel).items():
        if torch.is_tensor(value):
            setattr(c, name, value.clone())
    return c


def median_us(fn, calls: int) -> float:
    for _ in range(max(3, calls // 10)):
        fn()
    times = []
    for _ in range(calls):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2] * 1e6


def main() -> None:
    import torch
    import torch.nn.functional as F

    from optq.core.grid import QuantizedWeight
    from optq.formats.gptq import pack_module
    from optq.runtime import native
    from optq.runtime.attention import decode_attention
    from optq.runtime.quant_linear import QuantLinear

    torch.manual_seed(0)
    k, n, group = 2048, 8192, 128

    def make_linear() -> QuantLinear:
        groups = k // group
        qw = QuantizedWeight(torch.randint(0, 16, (n, k), dtype=torch.int32), torch.rand(groups, n).half().float(),
                             torch.full((groups, n), 8.0), torch.arange(k, dtype=torch.int32) // group, 4, group)
        ql = QuantLinear(k, n, 4, group, False)
        for name, t in pack_module(qw, "gptq").items():
            ql._buffers[name] = t
        return ql

    rows = []
    ql = make_linear()
    dense = ql.dequantize_weight()
    backends = ["native", "int4"] if native.load() else ["int4"]
    for dtype in (torch.bfloat16, torch.float32):
        w = dense.to(dtype)
        for m in (1, 512):
            x = torch.randn(m, k, dtype=dtype)
            calls = 200 if m == 1 else 10
            for backend in backends:
                ql.prepare(backend, dtype)
                rows.append({"kernel": backend, "dtype": str(dtype)[6:], "rows": m, "where": "in cache",
                             "us": median_us(lambda: ql(x), calls)})
            rows.append({"kernel": "dense", "dtype": str(dtype)[6:], "rows": m, "where": "in cache",
                         "us": median_us(lambda: F.linear(x, w), calls)})
    # Streamed: 1.2 GB of 4-bit weights, one call each, as a decode step reads its layers.
    layers = [make_linear() for _ in range(4)]
    x = torch.randn(1, k, dtype=torch.bfloat16)
    for backend in backends:
        kernels = []
        for src in layers:
            src.prepare(backend, torch.bfloat16)
            kernels.append(src._kernel)
        # 128 matrices, each with its own copy of the tensors, so a pass streams them from memory.
        fresh = [clone_kernel(kn) for kn in kernels * 32]
        nbytes = sum(kn.nbytes() for kn in fresh)
        us = median_us(lambda: [kn(x) for kn in fresh], 5)
        rows.append({"kernel": backend, "dtype": "bfloat16", "rows": 1, "where": f"streamed {nbytes / 1e9:.2f} GB",
                     "us": us / len(fresh), "gb_s": nbytes / (us * 1e-6) / 1e9})
    # Decode attention.
    q = torch.randn(1, 32, 1, 64).bfloat16()
    kv = torch.randn(1, 8, 100, 64).bfloat16()
    module = torch.nn.Module()
    rows.append({"kernel": "sdpa (flash, GQA)", "dtype": "bfloat16", "rows": 1, "where": "attention, 100 cached",
                 "us": median_us(lambda: F.scaled_dot_product_attention(q, kv, kv, enable_gqa=True), 500)})
    rows.append({"kernel": "optq decode_attention", "dtype": "bfloat16", "rows": 1, "where": "attention, 100 cached",
                 "us": median_us(lambda: decode_attention(module, q, kv, kv, None), 500)})

    print(f"{'kernel':22s} {'dtype':9s} {'rows':>5s} {'where':24s} {'us':>10s} {'GB/s':>6s}")
    for r in rows:
        gb = f"{r['gb_s']:6.1f}" if "gb_s" in r else ""
        print(f"{r['kernel']:22s} {r['dtype']:9s} {r['rows']:5d} {r['where']:24s} {r['us']:10.1f} {gb:>6s}")
    print(json.dumps({"benchmark": "kernels", "machine": machine_info(), "shape": [k, n, group], "rows": rows}))


if __name__ == "__main__":
    main()
