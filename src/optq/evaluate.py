"""Perplexity by the GPTQ paper protocol, and text generation, for float models and quantized checkpoints."""

from __future__ import annotations

import math
import statistics
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


def generate(model, tokenizer, prompt: str, max_new_tokens: int = 64, chat: bool = False,
             decoder: str = "auto") -> str:
    """Greedy continuation of `prompt` (through the chat template when `chat` and the tokenizer has one), up to
    the model's end token. decoder: "fast" (runtime.decode), "transformers" (`generate`), or "auto" (fast
    where it runs the model)."""
    from .generation import stop_ids
    from .runtime.decode import fast_generate

    if chat and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    else:
        text = prompt
    enc = tokenizer(text, return_tensors="pt")
    if _use_fast(model, decoder):
        new = fast_generate(model, enc.input_ids, max_new_tokens, stop_ids=stop_ids(model, tokenizer))
        return tokenizer.decode(new, skip_special_tokens=True)
    device = next(model.parameters()).device
    with torch.no_grad():
        out = model.generate(
            **{k: v.to(device) for k, v in enc.items()},
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        )
    return tokenizer.decode(out[0, enc.input_ids.shape[1] :], skip_special_tokens=True)


DECODERS = ("auto", "fast", "transformers")


def _use_fast(model, decoder: str) -> bool:
    """Whether to decode with runtime.decode's fast step; "fast" on a model it cannot run is an error."""
    from .runtime.decode import supported

    if decoder not in DECODERS:
        raise OptqError(f"decoder {decoder!r} is unknown: use one of {', '.join(DECODERS)}")
    why = supported(model)
    if decoder == "fast" and why is not None:
        raise OptqError(f"the fast decoder cannot run this model ({why}): use --decoder transformers")
    return decoder != "transformers" and why is None


# ---- speed ----------------------------------------------------------------------------------------------


@dataclass
class SpeedResult:
    decode_tok_s: float  # batch-1 greedy decode; the time includes the prompt
    prefill_tok_s: float
    weight_bytes: int  # weight bytes one decode step reads
    weight_gb_s: float  # weight_bytes x decode tokens/s
    rss_mb: float  # process resident memory after loading and one generation
    prompt_tokens: int
    new_tokens: int
    prefill_tokens: int
    runs: int
    decoder: str  # "fast" (runtime.decode) or "transformers"

    def to_dict(self) -> dict:
        return asdict(self)


def weight_bytes_per_token(model) -> int:
    """Bytes of weights one decode step reads: every linear layer (lm_head included; a tied embedding is read
    through it), not the embedding lookup, which reads one row."""
    from torch import nn

    from .runtime.quant_linear import QuantLinear

    total = 0
    for m in model.modules():
        if isinstance(m, nn.Linear):
            total += m.weight.numel() * m.weight.element_size()
        elif isinstance(m, QuantLinear):
            total += m.bytes_per_call()
    return total


def rss_mb() -> float:
    """Resident memory of this process (Linux), MB."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def median_seconds(fn, runs: int) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def decode_speed(model, prompt_tokens: int = 32, new_tokens: int = 128, prefill_tokens: int = 512,
                 runs: int = 5, seed: int = 0, decoder: str = "auto") -> SpeedResult:
    """Batch-1 greedy decode tokens/s (EOS ignored, median of `runs`, after one warm-up; the fast decoder or
    Transformers' `generate`, as `generate` chooses) and prefill tokens/s (one `prefill_tokens` prompt, median
    of 3) on random token ids (speed does not depend on the text)."""
    from .runtime.decode import fast_generate

    if runs < 1 or new_tokens < 1 or prompt_tokens < 1 or prefill_tokens < 1:
        raise OptqError("runs, new_tokens, prompt_tokens and prefill_tokens must be >= 1")
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    device = next(model.parameters()).device
    prompt = torch.randint(0, vocab, (1, prompt_tokens), generator=g).to(device)
    long_prompt = torch.randint(0, vocab, (1, prefill_tokens), generator=g).to(device)
    fast = _use_fast(model, decoder)
    if fast:
        run = lambda: fast_generate(model, prompt, new_tokens)  # noqa: E731 (no stop tokens: all new_tokens)
    else:
        kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        run = lambda: model.generate(prompt, **kw)  # noqa: E731
    with torch.inference_mode():
        run()  # warm-up: first-call costs are not decode speed
        rss = rss_mb()
        decode = median_seconds(run, runs)
        model(long_prompt, use_cache=True, logits_to_keep=1)
        prefill = median_seconds(lambda: model(long_prompt, use_cache=True, logits_to_keep=1), 3)
    weight_bytes = weight_bytes_per_token(model)
    tok_s = new_tokens / decode
    return SpeedResult(tok_s, prefill_tokens / prefill, weight_bytes, weight_bytes * tok_s / 1e9, rss,
                       prompt_tokens, new_tokens, prefill_tokens, runs,
                       "fast" if fast else "transformers")
