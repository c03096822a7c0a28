"""Perplexity by the GPTQ paper protocol, and text generation, for float models and quantized checkpoints."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch

from .calibration import load_documents, tokenize_joined
from .errors import OptqError


@dataclass
class PerplexityResult:
    perplexity: float
    tokens: int  # tokens scored: windows x seqlen
    windows: int
    seqlen: int
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def perplexity_of_ids(
    model: torch.nn.Module, ids: torch.Tensor, seqlen: int, max_windows: int | None = None, progress: bool = True
) -> PerplexityResult:
    """exp of the mean loss over non-overlapping windows of `seqlen` tokens (the tail shorter than a window is
    dropped, as in the reference code)."""
    from tqdm.auto import tqdm

    windows = ids.shape[1] // seqlen
    if max_windows is not None:
        windows = min(windows, max_windows)
    if windows == 0:
        raise OptqError(f"the evaluation text has {ids.shape[1]} tokens, fewer than one window of {seqlen}")
    device = next(model.parameters()).device
    total = 0.0
    start = time.perf_counter()
    with torch.no_grad():
        for i in tqdm(range(windows), desc="Perplexity", unit="window", disable=not progress):
            batch = ids[:, i * seqlen : (i + 1) * seqlen].to(device)
            logits = model(input_ids=batch, use_cache=False).logits
            loss = torch.nn.functional.cross_entropy(
                logits[0, :-1].float(), batch[0, 1:], reduction="mean"
            )
            total += float(loss)
    ppl = math.exp(total / windows)
    return PerplexityResult(ppl, windows * seqlen, windows, seqlen, time.perf_counter() - start)


def perplexity(
    model, tokenizer, dataset: str, seqlen: int = 2048, max_windows: int | None = None, progress: bool = True
) -> PerplexityResult:
    ids = tokenize_joined(tokenizer, load_documents(dataset, split="test"))
    return perplexity_of_ids(model, ids, seqlen, max_windows, progress)


def generate(model, tokenizer, prompt: str, max_new_tokens: int = 64, chat: bool = False) -> str:
    """Greedy continuation of `prompt` (through the chat template when `chat` and the tokenizer has one)."""
    if chat and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    else:
        text = prompt
    enc = tokenizer(text, return_tensors="pt")
    device = next(model.parameters()).device
    with torch.no_grad():
        out = model.generate(
            **{k: v.to(device) for k, v in enc.items()},
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        )
    return tokenizer.decode(out[0, enc.input_ids.shape[1] :], skip_special_tokens=True)
