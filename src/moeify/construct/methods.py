"""Construction methods that need no calibration data: which dense FFN neurons each expert gets.

"Neuron j" is row j of gate_proj and up_proj and column j of down_proj; they always move together.
"""

from dataclasses import dataclass

import torch

from moeify.construct.seeding import PARTITION_STREAM, layer_generator
from moeify.errors import MoeifyError


@dataclass(frozen=True)
class ConstructionMethod:
    name: str
    description: str

    def expert_size(self, ffn_size: int, num_experts: int) -> int:
        raise NotImplementedError

    def default_scale(self, num_experts: int, top_k: int) -> float:
        raise NotImplementedError

    def neuron_groups(self, ffn_size: int, num_experts: int, layer: int, seed: int) -> list[torch.Tensor]:
        """Sorted neuron indices for each expert of one layer."""
        raise NotImplementedError

    def check(self, ffn_size: int, num_experts: int) -> None:
        """Raise MoeifyError if this method cannot split an FFN of ffn_size into num_experts."""


class Upcycle(ConstructionMethod):
    def expert_size(self, ffn_size: int, num_experts: int) -> int:
        return ffn_size

    def default_scale(self, num_experts: int, top_k: int) -> float:
        # Mixing weights of the k chosen experts sum to 1 and every expert is the dense FFN.
        return 1.0

    def neuron_groups(self, ffn_size: int, num_experts: int, layer: int, seed: int) -> list[torch.Tensor]:
        return [torch.arange(ffn_size) for _ in range(num_experts)]


class RandomSplit(ConstructionMethod):
    def check(self, ffn_size: int, num_experts: int) -> None:
        if num_experts > ffn_size:
            raise MoeifyError(
                f"--experts {num_experts} is larger than the FFN size {ffn_size}; use at most {ffn_size} experts"
            )
        if ffn_size % num_experts:
            divisors = [e for e in range(2, min(ffn_size, 64) + 1) if ffn_size % e == 0]
            raise MoeifyError(
                f"FFN size {ffn_size} is not divisible by --experts {num_experts}; "
                f"choose one of {divisors} (or use --method upcycle)"
            )

    def expert_size(self, ffn_size: int, num_experts: int) -> int:
        return ffn_size // num_experts

    def default_scale(self, num_experts: int, top_k: int) -> float:
        # Each token sees about k/E of the FFN's neurons; LLaMA-MoE rescales the output by E/k.
        return num_experts / top_k

    def neuron_groups(self, ffn_size: int, num_experts: int, layer: int, seed: int) -> list[torch.Tensor]:
        self.check(ffn_size, num_experts)
        permutation = torch.randperm(ffn_size, generator=layer_generator(seed, layer, PARTITION_STREAM))
        return [group.sort().values for group in permutation.view(num_experts, -1)]


METHODS: dict[str, ConstructionMethod] = {
    method.name: method
    for method in [
        Upcycle("upcycle", "copy the whole FFN into every expert (Llama 3 Meets MoE)"),
        RandomSplit("random-split", "seeded equal partition of the FFN neurons (LLaMA-MoE Independent-Random)"),
    ]
}


def get_method(name: str) -> ConstructionMethod:
    if name not in METHODS:
        raise MoeifyError(f"unknown method {name!r}; choose one of: {', '.join(METHODS)}")
    return METHODS[name]
