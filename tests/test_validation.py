"""Every bad input the CLI is known to meet, with the one-line message it gets (docs/validation.md).

Each case builds a bad input on the real TinyStories model, runs the `optq` CLI as a user would (a subprocess,
no --debug) and checks: exit status 2, exactly one line on stderr, starting "optq: error:", no traceback,
naming the problem. `python tests/test_validation.py > docs/validation.md` regenerates the docs table from
the same cases; a test checks that the table in the docs is the one the code produces today.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("OPTQ_SHARED", ROOT.parent / "shared")) / "data"
MODEL = DATA / "models" / "TinyStories-656K"
TEXT = DATA / "tinystories" / "validation_100.txt"
QUICK = ["--nsamples", "4", "--seqlen", "64", "--dataset", str(TEXT), "--quiet"]


@dataclass
class Case:
    name: str  # the bad input, as the docs table says it
    build: Callable[[Path, Path], list[str]]  # (work dir, a good checkpoint) -> optq CLI arguments
    expect: str  # regex the message must match
    preexec: Callable[[], None] | None = None  # runs in the child before optq (resource limits)
    prefix: Callable[[], list[str]] | None = None  # command the child runs under


# ---- building bad inputs ---------------------------------------------------------------------------------


def _copy_ckpt(ckpt: Path, work: Path) -> Path:
    dst = work / "ckpt"
    shutil.copytree(ckpt, dst)
    return dst


def _edit_quant(key: str, value):
    def build(work: Path, ckpt: Path) -> list[str]:
        c = _copy_ckpt(ckpt, work)
        for f in ("config.json",):
            cfg = json.loads((c / f).read_text())
            cfg["quantization_config"][key] = value
            (c / f).write_text(json.dumps(cfg))
        (c / "quantize_config.json").unlink()
        return ["generate", str(c), "--prompt", "Once", "--max-new-tokens", "1"]
    return build


def _read_st(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _write_st(path: Path, header: dict, body: bytes) -> None:
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    path.write_bytes(struct.pack("<Q", len(h)) + h + body)


def _edit_tensors(edit: Callable[[dict[str, object]], None]):
    """Rewrite the checkpoint's safetensors through safetensors itself after `edit` changes the tensors."""
    def build(work: Path, ckpt: Path) -> list[str]:
        from safetensors.torch import load_file, save_file

        c = _copy_ckpt(ckpt, work)
        tensors = load_file(str(c / "model.safetensors"))
        edit(tensors)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(c / "model.safetensors"),
                  metadata={"format": "pt"})
        return ["generate", str(c), "--prompt", "Once", "--max-new-tokens", "1"]
    return build


def _edit_header(edit: Callable[[dict, bytes], tuple[dict, bytes]]):
    def build(work: Path, ckpt: Path) -> list[str]:
        c = _copy_ckpt(ckpt, work)
        header, body = _read_st(c / "model.safetensors")
        _write_st(c / "model.safetensors", *edit(header, body))
        return ["generate", str(c), "--prompt", "Once", "--max-new-tokens", "1"]
    return build


Q = "model.layers.0.self_attn.q_proj"


def _lie_about_size(header, body):
    begin, end = header[f"{Q}.scales"]["data_offsets"]
    header[f"{Q}.scales"]["data_offsets"] = [begin, end + 4096]
    return header, body


def _set(name, fn):
    def edit(t):
        t[name] = fn(t[name])
    return edit


def _quantize(*extra):
    def build(work: Path, ckpt: Path) -> list[str]:
        return ["quantize", str(MODEL), str(work / "out"), *QUICK, *extra]
    return build


def _source_folder(work: Path, config_edit=None, weights=True) -> Path:
    src = work / "model"
    src.mkdir()
    for f in MODEL.iterdir():
        if f.name != "model.safetensors" or weights:
            shutil.copy(f, src / f.name)
    if config_edit:
        cfg = json.loads((src / "config.json").read_text())
        config_edit(cfg)
        (src / "config.json").write_text(json.dumps(cfg))
    return src


