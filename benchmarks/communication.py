"""Collectives per optimizer step by layout and gradient accumulation, counted on gloo ranks (`--count-collectives`).

The tiny upcycled MoE of the tests' shape (random weights: 2 layers of 64, 4 experts of 96, top-2), batches of
8 x 32 tokens per rank and micro-batch, 3 optimizer steps; rank 0's calls and bytes per collective kind and
process group in the last step, for 1, 4 and 8 micro-batches per step. A layout whose gradient reduction
waits for the step's last micro-batch keeps the same count whatever the accumulation. Beside each count, what
`moeify plan-memory` predicts for it (plan_communication.collectives; the all-to-all assumes balanced routing).
Usage: python benchmarks/communication.py [--accumulation 1,4,8]
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests' tiny models

import torch  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

from moeify.build import build, build_config  # noqa: E402
from moeify.data.prepare import PrepareConfig, prepare  # noqa: E402
from moeify.modeling.hf import attach_moe_blocks  # noqa: E402
from moeify.plan_communication import collectives  # noqa: E402
from moeify.train.parallelize import Layout  # noqa: E402
from tests.conftest import TINY_CONFIGS, save_tiny  # noqa: E402

MICRO = 2  # sequences per micro-batch per rank
# name -> (layout, flags)
LAYOUTS = {
    "DDP 2": (Layout(2, parallel="ddp"), ["--parallel", "ddp"]),
    "FSDP2 2, --gradient-sync micro-batch": (Layout(2), []),
    "FSDP2 2, --gradient-sync step": (Layout(2), ["--gradient-sync", "step"]),
    "HSDP 2x2": (Layout(4, hsdp=2), ["--hsdp", "2"]),
    "FSDP2 4, EP 2": (Layout(4, ep=2), ["--ep", "2"]),
    "HSDP 2x2, EP 2": (Layout(4, hsdp=2, ep=2), ["--hsdp", "2", "--ep", "2"]),
}


def _planned(model_path: Path, layout: Layout, accumulation: int, flags: list[str]) -> dict:
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_path))
        attach_moe_blocks(model)
    sync = "step" if "step" in flags else "micro-batch"
    planned: dict = {}
    for entry in collectives(model, layout, accumulation, MICRO * 32, 4, sync):
        planned.setdefault(entry.kind, {})[",".join(map(str, entry.ranks))] = [entry.calls, entry.bytes]
    return planned


def _last_step(model: Path, data: Path, out: Path, ranks: int, accumulation: int, flags: list[str]) -> dict:
    batch = MICRO * ranks * accumulation
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks), "-m", "moeify", "train",
               "--model", str(model), "--data", str(data), "--out", str(out), "--batch-size", str(batch), "--micro-batch", str(MICRO),
               "--max-tokens", str(batch * 32 * 3), "--eval-blocks", "1", "--no-export", "--count-collectives", *flags]
    subprocess.run(command, check=True, capture_output=True, text=True)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "collectives" in r][-1]["collectives"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--accumulation", default="1,4,8")
    parser.add_argument("--layouts", default=None, help="comma-separated substrings of the layouts to run (default: all)")
    args = parser.parse_args()
    accumulations = [int(a) for a in args.accumulation.split(",")]
    results: dict = {"micro_batch": MICRO, "accumulation": accumulations, "layouts": {}, "planned": {}}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        dense = save_tiny(TINY_CONFIGS["llama"](), root / "dense")
        moe = build(build_config(model=str(dense), out=root / "moe", method="upcycle", num_experts=4, top_k=2), progress=False)
        data = prepare(PrepareConfig(str(moe), out=root / "data", seq_len=32, embedded_chars=40_000), progress=False).path
        chosen = {n: v for n, v in LAYOUTS.items() if args.layouts is None or any(part in n for part in args.layouts.split(","))}
        for name, (layout, flags) in chosen.items():
            results["layouts"][name] = {accumulation: _last_step(moe, data, root / f"run-{len(results['layouts'])}-{accumulation}", layout.world,
                                                                 accumulation, flags) for accumulation in accumulations}
            results["planned"][name] = {accumulation: _planned(moe, layout, accumulation, flags) for accumulation in accumulations}
            print(name, json.dumps(results["layouts"][name]), flush=True)
    (Path(__file__).parent / "results" / "communication.json").write_text(json.dumps(results, indent=2) + "\n")
    print("\n| layout | collective (rank 0's group) | " + " | ".join(f"accumulation {a}: calls, MB (planned)" for a in accumulations) + " |")
    for name, by_accumulation in results["layouts"].items():
        keys = sorted({(kind, group) for counts in by_accumulation.values() for kind, groups in counts.items() for group in groups})
        for kind, group in keys:
            cells = []
            for accumulation in accumulations:
                calls, size = by_accumulation[accumulation].get(kind, {}).get(group, [0, 0])
                planned = results["planned"][name][accumulation].get(kind, {}).get(group)
                cells.append(f"{calls}, {size / 1e6:.2f}" + (f" ({planned[0]}, {planned[1] / 1e6:.2f})" if planned else ""))
            print(f"| {name} | {kind} over ranks {group} | " + " | ".join(cells) + " |")

if __name__ == "__main__":
    main()
