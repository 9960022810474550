"""Everything the GPU figures need, in one call (≤ 8 minutes on one H100/H200): one JSON.

For a SmolLM2-shaped and a Llama-3.2-1B-shaped MoE (8 experts top-2, upcycled layout, random
weights of the real architecture; the 1B model's layers cut to fit the time), moeify's own
training step (`moeify.train.step.train_step`: bf16 compute, fp32 master weights, fused AdamW)
with grouped_mm vs the loop dispatch and torch.compile on vs off: step time, tokens/s, MFU on
activated FLOPs against the bf16 datasheet peak, peak memory. Then the MoE block alone vs a dense
SwiGLU of the same activated FLOPs at 8192 tokens, forward + backward.

    python benchmarks/gpu_check.py --out gpu_check.json        # on the GPU
    python benchmarks/gpu_check.py --smoke --out smoke.json    # tiny shapes on CPU (the tests run this)

On a lent device machine (its own python3 with CUDA torch and transformers; nothing installed):
    PYTHONPATH=src PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py --out $OUT/gpu_check.json
with timeout_s 600: the default --budget-s 420 leaves the start of the last measurement time to end.

One device call is all there may be, so nothing is lost to one failure: the JSON is rewritten after
every measurement, a variant that raises (out of memory, a compile error) is recorded with its
error and the next one runs, and none starts once `--budget-s` has passed (recorded as skipped).
The block rows come first (seconds), then per shape grouped_mm compiled (the headline), eager, and
the loop dispatch eager (it takes the counts to the host per layer; not worth compiling).
"""

import argparse
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, MixtralConfig

from moeify.modeling import MoEBlock
from moeify.modeling.hf import attach_moe_blocks
from moeify.train.config import TrainConfig
from moeify.train.distributed import DistEnv, compile_layers
from moeify.train.metrics import flops_per_token, peak_device_memory_mb, peak_flops
from moeify.train.setup import make_optimizer
from moeify.train.step import train_step


@dataclass(frozen=True)
class Shape:
    name: str
    hidden: int
    ffn: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    seq_len: int
    micro_batch: int


SHAPES = {
    "full": [Shape("smollm2-135m-8x2", 576, 1536, 30, 9, 3, 49152, 2048, 8),
             Shape("llama3.2-1b-8x2-cut8", 2048, 8192, 8, 32, 8, 128256, 2048, 4)],
    "smoke": [Shape("smoke-8x2", 64, 128, 2, 4, 2, 256, 64, 2)],
}


def make_model(shape: Shape, device: torch.device, dispatch: str) -> tuple[torch.nn.Module, list]:
    config = MixtralConfig(vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.ffn,
                           num_hidden_layers=shape.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
                           num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=shape.seq_len,
                           tie_word_embeddings=shape.vocab < 100_000)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    blocks = attach_moe_blocks(model, dispatch)
    with torch.no_grad():
        for moe in blocks:
            moe.block.router.weight.normal_(0, 0.02)
            moe.block.experts.gate_up_proj.normal_(0, 0.02)
            moe.block.experts.down_proj.normal_(0, 0.02)
    return model.train(), blocks


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_training(shape: Shape, device: torch.device, dtype: torch.dtype, dispatch: str, compiled: bool, steps: int,
                  warmup: int, peak: float) -> dict:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model, blocks = make_model(shape, device, dispatch)
    tokens_per_step = shape.micro_batch * shape.seq_len
    flops_token = flops_per_token(model, shape.seq_len)
    if compiled:
        compile_layers(model)
    config = TrainConfig(micro_batch=shape.micro_batch, batch_size=shape.micro_batch, lr=1e-4)
    optimizer = make_optimizer(model, config)
    env = DistEnv(0, 1, 0, device)
    generator = torch.Generator().manual_seed(0)

    def micro_batch():
        ids = torch.randint(shape.vocab, (shape.micro_batch, shape.seq_len + 1), generator=generator)
        return ids.to(device), torch.zeros(shape.micro_batch, dtype=torch.long, device=device)

    times, first_step_seconds = [], None
    for step in range(warmup + steps):
        synchronize(device)
        start = time.perf_counter()
        record = train_step(model, blocks, optimizer, micro_batch, 1, config, env, 1, dtype)
        synchronize(device)
        if step == 0:
            first_step_seconds = time.perf_counter() - start  # with compilation when compiled
        if step >= warmup:
            times.append(time.perf_counter() - start)
    seconds = sorted(times)[len(times) // 2]
    result = {"dispatch": dispatch, "compile": compiled, "step_seconds": seconds, "tokens_per_s": tokens_per_step / seconds,
              "flops_per_token": flops_token, "mfu": tokens_per_step * flops_token / seconds / peak if peak else None,
              "peak_memory_mb": peak_device_memory_mb(device), "loss": record["loss"], "first_step_seconds": first_step_seconds,
              "dispatch_taken": blocks[0].block.experts.last_dispatch}
    del model, blocks, optimizer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def time_block(hidden: int, ffn: int, tokens: int, device: torch.device, dtype: torch.dtype, repeats: int) -> dict:
    """MoE block (8 experts of the full FFN, top-2) vs a dense SwiGLU of width 2 x FFN: equal activated FLOPs.
    Both hold their weights in `dtype`, as FSDP2's mixed-precision policy hands them to the layers, so
    neither pays a per-step cast of its weights (the MoE's would be 4x the dense one's)."""
    torch.manual_seed(0)
    moe = MoEBlock(hidden, ffn, 8, 2, dispatch="auto").to(device)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.02)
    moe.experts.to(dtype)
    moe.train()
    dense = [torch.nn.Parameter((torch.randn(2 * 2 * ffn, hidden, device=device) * 0.02).to(dtype)),
             torch.nn.Parameter((torch.randn(hidden, 2 * ffn, device=device) * 0.02).to(dtype))]
    x = torch.randn(tokens, hidden, device=device)

    def moe_step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            out = moe(x)
            (out.hidden.float().square().mean() + out.balance_loss).backward()

    def dense_step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            gate, up = F.linear(x, dense[0]).chunk(2, dim=-1)
            F.linear(F.silu(gate) * up, dense[1]).float().square().mean().backward()

    seconds = {}
    for name, fn in (("moe", moe_step), ("dense", dense_step)):
        fn()
        synchronize(device)
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        synchronize(device)
        seconds[name] = (time.perf_counter() - start) / repeats
    return {"tokens": tokens, "hidden": hidden, "ffn": ffn, "moe_seconds": seconds["moe"], "dense_seconds": seconds["dense"],
            "moe_over_dense": seconds["moe"] / seconds["dense"], "dispatch_taken": moe.experts.last_dispatch}


