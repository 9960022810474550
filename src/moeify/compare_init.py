"""`moeify compare-init`: held-out perplexity of each construction method right after construction.

The zero-training column of LLaMA-MoE's ablation: the dense model first, then one MoE per method,
all with the same experts, top-k, seed and held-out text.
"""

import json
import shutil
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import ClassVar

from moeify.build import BuildConfig, build
from moeify.checkpoint.atomic import atomic_directory
from moeify.checkpoint.manifest import Manifest
from moeify.checkpoint.resolve import resolve_model
from moeify.construct import ConstructionConfig, get_method
from moeify.data.embedded import pydoc_topics
from moeify.data.text import load_tokenizer, tokenize_joined
from moeify.errors import MoeifyError
from moeify.evaluate.params import parameter_counts
from moeify.evaluate.plots import bar_chart
from moeify.evaluate.scoring import blocks_of, score_blocks
from moeify.modeling.load import load_moe_model
from moeify.schema import at_least

DEFAULT_METHODS = ("upcycle", "random-split", "clustering", "co-activation", "sharing-inner", "sharing-inter", "gradient-greedy")


@dataclass
class CompareInitConfig:
    RANGES: ClassVar[dict] = {"eval_tokens": at_least(1), "block_size": at_least(2)}
    model: str
    """Dense model: a Hugging Face directory, a .gguf file, or an embedded name (smollm2-135m)."""
    out: Path = Path("moeify-compare-init")
    """Table, JSON and PNG go here."""
    methods: str = ",".join(DEFAULT_METHODS)
    """Comma-separated construction methods."""
    construction: ConstructionConfig = field(default_factory=ConstructionConfig)
    """Experts, top-k, seed, calibration (default embedded) and method options shared by every arm."""
    eval_tokens: int = 4096
    """Held-out tokens scored per model."""
    block_size: int = 256
    """Tokens per scored block."""
    force: bool = False
    """Replace --out if it exists."""


def run_compare_init(config: CompareInitConfig) -> str:
    return f"{format_table(compare_init(config))}\nwrote {config.out}"


def compare_init(config: CompareInitConfig, progress: bool = True) -> list[dict]:
    methods = [m.strip() for m in config.methods.split(",") if m.strip()]
    for name in methods:
        get_method(name)
    base = config.construction
    if base.data.calibration is None:
        base = replace(base, data=replace(base.data, calibration="embedded"))
    dense_dir = resolve_model(config.model)
    tokenizer = load_tokenizer(dense_dir)
    try:
        blocks = blocks_of(tokenize_joined(tokenizer, pydoc_topics(heldout=True)), config.block_size, config.eval_tokens)
    except ValueError as error:
        raise MoeifyError(f"held-out text too short: {error}; lower --block-size") from None
    rows: list[dict] = []
    with atomic_directory(config.out, config.force) as tmp:
        for name in ["dense", *methods]:
            if progress:
                print(f"[compare-init] {name}", file=sys.stderr, flush=True)
            if name == "dense":
                path, settings = dense_dir, {}
            else:
                path = build(BuildConfig(config.model, tmp / name, replace(base, method=name), force=True), progress=progress)
                manifest = Manifest.read(path)
                settings = {"expert_size": manifest.expert_size, "shared_size": manifest.shared_size, "scale": manifest.scale}
            model, _ = load_moe_model(path)
            scores = score_blocks(model, blocks)
            total, active = parameter_counts(model)
            rows.append({"method": name, "perplexity": scores.perplexity, "mean_nll": scores.loss, "tokens": scores.tokens,
                         "total_params": total, "active_params": active, "expert_size": settings.get("expert_size"),
                         "shared_size": settings.get("shared_size", 0), "scale": settings.get("scale")})
            del model
        settings = {"model": config.model, "num_experts": base.num_experts, "top_k": base.top_k, "seed": base.seed,
                    "calibration": base.data.calibration, "eval_tokens": int(blocks.numel()), "heldout": "Python help topics (held out)"}
        (tmp / "compare-init.json").write_text(json.dumps({"settings": settings, "rows": rows}, indent=2) + "\n")
        (tmp / "compare-init.md").write_text(format_table(rows) + "\n")
        bar_chart({r["method"]: r["perplexity"] for r in rows}, f"Held-out perplexity at construction ({base.num_experts} experts, top-{base.top_k})",
                  "perplexity (log scale)", tmp / "compare-init.png", log=True)
        for name in methods:  # the MoE checkpoints are large; the table, JSON and chart stay
            shutil.rmtree(tmp / name)
    return rows


def format_table(rows: list[dict]) -> str:
    lines = ["| method | held-out perplexity | active / total params | expert size | shared | scale |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['perplexity']:.2f} | {r['active_params'] / 1e6:.1f}M / {r['total_params'] / 1e6:.1f}M | "
                     f"{r['expert_size'] or '-'} | {r['shared_size'] or '-'} | {format(r['scale'], '.4g') if r['scale'] is not None else '-'} |")
    return "\n".join(lines)

