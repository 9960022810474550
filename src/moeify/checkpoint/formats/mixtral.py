"""Mixtral: top-k-then-softmax over a linear router, no shared expert; from Llama and Mistral."""

from transformers import MixtralConfig, PretrainedConfig

from moeify.checkpoint.formats.base import MoEFeatures, OutputFormat
from moeify.modeling import canonical as C


class Mixtral(OutputFormat):
    name = "mixtral"
    architecture = "MixtralForCausalLM"
    config_class = MixtralConfig
    dense_families = ("llama", "mistral")
    disk_prefix = "model.layers.{layer}.block_sparse_moe"
    disk_names = {C.ROUTER: "gate.weight"}
    expert_disk_names = ("experts.{expert}.w1.weight", "experts.{expert}.w3.weight", "experts.{expert}.w2.weight")

    def supports(self, dense: PretrainedConfig, features: MoEFeatures) -> str | None:
        if getattr(dense, "attention_bias", False):
            return "Mixtral has no attention biases, but this model has attention_bias=true"
        if not (features.softmax_family and features.router.renormalize):
            return f"Mixtral routes top-k-then-softmax (renormalised), not {features.describe()}"
        if features.shared_size:
            return "Mixtral has no shared expert"
        return super().supports(dense, features)

    def engine_limits(self, config: PretrainedConfig, layout: str = "per-expert") -> list[str]:
        if layout == "fused":  # its converter (conversion/llama.py) reads Mixtral experts only as block_sparse_moe.experts.N.wK
            return ["llama.cpp's converter reads Mixtral experts only per expert (block_sparse_moe.experts.N.w1/w2/w3) and stops "
                    "on the fused layout's mlp.experts.gate_up_proj; write --layout per-expert for llama.cpp"]
        return []

    def moe_fields(self, dense: PretrainedConfig, num_experts: int, top_k: int, expert_size: int, features: MoEFeatures) -> dict:
        return {"intermediate_size": expert_size, "num_local_experts": num_experts, "num_experts_per_tok": top_k,
                "router_aux_loss_coef": 0.01, "router_jitter_noise": 0.0}
