"""One optimizer step: gradient accumulation, router losses, clipping, and the step's metrics.

Every statistic stays on the model's device and is reduced across ranks in one collective; the
host sees the step's numbers in one transfer, after the backward passes (it needs the loss there
to skip a non-finite step). Nothing in the micro-steps waits for the GPU.
"""

import math
from collections.abc import Callable

import torch

from moeify.evaluate.scoring import autocast_for
from moeify.modeling.hf import MoEFeedForward
from moeify.train.config import TrainConfig
from moeify.train.distributed import DistEnv, all_reduce_sum
from moeify.train.heldout import sequence_losses
from moeify.train.parallelize import clip_grad_norm, gradient_reductions, local_bytes
from moeify.train.layerwise import layerwise_errors
from moeify.train.teacher import Teacher, distill_losses

MicroBatch = tuple[torch.Tensor, torch.Tensor]  # token ids [B, S] and each sequence's domain index [B], on the device


def router_losses(blocks: list[MoEFeedForward], kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Switch loss averaged over layers (Mixtral's convention); LLaMA-MoE's CV^2 summed over layers."""
    z_loss = torch.stack([b.last.z_loss for b in blocks]).mean()
    balance = torch.stack([b.last.balance_loss for b in blocks])
    return (balance.sum() if kind == "cv2" else balance.mean()), z_loss


def _flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def _unflat(flat: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    return [part.view(t.shape) for part, t in zip(flat.split([t.numel() for t in like]), like)]


def reduce_stats(tensors: list[torch.Tensor], env: DistEnv) -> list[torch.Tensor]:
    """Sum each tensor over the ranks with one collective, on the tensors' own device."""
    flat = _flat(tensors)
    all_reduce_sum(flat, env)
    return _unflat(flat, tensors)


def _micro_step(model: torch.nn.Module, blocks: list[MoEFeedForward], ids: torch.Tensor, config: TrainConfig, teacher: Teacher | None,
                accum: int, device: torch.device, dtype: torch.dtype, moe_stats: torch.Tensor, load: torch.Tensor,
                layer_error: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Forward and backward of one micro-batch (its gradient divided by `accum`), MoE statistics added in place.
    Returns each sequence's loss, KL and teacher CE (fp64, detached; None where not computed)."""
    with autocast_for(device, dtype):
        seq_kl = seq_teacher = None
        if config.layerwise:
            error_BL = layerwise_errors(model, teacher, ids)
            layer_error += error_BL.detach().double().sum(0)
            seq_loss = error_BL.mean(1)
            loss = seq_loss.mean()
        elif teacher is None:
            seq_loss = sequence_losses(model, ids)
            loss = seq_loss.mean()
        else:
            objective, seq_loss, seq_kl, seq_teacher = distill_losses(model, teacher, ids, config.distill_alpha,
                                                                      config.distill_temperature).unbind(dim=1)
            loss = objective.mean()
    if blocks:
        balance, z_loss = router_losses(blocks, config.balance_loss)
        loss = loss + config.balance_coef * balance + config.z_loss_coef * z_loss
        moe_stats += torch.stack([balance.detach().double(), z_loss.detach().double(),
                                  torch.stack([b.last.dropped for b in blocks]).sum().double(),
                                  torch.stack([b.last.entropy for b in blocks]).double().mean()])
        load += torch.stack([b.last.load_E for b in blocks]).double()
    (loss / accum).backward()
    return tuple(None if t is None else t.detach().double() for t in (seq_loss, seq_kl, seq_teacher))


def train_step(model: torch.nn.Module, blocks: list[MoEFeedForward], optimizer: torch.optim.Optimizer,
               next_micro_batch: Callable[[], MicroBatch], num_domains: int, config: TrainConfig, env: DistEnv, accum: int,
               dtype: torch.dtype = torch.float32, measure_bytes: bool = False, teacher: Teacher | None = None,
               stop_requested: bool = False) -> dict:
    """`measure_bytes` adds the bytes this rank holds for gradients (before they are freed). `stop_requested`
    (this rank got SIGTERM) travels with the step's statistics: `_stop` is true on every rank if any got it. With a teacher
    the objective is alpha tau^2 KL + (1 - alpha) CE; `loss` stays the next-token CE (comparable with any
    run), `distill_loss` is the objective. With --layerwise, `loss` is the MoE blocks' mean relative squared
    error and `layer_loss` that error per MoE layer."""
    device = env.device
    stat = dict(dtype=torch.float64, device=device)
    alpha, tau = config.distill_alpha, config.distill_temperature
    domain_stats = torch.zeros(num_domains, 4, **stat)  # per domain: sums of sequence CE, sequences, KL, teacher CE
    moe_stats = torch.zeros(4, **stat)  # sums of balance loss, z-loss, dropped assignments, router entropy
    load = torch.zeros(len(blocks), blocks[0].block.router.num_experts if blocks else 0, **stat)
    layer_error = torch.zeros(len(blocks) if config.layerwise else 0, **stat)  # sums over sequences
    for micro in range(accum):
        ids, domain_B = next_micro_batch()
        with gradient_reductions(model, micro == accum - 1, config.gradient_sync):  # forward and backward alike
            seq_loss, seq_kl, seq_teacher = _micro_step(model, blocks, ids, config, teacher, accum, device, dtype, moe_stats, load,
                                                        layer_error)
        zeros = torch.zeros_like(seq_loss, **stat)
        columns = [seq_loss, torch.ones_like(seq_loss, **stat), zeros if seq_kl is None else seq_kl, zeros if seq_teacher is None else seq_teacher]
        domain_stats.index_add_(0, domain_B, torch.stack(columns, dim=1))
    stop = torch.tensor([float(stop_requested)], **stat)
    domain_stats, moe_stats, load, layer_error, stop = reduce_stats([domain_stats, moe_stats, load, layer_error, stop], env)
    grad_norm = clip_grad_norm([p for p in model.parameters() if p.grad is not None],
                               config.grad_clip if config.grad_clip > 0 else float("inf"))
    on_device = [domain_stats, moe_stats, load, layer_error, grad_norm.reshape(1).double(), stop]
    domain_host, moe_host, load_host, layer_host, norm_host, stop_host = _unflat(_flat(on_device).cpu(), on_device)  # the one transfer
    sequences = domain_host[:, 1].sum()
    loss_value = (domain_host[:, 0].sum() / sequences).item()
    record = {"loss": loss_value, "grad_norm": norm_host.item(), "_domain_stats": domain_host, "_stop": stop_host.item() > 0}
    if config.layerwise:
        record["layer_loss"] = (layer_host / sequences).tolist()
    elif teacher is not None:
        kl = (domain_host[:, 2].sum() / sequences).item()
        record.update(distill_loss=(1 - alpha) * loss_value + alpha * tau**2 * kl, kd_loss=kl,
                      teacher_ce=(domain_host[:, 3].sum() / sequences).item())
    if math.isfinite(record.get("distill_loss", loss_value)):
        optimizer.step()
    if measure_bytes:
        record["_gradient_bytes"] = local_bytes(p.grad for p in model.parameters() if p.grad is not None)
    optimizer.zero_grad(set_to_none=True)
    if blocks:
        micro_steps = accum * env.world_size
        assignments = load_host.sum(dim=1, keepdim=True)
        record.update(balance_loss=moe_host[0].item() / micro_steps, z_loss=moe_host[1].item() / micro_steps,
                      dropped_tokens=int(moe_host[2].item()), dropped_fraction=moe_host[2].item() / max(1.0, assignments.sum().item()),
                      router_entropy=moe_host[3].item() / micro_steps, expert_load=(load_host / assignments).tolist(), _load=load)
    return record
