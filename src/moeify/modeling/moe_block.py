"""The MoE feed-forward block: route each token to k experts and mix their outputs."""

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from moeify.modeling.experts import Dispatch, Experts
from moeify.modeling.losses import (
    arrival_order,
    cv_squared_balance_loss,
    expert_counts,
    router_entropy,
    router_z_loss,
    smooth_load,
    switch_aux_loss,
)
from moeify.modeling.router import RouterSpec, TopKRouter

BalanceLoss = Literal["switch", "cv2", "none"]


@dataclass
class MoEOutput:
    hidden: torch.Tensor  # same shape as the input
    balance_loss: torch.Tensor  # the block's balance loss (switch: E * sum f_e P_e; cv2: CV^2(importance) + CV^2(load))
    z_loss: torch.Tensor  # mean logsumexp^2
    load_E: torch.Tensor  # assignments routed to each expert (before any drop)
    dropped: torch.Tensor  # assignments dropped by the capacity limit
    entropy: torch.Tensor  # mean router entropy
    indices_TK: torch.Tensor  # chosen experts per token, best first (detached; for routing analysis)


def capacity_ranks(indices_TK: torch.Tensor, num_experts: int, counts_E: torch.Tensor | None = None) -> torch.Tensor:
    """Each assignment's arrival order at its expert [T, k] (0 = first).

    Priority (GShard): every token's first choice before any second choice; within a choice
    rank, earlier tokens first. Static shapes throughout: no host sync. `counts_E`, the
    assignments per expert, when already counted.
    """
    rank_A = arrival_order(indices_TK.t().reshape(-1), num_experts, counts_E)  # in choice-major order
    return rank_A.view(indices_TK.shape[1], -1).t()


class MoEBlock(nn.Module):
    def __init__(
        self,
        hidden_size: int,
        expert_size: int,
        num_experts: int,
        top_k: int,
        dispatch: Dispatch = "auto",
        noisy: bool = False,
        capacity_factor: float | None = None,
        router_spec: RouterSpec = RouterSpec(),
        balance_loss: BalanceLoss = "switch",
    ):
        super().__init__()
        self.router = TopKRouter(hidden_size, num_experts, top_k, noisy=noisy, spec=router_spec)
        self.experts = Experts(num_experts, hidden_size, expert_size, dispatch)
        self.capacity_factor = capacity_factor
        self.balance_loss = balance_loss  # the one balance loss computed in training
        self.output_scale = 1.0  # a fixed factor on the routed experts' output (the scale held as a multiplier)
        self.cv2_unbiased = False  # cv2: the unbiased variance (LLaMA-MoE) instead of the population one
        self.cv2_smooth_load = True  # cv2 with a noisy gate: Shazeer's differentiable load instead of counts
        self.cv2_load_noise_alone = False  # ... deciding in/out as LLaMA-MoE's code does (see smooth_load)

    def capacity(self, num_tokens: int) -> int | None:
        """Assignments each expert may take: ceil(CF * T * k / E); None when dropless."""
        if self.capacity_factor is None:
            return None
        return math.ceil(self.capacity_factor * num_tokens * self.router.top_k / self.router.num_experts)

    def forward(self, x_BSD: torch.Tensor) -> MoEOutput:
        x_TD = x_BSD.reshape(-1, x_BSD.shape[-1])
        routing = self.router(x_TD)
        E = self.router.num_experts
        parallel = self.experts.parallel
        zero = routing.logits_TE.new_zeros(())
        local_counts_E = expert_counts(routing.indices_TK, E)  # counted once: dispatch, losses and metrics share it
        if parallel is None:
            capacity = self.capacity(x_TD.shape[0])
            rank_TK = capacity_ranks(routing.indices_TK, E, local_counts_E) if capacity is not None else None
            y_TD = self.experts(x_TD, routing.indices_TK, routing.weights_TK, capacity, rank_TK, counts_E=local_counts_E)
            dropped = zero.long() if rank_TK is None else (rank_TK >= capacity).sum()
            counts_E, group_sum, tokens = local_counts_E, None, None
        else:  # the balance losses see the whole group's tokens, as one process holding them would
            out = self.experts(x_TD, routing.indices_TK, routing.weights_TK, capacity_factor=self.capacity_factor)
            y_TD, dropped, counts_E, group_sum, tokens = out.y_TD, out.dropped, out.counts_E, parallel.sum, out.tokens
        if self.output_scale != 1.0:
            y_TD = y_TD * self.output_scale
        # Inference needs no losses, and at a few tokens their small ops cost as much as the experts.
        balance, z_loss = zero, zero
        if self.training:
            if self.balance_loss == "switch":
                balance = switch_aux_loss(routing.logits_TE, routing.indices_TK, counts_E, group_sum, tokens)
            elif self.balance_loss == "cv2":
                smooth = None
                if self.cv2_smooth_load and routing.noise_std_TE is not None:
                    smooth = smooth_load(routing.clean_logits_TE, routing.logits_TE, routing.noise_std_TE, self.router.top_k,
                                         self.cv2_load_noise_alone)
                balance = cv_squared_balance_loss(routing.weights_TK, routing.indices_TK, E, counts_E, group_sum, smooth,
                                                  self.cv2_unbiased)
            z_loss = router_z_loss(routing.logits_TE)
        return MoEOutput(
            hidden=y_TD.view_as(x_BSD),
            balance_loss=balance,
            z_loss=z_loss,
            load_E=local_counts_E,
            dropped=dropped,
            entropy=router_entropy(routing.logits_TE.detach()),
            indices_TK=routing.indices_TK.detach(),
        )
