"""One construction, resolved, and the one function that makes an MoE layer's tensors.

`ConstructionPlan.make` resolves a ConstructionConfig against a dense model (method, partition file,
scale, router init, all checked); `plan.layer(dense, L)` returns layer L's canonical tensors. `build`
writes them through the output format, online upcycling fills each rank's shards from them: nothing
else assembles MoE tensors, so the same plan gives the same bytes in every layout.
"""

from dataclasses import asdict, dataclass

import torch

from moeify.checkpoint.dense import DenseCheckpoint
from moeify.checkpoint.formats.base import MoEFeatures
from moeify.checkpoint.manifest import Manifest
from moeify.construct.btx import merged, open_expert_models, with_expert_count
from moeify.construct.config import (
    ConstructionConfig,
    method_options,
    partition_conflicts,
    with_method_options,
)
from moeify.construct.methods import ConstructionMethod
from moeify.construct.options import (
    TEXT_ROUTER_INITS,
    refuse_unread,
    requested_router_init,
)
from moeify.construct.partition import Partition, model_fingerprint
from moeify.construct.refit import check_refit
from moeify.construct.registry import get_method
from moeify.construct.seeding import MLP_GATE_STREAM, ROUTER_STREAM, layer_generator
from moeify.construct.text_router import text_router_rows
from moeify.errors import MoeifyError
from moeify.modeling.canonical import FFNWeights, LazyExperts, MoELayer
from moeify.schema import given_names, validate


