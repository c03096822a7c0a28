"""lm-evaluation-harness on optq's checkpoints, offline.

`python -m optq.lmeval ARGS` is `lm_eval ARGS` with optq imported first (so `--model hf --model_args
pretrained=CHECKPOINT` loads GPTQ checkpoints through optq: lm_eval's --model_args cannot import a package).
`optq lm-eval-tasks DIR` writes two tasks on local text into DIR, for `--include_path DIR` (the hub's task data
is out of reach here):

- `optq_lastword_wiki`: LAMBADA-style last-word prediction on WikiText-2 test paragraphs: the context is a
  paragraph up to its last word, the target that word; metrics: accuracy of the greedy continuation and
  perplexity of the target.
- `optq_cloze_stories`: multiple-choice story cloze on TinyStories: the first sentences of a story, and its real
  next sentence among three next sentences of other stories; metrics: accuracy and length-normalised accuracy.

Both are deterministic functions of the text files (nothing random but a seeded choice of distractors).
"""

from __future__ import annotations

import json
import random
import re
import sys
from pathlib import Path

from .errors import OptqError

LASTWORD = "optq_lastword_wiki"
CLOZE = "optq_cloze_stories"

_LASTWORD_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{' ' + target}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
metadata:
  version: 1.0
"""

_CLOZE_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
target_delimiter: " "
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def lastword_docs(wiki_text: str, limit: int = 500) -> list[dict]:
    """Paragraphs of WikiText (lines that are not headings) of 40-300 words ending in a word with a period:
    context = the paragraph up to its last word, target = that word (without the period)."""
    docs = []
    for line in wiki_text.split("\n"):
        line = line.strip()
        if not line or line.startswith("="):
            continue
        words = line.split(" ")
        if not 40 <= len(words) <= 300 or words[-1] != ".":
            continue
        target = words[-2]
        if not re.fullmatch(r"[A-Za-z]+", target):
            continue
        docs.append({"context": " ".join(words[:-2]), "target": target})
        if len(docs) == limit:
            break
    return docs


def cloze_docs(stories_text: str, limit: int = 300, seed: int = 0) -> list[dict]:
    """Story cloze: the first two sentences of a story, its third sentence and three distractors (third
    sentences of other stories, chosen with `seed`); the answer's position is seeded too."""
    stories = [s.strip() for s in stories_text.split("<|endoftext|>") if s.strip()]
    split = [re.split(r"(?<=[.!?])\s+", " ".join(s.split())) for s in stories]
    usable = [s for s in split if len(s) >= 3 and s[0][:1].isupper()]  # (a file may start mid-story)
    rng = random.Random(seed)
    docs = []
    for i, sents in enumerate(usable[:limit]):
        others = [u[2] for j, u in enumerate(usable) if j != i and u[2] != sents[2]]
        choices = rng.sample(others, 3) + [sents[2]]
        rng.shuffle(choices)
        docs.append({"context": " ".join(sents[:2]), "choices": choices, "label": choices.index(sents[2])})
    return docs


def write_tasks(folder, wiki: str | Path | None = None, stories: str | Path | None = None) -> list[str]:
    """Write the task YAML files and their JSONL data into `folder`; returns the task names written."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, path, make, template in ((LASTWORD, wiki, lastword_docs, _LASTWORD_YAML),
                                       (CLOZE, stories, cloze_docs, _CLOZE_YAML)):
        if path is None:
            continue
        path = Path(path)
        if not path.is_file():
            raise OptqError(f"{path} does not exist: give the text file for {name}")
        docs = make(path.read_text(encoding="utf-8"))
        if not docs:
            raise OptqError(f"{path} gave no documents for {name}: is it the right file?")
        data = folder / f"{name}.jsonl"
        data.write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
        (folder / f"{name}.yaml").write_text(template.format(name=name, data=json.dumps(str(data.resolve()))))
        written.append(name)
    if not written:
        raise OptqError("no task written: give --wiki (WikiText-2 test) and/or --stories (TinyStories text)")
    return written


def main(argv: list[str] | None = None) -> None:
    """lm_eval's command line with optq imported (its HfQuantizer registered)."""
    import optq  # noqa: F401

    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError:
        raise SystemExit("optq: error: lm-evaluation-harness is not installed: pip install lm-eval") from None
    sys.argv = ["lm_eval", *(sys.argv[1:] if argv is None else argv)]
    cli_evaluate()


if __name__ == "__main__":
    main()
