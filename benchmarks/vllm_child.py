"""Runs inside vLLM's own venv (benchmarks/vllm_env.sh), started by benchmarks/vllm_serving.py: loads one
checkpoint with vLLM's CPU build, answers the given prompts greedily and times batch-1 and batch-N decoding.
Reads a JSON request on stdin, prints one JSON line (prefixed RESULT) on stdout."""

from __future__ import annotations

import json
import statistics
import sys
import time


def main() -> None:
    req = json.loads(sys.stdin.read())
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    t0 = time.perf_counter()
    llm = LLM(model=req["checkpoint"], dtype=req["dtype"], enforce_eager=req["eager"], max_model_len=1024,
              max_num_seqs=max(16, req["batch"]), seed=0)
    load_s = time.perf_counter() - t0
    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in req["prompts"]]
    greedy = SamplingParams(temperature=0.0, max_tokens=req["answer_tokens"])
    answers = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy, use_tqdm=False)]
    # speed: every sequence decodes exactly `new` tokens (EOS ignored), as in optq's measurement
    timed = SamplingParams(temperature=0.0, max_tokens=req["new_tokens"], ignore_eos=True)
    llm.generate(prompts[:1], timed, use_tqdm=False)  # warm-up

    def tok_s(batch: list) -> float:
        times = []
        for _ in range(req["runs"]):
            t = time.perf_counter()
            llm.generate(batch, timed, use_tqdm=False)
            times.append(time.perf_counter() - t)
        return len(batch) * req["new_tokens"] / statistics.median(times)

    batch = (prompts * req["batch"])[:req["batch"]]
    print("RESULT " + json.dumps({"load_s": load_s, "answers": [list(a) for a in answers],
                                  "batch1_tok_s": tok_s(prompts[:1]), "batchN_tok_s": tok_s(batch)}), flush=True)


if __name__ == "__main__":
    main()
