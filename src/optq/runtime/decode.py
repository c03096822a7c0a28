"""Batch-1 decode without Transformers' per-module Python: a step of a few torch calls per layer, and its loop.

Why: on a 2-core AMX Xeon a SmolLM2 4-bit decode step took 13.9 ms through the module tree, of which the
4-bit kernels were under 40%; the rest was 545 dtype conversions, 120 KV-cache `cat`s, bf16 single-query
attention (slower than float32 at these sizes) and per-module dispatch (BENCHMARKS.md, "Decode profile").
The model stays Transformers' (weights, config, loading, the prompt's forward); `FastDecoder.step` reads the
same modules' weights and runs one token per layer as:
    rms_norm -> one q|k|v kernel call -> (q/k norms) -> RoPE -> write k, v into a float32 static cache ->
    two float32 bmm's and a softmax -> o kernel -> residual -> rms_norm -> one gate|up kernel call -> act * up
    -> down kernel -> residual
with the residual stream in float32 and each kernel's input cast once to its dtype. q/k/v and gate/up are one
call where their QuantLinears run optq's native kernel (`_Projection`: the kernels' tiles concatenated, which
needs the same input order and groups; else one call each). RoPE comes from the model's own rotary module
(any rope scaling it implements holds). Families: Llama, Mistral, Qwen2, Qwen3 and Gemma (v1), the decoder
layout they share; `supported` says why another model is not, and callers then use Transformers' path.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .quant_linear import NativeKernel, QuantLinear

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma")
ACTIVATIONS = {"silu": F.silu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
               "gelu": F.gelu}


def supported(model: nn.Module) -> str | None:
    """None when FastDecoder runs this model, else why not."""
    config = getattr(model, "config", None)
    kind = getattr(config, "model_type", None)
    if kind not in FAMILIES:
        return f"model type {kind!r} is not one of {', '.join(FAMILIES)}"
    act = getattr(config, "hidden_act", None)
    if act not in ACTIVATIONS:
        return f"activation {act!r} is not one of {', '.join(ACTIVATIONS)}"
    if next(model.parameters()).device.type != "cpu":
        return "the model is not on the CPU"
    return None


class _Projection:
    """Linears that read the same input, as one kernel call where they can be; returns their outputs [1, n_i]."""

    def __init__(self, modules: list[nn.Module]):
        self.modules = modules
        self.widths = [m.out_features for m in modules]
        self.fused = _concat_native(modules)
        if self.fused is not None:
            kernel, self.offsets, self.bias = self.fused
            self.kernel = kernel

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.fused is None:
            return [m(x if isinstance(m, QuantLinear) else x.to(m.weight.dtype)) for m in self.modules]
        k = self.kernel
        xk = x[:, k.perm] if k.perm is not None else x
        y = k(xk.to(k.dtype).contiguous())  # the fused kernel's width is its padded width: no slicing
        if self.bias is not None:
            y = y.float().add_(self.bias)
        return [y[:, a:a + w] for a, w in zip(self.offsets, self.widths)]


def _concat_native(modules: list[nn.Module]):
    """(one NativeKernel over every module's output tiles, each module's first output column in it, bias or
    None), or None where the modules' kernels differ in kind, dtype, input order or groups."""
    kernels = [getattr(m, "_kernel", None) for m in modules]
    if not all(isinstance(k, NativeKernel) for k in kernels):
        return None
    first = kernels[0]
    for k in kernels[1:]:
        same_perm = (k.perm is None) == (first.perm is None) and (k.perm is None or torch.equal(k.perm, first.perm))
        if k.op is not first.op or k.dtype != first.dtype or not same_perm or not torch.equal(k.starts, first.starts):
            return None
    if len(kernels) == 1:
        fused = first
    else:
        cat = lambda name: torch.cat([getattr(k, name) for k in kernels])  # noqa: E731 (tile-major tensors)
        width = sum(k.packed.shape[0] for k in kernels) * NativeKernel.TILE_N
        fused = NativeKernel(cat("packed"), cat("scale"), cat("zp"), first.starts, first.perm, width, first.dtype,
                             first.op)
        # Each module's kernel becomes a view of its tiles in the fused one (contiguous: the tensors are
        # tile-major), so the weights are held once and the module path still runs.
        tile = 0
        for k in kernels:
            n = k.packed.shape[0]
            k.packed, k.scale, k.zp = (t[tile:tile + n] for t in (fused.packed, fused.scale, fused.zp))
            tile += n
    offsets, start = [], 0
    for k in kernels:
        offsets.append(start)
        start += k.packed.shape[0] * NativeKernel.TILE_N
    bias = None
    if any(m.bias is not None for m in modules):
        bias = torch.zeros(start)
        for m, a in zip(modules, offsets):
            if m.bias is not None:
                bias[a:a + m.out_features] = m.bias.float()
    return fused, offsets, bias


