"""`moeify eval`: per-domain loss / perplexity / bits per byte of several models side by side, and
routing analysis of the MoE ones. The first model is the baseline column."""

import csv
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from moeify.checkpoint.atomic import atomic_directory, check_output
from moeify.data.sources import source_paths
from moeify.evaluate.models import load_for_eval, read_paths
from moeify.evaluate.plots import expert_share_heatmaps
from moeify.evaluate.routing import RoutingStats, top_expert_change
from moeify.evaluate.scoring import score_documents
from moeify.evaluate.text import evaluation_documents
from moeify.schema import at_least

EVAL_JSON = "eval.json"


@dataclass
class EvalConfig:
    RANGES: ClassVar[dict] = {"seq_len": at_least(1), "max_tokens": at_least(1), "batch_size": at_least(1), "lm_eval_limit": at_least(1)}
    models: list[str]
    """Models (directories, runs, .gguf, embedded names); the first is the baseline."""
    out: Path = Path("moeify-eval")
    """Where eval.json/csv and plots go."""
    sources: list[str] = field(default_factory=list)
    """DOMAIN=PATH evaluation text, repeat per domain; default: the embedded corpus's held-out documents."""
    seq_len: int = 512
    """Predictions per window."""
    max_tokens: int = 8192
    """Predicted tokens per domain and model (documents in order, the last one cut)."""
    batch_size: int = 4
    force: bool = False
    """Replace --out if it exists."""
    lm_eval: str | None = None
    """Also run lm-evaluation-harness tasks (comma-separated)."""
    lm_eval_include: Path | None = None
    """Folder of extra lm-eval task YAMLs."""
    lm_eval_limit: int | None = None
    """Examples per lm-eval task."""


