"""Quality report: a model against a reference model on several domains, as users see it.

For every domain (domains.py), on the same token windows, the reference model runs first: its next-token
log-probabilities go to a file (ReferenceStore), its greedy answers to the chat prompts to JSON. Then each
model under test runs on the same windows, one at a time, and is compared token by token:

- KL(reference || model) per token, over the vocabulary entries with log p_ref > -16 (llama.cpp's
  `--kl-divergence` skips the entries below its floor the same way): mean with standard error, median,
  90/99/99.9th percentiles, max;
- top-1 agreement (llama.cpp's "same top p"): the share of tokens whose argmax matches;
- Δp of the true next token, p_model - p_ref: mean and RMS;
- ln(PPL(model) / PPL(reference)), and both perplexities.

And on the chat prompts: the model's greedy answers against the reference's (identical share; where a
prompt has a key word and the reference's answer contains it, the share of the model's that do).

Memory is one model plus a window: the reference's distributions are on disk, stored like llama.cpp's
KL base file (per token the log-probs as 16-bit codes over [-16, max]; BENCHMARKS.md measures what the
codes change), or as float32 (`precision="float32"`, exact, twice the size).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .domains import DOMAINS, Domain, build_domains
from .generation import greedy_answers
from .errors import OptqError

log = logging.getLogger("optq")

LOG_P_FLOOR = -16.0
CACHE_VERSION = 1
DEFAULT_DOMAINS = ("wiki", "code", "docs", "chat", "multilingual")


# ---- the reference's distributions on disk ------------------------------------------------------------


class ReferenceStore:
    """Per scored token: the reference's log-probs over the vocabulary (uint16 codes with a per-token scale,
    or float32), the log-prob of the true next token and the argmax, both exact."""

    def __init__(self, folder: Path, tokens: int, vocab: int, precision: str, mode: str):
        if precision not in ("uint16", "float32"):
            raise OptqError(f"reference precision {precision!r}: use uint16 or float32")
        self.folder, self.tokens, self.vocab, self.precision = folder, tokens, vocab, precision
        dtype = np.uint16 if precision == "uint16" else np.float32
        self.logp = np.lib.format.open_memmap(folder / "logp.npy", mode=mode, dtype=dtype, shape=(tokens, vocab))
        shape = (tokens,)
        self.scale = np.lib.format.open_memmap(folder / "scale.npy", mode=mode, dtype=np.float32, shape=shape)
        self.true_logp = np.lib.format.open_memmap(folder / "true_logp.npy", mode=mode, dtype=np.float64,
                                                   shape=shape)
        self.argmax = np.lib.format.open_memmap(folder / "argmax.npy", mode=mode, dtype=np.int64, shape=shape)

    def write(self, start: int, logp: torch.Tensor, targets: torch.Tensor) -> None:
        """Store rows start.. of log-probs [n, vocab] (float32) with their true next tokens [n]."""
        n = logp.shape[0]
        self.true_logp[start:start + n] = logp.gather(1, targets[:, None])[:, 0].double().numpy()
        self.argmax[start:start + n] = logp.argmax(1).numpy()
        if self.precision == "float32":
            self.logp[start:start + n] = logp.numpy()
            return
        top = logp.max(1).values
        scale = ((top - LOG_P_FLOOR) / 65535).clamp_min(1e-12)
        codes = ((logp - LOG_P_FLOOR) / scale[:, None]).round_().clamp_(0, 65535)
        self.scale[start:start + n] = scale.numpy()
        self.logp[start:start + n] = codes.to(torch.int32).numpy().astype(np.uint16)

    def read(self, start: int, n: int) -> torch.Tensor:
        """log p_ref [n, vocab] (float32); entries at or below the floor are -inf (not counted)."""
        raw = torch.from_numpy(np.array(self.logp[start:start + n]))
        if self.precision == "float32":
            logp = raw.clone()
            logp[logp <= LOG_P_FLOOR] = -math.inf
            return logp
        scale = torch.from_numpy(np.array(self.scale[start:start + n]))
        codes = raw.to(torch.int32)
        logp = codes.float() * scale[:, None] + LOG_P_FLOOR
        logp[codes == 0] = -math.inf
        return logp

    def flush(self) -> None:
        for a in (self.logp, self.scale, self.true_logp, self.argmax):
            a.flush()


# ---- per-token comparison ----------------------------------------------------------------------------


def token_stats(ref_logp: torch.Tensor, logq: torch.Tensor, ref_true: torch.Tensor, ref_argmax: torch.Tensor,
                targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per token: KL(ref || q) over the entries ref_logp keeps (finite), top-1 agreement, p_q - p_ref of the
    true token, and both true-token log-probs. Sums in float64."""
    # float32 terms (each exact to ~1e-7 relative) summed in float64: the sum is where precision is lost
    terms = ref_logp.exp().mul_(ref_logp - logq)  # -inf entries give 0 * -inf = nan: dropped next
    terms.masked_fill_(~torch.isfinite(ref_logp), 0.0)
    kl = terms.sum(1, dtype=torch.float64)
    q_true = logq.gather(1, targets[:, None])[:, 0].double()
    return {"kl": kl, "top1": (logq.argmax(1) == ref_argmax).double(),
            "dp": q_true.exp() - ref_true.exp(), "logq_true": q_true, "logp_true": ref_true}