# model -> (its QuantLinears' kernels when built, FastDecoder's weights for it)
_WEIGHTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@dataclass
class _Layer:
    input_norm: torch.Tensor  # float32 RMSNorm weights (Gemma's 1 + w folded in)
    post_norm: torch.Tensor
    qkv: _Projection
    o: _Projection
    gate_up: _Projection
    down: _Projection
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    scaling: float


class FastDecoder:
    """Decode steps for one sequence of `model` (see the module's docstring), with a static float32 KV cache
    of `max_len` positions."""

    def __init__(self, model: nn.Module, max_len: int):
        why = supported(model)
        if why is not None:
            raise ValueError(f"FastDecoder cannot run this model: {why}")
        self.model = model
        config = model.config
        inner = model.model
        self.gemma = config.model_type == "gemma"
        self.eps = config.rms_norm_eps
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.act = ACTIVATIONS[config.hidden_act]
        self.embed = inner.embed_tokens  # Gemma's scales by sqrt(hidden_size) itself
        self.final_norm, self.lm_head, self.layers = self._weights(model)
        # sliding-window attention: each layer's keys within this many positions (None: all)
        self.windows = [_window(config, i) for i in range(len(self.layers))]
        self.max_len = max_len
        # The model's own rotary table (float32), with the sign of rotate_half folded into sin.
        positions = torch.arange(max_len)[None]
        probe = torch.zeros(1, max_len, self.head_dim)
        cos, sin = inner.rotary_emb(probe, positions)
        half = self.head_dim // 2
        self.cos = cos[0].float()
        self.sin = torch.cat([-sin[0, :, :half], sin[0, :, half:]], dim=-1).float()
        shape = (self.kv_heads, max_len, self.head_dim)
        self.keys = [torch.zeros(shape) for _ in self.layers]
        self.values = [torch.zeros(shape) for _ in self.layers]
        self.length = 0

    def _weights(self, model: nn.Module):
        """(final norm, lm_head, layers), built once per model (fusing moves kernel tensors) and again only if
        a module's kernel was rebuilt since; norm weights changed in place afterwards are not seen."""
        kernels = [(m, m._kernel) for m in model.modules() if isinstance(m, QuantLinear)]
        cached = _WEIGHTS.get(model)
        if cached is not None and all(m._kernel is k for m, k in cached[0]):
            return cached[1]
        layers = [self._layer(layer) for layer in model.model.layers]
        weights = (self._norm_weight(model.model.norm), _Projection([model.lm_head]), layers)
        _WEIGHTS[model] = (kernels, weights)
        return weights

    def _norm_weight(self, norm: nn.Module) -> torch.Tensor:
        w = norm.weight.detach().float()
        return 1 + w if self.gemma else w

    def _layer(self, layer: nn.Module) -> _Layer:
        attn, mlp = layer.self_attn, layer.mlp
        q_norm = getattr(attn, "q_norm", None)
        k_norm = getattr(attn, "k_norm", None)
        return _Layer(
            input_norm=self._norm_weight(layer.input_layernorm),
            post_norm=self._norm_weight(layer.post_attention_layernorm),
            qkv=_Projection([attn.q_proj, attn.k_proj, attn.v_proj]),
            o=_Projection([attn.o_proj]),
            gate_up=_Projection([mlp.gate_proj, mlp.up_proj]),
            down=_Projection([mlp.down_proj]),
            q_norm=None if q_norm is None else self._norm_weight(q_norm),
            k_norm=None if k_norm is None else self._norm_weight(k_norm),
            scaling=float(attn.scaling),
        )

    @torch.inference_mode()
    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        """Run the prompt ids [1, L] through Transformers' forward (its batched kernels), keep its keys and
        values in the static cache; returns the last position's logits [vocab] (float32)."""
        from transformers import DynamicCache

        from ..generation import _cache_argument

        if ids.shape[0] != 1:
            raise ValueError("FastDecoder runs one sequence (batch 1)")
        if ids.shape[1] > self.max_len:
            raise ValueError(f"the prompt has {ids.shape[1]} tokens, more than max_len={self.max_len}")
        cache = DynamicCache(config=self.model.config)
        out = self.model(input_ids=ids, use_cache=True, logits_to_keep=1, **{_cache_argument(self.model): cache})
        n = ids.shape[1]
        for i, layer in enumerate(cache.layers):
            self.keys[i][:, :n] = layer.keys[0].float()
            self.values[i][:, :n] = layer.values[0].float()
        self.length = n
        return out.logits[0, -1].float()

    @torch.inference_mode()
    def step(self, token: int) -> torch.Tensor:
        """Feed one token at the next position; returns its logits [vocab] (float32)."""
        pos = self.length
        if pos >= self.max_len:
            raise ValueError(f"the KV cache holds {self.max_len} positions; make the FastDecoder longer")
        x = self.embed(torch.tensor([[token]]))[0].float()
        hidden, d, half = x.shape[-1], self.head_dim, self.head_dim // 2
        cos, sin = self.cos[pos], self.sin[pos]
        for i, layer in enumerate(self.layers):
            h = F.rms_norm(x, (hidden,), layer.input_norm, self.eps)
            q, k, v = layer.qkv(h)
            q = q.float().view(self.heads, d)
            k = k.float().view(self.kv_heads, d)
            if layer.q_norm is not None:
                q = F.rms_norm(q, (d,), layer.q_norm, self.eps)
                k = F.rms_norm(k, (d,), layer.k_norm, self.eps)
            # RoPE: x cos + rotate_half(x) sin, rotate_half's sign folded into self.sin
            q = torch.addcmul(q * cos, q.roll(half, dims=-1), sin)
            torch.addcmul(k * cos, k.roll(half, dims=-1), sin, out=self.keys[i][:, pos])
            self.values[i][:, pos] = v.view(self.kv_heads, d)
            window = self.windows[i]
            start = 0 if window is None else max(0, pos + 1 - window)
            keys, values = self.keys[i][:, start:pos + 1], self.values[i][:, start:pos + 1]
            q = q.view(self.kv_heads, self.heads // self.kv_heads, d)
            scores = torch.bmm(q, keys.transpose(1, 2)).mul_(layer.scaling).softmax(dim=-1)
            attn = torch.bmm(scores, values).view(1, self.heads * d)
            x.add_(layer.o(attn)[0])  # in place, widening the kernel's bf16 output as it adds
            h = F.rms_norm(x, (hidden,), layer.post_norm, self.eps)
            gate, up = layer.gate_up(h)
            x.add_(layer.down(self.act(gate) * up)[0])
        self.length = pos + 1
        h = F.rms_norm(x, (hidden,), self.final_norm, self.eps)
        return self.lm_head(h)[0][0].float()


def _window(config, index: int) -> int | None:
    """Layer `index`'s sliding window: where `layer_types` names the sliding layers (Qwen2), only those;
    without it (Mistral) `sliding_window` applies to every layer."""
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if types is not None:
        return window if types[index] == "sliding_attention" else None
    return window


def pick_token(logits: torch.Tensor, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
               generator: torch.Generator | None = None) -> int:
    """Greedy (temperature 0) or sampled: temperature, then the top_k likeliest (0: all), then the smallest
    set of them holding top_p of the probability."""
    if temperature <= 0:
        return int(logits.argmax())
    logits = logits / temperature
    if top_k > 0:
        logits, idx = logits.topk(min(top_k, logits.shape[-1]))
    else:
        logits, idx = logits.sort(descending=True)
    p = logits.softmax(-1)
    if top_p < 1.0:
        p = p * ((p.cumsum(-1) - p) < top_p)
    return int(idx[torch.multinomial(p, 1, generator=generator)])


@torch.inference_mode()
def fast_generate(model: nn.Module, ids: torch.Tensor, max_new_tokens: int, stop_ids: tuple[int, ...] = (),
                  temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                  on_token: Callable[[int], None] | None = None, min_new_tokens: int = 0) -> list[int]:
    """New token ids after the prompt ids [1, L]: greedy, or sampled (temperature > 0; seeded), ending after a
    token of `stop_ids` (kept) once `min_new_tokens` are out, or at `max_new_tokens`; `on_token` sees each
    token as it comes (streaming)."""
    decoder = FastDecoder(model, ids.shape[1] + max_new_tokens)
    generator = torch.Generator().manual_seed(seed)
    logits = decoder.prefill(ids)
    out: list[int] = []
    stops = set(stop_ids)
    while True:
        if len(out) < min_new_tokens and stops:
            logits[list(stops)] = float("-inf")
        token = pick_token(logits, temperature, top_k, top_p, generator)
        out.append(token)
        if on_token is not None:
            on_token(token)
        if token in stops or len(out) == max_new_tokens:
            return out
        logits = decoder.step(token)
