"""Everything a training run needs before its first step: the process group, the run directory, data,
the model (loaded, or built online), optimizer, schedule, sampler, resume state and the metrics sink."""

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import yaml

from moeify.checkpoint.atomic import (
    check_not_an_input,
    check_output,
    claim_directory,
    discard_unused,
    write_marker,
    written_by_moeify,
)
from moeify.checkpoint.dense import DenseCheckpoint
from moeify.checkpoint.manifest import Manifest
from moeify.checkpoint.resolve import resolve_model
from moeify.construct import ConstructionConfig
from moeify.data.packed import PackedDataset
from moeify.data.prepare import PrepareConfig, prepare, tokenizer_fingerprint
from moeify.data.sampler import DomainSampler, DynamicWeights, static_weights
from moeify.errors import MoeifyError, same_on_every_local_rank, same_on_every_rank
from moeify.modeling.chunked_loss import install_chunked_loss
from moeify.modeling.hf import MoEFeedForward, hold_scale_as_multiplier
from moeify.modeling.load import load_moe_model
from moeify.schema import is_given
from moeify.train.checkpoint import (
    complete_checkpoints,
    load_checkpoint,
    resumable_checkpoint,
)
from moeify.train.config import TrainConfig
from moeify.train.distributed import (
    DistEnv,
    barrier,
    compile_layers,
    enable_activation_checkpointing,
    gather_to_list,
    init_distributed,
    training_dtype,
)
from moeify.train.heldout import heldout_losses
from moeify.train.layerwise import check_teacher_layers
from moeify.train.metrics import MetricsLogger, flops_per_token, peak_flops, peak_rss_mb
from moeify.train.online import build_online
from moeify.train.parallelize import (
    Layout,
    check_experts,
    check_layout,
    local_bytes,
    wrap_model,
)
from moeify.train.setup import (
    check_config,
    make_optimizer,
    make_scheduler,
    reference_losses,
    set_trainable,
)
from moeify.train.teacher import Teacher, load_teacher, teacher_path


@dataclass
class Session:
    config: TrainConfig
    env: DistEnv
    out: Path
    model_dir: Path
    data: PackedDataset
    model: torch.nn.Module
    model_config: object
    blocks: list[MoEFeedForward]
    manifest: Manifest | None
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    sampler: DomainSampler
    dynamic: DynamicWeights | None
    identity: dict
    logger: MetricsLogger
    dtype: torch.dtype  # compute precision (master weights stay fp32)
    steps: int  # optimizer steps of the whole budget
    accum: int  # micro-steps per optimizer step on each rank
    flops_per_token: float
    peak_flops: float | None
    start_step: int
    tokens_seen: int
    last_checkpoint: Path | None
    teacher: Teacher | None = None  # --distill, --layerwise


def open_session(config: TrainConfig, construction: ConstructionConfig | None = None) -> Session:
    """Set a run up (or resume it); every check that can fail runs before the first step."""
    env = init_distributed()
    out = Path(config.out)
    layout = Layout(env.world_size, config.ep, config.hsdp, config.parallel)
    try:
        check_config(config, env)
        check_layout(layout)
        _prepare_out_dir(out, config, construction, env)
    except MoeifyError as error:  # from the flags and the node's files: alike on every rank of a node
        raise same_on_every_local_rank(error)
    try:
        return _open(config, construction, env, out, layout)
    except BaseException:
        if not config.resume and env.is_main:
            discard_unused(out)  # the run directory this call made, still empty: a failed start leaves nothing
        raise


