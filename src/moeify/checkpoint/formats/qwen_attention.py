"""The Qwen-style attention (q/k/v biases only, no per-layer sliding window) that Qwen2-MoE and the
DeepSeek-V3 format share, and what keeps a Llama or Mistral attention out of it."""

from transformers import PretrainedConfig


def qwen_attention_reason(format_name: str, dense: PretrainedConfig) -> str | None:
    if dense.model_type == "llama" and getattr(dense, "attention_bias", False):
        return f"{format_name} has no output-projection bias, but this model has attention_bias=true"
    if dense.model_type == "mistral" and getattr(dense, "sliding_window", None):
        return f"{format_name} has no sliding-window attention on every layer, as this Mistral model has"
    return None
