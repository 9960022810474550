"""`moeify quickstart`: the main job on the embedded default model.

Builds an upcycled MoE, a carved one (training-free, from calibration activations) and a random split
(LLaMA-MoE's baseline), recovers the cheap ones with the same small token budget by continual
pre-training and by distillation from the dense model, reloads each with stock transformers, and
compares them with the dense model on held-out text that ships with Python.
"""

import shutil
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import ClassVar

import torch
from transformers import AutoModelForCausalLM

from moeify.build import BuildConfig, build
from moeify.checkpoint.atomic import check_output, make_directory, remove_made
from moeify.checkpoint.dense import DenseCheckpoint
from moeify.checkpoint.resolve import DEFAULT_MODEL, cache_dir, resolve_model
from moeify.construct import ConstructionConfig
from moeify.construct.carve import shape_at_ratio
from moeify.construct.config import CalibrationOptions, RouterOptions, SplitOptions
from moeify.data.embedded import pydoc_topics
from moeify.data.text import load_tokenizer, tokenize_joined
from moeify.evaluate.generate import greedy, prompt_ids
from moeify.evaluate.params import parameter_counts
from moeify.evaluate.scoring import blocks_of, score_blocks
from moeify.schema import at_least, fraction, positive, seed_range


@dataclass
class QuickstartConfig:
    RANGES: ClassVar[dict] = {"num_experts": at_least(1), "top_k": at_least(1), "split_scale": positive(), "eval_tokens": at_least(1),
                              "block_size": at_least(2), "max_new_tokens": at_least(1), "train_tokens": at_least(0),
                              "train_seq_len": at_least(2), "train_lr": positive(), "carve_lr": positive(),
                              "carve_ratio": fraction(high_inclusive=False),
                              "carve_blocks": at_least(2), "calibration_tokens": at_least(1), "seed": seed_range()}
    model: str = DEFAULT_MODEL
    """Dense model (default: the embedded SmolLM2-135M-Instruct)."""
    work_dir: Path = field(default_factory=lambda: cache_dir() / "quickstart")
    """Where the MoE checkpoints go (default: the moeify cache)."""
    num_experts: int = 8
    """Routed experts E."""
    top_k: int = 2
    """Experts per token k."""
    split_scale: float | None = None
    """Output scale of the random split; default E/k."""
    carve_ratio: float = 0.5
    """Active fraction of the FFN in the carved MoE (0 skips it)."""
    carve_blocks: int = 16
    """The carved FFN is cut into this many blocks: carve_ratio x blocks active, half of them shared."""
    calibration_tokens: int = 16_384
    """Calibration tokens (embedded corpus) the carve reads."""
    eval_tokens: int = 1024
    """Held-out tokens scored."""
    block_size: int = 256
    """Tokens per scored block."""
    prompt: str = "What is the capital of France?"
    max_new_tokens: int = 20
    seed: int = 0
    train_tokens: int = 16_384
    """Budget of each recovery run: CPT of the random split, distillation of the random split and of the carve
    (0 skips them); ~1.5, 2.5 and 3 min on 2 CPU cores."""
    train_seq_len: int = 256
    train_lr: float = 2e-3
    """Learning rate of the random split's CPT and distillation."""
    distill: bool = True
    """Add the distillation rows (the random split and the carve trained against the dense model)."""
    carve_lr: float = 3e-4
    """Learning rate of the carve's distillation (temperature 2, alpha 0.5: half next-token CE, which suits a student
    that starts near its parent; docs/training.md)."""


@dataclass
class Row:
    name: str
    total_params: int
    active_params: int
    perplexity: float
    max_abs_logit_diff: float | None  # None for the dense baseline
    completion: str
    seconds: float


def _log(message: str) -> None:
    print(f"[quickstart] {message}", file=sys.stderr, flush=True)


def run_quickstart(config: QuickstartConfig) -> str:
    return format_rows(quickstart(config), config.prompt)


def quickstart(config: QuickstartConfig) -> list[Row]:
    if config.split_scale is None:
        config = replace(config, split_scale=config.num_experts / config.top_k)
    torch.manual_seed(config.seed)
    dense_dir = resolve_model(config.model)
    tokenizer = load_tokenizer(dense_dir)
    made = make_directory(config.work_dir)  # an unwritable --work-dir fails now, not after the first model
    try:
        return _compare(config, dense_dir, tokenizer)
    except BaseException:  # a work directory this call made holds only what it wrote
        if made is not None:
            shutil.rmtree(config.work_dir, ignore_errors=True)
            remove_made(config.work_dir.parent, made)
        raise


