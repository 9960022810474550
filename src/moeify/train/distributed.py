"""Process-group set-up (torchrun), precision, activation checkpointing and compilation; the parallel
layout (FSDP2, HSDP, EP, DDP) is train/parallelize.py."""

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from moeify.modeling.hf import MoEFeedForward


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed() -> DistEnv:
    """Read torchrun's environment; start a process group (NCCL on GPU, gloo on CPU) when there are several ranks."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        # On GPU, CPU tensors (object collectives, small host-side values) go over gloo, device tensors over NCCL.
        backend = "cuda:nccl,cpu:gloo" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    return DistEnv(rank, world_size, local_rank, device)


def shutdown_distributed(finished: bool = True) -> None:
    """End the process group. After a run every rank finished (`finished`), a barrier first: no rank
    tears down its gloo threads while another still has work in flight with it. After an error the
    other ranks may never arrive, so no barrier then."""
    if dist.is_initialized():
        if finished:
            dist.barrier()
        dist.destroy_process_group()


def training_dtype(name: str, device: torch.device) -> torch.dtype:
    """--dtype: bf16 | fp32 | auto (bf16 on GPU, fp32 on CPU)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[name]


# Selective activation checkpointing keeps what is expensive to recompute (matmuls, grouped GEMMs,
# attention) and recomputes the cheap elementwise work (norms, SiLU, residual adds) in the backward.
_SAVED_OPS = {getattr(torch.ops.aten, name).default for name in (
    "mm", "addmm", "bmm", "_grouped_mm", "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_cudnn_attention") if hasattr(torch.ops.aten, name)}


def _selective_policy(ctx, op, *args, **kwargs):
    from torch.utils.checkpoint import CheckpointPolicy

    return CheckpointPolicy.MUST_SAVE if op in _SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _selective_context():
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    return create_selective_checkpoint_contexts(_selective_policy)


def enable_activation_checkpointing(model: nn.Module, mode: str) -> None:
    """none | full | selective, per decoder layer (through transformers' own checkpointing hook)."""
    if mode == "none":
        return
    kwargs = {"use_reentrant": False} | ({"context_fn": _selective_context} if mode == "selective" else {})
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x names
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def compile_layers(model: nn.Module, backend: str = "inductor", moe_blocks_alone: bool = False) -> None:
    """torch.compile each decoder layer in place (torchtitan's granularity; parameter names unchanged).
    The layers share one graph (dynamo inlines the modules); `backend="eager"` traces without code
    generation (the tests). `moe_blocks_alone` (--layerwise): each layer's MoE block instead."""
    for layer in model.model.layers:
        if not moe_blocks_alone:
            layer.compile(backend=backend)
        elif isinstance(layer.mlp, MoEFeedForward):
            layer.mlp.compile(backend=backend)


def all_reduce_sum(tensor: torch.Tensor, env: DistEnv) -> torch.Tensor:
    if env.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def gather_to_list(value, env: DistEnv) -> list:
    """Every rank's `value` (a small Python object), in rank order."""
    if not env.distributed:
        return [value]
    values = [None] * env.world_size
    dist.all_gather_object(values, value)
    return values
