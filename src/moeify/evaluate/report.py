"""`moeify report RUN_DIR`: one self-contained HTML page (PNGs embedded) from a run's metrics and evaluations."""

import base64
import html
import math
import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path

from moeify.checkpoint.atomic import atomic_file, check_output
from moeify.errors import MoeifyError
from moeify.evaluate.plots import expert_share_heatmaps, line_plot
from moeify.evaluate.run import EVAL_JSON, format_report
from moeify.json_file import read_json, read_jsonl

REPORT = "report.html"
GENERATOR = '<meta name="generator" content="moeify report">'


@dataclass
class ReportConfig:
    run: Path
    """A `moeify train` --out directory."""
    evals: list[Path] | None = None
    """Eval output folder(s) to include (default: the run's eval*/ folders)."""
    out: Path | None = None
    """The HTML file; default: RUN/report.html."""
    force: bool = False
    """Replace --out if it is a report moeify wrote."""


def run_report(config: ReportConfig) -> str:
    return f"wrote {build_report(config.run, config.evals, config.out, config.force)}"


def is_report(path: Path) -> bool:
    with open(path, "rb") as f:
        return GENERATOR.encode() in f.read(4096)


def build_report(run_dir: Path, eval_dirs: list[Path] | None = None, out: Path | None = None, force: bool = False) -> Path:
    metrics_file = run_dir / "metrics.jsonl"
    if not metrics_file.is_file():
        raise MoeifyError(f"{run_dir} has no metrics.jsonl; point `moeify report` at a `moeify train` run directory")
    for eval_dir in eval_dirs or []:
        if not (eval_dir / EVAL_JSON).is_file():
            raise MoeifyError(f"--eval {eval_dir} has no {EVAL_JSON}; give a folder `moeify eval --out` wrote")
    out = out or run_dir / REPORT
    reads = [metrics_file, run_dir / "config.yaml", *(eval_dirs or [])]
    check_output(out, force, reads, ours=is_report)
    records = read_jsonl(metrics_file, "point `moeify report` at a `moeify train` run directory", last_may_be_cut=True)
    with tempfile.TemporaryDirectory() as figures, atomic_file(out, force, reads, is_report) as tmp:
        tmp.write_text(_html(run_dir, records, _sections(run_dir, records, eval_dirs, Path(figures))))
    return out


def _training_steps(records: list[dict]) -> list[dict]:
    """The records of optimizer steps (step 0 holds only the first evaluation)."""
    return [r for r in records if r.get("step", 0) > 0 and "loss" in r]


def _sections(run_dir: Path, records: list[dict], eval_dirs: list[Path] | None, figures: Path) -> list[tuple[str, list[Path], str]]:
    sections: list[tuple[str, list[Path], str]] = []
    steps = _training_steps(records)
    if steps:
        series = {"all": ([r["step"] for r in steps], [r["loss"] for r in steps])}
        for domain in sorted({d for r in steps for d in r.get("domain_loss", {})}):
            points = [(r["step"], r["domain_loss"][domain]) for r in steps if domain in r.get("domain_loss", {})]
            series[domain] = ([p[0] for p in points], [p[1] for p in points])
        plots = [line_plot(series, "training loss", "step", "loss (nats/token)", figures / "loss.png")]
        evals = [r for r in records if "heldout_loss" in r]
        if evals:
            held = {d: ([r["step"] for r in evals], [r["heldout_loss"][d] for r in evals]) for d in evals[0]["heldout_loss"]}
            plots.append(line_plot(held, "held-out loss per domain", "step", "loss (nats/token)", figures / "heldout.png"))
        sections.append(("Loss", plots, ""))
        weighted = [r for r in records if "domain_weights" in r]
        if weighted:
            weights = {d: ([r.get("step", 0) for r in weighted], [r["domain_weights"][d] for r in weighted])
                       for d in weighted[0]["domain_weights"]}
            sections.append(("Domain weights", [line_plot(weights, "domain sampling weights", "step", "weight", figures / "weights.png")], ""))
        if "expert_load" in steps[-1]:
            first, last = steps[0], steps[-1]
            loads = {f"step {first['step']}": first["expert_load"], f"step {last['step']}": last["expert_load"]}
            extra = [line_plot({"router entropy": ([r["step"] for r in steps], [r["router_entropy"] for r in steps])},
                               "mean router entropy", "step", "nats", figures / "entropy.png")]
            sections.append(("Expert load", [expert_share_heatmaps(loads, "training batch: share of each expert", figures / "load.png"), *extra],
                             f"dropped tokens in the last step: {last.get('dropped_tokens', 0)}"))
    for eval_dir in eval_dirs if eval_dirs is not None else sorted(run_dir.glob("eval*")):
        if (eval_dir / EVAL_JSON).is_file():
            report = read_json(eval_dir / EVAL_JSON, "run `moeify eval` again")
            sections.append((f"Evaluation: {eval_dir.name}", sorted(eval_dir.glob("*.png")), format_report(report)))
    if not sections:
        raise MoeifyError(f"{run_dir}/metrics.jsonl has no training steps and there is no evaluation to report")
    return sections


