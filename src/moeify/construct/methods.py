"""Construction methods: which dense FFN neurons each expert gets, and how its copy is changed.

"Neuron j" is row j of gate_proj and up_proj and column j of down_proj; they always move together.
Methods that need neither data nor weights (the upcycling family, random splitting) compute one
layer at a time (`layer_partition`), so any rank of a distributed job can build any layer alone;
the others (clustering, co-activation, gradient importance: construct/splits.py) produce a whole
Partition, which `moeify split` saves to a file.
"""

import torch

from moeify.construct.config import ConstructionConfig
from moeify.construct.seeding import PARTITION_STREAM, expert_generator, layer_generator
from moeify.errors import MoeifyError
from moeify.modeling.router import RouterSpec

CALIBRATION_OPTIONS = frozenset({"calibration", "calibration_tokens", "calibration_seq_len"})
UPCYCLE_OPTIONS = frozenset({"weight_scaling"})


class ConstructionMethod:
    name: str = ""
    description: str = ""
    options: frozenset[str] = frozenset()  # the method's own settings it reads (given ones it does not read are refused)
    needs_calibration: bool = False
    layerwise: bool = True  # computes each layer alone, from the options only
    scale_from_options: bool = False  # the default scale of a saved partition is the method's rule, not its sizes
    router_inits: tuple[str, ...] = ("normal",)  # what --router-init may choose ("auto" picks default_router_init)

    def check(self, ffn_size: int, options: ConstructionConfig) -> None:
        """Raise MoeifyError if this method cannot make these experts from an FFN of ffn_size."""
        if options.num_experts > ffn_size:
            raise MoeifyError(f"--num-experts {options.num_experts} is larger than the FFN size {ffn_size}; use at most {ffn_size} experts")

    def shared_size(self, ffn_size: int, options: ConstructionConfig) -> int:
        return 0

    def expert_size(self, ffn_size: int, options: ConstructionConfig) -> int:
        raise NotImplementedError

    def default_scale(self, ffn_size: int, options: ConstructionConfig, top_k: int, router: RouterSpec) -> float:
        """Expert output scale: routed neurons over the neurons k experts hold (E/k for an equal split)."""
        return (ffn_size - self.shared_size(ffn_size, options)) / (top_k * self.expert_size(ffn_size, options))

    def default_router_init(self) -> str:
        return "normal"

    def layer_partition(self, ffn_size: int, options: ConstructionConfig, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(experts [E, S], shared [S0]) neuron indices of one layer, rows sorted."""
        raise NotImplementedError

    def megatron_scale(self, options: ConstructionConfig, top_k: int, router: RouterSpec) -> float | None:
        """The scale Megatron-Core's upcycling would use (None: not an upcycling method)."""
        return None

    def perturb(self, weights: tuple[torch.Tensor, ...], options: ConstructionConfig, layer: int, expert: int) -> tuple[torch.Tensor, ...]:
        """Change one expert's (gate, up, down) after copying; identity unless the method re-initialises."""
        return weights


def _divisors(n: int, limit: int = 64) -> list[int]:
    return [e for e in range(2, min(n, limit) + 1) if n % e == 0]


def check_equal_split(ffn_size: int, options: ConstructionConfig, shared_size: int) -> None:
    """The routed neurons (all but the shared block) must cut into E equal experts."""
    ConstructionMethod().check(ffn_size, options)
    if not 0 <= shared_size < ffn_size:
        raise MoeifyError(f"--shared-size must be in [0, {ffn_size}), got {shared_size}")
    routed = ffn_size - shared_size
    if routed % options.num_experts:
        raise MoeifyError(
            f"{routed} routed neurons are not divisible by --num-experts {options.num_experts}; "
            f"choose one of {_divisors(routed)} (or use --method upcycle)"
        )


def megatron_activation_scale(num_experts: int, granularity: int, top_k: int, router: RouterSpec) -> float:
    """Megatron-Core's upcycling activation scale (upcycling_utils.py): copies x G^2 / k when the
    router takes the softmax before the top-k, else G; renormalisation is not considered."""
    copies = num_experts // granularity
    return copies * granularity**2 / top_k if router.routing == "softmax-topk" else float(granularity)


class Upcycle(ConstructionMethod):
    name = "upcycle"
    description = "copy the whole FFN into every expert (Llama 3 Meets MoE)"
    options = UPCYCLE_OPTIONS

    def check(self, ffn_size: int, options: ConstructionConfig) -> None:
        pass

    def expert_size(self, ffn_size: int, options: ConstructionConfig) -> int:
        return ffn_size

    def default_scale(self, ffn_size: int, options: ConstructionConfig, top_k: int, router: RouterSpec) -> float:
        # Mixing weights of the k chosen experts sum to 1 and every expert is the dense FFN.
        return 1.0

    def megatron_scale(self, options: ConstructionConfig, top_k: int, router: RouterSpec) -> float:
        return megatron_activation_scale(options.num_experts, 1, top_k, router)

    def layer_partition(self, ffn_size: int, options: ConstructionConfig, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.arange(ffn_size).expand(options.num_experts, -1), torch.zeros(0, dtype=torch.long)


class DropUpcycle(Upcycle):
    name = "drop-upcycle"
    description = "upcycle, then re-initialise a fraction r of each expert's neurons (Drop-Upcycling)"
    options = UPCYCLE_OPTIONS | {"drop_ratio", "drop_indices", "drop_stats"}

    def check(self, ffn_size: int, options: ConstructionConfig) -> None:
        if not 0 <= options.upcycle.drop_ratio <= 1:
            raise MoeifyError(f"--drop-ratio must be in [0, 1], got {options.upcycle.drop_ratio}")

    def perturb(self, weights: tuple[torch.Tensor, ...], options: ConstructionConfig, layer: int, expert: int) -> tuple[torch.Tensor, ...]:
        gate, up, down = weights
        count = round(options.upcycle.drop_ratio * gate.shape[0])
        if count == 0:
            return weights
        generator = expert_generator(options.seed, layer, expert)
        independent = options.upcycle.drop_indices == "independent"
        shared_set = None if independent else torch.randperm(gate.shape[0], generator=generator)[:count]

        def redraw(matrix: torch.Tensor, rows: bool) -> torch.Tensor:
            # New neurons from a normal with the mean and std of the whole matrix, or of what they replace.
            dropped = torch.randperm(gate.shape[0], generator=generator)[:count] if independent else shared_set
            values = matrix.float()
            source = values if options.upcycle.drop_stats == "matrix" else (values[dropped] if rows else values[:, dropped])
            shape = (count, matrix.shape[1]) if rows else (matrix.shape[0], count)
            fresh = (torch.randn(shape, generator=generator) * source.std() + source.mean()).to(matrix.dtype)
            out = matrix.clone()
            if rows:
                out[dropped] = fresh
            else:
                out[:, dropped] = fresh
            return out

        return redraw(gate, True), redraw(up, True), redraw(down, False)


class NoiseUpcycle(Upcycle):
    name = "noise-upcycle"
    description = "upcycle, then add Gaussian noise to every copy (sigma x each matrix's std, or the authors' absolute N(0, sigma) on a fraction of neurons)"
    options = UPCYCLE_OPTIONS | {"noise_std", "noise_relative", "noise_fraction"}

    def check(self, ffn_size: int, options: ConstructionConfig) -> None:
        if self.sigma(options) < 0:
            raise MoeifyError(f"--noise-std must be >= 0, got {options.upcycle.noise_std}")

    @staticmethod
    def sigma(options: ConstructionConfig) -> float:
        """--noise-std, or its default: 0.01 of each matrix's std, or the authors' absolute 0.02."""
        upcycle = options.upcycle
        if upcycle.noise_std is not None:
            return upcycle.noise_std
        return 0.01 if upcycle.noise_relative else 0.02

    def perturb(self, weights: tuple[torch.Tensor, ...], options: ConstructionConfig, layer: int, expert: int) -> tuple[torch.Tensor, ...]:
        upcycle = options.upcycle
        sigma = self.sigma(options)
        if sigma == 0:
            return weights
        generator = expert_generator(options.seed, layer, expert)
        neurons = weights[0].shape[0]

        def noised(w: torch.Tensor, rows: bool) -> torch.Tensor:
            std = sigma * (w.float().std() if upcycle.noise_relative else 1.0)
            if upcycle.noise_fraction == 1.0:
                return (w.float() + torch.randn(w.shape, generator=generator) * std).to(w.dtype)
            chosen = torch.randperm(neurons, generator=generator)[: int(upcycle.noise_fraction * neurons)]
            out = w.float().clone()
            if rows:
                out[chosen] += torch.randn(len(chosen), w.shape[1], generator=generator) * std
            else:
                out[:, chosen] += torch.randn(w.shape[0], len(chosen), generator=generator) * std
            return out.to(w.dtype)

        gate, up, down = weights
        return noised(gate, True), noised(up, True), noised(down, False)


class GranularUpcycle(ConstructionMethod):
    name = "granular-upcycle"
    description = "copies of the FFN cut into G slices each; virtual-group router init (He et al. 2024)"
    options = UPCYCLE_OPTIONS | {"granularity"}

    def check(self, ffn_size: int, options: ConstructionConfig) -> None:
        G, E = options.upcycle.granularity, options.num_experts
        if G < 1:
            raise MoeifyError(f"--granularity must be at least 1, got {G}")
        if ffn_size % G:
            raise MoeifyError(f"FFN size {ffn_size} is not divisible by --granularity {G}; choose one of {_divisors(ffn_size)}")
        if E % G:
            raise MoeifyError(f"--num-experts {E} must be a multiple of --granularity {G} (experts = copies x G)")

    def expert_size(self, ffn_size: int, options: ConstructionConfig) -> int:
        return ffn_size // options.upcycle.granularity

    def megatron_scale(self, options: ConstructionConfig, top_k: int, router: RouterSpec) -> float:
        return megatron_activation_scale(options.num_experts, options.upcycle.granularity, top_k, router)

    def default_scale(self, ffn_size: int, options: ConstructionConfig, top_k: int, router: RouterSpec) -> float:
        # The output scale of He et al.: G for top-k-then-softmax (the k = G slices of one copy
        # each get weight 1/G), and (copies x G^2 / k) for softmax-then-top-k without renormalisation
        # (k slices, each with probability about 1/E).
        G, E = options.upcycle.granularity, options.num_experts
        if router.routing == "topk-softmax" or router.renormalize:
            return float(G)
        return E * G / top_k

    router_inits = ("normal", "virtual-group")

    def default_router_init(self) -> str:
        return "virtual-group"

    def layer_partition(self, ffn_size: int, options: ConstructionConfig, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        G = options.upcycle.granularity
        slices = torch.arange(ffn_size).view(G, ffn_size // G)
        return slices.repeat(options.num_experts // G, 1), torch.zeros(0, dtype=torch.long)


class RandomSplit(ConstructionMethod):
    name = "random-split"
    description = "seeded equal partition of the FFN neurons (LLaMA-MoE Independent-Random)"
    options = frozenset({"shared_size"})

    def shared_size(self, ffn_size: int, options: ConstructionConfig) -> int:
        return options.split.shared_size or 0

    def check(self, ffn_size: int, options: ConstructionConfig) -> None:
        check_equal_split(ffn_size, options, self.shared_size(ffn_size, options))

    def expert_size(self, ffn_size: int, options: ConstructionConfig) -> int:
        return (ffn_size - self.shared_size(ffn_size, options)) // options.num_experts

    def layer_partition(self, ffn_size: int, options: ConstructionConfig, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        self.check(ffn_size, options)
        permutation = torch.randperm(ffn_size, generator=layer_generator(options.seed, layer, PARTITION_STREAM))
        shared = self.shared_size(ffn_size, options)
        experts = permutation[shared:].view(options.num_experts, -1).sort(dim=1).values
        return experts, permutation[:shared].sort().values