def run_eval(config: EvalConfig) -> str:
    report = evaluate(config)
    lines = [format_report(report)]
    if config.lm_eval:
        from moeify.evaluate.lm_eval_bridge import run_lm_eval

        tasks = [t.strip() for t in config.lm_eval.split(",") if t.strip()]
        scores = {m: run_lm_eval(m, tasks, config.lm_eval_include, config.lm_eval_limit) for m in config.models}
        (config.out / "lm_eval.json").write_text(json.dumps(scores, indent=2) + "\n")
        for model, task_scores in scores.items():
            for task, metrics in task_scores.items():
                lines.append(f"lm-eval {task:<20} {model}: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
    return "\n".join([*lines, f"wrote {config.out}"])


def label_of(spec: str, index: int) -> str:
    name = Path(spec).name if Path(spec).name not in ("model", "") else Path(spec).parent.name
    return f"{index}-{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)}"


def evaluate(config: EvalConfig, progress: bool = True) -> dict:
    reads = [path for spec in config.models for path in read_paths(spec)] + source_paths(config.sources)
    check_output(config.out, config.force, reads)
    documents = evaluation_documents(config.sources)
    report = {"settings": {"seq_len": config.seq_len, "max_tokens_per_domain": config.max_tokens,
                           "sources": config.sources or "embedded held-out"}, "models": []}
    top_experts: dict[str, dict[str, list]] = {}
    with atomic_directory(config.out, config.force, reads, "eval") as tmp:
        for index, spec in enumerate(config.models):
            label = label_of(spec, index)
            if progress:
                print(f"[eval] {label}", file=sys.stderr, flush=True)
            path, model, tokenizer, blocks = load_for_eval(spec)
            entry = {"label": label, "model": spec, "path": str(path), "architecture": model.config.architectures[0],
                     "tokenizer_vocab": len(tokenizer), "domains": {}, "routing": {}}
            top_experts[label] = {}
            for domain, docs in documents.items():
                stats = RoutingStats(blocks) if blocks else None
                score = score_documents(model, tokenizer, docs, config.seq_len, config.max_tokens, config.batch_size,
                                        on_batch=stats.collect if stats else None)
                entry["domains"][domain] = score.summary()
                if stats is not None:
                    entry["routing"][domain] = stats.summary()
                    top_experts[label][domain] = stats.top_experts()
            total = {k: sum(d[k] for d in entry["domains"].values()) for k in ("nll_nats", "tokens", "bytes")}
            entry["all_domains"] = {**total, "bits_per_byte": total["nll_nats"] / 0.6931471805599453 / total["bytes"]}
            if blocks:
                shares = {domain: r["share"] for domain, r in entry["routing"].items()}
                expert_share_heatmaps(shares, f"{label}: share of each expert, per layer and domain", tmp / f"routing-{label}.png")
            report["models"].append(entry)
            del model
        report["top_expert_change"] = _top_expert_changes(report["models"], top_experts)
        (tmp / EVAL_JSON).write_text(json.dumps(report, indent=2) + "\n")
        _write_csv(report, tmp)
    return report


def _top_expert_changes(models: list[dict], top_experts: dict) -> list[dict]:
    """For consecutive MoE models of the same shape and tokenizer: fraction of tokens whose top expert changed."""
    changes = []
    moes = [m for m in models if m["routing"]]
    for first, second in zip(moes, moes[1:]):
        a, b = top_experts[first["label"]], top_experts[second["label"]]
        same_shape = all(len(a[d]) == len(b[d]) and all(x.shape == y.shape for x, y in zip(a[d], b[d])) for d in a)
        if first["tokenizer_vocab"] != second["tokenizer_vocab"] or not same_shape:
            continue
        changes.append({"from": first["label"], "to": second["label"],
                        "per_domain": {d: top_expert_change(a[d], b[d]) for d in a}})
    return changes


def _write_csv(report: dict, out: Path) -> None:
    with open(out / "eval.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["model", "domain", "tokens", "bytes", "loss", "perplexity", "bits_per_byte"])
        for m in report["models"]:
            for domain, s in m["domains"].items():
                writer.writerow([m["label"], domain, s["tokens"], s["bytes"], f"{s['loss']:.6f}", f"{s['perplexity']:.4f}",
                                 f"{s['bits_per_byte']:.6f}"])
    with open(out / "routing.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["model", "domain", "layer", "expert", "share", "router_entropy"])
        for m in report["models"]:
            for domain, r in m["routing"].items():
                for layer, row in enumerate(r["share"]):
                    for expert, share in enumerate(row):
                        writer.writerow([m["label"], domain, layer, expert, f"{share:.6f}", f"{r['router_entropy'][layer]:.6f}"])


def format_report(report: dict) -> str:
    """Bits per byte per domain (and the change against the first model), perplexity in its own tokens."""
    models = report["models"]
    domains = list(models[0]["domains"]) + ["all_domains"]
    header = f"{'domain':<14}" + "".join(f"{m['label'][:22]:>26}" for m in models)
    lines = ["bits per byte (tokenizer-independent; Δ vs the first model):", header, "-" * len(header)]
    for domain in domains:
        base = models[0]["domains"].get(domain, models[0].get(domain))["bits_per_byte"]
        cells = []
        for m in models:
            value = (m["domains"].get(domain) or m[domain])["bits_per_byte"]
            cells.append(f"{value:>12.4f}" + (f" ({value - base:+.4f})" if m is not models[0] else " " * 10))
        lines.append(f"{domain:<14}" + "".join(f"{c:>26}" for c in cells))
    lines += ["", "perplexity (per token of each model's own tokenizer):", header, "-" * len(header)]
    for domain in domains[:-1]:
        lines.append(f"{domain:<14}" + "".join(f"{m['domains'][domain]['perplexity']:>26.3f}" for m in models))
    for change in report["top_expert_change"]:
        mean = {d: sum(v) / len(v) for d, v in change["per_domain"].items()}
        lines.append(f"\ntop expert changed {change['from']} -> {change['to']} (mean over layers): "
                     + ", ".join(f"{d} {v:.1%}" for d, v in mean.items()))
    return "\n".join(lines)
