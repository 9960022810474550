"""MoE block speed against a dense SwiGLU of the same activated width, and against stock transformers.

For each shape, token count and routing (balanced or skewed), in one run: forward+backward time of
  dense    SwiGLU with D and F = k * expert size (the baseline, ratio 1.00)
  moeify   MoEBlock with dispatch auto / grouped_mm / loop (router, experts and its losses)
  mixtral  transformers' MixtralSparseMoeBlock with experts_implementation eager / grouped_mm / batched_mm
  gemms    the experts' grouped GEMMs and SwiGLU alone, on rows already grouped with the block's
           counts: no router, gather or scatter. The floor of any dispatch that runs one GEMM
           per expert (training rows only)
then forward-only (inference, no_grad) at 1, 16 and 256 tokens. Every block gets the same inputs and
router weights, so the routing is identical. Prints ratios to dense (the median of per-repetition
ratios, see paired_ratios); writes JSON with the median seconds and the ratios.
Usage: python benchmarks/moe_kernels.py [--shapes NAME,...] [--reps 5] [--train-2048-only --json PATH]
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import MixtralConfig
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

from moeify.modeling import MoEBlock
from moeify.modeling.grouped_mm import grouped_mm
from moeify.modeling.losses import expert_counts

SHAPES = {  # name: (hidden D, expert size, experts E, top-k)
    "smollm2-upcycle-8x2": (576, 1536, 8, 2),
    "smollm2-split-8/2": (576, 192, 8, 2),
    "smollm2-split-16/4": (576, 96, 16, 4),
    "llama2-7b-split-16/4": (4096, 688, 16, 4),
}


class DenseSwiGLU(torch.nn.Module):
    def __init__(self, hidden: int, ffn: int):
        super().__init__()
        self.gate_up = torch.nn.Parameter(torch.randn(2 * ffn, hidden) * 0.02)
        self.down = torch.nn.Parameter(torch.randn(hidden, ffn) * 0.02)

    def forward(self, x):
        gate, up = F.linear(x, self.gate_up).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, self.down)


def make_inputs(tokens: int, hidden: int, experts: int, routing: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, tokens, hidden, generator=g)
    router = torch.randn(experts, hidden, generator=g) * 0.02
    if routing == "skewed":  # a shared direction in every token, aligned with the first experts' rows
        u = torch.randn(hidden, generator=g)
        u /= u.norm()
        x += 3 * u
        router += torch.linspace(1.0, -1.0, experts)[:, None] * u
    return x, router


def make_blocks(hidden, expert_size, experts, top_k, router):
    blocks = {"dense": DenseSwiGLU(hidden, top_k * expert_size)}
    gate_up = torch.randn(experts, 2 * expert_size, hidden) * 0.02
    down = torch.randn(experts, hidden, expert_size) * 0.02
    for dispatch in ("auto", "grouped_mm", "loop"):
        block = MoEBlock(hidden, expert_size, experts, top_k, dispatch=dispatch)
        with torch.no_grad():
            block.router.weight.copy_(router), block.experts.gate_up_proj.copy_(gate_up), block.experts.down_proj.copy_(down)
        blocks[f"moeify-{dispatch}"] = block
    for implementation in ("eager", "grouped_mm", "batched_mm"):
        config = MixtralConfig(hidden_size=hidden, intermediate_size=expert_size, num_local_experts=experts, num_experts_per_tok=top_k)
        config._experts_implementation = implementation
        block = MixtralSparseMoeBlock(config)
        with torch.no_grad():
            block.gate.weight.copy_(router), block.experts.gate_up_proj.copy_(gate_up), block.experts.down_proj.copy_(down)
        blocks[f"mixtral-{implementation}"] = block
    return blocks


def _output(block, x):
    out = block(x)
    return out.hidden if hasattr(out, "hidden") else out


def time_interleaved(fns: dict, reps: int) -> dict[str, list[float]]:
    """Seconds of each call, per variant; the variants take turns within each repetition so that
    drift in the machine's speed affects all of them alike."""
    for fn in fns.values():
        fn()
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def paired_ratios(times: dict[str, list[float]], baseline: str = "dense") -> dict[str, float]:
    """Median over repetitions of each variant's time ÷ the baseline's in the same repetition: a
    paired measure, so a slow spell of the machine moves numerator and denominator together."""
    return {name: statistics.median(t / b for t, b in zip(values, times[baseline])) for name, values in times.items()}


