"""`moeify compare-init`: held-out perplexity of each construction method right after construction.

The zero-training column of LLaMA-MoE's ablation: the dense model first, then one MoE per method,
all with the same seed, calibration and held-out text, and either the same experts and top-k or
(--activation-ratio) the same fraction of the FFN active per token; with construction time.
"""

import json
import shutil
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import ClassVar

from moeify.build import BuildConfig, build
from moeify.checkpoint.atomic import atomic_directory
from moeify.checkpoint.dense import DenseCheckpoint
from moeify.checkpoint.manifest import Manifest
from moeify.checkpoint.resolve import resolve_model
from moeify.construct import ConstructionConfig, get_method
from moeify.construct.carve import activation_ratio, shape_at_ratio
from moeify.construct.methods import GranularUpcycle, Upcycle
from moeify.construct.options import share_settings
from moeify.data.embedded import pydoc_topics
from moeify.data.text import load_tokenizer, tokenize_joined
from moeify.errors import MoeifyError
from moeify.evaluate.params import parameter_counts
from moeify.evaluate.plots import bar_chart
from moeify.evaluate.scoring import blocks_of, score_blocks
from moeify.modeling.load import load_moe_model
from moeify.schema import at_least, given_names, replace_flat

DEFAULT_METHODS = ("upcycle", "random-split", "clustering", "co-activation", "sharing-inner", "sharing-inter", "gradient-greedy", "carve")
RATIO_METHODS = ("random-split", "clustering", "co-activation", "sharing-inner", "sharing-inter", "gradient-greedy", "carve")
SHARED_METHODS = ("sharing-inter", "carve")  # at a ratio these keep half the active blocks as a shared expert


@dataclass
class CompareInitConfig:
    RANGES: ClassVar[dict] = {"eval_tokens": at_least(1), "block_size": at_least(2), "blocks": at_least(2)}
    model: str
    """Dense model: a Hugging Face directory, a .gguf file, or an embedded name (smollm2-135m)."""
    out: Path = Path("moeify-compare-init")
    """Table, JSON and PNG go here."""
    methods: str | None = None
    """Comma-separated construction methods; default: all but the upcycling family at --activation-ratio, else the LLaMA-MoE set, upcycle and carve."""
    blocks: int = 16
    """With --activation-ratio r (active neurons / F): the FFN is cut into this many equal blocks; methods
    without a shared expert route r x blocks of them, carve and sharing-inter keep half of those shared."""
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


def arms(config: CompareInitConfig, base: ConstructionConfig, ffn_size: int) -> dict[str, ConstructionConfig]:
    """Label -> construction of every compared MoE."""
    ratio = base.carve.activation_ratio
    default = RATIO_METHODS if ratio is not None else DEFAULT_METHODS
    names = [m.strip() for m in config.methods.split(",") if m.strip()] if config.methods is not None else list(default)
    if not names:
        raise MoeifyError(f"--methods {config.methods!r} names no method; give a comma-separated list such as upcycle,carve "
                          "(`moeify inspect MODEL` lists them) or leave it out for the default set")
    if len(set(names)) != len(names):
        raise MoeifyError(f"--methods {config.methods!r} names a method twice; give each once")
    for name in names:
        method = get_method(name)
        if ratio is not None and isinstance(method, (Upcycle, GranularUpcycle)):
            raise MoeifyError(f"--method {name} copies the FFN into experts (activation 100% x k), so it has no place at "
                              f"--activation-ratio {ratio:g}; drop it from --methods")
    out: dict[str, tuple[ConstructionConfig, set[str]]] = {}
    for name in names:
        method = name
        settings: dict = {"method": method}
        if ratio is not None:
            shape = shape_at_ratio(ffn_size, ratio, config.blocks, method in SHARED_METHODS)
            settings.update(num_experts=shape.num_experts, top_k=shape.top_k, shared_size=shape.shared_size, activation_ratio=None)
        out[name] = (replace_flat(base, **settings), set())  # the settings above are compare-init's, not the user's
    # Each method counts as given the flags it reads; --activation-ratio is compare-init's own.
    return share_settings(out, set(given_names(config.construction)) - {"activation_ratio"}, "the compared methods")


