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


def _keys_and_config(out) -> tuple[dict[str, torch.Tensor], dict]:
    return _tensors(out), json.loads((out / "config.json").read_text())


def test_qwen2_moe_of_a_tied_model_writes_lm_head_and_a_zero_shared_expert(tiny_models, tmp_path, capsys):
    # llama.cpp's qwen2moe requires output.weight and a shared expert of non-zero width (it reads 0 as
    # "the dense F"); vLLM always loads shared_expert_gate. The config stays tied, the MoE exact.
    out = build(build_config(model=str(tiny_models["llama-tied"]), out=tmp_path / "m", method="upcycle", num_experts=4,
                             format="qwen2_moe"), progress=False)
    tensors, config = _keys_and_config(out)
    assert config["tie_word_embeddings"] is True
    assert torch.equal(tensors["lm_head.weight"], tensors["model.embed_tokens.weight"])
    width = config["shared_expert_intermediate_size"]
    assert width > 0 and width % 32 == 0
    shared = [tensors[f"model.layers.0.mlp.shared_expert.{name}.weight"] for name in ("gate_proj", "up_proj", "down_proj")]
    assert [t.shape for t in shared] == [(width, 64), (width, 64), (64, width)] and not any(t.any() for t in shared)
    gate = tensors["model.layers.0.mlp.shared_expert_gate.weight"]
    assert gate.shape == (1, 64) and (gate > 0).all() and gate.max() < 1e-12  # not 0: llama.cpp's sigmoid is silu(z)/z
    assert "llama.cpp runs Qwen2-MoE without renormalising" in capsys.readouterr().err  # upcycle renormalises
    stock, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    assert (logits_of(out, IDS) - logits_of(tiny_models["llama-tied"], IDS)).abs().max() < 1e-4
    _, blocks = load_moe_model(out)
    assert blocks[0].shared_expert is None  # moeify does not compute the zero expert


def test_deepseek_v3_format_without_shared_experts_writes_one_zero_shared_expert(tiny_models, tmp_path, capsys):
    # vLLM builds the shared MLP whenever n_shared_experts is set, llama.cpp then expects its tensors;
    # rotary must be explicit (vLLM's Glm4Moe defaults partial_rotary_factor to 0.5).
    out = build(build_config(model=str(tiny_models["llama"]), out=tmp_path / "m", method="random-split", num_experts=4,
                             routing="sigmoid-topk"), progress=False)
    tensors, config = _keys_and_config(out)
    assert (config["n_shared_experts"], config["intermediate_size"], config["rope_parameters"]["partial_rotary_factor"]) == (1, 96, 1.0)
    shared = tensors["model.layers.1.mlp.shared_experts.down_proj.weight"]
    assert shared.shape == (64, config["moe_intermediate_size"]) and not shared.any()
    assert "does not convert to GGUF" in capsys.readouterr().err
    assert not any(AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)[1].values())
    assert (_moeify_logits(out) - AutoModelForCausalLM.from_pretrained(out)(IDS).logits).abs().max() < 1e-4


def test_formats_that_every_engine_runs_print_no_note(tiny_models, tmp_path, capsys):
    build(build_config(model=str(tiny_models["llama"]), out=tmp_path / "mixtral", method="upcycle", num_experts=4), progress=False)
    build(build_config(model=str(tiny_models["llama"]), out=tmp_path / "qwen2", method="upcycle", num_experts=4, top_k=4,
                       routing="softmax-topk", renormalize=False, format="qwen2_moe"), progress=False)
    assert "moeify: note" not in capsys.readouterr().err