def batched_mm_bytes(tokens: int, hidden: int, expert_size: int, top_k: int) -> int:
    """transformers' batched_mm gathers every token's expert weights: T * k * 3 * F * D floats."""
    return tokens * top_k * 3 * expert_size * hidden * 4


def train_step(block, x, grad):
    def run():
        block.train()
        block.zero_grad(set_to_none=True)
        xi = x.detach().requires_grad_(True)
        _output(block, xi).backward(grad)
    return run


def expert_gemms_only(block: MoEBlock, x: torch.Tensor):
    """Forward+backward of the block's expert GEMMs and SwiGLU on k*T rows grouped by expert with
    the counts the block's router gives x, as if gathering and scattering cost nothing."""
    experts = block.experts
    with torch.no_grad():
        counts_E = expert_counts(block.router(x.reshape(-1, x.shape[-1])).indices_TK, experts.num_experts)
    offs_E = counts_E.cumsum(0).to(torch.int32)
    g = torch.Generator().manual_seed(1)
    x_AD = torch.randn(int(counts_E.sum()), x.shape[-1], generator=g)
    grad_AD = torch.randn(x_AD.shape, generator=g)

    def run():
        experts.zero_grad(set_to_none=True)
        xi = x_AD.detach().requires_grad_(True)
        gate, up = grouped_mm(xi, experts.gate_up_proj.transpose(-2, -1), offs_E).chunk(2, dim=-1)
        grouped_mm(F.silu(gate) * up, experts.down_proj.transpose(-2, -1), offs_E).backward(grad_AD)
    return run


def forward_only(block, x):
    def run():
        block.eval()
        with torch.no_grad():
            _output(block, x)
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "moe_kernels.json")
    parser.add_argument("--train-2048-only", action="store_true", help="only forward+backward at 2,048 tokens (the goal's rows)")
    args = parser.parse_args()
    modes = (("train", (2048,)),) if args.train_2048_only else (("train", (256, 2048)), ("inference", (1, 16, 256)))
    results = []
    for name in args.shapes.split(","):
        hidden, expert_size, experts, top_k = SHAPES[name]
        reps = args.reps if hidden < 2048 else max(2, args.reps // 2)
        for routing in ("balanced", "skewed"):
            _, router = make_inputs(8, hidden, experts, routing)
            blocks = make_blocks(hidden, expert_size, experts, top_k, router)
            for mode, token_counts in modes:
                for tokens in token_counts:
                    x, _ = make_inputs(tokens, hidden, experts, routing)
                    grad = torch.randn_like(x)
                    chosen = {label: b for label, b in blocks.items()
                              if label != "mixtral-batched_mm" or batched_mm_bytes(tokens, hidden, expert_size, top_k) < 2e9}
                    fns = {label: train_step(b, x, grad) if mode == "train" else forward_only(b, x) for label, b in chosen.items()}
                    if mode == "train":
                        fns["gemms"] = expert_gemms_only(blocks["moeify-grouped_mm"], x)
                    times = time_interleaved(fns, reps)
                    row = {"shape": name, "routing": routing, "mode": mode, "tokens": tokens,
                           "seconds": {k: statistics.median(v) for k, v in times.items()}, "ratio": paired_ratios(times)}
                    results.append(row)
                    cells = "  ".join(f"{k.replace('moeify-', 'm:').replace('mixtral-', 'hf:').replace('gemms', 'GEMMs alone')} {v:5.2f}" for k, v in row["ratio"].items() if k != "dense")
                    print(f"{name:<22}{routing:<9}{mode:<10}{tokens:>5}  {cells}", flush=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(), "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
