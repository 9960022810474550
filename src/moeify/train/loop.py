"""`moeify train`: continual pre-training of a dense or MoE model on domain-weighted packed data."""

import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from moeify.construct import ConstructionConfig
from moeify.data.packed import PackedDataset
from moeify.errors import MoeifyError
from moeify.modeling.hf import MoEFeedForward
from moeify.train.checkpoint import save_checkpoint
from moeify.train.config import TrainConfig
from moeify.train.distributed import DistEnv, all_reduce_sum, gather_to_list
from moeify.train.export import export_stock
from moeify.evaluate.scoring import autocast_for
from moeify.train.heldout import heldout_losses, sequence_losses
from moeify.train.metrics import peak_rss_mb
from moeify.train.session import Session, open_session


@dataclass
class TrainResult:
    out: Path
    steps: int
    losses: list[float] = field(default_factory=list)  # training loss of each step run in this call
    heldout: dict[str, float] = field(default_factory=dict)  # final held-out loss per domain
    model_dir: Path | None = None
    finished: bool = False  # the whole token budget was trained
    is_main: bool = True  # this process is rank 0


def train(config: TrainConfig, construction: ConstructionConfig | None = None, progress: bool = True,
          stop_after_steps: int | None = None) -> TrainResult:
    """Run (or resume) training; `construction` says how --from-dense builds the MoE.
    `stop_after_steps` ends this call early, checkpointed, without changing the schedule (0: the initial weights)."""
    run = open_session(config, construction)
    result = TrainResult(run.out, run.start_step, is_main=run.env.is_main)
    end_step = run.steps if stop_after_steps is None else min(run.steps, run.start_step + stop_after_steps)
    if stop_after_steps == 0 and run.start_step == 0:
        run.last_checkpoint = _checkpoint(run, 0)
    bar = tqdm(total=run.steps, initial=run.start_step, desc="train", unit="step", disable=not (progress and run.env.is_main),
               file=sys.stderr)
    for step in range(run.start_step + 1, end_step + 1):
        record = _step(run, step)
        if "heldout_loss" in record:
            result.heldout = record["heldout_loss"]
        result.losses.append(record["loss"])
        result.steps = step
        bar.update(1)
        bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
        if (config.checkpoint_every and step % config.checkpoint_every == 0) or step == end_step:
            run.last_checkpoint = _checkpoint(run, step)
    bar.close()
    run.logger.close()
    result.finished = result.steps == run.steps
    if result.finished and config.export:
        training = {"steps": run.steps, "tokens": run.tokens_seen, "config": asdict(config), "heldout_loss": result.heldout}
        try:
            result.model_dir = export_stock(run.model, run.model_config, run.model_dir, run.out / "model", run.env, run.manifest, training)
        except MoeifyError as error:
            print(f"moeify: not exported: {error}; the resumable checkpoint is in {run.out / 'checkpoints'}", file=sys.stderr)
    return result


def _step(run: Session, step: int) -> dict:
    """One optimizer step, its metrics logged (and the held-out evaluation when due)."""
    config = run.config
    started = time.perf_counter()
    record = _train_step(run.model, run.blocks, run.optimizer, run.sampler, run.data, config, run.env, run.accum)
    if not math.isfinite(record["loss"]):
        raise MoeifyError(f"the loss became {record['loss']} at step {step}; training stopped, last good checkpoint: "
                          f"{run.last_checkpoint or 'none'}; lower --lr or check the data")
    lr = run.scheduler.get_last_lr()[0]  # the rate this step used
    run.scheduler.step()
    load = record.pop("_load", None)
    if config.bias_update_rate > 0:
        _update_selection_biases(run.blocks, load, config.bias_update_rate)
    elapsed = time.perf_counter() - started
    step_tokens = config.batch_size * run.data.seq_len
    run.tokens_seen += step_tokens
    record.update(step=step, tokens=run.tokens_seen, lr=lr, tokens_per_s=step_tokens / elapsed,
                  mfu=step_tokens * run.flops_per_token / elapsed / run.peak_flops if run.peak_flops else None,
                  domain_weights=run.sampler.weights, peak_rss_mb=gather_to_list(round(peak_rss_mb(), 1), run.env))
    if (config.eval_every and step % config.eval_every == 0) or step == run.steps:
        record["heldout_loss"] = heldout_losses(run.model, run.data, config.eval_blocks, config.micro_batch)
        if run.dynamic is not None and step < run.steps:
            run.sampler.set_weights(run.dynamic.update(run.sampler.weights, record["heldout_loss"]))
            record["domain_weights"] = run.sampler.weights
    if step % config.log_every == 0 or "heldout_loss" in record:
        run.logger.log(record)
    return record


