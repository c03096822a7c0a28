"""Every registered architecture: capture, true-sequential quantization, checkpoint write, optq.load, logits."""

import copy

import pytest
import torch
from torch import nn
import transformers as tf

import optq
from optq.api import save_quantized
from optq.config import QuantizeConfig
from optq.errors import OptqError
from optq.models.registry import ARCHITECTURES, arch_spec, layer_groups
from optq.pipeline import quantize_model
from optq.runtime.quant_linear import QuantLinear

SMALL = dict(vocab_size=160, num_hidden_layers=2)
LLAMA_LIKE = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, **SMALL)

CONFIGS = {
    "llama": lambda: tf.LlamaConfig(**LLAMA_LIKE),
    "mistral": lambda: tf.MistralConfig(**LLAMA_LIKE),
    "qwen2": lambda: tf.Qwen2Config(**LLAMA_LIKE),
    "qwen3": lambda: tf.Qwen3Config(head_dim=16, **LLAMA_LIKE),
    "gemma": lambda: tf.GemmaConfig(head_dim=16, **LLAMA_LIKE),
    "gemma2": lambda: tf.Gemma2Config(head_dim=16, query_pre_attn_scalar=16, sliding_window=8, **LLAMA_LIKE),
    "gemma3_text": lambda: tf.Gemma3TextConfig(head_dim=16, query_pre_attn_scalar=16, sliding_window=8,
                                               **LLAMA_LIKE),
    "phi3": lambda: tf.Phi3Config(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                  num_key_value_heads=4, pad_token_id=0, **SMALL),
    "opt": lambda: tf.OPTConfig(hidden_size=64, ffn_dim=128, num_attention_heads=4, word_embed_proj_dim=64,
                                max_position_embeddings=128, **SMALL),
    "gpt2": lambda: tf.GPT2Config(n_embd=64, n_head=4, n_layer=2, n_positions=128, vocab_size=160),
    "gpt_neox": lambda: tf.GPTNeoXConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                         max_position_embeddings=128, **SMALL),
    # mixtures of experts (4 experts, 2 per token; tests/test_moe.py checks them in depth)
    "qwen2_moe": lambda: tf.Qwen2MoeConfig(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
                                           shared_expert_intermediate_size=64, **LLAMA_LIKE),
    "qwen3_moe": lambda: tf.Qwen3MoeConfig(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
                                           head_dim=16, **LLAMA_LIKE),
    "olmoe": lambda: tf.OlmoeConfig(num_experts=4, num_experts_per_tok=2, **LLAMA_LIKE),
    "mixtral": lambda: tf.MixtralConfig(num_local_experts=4, num_experts_per_tok=2, **LLAMA_LIKE),
}


def test_every_registered_architecture_has_a_test_config():
    assert set(CONFIGS) == set(ARCHITECTURES)


def _random_model(model_type, seed=0):
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(CONFIGS[model_type]())
    return model.eval()


def _windows(vocab, n=4, length=24, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (1, length), generator=g) for _ in range(n)]


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_quantize_save_load(model_type, tmp_path):
    model = _random_model(model_type)
    original = copy.deepcopy(model)
    windows = _windows(model.config.vocab_size)
    result = quantize_model(model, windows, QuantizeConfig(bits=4, group_size=32), progress=False)

    spec = arch_spec(model_type)
    layers = model.get_submodule(spec.layers)
    expected = {f"{spec.layers}.{i}.{m}" for i, layer in enumerate(layers)
                for g in layer_groups(spec.groups, layer) for m in g}
    assert set(result.modules) == expected
    assert all(r.samples == 4 * 24 for r in result.log if ".experts." not in r.module)  # experts: routed ones

    save_quantized(model, result, tmp_path / "ckpt", dtype="float32")
    loaded = optq.load(tmp_path / "ckpt", dtype="float32")
    assert sum(isinstance(m, QuantLinear) for m in loaded.modules()) == len(expected)

    ids = _windows(model.config.vocab_size, n=1, length=16, seed=9)[0]
    with torch.no_grad():
        fake_quant = model(ids).logits
        from_disk = loaded(ids).logits
        full = original(ids).logits
    # The checkpoint reproduces the in-memory quantized model; quantization did change the model.
    torch.testing.assert_close(from_disk, fake_quant, atol=2e-4, rtol=1e-4)
    assert (full - fake_quant).abs().max() > 1e-3


