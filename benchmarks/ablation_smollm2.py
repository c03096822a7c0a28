"""Small, fast ablation on SmolLM2-135M: which GPTQ settings matter on this model.

Calibration: 16 windows x 512 tokens (seed 0) of wiki2.valid.txt; evaluation: the first --windows windows of
2048 tokens of wiki.test.raw. A reduced protocol (minutes, not an hour): compare variants with each other,
not with the full-protocol numbers of quality_smollm2.py.

Usage: python benchmarks/ablation_smollm2.py [--variants rtn,gptq,gptq-bf16,act,damp0.001] [--windows 3]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SHARED, machine_info  # noqa: E402

from optq.calibration import calibration_windows, load_documents, tokenize_joined  # noqa: E402
from optq.config import QuantizeConfig  # noqa: E402
from optq.evaluate import perplexity_of_ids  # noqa: E402
from optq.models.loading import load_source_model  # noqa: E402
from optq.pipeline import quantize_model  # noqa: E402

VARIANTS = {
    "rtn": (dict(method="rtn"), None),
    "gptq": ({}, None),
    "gptq-bf16": ({}, torch.bfloat16),
    "act": (dict(desc_act=True), None),
    "act-static": (dict(desc_act=True, static_groups=True), None),
    # optq's default scale refit; the other variants keep the reference GPTQ's scales
    "refit": (dict(refit_scales=True), None),
    "act-refit": (dict(desc_act=True, refit_scales=True), None),
    "act-static-refit": (dict(desc_act=True, static_groups=True, refit_scales=True), None),
    "damp0.001": (dict(damp_percent=0.001), None),
    "damp0.1": (dict(damp_percent=0.1), None),
    "mse": (dict(mse=True), None),
    "gptaq": (dict(gptaq=True), None),
    "act-gptaq": (dict(desc_act=True, gptaq=True), None),
    "act-static-gptaq": (dict(desc_act=True, static_groups=True, gptaq=True), None),
    "act-mse": (dict(desc_act=True, mse=True), None),
    "act-static-mse": (dict(desc_act=True, static_groups=True, mse=True), None),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default="rtn,gptq,gptq-bf16,act,damp0.001")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--windows", type=int, default=3)
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=512)
    a = ap.parse_args()

    src = load_source_model("smollm2", "float32")
    ids = tokenize_joined(src.tokenizer, load_documents(str(SHARED / "wikitext-2-raw" / "wiki.test.raw"), "test"))
    windows = calibration_windows(src.tokenizer, str(SHARED / "wikitext-2-tokens" / "wiki2.valid.txt"),
                                  a.nsamples, a.seqlen, 0)

    def ppl(model):
        return perplexity_of_ids(model, ids, 2048, a.windows, progress=False).perplexity

    rows = [{"variant": "float", "perplexity": ppl(src.model), "seconds": 0.0}]
    print(json.dumps(rows[-1]), flush=True)
    for name in a.variants.split(","):
        overrides, compute_dtype = VARIANTS[name]
        # each variant is the reference GPTQ (natural order, min/max ranges) plus what it names
        overrides = {"refit_scales": False, "desc_act": False, "static_groups": False, "gptaq": False,
                     "mse": False, **overrides}
        model = copy.deepcopy(src.model)
        t0 = time.perf_counter()
        quantize_model(model, windows, QuantizeConfig(bits=a.bits, group_size=a.group_size, **overrides),
                       compute_dtype=compute_dtype, progress=False)
        rows.append({"variant": name, "perplexity": ppl(model), "seconds": time.perf_counter() - t0})
        print(json.dumps(rows[-1]), flush=True)
        del model

    print(f"\nSmolLM2-135M {a.bits}-bit g{a.group_size}, calibration {a.nsamples} x {a.seqlen} wiki2.valid, "
          f"eval first {a.windows} x 2048 of wiki.test")
    print(f"{'variant':12s} {'perplexity':>10s} {'seconds':>8s}")
    for r in rows:
        print(f"{r['variant']:12s} {r['perplexity']:10.3f} {r['seconds']:8.1f}")
    print(json.dumps({"benchmark": "ablation_smollm2", "machine": machine_info(), "args": vars(a), "rows": rows}))


if __name__ == "__main__":
    main()
