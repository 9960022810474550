"""DeepSeek-V3's MoE (sigmoid scores, selection bias, ungated shared experts) on standard GQA
attention: transformers' Glm4MoeForCausalLM with every layer sparse and full rotary."""

import torch
from transformers import Glm4MoeConfig, PretrainedConfig

from moeify.checkpoint.formats.base import MoEFeatures, OutputFormat, head_dim, pad_ffn, shared_blocks, zero_ffn
from moeify.checkpoint.formats.qwen_attention import qwen_attention_reason
from moeify.errors import MoeifyError
from moeify.modeling import canonical as C
from moeify.modeling.canonical import MoELayer
from moeify.modeling.router import RouterSpec

SHARED_NAMES = dict(zip(C.SHARED, ("shared_experts.gate_proj.weight", "shared_experts.up_proj.weight", "shared_experts.down_proj.weight")))


class DeepseekV3Style(OutputFormat):
    name = "deepseek-v3"
    architecture = "Glm4MoeForCausalLM"
    config_class = Glm4MoeConfig
    dense_families = ("llama", "mistral", "qwen2", "qwen3")
    disk_names = {C.ROUTER: "gate.weight", C.SELECTION_BIAS: "gate.e_score_correction_bias", **SHARED_NAMES}
    module_names = {**OutputFormat.module_names, C.SELECTION_BIAS: "gate.e_score_correction_bias", **SHARED_NAMES}
    explicit_lm_head = True  # vLLM's Glm4Moe never ties lm_head to the embedding: without lm_head.weight it computes garbage

    def supports(self, dense: PretrainedConfig, features: MoEFeatures) -> str | None:
        if features.router.routing != "sigmoid-topk":
            return f"the DeepSeek-V3 format routes by sigmoid scores, not {features.router.routing}"
        return qwen_attention_reason("the DeepSeek-V3 format", dense) or super().supports(dense, features)

    def moe_fields(self, dense: PretrainedConfig, num_experts: int, top_k: int, expert_size: int, features: MoEFeatures) -> dict:
        rope = dict(dense.rope_parameters or {})
        rope["partial_rotary_factor"] = 1.0
        return {
            "intermediate_size": dense.intermediate_size, "moe_intermediate_size": expert_size, "n_routed_experts": num_experts,
            "num_experts_per_tok": top_k, "n_shared_experts": max(1, shared_blocks(features.shared_size, expert_size)),
            "routed_scaling_factor": 1.0, "n_group": 1, "topk_group": 1, "first_k_dense_replace": 0,
            "norm_topk_prob": features.router.renormalize, "use_qk_norm": dense.model_type == "qwen3",
            "attention_bias": dense.model_type == "qwen2", "head_dim": head_dim(dense), "rope_parameters": rope,
            "num_nextn_predict_layers": 0,
        }

    def router_spec(self, config: PretrainedConfig) -> RouterSpec:
        if config.routed_scaling_factor != 1.0 or config.n_group != 1:
            raise MoeifyError("moeify trains DeepSeek-V3-style models with routed_scaling_factor 1 and one expert group")
        return RouterSpec("sigmoid-topk", renormalize=config.norm_topk_prob)

    def engine_limits(self, config: PretrainedConfig, layout: str = "per-expert") -> list[str]:
        return ["llama.cpp's converter reads GLM's own special tokens ([gMASK], <|user|>) for Glm4MoeForCausalLM and stops on "
                "any other tokenizer, so this checkpoint does not convert to GGUF; transformers runs it exactly"]

    def from_construction(self, layer: MoELayer, expert_size: int) -> MoELayer:
        # The stock shared block holds n_shared x expert_size neurons; zero neurons pad it and add nothing.
        if layer.shared is not None:
            layer = MoELayer(layer.router, layer.experts, layer.router_mlp_out, layer.selection_bias, pad_ffn(layer.shared, expert_size))
        return self.complete(layer)

    def complete(self, layer: MoELayer) -> MoELayer:
        # Without shared experts: one zero shared expert (vLLM builds the shared MLP whenever
        # n_shared_experts is set, llama.cpp then wants its tensors); moeify loads it as none.
        expert_size = layer.experts[0].size
        shared = layer.shared if layer.shared is not None else zero_ffn(layer.router.shape[1], expert_size, layer.router.dtype)
        bias = layer.selection_bias if layer.selection_bias is not None else torch.zeros(layer.num_experts)
        return MoELayer(layer.router, layer.experts, layer.router_mlp_out, bias, shared, layer.shared_gate)