@dataclass
class DomainResult:
    domain: str
    source: str
    tokens: int
    ppl: float
    ppl_ref: float
    ln_ppl_ratio: float
    kl_mean: float
    kl_stderr: float
    kl_median: float
    kl_p90: float
    kl_p99: float
    kl_p999: float
    kl_max: float
    top1: float  # share, 0..1
    dp_mean: float
    dp_rms: float
    note: str = ""
    answers_identical: float | None = None  # chat: share of answers equal to the reference's
    answers_key: float | None = None  # chat: share with the key word, of those where the reference has it
    answers_key_ref: float | None = None  # chat: share of annotated prompts whose reference answer has the key


def summarize(domain: Domain, stats: dict[str, torch.Tensor]) -> DomainResult:
    kl = stats["kl"]
    n = kl.numel()
    q = torch.quantile(kl, torch.tensor([0.5, 0.9, 0.99, 0.999], dtype=torch.float64)).tolist() if n else [0.0] * 4
    nll_q, nll_p = -stats["logq_true"].mean().item(), -stats["logp_true"].mean().item()
    return DomainResult(
        domain.name, domain.source, n, math.exp(nll_q), math.exp(nll_p), nll_q - nll_p,
        kl.mean().item(), (kl.std().item() / math.sqrt(n)) if n > 1 else 0.0, *q, kl.max().item(),
        stats["top1"].mean().item(), stats["dp"].mean().item(), stats["dp"].pow(2).mean().sqrt().item(), domain.note)


# ---- running a model over the windows ----------------------------------------------------------------


def _window_logp(model, ids: torch.Tensor, start: int) -> torch.Tensor:
    """log-softmax (float32) of the predictions of positions start..L-2 of one window."""
    device = next(model.parameters()).device
    with torch.inference_mode():
        logits = model(input_ids=ids.to(device), use_cache=False).logits[0, start:-1]
    return torch.log_softmax(logits.float().cpu(), dim=-1)


def with_answers(domain: Domain, answers: list[list[int]]) -> Domain:
    """The chat domain whose windows are prompt + the reference's answer (the answer tokens scored)."""
    windows = [torch.cat([w, torch.tensor([a], dtype=torch.long)], dim=1) if a else w
               for w, a in zip(domain.windows, answers)]
    return Domain(domain.name, domain.source, windows, domain.score_from, domain.note, domain.prompts, domain.keys)


def _fingerprint(domains: list[Domain], tokenizer) -> str:
    h = hashlib.sha256()
    vocab = tokenizer.get_vocab()
    h.update(json.dumps(sorted(vocab.items()), ensure_ascii=False).encode())
    for d in domains:
        h.update(d.name.encode())
        for w, s in zip(d.windows, d.score_from):
            h.update(np.asarray(w.numpy(), dtype=np.int64).tobytes())
            h.update(str(s).encode())
    return h.hexdigest()


def _model_identity(path) -> dict:
    """What names a reference model for the cache: its resolved path and its weight files' names and sizes."""
    from .models.loading import resolve_model_path

    p = resolve_model_path(path)
    files = [p] if p.is_file() else sorted(f for f in p.iterdir() if f.suffix in (".safetensors", ".gguf", ".bin"))
    return {"path": str(p), "files": [[f.name, f.stat().st_size] for f in files]}


@dataclass
class Reference:
    """The reference's side of a report, on disk: domains (chat with the reference's answers), the store."""

    folder: Path
    domains: list[Domain]
    store: ReferenceStore
    answers: list[list[int]]
    offsets: list[int]  # first store row of each domain
    seconds: float = 0.0
    meta: dict = field(default_factory=dict)


