"""runtime.decode: the fast decode step against Transformers' module path, fused projections against separate
calls, and the token loop against Transformers' generate."""

import pytest
import torch
import transformers as tf

import optq
from optq.api import save_quantized
from optq.config import QuantizeConfig
from optq.pipeline import quantize_model
from optq.runtime import native
from optq.runtime.decode import FAMILIES, FastDecoder, fast_generate, supported

SMALL = dict(vocab_size=160, num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
             num_key_value_heads=2)
CONFIGS = {
    "llama": lambda: tf.LlamaConfig(**SMALL),
    "mistral": lambda: tf.MistralConfig(sliding_window=5, **SMALL),
    "qwen2": lambda: tf.Qwen2Config(use_sliding_window=True, sliding_window=5, max_window_layers=1, **SMALL),
    "qwen3": lambda: tf.Qwen3Config(head_dim=16, **SMALL),
    "gemma": lambda: tf.GemmaConfig(head_dim=16, **SMALL),
}


def _model(kind, seed=0):
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(CONFIGS[kind]()).eval()
    if kind == "qwen2":  # Qwen2's q/k/v biases start at zero: make them count
        for layer in model.model.layers:
            for m in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                m.bias.data.normal_(0, 0.5)
    return model


def _module_path_logits(model, ids, prompt):
    """Logits after each position from `prompt` on, by Transformers' forward with its own cache."""
    from transformers import DynamicCache

    from optq.generation import _cache_argument

    cache = {_cache_argument(model): DynamicCache(config=model.config)}
    with torch.inference_mode():
        out = [model(input_ids=ids[:, :prompt], use_cache=True, **cache).logits[0, -1].float()]
        for t in range(prompt, ids.shape[1]):
            out.append(model(input_ids=ids[:, t:t + 1], use_cache=True, **cache).logits[0, -1].float())
    return torch.stack(out)


def _fast_logits(model, ids, prompt):
    decoder = FastDecoder(model, ids.shape[1])
    out = [decoder.prefill(ids[:, :prompt])]
    out += [decoder.step(int(t)) for t in ids[0, prompt:]]
    return torch.stack(out)


def test_every_family_has_a_test_config():
    assert set(CONFIGS) == set(FAMILIES)


@pytest.mark.parametrize("kind", FAMILIES)
def test_float_model_same_logits_as_module_path(kind):
    model = _model(kind)
    assert supported(model) is None
    ids = torch.randint(0, 160, (1, 16), generator=torch.Generator().manual_seed(1))
    ref = _module_path_logits(model, ids, prompt=4)  # 12 steps: past the sliding windows of 5
    fast = _fast_logits(model, ids, prompt=4)
    assert torch.allclose(fast, ref, atol=1e-4, rtol=1e-4), (fast - ref).abs().max()


def test_sliding_window_is_applied():
    """The window matters for these positions: a model without it gives other logits."""
    model = _model("mistral")
    ids = torch.randint(0, 160, (1, 16), generator=torch.Generator().manual_seed(1))
    fast = _fast_logits(model, ids, prompt=4)
    model.config.sliding_window = None
    for layer in model.model.layers:
        layer.self_attn.sliding_window = None
    assert not torch.allclose(fast, _fast_logits(model, ids, prompt=4), atol=1e-3)


def _quantized(kind, tmp_path, dtype):
    model = _model(kind)
    windows = [torch.randint(0, 160, (1, 24), generator=torch.Generator().manual_seed(i)) for i in range(4)]
    result = quantize_model(model, windows, QuantizeConfig(bits=4, group_size=32), progress=False)
    save_quantized(model, result, tmp_path / "ckpt", dtype="float32")
    return optq.load(tmp_path / "ckpt", dtype=dtype)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
def test_quantized_model_same_logits_as_module_path(kind, tmp_path):
    model = _quantized(kind, tmp_path, "float32")
    ids = torch.randint(0, 160, (1, 14), generator=torch.Generator().manual_seed(2))
    ref = _module_path_logits(model, ids, prompt=4)
    fast = _fast_logits(model, ids, prompt=4)
    assert torch.allclose(fast, ref, atol=1e-4, rtol=1e-4), (fast - ref).abs().max()