def _unknown_arch(work: Path, ckpt: Path) -> list[str]:
    import torch
    from transformers import BloomConfig, BloomForCausalLM

    torch.manual_seed(0)
    model = BloomForCausalLM(BloomConfig(vocab_size=2048, hidden_size=64, n_layer=2, n_head=4))
    model.save_pretrained(work / "bloom")
    for f in MODEL.glob("tok*"):
        shutil.copy(f, work / "bloom" / f.name)
    return ["quantize", str(work / "bloom"), str(work / "out"), *QUICK]


def _pickle_only(work: Path, ckpt: Path) -> list[str]:
    src = _source_folder(work, weights=False)
    (src / "pytorch_model.bin").write_bytes(b"a pickle would be here")
    return ["quantize", str(src), str(work / "out"), "--rtn"]


def _short_text(work: Path, ckpt: Path) -> list[str]:
    (work / "short.txt").write_text("Once upon a time there was a cat.\n")
    return ["quantize", str(MODEL), str(work / "out"), "--dataset", str(work / "short.txt"), "--nsamples", "4",
            "--seqlen", "64"]


def _empty_jsonl(work: Path, ckpt: Path) -> list[str]:
    (work / "cal.jsonl").write_text('{"content": "no text field here"}\n')
    return ["quantize", str(MODEL), str(work / "out"), "--dataset", str(work / "cal.jsonl")]


def _out_exists(work: Path, ckpt: Path) -> list[str]:
    (work / "out").mkdir()
    return ["quantize", str(MODEL), str(work / "out"), "--rtn"]


