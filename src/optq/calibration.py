"""Text -> token windows for calibration and evaluation.

Sources: a .txt file (documents separated by blank lines; WikiText `.raw` files are read line by line, as the
Hugging Face dataset rows are), a .jsonl file (field `text`), a folder of such files, the built-in name
`pydoc` (the Python documentation prose shipped with every Python), or `wikitext2` / `c4` through the
`datasets` library when the hub is reachable.
"""

from __future__ import annotations

import json
import logging
import random
import re
from pathlib import Path

import torch

from .errors import OptqError

log = logging.getLogger("optq")

BUILTIN_TEXTS = ("pydoc",)
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
                if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                    raise OptqError(f"{path}:{n} has no string field 'text'")
                docs.append(rec["text"])
        return docs
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".raw":
        return _wikitext_rows(text)
    return _split_documents(text)


# Every 4th pydoc topic (in name order) is held out of the `pydoc` calibration text: the quality report's
# `docs` domain scores them, so its prose is never text the checkpoint was calibrated on.
PYDOC_HELD_OUT_EVERY = 4


def pydoc_documents(held_out: bool = False) -> list[str]:
    """The pydoc topics used for calibration, or (held_out) the ones kept out of it for evaluation."""
    from pydoc_data.topics import topics

    names = sorted(topics)
    return [topics[k].strip() for i, k in enumerate(names) if (i % PYDOC_HELD_OUT_EVERY == 3) == held_out]


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


def load_documents(source: str, split: str = "train") -> list[str]:
    """Documents of a text source (see module docs); `split` chooses train/test for hub datasets."""
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


def tokenize_joined(tokenizer, documents: list[str]) -> torch.Tensor:
    """Token ids [1, N] of the documents joined with blank lines (the GPTQ paper's protocol)."""
    text = "\n\n".join(documents)
    # Special tokens as the tokenizer adds them by default (a BOS for Llama), as the reference code does.
    return tokenizer(text, return_tensors="pt").input_ids


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


def calibration_windows(tokenizer, source: str, nsamples: int, seqlen: int, seed: int = 0) -> list[torch.Tensor]:
    return sample_windows(tokenize_joined(tokenizer, load_documents(source, "train")), nsamples, seqlen, seed)
