"""`moeify train`: continual pre-training of a dense or MoE model on domain-weighted packed data."""

import hashlib
import json
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import yaml
from tqdm import tqdm

from moeify.build import MANIFEST, construction_manifest
from moeify.checkpoint.dense import DenseCheckpoint
from moeify.checkpoint.resolve import resolve_model
from moeify.data.packed import PackedDataset
from moeify.data.prepare import PrepareConfig, prepare, tokenizer_fingerprint
from moeify.data.sampler import DomainSampler, DynamicWeights, static_weights
from moeify.errors import MoeifyError
from moeify.modeling.hf import MoEFeedForward
from moeify.modeling.load import load_moe_model
from moeify.modeling.router import RouterSpec
from moeify.train.checkpoint import complete_checkpoints, load_checkpoint, save_checkpoint
from moeify.train.config import TrainConfig
from moeify.train.distributed import DistEnv, all_reduce_sum, barrier, gather_to_list, init_distributed, wrap_model
from moeify.train.export import export_stock
from moeify.train.heldout import autocast_for, heldout_losses, sequence_losses
from moeify.train.metrics import MetricsLogger, flops_per_token, peak_flops, peak_rss_mb
from moeify.train.online import OnlineSpec, build_online
from moeify.train.setup import check_config, make_optimizer, make_scheduler, reference_losses, set_trainable


@dataclass
class TrainResult:
    out: Path
    steps: int
    losses: list[float] = field(default_factory=list)  # training loss of each step run in this call
    heldout: dict[str, float] = field(default_factory=dict)  # final held-out loss per domain
    model_dir: Path | None = None
    finished: bool = False  # the whole token budget was trained
    is_main: bool = True  # this process is rank 0


def train(config: TrainConfig, progress: bool = True, stop_after_steps: int | None = None) -> TrainResult:
    """Run (or resume) training. `stop_after_steps` ends this call early, checkpointed, without changing the schedule."""
    env = init_distributed()
    check_config(config, env)
    out = Path(config.out)
    _prepare_out_dir(out, config, env)
    model_dir = _on_main_first(env, lambda: resolve_model(config.from_dense or config.model))
    data = _on_main_first(env, lambda: _dataset(config))
    if tokenizer_fingerprint(model_dir) != data.tokenizer_fingerprint:
        raise MoeifyError(
            f"data in {data.path} was tokenised with another tokenizer than {model_dir}'s; "
            f"re-run `moeify data prepare --model {config.from_dense or config.model}`"
        )

    torch.manual_seed(config.seed + env.rank)
    flops: dict[str, float] = {}

    def before_sharding(model, blocks):
        set_trainable(model, blocks, config.trainable)
        if config.activation_checkpointing:
            if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x names
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        flops["per_token"] = flops_per_token(model, data.seq_len)

    if config.from_dense:
        dense = DenseCheckpoint(model_dir)
        spec = OnlineSpec(config.method, config.experts, config.top_k, config.seed, config.router_std, config.scale,
                          config.partition)
        model, blocks = build_online(dense, spec, env, config.parallel, config.dispatch, config.noisy_gate,
                                     config.capacity_factor, before_sharding)
        model_config = model.config
        plan = spec.plan(dense)
        manifest = construction_manifest(dense, config.from_dense, model_config.architectures[0], plan, config.top_k,
                                         RouterSpec(), config.router_std, plan.scale(config.top_k, RouterSpec(), config.scale))
        manifest["built_online"] = True
    else:
        model, blocks = load_moe_model(model_dir, env.device, config.dispatch, config.noisy_gate, config.capacity_factor)
        before_sharding(model, blocks)
        model_config = model.config
        model = wrap_model(model, env, config.parallel)
        manifest = json.loads((model_dir / MANIFEST).read_text()) if (model_dir / MANIFEST).is_file() else {}
    rss_after_build = gather_to_list(round(peak_rss_mb(), 1), env)  # per rank
    if data.meta["tokenizer"]["vocab_size"] > model_config.vocab_size:
        raise MoeifyError(f"the data's vocabulary is larger than {model_dir}'s embedding table; prepare the data with this model")
    flops_token = flops["per_token"]
    model.train()

    steps = config.max_tokens // (config.batch_size * data.seq_len)
    if steps < 1:
        raise MoeifyError(f"--max-tokens {config.max_tokens} is less than one batch ({config.batch_size} x {data.seq_len} tokens)")
    accum = config.batch_size // (config.micro_batch * env.world_size)
    optimizer = make_optimizer(model, config)
    scheduler = make_scheduler(optimizer, config, steps)
    counts = {d: data.num_blocks(d) for d in data.domains}
    sampler = DomainSampler(counts, static_weights(config.domain_weights, counts), config.seed)
    dynamic = None
    if config.dynamic:
        dynamic = DynamicWeights(reference_losses(config, model_dir, data, env), config.dynamic, config.dynamic_eta)

    identity = _identity(model_config, data, config, env)
    start_step, tokens_seen = 0, 0
    if config.resume:
        state = load_checkpoint(complete_checkpoints(out)[-1], model, optimizer, env, identity)
        start_step, tokens_seen = state["step"], state["tokens"]
        scheduler.load_state_dict(state["scheduler"])
        sampler.load_state_dict(state["sampler"])
    elif env.is_main:
        (out / "config.yaml").write_text(yaml.safe_dump({"train": asdict(config)}, sort_keys=False))

    logger = MetricsLogger(out, env.is_main, append=config.resume)
    peak, peak_source = peak_flops(env.device, config.peak_tflops)
    if start_step == 0:
        logger.log({"step": 0, "tokens": 0, "domain_weights": sampler.weights, "peak_flops": peak, "peak_flops_source": peak_source,
                    "flops_per_token": flops_token, "peak_rss_mb_after_build": rss_after_build,
                    "built_online": bool(config.from_dense), "heldout_loss": heldout_losses(model, data, config.eval_blocks, config.micro_batch, env.device)})
    result = TrainResult(out, start_step, is_main=env.is_main)
    end_step = steps if stop_after_steps is None else min(steps, start_step + stop_after_steps)
    bar = tqdm(total=steps, initial=start_step, desc="train", unit="step", disable=not (progress and env.is_main), file=sys.stderr)
    last_checkpoint = complete_checkpoints(out)[-1] if config.resume else None
    if stop_after_steps == 0 and start_step == 0:  # the initial weights, checkpointed (e.g. to compare builds)
        trainer_state = {"step": 0, "tokens": 0, "scheduler": scheduler.state_dict(), "sampler": sampler.state_dict(), "identity": identity}
        save_checkpoint(out, 0, model, optimizer, trainer_state, env, config.keep_checkpoints)
    for step in range(start_step + 1, end_step + 1):
        started = time.perf_counter()
        record = _train_step(model, blocks, optimizer, sampler, data, config, env, accum)
        if not math.isfinite(record["loss"]):
            raise MoeifyError(
                f"the loss became {record['loss']} at step {step}; training stopped, last good checkpoint: "
                f"{last_checkpoint or 'none'}; lower --lr or check the data"
            )
        lr = scheduler.get_last_lr()[0]  # the rate this step used
        scheduler.step()
        if config.bias_update_rate > 0:
            _update_selection_biases(blocks, record.pop("_load"), config.bias_update_rate)
        record.pop("_load", None)
        elapsed = time.perf_counter() - started
        step_tokens = config.batch_size * data.seq_len
        tokens_seen += step_tokens
        record.update(step=step, tokens=tokens_seen, lr=lr, tokens_per_s=step_tokens / elapsed,
                      mfu=step_tokens * flops_token / elapsed / peak if peak else None, domain_weights=sampler.weights,
                      peak_rss_mb=gather_to_list(round(peak_rss_mb(), 1), env))
        if (config.eval_every and step % config.eval_every == 0) or step == steps:
            record["heldout_loss"] = heldout_losses(model, data, config.eval_blocks, config.micro_batch, env.device)
            result.heldout = record["heldout_loss"]
            if dynamic is not None and step < steps:
                sampler.set_weights(dynamic.update(sampler.weights, record["heldout_loss"]))
                record["domain_weights"] = sampler.weights
        if step % config.log_every == 0 or "heldout_loss" in record:
            logger.log(record)
        result.losses.append(record["loss"])
        result.steps = step
        bar.update(1)
        bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
        if (config.checkpoint_every and step % config.checkpoint_every == 0) or step == end_step:
            trainer_state = {"step": step, "tokens": tokens_seen, "scheduler": scheduler.state_dict(),
                             "sampler": sampler.state_dict(), "identity": identity}
            last_checkpoint = save_checkpoint(out, step, model, optimizer, trainer_state, env, config.keep_checkpoints)
    bar.close()
    logger.close()
    result.finished = result.steps == steps
    if result.finished and config.export:
        manifest["training"] = {"steps": steps, "tokens": tokens_seen, "config": asdict(config), "heldout_loss": result.heldout}
        try:
            result.model_dir = export_stock(model, model_config, model_dir, out / "model", env, manifest)
        except MoeifyError as error:
            print(f"moeify: not exported: {error}; the resumable checkpoint is in {out / 'checkpoints'}", file=sys.stderr)
    return result


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


