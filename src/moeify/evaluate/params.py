import torch


def parameter_counts(model: torch.nn.Module) -> tuple[int, int]:
    """(total, activated per token) parameters of a transformers model, dense or MoE.

    Embeddings count in both (tied ones once). For fused MoE experts ([E, ...] gate_up_proj and
    down_proj), a token activates k of the E experts.
    """
    total = sum(p.numel() for p in model.parameters())
    top_k = getattr(model.config, "num_experts_per_tok", None)
    inactive = 0
    for module in model.modules():
        gate_up = getattr(module, "gate_up_proj", None)
        if isinstance(gate_up, torch.nn.Parameter) and gate_up.dim() == 3 and top_k:
            num_experts = gate_up.shape[0]
            per_expert = (gate_up.numel() + module.down_proj.numel()) // num_experts
            inactive += (num_experts - top_k) * per_expert
    return total, total - inactive
