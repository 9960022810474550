"""`moeify experiment NAME`: one comparison of the papers, every arm with the same data, token
budget and seed, evaluated per domain, written as a table, JSON and plots.

An experiment is a YAML file (experiments/NAME.yaml): a model, shared `build:` and `train:`
settings, and `arms`, each a name with its own `build:` (absent: the dense model itself) and
`train:` overrides (absent or empty `train:` for an arm that is only evaluated at construction).
An arm with `after: NAME` trains, instead, the model an earlier arm trained (a second stage: layer-wise
then end-to-end distillation); its token counts continue that arm's.
"""

import json
import shutil
import statistics
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar

import torch

from moeify.build import BuildConfig, build
from moeify.checkpoint.atomic import claim_directory, discard_unused, safe_name
from moeify.checkpoint.resolve import resolve_model
from moeify.construct import ConstructionConfig
from moeify.construct.options import share_settings
from moeify.data.packed import PackedDataset
from moeify.data.prepare import PrepareConfig, prepare
from moeify.errors import MoeifyError
from moeify.evaluate.plots import bar_chart, line_plot
from moeify.evaluate.run import EvalConfig, evaluate
from moeify.json_file import read_jsonl
from moeify.modeling.load import load_moe_model
from moeify.schema import at_least, from_flat, leaf_names, unknown_keys_error
from moeify.train.config import TrainConfig
from moeify.train.loop import train
from moeify.yaml_file import read_yaml

EXPERIMENTS_DIR = Path(__file__).resolve().parent / "experiments"  # package data: works from an installed moeify
TRAIN_KEYS = leaf_names(TrainConfig) - {"model", "data", "out"}
BUILD_KEYS = leaf_names(ConstructionConfig)
DOCUMENT_KEYS = {"name", "description", "model", "build", "train", "arms"}
ARM_KEYS = {"name", "build", "train", "after"}


@dataclass
class ExperimentConfig:
    RANGES: ClassVar[dict] = {"max_tokens": at_least(1), "eval_tokens": at_least(1)}
    spec: str
    """A shipped experiment (construction, scale, sampling, upcycle-vs-dense, capacity, distill, refit) or a .yaml path."""
    out: Path | None = None
    """Default: moeify-experiments/NAME."""
    model: str | None = None
    """Override the experiment's model."""
    max_tokens: int | None = None
    """Override the token budget of every arm."""
    eval_tokens: int = 4096
    """Held-out tokens per domain and model in the final evaluation."""
    force: bool = False
    data: str | None = None
    """Prepared data (`moeify data prepare`); default: the embedded corpus for the model."""


def load_experiment(spec: str) -> dict:
    path = Path(spec) if spec.endswith((".yaml", ".yml")) else EXPERIMENTS_DIR / f"{spec}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in EXPERIMENTS_DIR.glob("*.yaml")))
        raise MoeifyError(f"no experiment {spec!r}; choose one of: {known} (or give a .yaml path)")
    document = read_yaml(path, f"experiment {path}", "the built-in ones in moeify/experiments/ are examples")
    if not isinstance(document, dict) or not isinstance(document.get("arms"), list) or "model" not in document:
        raise MoeifyError(f"{path}: an experiment is a mapping with a model and a list of arms")
    if not document["arms"]:
        raise MoeifyError(f"{path}: the list of arms is empty; give at least one arm (a name, and build: or train:)")
    _refuse_unknown(set(document) - DOCUMENT_KEYS, DOCUMENT_KEYS, f"{path}")
    _refuse_unknown(set(document.get("build") or {}) - BUILD_KEYS, BUILD_KEYS, f"{path} (build:)")
    _refuse_unknown(set(document.get("train") or {}) - TRAIN_KEYS, TRAIN_KEYS, f"{path} (train:)")
    for arm in document["arms"]:
        if not isinstance(arm, dict) or "name" not in arm:
            raise MoeifyError(f"{path}: every arm is a mapping with a name")
        safe_name(str(arm["name"]), f"{path}: the arm name")
        where = f"{path}, arm {arm['name']!r}"
        _refuse_unknown(set(arm) - ARM_KEYS, ARM_KEYS, where)
        _refuse_unknown(set(arm.get("build") or {}) - BUILD_KEYS, BUILD_KEYS, f"{where} (build:)")
        _refuse_unknown(set(arm.get("train") or {}) - TRAIN_KEYS, TRAIN_KEYS, f"{where} (train:)")
    names = [arm["name"] for arm in document["arms"]]
    for index, arm in enumerate(document["arms"]):
        if "after" in arm:
            trained = [a["name"] for a in document["arms"][:index] if a.get("train") is not None]
            if arm["after"] not in trained or "build" in arm or arm.get("train") is None:
                raise MoeifyError(f"{path}, arm {arm['name']!r}: `after:` names an earlier arm that trains ({', '.join(trained) or 'none'}) "
                                  "and the arm trains that arm's model: give it a train: section and no build:")
    if len(set(names)) != len(names):
        raise MoeifyError(f"{path}: arm names repeat ({', '.join(sorted({n for n in names if names.count(n) > 1}))}); each arm "
                          "writes to arms/NAME, so give each a name of its own")
    return document


