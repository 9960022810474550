"""Qwen3-MoE: softmax routing (renormalised or not), no shared expert; from Qwen3."""

from transformers import PretrainedConfig, Qwen3MoeConfig

from moeify.checkpoint.formats.base import MoEFeatures, OutputFormat, head_dim
from moeify.checkpoint.formats.qwen2_moe import qwen_moe_fields, qwen_router_spec
from moeify.modeling.router import RouterSpec


class Qwen3Moe(OutputFormat):
    name = "qwen3_moe"
    architecture = "Qwen3MoeForCausalLM"
    config_class = Qwen3MoeConfig
    dense_families = ("qwen3",)

    def supports(self, dense: PretrainedConfig, features: MoEFeatures) -> str | None:
        if not features.softmax_family:
            return f"{self.architecture} routes by softmax, not {features.router.routing}"
        if features.shared_size:
            return "Qwen3-MoE has no shared expert"
        return super().supports(dense, features)

    def moe_fields(self, dense: PretrainedConfig, num_experts: int, top_k: int, expert_size: int, features: MoEFeatures) -> dict:
        return {**qwen_moe_fields(num_experts, top_k, expert_size, features), "head_dim": head_dim(dense)}

    def router_spec(self, config: PretrainedConfig) -> RouterSpec:
        return qwen_router_spec(config)

    def engine_limits(self, config: PretrainedConfig, layout: str = "per-expert") -> list[str]:
        if not config.norm_topk_prob:  # llama.cpp's qwen3moe graph always renormalises (src/models/qwen3moe.cpp)
            return ["llama.cpp runs Qwen3-MoE always renormalising the top-k weights (it ignores norm_topk_prob=false), so "
                    "there this MoE differs; transformers runs it exactly, vLLM reads norm_topk_prob"]
        return []