def _checkpoint(run: Session, step: int) -> Path:
    trainer_state = {"step": step, "tokens": run.tokens_seen, "scheduler": run.scheduler.state_dict(),
                     "sampler": run.sampler.state_dict(), "identity": run.identity}
    return save_checkpoint(run.out, step, run.model, run.optimizer, trainer_state, run.env, run.config.keep_checkpoints)


def _train_step(model, blocks: list[MoEFeedForward], optimizer, sampler, data: PackedDataset, config: TrainConfig,
                env: DistEnv, accum: int) -> dict:
    domains = data.domains
    # Per domain: [sum of sequence losses, sequences]; then balance, z-loss, dropped, entropy sums.
    domain_stats = torch.zeros(len(domains), 2, dtype=torch.float64)
    moe_stats = torch.zeros(4, dtype=torch.float64)
    load = torch.zeros(len(blocks), blocks[0].block.router.num_experts if blocks else 0, dtype=torch.float64)
    for _ in range(accum):
        pairs = sampler.draw(config.micro_batch * env.world_size)  # the global micro-batch
        mine = pairs[env.rank * config.micro_batch : (env.rank + 1) * config.micro_batch]
        ids = torch.stack([data.block(d, i) for d, i in mine]).to(env.device)
        with autocast_for(env.device):
            seq_loss = sequence_losses(model, ids)
        loss = seq_loss.mean()
        if blocks:
            balance, z_loss = _router_losses(blocks, config.balance_loss)
            loss = loss + config.balance_coef * balance + config.z_loss_coef * z_loss
            # Gathered on the device and moved in one transfer: one host sync per micro-step, not per layer.
            step_stats = torch.stack([balance.detach().float(), z_loss.detach().float(),
                                      torch.stack([b.last.dropped for b in blocks]).sum().float(),
                                      torch.stack([b.last.entropy for b in blocks]).float().mean()])
            moe_stats += step_stats.double().cpu()
            load += torch.stack([b.last.load_E for b in blocks]).double().cpu()
        (loss / accum).backward()
        for (domain, _), value in zip(mine, seq_loss.detach().double().cpu()):
            domain_stats[domains.index(domain)] += torch.stack([value, torch.ones((), dtype=torch.float64)])
    for tensor in (domain_stats, moe_stats, load):
        all_reduce_sum(tensor, env)
    grad_norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None],
                                               config.grad_clip if config.grad_clip > 0 else float("inf"))
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
    loss_value = (domain_stats[:, 0].sum() / domain_stats[:, 1].sum()).item()
    if math.isfinite(loss_value):
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    record = {"loss": loss_value, "grad_norm": grad_norm.item(),
              "domain_loss": {d: (s / n).item() for d, (s, n) in zip(domains, domain_stats) if n > 0}}
    if blocks:
        micro_steps = accum * env.world_size
        assignments = load.sum(dim=1, keepdim=True)
        record.update(balance_loss=moe_stats[0].item() / micro_steps, z_loss=moe_stats[1].item() / micro_steps,
                      dropped_tokens=int(moe_stats[2].item()), dropped_fraction=moe_stats[2].item() / max(1.0, assignments.sum().item()),
                      router_entropy=moe_stats[3].item() / micro_steps, expert_load=(load / assignments).tolist(), _load=load)
    return record


def _router_losses(blocks: list[MoEFeedForward], kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Switch loss averaged over layers (Mixtral's convention); LLaMA-MoE's CV^2 summed over layers."""
    z_loss = torch.stack([b.last.z_loss for b in blocks]).mean()
    if kind == "switch":
        return torch.stack([b.last.switch_loss for b in blocks]).mean(), z_loss
    if kind == "cv2":
        return torch.stack([b.last.cv2_loss for b in blocks]).sum(), z_loss
    return torch.zeros((), device=z_loss.device), z_loss


@torch.no_grad()
def _update_selection_biases(blocks: list[MoEFeedForward], load, rate: float) -> None:
    """DeepSeek-V3: raise the bias of under-loaded experts, lower that of over-loaded ones."""
    for block, load_E in zip(blocks, load):
        bias = block.block.router.selection_bias
        bias += rate * torch.sign(load_E.mean() - load_E).to(bias)