def _save_domains(folder: Path, domains: list[Domain], answers: list[list[int]]) -> None:
    data = [{"name": d.name, "source": d.source, "note": d.note, "score_from": d.score_from,
             "windows": [w[0].tolist() for w in d.windows], "prompts": d.prompts, "keys": d.keys}
            for d in domains]
    (folder / "domains.json").write_text(json.dumps({"domains": data, "answers": answers}))


def _load_domains(folder: Path) -> tuple[list[Domain], list[list[int]]]:
    data = json.loads((folder / "domains.json").read_text())
    doms = [Domain(d["name"], d["source"], [torch.tensor([w], dtype=torch.long) for w in d["windows"]],
                   d["score_from"], d["note"], d["prompts"], d["keys"]) for d in data["domains"]]
    return doms, data["answers"]


def build_reference(reference, tokenizer, domains: list[Domain], folder: Path, precision: str,
                    answer_tokens: int, key: dict, dtype="auto", progress: bool = True) -> Reference:
    """Run the reference model over the domains (answering the chat prompts first) into `folder`."""
    from tqdm.auto import tqdm

    from .api import load_any

    start = time.perf_counter()
    model, _ = load_any(reference, dtype=dtype)
    answers: list[list[int]] = []
    doms = []
    for d in domains:
        if d.name == "chat" and d.windows:
            answers = greedy_answers(model, tokenizer, d.windows, answer_tokens)
            d = with_answers(d, answers)
        doms.append(d)
    offsets, total = [], 0
    for d in doms:
        offsets.append(total)
        total += d.tokens
    vocab = model.config.get_text_config().vocab_size if hasattr(model.config, "get_text_config") \
        else model.config.vocab_size
    store = ReferenceStore(folder, total, _logits_width(model, doms, vocab), precision, "w+")
    row = 0
    bar = tqdm(total=sum(len(d.windows) for d in doms), desc="Reference", unit="window", disable=not progress)
    for d in doms:
        for w, s in zip(d.windows, d.score_from):
            logp = _window_logp(model, w, s)
            store.write(row, logp, w[0, s + 1:])
            row += logp.shape[0]
            bar.update()
    bar.close()
    store.flush()
    _save_domains(folder, doms, answers)
    meta = {**key, "tokens": total, "vocab": store.vocab, "precision": precision,
            "seconds": time.perf_counter() - start}
    (folder / "reference.json").write_text(json.dumps(meta, indent=1))
    del model
    return Reference(folder, doms, store, answers, offsets, meta["seconds"], meta)


def _logits_width(model, domains: list[Domain], vocab: int) -> int:
    """The logits' last dimension (some models pad the vocabulary beyond the tokenizer's)."""
    for d in domains:
        if d.windows:
            return _window_logp(model, d.windows[0][:, :2], 0).shape[-1]
    return vocab


def open_reference(folder: Path, key: dict) -> Reference | None:
    """A cached reference in `folder` made with the same `key`, None when there is none; a cache made for
    other windows, tokenizer or model is an error (never silently reused)."""
    meta_file = folder / "reference.json"
    if not meta_file.is_file():
        return None
    meta = json.loads(meta_file.read_text())
    for field_name, what in (("version", "optq cache version"), ("model", "reference model"),
                             ("windows", "domains, windows or tokenizer"), ("precision", "precision")):
        if meta.get(field_name) != key.get(field_name):
            raise OptqError(f"--cache-reference {folder} holds a reference made with another {what} "
                            f"({meta.get(field_name)!r}, here {key.get(field_name)!r}): use another folder or "
                            "delete it")
    doms, answers = _load_domains(folder)
    store = ReferenceStore(folder, meta["tokens"], meta["vocab"], meta["precision"], "r")
    offsets, total = [], 0
    for d in doms:
        offsets.append(total)
        total += d.tokens
    return Reference(folder, doms, store, answers, offsets, 0.0, meta)


# ---- the report --------------------------------------------------------------------------------------


