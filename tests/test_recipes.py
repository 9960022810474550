"""Every recipe parses into the configs; every -tiny recipe builds and trains a tiny model end to end."""

import math
from pathlib import Path

import pytest
from transformers import AutoConfig

from moeify.cli import main
from moeify.construct import ConstructionConfig
from moeify.schema import from_flat, leaf_names
from moeify.train.config import TrainConfig, load_recipe, make_config
from moeify.train.loop import train

RECIPES = sorted((Path(__file__).parents[1] / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_parses(recipe):
    config = make_config(load_recipe(recipe), {})
    assert isinstance(config, TrainConfig) and config.max_tokens > 0
    assert set(load_recipe(recipe, "build")) <= leaf_names(ConstructionConfig)
    assert from_flat(ConstructionConfig, load_recipe(recipe, "build")).num_experts > 1


@pytest.mark.parametrize("recipe", [r for r in RECIPES if r.stem.endswith("-tiny")], ids=lambda p: p.stem)
def test_tiny_recipe_builds_and_trains(recipe, tiny_models, tiny_data, tmp_path):
    moe = tmp_path / "moe"
    assert main(["build", "--recipe", str(recipe), "--model", str(tiny_models["llama"]), "--out", str(moe)]) == 0
    config = make_config(load_recipe(recipe), {"model": str(moe), "data": str(tiny_data), "out": str(tmp_path / "run"), "seq_len": 32})
    result = train(config, progress=False)
    assert result.finished and all(math.isfinite(loss) for loss in result.losses) and len(result.losses) == result.steps
    # granular: softmax-topk without renormalising; carve: a shared expert. Both go to Qwen2-MoE.
    architecture = "Qwen2MoeForCausalLM" if "granular" in recipe.stem or "carve" in recipe.stem else "MixtralForCausalLM"
    assert AutoConfig.from_pretrained(result.model_dir).architectures == [architecture]  # the trained MoE, exported


def test_online_upcycling_constructs_from_the_recipes_build_section(tiny_models, tiny_data, tmp_path):
    from tests.test_online import _assert_same_as_offline, _initial_weights

    recipe = str(Path(__file__).parents[1] / "recipes" / "llama-moe-2of8-tiny.yaml")
    dense = str(tiny_models["llama"])
    assert main(["build", dense, "--recipe", recipe, "--out", str(tmp_path / "moe")]) == 0
    assert main(["train", "--from-dense", dense, "--recipe", recipe, "--data", str(tiny_data), "--out", str(tmp_path / "run"),
                 "--seq-len", "32", "--stop-after-steps", "0", "--no-export"]) == 0
    moe_config = AutoConfig.from_pretrained(tmp_path / "moe")
    assert moe_config.num_local_experts == 8
    # The recipe holds the scale as a multiplier in training: the step-0 checkpoint's down_proj is the
    # built one divided by the scale (4, a power of two: exactly).
    weights = _initial_weights(tmp_path / "run", moe_config)
    weights = {k: v * 4.0 if ".block_sparse_moe.experts." in k and k.endswith(".w2.weight") else v for k, v in weights.items()}
    _assert_same_as_offline(weights, tmp_path / "moe")
