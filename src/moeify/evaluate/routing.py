"""Routing analysis: which experts each domain uses, layer by layer (LLaMA-MoE's specialisation study)."""

import torch

from moeify.modeling.hf import MoEFeedForward


class RoutingStats:
    """Accumulates, per layer, the assignments each expert receives, how often pairs of experts are
    chosen together, the router entropy, and every token's top expert (to compare checkpoints)."""

    def __init__(self, blocks: list[MoEFeedForward]):
        self.blocks = blocks
        layers, experts = len(blocks), blocks[0].block.router.num_experts
        self.assignments_LE = torch.zeros(layers, experts, dtype=torch.float64)
        self.pairs_LEE = torch.zeros(layers, experts, experts, dtype=torch.float64)
        self.entropy_sum_L = torch.zeros(layers, dtype=torch.float64)
        self.top_expert: list[list[torch.Tensor]] = [[] for _ in blocks]
        self.tokens = 0

    def collect(self) -> None:
        """Read the routing of the forward pass that just ran."""
        for layer, block in enumerate(self.blocks):
            indices_TK = block.last.indices_TK.cpu()
            chosen_TE = torch.zeros(indices_TK.shape[0], self.assignments_LE.shape[1], dtype=torch.float64)
            chosen_TE.scatter_(1, indices_TK, 1.0)
            self.assignments_LE[layer] += chosen_TE.sum(0)
            self.pairs_LEE[layer] += chosen_TE.T @ chosen_TE
            self.entropy_sum_L[layer] += block.last.entropy.item() * indices_TK.shape[0]
            self.top_expert[layer].append(indices_TK[:, 0])
        self.tokens += self.blocks[0].last.indices_TK.shape[0]

    def summary(self) -> dict:
        """share[l][e]: fraction of layer l's assignments that went to expert e (rows sum to 1);
        co_selection[l][i][j]: fraction of tokens that chose both i and j (diagonal: chose i)."""
        return {
            "tokens": self.tokens,
            "share": (self.assignments_LE / self.assignments_LE.sum(1, keepdim=True)).tolist(),
            "co_selection": (self.pairs_LEE / max(1, self.tokens)).tolist(),
            "router_entropy": (self.entropy_sum_L / max(1, self.tokens)).tolist(),
        }

    def top_experts(self) -> list[torch.Tensor]:
        return [torch.cat(chunks) if chunks else torch.empty(0, dtype=torch.long) for chunks in self.top_expert]


def top_expert_change(first: list[torch.Tensor], second: list[torch.Tensor]) -> list[float]:
    """Per layer, the fraction of tokens whose top expert differs between two checkpoints."""
    return [(a != b).double().mean().item() for a, b in zip(first, second, strict=True)]
