"""Mixture-of-experts models: per-expert GPTQ, published checkpoint names, loading, few-token experts.

Tiny random-weight models of each architecture, built from Transformers configs (seeded): right for the
mechanics checked here, never for quality. References: Transformers' own fused-experts forward, a float64
GPTQ written directly (tests/test_gptq.py) on the tokens hooked at the expert, rounding computed here."""

import shutil

import pytest
import torch
from safetensors import safe_open

import optq
from optq.calibration import calibration_windows
from optq.config import QuantizeConfig
from optq.formats.gptq import unpack_module
from optq.models.loading import load_source_model
from optq.models.moe import EXPERT_LINEARS, ExpertList

from test_gptq import reference_gptq

BASE = dict(vocab_size=2048, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)
EXTRA = {
    "qwen3_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=64, head_dim=16),
    "qwen2_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=64,
                      shared_expert_intermediate_size=96),
    "olmoe": dict(num_experts=8, num_experts_per_tok=2),
    "mixtral": dict(num_local_experts=8, num_experts_per_tok=2),
}
# where each architecture's published GPTQ checkpoints keep layer 0's expert 0 (vLLM's and GPTQModel's names)
PUBLISHED = {
    "qwen3_moe": "model.layers.0.mlp.experts.0.gate_proj",
    "qwen2_moe": "model.layers.0.mlp.experts.0.gate_proj",
    "olmoe": "model.layers.0.mlp.experts.0.gate_proj",
    "mixtral": "model.layers.0.block_sparse_moe.experts.0.w1",
}
CAL = dict(dataset="pydoc", nsamples=8, seqlen=64, progress=False)


def _random_moe(kind: str, folder, tokenizer_from):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(kind, **BASE, **EXTRA[kind]))
    with torch.no_grad():  # experts distinct enough that routing and quantization errors are not all alike
        for p in model.parameters():
            if p.dim() == 3:
                p.normal_(0, 0.1)
    model.save_pretrained(folder)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tokenizer_from / f).exists():
            shutil.copy(tokenizer_from / f, folder / f)
    return model


