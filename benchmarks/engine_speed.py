"""The inference payoff in the engines: prompt-processing and decode tokens/s of a dense model and its MoEs in
llama.cpp (llama-bench, bf16) and vLLM (CPU build, bf16 and fp32), same machine, same run.

Shapes: SmolLM2-135M (its real weights; MoEs: upcycled 8 x top-2, carve 50% active = 12 experts top-4 + a
shared quarter, LLaMA-MoE's random split 8 x top-2) and a ~1B Llama (random weights, 16 layers of 2048,
FFN 8192, SmolLM2's tokenizer; MoEs: the random split 8 x top-2 and the carve's shape, 12 top-4 + shared
2048, built by random split, as speed does not depend on which neurons go where). Upcycling at 1B is left
out: 8 copies of the FFN make 6.5B parameters (13 GB in bf16, twice over as HF and GGUF files), more than this
machine's memory takes beside vLLM. Threads: all cores. The engines come from the tests' helpers
(tests/llama_cpp.py, tests/vllm_engine.py: built / installed and cached on first use).
vLLM runs bf16 (`vllm`) and fp32 (`vllm-fp32`): on a CPU without AMX, torch's bf16 matmul, which vLLM's dense
layers fall back to when its oneDNN handler cannot be built, runs 5-8x below its fp32 one, while the experts
run in vLLM's own fused-MoE kernel (benchmarks/cpu_matmul_dtype.py); fp32 compares dense and MoE on equal
kernels there.
A run keeps the figures of the shapes and engines it does not run.
Usage: python benchmarks/engine_speed.py [--shapes smollm2,1b] [--engines llama.cpp,vllm,vllm-fp32] [--reps 2]
"""

import argparse
import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests' engine helpers

from moeify.build import build, build_config  # noqa: E402
from moeify.checkpoint.resolve import cache_dir, resolve_model  # noqa: E402
from tests.llama_cpp import convert, llama_cpp, tool  # noqa: E402
from tests.vllm_engine import vllm_python  # noqa: E402

PROMPT, PROMPTS, NEW_TOKENS = 128, 4, 32
WORKER = Path(__file__).with_name("vllm_speed_worker.py")
ONE_B = dict(vocab_size=49152, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
             num_key_value_heads=8, max_position_embeddings=2048, tie_word_embeddings=True)


def _models(shape: str, root: Path) -> dict[str, Path]:
    """Name -> HF directory, built once into the cache."""
    def moe(name: str, parent: Path, **settings) -> Path:
        out = root / name
        if not (out / "config.json").exists():
            build(build_config(model=str(parent), out=out, force=True, **settings), progress=False)
        return out

    if shape == "smollm2":
        dense = resolve_model("smollm2-135m")
        return {"dense": dense,
                "upcycle 8x2": moe("smollm2-upcycle-8x2", dense, method="upcycle", num_experts=8, top_k=2),
                "carve 50% (12 top-4 + shared)": moe("smollm2-carve-50", dense, method="carve", num_experts=12, top_k=4,
                                                     activation_ratio=0.5, calibration="embedded", calibration_tokens=16384),
                "random split 8x2": moe("smollm2-split-8x2", dense, method="random-split", num_experts=8, top_k=2)}
    dense = root / "llama-1b"
    if not (dense / "config.json").exists():
        from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(**ONE_B)).to(torch.bfloat16).save_pretrained(dense)
        AutoTokenizer.from_pretrained(resolve_model("smollm2-135m")).save_pretrained(dense)
    return {"dense": dense,
            "carve shape 50% (12 top-4 + shared)": moe("llama-1b-12x4-shared", dense, method="random-split", num_experts=12, top_k=4,
                                                       shared_size=2048),
            "random split 8x2": moe("llama-1b-split-8x2", dense, method="random-split", num_experts=8, top_k=2)}


def _llama_cpp_speed(model: Path, gguf: Path, reps: int) -> dict[str, float]:
    root = llama_cpp()
    if not gguf.exists():
        convert(root, model, gguf, "bf16")
    result = subprocess.run([str(tool(root, "llama-bench")), "-m", str(gguf), "-p", str(PROMPT), "-n", str(NEW_TOKENS),
                             "-t", str(os.cpu_count() or 2), "-r", str(reps), "-o", "json"], capture_output=True, text=True, check=True)
    rows = json.loads(result.stdout)
    return {("prompt_tokens_per_s" if row["n_gen"] == 0 else "decode_tokens_per_s"): row["avg_ts"] for row in rows}


def _vllm_speed(model: Path, reps: int, dtype: str = "bfloat16") -> dict[str, float]:
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_LOGGING_LEVEL": "WARNING"}
    result = subprocess.run([str(vllm_python()), str(WORKER), str(model), str(PROMPT), str(PROMPTS), str(NEW_TOKENS), str(reps), dtype],
                            capture_output=True, text=True, env=env)
    line = next((r for r in result.stdout.splitlines() if r.startswith("VLLM-SPEED ")), None)
    if line is None:
        raise RuntimeError(f"vLLM failed on {model}:\n{result.stderr[-3000:]}")
    return json.loads(line.removeprefix("VLLM-SPEED "))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="smollm2,1b")
    parser.add_argument("--engines", default="llama.cpp,vllm,vllm-fp32")
    parser.add_argument("--reps", type=int, default=2)
    args = parser.parse_args()
    root = cache_dir() / "bench"
    out = Path(__file__).parent / "results" / "engine_speed.json"
    results: dict = {"settings": {"prompt_tokens": PROMPT, "vllm_prompts": PROMPTS, "new_tokens": NEW_TOKENS,
                                  "threads": os.cpu_count(), "dtype": "llama.cpp and vllm: bf16; vllm-fp32: fp32"}, "shapes": {}, "runs": {}}
    if out.exists():  # the shapes not run this time keep their figures
        previous = json.loads(out.read_text())
        results["shapes"] |= previous.get("shapes", {})
        results["runs"] |= previous.get("runs", {})
    engines = args.engines.split(",")
    for shape in args.shapes.split(","):
        rows = results["shapes"].setdefault(shape, {})
        for engine in engines:
            results["runs"].setdefault(shape, {})[engine] = {"date": datetime.date.today().isoformat(), "reps": args.reps}
        for name, model in _models(shape, root).items():
            row = rows.setdefault(name, {})
            if "llama.cpp" in engines:
                row["llama.cpp"] = _llama_cpp_speed(model, root / f"{shape}-{model.name}.bf16.gguf", args.reps)
            if "vllm" in engines:
                row["vllm"] = _vllm_speed(model, args.reps)
            if "vllm-fp32" in engines:
                row["vllm-fp32"] = _vllm_speed(model, args.reps, "float32")
            print(shape, name, json.dumps(rows[name]), flush=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    for shape in args.shapes.split(","):
        rows = results["shapes"][shape]
        dense = rows["dense"]
        print(f"\n{shape}: tokens/s (x dense)")
        for name, engines in rows.items():
            cells = [f"{engine} {kind.split('_')[0]} {value:.1f} ({value / dense[engine][kind]:.2f}x)"
                     for engine, speeds in engines.items() for kind, value in speeds.items()]
            print(f"  {name}: " + "; ".join(cells))


if __name__ == "__main__":
    main()
