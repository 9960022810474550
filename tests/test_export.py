"""Output dtype and layout: every format reloads in stock transformers with moeify's logits."""

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, Qwen3Config

from moeify.build import build, build_config
from moeify.cli import main
from moeify.modeling.load import load_moe_model
from tests.conftest import COMMON, logits_of, save_tiny

IDS = torch.randint(320, (2, 20), generator=torch.Generator().manual_seed(5))
FORMATS = [
    ("llama", dict(method="random-split"), "MixtralForCausalLM"),
    ("llama", dict(method="random-split", shared_size=16), "Qwen2MoeForCausalLM"),
    ("qwen3", dict(method="random-split"), "Qwen3MoeForCausalLM"),
    ("qwen2", dict(method="random-split", routing="sigmoid-topk", shared_size=16), "Glm4MoeForCausalLM"),
]


def _tensors(directory) -> dict[str, torch.Tensor]:
    with safe_open(str(directory / "model.safetensors"), "pt") as f:
        return {key: f.get_tensor(key) for key in f.keys()}


def _moeify_logits(path) -> torch.Tensor:
    model, _ = load_moe_model(path)
    with torch.no_grad():
        return model.eval()(IDS).logits


@pytest.mark.parametrize("family,settings,architecture", FORMATS, ids=[a for _, _, a in FORMATS])
def test_fused_layout_reloads_in_stock_transformers_with_moeify_logits(family, settings, architecture, tiny_models, tmp_path):
    out = build(build_config(model=str(tiny_models[family]), out=tmp_path / "m", num_experts=4, top_k=2, router_std=0.5,
                             layout="fused", **settings), progress=False)
    assert json.loads((out / "config.json").read_text())["architectures"] == [architecture]
    keys = _tensors(out)
    assert keys["model.layers.1.mlp.experts.gate_up_proj"].shape == (4, 48 if "shared_size" not in settings else 40, 64)
    assert not any(".experts.0." in key for key in keys)  # no per-expert keys
    assert (logits_of(out, IDS) - _moeify_logits(out)).abs().max() < 1e-4
    per_expert = build(build_config(model=str(tiny_models[family]), out=tmp_path / "p", num_experts=4, top_k=2, router_std=0.5,
                                    **settings), progress=False)
    assert (logits_of(per_expert, IDS) - logits_of(out, IDS)).abs().max() < 1e-5  # the same model in both layouts


def test_bf16_build_holds_bf16_weights_and_starts_at_the_rounded_dense_model(tiny_models, tmp_path):
    dense = tiny_models["qwen2"]
    out = build(build_config(model=str(dense), out=tmp_path / "m", method="upcycle", num_experts=4, routing="sigmoid-topk",
                             dtype="bf16"), progress=False)
    tensors = _tensors(out)
    bias = [k for k in tensors if k.endswith("e_score_correction_bias")]
    assert bias and all(tensors[k].dtype == torch.float32 for k in bias)  # the stock model keeps the selection bias in fp32
    assert all(t.dtype == torch.bfloat16 for k, t in tensors.items() if k not in bias)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    rounded = AutoModelForCausalLM.from_pretrained(dense, dtype=torch.float32).to(torch.bfloat16).float().eval()
    with torch.no_grad():
        assert (logits_of(out, IDS) - rounded(IDS).logits).abs().max() < 1e-4


def test_export_to_bf16_fused_passes_its_own_stock_reload_check(tiny_moe, tmp_path, capsys):
    out = tmp_path / "exported"
    assert main(["export", str(tiny_moe), "--out", str(out), "--dtype", "bf16", "--layout", "fused"]) == 0
    assert "stock reload: max |logit diff|" in capsys.readouterr().out
    tensors = _tensors(out)
    assert "model.layers.0.mlp.experts.gate_up_proj" in tensors and all(t.dtype == torch.bfloat16 for t in tensors.values())
    assert json.loads((out / "moeify.json").read_text())["layout"] == "fused"


def test_qwen2_moe_carries_the_dense_ffn_size(tiny_models, tmp_path):
    out = build(build_config(model=str(tiny_models["llama"]), out=tmp_path / "m", method="random-split", num_experts=4,
                             shared_size=16), progress=False)
    config = json.loads((out / "config.json").read_text())
    assert (config["intermediate_size"], config["moe_intermediate_size"], config["shared_expert_intermediate_size"]) == (96, 20, 16)


def test_qwen3_with_a_head_dim_other_than_hidden_over_heads(tmp_path):
    # Real Qwen3 models have head_dim != hidden_size / heads; the config must carry it.
    dense = save_tiny(Qwen3Config(**COMMON, head_dim=32), tmp_path / "qwen3-wide-heads")
    out = build(build_config(model=str(dense), out=tmp_path / "m", method="upcycle", num_experts=4), progress=False)
    assert json.loads((out / "config.json").read_text())["head_dim"] == 32
    assert (logits_of(out, IDS) - logits_of(dense, IDS)).abs().max() < 1e-4