def _truncated(work: Path, ckpt: Path) -> list[str]:
    c = _copy_ckpt(ckpt, work)
    raw = (c / "model.safetensors").read_bytes()
    (c / "model.safetensors").write_bytes(raw[: len(raw) // 2])
    return ["generate", str(c), "--prompt", "Once", "--max-new-tokens", "1"]


def _no_weights(work: Path, ckpt: Path) -> list[str]:
    c = _copy_ckpt(ckpt, work)
    (c / "model.safetensors").unlink()
    return ["generate", str(c), "--prompt", "Once", "--max-new-tokens", "1"]


def _bad_json(work: Path, ckpt: Path) -> list[str]:
    c = _copy_ckpt(ckpt, work)
    (c / "config.json").write_text('{"model_type": "llama", ')
    return ["inspect", str(c)]


def _readonly_parent(work: Path, ckpt: Path) -> list[str]:
    ro = work / "readonly"
    ro.mkdir()
    ro.chmod(0o555)
    return ["quantize", str(MODEL), str(ro / "out"), "--rtn"]


def _interrupted(*extra):
    """A run killed after its first layer (OPTQ_FAULT), then `optq quantize` again with `extra`."""
    def build(work: Path, ckpt: Path) -> list[str]:
        argv = ["quantize", str(MODEL), str(work / "out"), *QUICK]
        env = {**_env(work), "OPTQ_FAULT": "layer:0"}
        assert subprocess.run([sys.executable, "-m", "optq", *argv], env=env, capture_output=True,
                              timeout=300).returncode == -signal.SIGKILL
        return argv + list(extra)
    return build


def _without_root_override() -> list[str]:
    """Root writes anywhere: run the child without the capabilities that bypass file permissions."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    assert setpriv, "running the tests as root needs setpriv (util-linux) for the permission case"
    drop = "-dac_override,-dac_read_search"
    return [setpriv, "--bounding-set", drop, "--inh-caps", drop]


def _limit_file_size() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))


CASES = [
    # source models and options
    Case("model path that does not exist", lambda w, c: ["quantize", str(w / "nope"), str(w / "out"), "--rtn"],
         r"nope"),
    Case("architecture not in the registry (BLOOM)", _unknown_arch, r"'bloom' is not supported; supported.*llama"),
    Case("folder with only pickle weights", _pickle_only, r"pickle.*--allow-pickle"),
    Case("`--bits 5`", _quantize("--bits", "5"), r"bits"),
    Case("`--group-size 0`", _quantize("--group-size", "0"), r"group.size"),
    Case("`--damp -0.1`", _quantize("--damp", "-0.1"), r"damp"),
    Case("calibration text too short for nsamples x seqlen", _short_text, r"has \d+ tokens"),
    Case("calibration file that does not exist", _quantize("--dataset", "/nonexistent/cal.txt"), r"cal\.txt"),
    Case("`.jsonl` calibration without a `text` field", _empty_jsonl, r"text"),
    Case("hub dataset name offline (`--dataset wikitext2`)", _quantize("--dataset", "wikitext2"),
         r"wikitext2|datasets|hub"),
    Case("`--stream` with a GGUF source", lambda w, c: ["quantize", "smollm2", str(w / "out"), "--rtn", "--stream"],
         r"cannot be streamed.*GGUF.*drop --stream"),
    Case("`--max-activation-memory` not a size", _quantize("--max-activation-memory", "lots"), r"lots.*4GB"),
    Case("output folder exists", _out_exists, r"already exists.*--overwrite"),
    Case("output folder's parent does not exist", lambda w, c: ["quantize", str(MODEL), str(w / "a" / "b"), "--rtn"],
         r"does not exist"),
    Case("an interrupted run is found, without `--resume`", _interrupted(), r"interrupted run.*--resume"),
    Case("`--resume` with a different config than the interrupted run", _interrupted("--resume", "--bits", "8"),
         r"different.*config"),
    # checkpoints
    Case("checkpoint without safetensors files", _no_weights, r"no safetensors"),
    Case("truncated safetensors file", _truncated, r"truncated or corrupt"),
    Case("safetensors header that lies about a tensor's size", _edit_header(_lie_about_size),
         r"truncated or corrupt|scales"),
    Case("qweight of the wrong shape", _edit_tensors(_set(f"{Q}.qweight", lambda t: t[:-1])), r"q_proj\.qweight"),
    Case("scales of the wrong dtype (int32)", _edit_tensors(_set(f"{Q}.scales", lambda t: t.to(__import__("torch").int32))),
         r"q_proj\.scales has dtype"),
    Case("scales with more groups than qweight's columns make", _edit_tensors(
        _set(f"{Q}.scales", lambda t: __import__("torch").cat([t, t]))), r"q_proj\.scales"),
    Case("qzeros that disagree with scales", _edit_tensors(_set(f"{Q}.qzeros", lambda t: t[:, :1])),
         r"q_proj\.qzeros"),
    Case("a quantized module's tensor missing", _edit_tensors(lambda t: t.pop(f"{Q}.scales")), r"q_proj\.scales"),
    Case("config.json that is not JSON", _bad_json, r"not valid JSON"),
    Case("`quantization_config.bits` 5", _edit_quant("bits", 5), r"bits"),
    Case("`quantization_config.group_size` 0", _edit_quant("group_size", 0), r"group_size"),
    Case("`quantization_config.damp_percent` -1", _edit_quant("damp_percent", -1), r"damp"),
    Case("unknown `checkpoint_format`", _edit_quant("checkpoint_format", "gptq_v9"), r"checkpoint_format"),
    Case("Marlin-repacked weights (`checkpoint_format` marlin)", _edit_quant("checkpoint_format", "marlin"),
         r"Marlin"),
    Case("unknown `quant_method`", _edit_quant("quant_method", "awq"), r"quant_method|awq"),
    # the environment
    Case("no permission to write the output's folder", _readonly_parent, r"permission",
         prefix=_without_root_override),
    Case("the disk fills (here: a file size limit) while writing", lambda w, c: ["quantize", str(MODEL),
         str(w / "out"), "--rtn"], r"writing .*out failed: File too large.*run again", _limit_file_size),
]


def _env(work: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"HOME": str(work / "home"), "OPTQ_CACHE": str(work / "cache"), "HF_HUB_OFFLINE": "1",
                "PYTHONPATH": str(ROOT / "src")})
    return env


def run_case(case: Case, work: Path, ckpt: Path) -> tuple[list[str], int, str]:
    """Build the case's bad input in `work` and run the CLI on it: (arguments, exit status, stderr)."""
    argv = case.build(work, ckpt)
    (work / "home").mkdir(exist_ok=True)
    prefix = case.prefix() if case.prefix else []
    proc = subprocess.run([*prefix, sys.executable, "-m", "optq", *argv], capture_output=True, text=True, env=_env(work),
                          preexec_fn=case.preexec, timeout=300, cwd=work)
    return argv, proc.returncode, proc.stderr


def normalise(message: str, work: Path) -> str:
    return message.replace(str(work), "<dir>").replace(str(MODEL), "<model>").replace(str(TEXT), "<text>")


def _workdir() -> Path:
    work = Path(tempfile.mkdtemp(prefix="optq-validation-"))
    work.chmod(0o755)
    return work


@pytest.fixture(scope="module")
def good_checkpoint():
    work = _workdir()
    out = work / "ckpt"
    rc = subprocess.run([sys.executable, "-m", "optq", "quantize", str(MODEL), str(out), *QUICK, "--group-size",
                         "32"], capture_output=True, text=True, env=_env(work), timeout=300)
    assert rc.returncode == 0, rc.stderr
    yield out
    shutil.rmtree(work, ignore_errors=True)


def _check(rc: int, stderr: str, case: Case) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("optq: error: ")]
    assert rc == 2, f"{case.name}: exit status {rc}; stderr:\n{stderr}"
    assert "Traceback" not in stderr, stderr
    assert len(errors) == 1 and lines[-1] == errors[0], f"{case.name}: not one error line:\n{stderr}"
    assert re.search(case.expect, errors[0]), f"{case.name}: {errors[0]!r} does not match {case.expect!r}"
    return errors[0].removeprefix("optq: error: ")


def _row(case: Case, argv: list[str], message: str, work: Path) -> str:
    cmd = "optq " + " ".join(normalise(a, work) for a in argv)
    for noise in (" " + " ".join(normalise(a, work) for a in QUICK), " --prompt Once --max-new-tokens 1"):
        cmd = cmd.replace(noise, "")  # the same in every case: shown in the docs' header instead
    return f"| {case.name} | `{cmd}` | {normalise(message, work).replace('|', '/')} |"


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_gets_one_clear_line(case, good_checkpoint):
    work = _workdir()
    try:
        argv, rc, err = run_case(case, work, good_checkpoint)
        message = _check(rc, err, case)
        if case.build is not _out_exists:
            assert not (work / "out").exists()  # nothing half-written is left where a checkpoint would be
        assert not list(work.rglob(".*optq-tmp-*")), "a temporary folder was left behind"
        doc = (ROOT / "docs" / "validation.md").read_text()
        assert _row(case, argv, message, work) in doc, \
            "docs/validation.md does not show this case's current message: regenerate it (see its header)"
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_docs_table_lists_every_case():
    doc = (ROOT / "docs" / "validation.md").read_text()
    listed = re.findall(r"^\| (.+?) \| `optq", doc, flags=re.M)
    assert listed == [c.name for c in CASES]


def table() -> str:
    rows = ["| bad input | command | message (stderr, exit status 2) |", "|---|---|---|"]
    good_dir = _workdir()
    good = good_dir / "ckpt"
    subprocess.run([sys.executable, "-m", "optq", "quantize", str(MODEL), str(good), *QUICK, "--group-size", "32"],
                   check=True, capture_output=True, env=_env(good_dir))
    try:
        for case in CASES:
            work = _workdir()
            try:
                argv, rc, err = run_case(case, work, good)
                rows.append(_row(case, argv, _check(rc, err, case), work))
            finally:
                shutil.rmtree(work, ignore_errors=True)
    finally:
        shutil.rmtree(good_dir, ignore_errors=True)
    return "\n".join(rows)


if __name__ == "__main__":
    print(table())
