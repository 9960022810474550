"""Recovery of cheap SmolLM2-135M MoEs by continual pre-training (CE) vs distillation from the dense parent.

Each arm is `moeify train` on the embedded corpus with the same tokens, batches and seed; the held-out
perplexity is exp of the mean held-out loss over the same blocks of every domain (eval_blocks per domain),
at step 0 and at the end. The dense model trained on the same CE tokens is the reference (in-domain
text rewards adapting to it). Step cost: median tokens/s of the steps after the first, distillation
against CE of the same student in the same run. Peak RSS of each run's process is logged by train.
Usage: python benchmarks/distill_recovery.py [--tokens 32768] [--students random-split,carve] [--out FILE]
"""

import argparse
import json
import math
import statistics
import tempfile
from pathlib import Path

from transformers.utils import logging as hf_logging

from moeify.build import build, build_config
from moeify.checkpoint.resolve import resolve_model
from moeify.train.config import TrainConfig
from moeify.train.loop import train

SEQ_LEN, BATCH, EVAL_BLOCKS = 256, 8, 6
# student -> (build settings, {arm: train settings}); learning rates and temperatures: the best of the first
# measurements in issue 32 (plain transformers loops on the same model and text)
STUDENTS = {
    "random-split": (dict(method="random-split", num_experts=8, top_k=2),
                     {"CE": dict(lr=2e-3), "distill": dict(lr=2e-3, distill=True)}),
    "carve": (dict(method="carve", num_experts=12, top_k=4, activation_ratio=0.5, calibration="embedded", calibration_tokens=16384),
              {"CE": dict(lr=1e-4), "distill": dict(lr=3e-4, distill=True, distill_temperature=2.0)}),
}


def run(model: Path, out: Path, tokens: int, **settings) -> dict:
    config = TrainConfig(model=str(model), out=str(out), seq_len=SEQ_LEN, batch_size=BATCH, micro_batch=BATCH // 2, max_tokens=tokens,
                         warmup_steps=2, eval_blocks=EVAL_BLOCKS, export=False, **settings)
    train(config, progress=False)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "heldout_loss" in r]
    perplexity = lambda r: math.exp(statistics.mean(r["heldout_loss"].values()))  # noqa: E731
    steps = [r for r in records if "tokens_per_s" in r]
    return {"settings": settings, "start_perplexity": perplexity(evals[0]), "perplexity": perplexity(evals[-1]),
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steps[1:]),
            "peak_rss_mb": max(max(r["peak_rss_mb"]) for r in records if "peak_rss_mb" in r),
            "curve": [(r["step"], r["loss"], r.get("distill_loss")) for r in steps]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--students", default="random-split,carve")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "distill_recovery.json")
    args = parser.parse_args()
    hf_logging.disable_progress_bar()
    dense = resolve_model("smollm2-135m")
    results: dict = {"tokens": args.tokens, "seq_len": SEQ_LEN, "batch": BATCH, "eval_blocks_per_domain": EVAL_BLOCKS}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        results["dense"] = run(dense, root / "dense", args.tokens, lr=1e-4)
        print(f"dense: {results['dense']['start_perplexity']:.2f} -> {results['dense']['perplexity']:.2f} (CE, lr 1e-4)", flush=True)
        for student in args.students.split(","):
            construction, arms = STUDENTS[student]
            moe = build(build_config(model=str(dense), out=root / student, **construction), progress=False)
            results[student] = {}
            for arm, settings in arms.items():
                results[student][arm] = run(moe, root / f"{student}-{arm}", args.tokens, **settings)
                r = results[student][arm]
                print(f"{student} + {arm}: {r['start_perplexity']:.1f} -> {r['perplexity']:.2f}, {r['tokens_per_s']:.0f} tokens/s", flush=True)
            results[student]["step_time_ratio"] = results[student]["CE"]["tokens_per_s"] / results[student]["distill"]["tokens_per_s"]
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
