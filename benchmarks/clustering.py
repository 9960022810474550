"""Balanced k-means for Independent-Clustering: moeify vs k-means-constrained (LLaMA-MoE's choice).

1. Objective and time on the same real layers: SmolLM2-135M up_proj rows (1536 x 576), L2-normalised,
   16 and 8 experts; k-means-constrained with LLaMA-MoE's settings (size_min = size_max = F/E,
   max_iter 500, random_state 0, its default n_init 10). Objective: within-cluster sum of squared
   distances, computed the same way for both.
2. A 7B-shaped model: 32 layers of 11008 x 4096 rows (random normal, normalised), 16 experts, all
   layers with moeify; k-means-constrained on one such layer (optional, --kmc-7b).
Usage: python benchmarks/clustering.py [--layers 0,10,20] [--kmc-7b] [--out benchmarks/results/clustering.json]
Needs: pip install -e .[bench]
"""

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from k_means_constrained import KMeansConstrained

from moeify.checkpoint.dense import DenseCheckpoint
from moeify.checkpoint.resolve import resolve_model
from moeify.construct.kmeans import balanced_kmeans, squared_distances


def objective(points: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    centroids = torch.zeros(k, points.shape[1]).index_add_(0, labels, points) / torch.bincount(labels, minlength=k)[:, None]
    return float(squared_distances(points, centroids).gather(1, labels[:, None]).sum())


def kmc(points: torch.Tensor, k: int) -> tuple[float, float]:
    size = points.shape[0] // k
    start = time.perf_counter()
    labels = KMeansConstrained(n_clusters=k, size_min=size, size_max=size, max_iter=500, random_state=0).fit(points.numpy()).labels_
    return time.perf_counter() - start, objective(points, torch.tensor(labels, dtype=torch.long), k)


def ours(points: torch.Tensor, k: int, seed: int) -> tuple[float, float]:
    start = time.perf_counter()
    result = balanced_kmeans(points, k, seed=seed)
    assert torch.bincount(result.labels_N).unique().tolist() == [points.shape[0] // k]
    return time.perf_counter() - start, objective(points, result.labels_N, k)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", default="0,10,20,29")
    parser.add_argument("--kmc-7b", action="store_true", help="also time k-means-constrained on one 7B-shaped layer")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/clustering.json"))
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    dense = DenseCheckpoint(resolve_model("smollm2-135m"))
    rows = []
    for layer in [int(x) for x in args.layers.split(",")]:
        points = torch.nn.functional.normalize(dense.get(f"model.layers.{layer}.mlp.up_proj.weight").float(), dim=1)
        for k in (16, 8):
            t_ours, o_ours = ours(points, k, seed=layer)
            t_kmc, o_kmc = kmc(points, k)
            rows.append({"layer": layer, "experts": k, "moeify_s": round(t_ours, 2), "moeify_objective": round(o_ours, 3),
                         "kmc_s": round(t_kmc, 2), "kmc_objective": round(o_kmc, 3)})
            print(rows[-1], flush=True)
    generator = torch.Generator().manual_seed(0)
    start, per_layer = time.perf_counter(), []
    for layer in range(32):
        points = torch.nn.functional.normalize(torch.randn(11008, 4096, generator=generator), dim=1)
        t, _ = ours(points, 16, seed=layer)
        per_layer.append(round(t, 2))
    seven_b = {"layers": 32, "rows": 11008, "dim": 4096, "experts": 16, "moeify_total_s": round(time.perf_counter() - start, 1),
               "moeify_clustering_s": round(sum(per_layer), 1), "moeify_per_layer_s": per_layer}
    print(seven_b, flush=True)
    if args.kmc_7b:
        points = torch.nn.functional.normalize(torch.randn(11008, 4096, generator=generator), dim=1)
        t_kmc, o_kmc = kmc(points, 16)
        t_ours, o_ours = ours(points, 16, seed=0)
        seven_b["one_layer"] = {"kmc_s": round(t_kmc, 1), "kmc_objective": round(o_kmc, 2), "moeify_s": round(t_ours, 1),
                                "moeify_objective": round(o_ours, 2)}
        print(seven_b["one_layer"], flush=True)
    result = {"machine": f"{platform.machine()}, {torch.get_num_threads()} threads", "torch": torch.__version__,
              "smollm2_layers": rows, "seven_b_shape": seven_b}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
