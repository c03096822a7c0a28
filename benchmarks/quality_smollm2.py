"""SmolLM2-135M quality: float vs RTN vs optq GPTQ vs GPTQModel GPTQ, WikiText-2 perplexity.

Protocol (the GPTQ paper's): calibration = 128 windows x 2048 tokens drawn with seed 0 from
../shared/data/wikitext-2-tokens/wiki2.valid.txt; evaluation = wiki.test.raw rows joined with blank lines,
non-overlapping 2048-token windows. Both tools quantize the same float weights (the GGUF dequantized once and
saved as a safetensors folder) with the same token windows and settings (sym, no act-order, damp 0.01).

Every step's output is kept in --work, so an interrupted run continues where it stopped.
Usage: python benchmarks/quality_smollm2.py [--work DIR] [--bits 4 3] [--gptqmodel-venv DIR] [--eval-dtype float32]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SHARED, machine_info, optq_cmd, run_timed  # noqa: E402


def export_float(folder: Path) -> None:
    """The SmolLM2 GGUF dequantized to float32 safetensors (what both tools start from)."""
    if (folder / "config.json").exists():
        return
    from optq.models.loading import load_source_model

    src = load_source_model("smollm2", "float32")
    folder.mkdir(parents=True)
    src.model.save_pretrained(str(folder), safe_serialization=True)
    src.tokenizer.save_pretrained(str(folder))


def write_windows(model_dir: Path, path: Path, nsamples: int, seqlen: int) -> None:
    if path.exists():
        return
    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    from optq.calibration import calibration_windows

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    windows = calibration_windows(tok, str(SHARED / "wikitext-2-tokens" / "wiki2.valid.txt"), nsamples, seqlen, 0)
    save_file({"windows": torch.cat(windows).contiguous()}, str(path))


def evaluate(model: Path, out_json: Path, dtype: str, log: Path, backend: str = "auto") -> dict:
    if not out_json.exists():
        run_timed(optq_cmd("eval", str(model), "--dataset", str(SHARED / "wikitext-2-raw" / "wiki.test.raw"),
                           "--seqlen", "2048", "--dtype", dtype, "--backend", backend, "--json"), log)
        out_json.write_text(log.read_text().strip().splitlines()[-1] + "\n")
    return json.loads(out_json.read_text())


def folder_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="bench-output/quality", help="folder for models, logs and results")
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 3])
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--eval-dtype", default="bfloat16", help="activation dtype of the perplexity runs")
    ap.add_argument("--compute-dtype", default="bfloat16",
                    help="calibration forward dtype, for optq and GPTQModel alike")
    ap.add_argument("--desc-act", action="store_true", help="act-order for the GPTQ runs (both tools)")
    ap.add_argument("--optq-flags", default="",
                    help="extra GPTQ flags for both tools' runs, e.g. '--static-groups --gptaq'")
    ap.add_argument("--gptqmodel-venv", default="/tmp/optq-gptqmodel-venv",
                    help="venv made by benchmarks/gptqmodel_env.sh; skipped if absent")
    a = ap.parse_args()

    work = Path(a.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    float_dir = work / "smollm2-float"
    export_float(float_dir)
    windows = work / f"windows-{a.nsamples}x{a.seqlen}.safetensors"
    write_windows(float_dir, windows, a.nsamples, a.seqlen)
    cal = str(SHARED / "wikitext-2-tokens" / "wiki2.valid.txt")
    gq_python = Path(a.gptqmodel_venv) / "bin" / "python"

    rows = []
    res = evaluate(float_dir, work / "eval-float.json", a.eval_dtype, work / "eval-float.log")
    rows.append({"model": "float32", "bits": 32, "perplexity": res["perplexity"], "size_mb": folder_size(float_dir) / 1e6})
    for bits in a.bits:
        runs = {
            "rtn": optq_cmd("quantize", str(float_dir), "", "--rtn", "--bits", str(bits), "--group-size",
                            str(a.group_size), "--quiet"),
            "optq-gptq": optq_cmd("quantize", str(float_dir), "", "--bits", str(bits), "--group-size",
                                  str(a.group_size), "--dataset", cal, "--nsamples", str(a.nsamples), "--seqlen",
                                  str(a.seqlen), "--seed", "0", "--compute-dtype", a.compute_dtype, "--quiet",
                                  "--resume",  # an interrupted harness run continues where it stopped
                                  *(["--desc-act"] if a.desc_act else []), *a.optq_flags.split()),
        }
        if gq_python.exists():
            runs["gptqmodel-gptq"] = [str(gq_python), str(Path(__file__).parent / "gptqmodel_quantize.py"),
                                      str(float_dir), "", "--windows", str(windows), "--bits", str(bits),
                                      "--group-size", str(a.group_size), "--dtype", a.compute_dtype]
            runs["gptqmodel-gptq"] += ["--desc-act"] if a.desc_act else []
            runs["gptqmodel-gptq"] += a.optq_flags.split()  # same names in gptqmodel_quantize.py
        for name, cmd in runs.items():
            act = "-act" if (a.desc_act and name != "rtn") else ""
            if name != "rtn":
                act += "".join("-" + f.lstrip("-") for f in a.optq_flags.split())
            out = work / f"{name}-{bits}bit-g{a.group_size}{act}"
            cmd[cmd.index("")] = str(out)
            timing_file = work / f"{out.name}.timing.json"
            if not (out / "config.json").exists() or not timing_file.exists():
                timing = run_timed(cmd, work / f"{out.name}.log")
                timing_file.write_text(json.dumps(timing) + "\n")
            timing = json.loads(timing_file.read_text())
            res = evaluate(out, work / f"eval-{out.name}.json", a.eval_dtype, work / f"eval-{out.name}.log")
            rows.append({"model": name + act, "bits": bits, "perplexity": res["perplexity"],
                         "size_mb": folder_size(out) / 1e6, "quantize_seconds": timing["seconds"],
                         "quantize_peak_rss_mb": timing["peak_rss_mb"]})
            print(json.dumps(rows[-1]), flush=True)

    base = rows[0]["perplexity"]
    print(f"\nSmolLM2-135M-Instruct, wiki.test.raw seqlen {a.seqlen}, calibration {a.nsamples} x {a.seqlen} "
          f"wiki2.valid, group size {a.group_size}, eval dtype {a.eval_dtype}")
    print(f"{'model':20s} {'bits':>4s} {'ppl':>9s} {'gap closed':>10s} {'size MB':>8s} {'quant s':>8s} {'peak MB':>8s}")
    for r in rows:
        closed = ""
        if r["model"] != "rtn" and r["bits"] != 32 and any(x["model"] == "rtn" and x["bits"] == r["bits"] for x in rows):
            rtn = next(x for x in rows if x["model"] == "rtn" and x["bits"] == r["bits"])
            closed = f"{(rtn['perplexity'] - r['perplexity']) / (rtn['perplexity'] - base):.0%}"
        print(f"{r['model']:20s} {r['bits']:4d} {r['perplexity']:9.3f} {closed:>10s} {r['size_mb']:8.1f} "
              f"{r.get('quantize_seconds', 0):8.1f} {r.get('quantize_peak_rss_mb', 0):8.0f}")
    result = {"benchmark": "quality_smollm2", "machine": machine_info(), "args": vars(a), "rows": rows}
    (work / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
