"""The verdict at the end of `optq quantize`: a short quality report of the new checkpoint and of
round-to-nearest with the same settings, both against the float model, and one warning where GPTQ is not
the better of the two (what users would otherwise find out from a wrong chat answer)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from .config import QuantizeConfig
from .quality import QualityReport, quality_reports, summary_table

log = logging.getLogger("optq")

DOMAINS = ("chat", "code", "docs")
WINDOWS = 2  # per text domain, of up to 512 tokens
CHAT_PROMPTS = 16
ANSWER_TOKENS = 32


@dataclass
class Verdict:
    table: str
    worse: list[str]  # domains where the checkpoint's mean KL is not below RTN's
    reports: list[QualityReport]

    @property
    def warning(self) -> str | None:
        if not self.worse:
            return None
        return (f"GPTQ is not better than round-to-nearest on {', '.join(self.worse)} (mean KL against the float "
                "model): calibrate on text like yours (--dataset FILE; chat JSONL with 'messages' for a chat "
                "model), give more --nsamples, or keep RTN (--rtn)")


def rtn_model(reference, config: QuantizeConfig, dtype="auto"):
    """(model, tokenizer): the float model with each module the pipeline quantizes rounded to nearest on its
    grid (in memory: the weights hold the dequantized values)."""
    from .api import load_any
    from .core.grid import rtn_quantize
    from .models.loading import parse_dtype
    from .models.registry import get_submodule
    from .pipeline import linear_weight, planned_modules, set_linear_weight

    model, tok = load_any(reference, dtype="float32")
    for name, (_, _, mcfg) in planned_modules(model, config).items():
        module = get_submodule(model, name)
        set_linear_weight(module, rtn_quantize(linear_weight(module).float(), mcfg.grid(),
                                               mcfg.group_size).dequantize())
    return model.to(parse_dtype(dtype)), tok


def verdict(checkpoint: str | os.PathLike, reference, config: QuantizeConfig, progress: bool = False) -> Verdict:
    """The checkpoint and RTN (same bits, group size, grid) against the float `reference` on a few windows of
    chat, code and prose."""
    rtn, tok = rtn_model(reference, config)
    seqlen = min(512, getattr(rtn.config, "max_position_embeddings", None) or 512)
    reports = quality_reports([str(checkpoint), (f"RTN {config.bits}-bit", rtn, tok)], reference, DOMAINS,
                              windows=WINDOWS, seqlen=seqlen, chat_prompts=CHAT_PROMPTS,
                              answer_tokens=ANSWER_TOKENS, progress=progress)
    del rtn
    table = summary_table(reports, [f"this checkpoint ({config.bits}-bit)", f"RTN {config.bits}-bit"])
    worse = [g.domain for g, r in zip(reports[0].results, reports[1].results) if g.tokens and g.kl_mean >= r.kl_mean]
    return Verdict(table, worse, reports)
