"""Checkpoints made by other tools load in optq and compute what those tools compute.

The GPTQModel fixtures (tests/fixtures/gptqmodel, made by tests/fixtures/make_gptqmodel_fixtures.py with
GPTQModel 7.7) hold GPTQModel's checkpoint and GPTQModel's own dequantized weights and logits; the AutoGPTQ ones
(tests/fixtures/autogptq, make_autogptq_fixtures.py, AutoGPTQ 0.7.1) the same from AutoGPTQ, in its older layout.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import optq
from optq.runtime.quant_linear import QuantLinear

FIXTURES = Path(__file__).parent / "fixtures"
GPTQMODEL = sorted(p for p in (FIXTURES / "gptqmodel").iterdir() if (p / "reference.safetensors").exists())


def _reference(folder: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(folder / "reference.safetensors"), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_fixtures_present():
    names = {p.name for p in GPTQMODEL}
    assert {"sym4_g32", "asym4_g32", "asym4_g32_v2", "act4_g32", "sym3_g32", "act3_asym_g32", "sym8_perchannel",
            "sym2_g32", "dynamic"} <= names


@pytest.mark.parametrize("folder", GPTQMODEL, ids=[p.name for p in GPTQMODEL])
def test_gptqmodel_checkpoint_matches_gptqmodel(folder):
    _check_against_reference(folder)


def _check_against_reference(folder: Path) -> None:
    ref = _reference(folder)
    model = optq.load(folder, dtype="float32", backend="reference")
    quantized = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    weights = {k.removesuffix(".weight"): v for k, v in ref.items() if k.endswith(".weight")}
    # layer 0's weights are in the reference; modules GPTQModel left in float are float here too
    assert {n for n in quantized if ".layers.0." in n} == set(weights)
    for name, w_ref in weights.items():
        w = quantized[name].dequantize_weight()
        # GPTQModel dequantizes in float16; optq in float32 from the same float16 scales
        torch.testing.assert_close(w, w_ref.float(), rtol=2e-3, atol=2e-5, msg=lambda m: f"{name}: {m}")
    with torch.no_grad():
        logits = model(ref["input_ids"]).logits
    err = (logits - ref["logits"]).abs().max().item()
    scale = ref["logits"].abs().max().item()
    assert err <= 0.01 * scale, f"max |logit difference| {err:.4g} vs logit scale {scale:.3g}"


AUTOGPTQ = sorted(p for p in (FIXTURES / "autogptq").iterdir() if (p / "reference.safetensors").exists())


def test_autogptq_fixtures_present():
    assert {"sym4_g32", "asym4_g32", "act4_g32", "act4_static_asym_g32", "sym3_g32", "act3_asym_g32",
            "sym8_perchannel", "asym8_g64", "sym2_g32"} <= {p.name for p in AUTOGPTQ}


@pytest.mark.parametrize("folder", AUTOGPTQ, ids=[p.name for p in AUTOGPTQ])
def test_autogptq_checkpoint_matches_autogptq(folder):
    # the old layout: weights in gptq_model-<bits>bit-<group>g.safetensors, beside reference.safetensors
    assert not (folder / "model.safetensors").exists() and len(list(folder.glob("gptq_model-*.safetensors"))) == 1
    _check_against_reference(folder)


def test_autogptq_act_order_fixture_has_non_monotone_g_idx():
    """The act-order fixtures test what they claim: g_idx out of order (AutoGPTQ without static groups)."""
    with safe_open(str(next((FIXTURES / "autogptq" / "act4_g32").glob("gptq_model-*.safetensors"))), "pt") as f:
        g_idx = f.get_tensor("model.layers.0.self_attn.q_proj.g_idx")
    assert (g_idx[1:] < g_idx[:-1]).any()


def test_autogptq_file_naming(tmp_path):
    """model_file_base_name is honoured; several unindexed files are refused rather than guessed at."""
    src = FIXTURES / "autogptq" / "sym4_g32"
    named = tmp_path / "named"
    shutil.copytree(src, named)
    (named / "gptq_model-4bit-32g.safetensors").rename(named / "weights.safetensors")
    (named / "reference.safetensors").unlink()
    (named / "other.safetensors").write_bytes((src / "reference.safetensors").read_bytes())
    with pytest.raises(optq.OptqError, match="several safetensors files"):
        optq.load(named)
    cfg = json.loads((named / "quantize_config.json").read_text())
    cfg["model_file_base_name"] = "weights"
    (named / "quantize_config.json").write_text(json.dumps(cfg))
    (named / "config.json").write_text(json.dumps(
        {k: v for k, v in json.loads((named / "config.json").read_text()).items() if k != "quantization_config"}))
    model = optq.load(named, dtype="float32", backend="reference")  # the quantize_config.json-only layout
    ref = _reference(src)
    with torch.no_grad():
        torch.testing.assert_close(model(ref["input_ids"]).logits, optq.load(src, dtype="float32",
                                   backend="reference")(ref["input_ids"]).logits, rtol=0, atol=0)


def test_marlin_repacked_checkpoint_is_refused(tmp_path):
    bad = tmp_path / "marlin"
    shutil.copytree(FIXTURES / "autogptq" / "sym4_g32", bad)
    for fname in ("config.json", "quantize_config.json"):
        cfg = json.loads((bad / fname).read_text())
        cfg.get("quantization_config", cfg)["is_marlin_format"] = True
        (bad / fname).write_text(json.dumps(cfg))
    with pytest.raises(optq.OptqError, match="Marlin"):
        optq.load(bad)


def test_dynamic_overrides_are_honoured():
    folder = FIXTURES / "gptqmodel" / "dynamic"
    model = optq.load(folder, dtype="float32", backend="reference")
    up1 = model.get_submodule("model.layers.1.mlp.up_proj")
    up0 = model.get_submodule("model.layers.0.mlp.up_proj")
    assert (up1.bits, up1.group_size) == (8, 64) and (up0.bits, up0.group_size) == (4, 32)
    for i in range(2):
        assert type(model.get_submodule(f"model.layers.{i}.mlp.down_proj")) is torch.nn.Linear


def test_zero_point_convention_is_what_decides(tmp_path):
    """Negative control: the same asymmetric tensors read with the other zero-point convention do not match
    GPTQModel's weights, so the comparison above would catch an off-by-one."""
    src = FIXTURES / "gptqmodel" / "asym4_g32"
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    for fname in ("config.json", "quantize_config.json"):
        cfg = json.loads((bad / fname).read_text())
        q = cfg.get("quantization_config", cfg)
        q["checkpoint_format"] = "gptq_v2"
        (bad / fname).write_text(json.dumps(cfg))
    ref = _reference(src)
    model = optq.load(bad, dtype="float32", backend="reference")
    name = "model.layers.0.self_attn.q_proj"
    w = model.get_submodule(name).dequantize_weight()
    assert not torch.allclose(w, ref[f"{name}.weight"].float(), rtol=2e-3, atol=2e-5)