def _open(config: TrainConfig, construction: ConstructionConfig | None, env: DistEnv, out: Path, layout: Layout) -> Session:
    model_dir = _on_main_first(env, lambda: resolve_model(config.from_dense or config.model))
    data = _on_main_first(env, lambda: _dataset(config))
    if tokenizer_fingerprint(model_dir) != data.tokenizer_fingerprint:
        raise MoeifyError(
            f"data in {data.path} was tokenised with another tokenizer than {model_dir}'s; "
            f"re-run `moeify data prepare --model {config.from_dense or config.model}`"
        )

    torch.manual_seed(config.seed + env.rank)
    flops: dict[str, float] = {}

    dtype = training_dtype(config.dtype, env.device)

    def before_sharding(model, blocks):
        set_trainable(model, blocks, config.trainable, moe_only=config.layerwise)
        for moe in blocks:
            moe.block.balance_loss = config.balance_loss
            moe.block.cv2_unbiased = config.cv2_variance == "unbiased"
            moe.block.cv2_smooth_load = config.cv2_load in ("smooth", "llama-moe")
            moe.block.cv2_load_noise_alone = config.cv2_load == "llama-moe"
        enable_activation_checkpointing(model, config.activation_checkpointing)
        install_chunked_loss(model, config.loss_chunk, always=config.distill)
        flops["per_token"] = flops_per_token(model, data.seq_len)
        if config.compile:
            compile_layers(model, moe_blocks_alone=config.layerwise)

    if config.from_dense:
        online = build_online(DenseCheckpoint(model_dir), construction or ConstructionConfig(seed=config.seed), config.from_dense,
                              env, layout, config.dispatch, config.noisy_gate, config.capacity_factor,
                              before_sharding, dtype, config.reshard_after_forward, config.layerwise)
        model, blocks, manifest = online.model, online.blocks, online.manifest
        model_config = model.config
    else:
        model, blocks = load_moe_model(model_dir, env.device, config.dispatch, config.noisy_gate, config.capacity_factor)
        check_experts(layout, blocks[0].block.router.num_experts if blocks else None)
        before_sharding(model, blocks)
        model_config = model.config
        model = wrap_model(model, env, layout, dtype, config.reshard_after_forward, config.layerwise)
        manifest = Manifest.read(model_dir)
    if manifest is not None and construction is not None and is_given(construction, "scale_placement", "fold"):
        manifest = manifest.replace(scale_placement=construction.scale_placement)  # --scale-placement for a built MoE
    if manifest is not None and manifest.scale_placement == "multiplier" and manifest.scale != 1.0:
        hold_scale_as_multiplier(blocks, manifest.scale)
    teacher = None
    if config.distill or config.layerwise:
        flag = "--distill" if config.distill else "--layerwise"
        if not blocks:
            raise MoeifyError(f"{flag} recovers an MoE from its dense parent; {model_dir} is dense (build an MoE from it first)")
        source = teacher_path(config.teacher, model_dir, manifest, bool(config.from_dense), flag)
        teacher = load_teacher(source, env, layout, dtype, model_config.vocab_size, data.tokenizer_fingerprint,
                               config.compile and config.distill, flag)
        if config.layerwise:
            check_teacher_layers(teacher, model_config)
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

    identity = _identity(model_config, data, config)
    start_step, tokens_seen, resumed_from = 0, 0, None
    if config.resume:
        resumed_from = resumable_checkpoint(out, env)
        state = load_checkpoint(resumed_from, model, optimizer, env, identity)
        start_step, tokens_seen = state["step"], state["tokens"]
        scheduler.load_state_dict(state["scheduler"])
        sampler.load_state_dict(state["sampler"])
    elif env.is_main:
        (out / "config.yaml").write_text(yaml.safe_dump({"train": asdict(config)}, sort_keys=False))
        write_marker(out, "train")

    if config.layerwise and env.distributed and start_step > 0:
        with torch.no_grad():  # FSDP2 takes the first of its modules to run as the root: let it be the model, not a block
            model(input_ids=data.blocks(data.domains[0], "val", 1)[:, :2].long().to(env.device), use_cache=False)
    logger = MetricsLogger(out, env.is_main, append=config.resume, after_step=start_step)
    peak, peak_source = peak_flops(env.device, config.peak_tflops)
    if start_step == 0:
        logger.log({"step": 0, "tokens": 0, "domain_weights": sampler.weights, "peak_flops": peak, "peak_flops_source": peak_source,
                    "flops_per_token": flops_token, "peak_rss_mb_after_build": rss_after_build, "layout": layout.describe(),
                    "parameter_bytes_per_rank": gather_to_list(local_bytes(model.parameters()), env),
                    "built_online": bool(config.from_dense), "heldout_loss": heldout_losses(model, data, config.eval_blocks, config.micro_batch, dtype)})
    return Session(config, env, out, model_dir, data, model, model_config, blocks, manifest, optimizer, scheduler, sampler, dynamic,
                   identity, logger, dtype, steps, accum, flops_token, peak, start_step, tokens_seen,
                   resumed_from, teacher)


def _dataset(config: TrainConfig) -> PackedDataset:
    if config.data:
        data = PackedDataset(Path(config.data))
        if is_given(config, "seq_len", TrainConfig.seq_len) and config.seq_len != data.seq_len:
            raise MoeifyError(f"--seq-len {config.seq_len} conflicts with --data {config.data}, packed in blocks of {data.seq_len}: "
                              f"drop --seq-len or prepare the data again with `moeify data prepare --seq-len {config.seq_len}`")
        return data
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
            raise same_on_every_rank(MoeifyError(message[0]))
    elif error is not None:
        raise error
    return value if env.is_main else make()


def _prepare_out_dir(out: Path, config: TrainConfig, construction: ConstructionConfig | None, env: DistEnv) -> None:
    """The run directory under the output rule (checkpoint/atomic.py), checked on every rank, made by rank 0."""
    reads = [config.from_dense or config.model, config.data, config.reference_model, config.teacher,
             *(construction.read_paths() if construction is not None and config.from_dense else [])]
    if config.resume:
        check_not_an_input(out, reads)
        if not complete_checkpoints(out):
            raise MoeifyError(f"--resume: {out} holds no complete checkpoint; start without --resume")
        return
    check_not_an_input(out, reads)
    if out.is_dir() and any(out.iterdir()) and written_by_moeify(out) and not config.force:
        raise MoeifyError(f"--out {out} holds an earlier run; pass --resume to continue it or --force to start afresh")
    check_output(out, config.force, reads)
    barrier(env)
    if env.is_main:
        claim_directory(out, config.force, reads, None)  # marked with its first file, config.yaml
    barrier(env)


def _identity(model_config, data: PackedDataset, config: TrainConfig) -> dict:
    """What must match for a checkpoint to be resumed."""
    described = {k: v for k, v in model_config.to_dict().items() if k not in ("_name_or_path", "transformers_version")}
    identity = {
        "model_config_sha256": hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest(),
        "data": data.meta["fingerprint"],
        "batch_size": config.batch_size,
        "max_tokens": config.max_tokens,
    }
    if config.distill:  # the objective (absent for plain training, so earlier checkpoints still match)
        identity["distill"] = {"alpha": config.distill_alpha, "temperature": config.distill_temperature}
    if config.layerwise:
        identity["layerwise"] = True
    return identity
