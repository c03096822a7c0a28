"""Interrupted quantizations (SIGKILL at several points) resume to byte-identical checkpoints."""

import hashlib
import os
import signal
import subprocess
import sys

import pytest

import optq
from optq.config import QuantizeConfig
from optq.errors import OptqError
from optq.resume import partial_dir

FLAGS = ["--bits", "4", "--group-size", "32", "--desc-act", "--gptaq", "--lm-head", "--nsamples", "8",
         "--seqlen", "128", "--quiet"]


def _quantize(model, out, text, *extra, fault=None):
    env = {**os.environ, "OPTQ_FAULT": fault or ""}
    return subprocess.run([sys.executable, "-m", "optq", "quantize", str(model), str(out), "--dataset", str(text),
                           *FLAGS, *extra], env=env, capture_output=True, text=True)


def _sha(folder):
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(folder.glob("*.safetensors"))}


@pytest.fixture(scope="module")
def reference(tinystories_model, tinystories_text, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "q"
    res = _quantize(tinystories_model, out, tinystories_text)
    assert res.returncode == 0, res.stderr[-2000:]
    return _sha(out)


# TinyStories-656K has 2 layers; "layer:2" is the lm_head, saved after them.
# calibration done / mid-layer 1 (layer 0 saved) / every layer and the lm_head saved / checkpoint half written
@pytest.mark.parametrize("fault", ["calibration", "module:1", "layer:2", "save"])
def test_sigkill_then_resume_is_byte_identical(fault, reference, tinystories_model, tinystories_text, tmp_path):
    out = tmp_path / "q"
    killed = _quantize(tinystories_model, out, tinystories_text, fault=fault)
    assert killed.returncode == -signal.SIGKILL, (killed.returncode, killed.stderr[-2000:])
    assert not out.exists()  # nothing a reader could take for a checkpoint
    assert partial_dir(out).exists()
    again = _quantize(tinystories_model, out, tinystories_text)  # without --resume: refused, with the hint
    assert again.returncode != 0 and "--resume" in again.stderr and "Traceback" not in again.stderr
    resumed = _quantize(tinystories_model, out, tinystories_text, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert _sha(out) == reference
    assert not partial_dir(out).exists()
    assert not list(tmp_path.glob(".q.optq-tmp-*"))  # the write cut short by the kill is gone


def test_resume_refuses_a_different_run(tinystories_model, tinystories_text, tmp_path):
    out = tmp_path / "q"
    killed = _quantize(tinystories_model, out, tinystories_text, fault="layer:0")
    assert killed.returncode == -signal.SIGKILL
    cfg = QuantizeConfig(bits=3, group_size=32, desc_act=True, gptaq=True, lm_head=True)
    with pytest.raises(OptqError, match="different config"):
        optq.quantize(tinystories_model, out, cfg, dataset=str(tinystories_text), nsamples=8, seqlen=128,
                      progress=False, resume=True)
    with pytest.raises(OptqError, match="different calibration tokens"):
        optq.quantize(tinystories_model, out, QuantizeConfig(bits=4, group_size=32, desc_act=True, gptaq=True,
                      lm_head=True), dataset=str(tinystories_text), nsamples=8, seqlen=128, seed=1,
                      progress=False, resume=True)
    # --overwrite starts over and completes.
    optq.quantize(tinystories_model, out, cfg, dataset=str(tinystories_text), nsamples=8, seqlen=128,
                  progress=False, overwrite=True)
    assert (out / "config.json").exists() and not partial_dir(out).exists()


def test_resume_of_a_finished_run(tinystories_model, tinystories_text, tmp_path):
    """--resume on a finished output: exit 0, 'already complete', nothing rewritten; another run's output or a
    changed setting is refused with the fix."""
    out = tmp_path / "q"
    assert _quantize(tinystories_model, out, tinystories_text).returncode == 0
    before = {f.name: f.stat().st_mtime_ns for f in out.iterdir()}
    again = _quantize(tinystories_model, out, tinystories_text, "--resume")
    assert again.returncode == 0 and "already complete" in again.stdout, again.stderr[-2000:]
    assert {f.name: f.stat().st_mtime_ns for f in out.iterdir()} == before
    other = _quantize(tinystories_model, out, tinystories_text, "--resume", "--seed", "1")
    assert other.returncode != 0 and "finished checkpoint of another run" in other.stderr
    plain = _quantize(tinystories_model, out, tinystories_text)
    assert plain.returncode != 0 and "already exists" in plain.stderr
