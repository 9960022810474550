"""The canonical tensors of one MoE layer.

Construction makes them (construct/plan.py), every output format maps them to its own keys and
back (checkpoint/formats/), and moeify's MoE module holds them under the names below (its state
dict, relative to `model.layers.L.mlp.`), which online upcycling fills shard by shard.
"""

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

ROUTER = "block.router.weight"  # [E, D]; the first layer of an MLP gate
ROUTER_MLP_OUT = "block.router.mlp_out"  # [E, E], MLP gate only
SELECTION_BIAS = "block.router.selection_bias"  # [E] fp32 buffer (aux-loss-free balancing)
NOISE_WEIGHT = "block.router.noise_weight"  # [E, D], noisy gate only; training-only, never on disk
GATE_UP = "block.experts.gate_up_proj"  # [E, 2S, D]: gate rows, then up rows
DOWN = "block.experts.down_proj"  # [E, D, S]
SHARED = ("shared_expert.gate_proj.weight", "shared_expert.up_proj.weight", "shared_expert.down_proj.weight")
SHARED_GATE = "shared_expert_gate.weight"  # [1, D]: the shared expert is scaled by sigmoid(x w)


@dataclass(frozen=True)
class FFNWeights:
    """One SwiGLU feed-forward: gate [S, D], up [S, D], down [D, S]."""

    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor

    @property
    def size(self) -> int:
        return self.gate.shape[0]


class LazyExperts(Sequence):
    """Experts made on demand, one at a time: a rank computes only the experts it holds."""

    def __init__(self, count: int, make: Callable[[int], FFNWeights]):
        self._count, self._make = count, make

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[FFNWeights]:
        # Not Sequence's default, which stops quietly at the first IndexError, one raised by a bug in `make` too.
        return (self._make(expert) for expert in range(self._count))

    def __getitem__(self, expert):
        if isinstance(expert, slice):
            return [self._make(e) for e in range(*expert.indices(self._count))]
        if not 0 <= expert < self._count:
            raise IndexError(expert)
        return self._make(expert)


@dataclass
class MoELayer:
    router: torch.Tensor
    experts: Sequence[FFNWeights]
    router_mlp_out: torch.Tensor | None = None
    selection_bias: torch.Tensor | None = None
    shared: FFNWeights | None = None
    shared_gate: torch.Tensor | None = None

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    def module_names(self) -> list[str]:
        """Canonical names of the tensors this layer holds."""
        names = [ROUTER, GATE_UP, DOWN]
        names += [ROUTER_MLP_OUT] if self.router_mlp_out is not None else []
        names += [SELECTION_BIAS] if self.selection_bias is not None else []
        names += list(SHARED) if self.shared is not None else []
        names += [SHARED_GATE] if self.shared_gate is not None else []
        return names

    def fused_experts(self, start: int = 0, stop: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(gate_up [2S, D], down [D, S]) of experts start:stop, each expert made once."""
        for expert in self.experts[start:stop]:
            yield torch.cat([expert.gate, expert.up]), expert.down

    def module_tensor(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Rows start:stop of the module tensor `name`; for the fused experts only those experts are made."""
        if name in (GATE_UP, DOWN):
            which = 0 if name == GATE_UP else 1
            return torch.stack([pair[which] for pair in self.fused_experts(start, stop)])
        if name == NOISE_WEIGHT:
            return torch.zeros_like(self.router)[start:stop]
        tensors = {ROUTER: self.router, ROUTER_MLP_OUT: self.router_mlp_out, SELECTION_BIAS: self.selection_bias,
                   SHARED_GATE: self.shared_gate}
        if self.shared is not None:
            tensors.update(zip(SHARED, (self.shared.gate, self.shared.up, self.shared.down)))
        tensor = tensors.get(name)
        assert tensor is not None, f"this MoE layer has no {name}"
        return tensor[start:stop]

    @classmethod
    def from_module_state(cls, state: dict[str, torch.Tensor]) -> "MoELayer":
        """From moeify's module state (canonical names): each expert a view of the fused tensors."""
        gate_up, down = state[GATE_UP], state[DOWN]
        size = gate_up.shape[1] // 2
        experts = [FFNWeights(gate_up[e, :size], gate_up[e, size:], down[e]) for e in range(gate_up.shape[0])]
        shared = FFNWeights(*(state[name] for name in SHARED)) if SHARED[0] in state else None
        return cls(state[ROUTER], experts, state.get(ROUTER_MLP_OUT), state.get(SELECTION_BIAS), shared, state.get(SHARED_GATE))
