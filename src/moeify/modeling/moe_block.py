"""The MoE feed-forward block: route each token to k experts and mix their outputs."""

import torch
from torch import nn

from moeify.modeling.experts import Dispatch, Experts
from moeify.modeling.losses import switch_aux_loss
from moeify.modeling.router import TopKRouter


class MoEBlock(nn.Module):
    def __init__(self, hidden_size: int, expert_size: int, num_experts: int, top_k: int, dispatch: Dispatch = "auto"):
        super().__init__()
        self.router = TopKRouter(hidden_size, num_experts, top_k)
        self.experts = Experts(num_experts, hidden_size, expert_size, dispatch)

    def forward(self, x_BSD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the block output (same shape as the input) and the Switch auxiliary loss."""
        x_TD = x_BSD.reshape(-1, x_BSD.shape[-1])
        routing = self.router(x_TD)
        y_TD = self.experts(x_TD, routing.indices_TK, routing.weights_TK)
        return y_TD.view_as(x_BSD), switch_aux_loss(routing.logits_TE, routing.indices_TK)
