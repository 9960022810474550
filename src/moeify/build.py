"""`moeify build`: dense checkpoint -> MoE checkpoint in a stock transformers format (or moeify's own)."""

import hashlib
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

import torch
from tqdm import tqdm

from moeify.checkpoint.atomic import check_output
from moeify.checkpoint.dense import DenseCheckpoint, is_ffn_tensor
from moeify.checkpoint.formats import OutputFormat, choose_format
from moeify.checkpoint.formats.base import print_engine_limits
from moeify.checkpoint.resolve import resolve_model
from moeify.checkpoint.writer import DTYPES, cast_floating, write_checkpoint
from moeify.construct import ConstructionConfig, ConstructionPlan
from moeify.construct.refit import Refitter
from moeify.errors import MoeifyError
from moeify.schema import from_flat, positive

_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


@dataclass
class BuildConfig:
    RANGES: ClassVar[dict] = {"max_shard_mb": positive()}
    model: str
    """Dense model: a Hugging Face directory, a .gguf file, or an embedded name (smollm2-135m)."""
    out: Path
    """Output directory (created atomically)."""
    construction: ConstructionConfig = field(default_factory=ConstructionConfig)
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """Output dtype of the weights; auto: the dense checkpoint's (the selection bias stays fp32)."""
    layout: Literal["auto", "per-expert", "fused"] = "auto"
    """per-expert keys (what llama.cpp and vLLM read) | fused (transformers 5's own names, [E, 2S, D]: it loads them
    without converting); auto: the format's default (per-expert)."""
    max_shard_mb: float = 1024
    """safetensors shard size (MiB)."""
    force: bool = False
    """Replace --out if it exists."""


def build_config(**settings) -> BuildConfig:
    """A BuildConfig from flat settings, by the names of the flags and recipe keys
    (`build_config(model="smollm2-135m", out="moe", method="random-split", num_experts=8, top_k=2)`)."""
    return from_flat(BuildConfig, settings, "build_config()")


def build(config: BuildConfig, progress: bool = True) -> Path:
    if config.max_shard_mb <= 0:
        raise MoeifyError(f"--max-shard-mb must be positive, got {config.max_shard_mb}")
    out = Path(config.out)
    reads = [Path(config.model), *config.construction.read_paths()]
    check_output(out, config.force, reads)
    dense = DenseCheckpoint(resolve_model(config.model))
    reads.append(dense.path)
    plan = ConstructionPlan.make(dense, config.construction, config.model, progress)
    fmt, format_name = choose_format(dense.config, plan.features, plan.config.format)
    moe_config = fmt.make_config(dense.config, plan.num_experts, plan.top_k, plan.expert_size, plan.features)
    dtype = DTYPES.get(config.dtype)
    if dtype is not None:
        moe_config.dtype = dtype
    layout = fmt.layout if config.layout == "auto" else config.layout
    manifest = plan.manifest(dense, config.model, fmt.architecture, format_name).replace(source_sha256=weights_digest(dense.files()),
                                                                                       layout=layout)
    tensors = cast_floating(moe_tensors(dense, plan, fmt, layout, progress), dtype, fmt.keeps_fp32)
    try:
        written = write_checkpoint(out, tensors, moe_config, dense.path, manifest, config.force, int(config.max_shard_mb * (1 << 20)),
                                   reads=reads, verb="build")
    finally:
        tensors.close()  # a failed write still ends the progress bar's line
    print_engine_limits(fmt, moe_config, layout)
    return written


def run_build(config: BuildConfig) -> str:
    return f"wrote {build(config)}"


def moe_tensors(dense: DenseCheckpoint, plan: ConstructionPlan, fmt: OutputFormat, layout: str | None = None,
                progress: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of the MoE under the format's keys, in file order: embeddings, each layer (its
    attention and norms, then its MoE), the rest. One dense FFN is in memory at a time."""
    layer_names: dict[int, list[str]] = {}
    other_names: list[str] = []
    for name in dense.tensor_names:
        match = _LAYER.match(name)
        if match:
            layer_names.setdefault(int(match.group(1)), []).append(name)
        else:
            other_names.append(name)
    for name in sorted(n for n in other_names if n.startswith("model.embed")):
        yield name, plan.tensor(dense, name)
    refitter = Refitter(dense.path, plan.config) if plan.config.refit else None
    with tqdm(range(dense.num_layers), desc=f"build {plan.method.name}", unit="layer", disable=not progress, file=sys.stderr) as layers:
        for layer in layers:
            for name in sorted(layer_names.get(layer, [])):
                if not is_ffn_tensor(name):
                    yield name, plan.tensor(dense, name)
            for name, shape in fmt.zero_tensors(dense.config, layer).items():
                yield name, torch.zeros(shape, dtype=dense.dtype())
            constructed = plan.layer(dense, layer)
            if refitter is not None:
                constructed = refitter.layer(layer, constructed)
                layers.set_postfix(error=f"{refitter.stats.error_before[-1]:.3f}->{refitter.stats.error_after[-1]:.3f}")
            moe_layer = fmt.from_construction(constructed, plan.expert_size)
            yield from fmt.disk_tensors(layer, moe_layer, plan.config.router.gate, layout)
    for name in sorted(n for n in other_names if not n.startswith("model.embed")):
        yield name, plan.tensor(dense, name)
    if fmt.explicit_lm_head and "lm_head.weight" not in dense.tensor_names:  # tied embeddings
        yield "lm_head.weight", plan.tensor(dense, "model.embed_tokens.weight")
    if refitter is not None and progress:
        print(refitter.summary(), file=sys.stderr)


def weights_digest(files: list[Path]) -> str:
    """sha256 over the weight files' names and bytes, in name order."""
    digest = hashlib.sha256()
    for path in sorted(files, key=lambda p: p.name):
        digest.update(path.name.encode())
        with open(path, "rb") as f:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()