def write_json(path: Path, report: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, path)


def guarded(measure, started: float, budget_s: float, device: torch.device) -> dict:
    """measure() unless the budget is spent; its error, in one line, if it raises."""
    if time.perf_counter() - started > budget_s:
        return {"skipped": f"the {budget_s:.0f} s budget was spent"}
    try:
        return measure()
    except Exception as error:  # noqa: BLE001 - one failing variant must not lose the others' figures
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        failure = {"error": f"{type(error).__name__}: {first_line}"[:500]}
    if device.type == "cuda":  # after the except block, which kept the failed variant's tensors alive
        torch.cuda.empty_cache()
    return failure


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, 2 steps, on whatever device there is (CPU in the tests)")
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled variants")
    parser.add_argument("--budget-s", type=float, default=420.0, help="start no measurement after this many seconds")
    args = parser.parse_args()
    started = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16
    peak, peak_source = peak_flops(device, None)
    steps, warmup = (2, 1) if args.smoke else (10, 3)
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "torch": torch.__version__,
              "dtype": "bf16", "peak_flops": peak, "peak_source": peak_source, "block": [], "training": {}}
    block_shapes = [(64, 128, 256)] if args.smoke else [(576, 1536, 8192), (2048, 8192, 8192), (4096, 14336, 8192)]
    for hidden, ffn, tokens in block_shapes:
        row = guarded(lambda: time_block(hidden, ffn, tokens, device, dtype, 2 if args.smoke else 10), started, args.budget_s, device)
        report["block"].append({"tokens": tokens, "hidden": hidden, "ffn": ffn} | row)
        print("block", json.dumps(report["block"][-1]), flush=True)
        write_json(args.out, report)
    compile_too = not args.no_compile and not (args.smoke and device.type == "cpu")  # inductor on CPU: minutes; tested elsewhere
    variants = [("grouped_mm", True)] * compile_too + [("grouped_mm", False), ("loop", False)]
    for shape in SHAPES["smoke" if args.smoke else "full"]:
        runs = []
        report["training"][shape.name] = {"shape": shape.__dict__, "runs": runs}
        for dispatch, compiled in variants:
            row = guarded(lambda: time_training(shape, device, dtype, dispatch, compiled, steps, warmup, peak), started,
                          args.budget_s, device)
            runs.append({"dispatch": dispatch, "compile": compiled} | row)
            print(shape.name, json.dumps(runs[-1]), flush=True)
            write_json(args.out, report)
    report["seconds"] = time.perf_counter() - started
    write_json(args.out, report)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