@dataclass
class QualityReport:
    model: str
    reference: str
    results: list[DomainResult]
    seconds: float
    answers: list[str] = field(default_factory=list)  # the model's chat answers, decoded
    reference_answers: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"model": self.model, "reference": self.reference, "seconds": self.seconds,
                "domains": [asdict(r) for r in self.results]}

    def table(self) -> str:
        head = (f"{'domain':13s} {'tokens':>7s} {'PPL':>8s} {'PPL ref':>8s} {'ln ratio':>8s} {'KL mean':>17s} "
                f"{'KL med':>7s} {'KL p99':>7s} {'KL max':>7s} {'top-1':>6s} {'dp rms':>6s}")
        lines = [head]
        for r in self.results:
            if r.tokens == 0:
                lines.append(f"{r.domain:13s} {r.note}")
                continue
            line = (f"{r.domain:13s} {r.tokens:7d} {r.ppl:8.3f} {r.ppl_ref:8.3f} {r.ln_ppl_ratio:8.4f} "
                    f"{r.kl_mean:9.5f}±{r.kl_stderr:.5f} {r.kl_median:7.4f} {r.kl_p99:7.3f} {r.kl_max:7.3f} "
                    f"{100 * r.top1:5.1f}% {r.dp_rms:6.4f}")
            if r.answers_identical is not None:
                line += f"  answers: {100 * r.answers_identical:.0f}% identical"
                if r.answers_key is not None:
                    line += f", key word {100 * r.answers_key:.0f}%"
            lines.append(line)
        return "\n".join(lines)


def summary_table(reports: list[QualityReport], names: list[str] | None = None) -> str:
    """One row per model: mean KL per domain, top-1 agreement over all scored tokens, and the chat answers."""
    names = names or [Path(r.model).name or r.model for r in reports]
    domains = [r.domain for r in reports[0].results if r.tokens]
    width = max(12, *(len(n) for n in names))
    head = f"{'model':{width}s} " + " ".join(f"{'KL ' + d:>15s}" for d in domains) + f" {'top-1':>6s}"
    has_chat = any(r.answers_identical is not None for r in reports[0].results)
    if has_chat:
        head += f" {'same answer':>11s} {'key word':>8s}"
    lines = [head]
    for name, rep in zip(names, reports):
        by = {r.domain: r for r in rep.results}
        tokens = sum(by[d].tokens for d in domains)
        top1 = sum(by[d].top1 * by[d].tokens for d in domains) / max(tokens, 1)
        line = f"{name:{width}s} " + " ".join(f"{by[d].kl_mean:15.4f}" for d in domains) + f" {100 * top1:5.1f}%"
        chat = by.get("chat")
        if has_chat and chat is not None and chat.answers_identical is not None:
            key = f"{100 * chat.answers_key:7.0f}%" if chat.answers_key is not None else f"{'-':>8s}"
            line += f" {100 * chat.answers_identical:10.0f}% {key}"
        lines.append(line)
    return "\n".join(lines)


def _answer_scores(tokenizer, ref: Reference, dom: Domain, answers: list[list[int]]) -> tuple[float, float | None, float | None]:
    same = sum(a == b for a, b in zip(answers, ref.answers)) / max(len(answers), 1)
    with_key = [(k, tokenizer.decode(r, skip_special_tokens=True), tokenizer.decode(a, skip_special_tokens=True))
                for k, r, a in zip(dom.keys, ref.answers, answers) if k]
    if not with_key:
        return same, None, None
    ref_right = [(k, a) for k, r, a in with_key if k.lower() in r.lower()]
    ref_share = len(ref_right) / len(with_key)
    key_share = (sum(k.lower() in a.lower() for k, a in ref_right) / len(ref_right)) if ref_right else None
    return same, key_share, ref_share


def compare(model, tokenizer, ref: Reference, name: str, answer_tokens: int, progress: bool = True) -> QualityReport:
    """The report of a loaded model against a built reference."""
    from tqdm.auto import tqdm

    start = time.perf_counter()
    results, decoded, ref_decoded = [], [], []
    bar = tqdm(total=sum(len(d.windows) for d in ref.domains), desc="Compare", unit="window", disable=not progress)
    for d, offset in zip(ref.domains, ref.offsets):
        if not d.windows:
            results.append(DomainResult(d.name, d.source, 0, *([math.nan] * 13), note=d.note))
            continue
        parts: dict[str, list[torch.Tensor]] = {}
        row = offset
        for w, s in zip(d.windows, d.score_from):
            logq = _window_logp(model, w, s)
            n = logq.shape[0]
            if logq.shape[-1] != ref.store.vocab:
                raise OptqError(f"the model's vocabulary has {logq.shape[-1]} entries, the reference's "
                                f"{ref.store.vocab}: compare checkpoints of the same model")
            st = token_stats(ref.store.read(row, n), logq, torch.from_numpy(np.array(ref.store.true_logp[row:row + n])),
                             torch.from_numpy(np.array(ref.store.argmax[row:row + n])), w[0, s + 1:])
            for k, v in st.items():
                parts.setdefault(k, []).append(v)
            row += n
            bar.update()
        res = summarize(d, {k: torch.cat(v) for k, v in parts.items()})
        if d.name == "chat":
            prompts = [w[:, :s + 1] for w, s in zip(d.windows, d.score_from)]
            answers = greedy_answers(model, tokenizer, prompts, answer_tokens)
            res.answers_identical, res.answers_key, res.answers_key_ref = _answer_scores(tokenizer, ref, d, answers)
            decoded = [tokenizer.decode(a, skip_special_tokens=True) for a in answers]
            ref_decoded = [tokenizer.decode(a, skip_special_tokens=True) for a in ref.answers]
        results.append(res)
    bar.close()
    return QualityReport(name, str(ref.meta.get("model", {}).get("path", "")), results,
                         time.perf_counter() - start, decoded, ref_decoded)


