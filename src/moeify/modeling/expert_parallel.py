"""Expert parallelism: each rank of an expert-parallel group holds E/EP experts, and tokens travel to them.

One MoE layer under EP (torchtitan / Megatron-Core's token dispatch, on PyTorch's collectives):
1. every rank routes its own tokens over all E experts (the router is data-parallel);
2. the group all-gathers each rank's assignment counts per (choice, expert): from these every rank
   knows the global load, the capacity drops and the split sizes, the one host transfer of the layer;
3. `all_to_all_single` (autograd-aware) sends each kept assignment's activation to the rank holding
   its expert; that rank runs its local experts as one grouped GEMM and sends the outputs back;
4. the source rank mixes the returned outputs with the routing weights.

Capacity is global per expert: C = ceil(CF * T_group * k / E) over the group's T_group tokens, in
GShard's priority order (every first choice before any second choice; within a choice, rank by
rank, then token by token). Taken over the same tokens, that is the order one process uses, so an
EP group drops exactly the assignments one process with the group's micro-batch would.
"""

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

from moeify.modeling.expert_mlp import expert_mlp
from moeify.modeling.losses import arrival_order, expert_counts


@dataclass(frozen=True)
class ExpertParallel:
    group: dist.ProcessGroup
    size: int  # ranks in the expert-parallel group
    rank: int  # this rank's index in it

    def local_experts(self, num_experts: int) -> range:
        per_rank = num_experts // self.size
        return range(self.rank * per_rank, (self.rank + 1) * per_rank)

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over the group, differentiable (the backward sums the gradients over the group)."""
        return funcol.all_reduce(tensor, "sum", self.group)

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """[size, *tensor.shape], not differentiable (for counts)."""
        parts = [torch.empty_like(tensor) for _ in range(self.size)]
        dist.all_gather(parts, tensor.contiguous(), group=self.group)
        return torch.stack(parts)


@dataclass
class Dispatched:
    y_TD: torch.Tensor  # the mixed expert outputs of this rank's tokens
    counts_E: torch.Tensor  # the group's assignments per expert (before drops)
    dropped: torch.Tensor  # this rank's assignments dropped by the capacity limit
    tokens: torch.Tensor  # the group's tokens (0-d)


def kept_counts(counts_RKE: torch.Tensor, capacity: torch.Tensor | int | None) -> torch.Tensor:
    """Assignments of each rank kept at each expert [R, K, E], in GShard priority (choice, rank, token).

    Rank r's assignments of choice c to expert e arrive together, after everything of earlier
    choices and of earlier ranks in choice c; the capacity cuts that block where the running count
    reaches it."""
    if capacity is None:
        return counts_RKE
    R, K, E = counts_RKE.shape
    choice_major_KRE = counts_RKE.transpose(0, 1).reshape(K * R, E)
    before_KRE = (choice_major_KRE.cumsum(0) - choice_major_KRE).view(K, R, E).transpose(0, 1)
    return (capacity - before_KRE).clamp(min=0).minimum(counts_RKE)


def expert_parallel_forward(x_TD: torch.Tensor, indices_TK: torch.Tensor, weights_TK: torch.Tensor, gate_up: torch.Tensor,
                            down: torch.Tensor, num_experts: int, capacity_factor: float | None, parallel: ExpertParallel,
                            use_grouped_mm: bool) -> Dispatched:
    """x_TD and this rank's expert weights (gate_up, down) in the compute dtype."""
    T, K = indices_TK.shape
    E = num_experts
    local = parallel.local_experts(E)
    L = len(local)
    # Assignments in choice-major order a = c*T + t (the priority order within this rank).
    expert_A = indices_TK.t().reshape(-1)
    choice_A = torch.arange(K, device=x_TD.device).repeat_interleave(T)
    block_A = choice_A * E + expert_A  # the (choice, expert) block of each assignment
    counts_KE = expert_counts(block_A, K * E).view(K, E)
    counts_RKE = parallel.all_gather(counts_KE)
    tokens = counts_RKE.sum() // K
    capacity = None
    if capacity_factor is not None:  # on the device, in float64 like math.ceil's
        capacity = torch.ceil(capacity_factor * tokens.double() * K / E).long()
    kept_RKE = kept_counts(counts_RKE, capacity)

    # An assignment is kept if its position in its (choice, expert) block, in token order, is within
    # what the block keeps.
    keep_A = arrival_order(block_A, K * E) < kept_RKE[parallel.rank].reshape(-1)[block_A]

    # Send order: by destination expert (so by destination rank), dropped assignments last and unsent.
    send_order = torch.where(keep_A, expert_A, E).argsort(stable=True)
    kept_RE = kept_RKE.sum(1)
    kept_host = kept_RE.tolist()  # the layer's one host transfer: every split size
    sent = sum(kept_host[parallel.rank])
    send_A = send_order[:sent]
    input_splits = [sum(kept_host[parallel.rank][r * L:(r + 1) * L]) for r in range(parallel.size)]
    received_RL = [row[local.start:local.stop] for row in kept_host]
    output_splits = [sum(row) for row in received_RL]

    x_send = x_TD.index_select(0, send_A % T)
    x_recv = funcol.all_to_all_single_autograd(x_send, output_splits, input_splits, parallel.group)
    # Received rows come grouped by source rank, then by local expert: regroup them by local expert.
    flat_counts = torch.tensor([c for row in received_RL for c in row], device=x_TD.device)
    expert_of_row = torch.arange(L, device=x_TD.device).repeat(parallel.size).repeat_interleave(flat_counts, output_size=sum(output_splits))
    by_expert = expert_of_row.argsort(stable=True)
    local_counts = torch.tensor([sum(row[e] for row in received_RL) for e in range(L)], device=x_TD.device)
    y_sorted = expert_mlp(x_recv.index_select(0, by_expert), gate_up, down, local_counts, use_grouped_mm)
    y_recv = torch.empty_like(y_sorted).index_copy(0, by_expert, y_sorted)
    y_back = funcol.all_to_all_single_autograd(y_recv, input_splits, output_splits, parallel.group)

    weight_A1 = weights_TK.t().reshape(-1).index_select(0, send_A)[:, None].to(y_back.dtype)
    y_TD = torch.zeros_like(x_TD).index_add_(0, send_A % T, y_back * weight_A1)
    dropped = counts_KE.sum() - kept_RKE[parallel.rank].sum()
    return Dispatched(y_TD, counts_RKE.sum((0, 1)), dropped, tokens)
