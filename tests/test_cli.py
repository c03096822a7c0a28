"""The CLI contract: command and option names, --json output, one-line errors."""

import json
import subprocess
import sys

import pytest


def optq(*args, check=True):
    p = subprocess.run([sys.executable, "-m", "optq", *map(str, args)], capture_output=True, text=True, timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(f"optq {args} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


def test_quantize_eval_generate_inspect(tinystories_model, tinystories_text, tmp_path):
    out = tmp_path / "q"
    p = optq("quantize", tinystories_model, out, "--bits", 4, "--group-size", 64, "--desc-act", "--no-static-groups", "--damp", 0.02,
             "--nsamples", 8, "--seqlen", 128, "--dataset", tinystories_text, "--seed", 1, "--max-shard-size", "4GB")
    assert "model.layers.1.mlp.down_proj" in p.stdout + p.stderr  # the per-module log
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (cfg["bits"], cfg["group_size"], cfg["desc_act"], cfg["damp_percent"]) == (4, 64, True, 0.02)

    r = json.loads(optq("eval", out, "--dataset", tinystories_text, "--seqlen", 128, "--max-windows", 4,
                        "--json").stdout.strip().splitlines()[-1])
    assert {"perplexity", "tokens", "seconds"} <= set(r) and r["tokens"] == 4 * 128 and 1 < r["perplexity"] < 1e4

    g = optq("generate", out, "--prompt", "Once upon a time", "--max-new-tokens", 8)
    assert len(g.stdout.strip()) > 0

    i = optq("inspect", out)
    assert "model.layers.0.self_attn.q_proj" in i.stdout and "16-bit original" in i.stdout
    info = json.loads(optq("inspect", out, "--json").stdout)
    assert len(info["modules"]) == 14 and info["size_bytes"] < info["fp16_bytes"]

    rtn = tmp_path / "r"
    optq("quantize", tinystories_model, rtn, "--rtn", "--bits", 3, "--asym", "--quiet")
    assert json.loads((rtn / "config.json").read_text())["quantization_config"]["meta"]["method"] == "rtn"

    # bench: the bytes it reports for the 4-bit checkpoint are the kernel's packed weights plus its per-group
    # parameters, and the float lm_head, counted here from the checkpoint itself. int4: K x N / 2 bytes and
    # bf16 scale-and-offset pairs per 64-input block; native: N padded to 64, float32 scale and zero per group.
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    vocab, hidden = shapes["model.embed_tokens.weight"]
    qshapes = [(s[0] * 8, s[1]) for k, s in shapes.items() if k.endswith(".qweight")]  # (K, N)
    expected = {
        "int4": sum(k * n // 2 + k // 64 * n * 2 * 2 for k, n in qshapes),
        "native": sum(k * (-(-n // 64) * 64) // 2 + 2 * 4 * (k // 64) * (-(-n // 64) * 64) for k, n in qshapes),
    }
    from optq.runtime import native

    for backend in ["int4"] + (["native"] if native.load() else []):  # test_runtime checks it loads where it can
        # optq's 4-bit kernel takes bf16 activations only with AVX-512 BF16, float32 ones on any AVX2 CPU
        dtype = "bfloat16" if backend == "int4" or native.bf16_supported() else "float32"
        b = json.loads(optq("bench", out, "--runs", 1, "--new-tokens", 4, "--prefill-tokens", 16, "--dtype",
                            dtype, "--backend", backend, "--json").stdout.strip().splitlines()[-1])
        assert b["backends"] == [backend] and b["decode_tok_s"] > 0 and b["prefill_tok_s"] > 0 and b["rss_mb"] > 0
        head_bytes = vocab * hidden * (2 if dtype == "bfloat16" else 4)  # the float lm_head, in the activation dtype
        assert b["weight_bytes"] == expected[backend] + head_bytes, backend


@pytest.mark.parametrize(
    "args,message",
    [
        (["--bits", "5"], "bits=5 is not supported"),
        (["--group-size", "0"], "group_size=0 is invalid"),
        (["--damp", "-0.1"], "damp_percent=-0.1 is out of range"),
        (["--dataset", "/nonexistent.txt"], "neither a file"),
    ],
)
def test_bad_input_is_one_line(args, message, tinystories_model, tmp_path):
    p = optq("quantize", tinystories_model, tmp_path / "o", *args, check=False)
    assert p.returncode == 2
    assert message in p.stderr
    assert "Traceback" not in p.stderr
    assert not (tmp_path / "o").exists()


def test_missing_model_and_unknown_checkpoint_format(tmp_path):
    p = optq("eval", tmp_path / "nope", "--dataset", "pydoc", check=False)
    assert p.returncode == 2 and "does not exist" in p.stderr
    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": {
        "quant_method": "gptq", "bits": 4, "group_size": 128, "checkpoint_format": "gptq_v9"}}))
    p = optq("inspect", ck, check=False)
    assert p.returncode == 2 and "checkpoint_format='gptq_v9' is unknown" in p.stderr


def test_compiled_decode_generates_the_same_text(tinystories_model, tmp_path):
    out = tmp_path / "q"
    optq("quantize", tinystories_model, out, "--rtn", "--bits", 4, "--group-size", 32, "--quiet")
    # float32: in bf16 inductor's fused ops round differently, and greedy text can part at a near tie.
    args = ("generate", out, "--prompt", "Once upon a time", "--max-new-tokens", 24, "--dtype", "float32")
    eager = optq(*args).stdout.strip()
    compiled = optq(*args, "--compile").stdout.strip()
    assert eager and compiled == eager


def test_refit_scales_flag(tinystories_model, tinystories_text, tmp_path):
    """--refit-scales end to end: recorded in the checkpoint, logged per module, codes kept, output error lower."""
    import csv

    import torch
    from safetensors import safe_open

    import optq as optq_api
    from optq.calibration import calibration_windows
    from optq.models.loading import load_source_model

    common = ("--bits", 4, "--group-size", 32, "--desc-act", "--nsamples", 8, "--seqlen", 128, "--dataset",
              tinystories_text, "--seed", 1, "--quiet")
    plain, refit = tmp_path / "plain", tmp_path / "refit"
    optq("quantize", tinystories_model, plain, *common)
    optq("quantize", tinystories_model, refit, *common, "--refit-scales")

    def meta(path):
        return json.loads((path / "config.json").read_text())["quantization_config"]["meta"]

    assert meta(refit).get("refit_scales") is True and "refit_scales" not in meta(plain)
    with (refit / "quant_log.csv").open() as f:
        notes = [r["note"] for r in csv.DictReader(f)]
    assert len(notes) == 14 and any(n.startswith("scale refit -") for n in notes)
    assert not any(n.startswith("scale refit +") for n in notes)  # new scales only where they lower the error

    # layer 0's q/k/v read the same inputs in both runs: same codes, zeros and g_idx; only scales may move
    names = [f"model.layers.0.self_attn.{m}" for m in ("q_proj", "k_proj", "v_proj")]
    with safe_open(str(plain / "model.safetensors"), "pt") as a, safe_open(str(refit / "model.safetensors"), "pt") as b:
        for n in names:
            for t in ("qweight", "qzeros", "g_idx"):
                assert torch.equal(a.get_tensor(f"{n}.{t}"), b.get_tensor(f"{n}.{t}")), (n, t)
        moved = sum(not torch.equal(a.get_tensor(f"{n}.scales"), b.get_tensor(f"{n}.scales")) for n in names)
    assert moved > 0

    # their output error on the calibration inputs, from the float model's own activations
    src = load_source_model(tinystories_model, dtype="float32")
    windows = calibration_windows(src.tokenizer, str(tinystories_text), 8, 128, 1)
    q = src.model.get_submodule(names[0])
    seen = []
    hook = q.register_forward_pre_hook(lambda m, args: seen.append(args[0].reshape(-1, args[0].shape[-1])))
    with torch.no_grad():
        for w in windows:
            src.model(w.reshape(1, -1))
    hook.remove()
    x = torch.cat(seen).double()
    models = {p: optq_api.load(p, dtype="float32", backend="reference") for p in (plain, refit)}

    @torch.no_grad()
    def error(p):
        return sum(float(((x @ (src.model.get_submodule(n).weight.double()
                                - models[p].get_submodule(n).dequantize_weight().double()).T) ** 2).sum())
                   for n in names)

    assert error(refit) < error(plain)
