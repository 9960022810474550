"""Runs inside the vLLM environment (tests/vllm_engine.py) for benchmarks/engine_speed.py: prompt-processing
and decode tokens/s of one model (bf16, or the dtype given), one process, eager. Prints `VLLM-SPEED {json}`.
Prefix caching is off: vLLM turns it on by default (on CPU too), and every round after the warm-up would then
find its prompts' KV blocks cached and time the scheduler, not the model."""

import json
import statistics
import sys
import time


def main() -> None:
    from vllm import LLM, SamplingParams

    model, prompt_len, prompts, new_tokens, reps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    dtype = sys.argv[6] if len(sys.argv) > 6 else "bfloat16"
    llm = LLM(model=model, dtype=dtype, enforce_eager=True, distributed_executor_backend="uni", skip_tokenizer_init=True,
              max_model_len=prompt_len + new_tokens + 8, max_num_seqs=prompts, seed=0, enable_prefix_caching=False)
    batch = [{"prompt_token_ids": [(7 * i + 13 * j) % 1000 + 10 for j in range(prompt_len)]} for i in range(prompts)]
    one = [{"prompt_token_ids": batch[0]["prompt_token_ids"][:16]}]
    prefill = SamplingParams(max_tokens=1, detokenize=False)
    decode = SamplingParams(max_tokens=new_tokens, min_tokens=new_tokens, ignore_eos=True, detokenize=False)
    prompt_times, decode_times = [], []
    for rep in range(reps + 1):  # the first round warms up
        start = time.perf_counter()
        llm.generate(batch, prefill, use_tqdm=False)
        middle = time.perf_counter()
        llm.generate(one, decode, use_tqdm=False)
        end = time.perf_counter()
        if rep:
            prompt_times.append(middle - start)
            decode_times.append(end - middle)
    print("VLLM-SPEED " + json.dumps({"prompt_tokens_per_s": prompt_len * prompts / statistics.median(prompt_times),
                                      "decode_tokens_per_s": new_tokens / statistics.median(decode_times)}))


if __name__ == "__main__":
    main()