# ---- llm-compressor's compressed-tensors ----------------------------------------------------------------

CT = sorted(p for p in (FIXTURES / "compressed_tensors").iterdir() if (p / "reference.safetensors").exists())


def test_compressed_tensors_fixtures_present():
    assert {"w4_g32_sym", "w4_g32_asym", "w3_g32_sym", "w8_channel_sym", "w8_g64_asym", "w4_channel_asym"} <= \
        {p.name for p in CT}


@pytest.mark.parametrize("folder", CT, ids=[p.name for p in CT])
@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_compressed_tensors_checkpoint_matches_its_reader(folder, backend):
    ref = _reference(folder)
    scheme = json.loads((folder / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"]
    model = optq.load(folder, dtype="float32", backend=backend)
    quantized = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert len(quantized) == 14 and all(m.bits == scheme["weights"]["num_bits"] for m in quantized.values())
    for key, w_ref in ref.items():
        if key.endswith(".weight") and backend == "reference":  # kernels drop the packed tensors
            # bf16 scales become float16 ones: exact for scales in float16's normal range
            torch.testing.assert_close(quantized[key.removesuffix(".weight")].dequantize_weight(), w_ref,
                                       rtol=0, atol=0)
    with torch.no_grad():
        logits = model(ref["input_ids"]).logits
    torch.testing.assert_close(logits, ref["logits"], rtol=1e-4, atol=1e-4)


def test_compressed_tensors_refuses_what_it_cannot_honour(tmp_path):
    src = FIXTURES / "compressed_tensors" / "w4_g32_sym"
    cases = {
        ("format",): ("float-quantized", "format 'float-quantized' is not supported"),
        ("config_groups", "group_0", "input_activations"): ({"num_bits": 8, "type": "int"}, "input_activations"),
        ("config_groups", "group_0", "weights", "num_bits"): (5, "num_bits=5"),
        ("config_groups", "group_0", "weights", "strategy"): ("tensor", "strategy='tensor'"),
        ("config_groups", "group_0", "weights", "type"): ("float", "type='float'"),
    }
    for path, (value, message) in cases.items():
        bad = tmp_path / "_".join(path)
        shutil.copytree(src, bad)
        cfg = json.loads((bad / "config.json").read_text())
        node = cfg["quantization_config"]
        for k in path[:-1]:
            node = node[k]
        node[path[-1]] = value
        if path == ("format",):
            node["config_groups"]["group_0"].pop("format", None)
        (bad / "config.json").write_text(json.dumps(cfg))
        with pytest.raises(optq.OptqError, match=message):
            optq.load(bad)


def test_inspect_reads_both_formats():
    from optq.inspect import inspect_checkpoint

    for folder in (FIXTURES / "compressed_tensors" / "w4_g32_asym", FIXTURES / "gptqmodel" / "sym4_g32"):
        info = inspect_checkpoint(folder)
        dims = {m["name"].rsplit(".", 1)[-1]: (m["in_features"], m["out_features"], m["groups"]) for m in info["modules"]}
        # the tiny Llama: hidden 64, MLP 128, 2 KV heads of 16; group size 32
        assert dims["down_proj"] == (128, 64, 4) and dims["k_proj"] == (64, 32, 2) and len(info["modules"]) == 14
