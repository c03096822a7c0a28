"""CPU attention for Transformers models: sdpa, except for one query token (decode) and, during calibration,
causal self-attention (optq's native kernel: bf16 with AVX-512 BF16, float32 on AVX2-only CPUs).

torch 2.13's CPU flash-attention kernel, which sdpa picks, spends ~150 us on a single decode query whatever
the cache length (32 heads over 8 KV heads, 100 cached positions: 149 us; the three plain ops below: 48 us),
which is 2.4 ms of every token on a 16-layer 1B model. For one query the kernel's blocking buys nothing: the
grouped query heads attend to their shared KV head through two batched matmuls and a float32 softmax. Every
other case (prompts, masks with per-head values, soft-capping, attention weights requested) goes to
Transformers' own sdpa function, with its own mask.
"""

from __future__ import annotations

import contextlib
import logging

import torch
from torch import nn

from ..core import choice

log = logging.getLogger("optq")

NAME = "optq_sdpa"
CAUSAL_NAME = "optq_causal"
# Attention arguments that do not change what plain causal self-attention computes (when None/False, or for
# sliding_window, when the window covers the whole sequence); any other set argument goes to sdpa.
_HARMLESS = {"position_ids", "cache_position", "use_cache", "output_attentions", "sliding_window", "is_causal"}


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


def _native_causal_applies(module: nn.Module, query, key, value, attention_mask, dropout, kwargs) -> bool:
    from . import native

    b, heads, q_len, dim = query.shape
    if not (q_len > 1 and attention_mask is None and key.shape[2] == q_len and value.shape[2] == q_len):
        return False
    if kwargs.get("is_causal", getattr(module, "is_causal", True)) is not True:
        return False
    if dropout != 0.0 and module.training:
        return False
    window = kwargs.get("sliding_window")
    if window is not None and window < q_len:
        return False
    if any(v is not None and v is not False and k not in _HARMLESS for k, v in kwargs.items()):
        return False
    if kwargs.get("output_attentions"):
        return False
    dtype = query.dtype
    if dtype not in (torch.bfloat16, torch.float32) or not all(
            t.dtype == dtype and t.device.type == "cpu" and t.stride(-1) == 1 for t in (query, key, value)):
        return False
    if dim % 16 or dim > 256 or key.shape[1] == 0 or heads % key.shape[1] or value.shape[-1] != dim:
        return False
    if dtype == torch.float32:
        # AVX2 CPUs only: there it beats torch's fp32 kernel by ~25%; with AVX-512 torch's is not measured
        return native.cpu_supported() and not native.avx512() and native.load()
    return native.bf16_supported() and native.load()


def causal_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                     **kwargs):
    """decode_attention, with unmasked causal self-attention (every calibration window) on optq's native
    kernel: bf16 8 ms instead of torch's 33 ms for 9 heads x 2048 tokens x 64 on an AVX-512 BF16 CPU, float32
    35 ms instead of 45 on an AVX2-only one (native/attention.cpp)."""
    if _native_causal_applies(module, query, key, value, attention_mask, dropout, kwargs):
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5

        def native():
            return torch.ops.optq_native.causal_attention(query, key, value, float(scale)), None

        def sdpa():
            return decode_attention(module, query, key, value, None, dropout=dropout, scaling=scaling, **kwargs)

        shape = (query.shape[1], key.shape[1], query.shape[2], query.shape[3], str(query.dtype).split(".")[-1])
        # optq's kernel beat torch's 4x on an AVX-512 BF16 EPYC, torch's (oneDNN, AMX) beat it 3x on a Xeon
        if choice.fastest("causal attention", shape, ["native", "sdpa"],
                          lambda: {"native": native, "sdpa": sdpa}) == "native":
            return native()
    return decode_attention(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


@contextlib.contextmanager
def native_causal_attention(model: nn.Module):
    """Within the block, a model that runs Transformers' sdpa attention runs `causal_attention` instead (its
    previous implementation is restored after). Yields whether it switched."""
    config = getattr(model, "config", None)
    previous = getattr(config, "_attn_implementation", None)
    switched = False
    if previous == "sdpa":
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        AttentionInterface.register(CAUSAL_NAME, causal_attention)
        AttentionMaskInterface.register(CAUSAL_NAME, sdpa_mask)
        try:
            model.set_attn_implementation(CAUSAL_NAME)
            switched = config._attn_implementation == CAUSAL_NAME
        except (ValueError, AttributeError, TypeError) as e:
            log.debug("native causal attention not used: %s", e)
    try:
        yield switched
    finally:
        if switched:
            model.set_attn_implementation(previous)