def _refuse_unknown(unknown: set[str], known: set[str], where: str) -> None:
    if unknown:
        raise unknown_keys_error(unknown, known, where)


def run_experiment_command(config: ExperimentConfig) -> str:
    out = config.out or Path("moeify-experiments") / Path(config.spec).stem
    result = run_experiment(replace(config, out=out))
    return f"{format_results(result)}\nwrote {out}"


def _log(message: str) -> None:
    print(f"[experiment] {message}", file=sys.stderr, flush=True)


def run_experiment(config: ExperimentConfig) -> dict:
    document = load_experiment(config.spec)
    model = config.model or document["model"]
    constructions = _constructions(document)
    dense_dir = resolve_model(model)
    shared_train = dict(document.get("train", {}))
    if config.max_tokens is not None:
        shared_train["max_tokens"] = config.max_tokens
    for arm in document["arms"]:  # every arm's training settings checked before any work
        if arm.get("train") is not None:
            from_flat(TrainConfig, {**shared_train, **arm["train"], "model": "-", "data": "-", "out": "-"}, f"experiment {arm['name']!r} (train:)")
    claim_directory(config.out, config.force, [model, dense_dir, config.data, config.spec], "experiment")
    try:
        return _run_arms(config, document, model, dense_dir, constructions, shared_train)
    except BaseException:
        discard_unused(config.out)
        raise


def _run_arms(config: ExperimentConfig, document: dict, model: str, dense_dir: Path, constructions: dict, shared_train: dict) -> dict:
    if config.data is not None:
        data = PackedDataset(Path(config.data))
        seq_len = shared_train["seq_len"] = data.seq_len  # the data decides the block length
    else:
        seq_len = shared_train.get("seq_len", TrainConfig.seq_len)
        data = prepare(PrepareConfig(model, seq_len=seq_len), progress=False)
    probe = data.blocks(data.domains[0], "val", 2).long()  # held-out blocks for |Δlogit| at construction
    dense_logits = _logits(dense_dir, probe)
    arms = []
    for arm in document["arms"]:
        name = arm["name"]
        _log(f"arm {name}")
        arm_dir = config.out / "arms" / name
        start, before = dense_dir, None
        if name in constructions:
            start = build(BuildConfig(model, arm_dir / "init", constructions[name]), progress=False)
        if "after" in arm:
            before = next(a for a in arms if a["name"] == arm["after"])
            start = Path(before["model"])
        record = {"name": name, "build": arm.get("build"), "init_max_abs_logit_diff": (_logits(start, probe) - dense_logits).abs().max().item()}
        if before is not None:
            record["after"] = before["name"]
        if arm.get("train") is not None:
            train_settings = {**shared_train, **arm["train"], "model": str(start), "data": str(data.path), "out": str(arm_dir / "run")}
            train_config = from_flat(TrainConfig, train_settings, f"experiment {name!r} (train:)")
            result = train(train_config)
            record.update(_run_summary(arm_dir / "run", before["tokens"] if before else 0), train=arm["train"], seed=train_config.seed,
                          model=str(result.model_dir))
        else:
            record["model"] = str(start)
        arms.append(record)
    _log("evaluating every arm on the held-out text")
    report = evaluate(EvalConfig([a["model"] for a in arms], config.out / "eval", seq_len=seq_len, max_tokens=config.eval_tokens), progress=False)
    for arm, evaluated in zip(arms, report["models"]):
        arm["eval"] = {d: round(s["bits_per_byte"], 4) for d, s in evaluated["domains"].items()}
        arm["eval"]["all"] = round(evaluated["all_domains"]["bits_per_byte"], 4)
    result = {"experiment": document["name"], "description": document.get("description", ""), "model": model,
              "train": shared_train, "build": document.get("build", {}), "arms": arms}
    (config.out / "experiment.json").write_text(json.dumps(result, indent=2) + "\n")
    (config.out / "results.md").write_text(format_results(result) + "\n")
    _plots(result, config.out)
    for arm in document["arms"]:  # checkpoints are large; the tables, metrics and plots stay
        for sub in ("init", "run/model", "run/checkpoints"):
            shutil.rmtree(config.out / "arms" / arm["name"] / sub, ignore_errors=True)
    return result


def _constructions(document: dict) -> dict[str, ConstructionConfig]:
    """Arm name -> its construction: the build: section under the arm's own build: (arms with one)."""
    shared = document.get("build") or {}
    arms = {arm["name"]: (from_flat(ConstructionConfig, {**shared, **arm["build"]}, f"experiment {arm['name']!r} (build:)"), set(arm["build"]))
            for arm in document["arms"] if arm.get("build") is not None}
    return share_settings(arms, set(shared), "the arms") if arms else {}