@pytest.mark.skipif(not native.bf16_supported(), reason="bf16 kernels need AVX-512 BF16")
def test_bf16_model_close_to_module_path(tmp_path):
    """bf16 activations: the module path rounds its hidden states to bf16 where this path keeps float32, so
    the two agree to bf16's precision, not exactly."""
    model = _quantized("llama", tmp_path, "bfloat16")
    ids = torch.randint(0, 160, (1, 14), generator=torch.Generator().manual_seed(2))
    ref = _module_path_logits(model, ids, prompt=4)
    fast = _fast_logits(model, ids, prompt=4)
    assert (fast - ref).abs().max() < 0.05 * ref.std()


@pytest.mark.skipif(not native.load(), reason="optq's native kernels are not available here")
@pytest.mark.parametrize("kind, dtype", [("llama", "float32"), ("llama", "bfloat16"), ("qwen2", "float32")])
def test_fused_projections_equal_separate_calls(tmp_path, kind, dtype):
    """Exactly: the fused call computes the same output tiles (Qwen2's q/k/v biases are added in float32,
    as the module path does with float32 activations)."""
    if dtype == "bfloat16" and not native.bf16_supported():
        pytest.skip("bf16 kernels need AVX-512 BF16")
    model = _quantized(kind, tmp_path, dtype)
    decoder = FastDecoder(model, 8)
    attn, mlp = model.model.layers[1].self_attn, model.model.layers[1].mlp
    x = torch.randn(1, 64, generator=torch.Generator().manual_seed(3))
    layer = decoder.layers[1]
    assert layer.qkv.fused is not None and layer.gate_up.fused is not None
    # the modules' kernels now read their tiles of the fused tensors: the weights are held once
    storage = lambda t: t.untyped_storage().data_ptr()  # noqa: E731
    assert storage(attn.k_proj._kernel.packed) == storage(layer.qkv.kernel.packed)
    assert storage(mlp.up_proj._kernel.scale) == storage(layer.gate_up.kernel.scale)
    with torch.inference_mode():
        for fused, modules in ((layer.qkv, (attn.q_proj, attn.k_proj, attn.v_proj)),
                               (layer.gate_up, (mlp.gate_proj, mlp.up_proj))):
            for got, m in zip(fused(x), modules):
                want = m(x.to(getattr(torch, dtype))).float()
                assert torch.equal(got.float(), want)


def test_greedy_loop_matches_transformers_generate():
    model = _model("qwen3")
    ids = torch.randint(0, 160, (1, 6), generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        ref = model.generate(ids, max_new_tokens=20, min_new_tokens=20, do_sample=False, pad_token_id=0)[0, 6:]
    seen = []
    got = fast_generate(model, ids, max_new_tokens=20, on_token=seen.append)
    assert got == ref.tolist() == seen


def test_stop_tokens_and_min_new_tokens():
    model = _model("llama")
    ids = torch.randint(0, 160, (1, 6), generator=torch.Generator().manual_seed(4))
    free = fast_generate(model, ids, max_new_tokens=12)
    stop = free[3]
    first = free.index(stop)
    assert fast_generate(model, ids, max_new_tokens=12, stop_ids=(stop,)) == free[:first + 1]
    held = fast_generate(model, ids, max_new_tokens=12, stop_ids=(stop,), min_new_tokens=12)
    assert len(held) == 12 and stop not in held


def test_sampling_is_seeded_and_stays_in_top_k():
    model = _model("llama")
    ids = torch.randint(0, 160, (1, 6), generator=torch.Generator().manual_seed(4))
    a = fast_generate(model, ids, max_new_tokens=16, temperature=1.0, top_k=3, seed=7)
    assert a == fast_generate(model, ids, max_new_tokens=16, temperature=1.0, top_k=3, seed=7)
    assert a != fast_generate(model, ids, max_new_tokens=16, temperature=1.0, top_k=3, seed=8)
    # each drawn token is among the 3 likeliest after the tokens before it (module path, independent)
    seq = torch.cat([ids, torch.tensor([a])], dim=1)
    with torch.inference_mode():
        logits = model(seq).logits[0, ids.shape[1] - 1:-1]
    top3 = logits.topk(3).indices
    assert all(t in row.tolist() for t, row in zip(a, top3))


def test_unsupported_model_says_why():
    model = tf.AutoModelForCausalLM.from_config(tf.GPT2Config(n_embd=32, n_head=2, n_layer=1, vocab_size=50))
    assert "gpt2" in supported(model)
    with pytest.raises(ValueError, match="cannot run this model"):
        FastDecoder(model, 8)