def test_unknown_architecture_lists_supported():
    model = _random_model("llama")
    model.config.model_type = "frobnicator"
    with pytest.raises(OptqError, match="not supported.*gpt2.*llama"):
        quantize_model(model, _windows(160), QuantizeConfig(), progress=False)


def test_true_sequential_sees_quantized_inputs():
    # With true-sequential, o_proj's Hessian is computed after q/k/v are quantized: it differs from the
    # Hessian of a single pass over the float layer.
    a = _random_model("llama")
    b = copy.deepcopy(a)
    w = _windows(160)
    ra = quantize_model(a, w, QuantizeConfig(bits=2, group_size=32), progress=False)
    rb = quantize_model(b, w, QuantizeConfig(bits=2, group_size=32, true_sequential=False), progress=False)
    key = "model.layers.0.mlp.down_proj"
    assert not torch.equal(ra.modules[key]["qweight"], rb.modules[key]["qweight"])
    # The first group reads identical inputs either way.
    key = "model.layers.0.self_attn.q_proj"
    assert torch.equal(ra.modules[key]["qweight"], rb.modules[key]["qweight"])


def test_bf16_compute_close_to_fp32():
    a = _random_model("llama")
    b = copy.deepcopy(a)
    w = _windows(160)
    quantize_model(a, w, QuantizeConfig(bits=8, group_size=32), progress=False)
    quantize_model(b, w, QuantizeConfig(bits=8, group_size=32), compute_dtype=torch.bfloat16, progress=False)
    ids = w[0]
    with torch.no_grad():
        torch.testing.assert_close(a(ids).logits, b(ids).logits, atol=0.05, rtol=0.05)


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_block_replay_is_bit_identical(model_type, monkeypatch):
    """Later passes replay finished attention/MLP blocks from their last linear's kept input instead of
    recomputing them, skip norms only those read, and leave uncomputed the outputs of a group's modules that
    share one input; the quantized weights must be exactly those of computing everything."""
    import optq.pipeline as pipeline

    replays, skipped, stubbed = [], [], []
    stub = pipeline._GroupCollector._stub_outputs
    monkeypatch.setattr(pipeline._GroupCollector, "_stub_outputs",
                        lambda self: (stub(self), stubbed.append(sorted(self.modules))))
    install = pipeline._BlockReplay.install
    monkeypatch.setattr(pipeline._BlockReplay, "install", lambda self: (install(self), replays.append(self)))
    skip = pipeline._DeadModuleSkip._skip
    monkeypatch.setattr(pipeline._DeadModuleSkip, "_skip", lambda self, names: (skip(self, names),
                                                                               skipped.append(names)))
    results = {}
    for flag in (True, False):
        monkeypatch.setattr(pipeline.replay, "BLOCK_REPLAY", flag)
        model = _random_model(model_type)
        results[flag] = quantize_model(model, _windows(model.config.vocab_size), QuantizeConfig(bits=4, group_size=32),
                                       progress=False).modules
    assert replays, "no block was replayed"
    if model_type in ("llama", "qwen2", "mistral"):  # their attention's input norm is dead once it replays
        assert any("input_layernorm" in skip for skip in skipped), skipped
        # q/k/v and gate/up read one tensor each: their outputs were not computed after the first window
        assert ["self_attn.k_proj", "self_attn.q_proj", "self_attn.v_proj"] in stubbed, stubbed
        assert ["mlp.gate_proj", "mlp.up_proj"] in stubbed, stubbed
    for name, tensors in results[False].items():
        for leaf, t in tensors.items():
            assert torch.equal(results[True][name][leaf], t), (name, leaf)
    if model_type in ("llama", "qwen2", "mistral"):  # blocks that return their last linear's output
        assert all(r.state == "on" for r in replays), [(r.name, r.state) for r in replays]


def test_one_group_of_every_linear_computes_their_outputs(monkeypatch):
    """Without true-sequential groups every linear of a layer is one group, and o_proj reads what q/k/v
    compute: their outputs must not be left uncomputed (the weights equal those of computing everything)."""
    import optq.pipeline as pipeline

    stubbed = []
    stub = pipeline._GroupCollector._stub_outputs
    monkeypatch.setattr(pipeline._GroupCollector, "_stub_outputs", lambda self: (stub(self), stubbed.append(1)))
    results = {}
    for flag in (True, False):
        monkeypatch.setattr(pipeline.replay, "BLOCK_REPLAY", flag)
        model = _random_model("llama")
        results[flag] = quantize_model(model, _windows(model.config.vocab_size),
                                       QuantizeConfig(bits=4, group_size=32, true_sequential=False),
                                       progress=False).modules
    assert not stubbed
    for name, tensors in results[False].items():
        for leaf, t in tensors.items():
            assert torch.equal(results[True][name][leaf], t), (name, leaf)


