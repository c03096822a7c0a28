"""One settings object for a quantization run: the CLI's flags, the API's options and resume's fingerprint read
the same fields."""

import dataclasses
import inspect

import pytest

import optq
from optq.api import quantize
from optq.cli import build_parser
from optq.errors import OptqError
from optq.settings import HESSIAN_SHARDS, RunSettings


def test_every_setting_is_a_quantize_flag_with_the_same_default():
    args = build_parser().parse_args(["quantize", "MODEL", "OUT"])
    for f in dataclasses.fields(RunSettings):
        assert hasattr(args, f.name), f"optq quantize has no --{f.name.replace('_', '-')}"
        assert getattr(args, f.name) == getattr(RunSettings(), f.name), f.name
    assert RunSettings.from_args(args) == RunSettings()


def test_flags_reach_the_settings():
    args = build_parser().parse_args(["quantize", "M", "O", "--seqlen", "256", "--nsamples", "32", "--no-stream",
                                      "--hessian-shards", "4", "--dataset", "pydoc", "--resume"])
    s = RunSettings.from_args(args)
    assert (s.seqlen, s.nsamples, s.stream, s.hessian_shards, s.dataset, s.resume) == (256, 32, False, 4, "pydoc",
                                                                                      True)


def test_unknown_option_is_one_line_naming_the_known_ones():
    with pytest.raises(OptqError, match="unknown quantization setting.*seqlenn.*seqlen"):
        RunSettings.from_options(seqlenn=256)
    with pytest.raises(OptqError, match="unknown quantization setting"):
        optq.quantize("m", "o", seqlenn=256)


def test_bad_sizes_are_refused():
    with pytest.raises(OptqError, match="nsamples and seqlen must be positive"):
        RunSettings(seqlen=0)


def test_fingerprint_leaves_defaults_out_so_old_runs_still_resume():
    assert RunSettings().fingerprint() == {"device": "cpu"}
    fp = RunSettings(allow_rtn_fallback=True, hessian_shards=HESSIAN_SHARDS * 2).fingerprint()
    assert fp == {"device": "cpu", "allow rtn fallback": True, "hessian shards": HESSIAN_SHARDS * 2}


def test_the_api_documents_every_option():
    doc = inspect.getdoc(quantize)
    for f in dataclasses.fields(RunSettings):
        assert f"`{f.name}=`" in doc, f.name
