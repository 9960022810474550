"""Peak resident memory per rank of online upcycling, 1 and 2 ranks, against the full MoE's size.

Builds SmolLM2-135M -> 8 experts top-2 (upcycle) inside `torchrun ... moeify train --from-dense`,
stopping after 0 steps, and reads each rank's peak RSS right after construction from the run's
metrics. Also reports the RSS of a process that has only imported moeify/torch/transformers and
opened the data (the floor every rank pays). Usage: python benchmarks/online_memory.py
"""

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from moeify.checkpoint.dense import DenseCheckpoint
from moeify.checkpoint.resolve import resolve_model
from moeify.data.prepare import PrepareConfig, prepare

FLOOR = """
import resource, sys
import moeify.train.loop
from moeify.data.packed import PackedDataset
data = PackedDataset(__import__("pathlib").Path(sys.argv[1]))
data.blocks(data.domains[0], "val", 4)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


def main() -> None:
    dense = DenseCheckpoint(resolve_model("smollm2-135m"))
    data = prepare(PrepareConfig("smollm2-135m", seq_len=256), progress=False).path
    E, k = 8, 2
    L, D, F = dense.num_layers, dense.hidden_size, dense.ffn_size
    moe_bytes = 4 * (dense.parameter_count() + L * (E - 1) * 3 * D * F + L * E * D)
    layer_experts_bytes = 4 * E * 3 * D * F
    floor = float(subprocess.run([sys.executable, "-c", FLOOR, str(data)], capture_output=True, text=True, check=True).stdout)
    results = {"full_moe_mb": moe_bytes / 2**20, "one_layer_experts_mb": layer_experts_bytes / 2**20, "import_floor_mb": floor, "ranks": {}}
    for ranks in (1, 2):
        with tempfile.TemporaryDirectory() as out:
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks), "-m", "moeify",
                       "train", "--from-dense", "smollm2-135m", "--method", "upcycle", "--experts", str(E), "--top-k", str(k),
                       "--data", str(data), "--out", out, "--batch-size", "4", "--micro-batch", str(4 // ranks),
                       "--max-tokens", "4096", "--eval-blocks", "1", "--stop-after-steps", "0", "--no-export"]
            subprocess.run(command, check=True, capture_output=True)
            first = json.loads((Path(out) / "metrics.jsonl").read_text().splitlines()[0])
            results["ranks"][ranks] = first["peak_rss_mb_after_build"]
    print(f"full MoE (fp32): {results['full_moe_mb']:.0f} MiB; one layer's experts: {results['one_layer_experts_mb']:.0f} MiB; "
          f"import + data floor: {floor:.0f} MiB")
    for ranks, per_rank in results["ranks"].items():
        above = [mb - floor for mb in per_rank]
        shares = ", ".join(f"{a / results['full_moe_mb']:.2f}" for a in above)
        print(f"{ranks} rank(s): peak RSS after construction per rank {per_rank} MiB; above the floor "
              f"{[round(a) for a in above]} MiB = {shares} of the full MoE")
    path = Path(__file__).parent / "results" / "online_memory.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
