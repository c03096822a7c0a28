"""Text -> token windows for calibration and evaluation.

Sources: a .txt file (documents separated by blank lines; WikiText `.raw` files are read line by line, as the
Hugging Face dataset rows are), a .jsonl file (field `text`, or `messages`: a conversation, put in the model's
chat template), a folder of such files, the built-in names `mix` (the default: see `mix_windows`) and `pydoc`
(the Python documentation prose shipped with every Python), or `wikitext2` / `c4` through the `datasets`
library when the hub is reachable.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
from pathlib import Path

import torch

from .cache import cache_root
from .errors import OptqError
from .generation import chat_ids, greedy_answers, has_chat_template, prompt_ids, sampled_text
from .texts import CALIBRATION_LANGUAGES, django_available, django_catalog, pydoc_documents, stdlib_code

log = logging.getLogger("optq")

MIX = "mix"
BUILTIN_TEXTS = (MIX, "pydoc")
HUB_DATASETS = ("wikitext2", "c4")
_TEXT_SUFFIXES = (".txt", ".raw", ".jsonl", ".md")


def _split_documents(text: str) -> list[str]:
    docs = re.split(r"\n\s*\n", text)
    return [d.strip("\n") for d in docs if d.strip()]


def _wikitext_rows(text: str) -> list[str]:
    # The Hugging Face wikitext rows: one per line, blank lines as "", other lines with their newline.
    return ["" if not line.strip() else line + "\n" for line in text.split("\n")[:-1]]


def _read_file(path: Path) -> list[str]:
    try:
        return _read_text_file(path)
    except UnicodeDecodeError as e:
        raise OptqError(f"{path} is not UTF-8 text (byte {e.start}): --dataset takes a text file (.txt, .raw, "
                        ".md, .jsonl with a 'text' field), a folder of them, or a name (pydoc, wikitext2, c4)") from None


def _read_text_file(path: Path) -> list[str]:
    if path.suffix == ".jsonl":
        docs = []
        with path.open(encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise OptqError(f"{path}:{n} is not valid JSON ({e.msg}): each line must be an object") from None
                docs.append(_jsonl_document(rec, path, n))
        return docs
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".raw":
        return _wikitext_rows(text)
    return _split_documents(text)


class Conversation(list):
    """A chat JSONL record's `messages` ([{"role", "content"}, ...]): tokenized in the model's chat template."""


def _jsonl_document(rec, path: Path, n: int) -> str | Conversation:
    if isinstance(rec, dict) and isinstance(rec.get("text"), str):
        return rec["text"]
    messages = rec.get("messages") if isinstance(rec, dict) else None
    if isinstance(messages, list) and messages and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages):
        return Conversation(messages)
    raise OptqError(f"{path}:{n} has neither a string field 'text' nor 'messages' (a list of objects with string "
                    "'role' and 'content')")


def _hub_documents(name: str, split: str) -> list[str]:
    try:
        import datasets  # noqa: F401
    except ImportError:
        raise OptqError(
            f"dataset {name!r} needs the `datasets` library and the Hugging Face hub: pip install datasets, "
            "or pass a local .txt/.jsonl file or folder"
        ) from None
    from datasets import load_dataset

    try:
        if name == "wikitext2":
            ds = load_dataset("wikitext", "wikitext-2-raw-v1", split="test" if split == "test" else "train")
        else:
            ds = load_dataset(
                "allenai/c4",
                data_files={"train": "en/c4-train.00000-of-01024.json.gz", "validation": "en/c4-validation.00000-of-00008.json.gz"},
                split="validation" if split == "test" else "train",
            )
    except Exception as e:  # datasets raises many types when offline
        raise OptqError(
            f"cannot fetch dataset {name!r} from the Hugging Face hub ({type(e).__name__}); offline, pass a local "
            "text file or folder instead"
        ) from None
    return list(ds["text"])


def load_documents(source: str, split: str = "train") -> list[str | Conversation]:
    """Documents of a text source (see module docs); `split` chooses train/test for hub datasets. `mix` is
    model-dependent (calibration only): its prose part is pydoc's."""
    if source in BUILTIN_TEXTS:
        return pydoc_documents(held_out=split == "test")
    if source in HUB_DATASETS:
        return _hub_documents(source, split)
    path = Path(source).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in _TEXT_SUFFIXES)
        if not files:
            raise OptqError(f"folder {path} has no text files ({', '.join(_TEXT_SUFFIXES)})")
        return [d for f in files for d in _read_file(f)]
    if path.is_file():
        return _read_file(path)
    raise OptqError(
        f"dataset {source!r} is neither a file, a folder nor a known name ({', '.join(BUILTIN_TEXTS + HUB_DATASETS)})"
    )


