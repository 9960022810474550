"""The device mesh and the model's parallel layout: FSDP2, HSDP and expert parallelism (torchtitan's way).

Ranks form a mesh seen two ways, (replicate, shard) and (replicate, expert_shard, ep) with
shard = expert_shard x ep:
- dense parameters (attention, norms, embeddings, routers) are sharded by FSDP2 over `shard` and,
  with --hsdp R, replicated over `replicate` (HSDP: all-gathers stay inside a shard group);
- with --ep N, each expert-parallel group of N consecutive ranks splits the experts (a DTensor
  sharded on the expert dimension over `ep`), and FSDP2 shards each rank's experts over
  `expert_shard` (and replicates them over `replicate`).
FSDP2 shards every parameter on a dimension its group size divides (`even_shard`), so expert
tensors [E, 2F, D] are not padded when there are more ranks than experts.
"""

import math
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Shard

from moeify.errors import MoeifyError
from moeify.modeling.expert_parallel import ExpertParallel
from moeify.modeling.hf import MoEFeedForward
from moeify.train.distributed import DistEnv

EXPERT_PARAMS = ("gate_up_proj", "down_proj")


@dataclass(frozen=True)
class Layout:
    world: int
    ep: int = 1  # expert-parallel group size
    hsdp: int = 1  # replicas (HSDP); each holds a full copy sharded over world / hsdp ranks
    parallel: str = "fsdp"  # fsdp | ddp

    @property
    def shard(self) -> int:
        return self.world // self.hsdp

    @property
    def expert_shard(self) -> int:
        return self.shard // self.ep

    def describe(self) -> str:
        if self.world == 1:
            return "one process"
        if self.parallel == "ddp":
            return f"DDP over {self.world}"
        parts = [f"FSDP2 over {self.shard}"] + ([f"HSDP x{self.hsdp}"] if self.hsdp > 1 else []) + ([f"EP {self.ep}"] if self.ep > 1 else [])
        return ", ".join(parts)


def check_layout(layout: Layout) -> None:
    """One-line errors for layouts the mesh cannot take, before anything is built."""
    if layout.world % layout.hsdp:
        raise MoeifyError(f"--hsdp {layout.hsdp} must divide the {layout.world} ranks; choose a divisor of {layout.world}")
    if layout.shard % layout.ep:
        raise MoeifyError(f"--ep {layout.ep} must divide the {layout.shard} ranks of a shard group (ranks / --hsdp); "
                          f"choose a divisor of {layout.shard}")
    if (layout.ep > 1 or layout.hsdp > 1) and layout.parallel != "fsdp":
        raise MoeifyError(f"--ep and --hsdp shard with FSDP2; use --parallel fsdp, not {layout.parallel}")


def check_experts(layout: Layout, num_experts: int | None) -> None:
    """--ep against the model's experts (None: a dense model)."""
    if layout.ep > 1:
        if num_experts is None:
            raise MoeifyError(f"--ep {layout.ep} splits the experts of an MoE; this model is dense: drop --ep")
        if num_experts % layout.ep:
            raise MoeifyError(f"--ep {layout.ep} must divide the {num_experts} experts; choose a divisor of {num_experts}")


@dataclass(frozen=True)
class Meshes:
    dense: DeviceMesh  # FSDP2 of the dense parameters: (replicate, shard) or (shard)
    experts: DeviceMesh  # FSDP2 of each rank's experts: (replicate, expert_shard) or (expert_shard)
    ep: DeviceMesh  # the expert-parallel group


def make_meshes(env: DistEnv, layout: Layout) -> Meshes:
    """Two views of one world mesh: (replicate, shard) and (replicate, expert_shard, ep)."""
    world = init_device_mesh(env.device.type, (layout.world,), mesh_dim_names=("world",))
    dense = world._unflatten(0, (layout.hsdp, layout.shard), ("replicate", "shard"))
    expert = world._unflatten(0, (layout.hsdp, layout.expert_shard, layout.ep), ("replicate", "expert_shard", "ep"))
    if layout.hsdp > 1:
        return Meshes(dense, expert["replicate", "expert_shard"], expert["ep"])
    return Meshes(dense["shard"], expert["expert_shard"], expert["ep"])


