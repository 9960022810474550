"""Runs inside the vLLM virtual environment (tests/vllm_engine.py): prompt log-probs of fixed token ids
for each model named on the command line, one engine at a time in this one process. Prints JSON:
{model: [[log p(token t | tokens < t) for t >= 1] per prompt]}."""

import gc
import json
import sys


def main() -> None:
    from vllm import LLM, SamplingParams

    request = json.loads(sys.stdin.read())
    results = {}
    for model in request["models"]:
        llm = LLM(model=model, dtype="float32", enforce_eager=True, distributed_executor_backend="uni", skip_tokenizer_init=True,
                  max_model_len=request["max_model_len"], max_num_seqs=len(request["prompts"]), seed=0)
        outputs = llm.generate([{"prompt_token_ids": ids} for ids in request["prompts"]],
                               SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False), use_tqdm=False)
        results[model] = [[entry[token].logprob for token, entry in zip(ids[1:], output.prompt_logprobs[1:])]
                          for ids, output in zip(request["prompts"], outputs)]
        del llm
        gc.collect()
    print("VLLM-RESULT " + json.dumps(results))


if __name__ == "__main__":
    main()