def tokenize_joined(tokenizer, documents: list[str | Conversation]) -> torch.Tensor:
    """Token ids [1, N] of the documents joined with blank lines (the GPTQ paper's protocol), followed by the
    conversations, each in the tokenizer's chat template."""
    texts = [d for d in documents if not isinstance(d, Conversation)]
    chats = [d for d in documents if isinstance(d, Conversation)]
    # Special tokens as the tokenizer adds them by default (a BOS for Llama), as the reference code does.
    parts = [tokenizer("\n\n".join(texts), return_tensors="pt").input_ids] if texts else []
    if chats:
        if not has_chat_template(tokenizer):
            raise OptqError("the calibration set has chat conversations ('messages') but the model's tokenizer has "
                            "no chat template: give plain text ('text') instead")
        parts += [chat_ids(tokenizer, list(c)) for c in chats]
    return torch.cat(parts, dim=1)


def sample_windows(ids: torch.Tensor, nsamples: int, seqlen: int, seed: int) -> list[torch.Tensor]:
    """`nsamples` windows of `seqlen` tokens at seeded random offsets (as in the GPTQ reference code)."""
    if nsamples <= 0 or seqlen <= 0:
        raise OptqError("nsamples and seqlen must be positive")
    total = ids.shape[1]
    if total <= seqlen:
        raise OptqError(
            f"the calibration text has {total} tokens, too few for windows of {seqlen} tokens: give more text "
            f"or lower --seqlen (at most {max(total - 1, 0)})"
        )
    if nsamples * seqlen > total:
        log.warning(
            "calibration text has %d tokens, fewer than nsamples x seqlen = %d: windows will overlap",
            total,
            nsamples * seqlen,
        )
    rng = random.Random(seed)
    windows = []
    for _ in range(nsamples):
        i = rng.randint(0, total - seqlen - 1)
        windows.append(ids[:, i : i + seqlen].clone())
    return windows


# The default calibration set's parts and their shares of the windows, chosen by the quality report
# (BENCHMARKS.md, "Default calibration" and "The model's own text"). A part with less text than its share
# takes what it has in non-overlapping windows and the rest go to prose and code.
MIX_SHARES = {"prose": 0.20, "code": 0.18, "chat": 0.20, "multilingual": 0.12, "sampled": 0.30}
CHAT_ANSWER_TOKENS = 128


def chat_samples(model, tokenizer, prompts, answer_tokens: int = CHAT_ANSWER_TOKENS) -> torch.Tensor:
    """Token ids [1, N] of the prompts and the model's own greedy answers, each in the chat template, joined.
    The answers are kept in optq's cache (see `_cached`): quantizing the same model again (other bits, say)
    skips the generation and gets the same tokens."""
    asked = [prompt_ids(tokenizer, p) for p in prompts]
    key = _model_key(model, [ids.numpy() for ids in asked], f"answers {answer_tokens}")
    answers = _cached("chat-answers", key, lambda: greedy_answers(model, tokenizer, asked, answer_tokens, batch=32))
    return torch.cat([torch.cat([q, torch.tensor([a], dtype=torch.long)], dim=1) for q, a in zip(asked, answers)],
                     dim=1)


def own_text(model, tokenizer, count: int, seqlen: int, seed: int) -> list[torch.Tensor]:
    """`count` windows [1, seqlen] of text the model writes itself from its start-of-document token (see
    `sampled_text`): text in the model's own distribution, whatever it was trained on, where the built-in
    parts cover only some domains. Cached like the chat answers."""
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ends = tuple(sorted({t for t in ([eos] if isinstance(eos, int) else eos or []) + [tokenizer.eos_token_id]
                         if t is not None and t != start}))
    key = _model_key(model, [], f"sampled bf16 {start} {ends} {count} {seqlen} {seed}")
    rows = _cached("sampled-text", key,
                   lambda: sampled_text(_bfloat16(model), start, count, seqlen - 1, seed, banned=ends).tolist())
    return [torch.tensor([r], dtype=torch.long) for r in rows]


