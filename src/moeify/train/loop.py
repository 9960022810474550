"""`moeify train`: continual pre-training of a dense or MoE model on domain-weighted packed data."""

import math
import signal
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from moeify.construct import ConstructionConfig
from moeify.errors import (
    MoeifyError,
    describe_os_error,
    printed_like,
    same_on_every_rank,
)
from moeify.modeling.hf import MoEFeedForward
from moeify.train.checkpoint import save_checkpoint
from moeify.train.collectives import CollectiveCounter
from moeify.train.config import TrainConfig
from moeify.train.distributed import gather_to_list
from moeify.train.export import export_stock
from moeify.train.heldout import heldout_losses
from moeify.train.metrics import peak_device_memory_mb, peak_rss_mb
from moeify.train.parallelize import optimizer_state_bytes
from moeify.train.session import Session, open_session
from moeify.train.step import MicroBatch, train_step


@dataclass
class TrainResult:
    out: Path
    steps: int
    losses: list[float] = field(default_factory=list)  # training loss of each step run in this call
    heldout: dict[str, float] = field(default_factory=dict)  # final held-out loss per domain
    model_dir: Path | None = None
    finished: bool = False  # the whole token budget was trained
    is_main: bool = True  # this process is rank 0
    stopped_by_signal: bool = False  # SIGTERM: the step finished and checkpointed


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
    terminated = threading.Event()
    previous = _on_sigterm(lambda *_: terminated.set())
    try:
        for step in range(run.start_step + 1, end_step + 1):
            try:
                record, stop = _step(run, step, terminated.is_set())
                result.stopped_by_signal = stop and step < run.steps
                if (config.checkpoint_every and step % config.checkpoint_every == 0) or step == end_step or result.stopped_by_signal:
                    run.last_checkpoint = _checkpoint(run, step)
            except OSError as error:
                where = f"{run.last_checkpoint} is complete: continue with --resume" if run.last_checkpoint else "no checkpoint was completed"
                raise printed_like(MoeifyError(f"{describe_os_error(error)}; training stopped at step {step}; {where}"), error) from None
            if "heldout_loss" in record:
                result.heldout = record["heldout_loss"]
            result.losses.append(record["loss"])
            result.steps = step
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
            if result.stopped_by_signal:
                break
    finally:  # the bar ends its line before any error message
        _on_sigterm(previous)
        bar.close()
        run.logger.close()
    result.finished = result.steps == run.steps
    if result.finished and config.export:
        training = {"steps": run.steps, "tokens": run.tokens_seen, "config": asdict(config), "heldout_loss": result.heldout}
        try:
            result.model_dir = export_stock(run.model, run.model_config, run.model_dir, run.out / "model", run.env, run.manifest, training)
        except (MoeifyError, OSError) as error:
            reason = describe_os_error(error) if isinstance(error, OSError) else error
            print(f"moeify: not exported: {reason}; the resumable checkpoint is in {run.out / 'checkpoints'}", file=sys.stderr)
    return result


def _on_sigterm(handler):
    """Install `handler` for SIGTERM (a scheduler's notice before it kills the job: Slurm, Kubernetes, torchrun
    passing it on); returns the one it replaces. Only the main thread may: elsewhere nothing changes."""
    if threading.current_thread() is not threading.main_thread() or handler is None:
        return None
    return signal.signal(signal.SIGTERM, handler)


def _step(run: Session, step: int, stop_requested: bool = False) -> tuple[dict, bool]:
    """One optimizer step, its metrics logged (and the held-out evaluation when due), and whether some rank
    got SIGTERM before this step's statistics were reduced, so that every rank stops after it."""
    config = run.config
    started = time.perf_counter()
    with CollectiveCounter() if config.count_collectives else nullcontext() as counter:
        record = train_step(run.model, run.blocks, run.optimizer, lambda: _micro_batch(run), len(run.data.domains), config, run.env,
                            run.accum, run.dtype, measure_bytes=step == 1, teacher=run.teacher, stop_requested=stop_requested)
    if counter is not None:
        record["collectives"] = counter.counts
    stop = record.pop("_stop")
    domain_stats = record.pop("_domain_stats")
    seen = [(d, row) for d, row in zip(run.data.domains, domain_stats) if row[1] > 0]
    record["domain_loss"] = {d: (row[0] / row[1]).item() for d, row in seen}
    if run.teacher is not None and not config.layerwise:
        record["domain_kd_loss"] = {d: (row[2] / row[1]).item() for d, row in seen}
        record["domain_teacher_ce"] = {d: (row[3] / row[1]).item() for d, row in seen}
    objective = record.get("distill_loss", record["loss"])
    if not math.isfinite(objective):  # the loss all ranks reduced: every rank stops here
        raise same_on_every_rank(MoeifyError(f"the loss became {objective} at step {step}; training stopped, last good "
                                             f"checkpoint: {run.last_checkpoint or 'none'}; lower --lr or check the data"))
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
                  domain_weights=run.sampler.weights)
    if (config.eval_every and step % config.eval_every == 0) or step == run.steps:
        record["heldout_loss"] = heldout_losses(run.model, run.data, config.eval_blocks, config.micro_batch, run.dtype)
        if run.dynamic is not None and step < run.steps:
            run.sampler.set_weights(run.dynamic.update(run.sampler.weights, record["heldout_loss"]))
            record["domain_weights"] = run.sampler.weights
    if step == 1:  # gradients and optimizer state exist from the first step on
        record["gradient_bytes_per_rank"] = gather_to_list(record.pop("_gradient_bytes"), run.env)
        record["optimizer_bytes_per_rank"] = gather_to_list(optimizer_state_bytes(run.optimizer), run.env)
    if step % config.log_every == 0 or "heldout_loss" in record or step == 1:  # the same steps on every rank
        record["peak_rss_mb"] = gather_to_list(round(peak_rss_mb(), 1), run.env)  # per rank: one collective, logged steps only
        if run.env.device.type == "cuda":
            record["peak_device_memory_mb"] = gather_to_list(round(peak_device_memory_mb(run.env.device), 1), run.env)
        run.logger.log(record)
    return record, stop


def _micro_batch(run: Session) -> MicroBatch:
    """This rank's share of the next global micro-batch (the global order does not depend on the ranks)."""
    micro = run.config.micro_batch
    pairs = run.sampler.draw(micro * run.env.world_size)
    mine = pairs[run.env.rank * micro : (run.env.rank + 1) * micro]
    ids = torch.stack([run.data.block(d, i) for d, i in mine]).long()
    domains = torch.tensor([run.data.domains.index(d) for d, _ in mine])
    return ids.to(run.env.device, non_blocking=True), domains.to(run.env.device, non_blocking=True)


def _checkpoint(run: Session, step: int) -> Path:
    trainer_state = {"step": step, "tokens": run.tokens_seen, "scheduler": run.scheduler.state_dict(),
                     "sampler": run.sampler.state_dict(), "identity": run.identity}
    return save_checkpoint(run.out, step, run.model, run.optimizer, trainer_state, run.env, run.config.keep_checkpoints)


@torch.no_grad()
def _update_selection_biases(blocks: list[MoEFeedForward], load, rate: float) -> None:
    """DeepSeek-V3: raise the bias of under-loaded experts, lower that of over-loaded ones."""
    for block, load_E in zip(blocks, load):
        bias = block.block.router.selection_bias
        bias += rate * torch.sign(load_E.mean() - load_E).to(bias)


