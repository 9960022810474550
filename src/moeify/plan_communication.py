"""Communication and step time of a training layout, per optimizer step, as rank 0 sees it (`moeify plan-memory`).

Collectives follow train/parallelize.py and are counted the way `train --count-collectives` counts them
(a call's bytes are its whole buffer): per FSDP2 unit (the root, each decoder layer, each layer's experts
under EP) of N gathered elements (padding included) over a shard group of G > 1 ranks:
- all-gather of N x compute bytes in the forward, again in the backward unless it is the root or
  --no-reshard-after-forward, every micro-batch;
- reduce-scatter of N x 4 (fp32 gradients) every micro-batch, or once per step with --gradient-sync step;
- with --hsdp, one all-reduce of the N / G sharded fp32 gradients across replicas per step.
DDP all-reduces the 4 P bytes of gradients once per step. Under EP each MoE layer sends its tokens out and
back (4 all-to-alls a micro-batch, 6 with activation checkpointing, which recomputes the forward's), each of
T k D compute bytes for T tokens a rank: an estimate (balanced routing, nothing dropped); everything else is
exact for parameters and gradients. Small collectives (routing counts, balance losses, step statistics) are
left out: under a kilobyte a call.

Time: a collective over G ranks moves (G-1)/G of its buffer through each rank's link (twice for an
all-reduce: reduce-scatter then all-gather, as rings do), over NVLink when the group sits in one node, else
over the network. Compute: model FLOPs 6 N_active + 12 L H hd S per token (PaLM's, attention not halved for
causality), hardware FLOPs 8 N_active with activation checkpointing (the forward again), at the GPU's dense
peak. These are ceilings: no kernel reaches peak and no link its line rate.
"""

import math
from dataclasses import dataclass

import torch

from moeify.errors import MoeifyError
from moeify.modeling.hf import MoEFeedForward
from moeify.train.metrics import GPU_PEAK_TFLOPS, active_matmul_params, flops_per_token
from moeify.train.parallelize import EXPERT_PARAMS, Layout, local_elements

# Dense bf16 (train/metrics.py) and TF32 tensor-core peaks (TFLOP/s, SXM parts) and per-GPU link line rates (Gb/s,
# one direction): NVLink 4 (H100, H200) 450 GB/s, NVLink 3 (A100) 300 GB/s; one 400 Gb/s NDR (200 Gb/s HDR for
# A100) NIC a GPU.
GPUS = {
    "h100": dict(bf16=GPU_PEAK_TFLOPS["H100"], fp32=494.7, intra_gbps=3600.0, inter_gbps=400.0),
    "h200": dict(bf16=GPU_PEAK_TFLOPS["H200"], fp32=494.7, intra_gbps=3600.0, inter_gbps=400.0),
    "a100": dict(bf16=GPU_PEAK_TFLOPS["A100"], fp32=156.0, intra_gbps=2400.0, inter_gbps=200.0),
}
LINK_FACTOR = {"all_gather": 1.0, "reduce_scatter": 1.0, "all_reduce": 2.0, "all_to_all": 1.0}


@dataclass
class Collective:
    kind: str  # all_gather | reduce_scatter | all_reduce | all_to_all (CollectiveCounter's names)
    group: str  # shard | expert shard | replicas | expert parallel | world (DDP)
    ranks: tuple[int, ...]  # rank 0's group
    calls: int
    bytes: int  # per optimizer step: the calls' whole buffers, summed
    exact: bool  # False: the all-to-all of tokens (balanced routing assumed)
    link: str = ""  # intra (one node) | inter
    seconds: float = 0.0


@dataclass
class StepPlan:
    collectives: list[Collective]
    tokens: int  # per rank per optimizer step
    model_flops: float  # per rank per step
    hardware_flops: float  # model FLOPs plus recomputation
    compute_s: float  # hardware FLOPs at peak
    communication_s: float
    step_s_overlapped: float  # max(compute, communication)
    step_s_serial: float  # compute + communication
    mfu_overlapped: float
    mfu_serial: float


@dataclass(frozen=True)
class Links:
    gpu: str
    gpus_per_node: int
    intra_gbps: float
    inter_gbps: float


def rank0_groups(layout: Layout) -> dict[str, tuple[int, ...]]:
    """Rank 0's groups in the mesh of parallelize.make_meshes: shard groups are consecutive ranks, replicas
    stride by the shard size, expert-parallel groups are consecutive, expert shards stride by --ep."""
    return {"shard": tuple(range(layout.shard)), "replicas": tuple(range(0, layout.world, layout.shard)),
            "expert parallel": tuple(range(layout.ep)), "expert shard": tuple(range(0, layout.shard, layout.ep)),
            "world": tuple(range(layout.world))}


def _unit_of(name: str, layout: Layout) -> str:
    parts = name.split(".")
    if not name.startswith("model.layers."):
        return "root"
    if layout.ep > 1 and name.endswith(EXPERT_PARAMS) and ".experts." in name:
        return f"experts {parts[2]}"
    return f"layer {parts[2]}"


def fsdp_units(model: torch.nn.Module, layout: Layout) -> dict[str, int]:
    """Gathered elements of each FSDP2 unit on rank 0 (padding included): per tensor, FSDP2 pads the sharded
    dimension to a multiple of the group; under EP an expert tensor holds this rank's E / ep experts."""
    units: dict[str, int] = {}
    for name, param in model.named_parameters():
        unit = _unit_of(name, layout)
        experts = unit.startswith("experts")
        padded, _ = local_elements(tuple(param.shape), layout, experts)
        units[unit] = units.get(unit, 0) + padded * (layout.expert_shard if experts else layout.shard)
    return units


