"""Top-k router with the scoring orders of the published recipes.

- "topk-softmax" (Mixtral, LLaMA-MoE, default): top-k of the logits, then softmax over the k
  selected logits; identical to softmax over all experts followed by renormalising the k kept.
- "softmax-topk" (Qwen-MoE, granular upcycling): softmax over all experts, keep the k largest
  probabilities, renormalised to sum 1 only when `renormalize` is set.
- "sigmoid-topk" (DeepSeek-V3): independent sigmoid scores, keep the k largest, optionally
  renormalised.

Gate network: a linear map, or LLaMA-MoE's MLP gate Linear(D, E) - tanh - Linear(E, E).

Training options:
- noisy gating (Shazeer et al. 2017, LLaMA-MoE): logits + N(0,1) * (softplus(x W_noise) + 0.01),
  W_noise zero-initialised, applied only in training mode;
- aux-loss-free balancing (DeepSeek-V3): a per-expert bias added to the scores for *selection only*;
  the mixing weights use the unbiased scores. The bias is a buffer nudged by the training loop.
"""

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

NOISE_FLOOR = 0.01
ROUTINGS = ("topk-softmax", "softmax-topk", "sigmoid-topk")
GATES = ("linear", "mlp")
RoutingOrder = Literal["topk-softmax", "softmax-topk", "sigmoid-topk"]


@dataclass(frozen=True)
class RouterSpec:
    routing: RoutingOrder = "topk-softmax"
    renormalize: bool = True  # softmax-topk / sigmoid-topk: rescale the k kept scores to sum 1
    gate: Literal["linear", "mlp"] = "linear"


@dataclass
class Routing:
    indices_TK: torch.Tensor  # chosen experts per token
    weights_TK: torch.Tensor  # their mixing weights (fp32)
    logits_TE: torch.Tensor  # router logits (fp32, noisy in training when enabled)
    clean_logits_TE: torch.Tensor | None = None  # with noise: the logits before it
    noise_std_TE: torch.Tensor | None = None  # with noise: its standard deviation


class TopKRouter(nn.Module):
    def __init__(self, hidden_size: int, num_experts: int, top_k: int, noisy: bool = False, spec: RouterSpec = RouterSpec()):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, {num_experts}], got {top_k}")
        self.num_experts = num_experts
        self.top_k = top_k
        self.spec = spec
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        self.mlp_out = nn.Parameter(torch.empty(num_experts, num_experts)) if spec.gate == "mlp" else None
        self.noise_weight = nn.Parameter(torch.zeros(num_experts, hidden_size)) if noisy else None
        self.register_buffer("selection_bias", torch.zeros(num_experts))

    def gate_logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        """Router logits in fp32 whatever the compute dtype: small near-ties decide the experts."""
        with torch.autocast(x_TD.device.type, enabled=False):
            logits_TE = F.linear(x_TD.float(), self.weight.float())
            if self.mlp_out is not None:
                logits_TE = F.linear(torch.tanh(logits_TE), self.mlp_out.float())
        return logits_TE

    def forward(self, x_TD: torch.Tensor) -> Routing:
        logits_TE = clean_TE = self.gate_logits(x_TD)
        noise_std_TE = None
        if self.noise_weight is not None and self.training:
            with torch.autocast(x_TD.device.type, enabled=False):
                noise_std_TE = F.softplus(F.linear(x_TD.float(), self.noise_weight.float())) + NOISE_FLOOR
            logits_TE = clean_TE + torch.randn_like(clean_TE) * noise_std_TE
        noise = (clean_TE, noise_std_TE) if noise_std_TE is not None else (None, None)
        if self.spec.routing == "topk-softmax":
            indices_TK = (logits_TE + self.selection_bias).topk(self.top_k, dim=-1).indices
            return Routing(indices_TK, logits_TE.gather(1, indices_TK).softmax(dim=-1), logits_TE, *noise)
        scores_TE = logits_TE.softmax(dim=-1) if self.spec.routing == "softmax-topk" else logits_TE.sigmoid()
        indices_TK = (scores_TE + self.selection_bias).topk(self.top_k, dim=-1).indices
        weights_TK = scores_TE.gather(1, indices_TK)
        if self.spec.renormalize:
            weights_TK = weights_TK / (weights_TK.sum(dim=-1, keepdim=True) + 1e-20)
        return Routing(indices_TK, weights_TK, logits_TE, *noise)
