"""Training set-up: option checks, trainable parameters, optimizer, schedule, reference losses."""

import math
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from moeify.checkpoint.manifest import Manifest
from moeify.checkpoint.resolve import resolve_model
from moeify.data.packed import PackedDataset
from moeify.errors import MoeifyError
from moeify.modeling.hf import MoEFeedForward
from moeify.schema import is_given, validate
from moeify.train.config import TrainConfig
from moeify.train.distributed import DistEnv
from moeify.train.heldout import heldout_losses


def check_config(config: TrainConfig, env: DistEnv) -> None:
    validate(config, "the training settings")
    if config.from_dense and is_given(config, "model", TrainConfig.model):
        raise MoeifyError(f"--from-dense {config.from_dense} builds the model; --model {config.model} would be ignored: give one of them")
    if config.resume and config.force:
        raise MoeifyError("--resume continues the run in --out and --force starts it afresh: give one of them")
    if config.micro_batch < 1 or config.batch_size % (config.micro_batch * env.world_size):
        raise MoeifyError(
            f"--batch-size {config.batch_size} must be a multiple of --micro-batch {config.micro_batch} "
            f"x {env.world_size} rank(s)"
        )
    if config.dynamic and config.eval_every < 1:
        raise MoeifyError("--dynamic updates the domain weights at each evaluation; set --eval-every N (N > 0)")
    if config.capacity_factor is not None and config.capacity_factor <= 0:
        raise MoeifyError(f"--capacity-factor must be positive, got {config.capacity_factor}")
    if config.keep_checkpoints < 1:
        raise MoeifyError("--keep-checkpoints must be at least 1")
    if config.distill and config.layerwise:
        raise MoeifyError("--layerwise and --distill are two stages: run --layerwise, then --distill with --model RUN/model")
    teacher_flags = ("distill_alpha", "distill_temperature") if config.layerwise else ("teacher", "distill_alpha", "distill_temperature")
    if not config.distill:
        for name in teacher_flags:
            if is_given(config, name, getattr(TrainConfig, name)):
                flag = "--" + name.replace("_", "-")
                also = " or --layerwise" if name == "teacher" else ""
                raise MoeifyError(f"{flag} is read with --distill{also}; add --distill or drop {flag}")
    trainable_parts(config.trainable)
    if is_given(config, "gradient_sync", TrainConfig.gradient_sync) and (not env.distributed or config.parallel != "fsdp"):
        where = "one process has no gradient communication" if not env.distributed else "DDP always all-reduces once per step"
        raise MoeifyError(f"--gradient-sync chooses when FSDP2 reduce-scatters; {where}: drop --gradient-sync")
    if config.layerwise:
        if env.distributed and config.parallel != "fsdp":
            raise MoeifyError("--layerwise runs the MoE blocks on their own, which DDP cannot reduce; use --parallel fsdp")
        if config.activation_checkpointing != "none":
            raise MoeifyError("--layerwise keeps only the MoE blocks' activations; drop --activation-checkpointing")
        if is_given(config, "loss_chunk", TrainConfig.loss_chunk):
            raise MoeifyError("--loss-chunk is read by the output projection, which --layerwise does not run; drop --loss-chunk")


TRAINABLE_MODES = ("all", "moe", "frozen-router")
MOE_PARTS = ("router", "experts", "shared")


def trainable_parts(trainable: str) -> set[str] | None:
    """The MoE-block parts a `--trainable` list names (None for all, moe and frozen-router)."""
    if trainable in TRAINABLE_MODES:
        return None
    parts = {p.strip() for p in trainable.split(",") if p.strip()}
    if not parts or parts - set(MOE_PARTS):
        raise MoeifyError(f"--trainable {trainable!r}: give one of {', '.join(TRAINABLE_MODES)} or a comma list of {', '.join(MOE_PARTS)}")
    return parts


def _block_parts(block: MoEFeedForward) -> dict[str, list[torch.nn.Module]]:
    shared = [m for m in (block.shared_expert, block.shared_expert_gate) if m is not None]
    return {"router": [block.block.router], "experts": [block.block.experts], "shared": shared}


def set_trainable(model: torch.nn.Module, blocks: list[MoEFeedForward], trainable: str, moe_only: bool = False) -> None:
    """`moe_only` (--layerwise): nothing outside the MoE blocks trains, whatever --trainable says."""
    if trainable != "all" and not blocks:
        raise MoeifyError(f"--trainable {trainable} needs an MoE model; this one is dense")
    parts = trainable_parts(trainable)
    if parts is not None and "shared" in parts and not any(b.shared_expert is not None for b in blocks):
        raise MoeifyError(f"--trainable {trainable}: this MoE has no shared expert; drop shared")
    if trainable == "moe" or moe_only or parts is not None:
        model.requires_grad_(False)
        for block in blocks:
            block.requires_grad_(parts is None)
            for part in parts or ():
                for module in _block_parts(block)[part]:
                    module.requires_grad_(True)
    if trainable == "frozen-router":
        for block in blocks:
            block.block.router.requires_grad_(False)


def make_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices only (not on norms, biases or the selection bias)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    # One kernel for the whole update; on CPU 5.3x faster than the foreach update for SmolLM2 8x top-2,
    # whose update (E/k times the active parameters) took a fifth of the step (BENCHMARKS.md, training throughput).
    fused = all(p.device.type in ("cuda", "cpu") for p in params)
    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2), fused=fused or None)


def make_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up to lr, then cosine decay to lr * min_lr_ratio at the last step."""
    warmup = min(config.warmup_steps, steps)

    def factor(step: int) -> float:  # step = optimizer steps taken so far
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def reference_losses(config: TrainConfig, model_dir: Path, data: PackedDataset, env: DistEnv) -> dict[str, float]:
    """Per-domain reference losses for dynamic sampling: given, or measured on the reference model."""
    if config.reference_losses:
        values = {}
        for part in config.reference_losses.split(","):
            domain, _, value = part.partition("=")
            try:
                values[domain.strip()] = float(value)
            except ValueError:
                raise MoeifyError(f"--reference-losses {config.reference_losses!r}: write a=2.1,b=3.0") from None
            if not math.isfinite(values[domain.strip()]):
                raise MoeifyError(f"--reference-losses {config.reference_losses!r}: {domain.strip()}'s loss is not a finite number")
        if set(values) != set(data.domains):
            raise MoeifyError(f"--reference-losses must name exactly the domains: {', '.join(data.domains)}")
        return values
    reference = config.reference_model
    manifest = Manifest.read(model_dir)
    if reference is None and manifest is not None:
        reference = manifest.source_path
    if reference is None:
        raise MoeifyError("--dynamic needs reference losses: give --reference-losses or --reference-model")
    model = AutoModelForCausalLM.from_pretrained(resolve_model(reference), dtype=torch.float32).to(env.device)
    losses = heldout_losses(model, data, config.eval_blocks, config.micro_batch)
    del model
    return losses
