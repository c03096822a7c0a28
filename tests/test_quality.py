"""The quality report (optq.quality) against an independent float64 computation, known answers, bad input."""

import math
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import optq
from optq.domains import build_domains
from optq.errors import OptqError
from optq.quality import quality_reports

SEQLEN, WINDOWS = 128, 2
DOMAINS = ("wiki", "code", "docs")


@pytest.fixture(scope="module")
def rtn_checkpoints(tinystories_model, tmp_path_factory):
    out = {}
    for bits in (2, 4, 8):
        path = tmp_path_factory.mktemp("ckpt") / f"rtn{bits}"
        optq.quantize(str(tinystories_model), path, optq.QuantizeConfig(bits=bits, group_size=32, method="rtn"),
                      progress=False)
        out[bits] = path
    return out


def report(models, reference, tinystories_text, **kw):
    kw.setdefault("domains", DOMAINS)
    return quality_reports([str(m) for m in models], str(reference), windows=WINDOWS, seqlen=SEQLEN,
                           wiki=str(tinystories_text), dtype="float32", progress=False, **kw)


def brute_force(reference, checkpoint, tinystories_text):
    """Per domain: the statistics computed here from float64 reference logits (plain Transformers) and the
    checkpoint's logits, by their definitions."""
    tok = AutoTokenizer.from_pretrained(str(reference))
    ref = AutoModelForCausalLM.from_pretrained(str(reference), dtype=torch.float64).eval()
    q = optq.load(checkpoint, dtype="float32").eval()
    out = {}
    for dom in build_domains(DOMAINS, tok, SEQLEN, WINDOWS, str(tinystories_text), 0):
        kl, top1, dp, nll_q, nll_p = [], [], [], [], []
        for w in dom.windows:
            with torch.no_grad():
                lp = torch.log_softmax(ref(w).logits[0, :-1].double(), -1)
                lq = torch.log_softmax(q(w).logits[0, :-1].double(), -1)
            t = w[0, 1:]
            for i in range(lp.shape[0]):
                keep = lp[i] > -16
                pi = lp[i][keep].exp()
                kl.append(float((pi * (lp[i][keep] - lq[i][keep])).sum()))
                top1.append(float(lp[i].argmax() == lq[i].argmax()))
                dp.append(float(lq[i, t[i]].exp() - lp[i, t[i]].exp()))
                nll_q.append(-float(lq[i, t[i]]))
                nll_p.append(-float(lp[i, t[i]]))
        n = len(kl)
        mean = sum(kl) / n
        out[dom.name] = {"kl_mean": mean, "kl_max": max(kl), "top1": sum(top1) / n, "dp_mean": sum(dp) / n,
                         "dp_rms": math.sqrt(sum(d * d for d in dp) / n),
                         "ln_ppl_ratio": sum(nll_q) / n - sum(nll_p) / n, "tokens": n,
                         "kl_median": sorted(kl)[n // 2] if n % 2 else 0.5 * (sorted(kl)[n // 2 - 1] + sorted(kl)[n // 2])}
    return out


def test_report_matches_float64_computation(tinystories_model, rtn_checkpoints, tinystories_text):
    rep = report([rtn_checkpoints[4]], tinystories_model, tinystories_text, precision="float32")[0]
    want = brute_force(tinystories_model, rtn_checkpoints[4], tinystories_text)
    for r in rep.results:
        w = want[r.domain]
        assert r.tokens == w["tokens"]
        assert r.kl_mean > 1e-4  # a real difference is being measured
        for key in ("kl_mean", "kl_max", "kl_median", "dp_rms", "ln_ppl_ratio"):
            assert getattr(r, key) == pytest.approx(w[key], rel=1e-4, abs=1e-9), (r.domain, key)
        assert r.dp_mean == pytest.approx(w["dp_mean"], rel=1e-3, abs=1e-8)
        assert r.top1 == pytest.approx(w["top1"], abs=1.5 / w["tokens"])  # at most one near-tie may flip


def test_uint16_store_close_to_exact(tinystories_model, rtn_checkpoints, tinystories_text):
    exact = report([rtn_checkpoints[4]], tinystories_model, tinystories_text, precision="float32")[0]
    coded = report([rtn_checkpoints[4]], tinystories_model, tinystories_text, precision="uint16")[0]
    for e, c in zip(exact.results, coded.results):
        # codes step 16/65535 in log p: the KL moves by about that times the mass, never by more than 2 steps
        assert abs(e.kl_mean - c.kl_mean) < 2 * 16 / 65535
        assert e.top1 == c.top1 and e.ln_ppl_ratio == pytest.approx(c.ln_ppl_ratio, abs=1e-12)


def test_known_answers(tinystories_model, rtn_checkpoints, tinystories_text):
    self_rep, r8, r2 = report([tinystories_model, rtn_checkpoints[8], rtn_checkpoints[2]], tinystories_model,
                              tinystories_text, precision="float32")
    for r in self_rep.results:
        assert r.kl_mean == 0 and r.kl_max == 0 and r.top1 == 1 and r.ln_ppl_ratio == 0
    for a, b in zip(r8.results, r2.results):
        assert b.kl_mean > 20 * a.kl_mean and b.top1 < a.top1


def test_chat_domain_and_answers(tinystories_model, tmp_path):
    """A copy of the tiny model with a chat template: prompts are answered, only answer tokens are scored, and
    the model answers exactly as itself."""
    model = tmp_path / "chatty"
    shutil.copytree(tinystories_model, model)
    tok = AutoTokenizer.from_pretrained(str(model))
    tok.chat_template = "{% for m in messages %}User: {{ m['content'] }}\n{% endfor %}Assistant:"
    tok.save_pretrained(str(model))
    rep = quality_reports([str(model)], str(model), ["chat"], chat_prompts=6, answer_tokens=8, dtype="float32",
                          precision="float32",
                          progress=False)[0]
    chat = rep.results[0]
    assert chat.domain == "chat" and 0 < chat.tokens <= 6 * 8
    assert chat.kl_mean == 0 and chat.answers_identical == 1
    assert len(rep.answers) == 6 and rep.answers == rep.reference_answers
    # without a chat template the domain is skipped with a note
    plain = quality_reports([str(tinystories_model)], str(tinystories_model), ["chat"], progress=False)[0]
    assert plain.results[0].tokens == 0 and "no chat template" in plain.results[0].note


def test_cache_reused_and_guarded(tinystories_model, stories260k_model, rtn_checkpoints, tinystories_text, tmp_path):
    cache = tmp_path / "ref"
    first = report([rtn_checkpoints[4]], tinystories_model, tinystories_text, cache_dir=cache)[0]
    (cache / "marker").write_text("")
    second = report([rtn_checkpoints[8]], tinystories_model, tinystories_text, cache_dir=cache)[0]
    again = report([rtn_checkpoints[4]], tinystories_model, tinystories_text, cache_dir=cache)[0]
    assert [r.kl_mean for r in first.results] == [r.kl_mean for r in again.results]
    assert second.results[0].kl_mean < first.results[0].kl_mean
    with pytest.raises(OptqError, match="another domains, windows or tokenizer"):
        report([rtn_checkpoints[4]], tinystories_model, tinystories_text, cache_dir=cache, domains=("code",))
    with pytest.raises(OptqError, match="another reference model"):
        report([stories260k_model], stories260k_model, tinystories_text, cache_dir=cache)


def test_bad_input(tinystories_model, stories260k_model, tinystories_text):
    with pytest.raises(OptqError, match="different tokenizers or vocabularies"):
        report([stories260k_model], tinystories_model, tinystories_text)
    with pytest.raises(OptqError, match="unknown domain 'poetry'"):
        report([tinystories_model], tinystories_model, tinystories_text, domains=("poetry",))
    with pytest.raises(OptqError, match="domain 'wiki' needs"):
        quality_reports([str(tinystories_model)], str(tinystories_model), ["wiki"], progress=False)
