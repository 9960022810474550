"""Tiny random models of real transformers architectures, saved as Hugging Face directories."""

import functools
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    Qwen3Config,
)

VOCAB = 320
COMMON = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False,
)
TINY_CONFIGS = {
    "llama": lambda: LlamaConfig(**COMMON),
    "mistral": lambda: MistralConfig(**COMMON, sliding_window=8),
    "qwen2": lambda: Qwen2Config(**COMMON),
    "qwen3": lambda: Qwen3Config(**COMMON, head_dim=16),
    "llama-tied": lambda: LlamaConfig(**{**COMMON, "tie_word_embeddings": True}),
}


@functools.cache
def tiny_tokenizer():
    """A byte-level BPE tokenizer of VOCAB tokens trained on Python's help topics (no hub needed)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from moeify.data.embedded import pydoc_topics

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(pydoc_topics(heldout=False)[:20], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<eos>")


def save_tiny(config, path: Path, seed: int = 0, max_shard_size: str | None = None) -> Path:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):  # stock init zeroes biases; make them matter
                p.normal_(0, 0.1)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dense")
    return {name: save_tiny(make(), root / name) for name, make in TINY_CONFIGS.items()}


def logits_of(path: Path, input_ids: torch.Tensor) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=input_ids).logits


@pytest.fixture(scope="session")
def tiny_moe(tiny_models, tmp_path_factory) -> Path:
    """A 4-expert top-2 random-split MoE of the tiny Llama, with a tokenizer."""
    from moeify.build import build, build_config

    out = tmp_path_factory.mktemp("moe") / "llama-moe"
    return build(build_config(model=str(tiny_models["llama"]), out=out, method="random-split", num_experts=4, top_k=2, router_std=0.1), progress=False)


@pytest.fixture(scope="session")
def tiny_data(tiny_moe, tmp_path_factory) -> Path:
    """The embedded corpus (small slice of each domain) tokenised for the tiny models, blocks of 32."""
    from moeify.data.prepare import PrepareConfig, prepare

    out = tmp_path_factory.mktemp("data") / "embedded"
    return prepare(PrepareConfig(str(tiny_moe), out=out, seq_len=32, embedded_chars=40_000), progress=False).path


def train_config(model: Path, data: Path, out: Path, **overrides):
    from moeify.train.config import TrainConfig

    settings = dict(data=str(data), out=str(out), **({"model": str(model)} if model is not None else {}), batch_size=8, micro_batch=4, max_tokens=8 * 32 * 12,
                    lr=3e-3, warmup_steps=2, eval_blocks=4, export=False)
    return TrainConfig(**{**settings, **overrides})


def error_lines(stderr: str) -> list[str]:
    """What a command printed to stderr besides progress: tqdm bars (which end with `/s]` or redraw
    with a carriage return), `[verb] ...` progress notes and `moeify: converting ...` are not error output."""
    kept = []
    for line in stderr.splitlines():
        line = line.split("\r")[-1]
        if line.strip() and "/s]" not in line and not line.startswith(("moeify: converting", "[")):
            kept.append(line)
    return kept
