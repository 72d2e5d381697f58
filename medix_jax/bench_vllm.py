"""vLLM's side of ``python -m medix_jax.bench sampler --lengths longtail``; runs in ``.venv-vllm``
(``scripts/setup_vllm_cpu.sh``), imports nothing of medix_jax.

``python bench_vllm.py JOB.json`` with JOB ``{"model": export dir, "prompts": [[ids]], "lengths": [int],
"runs": int, "max_model_len": int}``: one request per sample (prompt token ids, greedy, exactly ``lengths[i]``
tokens: ``ignore_eos`` and ``min_tokens``), one warm-up pass, then ``runs`` timed passes of ``LLM.generate`` over
all of them at once (vLLM schedules them with its own continuous batching). Prints one JSON line: the pass times
and the last pass's token ids.
"""

import json
import sys
import time


def main(job_path: str) -> None:
    from vllm import LLM, SamplingParams

    job = json.loads(open(job_path).read())
    llm = LLM(model=job["model"], dtype="float32", enforce_eager=True, max_model_len=job["max_model_len"],
              skip_tokenizer_init=True, seed=0, limit_mm_per_prompt={"image": 0, "video": 0})
    params = [SamplingParams(max_tokens=n, min_tokens=n, temperature=0.0, ignore_eos=True, detokenize=False)
              for n in job["lengths"]]
    requests = [{"prompt_token_ids": ids} for ids in job["prompts"]]
    llm.generate(requests, params, use_tqdm=False)  # warm-up
    times = []
    for _ in range(job["runs"]):
        start = time.perf_counter()
        outputs = llm.generate(requests, params, use_tqdm=False)
        times.append(time.perf_counter() - start)
    tokens = [list(o.outputs[0].token_ids) for o in outputs]
    print("BENCH_VLLM " + json.dumps({"times": times, "tokens": tokens}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
