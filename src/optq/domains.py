"""The quality report's domains: fixed, offline, reproducible token windows of text users run models on.

- `wiki`: WikiText-2 test (a file given by the caller), first windows of the joined text, as `optq eval`.
- `code`: Python source files of the running Python's standard library (every machine has them).
- `docs`: pydoc prose held out from calibration (texts.py says what each domain holds out).
- `chat`: the model's chat template around the built-in prompts (chat_prompts.py), answered greedily by the
  reference model; only the answer tokens are scored.
- `multilingual`: French, German and Spanish sentences of Django's translation catalogs (BSD-3-Clause;
  `pip install django`), read from its .mo files with the standard library's gettext.

Text windows are the first `windows` non-overlapping windows of `seqlen` tokens of the domain's text (the
multilingual ones taken from its languages in turn), so they depend only on the text and the tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .calibration import load_documents, tokenize_joined
from .chat_prompts import CHAT_PROMPTS
from .errors import OptqError
from .generation import has_chat_template, prompt_ids
from .texts import REPORT_LANGUAGES, django_catalog, pydoc_documents, stdlib_code

DOMAINS = ("wiki", "code", "docs", "chat", "multilingual")


@dataclass
class Domain:
    name: str
    source: str  # where the text comes from, for the report
    windows: list[torch.Tensor]  # token ids [1, L] each
    score_from: list[int]  # per window, the first position whose next-token prediction is scored
    note: str = ""
    prompts: list[str] = field(default_factory=list)  # chat: the user prompts, in window order
    keys: list[str | None] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        """Predictions scored."""
        return sum(w.shape[1] - 1 - s for w, s in zip(self.windows, self.score_from))


def _text_windows(name: str, source: str, ids: torch.Tensor, seqlen: int, windows: int) -> Domain:
    n = min(windows, ids.shape[1] // seqlen)
    if n == 0:
        raise OptqError(f"domain {name!r}: its text ({source}) has {ids.shape[1]} tokens, fewer than one window "
                        f"of {seqlen}: lower --seqlen")
    return Domain(name, source, [ids[:, i * seqlen:(i + 1) * seqlen].clone() for i in range(n)], [0] * n)


def multilingual_domain(tokenizer, seqlen: int, windows: int) -> Domain:
    per_lang = {lang: tokenize_joined(tokenizer, ["\n".join(django_catalog(lang))]) for lang in REPORT_LANGUAGES}
    out, counts = [], {lang: 0 for lang in per_lang}
    while len(out) < windows:
        progressed = False
        for lang, ids in per_lang.items():
            i = counts[lang]
            if len(out) < windows and (i + 1) * seqlen <= ids.shape[1]:
                out.append(ids[:, i * seqlen:(i + 1) * seqlen].clone())
                counts[lang] += 1
                progressed = True
        if not progressed:
            break
    if not out:
        raise OptqError(f"domain 'multilingual': fewer than {seqlen} tokens of text per language: lower --seqlen")
    source = "Django translation catalogs (BSD-3-Clause): " + ", ".join(f"{k} {v} windows" for k, v in counts.items())
    return Domain("multilingual", source, out, [0] * len(out))


def chat_domain(tokenizer, prompts: int) -> Domain | None:
    """The chat prompts in the model's chat template, without answers yet (the reference model adds them:
    quality.answer_chat). None where the tokenizer has no chat template."""
    if not has_chat_template(tokenizer):
        return None
    chosen = CHAT_PROMPTS[:prompts]
    windows = [prompt_ids(tokenizer, prompt) for prompt, _ in chosen]
    starts = [w.shape[1] - 1 for w in windows]
    return Domain("chat", f"{len(chosen)} built-in prompts in the model's chat template, answered greedily by the "
                  "reference model", windows, starts, prompts=[p for p, _ in chosen], keys=[k for _, k in chosen])


def build_domains(names, tokenizer, seqlen: int, windows: int, wiki: str | None, chat_prompts: int) -> list[Domain]:
    """The named domains; `wiki` needs the WikiText-2 test file (or any text) given as `wiki`. A domain that
    cannot be built here is an error naming it, except chat for a model with no chat template (skipped with a
    note)."""
    unknown = [n for n in names if n not in DOMAINS]
    if unknown:
        raise OptqError(f"unknown domain {unknown[0]!r}: use some of {', '.join(DOMAINS)}")
    out = []
    for name in names:
        if name == "wiki":
            if wiki is None:
                raise OptqError("domain 'wiki' needs the WikiText-2 test text: pass --dataset PATH/wiki.test.raw "
                                "(or drop 'wiki' from --domains)")
            ids = tokenize_joined(tokenizer, load_documents(wiki, split="test"))
            out.append(_text_windows("wiki", str(wiki), ids, seqlen, windows))
        elif name == "code":
            text, source = stdlib_code(max_chars=windows * seqlen * 6)
            out.append(_text_windows("code", source, tokenize_joined(tokenizer, [text]), seqlen, windows))
        elif name == "docs":
            ids = tokenize_joined(tokenizer, pydoc_documents(held_out=True))
            out.append(_text_windows("docs", "pydoc topics held out from the pydoc calibration set", ids, seqlen,
                                     windows))
        elif name == "multilingual":
            out.append(multilingual_domain(tokenizer, seqlen, windows))
        elif name == "chat":
            dom = chat_domain(tokenizer, chat_prompts)
            if dom is None:
                out.append(Domain("chat", "", [], [], note="skipped: the tokenizer has no chat template"))
            else:
                out.append(dom)
    return out