@pytest.fixture(scope="module", params=sorted(EXTRA))
def moe(request, tinystories_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    return request.param, folder, _random_moe(request.param, folder, tinystories_model)


def _ids():
    return torch.randint(0, BASE["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(1))


def test_unfused_experts_compute_what_transformers_does(moe):
    kind, folder, fused = moe
    src = load_source_model(folder)
    experts = src.model.model.layers[0].mlp.experts
    assert isinstance(experts, ExpertList) and len(experts) == 8
    with torch.no_grad():
        assert torch.allclose(src.model(_ids()).logits, fused(_ids()).logits, atol=1e-5, rtol=0)


def test_quantize_save_load_run(moe, tmp_path):
    """Every expert's linears are in the checkpoint under the published names; optq.load runs it with the
    logits of Transformers' fused model holding the checkpoint's dequantized weights."""
    kind, folder, fused = moe
    out = tmp_path / "q"
    optq.quantize(folder, out, QuantizeConfig(bits=4, group_size=32), **CAL)
    names = set()
    for f in out.glob("*.safetensors"):
        with safe_open(str(f), "pt") as sf:
            names |= set(sf.keys())
    gate, up, down = EXPERT_LINEARS[kind]
    published = PUBLISHED[kind].rpartition(".experts.")[0]
    for layer in range(2):
        for e in range(8):
            for linear in (gate, up, down):
                prefix = f"{published.replace('layers.0', f'layers.{layer}')}.experts.{e}.{linear}"
                assert {f"{prefix}.qweight", f"{prefix}.scales", f"{prefix}.qzeros", f"{prefix}.g_idx"} <= names
    assert not any(".experts.gate_up_proj" in n or n.endswith("experts.down_proj") for n in names)

    # the reference: Transformers' fused model with every quantized weight replaced by its dequantized value
    reference = type(fused)(fused.config)
    reference.load_state_dict(fused.state_dict())
    cfg = QuantizeConfig(bits=4, group_size=32)
    hidden, inter = BASE["hidden_size"], fused.model.layers[0].mlp.experts.down_proj.shape[-1]
    with torch.no_grad():
        for i, layer in enumerate(reference.model.layers):
            for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
                lin = getattr(layer.self_attn, proj)
                name = f"model.layers.{i}.self_attn.{proj}"
                lin.weight.copy_(_checkpoint_weight(out, name, lin.in_features, lin.out_features, cfg).dequantize())
            ex = layer.mlp.experts
            for e in range(8):
                base = f"model.layers.{i}.mlp.experts.{e}"
                ex.gate_up_proj[e, :inter] = _checkpoint_weight(out, f"{base}.{gate}", hidden, inter, cfg).dequantize()
                ex.gate_up_proj[e, inter:] = _checkpoint_weight(out, f"{base}.{up}", hidden, inter, cfg).dequantize()
                ex.down_proj[e] = _checkpoint_weight(out, f"{base}.{down}", inter, hidden, cfg).dequantize()
            if kind == "qwen2_moe":
                for proj in ("gate_proj", "up_proj", "down_proj"):
                    lin = getattr(layer.mlp.shared_expert, proj)
                    lin.weight.copy_(_checkpoint_weight(out, f"model.layers.{i}.mlp.shared_expert.{proj}",
                                                        lin.in_features, lin.out_features, cfg).dequantize())
    loaded = optq.load(out, dtype="float32")
    with torch.no_grad():
        want, got = reference(_ids()).logits, loaded(_ids()).logits
    assert (got - want).abs().max() < 2e-3 * want.abs().max()
    assert torch.equal(got.argmax(-1), want.argmax(-1))


def _file_key(name: str) -> str:
    """The tensor's name in the file: Mixtral's published checkpoints say block_sparse_moe for Transformers'
    mlp (written out here, not taken from optq)."""
    return name.replace(".mlp.experts.", ".block_sparse_moe.experts.") if ".w1" in name or ".w2" in name \
        or ".w3" in name else name


def _checkpoint_weight(folder, name, in_f, out_f, cfg):
    parts = {}
    for f in folder.glob("*.safetensors"):
        with safe_open(str(f), "pt") as sf:
            for leaf in ("qweight", "qzeros", "scales", "g_idx"):
                if _file_key(f"{name}.{leaf}") in sf.keys():
                    parts[leaf] = sf.get_tensor(_file_key(f"{name}.{leaf}"))
    return unpack_module(parts, cfg.bits, in_f, out_f, cfg.checkpoint_format)


def test_expert_equals_float64_gptq_on_its_routed_tokens(tinystories_model, tmp_path):
    """One layer (its attention is quantized before the experts, and the router stays in float, so the final
    model routes the calibration tokens as the run did): expert 3's gate integers are a float64 GPTQ of its
    weight on the Hessian of exactly the tokens hooked at its input."""
    folder = tmp_path / "moe"
    fused = _random_moe("qwen3_moe", folder, tinystories_model)
    fused.config.num_hidden_layers = 1
    one = type(fused)(fused.config)
    one.load_state_dict({k: v for k, v in fused.state_dict().items() if ".layers.1." not in k})
    one.save_pretrained(folder)
    cfg = QuantizeConfig(bits=4, group_size=32, gptaq=False, rtn_guard=False)
    optq.quantize(folder, tmp_path / "q", cfg, compute_dtype="float32", **CAL)  # float32 activations, as here
    loaded = optq.load(tmp_path / "q", dtype="float32")
    seen = []
    expert = loaded.model.layers[0].mlp.experts[3]
    handle = expert.gate_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().double()))
    src = load_source_model(folder)
    with torch.no_grad():
        for w in calibration_windows(src.tokenizer, "pydoc", CAL["nsamples"], CAL["seqlen"]):
            loaded(w)
    handle.remove()
    x = torch.cat(seen)
    assert x.shape[0] > 0
    h = 2 * x.T @ x / x.shape[0]
    w = src.model.model.layers[0].mlp.experts[3].gate_proj.weight.detach()
    q_ref, g_ref, _ = reference_gptq(w, h, cfg.grid(), 32, desc_act=True, static_groups=True)
    qw = _checkpoint_weight(tmp_path / "q", "model.layers.0.mlp.experts.3.gate_proj", w.shape[1], w.shape[0], cfg)
    mismatch = (qw.qweight.long() != q_ref).float().mean()
    assert mismatch < 0.01, mismatch  # float32 solver against float64: a rare rounding tie may differ
    assert torch.equal(qw.g_idx.long(), g_ref)


def test_expert_without_tokens_is_rounded_with_a_note(tinystories_model, tmp_path, monkeypatch, caplog):
    """A router that never picks expert 7 (its logit pushed down by a forward hook on the router, in the
    model handed to the pipeline): no crash, expert 7's linears are rounded to nearest on their own grid, the
    log and meta.rtn_fallback say why; with a threshold above every expert's share all are rounded."""
    import optq.pipeline.solve as solve
    from optq.pipeline import quantize_model

    folder = tmp_path / "moe"
    _random_moe("qwen3_moe", folder, tinystories_model)
    src = load_source_model(folder)
    for layer in src.model.model.layers:
        def starve(module, args, out):
            logits = out[0].clone()
            logits[:, 7] = -1e9
            probs = torch.softmax(logits, dim=-1)
            top, idx = probs.topk(module.top_k, dim=-1)
            return logits, top / top.sum(-1, keepdim=True), idx
        layer.mlp.gate.register_forward_hook(starve)
    windows = calibration_windows(src.tokenizer, "pydoc", 8, 64)
    floats = {n: m.weight.detach().clone() for n, m in src.model.named_modules() if n.endswith("experts.7.down_proj")}
    cfg = QuantizeConfig(bits=4, group_size=32)
    with caplog.at_level("INFO", logger="optq"):
        result = quantize_model(src.model, windows, cfg, progress=False)
    notes = {r.module: r.note for r in result.log}
    stats = [r.message for r in caplog.records if "calibration tokens per expert" in r.message]
    assert len(stats) == 2 and all("8 experts" in m and "min 0 /" in m for m in stats), stats
    for layer in range(2):
        for linear in ("gate_proj", "up_proj", "down_proj"):
            note = notes[f"model.layers.{layer}.mlp.experts.7.{linear}"]
            assert note.startswith("rtn fallback: 0 calibration tokens routed"), note
        assert not notes[f"model.layers.{layer}.mlp.experts.0.gate_proj"].startswith("rtn fallback")
    name = "model.layers.0.mlp.experts.7.down_proj"
    w = floats[name]
    qw = unpack_module(result.modules[name], 4, w.shape[1], w.shape[0], "gptq")
    s, z = qw.scales[qw.g_idx.long()].T, qw.zeros[qw.g_idx.long()].T
    assert torch.equal(qw.qweight.float(), torch.clamp(torch.round(w / s) + z, 0, 15))  # rounding, on its grid
    assert set(result.rtn_fallback) >= {f"model.layers.{i}.mlp.experts.7.{p}" for i in range(2)
                                        for p in ("gate_proj", "up_proj", "down_proj")}

    monkeypatch.setattr(solve, "MIN_EXPERT_TOKEN_SHARE", 1.0)  # every expert below the threshold
    src = load_source_model(folder)
    result = quantize_model(src.model, windows, cfg, progress=False)
    routed = [r for r in result.log if ".experts." in r.module]
    assert routed and all(r.note.startswith("rtn fallback") for r in routed)
    assert not any(r.note.startswith("rtn fallback") for r in result.log if ".experts." not in r.module)


@pytest.mark.parametrize("kind", ["qwen3_moe", "mixtral"])
def test_streamed_equals_whole_model(kind, tinystories_model, tmp_path):
    """Streamed from the published per-expert files (Mixtral's under block_sparse_moe) = loaded whole."""
    folder = tmp_path / "moe"
    _random_moe(kind, folder, tinystories_model)
    cfg = QuantizeConfig(bits=4, group_size=32)
    optq.quantize(folder, tmp_path / "whole", cfg, stream=False, **CAL)
    optq.quantize(folder, tmp_path / "streamed", cfg, stream=True, **CAL)
    for f in sorted(p.name for p in (tmp_path / "whole").iterdir()):
        if f != "quant_log.csv":
            assert (tmp_path / "whole" / f).read_bytes() == (tmp_path / "streamed" / f).read_bytes(), f


def test_killed_and_resumed_equals_uninterrupted(tinystories_model, tmp_path):
    import os
    import signal
    import subprocess
    import sys

    folder = tmp_path / "moe"
    _random_moe("qwen2_moe", folder, tinystories_model)

    def run(out, *extra, fault=""):
        return subprocess.run([sys.executable, "-m", "optq", "quantize", str(folder), str(out), "--dataset", "pydoc",
                               "--bits", "4", "--group-size", "32", "--nsamples", "8", "--seqlen", "64", "--quiet",
                               "--no-report", *extra], env={**os.environ, "OPTQ_FAULT": fault}, capture_output=True,
                              text=True)

    assert run(tmp_path / "ref").returncode == 0
    killed = run(tmp_path / "q", fault="layer:0")  # after layer 0 (its experts) was saved
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    resumed = run(tmp_path / "q", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    for f in sorted(p.name for p in (tmp_path / "ref").iterdir()):
        if f != "quant_log.csv":
            assert (tmp_path / "ref" / f).read_bytes() == (tmp_path / "q" / f).read_bytes(), f
