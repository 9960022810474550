"""Conversion with bounded memory: build an 8-expert MoE from a ~1.1B-parameter Llama-shaped dense
checkpoint (random bf16 weights, generated here tensor by tensor), and compare
  peak resident memory of `moeify build`  vs  dense checkpoint size + one layer's experts
  wall time of `moeify build`             vs  `cp -r` of the output it wrote (same run)
Usage: python benchmarks/convert.py [--workdir DIR]   (needs ~30 GB of free disk; cleans up)
"""

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import LlamaConfig

from moeify.checkpoint.writer import ShardedWriter

# TinyLlama-1.1B's shape.
CONFIG = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
              num_key_value_heads=4, max_position_embeddings=2048, tie_word_embeddings=False)
EXPERTS = 8


def write_dense(path: Path) -> int:
    config = LlamaConfig(**CONFIG, dtype="bfloat16")
    D, F, L, V = config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.vocab_size
    kv = config.num_key_value_heads * D // config.num_attention_heads
    shapes = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,), "lm_head.weight": (V, D)}
    for i in range(L):
        p = f"model.layers.{i}"
        shapes.update({f"{p}.self_attn.q_proj.weight": (D, D), f"{p}.self_attn.k_proj.weight": (kv, D),
                       f"{p}.self_attn.v_proj.weight": (kv, D), f"{p}.self_attn.o_proj.weight": (D, D),
                       f"{p}.mlp.gate_proj.weight": (F, D), f"{p}.mlp.up_proj.weight": (F, D), f"{p}.mlp.down_proj.weight": (D, F),
                       f"{p}.input_layernorm.weight": (D,), f"{p}.post_attention_layernorm.weight": (D,)})
    path.mkdir(parents=True)
    writer = ShardedWriter(path, max_shard_bytes=1 << 30)
    generator = torch.Generator().manual_seed(0)
    for name, shape in shapes.items():
        writer.add(name, (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16))
    writer.close()
    config.save_pretrained(path)
    return writer.total_bytes


def directory_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="moeify-convert-", dir=args.workdir))
    try:
        dense_bytes = write_dense(root / "dense")
        D, F = CONFIG["hidden_size"], CONFIG["intermediate_size"]
        layer_experts_bytes = EXPERTS * 3 * D * F * 2
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "moeify", "build", "--model", str(root / "dense"), "--method", "upcycle",
                        "--experts", str(EXPERTS), "--top-k", "2", "--out", str(root / "moe")], check=True, capture_output=True)
        build_seconds = time.perf_counter() - start
        peak_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
        out_bytes = directory_bytes(root / "moe")
        start = time.perf_counter()
        subprocess.run(["cp", "-r", str(root / "moe"), str(root / "copy")], check=True)
        subprocess.run(["sync"], check=True)
        cp_seconds = time.perf_counter() - start
        result = {"dense_gb": dense_bytes / 1e9, "moe_gb": out_bytes / 1e9, "layer_experts_gb": layer_experts_bytes / 1e9,
                  "build_peak_rss_gb": peak_rss / 1e9, "memory_bound_gb": (dense_bytes + layer_experts_bytes) / 1e9,
                  "build_seconds": build_seconds, "cp_seconds": cp_seconds, "time_ratio": build_seconds / cp_seconds}
        print(f"dense {result['dense_gb']:.2f} GB -> MoE {result['moe_gb']:.2f} GB ({EXPERTS} experts, upcycle, bf16)")
        print(f"peak RSS of moeify build: {result['build_peak_rss_gb']:.2f} GB; bound (dense + one layer's experts): "
              f"{result['memory_bound_gb']:.2f} GB")
        print(f"build / cp of its output: {result['time_ratio']:.2f}x")
        out = Path(__file__).parent / "results" / "convert.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
