"""Routed SwiGLU experts stored as fused tensors, with several dispatch paths behind one call.

Weights follow the nn.Linear convention of Hugging Face's fused MoE experts:
gate_up_proj [E, 2F, D] (gate rows first, then up rows) and down_proj [E, D, F].

Precision: the expert GEMMs run in the compute dtype, the autocast dtype when autocast is on
(bf16 on GPU) and the input's dtype otherwise; weights and activations are cast to it explicitly,
since grouped_mm has no autocast rule. Master weights stay in their own dtype (fp32).

Host syncs: the grouped_mm path and the capacity path take no data-dependent size to the host
(counts stay on the device; capacity slots have a static shape), so they compile with fullgraph
and never stall the GPU. The loop path needs each expert's row count on the host: it is chosen
by `auto` only where grouped_mm cannot run.
"""

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from moeify.modeling.expert_mlp import expert_mlp
from moeify.modeling.expert_parallel import Dispatched, ExpertParallel, expert_parallel_forward
from moeify.modeling.grouped_mm import grouped_mm, grouped_mm_supported
from moeify.modeling.losses import expert_counts

Dispatch = Literal["auto", "grouped_mm", "loop", "reference"]


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


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
        self.parallel: ExpertParallel | None = None  # set by train/parallelize.py: this rank holds only its experts

    def local_weights(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's experts' (gate_up, down) in `dtype`: under expert parallelism the parameters are
        DTensors sharded over the experts; a rank computes with its local experts only."""
        gate_up, down = self.gate_up_proj, self.down_proj
        if isinstance(gate_up, DTensor):
            gate_up, down = gate_up.to_local(), down.to_local()
        return gate_up.to(dtype), down.to(dtype)

    def resolve_dispatch(self, x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> str:
        dispatch = self.dispatch
        if dispatch == "auto":
            dispatch = "grouped_mm" if grouped_mm_supported(x, gate_up, down) else "loop"
        self.last_dispatch = dispatch
        return dispatch

    def forward(self, x_TD: torch.Tensor, indices_TK: torch.Tensor, weights_TK: torch.Tensor, capacity: int | None = None,
                rank_TK: torch.Tensor | None = None, capacity_factor: float | None = None,
                counts_E: torch.Tensor | None = None) -> torch.Tensor | Dispatched:
        """Sum over the k chosen experts of weight * expert(x), for each token.

        With `capacity` (and rank_TK, each assignment's arrival order at its expert), an expert
        computes at most `capacity` assignments; the later ones are dropped (contribute zero).
        Under expert parallelism (`self.parallel` set) the capacity comes from `capacity_factor` over
        the group's tokens, and the result is a Dispatched (outputs and the group's counts). Either
        way the call goes through __call__, where FSDP2 gathers the parameters. `counts_E`: the
        assignments per expert, when the caller has counted them."""
        dtype = compute_dtype(x_TD)
        x, (gate_up, down) = x_TD.to(dtype), self.local_weights(dtype)
        dispatch = self.resolve_dispatch(x, gate_up, down)
        with torch.autocast(x_TD.device.type, enabled=False):
            if self.parallel is not None:  # tokens go to the ranks holding their experts (modeling/expert_parallel.py)
                out = expert_parallel_forward(x, indices_TK, weights_TK, gate_up, down, self.num_experts, capacity_factor,
                                              self.parallel, dispatch == "grouped_mm")
                out.y_TD = out.y_TD.to(x_TD.dtype)
                return out
            if dispatch == "reference":
                if capacity is not None:
                    weights_TK = weights_TK * (rank_TK < capacity)
                y = self.forward_reference(x, indices_TK, weights_TK, gate_up, down)
            elif capacity is not None:
                y = self._forward_capacity(x, indices_TK, weights_TK, rank_TK, capacity, gate_up, down, dispatch == "grouped_mm")
            else:
                if counts_E is None:
                    counts_E = expert_counts(indices_TK, self.num_experts)
                y = self._forward_sorted(x, indices_TK, weights_TK, counts_E, gate_up, down, dispatch == "grouped_mm")
        return y.to(x_TD.dtype)

    def _forward_sorted(self, x_TD, indices_TK, weights_TK, counts_E, gate_up, down, use_grouped_mm: bool) -> torch.Tensor:
        # Dropless: every (token, expert) assignment is computed, grouped by expert.
        K = indices_TK.shape[1]
        flat_expert_A = indices_TK.reshape(-1)  # A = T*K assignments
        order_A = flat_expert_A.argsort(stable=True)
        token_A = order_A // K
        # index_select, not x[token_A]: its backward is index_add_, far cheaper than index_put_ on CPU.
        x_AD = x_TD.index_select(0, token_A)
        weight_A1 = weights_TK.reshape(-1)[order_A, None].to(x_TD.dtype)
        y_AD = expert_mlp(x_AD, gate_up, down, counts_E, use_grouped_mm, weight_A1)
        return torch.zeros_like(x_TD).index_add_(0, token_A, y_AD)

    def _forward_capacity(self, x_TD, indices_TK, weights_TK, rank_TK, capacity: int, gate_up, down,
                          use_grouped_mm: bool) -> torch.Tensor:
        """Static shapes (GShard): assignment a goes to slot expert * C + rank; dropped ones to one
        spare slot E * C whose output is discarded. Every expert computes exactly C rows."""
        T, K = indices_TK.shape
        E, C, D = self.num_experts, capacity, x_TD.shape[1]
        keep_A = (rank_TK < C).reshape(-1)
        slot_A = torch.where(keep_A, indices_TK.reshape(-1) * C + rank_TK.reshape(-1), E * C)
        token_A = torch.arange(T * K, device=x_TD.device) // K
        x_SD = x_TD.new_zeros(E * C + 1, D).index_copy(0, slot_A, x_TD.index_select(0, token_A))[: E * C]
        weight_S1 = weights_TK.new_zeros(E * C + 1).index_copy(0, slot_A, weights_TK.reshape(-1) * keep_A)[: E * C, None]
        if use_grouped_mm:
            offs_E = (torch.arange(1, E + 1, device=x_TD.device) * C).to(torch.int32)
            gate_SF, up_SF = grouped_mm(x_SD, gate_up.transpose(-2, -1), offs_E).chunk(2, dim=-1)
            y_SD = grouped_mm(F.silu(gate_SF) * up_SF * weight_S1.to(x_TD.dtype), down.transpose(-2, -1), offs_E)
        else:  # equal groups: one batched matmul per projection
            gate_ECF, up_ECF = torch.bmm(x_SD.view(E, C, D), gate_up.transpose(1, 2)).chunk(2, dim=-1)
            act_ECF = F.silu(gate_ECF) * up_ECF * weight_S1.view(E, C, 1).to(x_TD.dtype)
            y_SD = torch.bmm(act_ECF, down.transpose(1, 2)).reshape(E * C, D)
        y_AD = torch.cat([y_SD, y_SD.new_zeros(1, D)]).index_select(0, slot_A)  # the spare slot adds zero
        return torch.zeros_like(x_TD).index_add_(0, token_A, y_AD)

    def forward_reference(self, x_TD: torch.Tensor, indices_TK: torch.Tensor, weights_TK: torch.Tensor,
                          gate_up: torch.Tensor | None = None, down: torch.Tensor | None = None) -> torch.Tensor:
        """Every expert on every token, combined by a dense [T, E] weight matrix. Slow; for tests."""
        gate_up = self.gate_up_proj if gate_up is None else gate_up
        down = self.down_proj if down is None else down
        combine_TE = torch.zeros(x_TD.shape[0], self.num_experts, dtype=weights_TK.dtype, device=x_TD.device)
        combine_TE = combine_TE.scatter_add(1, indices_TK, weights_TK)
        out_TD = torch.zeros_like(x_TD)
        for e in range(self.num_experts):
            gate_TF, up_TF = F.linear(x_TD, gate_up[e]).chunk(2, dim=-1)
            y_TD = F.linear(F.silu(gate_TF) * up_TF, down[e])
            out_TD = out_TD + combine_TE[:, e, None].to(x_TD.dtype) * y_TD
        return out_TD
