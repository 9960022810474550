import torch


def switch_aux_loss(logits_TE: torch.Tensor, indices_TK: torch.Tensor) -> torch.Tensor:
    """Switch/Mixtral load-balancing loss E * sum_e f_e * P_e.

    f_e: fraction of the T*k assignments that went to expert e; P_e: mean router probability of e.
    Equals 1 when routing is perfectly balanced, E at worst (everything to one expert, k=1).
    """
    num_experts = logits_TE.shape[-1]
    probs_TE = logits_TE.float().softmax(dim=-1)
    counts_E = torch.bincount(indices_TK.reshape(-1), minlength=num_experts).to(probs_TE.dtype)
    fraction_E = counts_E / indices_TK.numel()
    return num_experts * (fraction_E * probs_TE.mean(dim=0)).sum()
