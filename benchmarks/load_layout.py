"""Load time and peak memory of an exported MoE in stock transformers: per-expert keys vs the fused layout.

SmolLM2-135M upcycled to 8 experts top-2, built once in each layout; each load (`AutoModelForCausalLM.
from_pretrained`, fp32) runs in its own process, the two taking turns, 3 times each; medians.
Usage: python benchmarks/load_layout.py
"""

import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

LOAD = """
import resource, sys, time
import torch
from transformers import AutoModelForCausalLM
start = time.perf_counter()
AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
print(time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
"""


def main() -> None:
    from moeify.build import build, build_config

    results: dict[str, dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory() as root:
        dirs = {layout: build(build_config(model="smollm2-135m", out=Path(root) / layout, method="upcycle", num_experts=8, top_k=2,
                                           layout=layout), progress=False) for layout in ("per-expert", "fused")}
        for _ in range(3):
            for layout, path in dirs.items():
                out = subprocess.run([sys.executable, "-c", LOAD, str(path)], capture_output=True, text=True, check=True).stdout.split()
                results.setdefault(layout, {"seconds": [], "peak_rss_gb": []})
                results[layout]["seconds"].append(float(out[-2]))
                results[layout]["peak_rss_gb"].append(float(out[-1]))
    medians = {layout: {k: statistics.median(v) for k, v in r.items()} for layout, r in results.items()}
    for layout, m in medians.items():
        print(f"{layout:<11} load {m['seconds']:.1f} s, peak RSS {m['peak_rss_gb']:.2f} GB")
    print(f"fused / per-expert load time: {medians['fused']['seconds'] / medians['per-expert']['seconds']:.2f}")
    path = Path(__file__).parent / "results" / "load_layout.json"
    path.write_text(json.dumps({"runs": results, "medians": medians}, indent=2) + "\n")


if __name__ == "__main__":
    main()
