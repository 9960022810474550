"""One construction, resolved: the method, its options, and (for data-driven methods) the partition.

`build` and online upcycling both ask a plan for each layer's neuron groups, router and expert
weights, so they produce the same bytes.
"""

from dataclasses import dataclass, fields
from pathlib import Path

import torch

from moeify.checkpoint.dense import DenseCheckpoint
from moeify.construct.methods import ConstructionMethod, DropUpcycle, GranularUpcycle, MethodOptions, NoiseUpcycle, RandomSplit, Upcycle
from moeify.construct.partition import Partition, model_fingerprint
from moeify.construct.seeding import ROUTER_STREAM, layer_generator
from moeify.construct.splits import Clustering, CoActivation, GradientGreedy, SharingInner, SharingInter
from moeify.errors import MoeifyError
from moeify.modeling.router import RouterSpec

METHODS: dict[str, ConstructionMethod] = {
    method.name: method
    for method in [Upcycle(), RandomSplit(), Clustering(), CoActivation(), SharingInner(), SharingInter(), GradientGreedy(),
                   GranularUpcycle(), DropUpcycle(), NoiseUpcycle()]
}
ROUTER_INITS = ("auto", "normal", "virtual-group", "centroids")


def get_method(name: str) -> ConstructionMethod:
    if name not in METHODS:
        raise MoeifyError(f"unknown method {name!r}; choose one of: {', '.join(METHODS)}")
    return METHODS[name]


@dataclass
class ConstructionPlan:
    method: ConstructionMethod
    options: MethodOptions
    ffn_size: int
    partition: Partition | None = None

    @classmethod
    def make(cls, dense: DenseCheckpoint, options: MethodOptions, partition_file: Path | None = None,
             source: str = "MODEL", progress: bool = True) -> "ConstructionPlan":
        if partition_file is not None:
            partition = Partition.load(partition_file)
            partition.check_model(dense, source)
            recorded = {f.name: partition.options[f.name] for f in fields(MethodOptions) if f.name in partition.options}
            return cls(get_method(partition.method), MethodOptions(**recorded), dense.ffn_size, partition)
        method = get_method(options.method)
        method.check(dense.ffn_size, options)
        if method.layerwise:
            return cls(method, options, dense.ffn_size)
        if method.needs_calibration and options.calibration is None:
            raise MoeifyError(f"--method {method.name} needs calibration text: give --calibration embedded (or DOMAIN=PATH), "
                              f"or make a partition with `moeify split` and pass --partition")
        return cls(method, options, dense.ffn_size, method.make_partition(dense, options, progress))

    @classmethod
    def make_partition(cls, dense: DenseCheckpoint, options: MethodOptions, progress: bool = True) -> Partition:
        """What `moeify split` saves: the data-driven partition, or every layer of a layer-wise method."""
        plan = cls.make(dense, options, progress=progress)
        if plan.partition is not None:
            return plan.partition
        layers = [plan.method.layer_partition(dense.ffn_size, options, layer) for layer in range(dense.num_layers)]
        return Partition(plan.method.name, options.num_experts, plan.expert_size, plan.shared_size,
                         [experts.contiguous() for experts, _ in layers], [shared for _, shared in layers],
                         model_fingerprint(dense), {k: v for k, v in vars(options).items() if v is not None})

    @property
    def num_experts(self) -> int:
        return self.options.num_experts

    @property
    def expert_size(self) -> int:
        return self.partition.expert_size if self.partition else self.method.expert_size(self.ffn_size, self.options)

    @property
    def shared_size(self) -> int:
        return self.partition.shared_size if self.partition else self.method.shared_size(self.ffn_size, self.options)

    def scale(self, top_k: int, router: RouterSpec, given: float | None) -> float:
        if given is not None:
            return given
        if self.partition is not None and not self.method.layerwise:
            return (self.ffn_size - self.shared_size) / (top_k * self.expert_size)
        return self.method.default_scale(self.ffn_size, self.options, top_k, router)

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(experts [E, S], shared [S0]) neuron indices of one layer."""
        if self.partition is not None:
            return self.partition.experts[layer], self.partition.shared[layer]
        return self.method.layer_partition(self.ffn_size, self.options, layer)

    def router_init(self, requested: str) -> str:
        if requested not in ROUTER_INITS:
            raise MoeifyError(f"--router-init must be one of {', '.join(ROUTER_INITS)}, got {requested!r}")
        init = self.method.default_router_init() if requested == "auto" else requested
        if init == "centroids" and (self.partition is None or self.partition.centroids is None):
            raise MoeifyError("--router-init centroids needs a clustering partition (--method clustering)")
        if init == "virtual-group" and not isinstance(self.method, GranularUpcycle):
            raise MoeifyError("--router-init virtual-group is for --method granular-upcycle")
        return init

    def router_weight(self, layer: int, hidden_size: int, std: float, init: str, dtype: torch.dtype) -> torch.Tensor:
        """Router weight [E, D]: N(0, std) (zeros when std is 0); virtual-group repeats E/G rows G
        times, so the G slices of one FFN copy are always chosen together; centroids uses the
        clustering centroids (mean normalised rows of each expert)."""
        E = self.num_experts
        if init == "centroids":
            return self.partition.centroids[layer].to(dtype)
        rows = E // self.options.granularity if init == "virtual-group" else E
        if std == 0:
            return torch.zeros(E, hidden_size, dtype=dtype)
        weight = torch.randn(rows, hidden_size, generator=layer_generator(self.options.seed, layer, ROUTER_STREAM)) * std
        if init == "virtual-group":
            weight = weight.repeat_interleave(self.options.granularity, dim=0)
        return weight.to(dtype)

    def expert_weights(self, ffn: tuple[torch.Tensor, torch.Tensor, torch.Tensor], neurons: torch.Tensor, scale: float,
                       layer: int, expert: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        gate, up, down = self.method.perturb(ffn, self.options, layer, expert)
        return expert_weights(gate, up, down, neurons, scale)


def expert_weights(gate_FD: torch.Tensor, up_FD: torch.Tensor, down_DF: torch.Tensor, neurons: torch.Tensor, scale: float
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One expert's (gate, up, down) from the dense FFN; the output scale is folded into down.

    An expert that holds every neuron in order with scale 1 (upcycling) is the dense FFN itself:
    the tensors are returned as they are, not copied."""
    if scale == 1.0 and neurons.numel() == gate_FD.shape[0] and torch.equal(neurons, torch.arange(gate_FD.shape[0])):
        return gate_FD, up_FD, down_DF
    down = down_DF[:, neurons]
    if scale != 1.0:
        down = down * scale
    return gate_FD[neurons].contiguous(), up_FD[neurons].contiguous(), down.contiguous()