def _bfloat16(model):
    """The model in bfloat16 for sampling (a copy where it is not): 1.8x float32's speed on the CPUs measured,
    and sampled text needs no more precision than its own randomness."""
    if all(p.dtype == torch.bfloat16 for p in model.parameters() if p.is_floating_point()):
        return model
    import copy

    return copy.deepcopy(model).to(torch.bfloat16)


def _model_key(model, arrays, what: str) -> str:
    """What a model's generated text depends on: the weights (every parameter's name, shape and dtype and a
    strided sample of its values: enough to tell two checkpoints apart without reading gigabytes twice), the
    prompts' token ids, the generation's arguments, and the machine (its float kernels decide near-ties)."""
    from .core.choice import machine_key

    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in model.named_parameters():
            flat = p.detach().reshape(-1)
            h.update(f"{name} {tuple(p.shape)} {p.dtype}".encode())
            h.update(flat[:: max(1, flat.numel() // 4096)].float().cpu().numpy().tobytes())
    for a in arrays:
        h.update(a.astype("int64").tobytes())
    h.update(f"{what} {machine_key()}".encode())
    return h.hexdigest()[:24]


def _cached(kind: str, key: str, generate):
    """The JSON value `generate()` makes, kept in optq's cache under `kind/key.json` (a read-only or full cache
    only costs the generation next time)."""
    path = cache_root() / kind / f"{key}.json"
    try:
        value = json.loads(path.read_text())
        log.info("calibration: %s from %s", kind, path)
        return value
    except (OSError, ValueError):
        pass
    value = generate()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(value))
        os.replace(tmp, path)
    except OSError as e:
        log.debug("%s not cached: %s", kind, e)
    return value


def _mix_counts(nsamples: int, seqlen: int, lengths: dict[str, int]) -> dict[str, int]:
    shares = {k: MIX_SHARES[k] for k in lengths}
    total = sum(shares.values())
    counts = {k: int(nsamples * v / total) for k, v in shares.items()}
    for k in ("chat", "multilingual"):  # the small parts: no more windows than they fill without overlap
        if k in counts:
            counts[k] = min(counts[k], lengths[k] // seqlen)
    left = nsamples - sum(counts.values())
    big = [k for k in ("prose", "code") if k in counts]
    for i in range(left):
        counts[big[i % len(big)]] += 1
    return counts


def mix_windows(tokenizer, model, nsamples: int, seqlen: int, seed: int = 0) -> tuple[list[torch.Tensor], dict]:
    """The default calibration set: windows of Python documentation prose (pydoc, less the topics the report
    holds out), standard-library code (package modules; the report scores the top-level ones), the model's own
    greedy answers to built-in chat prompts in its chat template (models with one), Italian/Portuguese/Dutch UI
    text from Django's catalogs (when Django is installed), and text the model writes itself from its
    start-of-document token. `model` None leaves out the two generated parts. Returns the windows and how many
    came from each part."""
    from .chat_prompts import CALIBRATION_PROMPTS

    streams = {"prose": tokenize_joined(tokenizer, pydoc_documents()),
               "code": tokenize_joined(tokenizer, [stdlib_code(nsamples * seqlen * 6, held_out=False)[0]])}
    if model is not None and has_chat_template(tokenizer):
        streams["chat"] = chat_samples(model, tokenizer, CALIBRATION_PROMPTS)
    if django_available():
        streams["multilingual"] = tokenize_joined(tokenizer, ["\n".join(django_catalog(lang))
                                                              for lang in CALIBRATION_LANGUAGES])
    lengths = {k: v.shape[1] for k, v in streams.items()}
    if model is not None:
        lengths["sampled"] = nsamples * seqlen  # written to measure: never short
    counts = _mix_counts(nsamples, seqlen, lengths)
    windows = []
    for i, (name, ids) in enumerate(streams.items()):
        if counts[name]:
            windows += sample_windows(ids, counts[name], seqlen, seed + i)
    if counts.get("sampled"):
        windows += own_text(model, tokenizer, counts["sampled"], seqlen, seed)
    return windows, counts


def calibration_windows(tokenizer, source: str, nsamples: int, seqlen: int, seed: int = 0,
                        model=None) -> list[torch.Tensor]:
    """The calibration windows of `source`; `mix` (the default) needs the float `model` for its chat part."""
    if source == MIX:
        windows, counts = mix_windows(tokenizer, model, nsamples, seqlen, seed)
        log.info("calibration: %s", ", ".join(f"{k} {v}" for k, v in counts.items()))
        return windows
    return sample_windows(tokenize_joined(tokenizer, load_documents(source, "train")), nsamples, seqlen, seed)
