"""`moeify experiment`: every arm trained alike, evaluated, reported."""

import json

import yaml

from moeify.cli import main
from moeify.experiment import EXPERIMENTS_DIR, load_experiment

SHIPPED = ["construction", "scale", "sampling", "upcycle-vs-dense", "capacity", "distill", "refit"]


def test_shipped_experiments_parse_and_give_every_arm_the_same_budget():
    for name in SHIPPED:
        document = load_experiment(name)
        assert document["name"] == name and len(document["arms"]) >= 2
        budget = document["train"].get("max_tokens")
        arms = {arm["name"]: arm for arm in document["arms"]}
        for arm in document["arms"]:
            train = arm.get("train") or {}
            assert "seed" not in train
            if "after" in arm:  # a second stage: the two stages together have the budget
                assert train["max_tokens"] + arms[arm["after"]]["train"]["max_tokens"] == budget, arm
            elif not any(other.get("after") == arm["name"] for other in document["arms"]):
                assert "max_tokens" not in train, arm
    assert sorted(p.stem for p in EXPERIMENTS_DIR.glob("*.yaml")) == sorted(SHIPPED)


def test_a_tiny_experiment_runs_end_to_end(tiny_models, tiny_data, tmp_path, capsys):
    spec = tmp_path / "tiny.yaml"
    spec.write_text(yaml.safe_dump({
        "name": "tiny", "description": "dense vs upcycled, tiny", "model": str(tiny_models["llama"]),
        "build": {"method": "upcycle", "num_experts": 4, "top_k": 2},
        "train": {"max_tokens": 8 * 32 * 3, "batch_size": 8, "micro_batch": 4, "lr": 3e-3, "warmup_steps": 1, "seed": 3, "eval_blocks": 2},
        "arms": [{"name": "dense", "train": {}}, {"name": "upcycle", "build": {}, "train": {}},
                 {"name": "split-at-init", "build": {"method": "random-split"}},
                 {"name": "split-layerwise", "build": {"method": "random-split"}, "train": {"layerwise": True, "max_tokens": 8 * 32}},
                 {"name": "split-layerwise-distill", "after": "split-layerwise", "train": {"distill": True, "max_tokens": 8 * 32 * 2}}],
    }))
    out = tmp_path / "out"
    assert main(["experiment", str(spec), "--data", str(tiny_data), "--eval-tokens", "256", "--out", str(out)]) == 0
    result = json.loads((out / "experiment.json").read_text())
    arms = {a["name"]: a for a in result["arms"]}
    assert arms["upcycle"]["init_max_abs_logit_diff"] <= 1e-4  # upcycling starts exactly at dense
    assert arms["split-at-init"]["init_max_abs_logit_diff"] > 1e-3 and "tokens" not in arms["split-at-init"]
    assert arms["dense"]["tokens"] == arms["upcycle"]["tokens"] == 8 * 32 * 3
    assert arms["dense"]["seed"] == arms["upcycle"]["seed"] == 3
    assert arms["upcycle"]["heldout_end"] < arms["upcycle"]["heldout_start"]  # it trained
    stages = arms["split-layerwise"], arms["split-layerwise-distill"]
    assert [a["objective"] for a in stages] == ["layerwise", "distill"] and stages[1]["after"] == "split-layerwise"
    assert stages[1]["tokens"] == 8 * 32 * 3 and stages[1]["curve"][0][0] == 8 * 32 * 2  # counted on from the first stage
    assert abs(stages[1]["heldout_start"] - stages[0]["heldout_end"]) < 2e-4  # the second stage starts from the first one's model
    assert (out / "loss.png").read_bytes()[:4] == (out / "bits_per_byte.png").read_bytes()[:4] == (out / "heldout.png").read_bytes()[:4] == b"\x89PNG"
    table = (out / "results.md").read_text()
    assert "| upcycle |" in table and "| split-at-init |" in table
    assert not (out / "arms" / "upcycle" / "run" / "model").exists()  # checkpoints removed, metrics kept
    assert (out / "arms" / "upcycle" / "run" / "metrics.jsonl").is_file()


def test_unknown_experiment_is_a_one_line_error(capsys):
    assert main(["experiment", "nope"]) == 2
    error = capsys.readouterr().err
    assert "construction" in error and error.count("\n") == 1


def test_experiments_ship_inside_the_wheel(tmp_path):
    """`moeify experiment NAME` must work from an installed package, not only from a source checkout."""
    import shutil
    import subprocess
    import sys
    import zipfile
    from pathlib import Path

    root, source = Path(__file__).parents[1], tmp_path / "source"  # built from a copy: no build/ left in the checkout
    shutil.copytree(root / "src", source / "src", ignore=shutil.ignore_patterns("*.egg-info", "__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(root / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "--quiet", "-w", str(tmp_path)],
                   check=True, capture_output=True)
    wheel = next(tmp_path.glob("moeify-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert sorted(Path(n).stem for n in names if n.startswith("moeify/experiments/") and n.endswith(".yaml")) == sorted(SHIPPED)


def test_a_misspelt_key_in_an_experiment_is_refused_with_a_suggestion(tmp_path, capsys):
    spec = tmp_path / "typo.yaml"
    spec.write_text(yaml.safe_dump({"name": "typo", "model": "smollm2-135m", "arms": [{"name": "a", "train": {"max_token": 5}}]}))
    assert main(["experiment", str(spec), "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert "max_token (did you mean max_tokens?)" in error and error.count("\n") == 1


def test_an_after_arm_must_follow_an_arm_that_trains(tmp_path, capsys):
    spec = tmp_path / "after.yaml"
    spec.write_text(yaml.safe_dump({"name": "after", "model": "smollm2-135m", "arms": [
        {"name": "b", "after": "a", "train": {}}, {"name": "a", "build": {"method": "random-split"}, "train": {}}]}))
    assert main(["experiment", str(spec), "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert "arm 'b': `after:` names an earlier arm that trains (none)" in error and error.count("\n") == 1
