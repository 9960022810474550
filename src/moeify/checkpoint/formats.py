"""Stock transformers MoE architectures moeify writes: one class per output architecture.

Each declares which dense configs and MoE features it represents exactly (`unsupported_reason`),
how its config is derived, its canonical on-disk key names (the per-expert layout transformers
converts on load), and the router semantics a stock model of it has (`router_spec`).

What no stock architecture holds (the MLP gate) is written in moeify's own format: the layout of the
architecture that would hold everything else, with the gate under keys stock transformers does not
know (so a stock load reports the gate as missing instead of silently using a wrong one).
"""

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from transformers import Glm4MoeConfig, MixtralConfig, PretrainedConfig, Qwen2MoeConfig, Qwen3MoeConfig

from moeify.errors import MoeifyError
from moeify.modeling.router import RouterSpec

# Dense-config fields that describe the MoE, not the attention/embedding skeleton, and are never copied.
_NOT_COPIED = {"architectures", "model_type", "intermediate_size", "transformers_version", "dtype", "torch_dtype"}


def _config_fields(config_class: type[PretrainedConfig]) -> set[str]:
    fields: set[str] = set()
    for cls in config_class.__mro__:
        fields.update(getattr(cls, "__annotations__", {}))
    return fields


@dataclass(frozen=True)
class MoEFeatures:
    """What an MoE needs from an output format besides the dense skeleton."""

    router: RouterSpec = RouterSpec()
    shared_size: int = 0  # neurons of the always-active shared expert (0: none)

    def describe(self) -> str:
        parts = [self.router.routing + ("" if self.router.renormalize or self.router.routing == "topk-softmax" else " without renormalisation")]
        if self.shared_size:
            parts.append(f"a shared expert of {self.shared_size} neurons")
        return ", ".join(parts)


def _softmax_family(router: RouterSpec) -> bool:
    return router.routing in ("topk-softmax", "softmax-topk")


def _renormalised(router: RouterSpec) -> bool:
    return router.routing == "topk-softmax" or router.renormalize


