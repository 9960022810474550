"""Generation speed in stock transformers: SmolLM2-135M dense vs its exported 8x top-2 upcycled MoE.

Greedy decoding of 64 new tokens from a fixed prompt, batch 1, fp32; the models take turns for
each repetition; reports new tokens per second and the MoE / dense ratio.
Usage: python benchmarks/generate_speed.py [--reps 5] [--new-tokens 64]
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from moeify.build import build, build_config
from moeify.checkpoint.resolve import cache_dir, resolve_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()
    dense = resolve_model("smollm2-135m")
    moe = cache_dir() / "bench" / "smollm2-upcycle-8x2"
    if not (moe / "config.json").exists():
        build(build_config(model="smollm2-135m", out=moe, method="upcycle", num_experts=8, top_k=2, force=True))
    tokenizer = AutoTokenizer.from_pretrained(dense)
    ids = tokenizer("The history of the Python programming language", return_tensors="pt")["input_ids"]
    models = {name: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval() for name, path in (("dense", dense), ("upcycle-8x2", moe))}
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.no_grad():
        for rep in range(args.reps + 1):
            for name, model in models.items():
                start = time.perf_counter()
                out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new_tokens,
                                     min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
                if rep:  # the first round warms up
                    times[name].append(time.perf_counter() - start)
                assert out.shape[1] == ids.shape[1] + args.new_tokens
    tokens_per_s = {name: args.new_tokens / statistics.median(t) for name, t in times.items()}
    ratio = tokens_per_s["dense"] / tokens_per_s["upcycle-8x2"]
    print(f"time per generated token, MoE / dense: {ratio:.2f}x  (experts implementation: transformers' default)")
    out = Path(__file__).parent / "results" / "generate_speed.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"tokens_per_s": tokens_per_s, "ratio": ratio, "args": vars(args)}, indent=2) + "\n")


if __name__ == "__main__":
    main()
