"""The mechanisms of issue 31, walked over every verb and every schema rather than case by case:
the one output rule, finite numbers, settings a construction ignores, the checkpoint writer's tensor set."""

import json
import shutil
import typing
from pathlib import Path

import pytest
import torch

from moeify.checkpoint.atomic import MARKER
from moeify.cli import VERBS, _load
from moeify.construct import ConstructionConfig
from moeify.construct.options import (
    conditional_settings,
    refuse_unread,
    requested_router_init,
    settings_read,
    share_settings,
)
from moeify.construct.registry import METHODS
from moeify.errors import MoeifyError
from moeify.schema import COMMAND_LINE, base_type, coerce, from_flat, leaves
from tests.conftest import error_lines


def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture
def ctx(tiny_models, tiny_moe, tiny_data, tmp_path) -> dict:
    model = tmp_path / "model"
    shutil.copytree(tiny_models["llama"], model)
    moe = tmp_path / "moe"
    shutil.copytree(tiny_moe, moe)
    run = tmp_path / "run"
    run.mkdir()
    records = [{"step": 0, "tokens": 0, "domain_weights": {"a": 1.0}}, {"step": 1, "loss": 1.0, "tokens": 8}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return {"tmp": tmp_path, "model": model, "moe": moe, "data": tiny_data, "run": run}


TRAIN_FLAGS = ["--batch-size", "8", "--micro-batch", "4", "--max-tokens", "512", "--eval-blocks", "1", "--no-export"]
# verb -> (its input that an output must never replace, the command with OUT for the output)
WRITERS: dict[str, typing.Callable[[dict], tuple[Path, list[str]]]] = {
    "build": lambda c: (c["model"], ["build", str(c["model"]), "--out", "OUT"]),
    "split": lambda c: (c["model"], ["split", str(c["model"]), "--method", "random-split", "--num-experts", "4", "--out", "OUT"]),
    "export": lambda c: (c["moe"], ["export", str(c["moe"]), "--out", "OUT"]),
    "compare-init": lambda c: (c["model"], ["compare-init", str(c["model"]), "--methods", "upcycle", "--out", "OUT"]),
    "experiment": lambda c: (c["model"], ["experiment", "capacity", "--model", str(c["model"]), "--out", "OUT"]),
    "quickstart": lambda c: (c["model"], ["quickstart", str(c["model"]), "--eval-tokens", "64", "--block-size", "32", "--work-dir", "OUT"]),
    "data prepare": lambda c: (c["model"], ["data", "prepare", str(c["model"]), "--out", "OUT"]),
    "eval": lambda c: (c["model"], ["eval", str(c["model"]), "--out", "OUT"]),
    "report": lambda c: (c["run"], ["report", str(c["run"]), "--out", "OUT"]),
    "train": lambda c: (c["data"], ["train", str(c["moe"]), "--data", str(c["data"]), *TRAIN_FLAGS, "--out", "OUT"]),
}
FILE_OUTPUTS = {"split", "report"}  # the output is a file, not a directory


def _outputs_against(verb: str, source: Path) -> dict[str, Path]:
    """Outputs that are, hold or lie inside the input: relation -> path."""
    if verb == "split":
        return {"lies inside": source / "partition.safetensors"}
    if verb == "report":  # the report is written into the run; what it reads there is off limits
        return {"is": source / "metrics.jsonl"}
    if verb == "quickstart":  # the work dir holds one folder per model
        return {"lies inside": source}
    return {"is": source, "holds": source.parent, "lies inside": source / "sub"}


def test_every_verb_that_writes_is_walked():
    assert set(WRITERS) == {verb.name for verb in VERBS if verb.output is not None}
    assert {verb.name for verb in VERBS if verb.output is None} == {"inspect", "generate", "plan-memory"}


def _refused(capsys, argv: list[str], out: Path, force: bool) -> str:
    from moeify.cli import main

    argv = [str(out) if word == "OUT" else word for word in argv] + (["--force"] if force else [])
    capsys.readouterr()
    assert main(argv) == 2, f"{argv} was not refused"
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and lines[0].startswith("moeify: error: "), lines
    return lines[0]


@pytest.mark.parametrize("verb", sorted(WRITERS))
def test_no_verb_writes_over_its_input_or_the_users_files(verb, ctx, capsys):
    source, argv = WRITERS[verb](ctx)
    inputs_before = _tree(source)
    forces = (False,) if verb == "quickstart" else (False, True)  # quickstart replaces only its own folders, always
    for relation, out in _outputs_against(verb, source).items():
        for force in forces:
            line = _refused(capsys, argv, out, force)
            assert f"{relation} the input" in line, line
    assert _tree(source) == inputs_before
    # --force over what moeify did not write: refused, the files kept.
    mine = ctx["tmp"] / "mine"
    mine.mkdir()
    (mine / "keep.txt").write_text("the user's")
    out = mine / "keep.txt" if verb in FILE_OUTPUTS else mine
    if verb == "quickstart":  # the work dir holds one folder per model
        out = ctx["tmp"]
        mine.rename(ctx["tmp"] / "upcycle")
        mine = ctx["tmp"] / "upcycle"
    line = _refused(capsys, argv, out, force=verb != "quickstart")
    assert "moeify wrote" in line and "never anything else" in line, line
    assert _tree(mine) == {"keep.txt": b"the user's"}
    assert not list(ctx["tmp"].rglob(".*.tmp-*"))


def test_force_replaces_what_moeify_wrote(ctx, capsys):
    from moeify.cli import main

    out = ctx["tmp"] / "data"
    argv = ["data", "prepare", str(ctx["model"]), "--seq-len", "32", "--embedded-chars", "20000", "--out", str(out)]
    assert main(argv) == 0 and (out / MARKER).is_file()
    assert main([*argv[:-2], "--seq-len", "16", "--out", str(out)]) == 2  # other inputs: replaced only with --force
    assert "pass --force to replace it" in capsys.readouterr().err
    assert main([*argv[:-2], "--seq-len", "16", "--out", str(out), "--force"]) == 0
    assert json.loads((out / "meta.json").read_text())["seq_len"] == 16
    assert main(["report", str(ctx["run"])]) == 0 and main(["report", str(ctx["run"])]) == 2  # its own report: --force
    assert main(["report", str(ctx["run"]), "--force"]) == 0 and sorted(p.name for p in ctx["run"].iterdir()) == ["metrics.jsonl", "report.html"]


def test_every_float_setting_must_be_finite():
    floats = 0
    for verb in VERBS:
        for leaf in leaves(_load(verb.schema)):
            element = base_type(leaf.kind)
            if element is float:
                floats += 1
                for value in (float("nan"), float("inf"), float("-inf")):
                    with pytest.raises(MoeifyError, match="it must be a finite number"):
                        coerce(leaf, value, COMMAND_LINE)
    assert floats >= 30  # the walk found the schemas' float settings


def _given(method: str, name: str) -> ConstructionConfig:
    default = next(leaf.default for leaf in leaves(ConstructionConfig) if leaf.name == name)
    return from_flat(ConstructionConfig, {"method": method, name: default})


@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_setting_the_method_ignores_is_refused_and_its_own_are_not(method):
    construction = METHODS[method]
    for name in sorted(conditional_settings()):
        config = _given(method, name)
        init = requested_router_init(config, construction)
        if name in settings_read(config, construction, init):
            refuse_unread(config, construction, init, frozenset({name}))
        else:
            with pytest.raises(MoeifyError, match=f"--{name.replace('_', '-')} .*is read .*drop it"):
                refuse_unread(config, construction, init, frozenset({name}))
    assert construction.options <= conditional_settings()


def test_common_settings_count_where_read():
    upcycle = from_flat(ConstructionConfig, {"method": "upcycle", "calibration": "embedded"})
    carve = from_flat(ConstructionConfig, {"method": "carve", "calibration": "embedded"})
    arms = share_settings({"u": (upcycle, {"method"}), "c": (carve, {"method"})}, {"calibration"}, "the arms")
    assert "calibration" not in arms["u"]._given and "calibration" in arms["c"]._given
    with pytest.raises(MoeifyError, match="--calibration is read by none of the arms"):
        share_settings({"u": (upcycle, {"method"})}, {"calibration"}, "the arms")


def test_lazy_experts_do_not_end_quietly_at_a_bug():
    from moeify.modeling.canonical import LazyExperts

    def make(expert: int):
        return torch.zeros(3)[[expert + 5]]  # IndexError inside the maker

    with pytest.raises(IndexError):
        list(LazyExperts(4, make))


def test_the_writer_refuses_a_tensor_set_its_config_does_not_imply(tiny_moe, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from moeify.checkpoint.manifest import Manifest
    from moeify.checkpoint.writer import write_checkpoint

    tensors = load_file(tiny_moe / "model.safetensors")
    config, manifest = AutoConfig.from_pretrained(tiny_moe), Manifest.read(tiny_moe)
    missing = {k: v for k, v in tensors.items() if ".experts.3." not in k}
    with pytest.raises(MoeifyError, match=r"6 missing \(model.layers.0.block_sparse_moe.experts.3"):
        write_checkpoint(tmp_path / "a", sorted(missing.items()), config, tiny_moe, manifest)
    reshaped = {**tensors, "model.norm.weight": torch.ones(3)}
    with pytest.raises(MoeifyError, match=r"1 of another shape \(model.norm.weight: \[3\], the config: \[64\]\)"):
        write_checkpoint(tmp_path / "b", sorted(reshaped.items()), config, tiny_moe, manifest)
    assert not any(tmp_path.iterdir())
    write_checkpoint(tmp_path / "c", sorted(tensors.items()), config, tiny_moe, manifest)
    assert (tmp_path / "c" / MARKER).is_file()


@pytest.mark.parametrize("kind", ["directory", "file"])
def test_a_failed_write_removes_the_folders_it_made_and_no_others(kind, tmp_path):
    from moeify.checkpoint.atomic import atomic_directory, atomic_file

    (tmp_path / "existing").mkdir()
    out = tmp_path / "existing" / "new" / "deeper" / "out"
    writer = atomic_directory(out, verb="test") if kind == "directory" else atomic_file(out, False, [], lambda _: True)
    with pytest.raises(RuntimeError), writer as tmp:
        (tmp / "x" if kind == "directory" else tmp).write_text("half")
        raise RuntimeError("the write failed")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["existing"]