def shard_dim(shape: tuple[int, ...], group_size: int, split_over_experts: bool = False) -> int:
    """The dimension FSDP2 shards a tensor of `shape` (its local shape) on: the first one `group_size`
    divides, dimension 0 preferred (not dimension 0 for expert tensors already split over the
    experts), else the first candidate, padded."""
    dims = [d for d in range(len(shape)) if not (split_over_experts and d == 0)]
    even = [d for d in dims if shape[d] % group_size == 0]
    return even[0] if even else dims[0]


def local_elements(shape: tuple[int, ...], layout: Layout, expert: bool) -> tuple[int, int]:
    """(padded, rank-0) elements of one tensor of `shape` on one rank in `layout`: an expert tensor under EP
    holds E / ep experts, sharded over the expert-shard group; FSDP2 pads the sharded dimension."""
    if layout.world == 1 or layout.parallel == "ddp":
        return math.prod(shape), math.prod(shape)
    shape, group = list(shape), layout.shard
    split = expert and layout.ep > 1
    if split:
        shape[0] //= layout.ep
        group = layout.expert_shard
    dim = shard_dim(tuple(shape), group, split)
    rest = math.prod(shape) // shape[dim]
    chunk = math.ceil(shape[dim] / group)
    return chunk * rest, min(chunk, shape[dim]) * rest


def even_shard(group_size: int):
    """FSDP2's shard_placement_fn for groups of `group_size` ranks (see shard_dim)."""

    def placement(param: nn.Parameter) -> Shard:
        split = isinstance(param, DTensor)
        return Shard(shard_dim(tuple(param.to_local().shape if split else param.shape), group_size, split))

    return placement


def _split_experts(block: MoEFeedForward, ep_mesh: DeviceMesh) -> None:
    """Make the expert tensors DTensors sharded over the experts on the `ep` mesh (no communication:
    each rank keeps its own chunk)."""
    experts = block.block.experts
    for name in EXPERT_PARAMS:
        full = getattr(experts, name)
        local = full.detach().chunk(ep_mesh.size())[ep_mesh.get_local_rank()]
        sharded = DTensor.from_local(local, ep_mesh, [Shard(0)], run_check=False, shape=full.shape, stride=full.stride())
        setattr(experts, name, nn.Parameter(sharded, requires_grad=full.requires_grad))
    experts.parallel = ExpertParallel(ep_mesh.get_group(), ep_mesh.size(), ep_mesh.get_local_rank())


def wrap_model(model: nn.Module, env: DistEnv, layout: Layout, dtype: torch.dtype = torch.float32,
               reshard_after_forward: bool = True, moe_blocks_alone: bool = False) -> nn.Module:
    """The model in its parallel layout: unchanged on one rank, DDP, or FSDP2 (with HSDP and EP)."""
    if not env.distributed:
        return model
    if layout.parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[env.device] if env.device.type == "cuda" else None)
    return parallelize(model, env, layout, dtype, reshard_after_forward, moe_blocks_alone)