class _ReplayedBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x):
        return self.proj(x)


class _FakeReplay:
    """Stands for a _BlockReplay that is on: the block returns a kept result and ignores its input."""

    def __init__(self, block, kept):
        self.block, self.state = block, "on"
        block.forward = lambda *a, **k: kept


class _SerialLayer(nn.Module):  # the norm feeds the replayed block only: dead
    def __init__(self):
        super().__init__()
        self.norm, self.attn, self.mlp = nn.LayerNorm(8), _ReplayedBlock(), nn.Linear(8, 8)

    def forward(self, x):
        h = x + self.attn(self.norm(x))
        return h + self.mlp(h)


class _ParallelLayer(_SerialLayer):  # one norm feeds the replayed block and the MLP: alive
    def forward(self, x):
        n = self.norm(x)
        return x + self.attn(n) + self.mlp(n)


class _ShapeReadingLayer(_SerialLayer):  # the norm's output is only looked at (its shape): alive
    def forward(self, x):
        n = self.norm(x)
        return x + self.attn(n) * n.shape[-1]


@pytest.mark.parametrize("layer_cls,dead", [(_SerialLayer, ["norm"]), (_ParallelLayer, []),
                                            (_ShapeReadingLayer, [])])
def test_dead_module_skip_watches_uses(layer_cls, dead):
    """Only a module whose output nothing but a replaying block reads is skipped, and the layer's result
    is the same with the skip as without."""
    from optq.pipeline import _DeadModuleSkip

    torch.manual_seed(0)
    layer = layer_cls()
    kept = torch.randn(3, 8)
    windows = [torch.randn(3, 8) for _ in range(3)]
    with torch.no_grad():
        expected = [layer.mlp(x + kept) + x + kept if layer_cls is _SerialLayer else None for x in windows]
        replay = _FakeReplay(layer.attn, kept)
        want = [layer(x) for x in windows]  # nothing skipped yet
        skip = _DeadModuleSkip(layer, [replay])
        got = []
        for x in windows:
            with skip.window():
                got.append(layer(x))
        assert skip.skipped == dead
        if dead:
            assert layer.norm.__dict__.get("forward") is not None
        skip.remove()
        assert "forward" not in layer.norm.__dict__
    for g, w, e in zip(got, want, expected):
        assert torch.equal(g, w)
        if e is not None:
            torch.testing.assert_close(g, e)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_native_causal_attention_in_every_architecture(model_type, dtype, monkeypatch):
    """The calibration forward's attention (native_causal_attention) gives each architecture's logits as
    sdpa does; the ones whose attention is plain causal take the native kernel, the others (Gemma 2/3's
    sliding windows and soft-capping) keep sdpa or their own attention."""
    import optq.runtime.attention as attention
    from optq.runtime import native

    if dtype == torch.bfloat16 and not (native.bf16_supported() and native.load()):
        pytest.skip(f"optq's native bf16 kernels are unavailable here: {native.why_unavailable()}")
    if dtype == torch.float32 and not (native.cpu_supported() and not native.avx512() and native.load()):
        pytest.skip("the native float32 attention runs on AVX2-only CPUs")
    model = _random_model(model_type).to(dtype)
    ids = _windows(model.config.vocab_size, n=1, length=40)[0]
    taken = []
    real = attention._native_causal_applies
    monkeypatch.setattr(attention, "_native_causal_applies", lambda *a: taken.append(real(*a)) or taken[-1])
    with torch.no_grad():
        ref = model(ids).logits.float()
        sdpa = model.config._attn_implementation == "sdpa"
        with attention.native_causal_attention(model) as switched:
            out = model(ids).logits.float()
    assert switched == sdpa and bool(taken) == sdpa  # eager models (Gemma 2's default) stay as they are
    if model_type not in ("gemma2", "gemma3_text"):
        assert sdpa and all(taken), model_type
    scale = ref.abs().max()
    tolerance = 0.03 if dtype == torch.bfloat16 else 1e-4
    assert (out - ref).abs().max() <= tolerance * scale, ((out - ref).abs().max(), scale)
