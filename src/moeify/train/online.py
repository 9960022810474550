"""Online upcycling (Llama 3 Meets MoE, NeMo): build the MoE inside the training job.

The MoE is created on the meta device and sharded with FSDP2 before any weight exists; each rank
then allocates only its own shards and fills them from the dense safetensors, reading just the
rows it needs (the routed experts' FFN one layer at a time). No rank ever holds the full MoE.
The weights are bit-identical to `moeify build` with the same settings.
"""

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from transformers import AutoModelForCausalLM

from moeify.build import check_routing
from moeify.checkpoint.dense import DenseCheckpoint
from moeify.checkpoint.formats import architecture_for
from moeify.construct import ConstructionPlan, MethodOptions, get_method
from moeify.errors import MoeifyError
from moeify.modeling.hf import attach_moe_blocks
from moeify.modeling.router import RouterSpec
from moeify.train.distributed import DistEnv, wrap_model


@dataclass(frozen=True)
class OnlineSpec:
    method: str
    num_experts: int
    top_k: int
    seed: int
    router_std: float
    scale: float | None
    partition: str | None = None

    def plan(self, dense: DenseCheckpoint) -> ConstructionPlan:
        """Data-driven methods are read from a partition file, never computed here (on every rank)."""
        options = MethodOptions(method=self.method, num_experts=self.num_experts, seed=self.seed)
        if self.partition is None and not get_method(self.method).layerwise:
            return ConstructionPlan(get_method(self.method), options, dense.ffn_size)  # refused by check_online
        return ConstructionPlan.make(dense, options, Path(self.partition) if self.partition else None, progress=False)


def check_online(dense: DenseCheckpoint, spec: OnlineSpec, env: DistEnv, parallel: str) -> None:
    """Every check that can fail, before any weight is allocated or any training step runs."""
    check_routing(spec.num_experts, spec.top_k)
    plan = spec.plan(dense)
    if not plan.method.layerwise and plan.partition is None:
        raise MoeifyError(f"online upcycling with --method {spec.method} needs a partition: run `moeify split` and pass --partition")
    if env.distributed and parallel != "fsdp":
        raise MoeifyError("online upcycling shards the MoE with FSDP2; use --parallel fsdp")
    if spec.num_experts % env.world_size:
        raise MoeifyError(
            f"--experts {spec.num_experts} cannot be split evenly over {env.world_size} ranks; "
            f"choose a number of experts divisible by {env.world_size} or another number of ranks"
        )
    needed = [f"model.layers.{layer}.mlp.{proj}.weight" for layer in range(dense.num_layers) for proj in ("gate_proj", "up_proj", "down_proj")]
    needed += ["model.embed_tokens.weight", "model.norm.weight"]
    missing = dense.missing(needed)
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise MoeifyError(f"the dense checkpoint {dense.path} lacks {', '.join(missing[:3])}{more}; re-download or re-convert it")
    if env.distributed:
        seeds = [None] * env.world_size
        dist.all_gather_object(seeds, (spec.seed, spec.method, spec.num_experts, spec.top_k, spec.router_std, spec.scale))
        if len(set(seeds)) > 1:
            raise MoeifyError(f"ranks disagree on the construction settings (seed, method, E, k, std, scale): {seeds}; "
                              "give every rank the same flags")


def build_online(dense: DenseCheckpoint, spec: OnlineSpec, env: DistEnv, parallel: str, dispatch: str, noisy: bool,
                 capacity_factor: float | None, before_sharding=lambda model, blocks: None) -> tuple[nn.Module, list]:
    """The MoE model, sharded (FSDP2) when there are several ranks, weights filled from `dense`.

    `before_sharding(model, blocks)` runs on the meta-device model (freezing, activation checkpointing).
    """
    check_online(dense, spec, env, parallel)
    plan = spec.plan(dense)
    arch = architecture_for(dense.config)
    config = arch.make_config(dense.config, plan.num_experts, spec.top_k, plan.expert_size)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        blocks = attach_moe_blocks(model, dispatch, noisy, capacity_factor)
    before_sharding(model, blocks)
    model = wrap_model(model, env, parallel)
    model.to_empty(device=env.device)
    if not env.distributed:
        model.tie_weights()  # to_empty on an unsharded model unties shared parameters (FSDP2 keeps them)
    scale = plan.scale(spec.top_k, RouterSpec(), spec.scale)
    _fill_parameters(model, dense, spec, plan, scale, env)
    with torch.no_grad():
        for block in blocks:
            block.block.router.selection_bias.zero_()
    rotary = model.model.rotary_emb  # its inv_freq buffers are not saved, so recompute them
    model.model.rotary_emb = type(rotary)(config=model.config).to(env.device)
    return model, blocks


def _shard_rows(param: torch.Tensor, env: DistEnv) -> tuple[torch.Tensor, int]:
    """This rank's local tensor of a parameter and the global row its first row is."""
    if hasattr(param, "to_local"):  # DTensor sharded on dim 0 by FSDP2, torch.chunk style
        chunk = math.ceil(param.shape[0] / env.world_size)
        return param.to_local(), min(env.rank * chunk, param.shape[0])
    return param.data, 0


@torch.no_grad()
def _fill_parameters(model: nn.Module, dense: DenseCheckpoint, spec: OnlineSpec, plan: ConstructionPlan, scale: float,
                     env: DistEnv) -> None:
    cached_layer, ffn, groups = None, None, None
    for name, param in model.named_parameters():
        local, start = _shard_rows(param, env)
        stop = start + local.shape[0]
        if local.shape[0] == 0:
            continue
        if ".mlp.block." not in name:
            local.copy_(dense.rows(name, start, stop))
            continue
        layer = int(name.split(".")[2])
        if name.endswith("router.weight"):
            local.copy_(plan.router_weight(layer, dense.hidden_size, spec.router_std, plan.router_init("auto"), local.dtype)[start:stop])
        elif name.endswith("router.noise_weight"):
            local.zero_()
        else:
            if layer != cached_layer:  # one dense FFN in memory at a time
                cached_layer, ffn = layer, dense.ffn(layer)
                groups, _ = plan.layer(layer)
            for row, expert in enumerate(range(start, stop)):
                gate, up, down = plan.expert_weights(ffn, groups[expert], scale, layer, expert)
                local[row].copy_(torch.cat([gate, up]) if name.endswith("gate_up_proj") else down)