def _dataset(config: TrainConfig) -> PackedDataset:
    if config.data:
        return PackedDataset(Path(config.data))
    return prepare(PrepareConfig(config.model, seq_len=config.seq_len), progress=False)


def _on_main_first(env: DistEnv, make):
    """Let rank 0 create a cached artefact before the other ranks read it; its error stops every rank."""
    value, error = None, None
    if env.is_main:
        try:
            value = make()
        except MoeifyError as raised:
            error = raised
    if env.distributed:
        message = [str(error) if error else None]
        torch.distributed.broadcast_object_list(message, src=0)
        if message[0] is not None:
            raise MoeifyError(message[0])
    elif error is not None:
        raise error
    return value if env.is_main else make()


def _prepare_out_dir(out: Path, config: TrainConfig, env: DistEnv) -> None:
    if config.resume:
        if not complete_checkpoints(out):
            raise MoeifyError(f"--resume: {out} holds no complete checkpoint; start without --resume")
        return
    if out.exists() and any(out.iterdir()):
        if not config.force:
            raise MoeifyError(f"--out {out} holds an earlier run; pass --resume to continue it or --force to start afresh")
        if env.is_main:
            shutil.rmtree(out)
    barrier(env)
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
    barrier(env)


def _identity(model_config, data: PackedDataset, config: TrainConfig, env: DistEnv) -> dict:
    """What must match for a checkpoint to be resumed."""
    described = {k: v for k, v in model_config.to_dict().items() if k not in ("_name_or_path", "transformers_version")}
    return {
        "model_config_sha256": hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest(),
        "data": data.meta["fingerprint"],
        "batch_size": config.batch_size,
        "world_size": env.world_size,
        "max_tokens": config.max_tokens,
    }
