"""Stock transformers MoE architectures moeify writes: one class per output architecture.

Each declares which dense configs it represents exactly (`unsupported_reason`), how its config is
derived, and its canonical on-disk key names (the per-expert layout transformers converts on load).
"""

from typing import ClassVar

import torch
from transformers import MixtralConfig, PretrainedConfig, Qwen2MoeConfig, Qwen3MoeConfig

from moeify.errors import MoeifyError

# Dense-config fields that describe the MoE, not the attention/embedding skeleton, and are never copied.
_NOT_COPIED = {"architectures", "model_type", "intermediate_size", "transformers_version", "dtype", "torch_dtype"}


def _config_fields(config_class: type[PretrainedConfig]) -> set[str]:
    fields: set[str] = set()
    for cls in config_class.__mro__:
        fields.update(getattr(cls, "__annotations__", {}))
    return fields


class OutputArchitecture:
    name: ClassVar[str]
    architecture: ClassVar[str]
    config_class: ClassVar[type[PretrainedConfig]]
    dense_families: ClassVar[tuple[str, ...]]

    def unsupported_reason(self, dense: PretrainedConfig) -> str | None:
        """None if this architecture represents an MoE of `dense` exactly, else what blocks it."""
        if dense.model_type not in self.dense_families:
            return f"{self.architecture} is made from {'/'.join(self.dense_families)} models, not {dense.model_type}"
        return None

    def moe_fields(self, num_experts: int, top_k: int, expert_size: int) -> dict:
        raise NotImplementedError

    def make_config(self, dense: PretrainedConfig, num_experts: int, top_k: int, expert_size: int) -> PretrainedConfig:
        accepted = _config_fields(self.config_class)
        values = {k: v for k, v in dense.to_dict().items() if k in accepted and k not in _NOT_COPIED}
        values.update(self.moe_fields(num_experts, top_k, expert_size))
        config = self.config_class(**values)
        config.architectures = [self.architecture]
        config.dtype = dense.dtype
        return config

    def router_key(self, layer: int) -> str:
        raise NotImplementedError

    def expert_keys(self, layer: int, expert: int) -> tuple[str, str, str]:
        """(gate, up, down) weight names of one expert."""
        raise NotImplementedError

    def extra_layer_tensors(self, layer: int, hidden_size: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        return {}


class Mixtral(OutputArchitecture):
    name = "mixtral"
    architecture = "MixtralForCausalLM"
    config_class = MixtralConfig
    dense_families = ("llama", "mistral")

    def unsupported_reason(self, dense: PretrainedConfig) -> str | None:
        if getattr(dense, "attention_bias", False):
            return "Mixtral has no attention biases, but this model has attention_bias=true"
        return super().unsupported_reason(dense)

    def moe_fields(self, num_experts: int, top_k: int, expert_size: int) -> dict:
        return {
            "intermediate_size": expert_size,
            "num_local_experts": num_experts,
            "num_experts_per_tok": top_k,
            "router_aux_loss_coef": 0.01,
            "router_jitter_noise": 0.0,
        }

    def router_key(self, layer: int) -> str:
        return f"model.layers.{layer}.block_sparse_moe.gate.weight"

    def expert_keys(self, layer: int, expert: int) -> tuple[str, str, str]:
        prefix = f"model.layers.{layer}.block_sparse_moe.experts.{expert}"
        return f"{prefix}.w1.weight", f"{prefix}.w3.weight", f"{prefix}.w2.weight"


class _QwenMoe(OutputArchitecture):
    def moe_fields(self, num_experts: int, top_k: int, expert_size: int) -> dict:
        return {
            "moe_intermediate_size": expert_size,
            "num_experts": num_experts,
            "num_experts_per_tok": top_k,
            "norm_topk_prob": True,  # softmax-top-k-renormalise == Mixtral's top-k-then-softmax
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
            "router_aux_loss_coef": 0.01,
        }

    def router_key(self, layer: int) -> str:
        return f"model.layers.{layer}.mlp.gate.weight"

    def expert_keys(self, layer: int, expert: int) -> tuple[str, str, str]:
        prefix = f"model.layers.{layer}.mlp.experts.{expert}"
        return f"{prefix}.gate_proj.weight", f"{prefix}.up_proj.weight", f"{prefix}.down_proj.weight"


class Qwen2Moe(_QwenMoe):
    name = "qwen2_moe"
    architecture = "Qwen2MoeForCausalLM"
    config_class = Qwen2MoeConfig
    dense_families = ("qwen2",)

    def moe_fields(self, num_experts: int, top_k: int, expert_size: int) -> dict:
        # Qwen2 always has q/k/v biases. Qwen2-MoE always has a shared expert: an empty one adds zero.
        return {**super().moe_fields(num_experts, top_k, expert_size), "qkv_bias": True, "shared_expert_intermediate_size": 0}

    def extra_layer_tensors(self, layer: int, hidden_size: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        prefix = f"model.layers.{layer}.mlp.shared_expert"
        return {
            f"{prefix}.gate_proj.weight": torch.zeros(0, hidden_size, dtype=dtype),
            f"{prefix}.up_proj.weight": torch.zeros(0, hidden_size, dtype=dtype),
            f"{prefix}.down_proj.weight": torch.zeros(hidden_size, 0, dtype=dtype),
            f"{prefix}_gate.weight": torch.zeros(1, hidden_size, dtype=dtype),
        }


class Qwen3Moe(_QwenMoe):
    name = "qwen3_moe"
    architecture = "Qwen3MoeForCausalLM"
    config_class = Qwen3MoeConfig
    dense_families = ("qwen3",)


ARCHITECTURES: list[OutputArchitecture] = [Mixtral(), Qwen2Moe(), Qwen3Moe()]


def architecture_for(dense: PretrainedConfig) -> OutputArchitecture:
    """The first stock MoE architecture that represents an MoE made from `dense` exactly."""
    reasons = []
    for arch in ARCHITECTURES:
        reason = arch.unsupported_reason(dense)
        if reason is None:
            return arch
        if dense.model_type in arch.dense_families:
            reasons.append(reason)
    detail = "; ".join(reasons) or f"no stock MoE architecture is made from {dense.model_type} models"
    raise MoeifyError(f"cannot represent this {dense.model_type} model as a stock MoE: {detail}")