class OutputArchitecture:
    name: ClassVar[str]
    architecture: ClassVar[str]
    config_class: ClassVar[type[PretrainedConfig]]
    dense_families: ClassVar[tuple[str, ...]]
    shared_attribute: ClassVar[str | None] = None  # module name of the shared expert inside the MoE block
    selection_bias_key: ClassVar[str | None] = None  # on-disk name (per layer) of the aux-loss-free bias

    def unsupported_reason(self, dense: PretrainedConfig, features: MoEFeatures = MoEFeatures()) -> str | None:
        """None if this architecture represents an MoE of `dense` with `features` exactly, else what blocks it."""
        if dense.model_type not in self.dense_families:
            return f"{self.architecture} is made from {'/'.join(self.dense_families)} models, not {dense.model_type}"
        if features.router.gate != "linear":
            return f"{self.architecture} has a linear router; the {features.router.gate} gate is moeify's own"
        return None

    def moe_fields(self, dense: PretrainedConfig, num_experts: int, top_k: int, expert_size: int, features: MoEFeatures) -> dict:
        raise NotImplementedError

    def make_config(self, dense: PretrainedConfig, num_experts: int, top_k: int, expert_size: int,
                    features: MoEFeatures = MoEFeatures()) -> PretrainedConfig:
        accepted = _config_fields(self.config_class)
        values = {k: v for k, v in dense.to_dict().items() if k in accepted and k not in _NOT_COPIED}
        values.update(self.moe_fields(dense, num_experts, top_k, expert_size, features))
        config = self.config_class(**values)
        config.architectures = [self.architecture]
        config.dtype = dense.dtype
        return config

    def router_spec(self, config: PretrainedConfig) -> RouterSpec:
        """The routing a stock model of this architecture computes."""
        return RouterSpec()

    def router_key(self, layer: int) -> str:
        raise NotImplementedError

    def gate_keys(self, layer: int, gate: str) -> tuple[str, ...]:
        """On-disk names of the gate network: the stock router, or moeify's MLP gate (in, out)."""
        if gate == "linear":
            return (self.router_key(layer),)
        prefix = self.router_key(layer).removesuffix(".weight")
        return f"{prefix}.mlp_in.weight", f"{prefix}.mlp_out.weight"

    def expert_keys(self, layer: int, expert: int) -> tuple[str, str, str]:
        """(gate, up, down) weight names of one expert."""
        raise NotImplementedError

    def layer_tensors(self, layer: int, shared: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
                      hidden_size: int, expert_size: int, num_experts: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Per-layer tensors besides router and routed experts: the shared expert and its gate, biases."""
        if shared is not None:
            raise AssertionError(f"{self.architecture} has no shared expert")
        return {}


class Mixtral(OutputArchitecture):
    name = "mixtral"
    architecture = "MixtralForCausalLM"
    config_class = MixtralConfig
    dense_families = ("llama", "mistral")

    def unsupported_reason(self, dense: PretrainedConfig, features: MoEFeatures = MoEFeatures()) -> str | None:
        if getattr(dense, "attention_bias", False):
            return "Mixtral has no attention biases, but this model has attention_bias=true"
        if not (_softmax_family(features.router) and _renormalised(features.router)):
            return f"Mixtral routes top-k-then-softmax (renormalised), not {features.describe()}"
        if features.shared_size:
            return "Mixtral has no shared expert"
        return super().unsupported_reason(dense, features)

    def moe_fields(self, dense: PretrainedConfig, num_experts: int, top_k: int, expert_size: int, features: MoEFeatures) -> dict:
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


def _mlp_tensors(prefix: str, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> dict[str, torch.Tensor]:
    return {f"{prefix}.gate_proj.weight": gate, f"{prefix}.up_proj.weight": up, f"{prefix}.down_proj.weight": down}


def _empty_mlp(hidden_size: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(gate, up, down) of a shared expert with no neurons: it adds exactly zero."""
    return torch.zeros(0, hidden_size, dtype=dtype), torch.zeros(0, hidden_size, dtype=dtype), torch.zeros(hidden_size, 0, dtype=dtype)


def _qwen_attention_reason(format_name: str, dense: PretrainedConfig) -> str | None:
    """What keeps a Llama/Mistral attention out of the Qwen-style attention (q/k/v biases only, no
    sliding window on every layer) that Qwen2-MoE and the DeepSeek-V3 format share."""
    if dense.model_type == "llama" and getattr(dense, "attention_bias", False):
        return f"{format_name} has no output-projection bias, but this model has attention_bias=true"
    if dense.model_type == "mistral" and getattr(dense, "sliding_window", None):
        return f"{format_name} has no sliding-window attention on every layer, as this Mistral model has"
    return None


class _PerExpertKeys(OutputArchitecture):
    def router_key(self, layer: int) -> str:
        return f"model.layers.{layer}.mlp.gate.weight"

    def expert_keys(self, layer: int, expert: int) -> tuple[str, str, str]:
        prefix = f"model.layers.{layer}.mlp.experts.{expert}"
        return f"{prefix}.gate_proj.weight", f"{prefix}.up_proj.weight", f"{prefix}.down_proj.weight"


class _QwenMoe(_PerExpertKeys):
    def unsupported_reason(self, dense: PretrainedConfig, features: MoEFeatures = MoEFeatures()) -> str | None:
        if not _softmax_family(features.router):
            return f"{self.architecture} routes by softmax, not {features.router.routing}"
        return super().unsupported_reason(dense, features)

    def moe_fields(self, dense: PretrainedConfig, num_experts: int, top_k: int, expert_size: int, features: MoEFeatures) -> dict:
        return {
            "moe_intermediate_size": expert_size,
            "num_experts": num_experts,
            "num_experts_per_tok": top_k,
            # softmax-top-k renormalised == Mixtral's top-k-then-softmax
            "norm_topk_prob": _renormalised(features.router),
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
            "router_aux_loss_coef": 0.01,
        }

    def router_spec(self, config: PretrainedConfig) -> RouterSpec:
        return RouterSpec() if config.norm_topk_prob else RouterSpec("softmax-topk", renormalize=False)


class Qwen2Moe(_QwenMoe):
    """Also the format of Llama/Mistral MoEs with a shared expert or without renormalisation."""

    name = "qwen2_moe"
    architecture = "Qwen2MoeForCausalLM"
    config_class = Qwen2MoeConfig
    dense_families = ("qwen2", "llama", "mistral")
    shared_attribute = "shared_expert"

    def unsupported_reason(self, dense: PretrainedConfig, features: MoEFeatures = MoEFeatures()) -> str | None:
        return _qwen_attention_reason("Qwen2-MoE", dense) or super().unsupported_reason(dense, features)

    def moe_fields(self, dense: PretrainedConfig, num_experts: int, top_k: int, expert_size: int, features: MoEFeatures) -> dict:
        # Qwen2 always has q/k/v biases, Llama and Mistral never. Qwen2-MoE always has a shared expert: an empty one adds zero.
        return {**super().moe_fields(dense, num_experts, top_k, expert_size, features),
                "qkv_bias": dense.model_type == "qwen2", "shared_expert_intermediate_size": features.shared_size,
                "head_dim": getattr(dense, "head_dim", None) or dense.hidden_size // dense.num_attention_heads}

    def layer_tensors(self, layer: int, shared: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
                      hidden_size: int, expert_size: int, num_experts: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        prefix = f"model.layers.{layer}.mlp.shared_expert"
        if shared is None:
            shared = _empty_mlp(hidden_size, dtype)
        gate, up, down = shared
        # Qwen2-MoE gates its shared expert by sigmoid(x W); W = 0 gives 1/2, so the down projection
        # is doubled (exact in floating point) and the block starts as an ungated shared expert.
        return {**_mlp_tensors(prefix, gate, up, down * 2), f"{prefix}_gate.weight": torch.zeros(1, hidden_size, dtype=dtype)}


class Qwen3Moe(_QwenMoe):
    name = "qwen3_moe"
    architecture = "Qwen3MoeForCausalLM"
    config_class = Qwen3MoeConfig
    dense_families = ("qwen3",)

    def unsupported_reason(self, dense: PretrainedConfig, features: MoEFeatures = MoEFeatures()) -> str | None:
        if features.shared_size:
            return "Qwen3-MoE has no shared expert"
        return super().unsupported_reason(dense, features)


class DeepseekV3Style(_PerExpertKeys):
    """DeepSeek-V3's MoE (sigmoid scores, selection bias, ungated shared experts) on standard GQA
    attention: transformers' Glm4MoeForCausalLM with every layer sparse and full rotary."""

    name = "deepseek-v3"
    architecture = "Glm4MoeForCausalLM"
    config_class = Glm4MoeConfig
    dense_families = ("llama", "mistral", "qwen2", "qwen3")
    shared_attribute = "shared_experts"
    selection_bias_key = "model.layers.{layer}.mlp.gate.e_score_correction_bias"

    def unsupported_reason(self, dense: PretrainedConfig, features: MoEFeatures = MoEFeatures()) -> str | None:
        if features.router.routing != "sigmoid-topk":
            return f"the DeepSeek-V3 format routes by sigmoid scores, not {features.router.routing}"
        return _qwen_attention_reason("the DeepSeek-V3 format", dense) or super().unsupported_reason(dense, features)

    def moe_fields(self, dense: PretrainedConfig, num_experts: int, top_k: int, expert_size: int, features: MoEFeatures) -> dict:
        rope = dict(dense.rope_parameters or {})
        rope["partial_rotary_factor"] = 1.0
        return {
            "intermediate_size": dense.intermediate_size,
            "moe_intermediate_size": expert_size,
            "n_routed_experts": num_experts,
            "num_experts_per_tok": top_k,
            "n_shared_experts": math.ceil(features.shared_size / expert_size),
            "routed_scaling_factor": 1.0,
            "n_group": 1,
            "topk_group": 1,
            "first_k_dense_replace": 0,
            "norm_topk_prob": features.router.renormalize,
            "use_qk_norm": dense.model_type == "qwen3",
            "attention_bias": dense.model_type == "qwen2",
            "head_dim": getattr(dense, "head_dim", None) or dense.hidden_size // dense.num_attention_heads,
            "rope_parameters": rope,
            "num_nextn_predict_layers": 0,
        }

    def router_spec(self, config: PretrainedConfig) -> RouterSpec:
        if config.routed_scaling_factor != 1.0 or config.n_group != 1:
            raise MoeifyError("moeify trains DeepSeek-V3-style models with routed_scaling_factor 1 and one expert group")
        return RouterSpec("sigmoid-topk", renormalize=config.norm_topk_prob)

    def layer_tensors(self, layer: int, shared: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
                      hidden_size: int, expert_size: int, num_experts: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        if shared is None:  # no shared expert: n_shared_experts = 0 and empty tensors
            shared = _empty_mlp(hidden_size, dtype)
        # The stock shared block holds n_shared * expert_size neurons; zero neurons pad it and add nothing.
        gate, up, down = shared
        pad = -gate.shape[0] % expert_size
        gate = torch.cat([gate, gate.new_zeros(pad, hidden_size)])
        up = torch.cat([up, up.new_zeros(pad, hidden_size)])
        down = torch.cat([down, down.new_zeros(hidden_size, pad)], dim=1)
        return {self.selection_bias_key.format(layer=layer): torch.zeros(num_experts),  # stock keeps it in fp32
                **_mlp_tensors(f"model.layers.{layer}.mlp.shared_experts", gate, up, down)}


ARCHITECTURES: list[OutputArchitecture] = [Mixtral(), Qwen2Moe(), Qwen3Moe(), DeepseekV3Style()]
FORMAT_NAMES = [arch.name for arch in ARCHITECTURES]


def architecture_for(dense: PretrainedConfig, features: MoEFeatures = MoEFeatures(), name: str | None = None) -> OutputArchitecture:
    """The first (or the named) stock MoE architecture that represents an MoE of `dense` with `features` exactly."""
    candidates = [arch for arch in ARCHITECTURES if name is None or arch.name == name]
    if not candidates:
        raise MoeifyError(f"unknown format {name!r}; choose one of: {', '.join(FORMAT_NAMES)}")
    reasons = []
    for arch in candidates:
        reason = arch.unsupported_reason(dense, features)
        if reason is None:
            return arch
        if dense.model_type in arch.dense_families or name is not None:
            reasons.append(reason)
    detail = "; ".join(reasons) or f"no stock MoE architecture is made from {dense.model_type} models"
    raise MoeifyError(f"cannot represent this {dense.model_type} MoE ({features.describe()}) in a stock format: {detail}")