def _compare(config: QuickstartConfig, dense_dir: Path, tokenizer) -> list[Row]:
    blocks = blocks_of(tokenize_joined(tokenizer, pydoc_topics(heldout=True)), config.block_size, config.eval_tokens)
    _log(f"held-out text: {blocks.numel()} tokens of Python's help topics, {blocks.shape[0]} blocks of {config.block_size}")
    prompt = prompt_ids(tokenizer, config.prompt)

    tokens = f"{config.train_tokens // 1024}k tok"
    builds: dict[str, object] = {
        "dense": dense_dir,
        f"upcycle {config.num_experts}x top-{config.top_k}": BuildConfig(
            config.model, config.work_dir / "upcycle", force=True,
            construction=ConstructionConfig("upcycle", config.num_experts, config.seed, router=RouterOptions(config.top_k)),
        ),
    }
    recover = config.train_tokens > 0
    if config.carve_ratio > 0:
        shape = shape_at_ratio(DenseCheckpoint(dense_dir).ffn_size, config.carve_ratio, config.carve_blocks, with_shared=True)
        carve_name = f"carve {shape.num_experts}/top-{shape.top_k}+shared ({config.carve_ratio:.0%} active)"
        builds[carve_name] = BuildConfig(
            config.model, config.work_dir / "carve", force=True,
            construction=ConstructionConfig("carve", shape.num_experts, config.seed, router=RouterOptions(shape.top_k),
                                            split=SplitOptions(shared_size=shape.shared_size),
                                            data=CalibrationOptions("embedded", config.calibration_tokens)),
        )
        if recover and config.distill:
            builds[f"{carve_name} + distill {tokens}"] = Recovery("carve", "carve-distill",
                                                                   dict(lr=config.carve_lr, distill=True, distill_temperature=2.0,
                                                                        distill_alpha=0.5))
    split_name = f"random-split {config.num_experts}/top-{config.top_k} s={config.split_scale:g}"
    builds[split_name] = BuildConfig(
        config.model, config.work_dir / "random-split", force=True,
        construction=ConstructionConfig("random-split", config.num_experts, config.seed, config.split_scale,
                                        router=RouterOptions(config.top_k)),
    )
    if recover:
        builds[f"{split_name} + CPT {tokens}"] = Recovery("random-split", "random-split-cpt", dict(lr=config.train_lr))
        if config.distill:
            builds[f"{split_name} + distill {tokens}"] = Recovery("random-split", "random-split-distill",
                                                                  dict(lr=config.train_lr, distill=True))
    for folder in ("upcycle", "carve", "random-split", "random-split-cpt", "random-split-distill", "carve-distill"):
        check_output(config.work_dir / folder, True, [config.model, dense_dir], "--work-dir")  # moeify's replaced, never the user's
    rows, dense_logits = [], None
    for name, target in builds.items():
        start = time.perf_counter()
        if isinstance(target, BuildConfig):
            _log(f"building {name} -> {target.out}")
            path = build(target)
        elif isinstance(target, Recovery):
            path = _recover(config, target)
        else:
            path = target
        _log(f"scoring {name} (reloaded from disk with stock transformers)")
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        scores = score_blocks(model, blocks, batch_size=1, keep_logits=True)
        diff = None if dense_logits is None else (scores.logits - dense_logits).abs().max().item()
        dense_logits = scores.logits if dense_logits is None else dense_logits
        total, active = parameter_counts(model)
        completion = greedy(model, tokenizer, prompt, config.max_new_tokens)
        rows.append(Row(name, total, active, scores.perplexity, diff, completion, time.perf_counter() - start))
        del model
    return rows


@dataclass(frozen=True)
class Recovery:
    """Train the MoE in work_dir/source into work_dir/run (TrainConfig settings: the objective and its lr)."""

    source: str
    run: str
    settings: dict


def _recover(config: QuickstartConfig, recovery: Recovery) -> Path:
    from moeify.train.config import TrainConfig
    from moeify.train.loop import train

    run = config.work_dir / recovery.run
    how = "distillation from the dense model" if recovery.settings.get("distill") else "continual pre-training"
    _log(f"{how} of the {recovery.source} model on the embedded corpus, {config.train_tokens} tokens -> {run}")
    batch = 8
    train_config = TrainConfig(
        model=str(config.work_dir / recovery.source), out=str(run), seq_len=config.train_seq_len, batch_size=batch,
        micro_batch=batch // 2, max_tokens=config.train_tokens, warmup_steps=2, eval_blocks=4, seed=config.seed, force=True,
        **recovery.settings,
    )
    result = train(train_config)
    assert result.model_dir is not None
    return result.model_dir


def format_rows(rows: list[Row], prompt: str) -> str:
    width = max(len(row.name) for row in rows) + 2
    header = f"{'model':<{width}}{'total':>9}{'active':>9}{'ppl':>10}{'max|Δlogit|':>13}{'time':>7}"
    lines = [header, "-" * len(header)]
    for row in rows:
        diff = "-" if row.max_abs_logit_diff is None else f"{row.max_abs_logit_diff:.2e}"
        lines.append(
            f"{row.name:<{width}}{row.total_params / 1e6:>8.1f}M{row.active_params / 1e6:>8.1f}M"
            f"{row.perplexity:>10.2f}{diff:>13}{row.seconds:>6.0f}s"
        )
    lines += ["", f"greedy completion of {prompt!r}:"]
    lines += [f"  {row.name:<{width}} {row.completion!r}" for row in rows]
    return "\n".join(lines)
