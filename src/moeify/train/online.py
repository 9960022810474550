"""Online upcycling (Llama 3 Meets MoE, NeMo): build the MoE inside the training job.

The MoE is created on the meta device and sharded with FSDP2 before any weight exists; each rank
then allocates only its own shards and fills them from the same per-layer construction `build`
uses (construct/plan.py), reading only the dense rows and computing only the experts it holds.
Every method, option, router and format of `build` works here; data-driven methods take their
partition from a `moeify split` file. The weights are bit-identical to `moeify build`.
"""

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
from transformers import AutoModelForCausalLM

from moeify.checkpoint.dense import DenseCheckpoint
from moeify.checkpoint.formats import OutputFormat, choose_format
from moeify.checkpoint.manifest import Manifest
from moeify.construct import ConstructionConfig, ConstructionPlan
from moeify.errors import MoeifyError, same_on_every_rank
from moeify.modeling.canonical import DOWN, GATE_UP
from moeify.modeling.hf import MoEFeedForward, attach_moe_blocks, moe_layers
from moeify.schema import to_flat
from moeify.train.distributed import DistEnv
from moeify.train.parallelize import Layout, check_experts, wrap_model


@dataclass
class OnlineBuild:
    model: nn.Module
    blocks: list[MoEFeedForward]
    manifest: Manifest


def plan_online(dense: DenseCheckpoint, construction: ConstructionConfig, source: str, env: DistEnv, layout: Layout) -> tuple[ConstructionPlan, OutputFormat, str]:
    """Every check that can fail, before any weight is allocated or any training step runs."""
    plan = ConstructionPlan.make(dense, construction, source, progress=False, compute_partition=False)
    fmt, format_name = choose_format(dense.config, plan.features, plan.config.format)
    if env.distributed and layout.parallel != "fsdp":
        raise MoeifyError("online upcycling shards the MoE with FSDP2; use --parallel fsdp")
    check_experts(layout, plan.num_experts)
    needed = [f"model.layers.{layer}.mlp.{proj}.weight" for layer in range(dense.num_layers) for proj in ("gate_proj", "up_proj", "down_proj")]
    needed += ["model.embed_tokens.weight", "model.norm.weight"]
    missing = dense.missing(needed)
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise MoeifyError(f"the dense checkpoint {dense.path} lacks {', '.join(missing[:3])}{more}; re-download or re-convert it")
    if env.distributed:
        settings = [None] * env.world_size
        dist.all_gather_object(settings, sorted(to_flat(construction).items()))
        if any(s != settings[0] for s in settings):
            differ = sorted({k for s in settings for k, v in s if (k, v) not in settings[0]})
            raise same_on_every_rank(MoeifyError(f"ranks disagree on the construction settings ({', '.join(differ)}); give every rank the same flags"))
    return plan, fmt, format_name


def build_online(dense: DenseCheckpoint, construction: ConstructionConfig, source: str, env: DistEnv, layout: Layout,
                 dispatch: str, noisy: bool, capacity_factor: float | None,
                 before_sharding=lambda model, blocks: None, dtype: torch.dtype = torch.float32,
                 reshard_after_forward: bool = True, moe_blocks_alone: bool = False) -> OnlineBuild:
    """The MoE model, sharded (FSDP2) when there are several ranks, weights filled from `dense`.

    `before_sharding(model, blocks)` runs on the meta-device model (freezing, activation checkpointing).
    """
    plan, fmt, format_name = plan_online(dense, construction, source, env, layout)
    config = fmt.make_config(dense.config, plan.num_experts, plan.top_k, plan.expert_size, plan.features)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        blocks = attach_moe_blocks(model, dispatch, noisy, capacity_factor, gate=plan.config.router.gate,
                                   shared=plan.features.shared_size > 0)
    before_sharding(model, blocks)
    model = wrap_model(model, env, layout, dtype, reshard_after_forward, moe_blocks_alone)
    model.to_empty(device=env.device)
    if not env.distributed:
        model.tie_weights()  # to_empty on an unsharded model unties shared parameters (FSDP2 keeps them)
    _fill(model, dense, plan, fmt)
    rotary = model.model.rotary_emb  # its inv_freq buffers are not saved, so recompute them
    model.model.rotary_emb = type(rotary)(config=model.config).to(env.device)
    return OnlineBuild(model, blocks, plan.manifest(dense, source, fmt.architecture, format_name).replace(built_online=True))


def local_box(tensor: torch.Tensor) -> tuple[torch.Tensor, tuple[slice, ...]]:
    """This rank's local tensor of a parameter or buffer, and where it lies in the global tensor
    (FSDP2 and expert parallelism shard on any dimension, torch.chunk style)."""
    if isinstance(tensor, DTensor):
        shape, offset = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh, tensor.placements)
        return tensor.to_local(), tuple(slice(o, o + n) for o, n in zip(offset, shape))
    return tensor.data, tuple(slice(0, n) for n in tensor.shape)


@torch.no_grad()
def _fill(model: nn.Module, dense: DenseCheckpoint, plan: ConstructionPlan, fmt: OutputFormat) -> None:
    moe_modules = moe_layers(model)
    moe_tensors = {id(t) for moe in moe_modules.values() for t in [*moe.parameters(), *moe.buffers()]}
    zeros = {name for layer in range(dense.num_layers) for name in fmt.zero_tensors(dense.config, layer)}
    for name, param in model.named_parameters():
        if id(param) in moe_tensors:
            continue
        local, box = local_box(param)
        if local.numel():
            local.copy_(torch.zeros_like(local) if name in zeros else plan.block(dense, name, box))
    for index, moe in moe_modules.items():  # one dense FFN in memory at a time
        layer = fmt.from_construction(plan.layer(dense, index), plan.expert_size)
        tensors = dict(moe.named_parameters()) | dict(moe.named_buffers())
        (gate_up, up_box), (down, down_box) = local_box(tensors.pop(GATE_UP)), local_box(tensors.pop(DOWN))
        assert up_box[0] == down_box[0], "both expert tensors are split over the same experts"
        experts = up_box[0]
        # Expert by expert, each made once for both tensors: at most one made expert beside the dense FFN.
        for row, (gate_up_full, down_full) in enumerate(layer.fused_experts(experts.start, experts.stop)):
            gate_up[row].copy_(gate_up_full[up_box[1:]])
            down[row].copy_(down_full[down_box[1:]])
        for name, tensor in tensors.items():
            local, box = local_box(tensor)
            if local.numel():
                local.copy_(layer.module_tensor(name, box[0].start, box[0].stop)[(slice(None), *box[1:])])
