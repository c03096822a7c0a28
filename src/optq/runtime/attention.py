"""Decode-step attention for CPU: Transformers' sdpa, except for one query token.

torch 2.13's CPU flash-attention kernel, which sdpa picks, spends ~150 us on a single decode query whatever
the cache length (32 heads over 8 KV heads, 100 cached positions: 149 us; the three plain ops below: 48 us),
which is 2.4 ms of every token on a 16-layer 1B model. For one query the kernel's blocking buys nothing: the
grouped query heads attend to their shared KV head through two batched matmuls and a float32 softmax. Every
other case (prompts, masks with per-head values, soft-capping, attention weights requested) goes to
Transformers' own sdpa function, with its own mask.
"""

from __future__ import annotations

import torch
from torch import nn

NAME = "optq_sdpa"


def decode_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                     **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    b, heads, q_len, dim = query.shape
    kv_heads, length = key.shape[1], key.shape[2]
    simple = (q_len == 1 and heads % kv_heads == 0 and (dropout == 0.0 or not module.training)
              and kwargs.get("softcap") is None and kwargs.get("position_bias") is None
              and kwargs.get("cache") is None and not kwargs.get("output_attentions", False)
              and (attention_mask is None or attention_mask.shape[1] == 1))
    if not simple:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    scale = scaling if scaling is not None else dim ** -0.5
    q = query.reshape(b, kv_heads, heads // kv_heads, dim)  # query heads grouped by the KV head they read
    scores = torch.matmul(q, key.transpose(-1, -2)).float() * scale  # [b, kv, group, L]
    if attention_mask is not None:
        mask = attention_mask[..., -length:].reshape(b, 1, 1, length)
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    probs = torch.softmax(scores, dim=-1).to(value.dtype)
    out = torch.matmul(probs, value)  # [b, kv, group, dim]
    return out.reshape(b, heads, 1, dim).transpose(1, 2), None


def use_decode_attention(model: nn.Module) -> bool:
    """Switch a model that runs Transformers' sdpa attention to decode_attention; False if it does not."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, decode_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    try:
        model.set_attn_implementation(NAME)
    except (ValueError, AttributeError, TypeError):
        return False
    return config._attn_implementation == NAME
