"""The verb table: every verb reachable, MODEL positional or --model, recipe keys typed and checked."""

import json

import pytest

from moeify.cli import VERBS, main, parser


def _error(capsys, argv: list[str]) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("moeify: error: "), err
    return err


def test_every_verb_has_a_parser_with_its_flags():
    for verb in VERBS:
        words = verb.name.split()
        with pytest.raises(SystemExit) as exit_info:
            parser([*words, "--help"]).parse_args([*words, "--help"])
        assert exit_info.value.code == 0


def test_model_positional_and_flag_are_the_same_and_experts_is_an_alias(tiny_models, capsys):
    model = str(tiny_models["llama"])
    assert main(["inspect", model, "--num-experts", "4", "--json"]) == 0
    positional = json.loads(capsys.readouterr().out)
    assert main(["inspect", "--model", model, "--experts", "4", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == positional and positional["num_experts"] == 4
    assert "given twice" in _error(capsys, ["inspect", model, "--model", str(tiny_models["qwen2"])])
    assert "inspect needs MODEL" in _error(capsys, ["inspect"])


@pytest.mark.parametrize("recipe,fragment", [
    ("build:\n  num_experts: four\n", "num_experts in recipe"),
    ("build:\n  num_expert: 4\n", "num_expert (did you mean num_experts?)"),
    ("build:\n  routing: softmax\n", "choose one of: topk-softmax, softmax-topk, sigmoid-topk"),
])
def test_recipe_values_are_typed_and_unknown_keys_refused(tiny_models, tmp_path, capsys, recipe, fragment):
    path = tmp_path / "recipe.yaml"
    path.write_text(recipe)
    out = tmp_path / "out"
    assert fragment in _error(capsys, ["build", str(tiny_models["llama"]), "--recipe", str(path), "--out", str(out)])
    assert not out.exists()


def test_data_prepare_and_report_through_the_command_line(tiny_moe, tmp_path, capsys):
    text = tmp_path / "prose.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 400)
    data = tmp_path / "data"
    assert main(["data", "prepare", str(tiny_moe), "--source", f"prose={text}", "--seq-len", "32", "--out", str(data)]) == 0
    assert "prose" in capsys.readouterr().out and json.loads((data / "meta.json").read_text())["seq_len"] == 32
    run = tmp_path / "run"
    assert main(["train", str(tiny_moe), "--data", str(data), "--out", str(run), "--batch-size", "4", "--micro-batch", "4",
                 "--max-tokens", "256", "--eval-blocks", "1", "--no-export"]) == 0
    assert "trained 2 steps" in capsys.readouterr().out
    assert main(["report", str(run)]) == 0
    assert (run / "report.html").read_text().startswith("<!doctype html>")


def test_version_and_the_verbs_by_stage(capsys):
    from moeify import __version__
    from moeify.cli import STAGES

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"moeify {__version__}"
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    headings = [text.index(f"\n{heading}:\n") for heading in STAGES.values()]
    assert headings == sorted(headings)
    for verb in VERBS:
        stage_index = list(STAGES).index(verb.stage)
        position = text.index(f"\n  {verb.name} ")
        assert headings[stage_index] < position, verb.name
        assert stage_index + 1 == len(headings) or position < headings[stage_index + 1], verb.name