@torch.no_grad()
def _logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    model, _ = load_moe_model(path)
    return model.eval()(ids).logits


def _run_summary(run: Path, tokens_before: int = 0) -> dict:
    """`tokens_before`: tokens an earlier stage trained the model on (`after:`), added to this run's counts."""
    records = read_jsonl(run / "metrics.jsonl", "run the experiment again", last_may_be_cut=True)
    steps = [r for r in records if "loss" in r and "tokens_per_s" in r]
    evals = [r for r in records if "heldout_loss" in r]
    heldout = lambda r: statistics.mean(r["heldout_loss"].values())  # noqa: E731
    layerwise = "layer_loss" in steps[-1]
    return {
        "tokens": tokens_before + steps[-1]["tokens"], "steps": len(steps),
        "objective": "layerwise" if layerwise else "distill" if "kd_loss" in steps[-1] else "cross-entropy",
        "heldout_start": round(heldout(evals[0]), 4), "heldout_end": round(heldout(evals[-1]), 4),
        "heldout_end_domains": {d: round(v, 4) for d, v in evals[-1]["heldout_loss"].items()},
        "tokens_per_s": round(statistics.median(r["tokens_per_s"] for r in steps[1:] or steps), 1),
        "dropped_fraction": round(statistics.mean(r.get("dropped_fraction", 0.0) for r in steps), 4),
        "curve": [(tokens_before + r["tokens"], r["loss"]) for r in steps],
        "heldout_curve": [(tokens_before + r.get("tokens", 0), heldout(r)) for r in evals],
    }


def format_results(result: dict) -> str:
    train = result["train"]
    lines = [f"# {result['experiment']}", "", result["description"].strip(), "",
             f"Model {result['model']}; every trained arm: {train.get('max_tokens')} tokens, seed {train.get('seed', 0)}, "
             f"sequences of {train.get('seq_len', TrainConfig.seq_len)}, batch {train.get('batch_size', TrainConfig.batch_size)}.", "",
             "| arm | max \\|Δlogit\\| vs dense at init | training (tokens in all) | held-out loss start → end | bits/byte (all) "
             "| tokens/s (× first) | dropped |",
             "|---|---:|---|---:|---:|---:|---:|"]
    base = next((a.get("tokens_per_s") for a in result["arms"] if a.get("tokens_per_s")), None)
    for arm in result["arms"]:
        trained = "tokens_per_s" in arm
        loss = f"{arm['heldout_start']:.3f} → {arm['heldout_end']:.3f}" if trained else "(not trained)"
        speed = f"{arm['tokens_per_s']:.0f} ({arm['tokens_per_s'] / base:.2f}×)" if trained and base else "-"
        dropped = f"{arm['dropped_fraction']:.1%}" if trained else "-"
        how = f"{arm.get('objective', 'cross-entropy')}{' after ' + arm['after'] if 'after' in arm else ''} ({arm['tokens']:,})" if trained else "-"
        lines.append(f"| {arm['name']} | {arm['init_max_abs_logit_diff']:.2e} | {how} | {loss} | {arm['eval']['all']:.4f} | {speed} | {dropped} |")
    domains = [d for d in result["arms"][0]["eval"] if d != "all"]
    lines += ["", "Bits per byte per domain (final evaluation, embedded held-out text):", "",
              "| arm | " + " | ".join(domains) + " |", "|---|" + "---:|" * len(domains)]
    for arm in result["arms"]:
        lines.append(f"| {arm['name']} | " + " | ".join(f"{arm['eval'][d]:.4f}" for d in domains) + " |")
    return "\n".join(lines)


def _plots(result: dict, out: Path) -> None:
    """Training loss (next-token CE, and the CE of distillation runs; a layer-wise run's loss is another quantity)
    and held-out loss against tokens."""
    arms = [a for a in result["arms"] if "curve" in a]
    curves = {a["name"]: ([t for t, _ in a["curve"]], [loss for _, loss in a["curve"]]) for a in arms if a.get("objective") != "layerwise"}
    if curves:
        line_plot(curves, f"{result['experiment']}: training loss", "tokens", "loss", out / "loss.png")
    held = {a["name"]: ([t for t, _ in a["heldout_curve"]], [loss for _, loss in a["heldout_curve"]]) for a in arms}
    if held:
        line_plot(held, f"{result['experiment']}: held-out loss", "tokens", "held-out loss (nats/token)", out / "heldout.png")
    bar_chart({a["name"]: a["eval"]["all"] for a in result["arms"]}, f"{result['experiment']}: held-out bits per byte",
              "bits per byte", out / "bits_per_byte.png")