def _summary(records: list[dict]) -> str:
    """The run in one table before the plots: how far it got, how fast, and where its losses ended."""
    steps = _training_steps(records)
    if not steps:
        return "<p>no training steps logged</p>"
    last = steps[-1]
    rows = [("steps", f"{last['step']:,}"), ("tokens", f"{last.get('tokens', 0):,}"),
            ("final training loss (nats/token)", f"{last['loss']:.4f}")]
    speeds = [r["tokens_per_s"] for r in steps if r.get("tokens_per_s")]
    if speeds:
        rows.append(("tokens/s (median step)", f"{statistics.median_high(speeds):,.0f}"))
    mfus = [r["mfu"] for r in steps if r.get("mfu") is not None]
    if mfus:
        rows.append(("MFU (median step, activated parameters)", f"{100 * statistics.median_high(mfus):.1f}%"))
    evals = [r for r in records if "heldout_loss" in r]
    if evals:
        first, final = evals[0], evals[-1]
        for domain, loss in final["heldout_loss"].items():
            start = first["heldout_loss"].get(domain)
            change = f" (step {first['step']}: {start:.4f}, perplexity {math.exp(start):,.2f})" if start is not None and first is not final else ""
            rows.append((f"held-out {domain}, step {final['step']}", f"loss {loss:.4f}, perplexity {math.exp(loss):,.2f}{change}"))
    cells = "".join(f"<tr><th>{html.escape(name)}</th><td>{html.escape(value)}</td></tr>" for name, value in rows)
    return f"<table class='summary'>{cells}</table>"


def _html(run_dir: Path, records: list[dict], sections: list[tuple[str, list[Path], str]]) -> str:
    config = (run_dir / "config.yaml").read_text() if (run_dir / "config.yaml").is_file() else ""
    parts = [f"<h1>moeify run: {html.escape(run_dir.name)}</h1>", _summary(records)]
    for title, images, text in sections:
        parts.append(f"<h2>{html.escape(title)}</h2>")
        if text:
            parts.append(f"<pre>{html.escape(text)}</pre>")
        for image in images:
            data = base64.b64encode(image.read_bytes()).decode()
            parts.append(f'<img alt="{html.escape(image.stem)}" src="data:image/png;base64,{data}">')
    if config:
        parts.append(f"<h2>Configuration</h2><pre>{html.escape(config)}</pre>")
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto}img{max-width:100%;display:block;margin:1em 0}pre{background:#f4f4f4;padding:1em;overflow-x:auto}"
             ".summary th{text-align:left;padding-right:2em;font-weight:normal;color:#555}")
    return f"<!doctype html><html><head>{GENERATOR}<meta charset='utf-8'><title>moeify report</title><style>{style}</style></head><body>{''.join(parts)}</body></html>\n"
