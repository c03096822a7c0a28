"""Quantization speed and memory: wall time, peak RSS (from the kernel) and the share of the FLOP floor.

The floor is what the arithmetic costs at this machine's measured matmul rates: one forward pass over the
calibration tokens at the forward dtype's rate (--dtype: bf16 where the CPU has native bf16, else float32),
every Hessian (2 X^T X, one per distinct module input) at the float32
rate, and every GPTQ solve (Cholesky factorisations and inverse ~4/3 d^3, lazy updates ~out d^2) at the
float32 rate. Real runs do more (true-sequential passes recompute parts of a layer), so shares well below 100%
are expected; the number shows how much is overhead.

Modes:
  --model PATH|SHAPE      optq only (SHAPE: llama-1b, llama-3b, llama-8b from make_shapes.py, built if missing);
                          after quantizing, the checkpoint is loaded and generates a few tokens (peak RSS reported)
  --vs-gptqmodel          SmolLM2-135M float folder (made by quality_smollm2.py), the same calibration windows
                          for optq and GPTQModel 7.7 one after the other, plus the perplexity of both checkpoints
  --layers N              with --vs-gptqmodel: both tools quantize SmolLM2 cut to its first N decoder layers
                          (every layer has the same shapes, so time per layer is the same; for machines where
                          the full model takes hours, e.g. float32 forward passes on a CPU without native bf16;
                          no perplexity: a cut model's says nothing)

Usage:
  python benchmarks/quantize_speed.py --model llama-8b --nsamples 16 --seqlen 512
  python benchmarks/quantize_speed.py --vs-gptqmodel --nsamples 128 --seqlen 2048
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, SHARED, machine_info, optq_cmd, run_timed  # noqa: E402


def matmul_rate(dtype, m: int, k: int, n: int, repeat: int = 5) -> float:
    """Median FLOP/s of [m, k] @ [k, n] in `dtype` (float32 accumulation for bf16, as PyTorch's CPU GEMM)."""
    import torch

    a = torch.randn(m, k).to(dtype)
    b = torch.randn(k, n).to(dtype)
    a @ b
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    times.sort()
    return 2 * m * k * n / times[len(times) // 2]


def flop_floor(cfg: dict, tokens: int, seqlen: int, bits_log: Path) -> dict:
    """FLOPs of the quantization of a Llama-like config (one forward, the Hessians, the solves)."""
    h, inter, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    heads = cfg["num_attention_heads"]
    kv = cfg.get("num_key_value_heads", heads) * cfg.get("head_dim", h // heads)
    linear = h * (h + 2 * kv) + h * h + 3 * h * inter  # q k v, o, gate up down
    attention = 2 * 2 * h * (seqlen + 1) / 2  # QK^T and AV per token, causal
    forward = layers * tokens * (2 * linear + attention)
    hessian = layers * 2 * tokens * (3 * h * h + inter * inter)  # inputs: qkv, o, gate/up, down
    modules = [(h, h), (h, kv), (h, kv), (h, h), (h, inter), (h, inter), (inter, h)]  # (in, out)
    solve = layers * sum(4 / 3 * d**3 + o * d * d for d, o in modules)
    return {"forward": forward, "hessian": hessian, "solve": solve}


def read_log(path: Path) -> float:
    with path.open() as f:
        return sum(float(r["seconds"]) for r in csv.DictReader(f))


def optq_run(model: Path, out: Path, a, cal: str) -> dict:
    cmd = optq_cmd("quantize", str(model), str(out), "--bits", str(a.bits), "--group-size", str(a.group_size),
                   "--dataset", cal, "--nsamples", str(a.nsamples), "--seqlen", str(a.seqlen),
                   "--overwrite", *a.optq_flags.split())
    timing = run_timed(cmd, out.with_suffix(".log"))
    timing["solve_seconds"] = read_log(out / "quant_log.csv")
    return timing


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model folder, or a shape name from make_shapes.py")
    ap.add_argument("--vs-gptqmodel", action="store_true")
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--optq-flags", default="", help="extra optq quantize flags, e.g. '--desc-act'")
    ap.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                    help="forward dtype of both tools and of the perplexity runs; auto = bfloat16 where the CPU "
                         "has native bf16, else float32 (bf16 matmuls without it run ~300x slower)")
    ap.add_argument("--layers", type=int, default=None,
                    help="--vs-gptqmodel: cut SmolLM2 to its first N decoder layers")
    ap.add_argument("--dataset", default=None, help="calibration text (default: wiki2.valid, else pydoc)")
    ap.add_argument("--work", default=str(REPO / "bench-output" / "quantize-speed"))
    ap.add_argument("--gptqmodel-venv", default="/tmp/optq-gptqmodel-venv")
    ap.add_argument("--skip-eval", action="store_true", help="--vs-gptqmodel: no perplexity runs")
    ap.add_argument("--spill-variant", default="256MB",
                    help="--vs-gptqmodel: also run optq with this --max-activation-memory ('' to skip)")
    ap.add_argument("--spill-only", action="store_true",
                    help="--vs-gptqmodel: run optq only with --spill-variant (its bytes equal the default run's)")
    a = ap.parse_args()
    work = Path(a.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    wiki_valid = SHARED / "wikitext-2-tokens" / "wiki2.valid.txt"
    cal = a.dataset or (str(wiki_valid) if wiki_valid.exists() else "pydoc")

    import torch

    from optq.models.loading import parse_dtype

    dtype = parse_dtype(a.dtype)
    a.dtype = str(dtype).removeprefix("torch.")
    rates = {"fp32_matmul_flops": matmul_rate(torch.float32, 2048, 4096, 4096)}
    rates["forward_matmul_flops"] = (matmul_rate(dtype, 2048, 4096, 4096) if dtype != torch.float32
                                     else rates["fp32_matmul_flops"])
    print(f"measured: {a.dtype} (forward) matmul {rates['forward_matmul_flops'] / 1e9:.0f} GFLOP/s, "
          f"float32 {rates['fp32_matmul_flops'] / 1e9:.0f} GFLOP/s", flush=True)
    rows = []

    if a.vs_gptqmodel:
        from quality_smollm2 import evaluate, export_float, write_windows

        float_dir = REPO / "bench-output" / "quality" / "smollm2-float"
        export_float(float_dir)
        if a.layers:
            float_dir = first_layers(float_dir, a.layers, work / f"smollm2-{a.layers}-layers")
        windows = work / f"windows-{a.nsamples}x{a.seqlen}.safetensors"
        write_windows(float_dir, windows, a.nsamples, a.seqlen)
        model = float_dir
        out = work / "optq"
        if not a.spill_only:
            rows.append({"tool": "optq", **optq_run(model, out, a, str(wiki_valid))})
        if a.spill_variant:
            # the same run with the calibration activations spilled to a file: same bytes
            spilled = work / "optq-spilled"
            flags = a.optq_flags
            a.optq_flags = f"{flags} --max-activation-memory {a.spill_variant}"
            rows.append({"tool": f"optq (spill > {a.spill_variant})", **optq_run(model, spilled, a, str(wiki_valid))})
            a.optq_flags = flags
            if a.spill_only:
                out = spilled
            else:
                same = all((out / f.name).read_bytes() == f.read_bytes() for f in spilled.glob("*.safetensors"))
                rows[-1]["same_bytes_as_optq"] = same
        gq_python = Path(a.gptqmodel_venv) / "bin" / "python"
        if not gq_python.exists():
            raise SystemExit(f"{gq_python} is missing: run benchmarks/gptqmodel_env.sh first")
        gout = work / "gptqmodel"
        cmd = [str(gq_python), str(Path(__file__).parent / "gptqmodel_quantize.py"), str(model), str(gout),
               "--windows", str(windows), "--bits", str(a.bits), "--group-size", str(a.group_size),
               "--dtype", a.dtype, *a.optq_flags.split()]
        import shutil

        shutil.rmtree(gout, ignore_errors=True)
        rows.append({"tool": "GPTQModel 7.7", **run_timed(cmd, gout.with_suffix(".log"))})
        if a.layers and not a.skip_eval:
            # a cut model's perplexity says nothing (its head reads layer N's states: ~1e9 for 8 of 30 layers)
            print("--layers: no perplexity runs", flush=True)
        if not a.skip_eval and not a.layers:
            for row, path in zip((rows[0], rows[-1]), (out, gout)):
                # dense matmuls on dequantized weights: the same arithmetic for both checkpoints, fast on any CPU
                res = evaluate(path, work / f"eval-{path.name}.json", a.dtype, work / f"eval-{path.name}.log",
                               "reference")
                (work / f"eval-{path.name}.json").unlink()  # always re-evaluated: the checkpoint is new
                row["perplexity"] = res["perplexity"]
    else:
        if a.model is None:
            raise SystemExit("give --model or --vs-gptqmodel")
        model = Path(a.model)
        if not model.exists():
            from make_shapes import ensure

            model, _ = ensure(a.model, REPO / "bench-output" / "shapes")
        out = work / f"{model.name}-{a.bits}bit"
        rows.append({"tool": "optq", **optq_run(model, out, a, cal)})
        gen = run_timed(optq_cmd("generate", str(out), "--prompt", "The capital of France is",
                                 "--max-new-tokens", "8"), work / f"{out.name}-generate.log")
        rows[-1]["generate_peak_rss_mb"] = gen["peak_rss_mb"]
        rows[-1]["generated"] = (work / f"{out.name}-generate.log").read_text().strip().splitlines()[-1][:200]

    cfg = json.loads((model / "config.json").read_text())
    flops = flop_floor(cfg, a.nsamples * a.seqlen, a.seqlen, None)
    floor = (flops["forward"] / rates["forward_matmul_flops"] + flops["hessian"] / rates["fp32_matmul_flops"]
             + flops["solve"] / rates["fp32_matmul_flops"])
    timed = [r for r in rows if "seconds" in r]
    for r in timed:
        r["floor_share"] = floor / r["seconds"]
    size_gb = sum(f.stat().st_size for f in model.glob("*.safetensors")) / 1e9
    print(f"\n{model.name} ({size_gb:.1f} GB of safetensors), {a.bits}-bit g{a.group_size} {a.optq_flags}, "
          f"calibration {a.nsamples} x {a.seqlen}; FLOP floor {floor:.0f} s (forward "
          f"{flops['forward'] / rates['forward_matmul_flops']:.0f} s, Hessians "
          f"{flops['hessian'] / rates['fp32_matmul_flops']:.0f} s, solves {flops['solve'] / rates['fp32_matmul_flops']:.0f} s)")
    print(f"{'tool':14s} {'wall s':>8s} {'peak RSS MB':>12s} {'floor share':>11s} {'perplexity':>10s}")
    nan = float("nan")
    for r in rows:
        print(f"{r['tool']:14s} {r.get('seconds', nan):8.1f} {r.get('peak_rss_mb', nan):12.0f} "
              f"{r.get('floor_share', nan):11.1%} {r.get('perplexity', nan):10.3f}")
    if a.vs_gptqmodel:
        for r in timed[:-1]:
            print(f"{r['tool']} / GPTQModel: time {r['seconds'] / timed[-1]['seconds']:.2f}, "
                  f"peak RSS {r['peak_rss_mb'] / timed[-1]['peak_rss_mb']:.2f}")
    from optq.core import choice
    from optq.runtime import native

    native.load()  # points core.choice at the file the runs remembered their kernel choices in
    kernels = choice.remembered()
    if kernels:
        print("kernels chosen by measurement on this machine: "
              + ", ".join(f"{op}: {name}" for op, name in sorted(kernels.items())))
    result = {"benchmark": "quantize_speed", "machine": machine_info(), "args": vars(a), "rates": rates,
              "flops": flops, "floor_seconds": floor, "model_gb": size_gb, "kernel_choices": kernels, "rows": rows}
    name = "vs-gptqmodel" if a.vs_gptqmodel else model.name
    (work / f"result-{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


def first_layers(source: Path, n: int, folder: Path) -> Path:
    """`source` cut to its first `n` decoder layers (embeddings, final norm and head kept), as a folder."""
    if (folder / "config.json").exists():
        return folder
    import shutil

    from safetensors import safe_open
    from safetensors.torch import save_file

    cfg = json.loads((source / "config.json").read_text())
    if not 0 < n <= cfg["num_hidden_layers"]:
        raise SystemExit(f"--layers {n}: the model has {cfg['num_hidden_layers']} layers")
    cfg["num_hidden_layers"] = n
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in source.iterdir():
        if f.suffix != ".safetensors" and f.name != "config.json":
            shutil.copy(f, tmp / f.name)
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    tensors = {}
    with safe_open(str(source / "model.safetensors"), "pt") as f:
        for name in f.keys():
            parts = name.split(".")
            if parts[:2] == ["model", "layers"] and int(parts[2]) >= n:
                continue
            tensors[name] = f.get_tensor(name)
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    tmp.rename(folder)
    return folder


if __name__ == "__main__":
    main()
