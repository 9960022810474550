"""moeify build: output loads in stock transformers and starts from the dense model's function."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig

from moeify.build import build, build_config
from tests.conftest import logits_of, save_tiny

INPUT_IDS = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
EXPECTED_ARCH = {
    "llama": "MixtralForCausalLM",
    "mistral": "MixtralForCausalLM",
    "llama-tied": "MixtralForCausalLM",
    "qwen2": "Qwen2MoeForCausalLM",
    "qwen3": "Qwen3MoeForCausalLM",
}


@pytest.mark.parametrize("family", list(EXPECTED_ARCH))
def test_upcycle_reproduces_dense_logits_after_reload(family, tiny_models, tmp_path):
    out = build(build_config(model=str(tiny_models[family]), out=tmp_path / "moe", method="upcycle", num_experts=4, top_k=2), progress=False)
    config = AutoConfig.from_pretrained(out)
    assert config.architectures == [EXPECTED_ARCH[family]]
    dense, moe = logits_of(tiny_models[family], INPUT_IDS), logits_of(out, INPUT_IDS)
    assert (moe - dense).abs().max() <= 1e-4


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_random_split_with_all_experts_and_scale_E_equals_dense(family, tiny_models, tmp_path):
    # k = E with a zero router gives every expert weight 1/E, so scale E restores the dense sum.
    config = build_config(model=str(tiny_models[family]), out=tmp_path / "moe", method="random-split", num_experts=4, top_k=4, router_std=0.0, scale=4.0)
    out = build(config, progress=False)
    assert (logits_of(out, INPUT_IDS) - logits_of(tiny_models[family], INPUT_IDS)).abs().max() <= 1e-4


def test_random_split_partitions_every_neuron_once(tiny_models, tmp_path):
    out = build(build_config(model=str(tiny_models["llama"]), out=tmp_path / "moe", method="random-split", num_experts=4, top_k=2), progress=False)
    dense = safe_open(str(tiny_models["llama"] / "model.safetensors"), "pt")
    moe = safe_open(str(out / "model.safetensors"), "pt")
    up = dense.get_tensor("model.layers.1.mlp.up_proj.weight")
    rows = torch.cat([moe.get_tensor(f"model.layers.1.block_sparse_moe.experts.{e}.w3.weight") for e in range(4)])
    assert rows.shape == up.shape
    # Each dense row appears exactly once among the experts' rows.
    assert torch.equal(torch.sort(rows, dim=0).values, torch.sort(up, dim=0).values)
    manifest = json.loads((out / "moeify.json").read_text())
    assert manifest["scale"] == 2.0 and manifest["method"] == "random-split" and manifest["expert_size"] == 24


def _file_bytes(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_same_seed_gives_byte_identical_output_and_other_seed_differs(tiny_models, tmp_path):
    make = lambda name, seed: build(  # noqa: E731
        build_config(model=str(tiny_models["llama"]), out=tmp_path / name, method="random-split", num_experts=4, top_k=2, seed=seed, max_shard_mb=40_000 / (1 << 20)),
        progress=False,
    )
    first, second = _file_bytes(make("a", 1)), _file_bytes(make("b", 1))
    make("c", 2)
    assert len([n for n in first if n.endswith(".safetensors")]) > 1, "expected several shards"
    assert first == second
    expert = "model.layers.0.block_sparse_moe.experts.0.w3.weight"
    assert not torch.equal(_tensor(tmp_path / "a", expert), _tensor(tmp_path / "c", expert))


def _tensor(directory: Path, name: str) -> torch.Tensor:
    weight_map = json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"]
    return safe_open(str(directory / weight_map[name]), "pt").get_tensor(name)


def test_sharded_dense_input_and_sharded_output_load(tmp_path):
    from tests.conftest import TINY_CONFIGS

    dense = save_tiny(TINY_CONFIGS["llama"](), tmp_path / "dense", max_shard_size="50KB")
    assert (dense / "model.safetensors.index.json").exists()
    out = build(build_config(model=str(dense), out=tmp_path / "moe", method="upcycle", num_experts=4, top_k=2, max_shard_mb=100_000 / (1 << 20)), progress=False)
    assert (out / "model.safetensors.index.json").exists()
    assert (logits_of(out, INPUT_IDS) - logits_of(dense, INPUT_IDS)).abs().max() <= 1e-4
    assert not list(tmp_path.glob(".moe.tmp-*")), "temporary directory left behind"