@dataclass
class ConstructionPlan:
    config: ConstructionConfig  # with a partition file's method options applied
    method: ConstructionMethod
    ffn_size: int
    partition: Partition | None
    scale: float
    router_init: str  # resolved: normal | virtual-group | centroids | fitted | prompts | calibration
    expert_models: list[DenseCheckpoint] | None = None  # btx: expert e's FFNs come from expert_models[e]
    router_rows: list[torch.Tensor] | None = None  # per layer [E, D], from prompts or calibration domains

    @classmethod
    def make(cls, dense: DenseCheckpoint, config: ConstructionConfig, source: str = "MODEL", progress: bool = True,
             compute_partition: bool = True) -> "ConstructionPlan":
        """`compute_partition=False` refuses data-driven methods without a partition file (online upcycling:
        every rank would compute it)."""
        validate(config, "the construction settings")
        given = given_names(config)
        config = with_expert_count(config)
        partition = None
        if config.partition is not None:
            partition = Partition.load(config.partition)
            partition.check_model(dense, source)
            conflicts = partition_conflicts(config, partition.options)
            if conflicts:
                raise MoeifyError(f"{', '.join(conflicts)} conflict with the partition file {config.partition}: drop those settings "
                                  f"(the file decides them) or make another partition with `moeify split`")
            config = with_method_options(config, partition.options)
            method = get_method(partition.method)
            refuse_unread(config, method, requested_router_init(config, method), given)
            config.check_routing()
        else:
            method = get_method(config.method)
            refuse_unread(config, method, requested_router_init(config, method), given)  # before any long computation
            method.check(dense.ffn_size, config)
            config.check_routing()
            if not method.layerwise:
                if not compute_partition:
                    raise MoeifyError(f"--method {method.name} needs a partition here: run `moeify split {source} --method "
                                      f"{method.name} ...` once and pass --partition")
                if method.needs_calibration and config.data.calibration is None:
                    raise MoeifyError(f"--method {method.name} needs calibration text: give --calibration embedded (or DOMAIN=PATH), "
                                      f"or make a partition with `moeify split` and pass --partition")
                partition = method.make_partition(dense, config, progress)
        config.check_routing()
        plan = cls(config, method, dense.ffn_size, partition, 1.0, "normal")
        plan.scale = plan._default_scale() if config.scale is None else config.scale
        if config.upcycle.weight_scaling == "megatron":
            megatron = method.megatron_scale(config, config.router.top_k, config.router.spec())
            if megatron is None:
                raise MoeifyError(f"--weight-scaling megatron is Megatron-Core's rule for the upcycling methods (upcycle, "
                                  f"granular-upcycle, drop-upcycle, noise-upcycle), not --method {method.name}; drop it")
            plan.scale = megatron if config.scale is None else config.scale
        plan.router_init = plan._resolve_router_init()
        refuse_unread(config, method, plan.router_init, given)  # again with the router init resolved and checked
        if method.name == "btx":
            plan.expert_models = open_expert_models(dense, config)
        if plan.router_init in TEXT_ROUTER_INITS:
            if not compute_partition:
                raise MoeifyError(f"--router-init {plan.router_init} runs the dense model on its text, which online upcycling does not "
                                  f"do on every rank: `moeify build` the MoE once and train the built checkpoint")
            plan.router_rows = text_router_rows(dense, config, plan.router_init, progress)
        check_refit(config, plan.ffn_size, plan.expert_size, plan.shared_size, online=not compute_partition)
        return plan

    @property
    def num_experts(self) -> int:
        return self.config.num_experts

    @property
    def top_k(self) -> int:
        return self.config.router.top_k

    @property
    def expert_size(self) -> int:
        return self.partition.expert_size if self.partition else self.method.expert_size(self.ffn_size, self.config)

    @property
    def shared_size(self) -> int:
        return self.partition.shared_size if self.partition else self.method.shared_size(self.ffn_size, self.config)

    @property
    def features(self) -> MoEFeatures:
        return MoEFeatures(self.config.router.spec(), self.shared_size)

    def _default_scale(self) -> float:
        if self.partition is not None and not self.method.layerwise and not self.method.scale_from_options:
            return (self.ffn_size - self.shared_size) / (self.top_k * self.expert_size)
        return self.method.default_scale(self.ffn_size, self.config, self.top_k, self.config.router.spec())

    def _resolve_router_init(self) -> str:
        requested, prompts = self.config.router.router_init, self.config.router.expert_prompts
        init = ("prompts" if prompts is not None else self.method.default_router_init()) if requested == "auto" else requested
        if prompts is not None and init != "prompts":
            raise MoeifyError(f"--expert-prompts is read by --router-init prompts, not {init}; drop one of them")
        available = (*self.method.router_inits, *TEXT_ROUTER_INITS)
        if init not in available:
            raise MoeifyError(f"--router-init {init} is not available with --method {self.method.name}; choose one of: "
                              f"auto, {', '.join(available)} (centroids: --method clustering; "
                              f"virtual-group: --method granular-upcycle; fitted: --method carve)")
        if init == "prompts" and prompts is None:
            raise MoeifyError("--router-init prompts needs --expert-prompts FILE (one entry of positive prompts per expert)")
        if init == "calibration" and self.config.data.calibration is None:
            raise MoeifyError("--router-init calibration needs --calibration DOMAIN=PATH,... with one domain per expert (or embedded)")
        if init == "centroids" and (self.partition is None or self.partition.centroids is None):
            raise MoeifyError("--router-init centroids needs a clustering partition with centroids; make it with `moeify split --method clustering`")
        if init == "fitted" and (self.partition is None or self.partition.router is None):
            raise MoeifyError("--router-init fitted needs a carve partition with router rows; make it with `moeify split --method carve`")
        return init

    def manifest(self, dense: DenseCheckpoint, source: str, architecture: str, format_name: str) -> Manifest:
        """What moeify.json records of how the MoE was made (by `build` and by online upcycling)."""
        router = self.config.router
        return Manifest(source_model=source, source_path=str(dense.path), source_family=dense.family, architecture=architecture,
                        format=format_name, method=self.method.name, num_experts=self.num_experts, top_k=self.top_k,
                        expert_size=self.expert_size, shared_size=self.shared_size, scale=self.scale, seed=self.config.seed,
                        router={**asdict(router.spec()), "router_std": router.router_std, "router_init": self.router_init,
                                **({"mlp_gate_init": router.mlp_gate_init} if router.gate == "mlp" else {}),
                                **({"text_router_rule": router.text_router_rule} if self.router_init in TEXT_ROUTER_INITS else {}),
                                **({"expert_prompts": str(router.expert_prompts)} if router.expert_prompts is not None else {})},
                        options=method_options(self.config), scale_placement=self.config.scale_placement,
                        partition=str(self.config.partition) if self.config.partition is not None else None,
                        refit=self.refit_record())

    def refit_record(self) -> dict | None:
        """What moeify.json records of a least-squares refit (build --refit)."""
        if not self.config.refit:
            return None
        data = self.config.data
        return {"calibration": data.calibration, "calibration_tokens": data.calibration_tokens,
                "calibration_seq_len": data.calibration_seq_len}

    def neurons(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(experts [E, S], shared [S0]) dense neuron indices of one layer."""
        if self.partition is not None:
            return self.partition.experts[layer], self.partition.shared[layer]
        return self.method.layer_partition(self.ffn_size, self.config, layer)

    def make_partition(self, dense: DenseCheckpoint) -> Partition:
        """What `moeify split` saves: the data-driven partition, or every layer of a layer-wise method."""
        if self.partition is not None:
            return self.partition
        layers = [self.neurons(layer) for layer in range(dense.num_layers)]
        return Partition(self.method.name, self.num_experts, self.expert_size, self.shared_size,
                         [experts.contiguous() for experts, _ in layers], [shared for _, shared in layers],
                         model_fingerprint(dense), method_options(self.config))

    def router_weight(self, layer: int, hidden_size: int, dtype: torch.dtype) -> torch.Tensor:
        """Router weight [E, D]: N(0, std) (zeros when std is 0); virtual-group repeats E/G rows G
        times, so the G slices of one FFN copy are always chosen together; centroids uses the
        clustering centroids (mean normalised rows of each expert); fitted, carve's router rows; prompts
        and calibration, the rows construct/text_router.py computed."""
        E, std = self.num_experts, self.config.router.router_std
        if self.router_init == "centroids":
            return self.partition.centroids[layer].to(dtype)
        if self.router_init == "fitted":
            return self.partition.router[layer].to(dtype)
        if self.router_rows is not None:
            return self.router_rows[layer].to(dtype)
        if std == 0:
            return torch.zeros(E, hidden_size, dtype=dtype)
        G = self.config.upcycle.granularity if self.router_init == "virtual-group" else 1
        weight = torch.randn(E // G, hidden_size, generator=layer_generator(self.config.seed, layer, ROUTER_STREAM)) * std
        return weight.repeat_interleave(G, dim=0).to(dtype)

    def mlp_gate_out(self, layer: int, dtype: torch.dtype) -> torch.Tensor:
        """The MLP gate's Linear(E, E) after tanh: the identity (the gate begins like the linear one),
        or N(0, router_std) like its first layer (LLaMA-MoE)."""
        if self.config.router.mlp_gate_init == "identity":
            return torch.eye(self.num_experts, dtype=dtype)
        generator = layer_generator(self.config.seed, layer, MLP_GATE_STREAM)
        return (torch.randn(self.num_experts, self.num_experts, generator=generator) * self.config.router.router_std).to(dtype)

    def selection_bias(self, layer: int) -> torch.Tensor:
        """fp32 [E]: zeros, or the balancing bias a carve partition computed."""
        if self.partition is not None and self.partition.selection_bias is not None:
            return self.partition.selection_bias[layer].float().clone()
        return torch.zeros(self.num_experts)

    def tensor(self, dense: DenseCheckpoint, name: str) -> torch.Tensor:
        """A tensor outside the MoE layers (attention, norms, embeddings, head): the dense model's, or
        for btx the mean over the expert models (`--merge-others average`)."""
        return merged([model.get(name) for model in self._non_ffn_sources(dense)])

    def block(self, dense: DenseCheckpoint, name: str, box: tuple[slice, ...]) -> torch.Tensor:
        """A box of `tensor(dense, name)`, read without the rest (online upcycling fills its shards so)."""
        return merged([model.block(name, box) for model in self._non_ffn_sources(dense)])

    def _non_ffn_sources(self, dense: DenseCheckpoint) -> list[DenseCheckpoint]:
        if self.expert_models is None or self.config.merge.merge_others == "base":
            return [dense]
        return self.expert_models

    def layer(self, dense: DenseCheckpoint, layer: int) -> MoELayer:
        """Layer `layer`'s canonical MoE tensors; experts are made when asked for (LazyExperts)."""
        dense_ffn = FFNWeights(*dense.ffn(layer))
        experts_ES, shared_S = self.neurons(layer)
        dtype = dense_ffn.gate.dtype
        factors = self.partition.expert_scales[layer].tolist() if self.partition is not None and self.partition.expert_scales else None

        def make_expert(expert: int) -> FFNWeights:
            source = dense_ffn if self.expert_models is None else FFNWeights(*self.expert_models[expert].ffn(layer))
            perturbed = FFNWeights(*self.method.perturb((source.gate, source.up, source.down), self.config, layer, expert))
            scale = self.scale * factors[expert] if factors is not None else self.scale
            return expert_weights(perturbed, experts_ES[expert], scale, self.config.upcycle.weight_scaling == "megatron")

        mlp_out = None
        if self.config.router.gate == "mlp":
            mlp_out = self.mlp_gate_out(layer, dtype)
        return MoELayer(
            router=self.router_weight(layer, dense.hidden_size, dtype),
            experts=LazyExperts(self.num_experts, make_expert),
            router_mlp_out=mlp_out,
            selection_bias=self.selection_bias(layer),
            shared=expert_weights(dense_ffn, shared_S, 1.0) if len(shared_S) else None,
        )


def expert_weights(ffn: FFNWeights, neurons: torch.Tensor, scale: float, spread: bool = False) -> FFNWeights:
    """One expert's (gate, up, down) from the dense FFN; the output scale is folded into down, or
    (`spread`, Megatron-Core) s^(1/3) into each of the three: silu(a g) a u is not a^2 silu(g) u, so
    that is not exactly s times the expert's output.

    An expert that holds every neuron in order with scale 1 (upcycling) is the dense FFN itself:
    the tensors are returned as they are, not copied."""
    if scale == 1.0 and neurons.numel() == ffn.size and torch.equal(neurons, torch.arange(ffn.size)):
        return ffn
    gate, up, down = ffn.gate[neurons], ffn.up[neurons], ffn.down[:, neurons]
    if spread and scale != 1.0:
        factor = scale ** (1 / 3)
        gate, up, down = gate * factor, up * factor, down * factor
    elif scale != 1.0:
        down = down * scale
    return FFNWeights(gate.contiguous(), up.contiguous(), down.contiguous())
