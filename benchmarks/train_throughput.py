"""Training throughput: SmolLM2-135M dense vs its 8-expert top-2 upcycled MoE, measured in one run.

Reports tokens/s of the full training step (forward, backward, AdamW) for the same batch, and
compares the slowdown with the ratio of activated FLOPs per token (6 * active matmul params +
attention). Also times one AdamW update of the MoE's parameters, fused (what training uses) and
foreach (torch's default on CPU), since the update scales with all E experts, not the k active.
Usage: python benchmarks/train_throughput.py [--steps 5] [--seq-len 256] [--batch 4]
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from moeify.build import build, build_config
from moeify.checkpoint.resolve import cache_dir, resolve_model
from moeify.data.prepare import PrepareConfig, prepare
from moeify.modeling.load import load_moe_model
from moeify.train.config import TrainConfig
from moeify.train.loop import train


def measure(model: Path, data: Path, steps: int, batch: int, seq_len: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        config = TrainConfig(model=str(model), data=str(data), out=tmp, batch_size=batch, micro_batch=batch,
                             max_tokens=steps * batch * seq_len, eval_blocks=1, export=False, warmup_steps=1)
        train(config, progress=False)
        records = [json.loads(line) for line in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
    timed = [r["tokens_per_s"] for r in records[2:]]  # skip step 1 (allocator and thread-pool warm-up)
    return {"tokens_per_s": statistics.median(timed), "all_tokens_per_s": timed,
            "flops_per_token": records[0]["flops_per_token"], "mfu": statistics.median(r["mfu"] for r in records[2:]),
            "peak_flops": records[0]["peak_flops"], "peak_flops_source": records[0]["peak_flops_source"]}


def optimizer_seconds(model_dir: Path, reps: int = 3) -> dict[str, float]:
    """Median seconds of one AdamW step over every parameter of the model (random gradients), per implementation."""
    model, _ = load_moe_model(model_dir)
    params = list(model.parameters())
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    seconds = {}
    for name, flags in [("fused", {"fused": True}), ("foreach", {"foreach": True})]:
        optimizer = torch.optim.AdamW(params, lr=1e-5, **flags)
        times = []
        for _ in range(reps + 1):  # the first step allocates the moments
            start = time.perf_counter()
            optimizer.step()
            times.append(time.perf_counter() - start)
        seconds[name] = statistics.median(times[1:])
        del optimizer
    return {"parameters": sum(p.numel() for p in params), **seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "train_throughput.json")
    args = parser.parse_args()
    dense = resolve_model("smollm2-135m")
    moe = cache_dir() / "bench" / "smollm2-upcycle-8x2"
    if not (moe / "config.json").exists():
        build(build_config(model="smollm2-135m", out=moe, method="upcycle", num_experts=8, top_k=2, force=True))
    data = prepare(PrepareConfig("smollm2-135m", seq_len=args.seq_len), progress=False).path
    results = {name: measure(path, data, args.steps, args.batch, args.seq_len) for name, path in [("dense", dense), ("upcycle-8x2", moe)]}
    slowdown = results["dense"]["tokens_per_s"] / results["upcycle-8x2"]["tokens_per_s"]
    flops_ratio = results["upcycle-8x2"]["flops_per_token"] / results["dense"]["flops_per_token"]
    print(f"{'model':<14}{'tokens/s':>10}{'GFLOP/token':>13}{'MFU':>7}")
    for name, r in results.items():
        print(f"{name:<14}{r['tokens_per_s']:>10.1f}{r['flops_per_token'] / 1e9:>13.3f}{r['mfu']:>7.1%}")
    print(f"time per token, MoE / dense: {slowdown:.2f}x   activated FLOPs, MoE / dense: {flops_ratio:.2f}x   "
          f"step time / FLOPs ratio: {slowdown / flops_ratio:.2f}")
    update = optimizer_seconds(moe)
    print(f"one AdamW update of the MoE's {update['parameters'] / 1e6:.0f}M parameters: fused {update['fused']:.2f} s, "
          f"foreach {update['foreach']:.2f} s ({update['foreach'] / update['fused']:.1f}x)")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "results": results,
                                     "slowdown": slowdown, "flops_ratio": flops_ratio, "adamw_update_s": update}, indent=2) + "\n")
    print(f"wrote {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