def _check_tokenizers(tok, ref_tok, model: str, reference: str) -> None:
    if tok.get_vocab() != ref_tok.get_vocab():
        raise OptqError(f"{model} and the reference {reference} have different tokenizers or vocabularies: the "
                        "reference must be the model the checkpoint was quantized from")


def quality_reports(models: list, reference, domains=DEFAULT_DOMAINS, windows: int = 8, seqlen: int = 512,
                    wiki: str | None = None, cache_dir: str | os.PathLike | None = None, chat_prompts: int = 100,
                    answer_tokens: int = 48, precision: str = "uint16", dtype="auto", backend: str = "auto",
                    progress: bool = True) -> list[QualityReport]:
    """Reports of each of `models` (checkpoints, float folders, GGUF files, or (name, model, tokenizer) of a
    model in memory) against `reference`, on the same
    windows of `domains`. The reference runs once; with `cache_dir` its results are kept there for the next
    call with the same reference, windows and tokenizer (a cache made otherwise is an error)."""
    from .api import load_any
    from .models.loading import load_tokenizer, resolve_model_path

    domains = tuple(domains)
    if not domains:
        raise OptqError(f"no domains: use some of {', '.join(DOMAINS)}")
    ref_path = resolve_model_path(reference)
    ref_tok = load_tokenizer(ref_path, ref_path.is_file(), False)
    doms = build_domains(domains, ref_tok, seqlen, windows, wiki, chat_prompts)
    key = {"version": CACHE_VERSION, "model": _model_identity(reference), "windows": _fingerprint(doms, ref_tok),
           "precision": precision, "answer_tokens": answer_tokens}
    tmp = None
    if cache_dir is not None:
        folder = Path(cache_dir)
        folder.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.mkdtemp(prefix="optq-reference-")
        folder = Path(tmp)
    try:
        ref = open_reference(folder, key)
        if ref is None:
            ref = build_reference(reference, ref_tok, doms, folder, precision, answer_tokens, key, dtype, progress)
        elif progress:
            log.warning("reference from the cache %s", folder)
        reports = []
        for m in models:
            # a path, or (name, model, tokenizer) of a model already in memory
            name, model, tok = m if isinstance(m, tuple) else (str(m), *load_any(m, dtype=dtype, backend=backend))
            _check_tokenizers(tok, ref_tok, name, str(reference))
            reports.append(compare(model, tok, ref, name, answer_tokens, progress))
            del model
        return reports
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def plot_reports(reports: list[QualityReport], path: str | os.PathLike) -> None:
    """Bar chart of mean KL per domain, one bar per model (matplotlib: pip install optq[plot])."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise OptqError("--plot needs matplotlib: pip install matplotlib") from None
    names = [r.domain for r in reports[0].results if r.tokens]
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(names) * max(1, len(reports)) / 2), 4))
    width = 0.8 / len(reports)
    for i, rep in enumerate(reports):
        vals = {r.domain: r for r in rep.results}
        xs = [j + i * width for j in range(len(names))]
        ax.bar(xs, [vals[n].kl_mean for n in names], width, yerr=[vals[n].kl_stderr for n in names],
               label=Path(rep.model).name or rep.model)
    ax.set_xticks([j + width * (len(reports) - 1) / 2 for j in range(len(names))], names)
    ax.set_ylabel("mean KL(reference || model), nats/token")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.set_title("KL divergence against the reference, per domain")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