def parallelize(model: nn.Module, env: DistEnv, layout: Layout, dtype: torch.dtype = torch.float32,
                reshard_after_forward: bool = True, moe_blocks_alone: bool = False) -> nn.Module:
    """FSDP2 per decoder layer, then the root; experts split and sharded first under EP.
    `moe_blocks_alone` (--layerwise, which runs the MoE blocks without their layers): each MoE block is
    an FSDP2 unit of its own inside its layer.

    Master weights, gradients and optimizer state stay fp32; with bf16, FSDP2 gathers the
    parameters in bf16 for compute and reduces gradients in fp32."""
    meshes = make_meshes(env, layout)
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    for layer in model.model.layers:
        if layout.ep > 1 and isinstance(layer.mlp, MoEFeedForward):
            _split_experts(layer.mlp, meshes.ep)
            experts = layer.mlp.block.experts
            # The routing weights reach the experts as they are (no cast to the compute dtype).
            expert_policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)
            fully_shard(experts, mesh=meshes.experts, mp_policy=expert_policy, reshard_after_forward=reshard_after_forward,
                        shard_placement_fn=even_shard(layout.expert_shard))
            # An expert's gradient already sums the whole EP group's tokens (through the all-to-all);
            # averaging over the world, like every other parameter, needs the world as divisor.
            experts.set_gradient_divide_factor(float(layout.world))
            experts.set_force_sum_reduction_for_comms(True)  # sum, then divide: gloo has no pre-scaled sum
        if moe_blocks_alone and isinstance(layer.mlp, MoEFeedForward):
            fully_shard(layer.mlp, mesh=meshes.dense, mp_policy=policy, reshard_after_forward=reshard_after_forward,
                        shard_placement_fn=even_shard(layout.shard))
        fully_shard(layer, mesh=meshes.dense, mp_policy=policy, reshard_after_forward=reshard_after_forward,
                    shard_placement_fn=even_shard(layout.shard))
    fully_shard(model, mesh=meshes.dense, mp_policy=policy, shard_placement_fn=even_shard(layout.shard))
    return model


def shard_frozen(model: nn.Module, env: DistEnv, layout: Layout, dtype: torch.dtype) -> nn.Module:
    """A frozen model (a distillation teacher) beside the student: under FSDP2 each decoder layer is sharded
    over the student's dense mesh and gathered in the compute dtype for its forward only; embeddings and
    the final norm stay whole. Unchanged on one rank and under DDP (replicated)."""
    if not env.distributed or layout.parallel != "fsdp":
        return model
    meshes = make_meshes(env, layout)
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    for layer in model.model.layers:
        fully_shard(layer, mesh=meshes.dense, mp_policy=policy, reshard_after_forward=True, shard_placement_fn=even_shard(layout.shard))
    return model


@contextmanager
def gradient_reductions(model: nn.Module, last: bool, sync: str = "micro-batch") -> Iterator[None]:
    """The gradient communication of one micro-batch's backward. DDP all-reduces and HSDP all-reduces across
    replicas only after the step's last micro-batch (the rest accumulate locally: same memory). FSDP2
    reduce-scatters every micro-batch with `sync="micro-batch"` (sharded gradients: least memory) or, with
    "step", keeps unsharded gradients until the last one (the whole model's gradients unsharded; 1/accum of
    the gradient traffic)."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        with nullcontext() if last else model.no_sync():
            yield
        return
    if isinstance(model, FSDPModule):
        if sync == "step":
            model.set_requires_gradient_sync(last)
        model.set_requires_all_reduce(last)  # without replicas FSDP2 has no all-reduce to defer
    yield


def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """The global gradient norm (clipped to max_norm): parameters on different meshes (dense, experts)
    have their norms computed apart, then combined."""
    groups: dict[object, list[torch.Tensor]] = {}
    for param in params:
        groups.setdefault(param.device_mesh if isinstance(param, DTensor) else None, []).append(param)
    norms = []
    for group in groups.values():
        norm = torch.nn.utils.get_total_norm([p.grad for p in group])
        norms.append(norm.full_tensor() if isinstance(norm, DTensor) else norm)
    total = torch.stack(norms).norm()
    for group in groups.values():
        torch.nn.utils.clip_grads_with_norm_(group, max_norm, total)
    return total


def local_bytes(tensors) -> int:
    """Bytes this rank holds for `tensors` (their local shards), padding included: FSDP2 pads a shard
    inside its storage, so storages are counted, each once."""
    storages = {}
    for tensor in tensors:
        local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
        storages[local.untyped_storage().data_ptr()] = local.untyped_storage().nbytes()
    return sum(storages.values())


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return local_bytes(v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v) and v.dim() > 0)
