"""lm-evaluation-harness on optq checkpoints with the offline tasks of `optq lm-eval-tasks`."""

import json
import os
import subprocess
import sys

import pytest

# the tasks' data are local files; without this `datasets` would ask the hub first (no network here)
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from optq.lmeval import cloze_docs, lastword_docs, write_tasks

pytest.importorskip("lm_eval")


def test_task_data_comes_from_the_text(tinystories_text):
    from conftest import shared_path

    wiki = shared_path("wikitext-2-raw", "wiki.test.raw").read_text()
    lines = {line.strip() for line in wiki.split("\n")}
    docs = lastword_docs(wiki)
    assert len(docs) == 500
    for d in docs[:50]:  # the context, the target and the final period are the paragraph again
        assert f"{d['context']} {d['target']} ." in lines
    stories = tinystories_text.read_text()
    flat = " ".join(stories.split())
    cloze = cloze_docs(stories)
    assert len(cloze) >= 90
    for d in cloze:
        assert len(d["choices"]) == 4 and len(set(d["choices"])) == 4
        assert f"{d['context']} {d['choices'][d['label']]}" in flat  # the right ending follows its context
    assert [d["label"] for d in cloze] == [d["label"] for d in cloze_docs(stories)]  # deterministic
    assert len({d["label"] for d in cloze}) == 4  # the answer is not always in one place


def test_lm_eval_runs_an_optq_checkpoint(tinystories_model, tinystories_text, tmp_path):
    """`python -m optq.lmeval --model hf --model_args pretrained=CHECKPOINT` (the string form lm_eval users
    write) scores the checkpoint as lm_eval's Python API does on the model optq.load gives."""
    import optq
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import AutoTokenizer

    ckpt = tmp_path / "q"
    optq.quantize(tinystories_model, ckpt, optq.QuantizeConfig(bits=4, group_size=32, method="rtn"), progress=False)
    tasks = tmp_path / "tasks"
    write_tasks(tasks, stories=tinystories_text)
    out = tmp_path / "results"
    p = subprocess.run([sys.executable, "-m", "optq.lmeval", "--model", "hf", "--model_args",
                        f"pretrained={ckpt},dtype=float32", "--device", "cpu", "--include_path", str(tasks),
                        "--tasks", "optq_cloze_stories", "--limit", "30", "--output_path", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    result = json.loads(next(out.rglob("results_*.json")).read_text())["results"]["optq_cloze_stories"]
    model = optq.load(ckpt, dtype="float32")
    lm = HFLM(pretrained=model, tokenizer=AutoTokenizer.from_pretrained(str(ckpt)), batch_size=1)
    direct = simple_evaluate(model=lm, tasks=["optq_cloze_stories"], limit=30,
                             task_manager=TaskManager(include_path=str(tasks)))["results"]["optq_cloze_stories"]
    assert result["acc,none"] == direct["acc,none"] and result["acc_norm,none"] == direct["acc_norm,none"]
