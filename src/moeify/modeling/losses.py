"""Router losses. All take the router logits [T, E] and the chosen experts [T, k]."""

from collections.abc import Callable

import torch


def expert_counts(indices_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Assignments per expert [E] (int64). A scatter of ones into a fixed-size tensor: unlike bincount,
    its size does not depend on the data, so it needs no host sync and compiles."""
    flat = indices_TK.reshape(-1)
    return torch.zeros(num_experts, dtype=torch.long, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))


def arrival_order(keys_A: torch.Tensor, num_keys: int, counts: torch.Tensor | None = None) -> torch.Tensor:
    """Each element's position among the elements with the same key, in order [A] (0 = first);
    `counts`, the elements per key, when already counted. Static shapes: no host sync."""
    order_A = keys_A.argsort(stable=True)
    if counts is None:
        counts = expert_counts(keys_A, num_keys)
    starts = counts.cumsum(0) - counts
    position_sorted_A = torch.arange(keys_A.numel(), device=keys_A.device) - starts[keys_A[order_A]]
    return torch.empty_like(position_sorted_A).scatter_(0, order_A, position_sorted_A)


GroupSum = Callable[[torch.Tensor], torch.Tensor]


def switch_aux_loss(logits_TE: torch.Tensor, indices_TK: torch.Tensor, counts_E: torch.Tensor | None = None,
                    group_sum: GroupSum | None = None, tokens: torch.Tensor | None = None) -> torch.Tensor:
    """Switch/Mixtral load-balancing loss E * sum_e f_e * P_e.

    f_e: fraction of the T*k assignments that went to expert e; P_e: mean router probability of e.
    Equals 1 when routing is perfectly balanced, E at worst (everything to one expert, k=1).
    Under expert parallelism f and P are the group's: `counts_E` its counts, `group_sum` a
    differentiable sum over its ranks, `tokens` its token count.
    """
    num_experts = logits_TE.shape[-1]
    probs_TE = logits_TE.float().softmax(dim=-1)
    if counts_E is None:
        counts_E = expert_counts(indices_TK, num_experts)
    probs_E = probs_TE.sum(dim=0)
    if group_sum is not None:
        probs_E = group_sum(probs_E)
    fraction_E = counts_E.to(probs_TE.dtype) / counts_E.sum()
    mean_probs_E = probs_E / (tokens if tokens is not None else probs_TE.shape[0])
    return num_experts * (fraction_E * mean_probs_E).sum()


def cv_squared(x: torch.Tensor, unbiased: bool = False) -> torch.Tensor:
    """Squared coefficient of variation var(x) / (mean(x)^2 + 1e-10); the population variance, or the
    unbiased one (LLaMA-MoE's `torch.var`, E/(E-1) times larger)."""
    return x.float().var(correction=1 if unbiased else 0) / (x.float().mean() ** 2 + 1e-10)


def smooth_load(clean_TE: torch.Tensor, noisy_TE: torch.Tensor, noise_std_TE: torch.Tensor, top_k: int,
                noise_alone: bool = False) -> torch.Tensor:
    """Shazeer et al.'s differentiable load [E]: the sum over tokens of P(expert in the top k), each
    expert's noise redrawn with the others' noisy logits held fixed. An expert in the top k stays
    there while its logit beats the (k+1)-th largest noisy logit; one outside gets in when it beats
    the k-th: P = Phi((clean - threshold) / noise_std).
    `noise_alone`: LLaMA-MoE's code (moe_gates.py, `is_in`) decides in or out by comparing the noise term
    alone, noisy - clean, with the (k+1)-th noisy logit, not the noisy logit itself."""
    if top_k >= noisy_TE.shape[1]:
        return torch.ones_like(clean_TE).sum(dim=0)
    top_TK1 = noisy_TE.topk(top_k + 1, dim=-1).values
    threshold_if_in_T1, threshold_if_out_T1 = top_TK1[:, top_k:], top_TK1[:, top_k - 1 : top_k]
    is_in_TE = (noisy_TE - clean_TE if noise_alone else noisy_TE) > threshold_if_in_T1
    prob_if_in = torch.special.ndtr((clean_TE - threshold_if_in_T1) / noise_std_TE)
    prob_if_out = torch.special.ndtr((clean_TE - threshold_if_out_T1) / noise_std_TE)
    return torch.where(is_in_TE, prob_if_in, prob_if_out).sum(dim=0)


def cv_squared_balance_loss(weights_TK: torch.Tensor, indices_TK: torch.Tensor, num_experts: int,
                            counts_E: torch.Tensor | None = None, group_sum: GroupSum | None = None,
                            load_E: torch.Tensor | None = None, unbiased: bool = False) -> torch.Tensor:
    """LLaMA-MoE balance loss CV^2(importance) + CV^2(load).

    importance_e = sum of the gate scores given to e (differentiable); load_e = number of tokens
    sent to e (a count, without gradient), or `load_E` given (the smooth load of a noisy gate,
    differentiable). Under expert parallelism all are the group's (see switch_aux_loss).
    """
    importance_E = torch.zeros(num_experts, dtype=weights_TK.dtype, device=weights_TK.device)
    importance_E = importance_E.scatter_add(0, indices_TK.reshape(-1), weights_TK.reshape(-1))
    if group_sum is not None:
        importance_E = group_sum(importance_E)
        load_E = group_sum(load_E) if load_E is not None else None
    if load_E is None:
        load_E = counts_E if counts_E is not None else expert_counts(indices_TK, num_experts)
    return cv_squared(importance_E, unbiased) + cv_squared(load_E, unbiased)


def router_z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """ST-MoE z-loss: mean over tokens of logsumexp(logits)^2; keeps router logits small."""
    return torch.logsumexp(logits_TE.float(), dim=-1).pow(2).mean()


def router_entropy(logits_TE: torch.Tensor) -> torch.Tensor:
    """Mean entropy (nats) of the router's softmax distribution over experts."""
    log_probs_TE = logits_TE.float().log_softmax(dim=-1)
    return -(log_probs_TE.exp() * log_probs_TE).sum(-1).mean()
