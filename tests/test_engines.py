"""Exports in llama.cpp: its own converter and runtime (tests/llama_cpp.py), one MoE per output format.
Each MoE is built to equal its dense model exactly, so llama.cpp must give it the dense model's
perplexity; where moeify says llama.cpp computes a format differently, it must differ. The first
run downloads and builds llama.cpp (minutes; cached)."""

import shutil

import pytest
import torch
from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

from moeify.checkpoint.resolve import resolve_model
from moeify.cli import main
from moeify.data.embedded import pydoc_topics
from tests.llama_cpp import convert, llama_cpp, perplexity

pytestmark = [pytest.mark.slow, pytest.mark.engine]

CONTEXT, CHUNKS = 256, 4
# 4 experts, not 8: the same formats and routing rules, half the bytes to convert and (top-k = E) to run.
UPCYCLE = ["--method", "upcycle", "--num-experts", "4", "--top-k", "2"]
# Equal to the dense model without renormalising: all 4 experts chosen, softmax weights summing to 1.
ALL_EXPERTS = ["--method", "upcycle", "--num-experts", "4", "--top-k", "4", "--routing", "softmax-topk", "--no-renormalize"]
# (dense model, format, build flags). The DeepSeek-V3 style (Glm4MoeForCausalLM) is not here: llama.cpp's
# converter reads GLM's own special tokens for it, which these tokenizers have not (its engine_limits).
EXACT = {
    "mixtral-4x2": ("smollm2", "mixtral", UPCYCLE),
    "qwen2_moe-4x4": ("smollm2", "qwen2_moe", ALL_EXPERTS),  # tied embeddings: needs the explicit lm_head
    "qwen3_moe-4x2": ("qwen3", "qwen3_moe", UPCYCLE),
    "qwen3_moe-4x2-fused": ("qwen3", "qwen3_moe", [*UPCYCLE, "--layout", "fused"]),  # its converter splits gate_up_proj
}


@pytest.fixture(scope="module")
def llama():
    return llama_cpp()


@pytest.fixture(scope="module")
def heldout(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "heldout.txt"
    path.write_text("\n\n".join(pydoc_topics(heldout=True)))
    return path


@pytest.fixture(scope="module")
def dense_models(tmp_path_factory):
    """SmolLM2-135M, and a random Qwen3 (no real one is reachable here) with SmolLM2's tokenizer and a
    head_dim other than hidden / heads, as real Qwen3 models have."""
    smollm2 = resolve_model("smollm2-135m")
    qwen3 = tmp_path_factory.mktemp("qwen3")
    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=49152, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=64, max_position_embeddings=2048, tie_word_embeddings=False)
    Qwen3ForCausalLM(config).save_pretrained(qwen3)
    AutoTokenizer.from_pretrained(smollm2).save_pretrained(qwen3)
    return {"smollm2": smollm2, "qwen3": qwen3}


@pytest.fixture(scope="module")
def dense_perplexity(llama, heldout, dense_models, tmp_path_factory):
    out = {}
    for name, path in dense_models.items():
        gguf = convert(llama, path, tmp_path_factory.mktemp("dense") / f"{name}.gguf")
        out[name] = perplexity(llama, gguf, heldout, CONTEXT, CHUNKS)
        gguf.unlink()
    return out


def _moe_perplexity(llama, heldout, dense: str, fmt: str, flags: list[str], tmp_path) -> float:
    moe = tmp_path / "moe"
    assert main(["build", str(dense), *flags, "--format", fmt, "--out", str(moe)]) == 0
    gguf = convert(llama, moe, tmp_path / "moe.gguf")
    shutil.rmtree(moe)
    return perplexity(llama, gguf, heldout, CONTEXT, CHUNKS)


@pytest.mark.parametrize("case", EXACT)
def test_llama_cpp_runs_the_moe_at_the_dense_perplexity(case, llama, heldout, dense_models, dense_perplexity, tmp_path):
    dense, fmt, flags = EXACT[case]
    value = _moe_perplexity(llama, heldout, dense_models[dense], fmt, flags, tmp_path)
    assert dense_perplexity["smollm2"] < 100  # the real model works in llama.cpp at all
    assert abs(value / dense_perplexity[dense] - 1) < 1e-3, (case, value, dense_perplexity[dense])


def test_llama_cpp_differs_where_moeify_says_so(llama, heldout, dense_models, dense_perplexity, tmp_path, capsys):
    """A renormalised Qwen2-MoE: exact in transformers, not in llama.cpp (its qwen2moe never renormalises)."""
    value = _moe_perplexity(llama, heldout, dense_models["smollm2"], "qwen2_moe", UPCYCLE, tmp_path)
    assert "llama.cpp runs Qwen2-MoE without renormalising" in capsys.readouterr().err
    assert abs(value / dense_perplexity["smollm2"] - 1) > 1e-2


def test_llama_cpp_refuses_a_fused_mixtral_as_moeify_says(llama, dense_models, tmp_path, capsys):
    assert main(["build", str(dense_models["smollm2"]), "--num-experts", "2", "--layout", "fused", "--out", str(tmp_path / "moe")]) == 0
    assert "llama.cpp's converter reads Mixtral experts only per expert" in capsys.readouterr().err
    with pytest.raises(RuntimeError, match="Can not map tensor 'model.layers.0.mlp.experts.gate_up_proj'"):
        convert(llama, tmp_path / "moe", tmp_path / "moe.gguf")