def compare_init(config: CompareInitConfig, progress: bool = True) -> list[dict]:
    base = config.construction
    if base.data.calibration is None:
        base = replace(base, data=replace(base.data, calibration="embedded"))
    dense_dir = resolve_model(config.model)
    dense = DenseCheckpoint(dense_dir)
    constructions = arms(config, base, dense.ffn_size)
    tokenizer = load_tokenizer(dense_dir)
    try:
        blocks = blocks_of(tokenize_joined(tokenizer, pydoc_topics(heldout=True)), config.block_size, config.eval_tokens)
    except ValueError as error:
        raise MoeifyError(f"held-out text too short: {error}; lower --block-size") from None
    rows: list[dict] = []
    with atomic_directory(config.out, config.force, [config.model, dense_dir, *base.read_paths()], "compare-init") as tmp:
        for index, name in enumerate(["dense", *constructions]):
            if progress:
                print(f"[compare-init] {name}", file=sys.stderr, flush=True)
            start = time.perf_counter()
            if name == "dense":
                path, settings = dense_dir, {"activation_ratio": 1.0}
            else:
                path = build(BuildConfig(config.model, tmp / f"arm-{index}", constructions[name], force=True), progress=progress)
                manifest = Manifest.read(path)
                settings = {"expert_size": manifest.expert_size, "shared_size": manifest.shared_size, "scale": manifest.scale,
                            "num_experts": manifest.num_experts, "top_k": manifest.top_k,
                            "activation_ratio": activation_ratio(dense.ffn_size, manifest.expert_size, manifest.shared_size, manifest.top_k)}
            seconds = time.perf_counter() - start
            model, _ = load_moe_model(path)
            scores = score_blocks(model, blocks)
            total, active = parameter_counts(model)
            rows.append({"method": name, "perplexity": scores.perplexity, "mean_nll": scores.loss, "tokens": scores.tokens,
                         "total_params": total, "active_params": active, "expert_size": settings.get("expert_size"),
                         "shared_size": settings.get("shared_size", 0), "scale": settings.get("scale"),
                         "num_experts": settings.get("num_experts"), "top_k": settings.get("top_k"),
                         "activation_ratio": settings["activation_ratio"], "construction_seconds": None if name == "dense" else seconds})
            del model
            if progress:
                built = f", built in {seconds:.0f} s" if name != "dense" else ""
                print(f"[compare-init] {name}: held-out perplexity {scores.perplexity:.2f}{built}", file=sys.stderr, flush=True)
            if name != "dense":  # the MoE checkpoints are large; the table, JSON and chart stay
                shutil.rmtree(path)
        at_ratio = base.carve.activation_ratio is not None  # then each row has its own experts and top-k
        settings = {"model": config.model, "num_experts": None if at_ratio else base.num_experts,
                    "top_k": None if at_ratio else base.top_k, "seed": base.seed,
                    "activation_ratio": base.carve.activation_ratio, "blocks": config.blocks if at_ratio else None,
                    "calibration": base.data.calibration, "calibration_tokens": base.data.calibration_tokens,
                    "eval_tokens": int(blocks.numel()), "heldout": "Python help topics (held out)"}
        (tmp / "compare-init.json").write_text(json.dumps({"settings": settings, "rows": rows}, indent=2) + "\n")
        (tmp / "compare-init.md").write_text(format_table(rows) + "\n")
        ratio = base.carve.activation_ratio
        where = f"{ratio:.0%} active" if ratio else f"{base.num_experts} experts, top-{base.top_k}"
        bar_chart({r["method"]: r["perplexity"] for r in rows}, f"Held-out perplexity at construction ({where})",
                  "perplexity (log scale)", tmp / "compare-init.png", log=True)
    return rows


def format_table(rows: list[dict]) -> str:
    lines = ["| method | experts | active | held-out perplexity | construction | active / total params | expert size | shared | scale |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        experts = f"{r['num_experts']} top-{r['top_k']}" if r.get("num_experts") else "-"
        seconds = f"{r['construction_seconds']:.0f} s" if r.get("construction_seconds") is not None else "-"
        lines.append(f"| {r['method']} | {experts} | {r['activation_ratio']:.0%} | {r['perplexity']:.2f} | {seconds} | "
                     f"{r['active_params'] / 1e6:.1f}M / {r['total_params'] / 1e6:.1f}M | "
                     f"{r['expert_size'] or '-'} | {r['shared_size'] or '-'} | {format(r['scale'], '.4g') if r['scale'] is not None else '-'} |")
    return "\n".join(lines)
