"""Routed SwiGLU experts stored as fused tensors, with several dispatch paths behind one call.

Weights follow the nn.Linear convention of Hugging Face's fused MoE experts:
gate_up_proj [E, 2F, D] (gate rows first, then up rows) and down_proj [E, D, F].
"""

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from moeify.modeling.expert_loop import ExpertLoop
from moeify.modeling.grouped_mm import grouped_mm, grouped_mm_supported

Dispatch = Literal["auto", "grouped_mm", "loop", "reference"]


class Experts(nn.Module):
    def __init__(self, num_experts: int, hidden_size: int, expert_size: int, dispatch: Dispatch = "auto"):
        super().__init__()
        self.num_experts = num_experts
        self.hidden_size = hidden_size
        self.expert_size = expert_size
        self.dispatch = dispatch
        self.last_dispatch: str | None = None  # the path the last forward took ("auto" resolved)
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * expert_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, expert_size))

    def forward(
        self, x_TD: torch.Tensor, indices_TK: torch.Tensor, weights_TK: torch.Tensor, keep_TK: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Sum over the k chosen experts of weight * expert(x), for each token.

        keep_TK (optional, bool): assignments to compute; the others are dropped (contribute zero).
        """
        dispatch = self.dispatch
        if dispatch == "auto":
            usable = grouped_mm_supported(x_TD, self.gate_up_proj, self.down_proj)
            dispatch = "grouped_mm" if usable else "loop"
        self.last_dispatch = dispatch
        if dispatch == "reference":
            if keep_TK is not None:
                weights_TK = weights_TK * keep_TK
            return self.forward_reference(x_TD, indices_TK, weights_TK)
        return self._forward_sorted(x_TD, indices_TK, weights_TK, keep_TK, use_grouped_mm=dispatch == "grouped_mm")

    def _forward_sorted(self, x_TD, indices_TK, weights_TK, keep_TK, use_grouped_mm: bool) -> torch.Tensor:
        # Every kept (token, expert) assignment is computed, grouped by expert.
        T, K = indices_TK.shape
        flat_expert_A = indices_TK.reshape(-1)  # A = T*K assignments
        order_A = flat_expert_A.argsort(stable=True)
        if keep_TK is not None:
            order_A = order_A[keep_TK.reshape(-1)[order_A]]
        token_A = order_A // K
        # index_select, not x[token_A]: its backward is index_add_, far cheaper than index_put_ on CPU.
        x_AD = x_TD.index_select(0, token_A)
        weight_A1 = weights_TK.reshape(-1)[order_A, None].to(x_TD.dtype)
        counts_E = torch.bincount(flat_expert_A[order_A], minlength=self.num_experts)
        if use_grouped_mm:
            offs_E = counts_E.cumsum(0).to(torch.int32)
            h_AF2 = grouped_mm(x_AD, self.gate_up_proj.transpose(-2, -1), offs_E)
            gate_AF, up_AF = h_AF2.chunk(2, dim=-1)
            # The mixing weight scales the activation before the down projection: same result,
            # on A x F elements instead of A x D.
            y_AD = grouped_mm(F.silu(gate_AF) * up_AF * weight_A1, self.down_proj.transpose(-2, -1), offs_E)
        else:
            y_AD = self._loop_over_experts(x_AD, counts_E.tolist()) * weight_A1
        return torch.zeros_like(x_TD).index_add_(0, token_A, y_AD)

    def _loop_over_experts(self, x_AD: torch.Tensor, counts: list[int]) -> torch.Tensor:
        return ExpertLoop.apply(x_AD, self.gate_up_proj, self.down_proj, counts)

    def forward_reference(self, x_TD: torch.Tensor, indices_TK: torch.Tensor, weights_TK: torch.Tensor) -> torch.Tensor:
        """Every expert on every token, combined by a dense [T, E] weight matrix. Slow; for tests."""
        combine_TE = torch.zeros(x_TD.shape[0], self.num_experts, dtype=weights_TK.dtype, device=x_TD.device)
        combine_TE = combine_TE.scatter_add(1, indices_TK, weights_TK)
        out_TD = torch.zeros_like(x_TD)
        for e in range(self.num_experts):
            gate_TF, up_TF = F.linear(x_TD, self.gate_up_proj[e]).chunk(2, dim=-1)
            y_TD = F.linear(F.silu(gate_TF) * up_TF, self.down_proj[e])
            out_TD = out_TD + combine_TE[:, e, None].to(x_TD.dtype) * y_TD
        return out_TD