def collectives(model: torch.nn.Module, layout: Layout, micro_batches: int, tokens: int, compute_bytes: int,
                gradient_sync: str = "micro-batch", reshard_after_forward: bool = True,
                activation_checkpointing: str = "none") -> list[Collective]:
    """Rank 0's collectives per optimizer step of `micro_batches` micro-batches of `tokens` tokens each."""
    groups = rank0_groups(layout)
    if layout.world == 1:
        return []
    if layout.parallel == "ddp":
        gradients = 4 * sum(p.numel() for p in model.parameters())
        buckets = math.ceil(gradients / (25 << 20))  # DDP's default bucket_cap_mb
        return [Collective("all_reduce", "world", groups["world"], buckets, gradients, True)]
    found: dict[tuple[str, str], Collective] = {}

    def add(kind: str, group: str, calls: int, size: int, exact: bool = True) -> None:
        entry = found.setdefault((kind, group), Collective(kind, group, groups[group], 0, 0, exact))
        entry.calls += calls
        entry.bytes += calls * size

    reductions = 1 if gradient_sync == "step" else micro_batches
    for unit, gathered in fsdp_units(model, layout).items():
        group = "expert shard" if unit.startswith("experts") else "shard"
        size = len(groups[group])
        if size > 1:
            gathers = 1 if unit == "root" or not reshard_after_forward else 2
            add("all_gather", group, gathers * micro_batches, gathered * compute_bytes)
            add("reduce_scatter", group, reductions, gathered * 4)
        if layout.hsdp > 1:
            add("all_reduce", "replicas", 1, gathered // size * 4)
    if layout.ep > 1:
        config = model.config
        moe_layers = sum(isinstance(layer.mlp, MoEFeedForward) for layer in model.model.layers)
        per_layer = 4 + (2 if activation_checkpointing != "none" else 0)
        add("all_to_all", "expert parallel", per_layer * moe_layers * micro_batches,
            tokens * config.num_experts_per_tok * config.hidden_size * compute_bytes, exact=False)
    return list(found.values())


def plan_step(model: torch.nn.Module, layout: Layout, micro_batch: int, seq_len: int, micro_batches: int, dtype: str,
              links: Links, gradient_sync: str = "micro-batch", reshard_after_forward: bool = True,
              activation_checkpointing: str = "none") -> StepPlan:
    if links.gpu not in GPUS:
        raise MoeifyError(f"--gpu {links.gpu} is not known; choose one of {', '.join(GPUS)}")
    tokens = micro_batch * seq_len
    found = collectives(model, layout, micro_batches, tokens, 2 if dtype == "bf16" else 4, gradient_sync,
                        reshard_after_forward, activation_checkpointing)
    for entry in found:
        one_node = len({rank // links.gpus_per_node for rank in entry.ranks}) == 1
        entry.link = "intra" if one_node else "inter"
        rate = (links.intra_gbps if one_node else links.inter_gbps) * 1e9 / 8
        share = (len(entry.ranks) - 1) / len(entry.ranks)
        entry.seconds = LINK_FACTOR[entry.kind] * share * entry.bytes / rate
    step_tokens = tokens * micro_batches
    model_flops = step_tokens * flops_per_token(model, seq_len)
    hardware_flops = model_flops + (step_tokens * 2 * active_matmul_params(model) if activation_checkpointing != "none" else 0)
    peak = GPUS[links.gpu][dtype] * 1e12
    compute = hardware_flops / peak
    communication = sum(entry.seconds for entry in found)
    overlapped, serial = max(compute, communication), compute + communication
    return StepPlan(found, step_tokens, model_flops, hardware_flops, compute, communication, overlapped, serial,
                    model_flops / (peak * overlapped), model_flops / (peak * serial))


def describe_step(plan: StepPlan, links: Links, dtype: str, micro_batches: int) -> list[str]:
    lines = [(f"communication per optimizer step, rank 0 ({micro_batches} micro-batch{'es' if micro_batches > 1 else ''}; "
              f"{links.gpus_per_node} GPUs a node, links {links.intra_gbps:g} Gb/s within a node, {links.inter_gbps:g} Gb/s across):")]
    if not plan.collectives:
        lines.append("  none (one process)")
    for entry in plan.collectives:
        ranks = str(entry.ranks) if len(entry.ranks) <= 4 else f"({entry.ranks[0]}, {entry.ranks[1]}, ..., {entry.ranks[-1]})"
        mark = "" if entry.exact else "*"
        lines.append(f"  {entry.kind.replace('_', '-'):<15}{entry.group:<16}{len(entry.ranks):>4} ranks {ranks:<22}{entry.link:<6}"
                     f"{entry.calls:>6} calls {entry.bytes / 1e9:10.2f} GB{mark} {entry.seconds * 1e3:9.1f} ms")
    estimate = any(not entry.exact for entry in plan.collectives)
    lines += [(f"compute: {plan.tokens} tokens a rank, {plan.model_flops / 1e12:.1f} TFLOP of model FLOPs ({plan.hardware_flops / 1e12:.1f} "
               f"with recomputation) at {links.gpu.upper()} {dtype} peak {GPUS[links.gpu][dtype]:g} TFLOP/s: {plan.compute_s * 1e3:.0f} ms"),
              (f"step time at best: {plan.step_s_overlapped * 1e3:.0f} ms with communication hidden behind compute "
               f"(MFU ceiling {plan.mfu_overlapped:.1%}), {plan.step_s_serial * 1e3:.0f} ms with none hidden ({plan.mfu_serial:.1%})"),
              ("  * all-to-all: balanced routing, nothing dropped; the rest is exact (see moeify/plan_communication.py)" if estimate
               else "  bytes are exact; times are ceilings at line rate and peak FLOPs (see moeify/plan_communication.py)")]
    return lines
