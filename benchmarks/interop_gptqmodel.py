"""optq's checkpoints in GPTQModel: do both tools compute the same model?

    benchmarks/gptqmodel_env.sh                   # once: GPTQModel 7.7 in its own venv
    .venv/bin/python benchmarks/interop_gptqmodel.py [--model PATH] [--gptqmodel-venv PATH]

Quantizes a real model (default: the TinyStories-656K Llama of ../shared/data) with optq under each config
below, computes logits on fixed token ids with optq (float32, reference backend), then loads every checkpoint
in GPTQModel (its torch kernel, float16: its only CPU dtypes are fp16 and bf16) and compares: dequantized weights and logits, max abs difference,
and whether the greedy next token agrees at every position. Prints a table and JSON with machine info.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).parent))
from common import SHARED, machine_info, optq_cmd  # noqa: E402

CONFIGS = {
    "4-bit g32 sym": ["--bits", "4", "--group-size", "32"],
    "4-bit g32 asym (v1, zero >= 1)": ["--bits", "4", "--group-size", "32", "--asym"],
    "4-bit g32 asym gptq_v2": ["--bits", "4", "--group-size", "32", "--asym", "--format", "gptq_v2"],
    "4-bit g32 act-order": ["--bits", "4", "--group-size", "32", "--desc-act"],
    "4-bit g32 act-order + static groups": ["--bits", "4", "--group-size", "32", "--desc-act", "--static-groups"],
    "3-bit g32 sym": ["--bits", "3", "--group-size", "32"],
    "3-bit g32 asym act-order": ["--bits", "3", "--group-size", "32", "--asym", "--desc-act"],
    "2-bit g32 sym": ["--bits", "2", "--group-size", "32"],
    "8-bit per-channel sym": ["--bits", "8", "--group-size", "-1"],
    "4-bit g32 + quantized lm_head": ["--bits", "4", "--group-size", "32", "--lm-head"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(SHARED / "models" / "TinyStories-656K"))
    ap.add_argument("--dataset", default=str(SHARED / "tinystories" / "validation_100.txt"))
    ap.add_argument("--gptqmodel-venv", default="/tmp/optq-gptqmodel-venv")
    ap.add_argument("--work", default=None, help="folder for the checkpoints (default: a temporary one)")
    a = ap.parse_args()
    gq_python = Path(a.gptqmodel_venv) / "bin" / "python"
    if not gq_python.exists():
        sys.exit(f"{gq_python} is missing: run benchmarks/gptqmodel_env.sh first")

    import optq
    from optq.runtime.quant_linear import QuantLinear

    work = Path(a.work or tempfile.mkdtemp(prefix="optq-interop-"))
    work.mkdir(parents=True, exist_ok=True)
    ids = torch.randint(3, 2000, (1, 48), generator=torch.Generator().manual_seed(0))
    save_file({"input_ids": ids}, str(work / "ids.safetensors"))
    ours, folders = {}, []
    for i, (name, flags) in enumerate(CONFIGS.items()):
        out = work / f"ckpt{i}"
        if not (out / "config.json").exists():
            subprocess.run(optq_cmd("quantize", a.model, str(out), *flags, "--dataset", a.dataset, "--nsamples", "16",
                                    "--seqlen", "128", "--quiet", "--overwrite"), check=True)
        model = optq.load(out, dtype="float32", backend="reference")
        with torch.no_grad():
            ours[i] = {"logits": model(ids).logits,
                       **{n: m.dequantize_weight() for n, m in model.named_modules() if isinstance(m, QuantLinear)}}
        folders.append(str(out))
    rows = []
    for i, name in enumerate(CONFIGS):
        theirs_file = work / f"theirs{i}.safetensors"
        proc = subprocess.run([str(gq_python), str(Path(__file__).parent / "gptqmodel_logits.py"),
                               str(work / "ids.safetensors"), str(theirs_file), folders[i]], capture_output=True,
                              text=True)
        if proc.returncode != 0:  # GPTQModel refused the checkpoint: report its reason
            reason = [ln for ln in proc.stderr.splitlines() if "Error" in ln][-1:] or ["exit %d" % proc.returncode]
            rows.append({"config": name, "gptqmodel_refused": reason[0].strip()})
            continue
        theirs = {k.split(".", 1)[1]: v for k, v in load_file(str(theirs_file)).items()}
        mine = ours[i]
        modules = [k for k in mine if k != "logits"]
        missing = [m for m in modules if f"{m}.weight" not in theirs]
        w_err = max((mine[m] - theirs[f"{m}.weight"]).abs().max().item() for m in modules if m not in missing)
        lg = theirs["logits"]
        rows.append({"config": name, "modules": len(modules), "modules_gptqmodel_lacks": missing,
                     "max_abs_weight_diff": w_err, "max_abs_logit_diff": (mine["logits"] - lg).abs().max().item(),
                     "logit_scale": lg.abs().max().item(),
                     "greedy_agreement": (mine["logits"].argmax(-1) == lg.argmax(-1)).float().mean().item()})
    print(f"\n{'config':40s} {'modules':>7s} {'max |dW|':>10s} {'max |dlogit|':>12s} {'logit scale':>11s} "
          f"{'argmax agree':>12s}")
    for r in rows:
        if "gptqmodel_refused" in r:
            print(f"{r['config']:40s} GPTQModel refuses it: {r['gptqmodel_refused']}")
            continue
        print(f"{r['config']:40s} {r['modules']:7d} {r['max_abs_weight_diff']:10.3g} {r['max_abs_logit_diff']:12.3g} "
              f"{r['logit_scale']:11.3g} {r['greedy_agreement']:12.1%}"
              + (f" MISSING {r['modules_gptqmodel_lacks']}" if r["modules_gptqmodel_lacks"] else ""))
    print(json.dumps({"benchmark": "interop_gptqmodel", "machine": machine_info(), "model": a.model, "rows": rows}))


if __name__ == "__main__":
    main()
