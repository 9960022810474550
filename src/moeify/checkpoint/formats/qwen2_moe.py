"""Qwen2-MoE: softmax routing (renormalised or not) and one sigmoid-gated shared expert; from Qwen2,
and the format of Llama/Mistral MoEs with a shared expert or without renormalisation."""

import torch
from transformers import PretrainedConfig, Qwen2MoeConfig

from moeify.checkpoint.formats.base import MoEFeatures, OutputFormat, head_dim, zero_ffn
from moeify.checkpoint.formats.qwen_attention import qwen_attention_reason
from moeify.modeling import canonical as C
from moeify.modeling.canonical import MoELayer
from moeify.modeling.router import RouterSpec

# The zero shared expert of an MoE without one: llama.cpp reads width 0 as "the dense F" and fails its
# shape check, vLLM always loads shared_expert_gate. 256 divides by every tensor-parallel degree up to
# 256 and by the quantisation blocks (32, 256) along the row.
ZERO_SHARED_SIZE = 256

# The shared expert's gate at construction: every entry 2^-48, so |x w| < 2^-25 for any hidden state
# whose entries sum below 2^23 in magnitude and sigmoid(x w) rounds to exactly 1/2 in fp32 (and bf16).
# Not 0: llama.cpp computes the sigmoid as silu(z) / z, which is 0/0 at z = 0.
SHARED_GATE_VALUE = 2.0 ** -48


def starting_shared_gate(hidden_size: int, dtype: torch.dtype) -> torch.Tensor:
    """The shared expert's gate weight [1, D] at construction: sigmoid(x w) = 1/2 exactly."""
    return torch.full((1, hidden_size), SHARED_GATE_VALUE, dtype=dtype)

SHARED_NAMES = dict(zip(C.SHARED, ("shared_expert.gate_proj.weight", "shared_expert.up_proj.weight", "shared_expert.down_proj.weight")))


def qwen_moe_fields(num_experts: int, top_k: int, expert_size: int, features: MoEFeatures) -> dict:
    # softmax-top-k renormalised == Mixtral's top-k-then-softmax
    return {"moe_intermediate_size": expert_size, "num_experts": num_experts, "num_experts_per_tok": top_k,
            "norm_topk_prob": features.router.renormalize, "decoder_sparse_step": 1, "mlp_only_layers": [],
            "router_aux_loss_coef": 0.01}


def qwen_router_spec(config: PretrainedConfig) -> RouterSpec:
    return RouterSpec() if config.norm_topk_prob else RouterSpec("softmax-topk", renormalize=False)


class Qwen2Moe(OutputFormat):
    name = "qwen2_moe"
    architecture = "Qwen2MoeForCausalLM"
    config_class = Qwen2MoeConfig
    dense_families = ("qwen2", "llama", "mistral")
    disk_names = {C.ROUTER: "gate.weight", **SHARED_NAMES, C.SHARED_GATE: "shared_expert_gate.weight"}
    module_names = {**OutputFormat.module_names, **SHARED_NAMES, C.SHARED_GATE: "shared_expert_gate.weight"}
    explicit_lm_head = True  # llama.cpp's qwen2moe requires output.weight

    def zero_tensors(self, dense: PretrainedConfig, layer: int) -> dict[str, tuple[int, ...]]:
        # vLLM's Qwen2-MoE attention always has q/k/v biases, whatever qkv_bias says, and leaves absent ones
        # uninitialised (garbage, silently): a Llama or Mistral parent's get zero biases, and qkv_bias is true.
        if dense.model_type == "qwen2":
            return {}
        heads, kv_heads, dim = dense.num_attention_heads, dense.num_key_value_heads or dense.num_attention_heads, head_dim(dense)
        prefix = f"model.layers.{layer}.self_attn"
        return {f"{prefix}.q_proj.bias": (heads * dim,), f"{prefix}.k_proj.bias": (kv_heads * dim,), f"{prefix}.v_proj.bias": (kv_heads * dim,)}

    def supports(self, dense: PretrainedConfig, features: MoEFeatures) -> str | None:
        if not features.softmax_family:
            return f"{self.architecture} routes by softmax, not {features.router.routing}"
        return qwen_attention_reason("Qwen2-MoE", dense) or super().supports(dense, features)

    def moe_fields(self, dense: PretrainedConfig, num_experts: int, top_k: int, expert_size: int, features: MoEFeatures) -> dict:
        # q/k/v biases always (zero for a Llama or Mistral parent: zero_tensors). intermediate_size (the dense MLP
        # of mlp_only_layers, none here) is the dense F rather than the class default, as engines check it.
        return {**qwen_moe_fields(num_experts, top_k, expert_size, features), "qkv_bias": True,
                "intermediate_size": dense.intermediate_size,
                "shared_expert_intermediate_size": features.shared_size or ZERO_SHARED_SIZE, "head_dim": head_dim(dense)}

    def router_spec(self, config: PretrainedConfig) -> RouterSpec:
        return qwen_router_spec(config)

    def engine_limits(self, config: PretrainedConfig, layout: str = "per-expert") -> list[str]:
        if config.norm_topk_prob:  # llama.cpp's qwen2moe graph never renormalises (src/models/qwen2moe.cpp)
            return ["llama.cpp runs Qwen2-MoE without renormalising the top-k weights (it ignores norm_topk_prob), so there "
                    "this MoE differs; transformers runs it exactly, vLLM reads norm_topk_prob (for llama.cpp: a Llama/Mistral "
                    "model's Mixtral format, or --routing softmax-topk --no-renormalize)"]
        return []

    def from_construction(self, layer: MoELayer, expert_size: int) -> MoELayer:
        # Qwen2-MoE gates its shared expert by sigmoid(x W); W = SHARED_GATE_VALUE gives 1/2, so the down
        # projection is doubled (exact in floating point) and the block starts as an ungated shared expert.
        if layer.shared is not None and layer.shared_gate is None:
            shared = layer.shared
            layer = MoELayer(layer.router, layer.experts, layer.router_mlp_out, layer.selection_bias,
                             type(shared)(shared.gate, shared.up, shared.down * 2),
                             starting_shared_gate(shared.gate.shape[1], shared.gate.dtype))
        return self.complete(layer)

    def complete(self, layer: MoELayer) -> MoELayer:
        if layer.shared is not None:
            return layer
        hidden, dtype = layer.router.shape[1], layer.router.dtype  # always a shared expert: a zero one adds nothing
        return MoELayer(layer.router, layer.experts, layer.router_mlp_out, layer.selection_bias,
                        zero_ffn(hidden, ZERO_SHARED_SIZE, dtype), starting_shared_gate(hidden, dtype))
