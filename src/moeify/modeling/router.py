"""Top-k router. Mixtral semantics: top-k of the logits, then softmax over the k selected logits
(identical to softmax over all experts followed by renormalising the k kept probabilities)."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Routing:
    indices_TK: torch.Tensor  # chosen experts per token
    weights_TK: torch.Tensor  # their mixing weights (fp32), rows sum to 1
    logits_TE: torch.Tensor  # raw router logits (fp32), for losses and analysis


class TopKRouter(nn.Module):
    def __init__(self, hidden_size: int, num_experts: int, top_k: int):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, {num_experts}], got {top_k}")
        self.num_experts = num_experts
        self.top_k = top_k
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))

    def forward(self, x_TD: torch.Tensor) -> Routing:
        logits_TE = F.linear(x_TD, self.weight).float()
        top_logits_TK, indices_TK = logits_TE.topk(self.top_k, dim=-1)
        return Routing(indices_TK, top_logits_TK.softmax(dim=-1), logits_TE)
