"""Branch-Train-MiX (Sukhbaatar et al. 2024): an MoE from several dense fine-tunes of one base.

Expert e is the whole FFN of the e-th `--expert-model`, layer by layer; the other tensors
(attention, norms, embeddings, head) are the element-wise mean over the expert models, or MODEL's
(`--merge-others base`, as mergekit-moe does). MODEL gives the config and tokenizer, and every
expert model must be a fine-tune of it: the same architecture and tensors, and token embeddings
close to MODEL's. With every expert model equal to MODEL, the result is `--method upcycle`'s, byte for byte.
"""

import copy
from pathlib import Path

import torch
import torch.nn.functional as F

from moeify.checkpoint.dense import DenseCheckpoint
from moeify.checkpoint.resolve import resolve_model
from moeify.construct.config import ConstructionConfig
from moeify.construct.methods import Upcycle
from moeify.errors import MoeifyError
from moeify.schema import is_given

# What two models must share to be fine-tunes of one base (beyond the same tensors and shapes).
BASE_FIELDS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "head_dim", "vocab_size", "tie_word_embeddings", "hidden_act")
EMBEDDINGS = "model.embed_tokens.weight"


class BranchTrainMix(Upcycle):
    name = "btx"
    description = "experts from several dense fine-tunes of one base, --expert-model repeated (Branch-Train-MiX)"
    options = Upcycle.options | {"expert_model", "merge_others", "min_base_similarity"}

    def check(self, ffn_size: int, options: ConstructionConfig) -> None:
        count = len(options.merge.expert_model)
        if count == 0:
            raise MoeifyError("--method btx needs the fine-tuned models: give --expert-model PATH once per expert")
        if options.num_experts != count:
            raise MoeifyError(f"--method btx makes one expert per --expert-model: {count} given, --num-experts "
                              f"{options.num_experts}; drop --num-experts or give {options.num_experts} models")


def with_expert_count(config: ConstructionConfig) -> ConstructionConfig:
    """btx: E is the number of expert models unless --num-experts was given (then check() compares them)."""
    if config.method != "btx" or is_given(config, "num_experts", ConstructionConfig().num_experts):
        return config
    counted = copy.copy(config)  # keeps what the user gave (schema.is_given)
    counted.num_experts = len(config.merge.expert_model)
    return counted


def open_expert_models(base: DenseCheckpoint, config: ConstructionConfig) -> list[DenseCheckpoint]:
    """The expert models, each checked to be a fine-tune of `base`."""
    models = []
    base_embeddings: torch.Tensor | None = None  # read once, when the first other model needs it
    for spec in config.merge.expert_model:
        path = resolve_model(spec)
        model = base if Path(path).resolve() == Path(base.path).resolve() else DenseCheckpoint(path)
        if model is not base:
            if base_embeddings is None:
                base_embeddings = base.get(EMBEDDINGS).flatten().float()
            check_same_base(base, base_embeddings, model, spec, config.merge.min_base_similarity)
        models.append(model)
    return models


def check_same_base(base: DenseCheckpoint, base_embeddings: torch.Tensor, model: DenseCheckpoint, spec: str,
                    min_similarity: float) -> None:
    for key in BASE_FIELDS:
        ours, theirs = getattr(base.config, key, None), getattr(model.config, key, None)
        if ours != theirs:
            raise MoeifyError(f"--expert-model {spec} is not a fine-tune of MODEL: {key} is {theirs!r}, MODEL's is {ours!r}; "
                              f"btx needs fine-tunes of one base model")
    names, theirs = set(base.tensor_names), set(model.tensor_names)
    if names != theirs:
        odd = sorted(names ^ theirs)
        raise MoeifyError(f"--expert-model {spec} holds other tensors than MODEL ({', '.join(odd[:3])}"
                          f"{' ...' if len(odd) > 3 else ''}); btx needs fine-tunes of one base model")
    for name in base.tensor_names:
        if base.shape(name) != model.shape(name):
            raise MoeifyError(f"--expert-model {spec}: {name} is {list(model.shape(name))}, MODEL's is {list(base.shape(name))}; "
                              f"btx needs fine-tunes of one base model")
    similarity = F.cosine_similarity(base_embeddings, model.get(EMBEDDINGS).flatten().float(), dim=0).item()
    if similarity < min_similarity:
        raise MoeifyError(f"--expert-model {spec} does not share MODEL's base: their token embeddings have cosine {similarity:.3f} "
                          f"(below --min-base-similarity {min_similarity:g}); give fine-tunes of MODEL")


def merged(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Element-wise mean in fp32, in the tensors' dtype; equal tensors are returned as they are (no rounding)."""
    first = tensors[0]
    if all(t is first or torch.equal(t, first) for t in tensors[1:]):
        return first
    total = torch.zeros(first.shape, dtype=torch.float32)
    for tensor in tensors:
        total += tensor.float()
    return (total / len(tensors)).to(first.dtype)
