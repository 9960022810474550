"""Top-k router. Default Mixtral semantics: top-k of the logits, then softmax over the k selected
logits (identical to softmax over all experts followed by renormalising the k kept probabilities).

Training options:
- noisy gating (Shazeer et al. 2017, LLaMA-MoE): logits + N(0,1) * (softplus(x W_noise) + 0.01),
  W_noise zero-initialised, applied only in training mode;
- aux-loss-free balancing (DeepSeek-V3): a per-expert bias added to the scores for *selection only*;
  the mixing weights use the unbiased logits. The bias is a buffer nudged by the training loop.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

NOISE_FLOOR = 0.01


@dataclass
class Routing:
    indices_TK: torch.Tensor  # chosen experts per token
    weights_TK: torch.Tensor  # their mixing weights (fp32), rows sum to 1
    logits_TE: torch.Tensor  # router logits (fp32, noisy in training when enabled)


class TopKRouter(nn.Module):
    def __init__(self, hidden_size: int, num_experts: int, top_k: int, noisy: bool = False):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, {num_experts}], got {top_k}")
        self.num_experts = num_experts
        self.top_k = top_k
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        self.noise_weight = nn.Parameter(torch.zeros(num_experts, hidden_size)) if noisy else None
        self.register_buffer("selection_bias", torch.zeros(num_experts))

    def forward(self, x_TD: torch.Tensor) -> Routing:
        logits_TE = F.linear(x_TD, self.weight).float()
        if self.noise_weight is not None and self.training:
            noise_std_TE = F.softplus(F.linear(x_TD, self.noise_weight).float()) + NOISE_FLOOR
            logits_TE = logits_TE + torch.randn_like(logits_TE) * noise_std_TE
        indices_TK = (logits_TE + self.selection_bias).topk(self.top_k, dim=-1).indices
        return Routing(indices_TK, logits_TE.gather(1, indices_TK).softmax(dim=-1), logits_TE)
