"""GPTQ quality in llama.cpp: optq's GGUF export of SmolLM2 against llama.cpp's own Q4_0, by perplexity.

    .venv/bin/pip install llama-cpp-python   # with CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX512=ON
                                             #   -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
    .venv/bin/python benchmarks/gguf_bridge.py [--nsamples 128] [--max-windows N]

1. optq quantizes SmolLM2-135M (the float32 weights the package's GGUF dequantizes to) with GPTQ, 4-bit,
   group 32, symmetric, act-order + static groups (GGUF-compatible), calibration wiki2.valid 128 x 2048;
2. `optq export-gguf` turns the checkpoint into Q4_0 (output/embedding matrix: F16; tokenizer copied from the
   package's GGUF);
3. llama.cpp's own Q4_0 of the same weights: llama_model_quantize of the package's GGUF (its output matrix in
   Q6_K, llama.cpp's default), and again with the embedding and output matrices in F16 as optq's export has them;
4. perplexity on wiki.test.raw, windows of 2048 tokens tokenized once by the Hugging Face tokenizer (the same
   ids for every row): optq's evaluation of the checkpoint, and llama.cpp's logits (llama-cpp-python,
   logits_all) for both GGUF files, the loss computed here in float64.
Prints a table and JSON with machine info.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import REPO, SHARED, machine_info, optq_cmd, run_timed  # noqa: E402
from quality_smollm2 import export_float  # noqa: E402


def llama_cpp_perplexity(gguf_path: Path, ids: np.ndarray, seqlen: int, windows: int) -> dict:
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf_path), n_ctx=seqlen, n_batch=512, n_threads=2, n_threads_batch=2,
                logits_all=True, verbose=False)
    total, start = 0.0, time.perf_counter()
    for i in range(windows):
        window = ids[i * seqlen:(i + 1) * seqlen]
        llm.reset()
        llm.eval(window.tolist())
        logits = np.asarray(llm.scores[: seqlen - 1], dtype=np.float64)
        m = logits.max(axis=1, keepdims=True)
        logz = (m[:, 0] + np.log(np.exp(logits - m).sum(axis=1)))
        total += float(np.mean(logz - logits[np.arange(seqlen - 1), window[1:]]))
    return {"perplexity": math.exp(total / windows), "windows": windows, "seconds": time.perf_counter() - start}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=str(REPO / "bench-output" / "gguf-bridge"))
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--max-windows", type=int, default=None, help="score only the first N windows")
    ap.add_argument("--optq-flags", default="--desc-act --static-groups",
                    help="GPTQ flags of the optq run (GGUF-compatible: group 32, symmetric)")
    a = ap.parse_args()
    import torch
    from transformers import AutoTokenizer

    from make_shapes import llama_cpp_quantize
    from optq.calibration import load_documents, tokenize_joined
    from optq.models.loading import smollm2_gguf_path

    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    float_dir = REPO / "bench-output" / "quality" / "smollm2-float"
    export_float(float_dir)
    ckpt = work / f"optq-gptq-4bit-g32-{a.nsamples}x{a.seqlen}{''.join('-' + f.lstrip('-') for f in a.optq_flags.split())}"
    rows = []
    if not (ckpt / "config.json").exists():
        t = run_timed(optq_cmd("quantize", str(float_dir), str(ckpt), "--bits", "4", "--group-size", "32",
                               "--dataset", str(SHARED / "wikitext-2-tokens" / "wiki2.valid.txt"), "--nsamples",
                               str(a.nsamples), "--seqlen", str(a.seqlen), "--compute-dtype", "bfloat16", "--quiet",
                               "--resume", *a.optq_flags.split()), work / f"{ckpt.name}.log")
        (work / f"{ckpt.name}.timing.json").write_text(json.dumps(t))
    ours_gguf = work / f"{ckpt.name}.gguf"
    if not ours_gguf.exists():
        run_timed(optq_cmd("export-gguf", str(ckpt), str(ours_gguf), "--tokenizer-from", str(smollm2_gguf_path())),
                  work / "export.log")
    theirs_gguf = work / "smollm2-llamacpp-q4_0.gguf"
    if not theirs_gguf.exists():
        llama_cpp_quantize(smollm2_gguf_path(), theirs_gguf)
    # the same with F16 embedding and output matrices, as optq's export has them: only the linear layers differ
    theirs_f16 = work / "smollm2-llamacpp-q4_0-f16-embeddings.gguf"
    if not theirs_f16.exists():
        llama_cpp_quantize(smollm2_gguf_path(), theirs_f16, f16_embeddings=True)

    tok = AutoTokenizer.from_pretrained(str(float_dir))
    ids = tokenize_joined(tok, load_documents(str(SHARED / "wikitext-2-raw" / "wiki.test.raw"), split="test"))[0]
    windows = ids.numel() // a.seqlen
    if a.max_windows:
        windows = min(windows, a.max_windows)
    ids_np = ids.numpy().astype(np.int64)

    eval_args = ["--dataset", str(SHARED / "wikitext-2-raw" / "wiki.test.raw"), "--seqlen", str(a.seqlen), "--json"]
    if a.max_windows:
        eval_args += ["--max-windows", str(a.max_windows)]
    for dtype in ("float32", "bfloat16"):
        log = work / f"eval-optq-{dtype}-{windows}.log"
        run_timed(optq_cmd("eval", str(ckpt), "--dtype", dtype, *eval_args), log)
        res = json.loads(log.read_text().strip().splitlines()[-1])
        rows.append({"model": f"optq checkpoint, optq runtime ({dtype})", "perplexity": res["perplexity"],
                     "size_mb": sum(f.stat().st_size for f in ckpt.glob("*.safetensors")) / 1e6})
    for name, path in (("optq GPTQ -> export-gguf Q4_0, llama.cpp", ours_gguf),
                       ("llama.cpp's own Q4_0 (output Q6_K), llama.cpp", theirs_gguf),
                       ("llama.cpp's own Q4_0, F16 embedding/output, llama.cpp", theirs_f16)):
        res = llama_cpp_perplexity(path, ids_np, a.seqlen, windows)
        rows.append({"model": name, "perplexity": res["perplexity"], "size_mb": path.stat().st_size / 1e6,
                     "seconds": res["seconds"]})
        print(json.dumps(rows[-1]), flush=True)
    del torch
    print(f"\nSmolLM2-135M-Instruct, wiki.test.raw, {windows} windows x {a.seqlen} tokens")
    print(f"{'model':50s} {'ppl':>9s} {'size MB':>8s}")
    for r in rows:
        print(f"{r['model']:50s} {r['perplexity']:9.3f} {r['size_mb']:8.1f}")
    ref = rows[0]["perplexity"]
    print(f"llama.cpp on optq's GGUF vs optq's own evaluation (float32): {rows[2]['perplexity'] / ref - 1:+.2%}")
    result = {"benchmark": "gguf_bridge", "machine": machine_info(), "args": vars(a), "windows": windows, "rows": rows}
    (work / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
