"""The verdict `optq quantize` ends with: the checkpoint and RTN against the float model."""

import math

from test_cli import optq

from optq.config import QuantizeConfig
from optq.quality import quality_reports
from optq.verdict import rtn_model, verdict


def test_quantize_ends_with_the_verdict(tinystories_model, tinystories_text, tmp_path):
    out = tmp_path / "q"
    p = optq("quantize", tinystories_model, out, "--bits", 4, "--group-size", 32, "--nsamples", 16, "--seqlen", 128,
             "--dataset", tinystories_text, "--quiet")
    assert "quality against the float model" in p.stdout
    assert "this checkpoint (4-bit)" in p.stdout and "RTN 4-bit" in p.stdout
    q = optq("quantize", tinystories_model, tmp_path / "q2", "--bits", 4, "--group-size", 32, "--nsamples", 16,
             "--seqlen", 128, "--dataset", tinystories_text, "--quiet", "--no-report")
    assert "quality against" not in q.stdout


def test_rtn_model_matches_an_rtn_checkpoint(tinystories_model, tmp_path):
    """The in-memory RTN the verdict compares with scores as an RTN checkpoint of the same settings does."""
    import optq as api

    cfg = QuantizeConfig(bits=3, group_size=32, method="rtn")
    ckpt = api.quantize(tinystories_model, tmp_path / "rtn", cfg, progress=False).path
    model, tok = rtn_model(tinystories_model, cfg, dtype="float32")
    reps = quality_reports([str(ckpt), ("memory", model, tok)], tinystories_model, ["docs"], windows=2, seqlen=256,
                           dtype="float32", progress=False)
    a, b = reps[0].results[0].kl_mean, reps[1].results[0].kl_mean
    assert a > 0.01 and math.isclose(a, b, rel_tol=1e-3), (a, b)


def test_verdict_warns_where_gptq_loses(tinystories_model, tmp_path):
    """GPTQ calibrated on one repeated sentence, without the guard, at 2 bits: worse than rounding on prose
    and code, and the verdict says so."""
    import optq as api

    text = tmp_path / "calib.txt"
    text.write_text("the cat sat on the mat. " * 3000)
    cfg = QuantizeConfig(bits=2, group_size=32, rtn_guard=False)
    ckpt = api.quantize(tinystories_model, tmp_path / "q", cfg, dataset=str(text), nsamples=16, seqlen=128,
                        progress=False).path
    v = verdict(ckpt, tinystories_model, cfg)
    assert v.worse and "not better than round-to-nearest" in v.warning
