"""Kernel microbenchmarks behind the runtime's choices: one QuantLinear-sized matmul, median of many calls.

Rows: optq's native 4-bit kernel, PyTorch's int4 kernel (`_weight_int4pack_mm_for_cpu`) and a dense matmul, in
bf16 and float32, at 1 row (decode) and 512 rows (prefill), for a 2048 x 8192 weight (in cache: the same
weight every call) and for 1.2 GB of such weights read in turn (streamed from memory, as decode does); and the
single-query attention of runtime/attention.py against PyTorch's sdpa (32 heads over 8 KV heads, 100 cached).
On a CPU without native bf16 the dense bf16 rows are left out (PyTorch's bf16 GEMM runs ~400x slower than
float32 there), the streamed rows and the attention use float32 activations (what `--dtype auto` picks), and a
kernel that cannot take a dtype (optq's 4-bit kernel wants AVX-512 BF16 for bf16) has no row for it.
Usage: python benchmarks/kernel_speed.py

(Not named kernels.py: the benchmarks folder is first on sys.path of every script here, and Transformers 5
imports the hub's `kernels` package when one is importable, so a kernels.py here broke every model load.)
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
    t = time.perf_counter()
    fn()
    if time.perf_counter() - t > 0.5:  # a slow path (seconds a call): a few calls tell its median
        calls = 3
    for _ in range(max(1 if calls <= 3 else 3, calls // 10)):
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
    from optq.core.hardware import native_bf16
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
    all_backends = ["native", "int4"] if native.load() else ["int4"]
    act = torch.bfloat16 if native_bf16() else torch.float32  # what --dtype auto picks here

    def runs(backend, dtype) -> bool:
        try:
            ql.prepare(backend, dtype)
            return True
        except ValueError:  # this kernel does not take this dtype here
            return False

    for dtype in (torch.bfloat16, torch.float32):
        w = dense.to(dtype)
        for m in (1, 512):
            x = torch.randn(m, k, dtype=dtype)
            calls = 200 if m == 1 else 10
            for backend in all_backends:
                if runs(backend, dtype):
                    rows.append({"kernel": backend, "dtype": str(dtype)[6:], "rows": m, "where": "in cache",
                                 "us": median_us(lambda: ql(x), calls)})
            if dtype == torch.float32 or native_bf16():
                rows.append({"kernel": "dense", "dtype": str(dtype)[6:], "rows": m, "where": "in cache",
                             "us": median_us(lambda: F.linear(x, w), calls)})
    # Streamed: 1.2 GB of 4-bit weights, one call each, as a decode step reads its layers.
    layers = [make_linear() for _ in range(4)]
    x = torch.randn(1, k, dtype=act)
    for backend in all_backends:
        if not runs(backend, act):
            continue
        kernels = []
        for src in layers:
            src.prepare(backend, act)
            kernels.append(src._kernel)
        # 128 matrices, each with its own copy of the tensors, so a pass streams them from memory.
        fresh = [clone_kernel(kn) for kn in kernels * 32]
        nbytes = sum(kn.nbytes() for kn in fresh)
        us = median_us(lambda: [kn(x) for kn in fresh], 5)
        rows.append({"kernel": backend, "dtype": str(act)[6:], "rows": 1, "where": f"streamed {nbytes / 1e9:.2f} GB",
                     "us": us / len(fresh), "gb_s": nbytes / (us * 1e-6) / 1e9})
    # Decode attention.
    q = torch.randn(1, 32, 1, 64).to(act)
    kv = torch.randn(1, 8, 100, 64).to(act)
    module = torch.nn.Module()
    rows.append({"kernel": "sdpa (flash, GQA)", "dtype": str(act)[6:], "rows": 1, "where": "attention, 100 cached",
                 "us": median_us(lambda: F.scaled_dot_product_attention(q, kv, kv, enable_gqa=True), 500)})
    rows.append({"kernel": "optq decode_attention", "dtype": str(act)[6:], "rows": 1, "where": "attention, 100 cached",
                 "us": median_us(lambda: decode_attention(module, q, kv, kv, None), 500)})

    print(f"{'kernel':22s} {'dtype':9s} {'rows':>5s} {'where':24s} {'us':>10s} {'GB/s':>6s}")
    for r in rows:
        gb = f"{r['gb_s']:6.1f}" if "gb_s" in r else ""
        print(f"{r['kernel']:22s} {r['dtype']:9s} {r['rows']:5d} {r['where']:24s} {r['us']:10.1f} {gb:>6s}")
    print(json.dumps({"benchmark": "kernels", "machine": machine_info(), "shape": [k, n, group], "rows": rows}))


if __name__ == "__main__":
    main()
