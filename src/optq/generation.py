"""Chat prompts in a model's template and batched greedy answers: what the quality report's chat domain and
the chat part of the default calibration are made of."""

from __future__ import annotations

import torch


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def chat_ids(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> torch.Tensor:
    """Token ids [1, L] of a conversation in the tokenizer's chat template (the template adds any BOS)."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    return tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids


def prompt_ids(tokenizer, prompt: str) -> torch.Tensor:
    """A user prompt in the chat template, ending where the assistant's answer starts."""
    return chat_ids(tokenizer, [{"role": "user", "content": prompt}], add_generation_prompt=True)


def stop_ids(model, tokenizer) -> tuple[int, ...]:
    """The tokens that end an answer: the model's generation config's end tokens, else the tokenizer's."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None) or tokenizer.eos_token_id
    return tuple(i for i in (eos if isinstance(eos, list) else [eos]) if i is not None)


def greedy_answers(model, tokenizer, prompts: list[torch.Tensor], max_new_tokens: int,
                   batch: int = 16) -> list[list[int]]:
    """Greedy answer token ids to each prompt [1, L] (batched, left-padded; an end-of-turn token ends an
    answer and is kept)."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stops = set(stop_ids(model, tokenizer))
    out = []
    for b in range(0, len(prompts), batch):
        chunk = prompts[b:b + batch]
        width = max(p.shape[1] for p in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, p in enumerate(chunk):
            ids[i, width - p.shape[1]:] = p[0]
            mask[i, width - p.shape[1]:] = 1
        with torch.inference_mode():
            gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                                 max_new_tokens=max_new_tokens, pad_token_id=pad)
        for row in gen[:, width:].tolist():
            answer = []
            for t in row:
                answer.append(t)
                if t in stops:
                    break
            out.append(answer)
    return out


def sampled_text(model, start_id: int, count: int, length: int, seed: int, top_p: float = 0.95,
                 top_k: int = 64, banned: tuple[int, ...] = ()) -> torch.Tensor:
    """[count, 1 + length] token ids: `count` documents the model writes from `start_id` (its start-of-document
    token), sampled at temperature 1 from the smallest set of likeliest tokens that holds `top_p` of the
    probability (at most `top_k` of them), with `banned` (its end tokens) never drawn so that every document
    has `length` tokens. Seeded: the same model, arguments and machine give the same tokens.

    A loop of its own rather than `generate(do_sample=True)`: that draws over the whole vocabulary every step
    (exponential noise for 49k-262k logits per row), which took half the time here; this draws among top_k."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    ids = torch.full((count, 1), start_id, dtype=torch.long)
    out = [ids]
    cache = {_cache_argument(model): DynamicCache(config=model.config)}
    with torch.inference_mode():
        for _ in range(length):
            logits = model(input_ids=ids.to(device), use_cache=True, logits_to_keep=1, **cache).logits[:, -1]
            logits = logits.float().cpu()
            if banned:
                logits[:, list(banned)] = float("-inf")
            top, idx = torch.log_softmax(logits, dim=-1).topk(top_k, dim=-1)
            p = top.exp()
            p = p * ((p.cumsum(-1) - p) < top_p)  # the likeliest tokens until top_p of the mass is reached
            ids = idx.gather(-1, torch.multinomial(p, 1, generator=gen))
            out.append(ids)
    return torch.cat(out, dim=1)


def _cache_argument(model) -> str:
    """The forward's name for the KV cache: `cache` from Transformers 5.3x, `past_key_values` before."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
