"""The construction schema: one dataclass for `build`, `split`, `compare-init`, online upcycling and
the `build:` section of recipes and experiments. Flags and recipe keys are the leaf names below."""

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

from moeify.data.sources import source_paths
from moeify.errors import MoeifyError
from moeify.modeling.router import RouterSpec
from moeify.schema import (
    Range,
    at_least,
    fraction,
    is_given,
    positive,
    replace_flat,
    seed_range,
    to_flat,
)

RouterInit = Literal["auto", "normal", "virtual-group", "centroids", "fitted", "prompts", "calibration"]


@dataclass
class RouterOptions:
    RANGES: ClassVar[dict] = {"top_k": at_least(1), "router_std": at_least(0)}
    top_k: int = 2
    """Experts per token k."""
    routing: Literal["topk-softmax", "softmax-topk", "sigmoid-topk"] = "topk-softmax"
    """Scoring order: topk-softmax (Mixtral), softmax-topk (Qwen-MoE), sigmoid-topk (DeepSeek-V3)."""
    renormalize: bool = True
    """softmax-topk / sigmoid-topk: renormalise the k kept scores (topk-softmax always sums to 1)."""
    gate: Literal["linear", "mlp"] = "linear"
    """Router network: linear, or LLaMA-MoE's Linear-tanh-Linear (moeify format only)."""
    mlp_gate_init: Literal["identity", "normal"] = "identity"
    """MLP gate's second layer: identity (the gate starts as the linear one) or N(0, router_std)
    like the first (LLaMA-MoE)."""
    router_std: float = 0.02
    """Router initialised N(0, router_std); 0 gives zeros (uniform routing)."""
    router_init: RouterInit = "auto"
    """auto | normal | virtual-group (granular-upcycle) | centroids (clustering) | fitted (carve) | prompts (rows
    from the MLP inputs of each expert's prompts, --expert-prompts; mergekit's hidden mode) | calibration (one
    --calibration domain per expert)."""
    text_router_rule: Literal["fit", "centred", "mergekit"] = "fit"
    """prompts/calibration: ridge least squares of each text's expert on its tokens' MLP inputs (fit), the experts'
    mean MLP inputs around their common centre (centred), or mergekit's unit (positive - negative) means."""
    expert_prompts: Path | None = None
    """--router-init prompts: a YAML/JSON list with one entry per expert, `positive: [prompts]` and optionally
    `negative: [prompts]` (mergekit's positive_prompts/negative_prompts are read too)."""

    def spec(self) -> RouterSpec:
        # top-k-then-softmax is renormalised by construction, whatever the flag says.
        return RouterSpec(self.routing, self.renormalize or self.routing == "topk-softmax", self.gate)


@dataclass
class SplitOptions:
    RANGES: ClassVar[dict] = {"expert_size": at_least(1), "shared_size": at_least(0)}
    expert_size: int | None = None
    """Neurons per routed expert (sharing methods; default: what tiles the FFN)."""
    shared_size: int | None = None
    """Neurons of the always-active shared expert (random-split, sharing-inter)."""
    importance_scores: Literal["share", "raw"] = "share"
    """Gradient methods: compare each group's importance as its share of the group's total, or raw (LLaMA-MoE)."""
    shared_selection: Literal["summed", "frequency"] = "summed"
    """sharing-inter: the shared neurons are those with the highest importance summed over groups, or
    those in the most groups' top lists, recounted after each pick (LLaMA-MoE; ties by lowest index)."""


@dataclass
class UpcycleOptions:
    RANGES: ClassVar[dict] = {"granularity": at_least(1), "drop_ratio": fraction(), "noise_std": at_least(0),
                              "noise_fraction": fraction(low_inclusive=False)}
    granularity: int = 1
    """granular-upcycle: slices G per copy of the FFN; experts = copies x G."""
    weight_scaling: Literal["exact", "megatron"] = "exact"
    """Upcycling methods: the output scale s folded into down_proj (exact at construction), or s^(1/3)
    on gate, up and down with Megatron-Core's s (copies x G^2 / k for softmax-topk, else G)."""
    drop_ratio: float = 0.5
    """drop-upcycle: fraction of each expert's neurons re-initialised."""
    drop_indices: Literal["shared", "independent"] = "shared"
    """drop-upcycle: one re-initialised neuron set for gate, up and down, or one per matrix (the authors' code)."""
    drop_stats: Literal["matrix", "replaced"] = "matrix"
    """drop-upcycle: new values drawn with the mean and std of the whole matrix, or of the replaced
    neurons' weights (the authors' code)."""
    noise_std: float | None = None
    """noise-upcycle: std of the Gaussian noise, relative to each matrix's std (default 0.01) or, with
    --no-noise-relative, absolute (default 0.02, the authors')."""
    noise_relative: bool = True
    """noise-upcycle: scale the noise by each weight matrix's std (off: absolute, the authors' N(0, 0.02))."""
    noise_fraction: float = 1.0
    """noise-upcycle: fraction of each matrix's neurons that get noise, drawn per matrix (the authors: r)."""


@dataclass
class ClusteringOptions:
    RANGES: ClassVar[dict] = {"restarts": at_least(1)}
    cluster_on: Literal["up", "gate"] = "up"
    """clustering: the rows clustered, up or gate."""
    restarts: int = 1
    """clustering: k-means++ starts per layer (the best objective is kept)."""


@dataclass
class CarveOptions:
    RANGES: ClassVar[dict] = {"activation_ratio": fraction(low_inclusive=False, high_inclusive=False), "pattern_dims": at_least(0),
                              "router_ridge": at_least(0)}
    activation_ratio: float | None = None
    """carve: active FFN neurons per token (k experts + shared) over F; decides the shared size
    (compare-init: every method compared at this ratio)."""
    shared_by: Literal["contribution", "rate"] = "contribution"
    """carve: shared neurons by mean squared contribution |h| ||down||, or CMoE's activation rate."""
    pattern_dims: int = 2048
    """carve: random projection of the neurons' activation patterns before k-means (0: none)."""
    router_ridge: float = 0.01
    """carve: ridge of the router's least-squares fit, relative to the mean diagonal of X^T X."""
    expert_scales: bool = True
    """carve: fit a per-expert output factor by least squares on the dense FFN output."""
    balance_bias: bool = False
    """carve: a selection bias that evens the calibration load (needs --routing sigmoid-topk)."""


@dataclass
class CalibrationOptions:
    RANGES: ClassVar[dict] = {"calibration_tokens": at_least(1), "calibration_seq_len": at_least(2),
                              "graph_density": fraction(low_inclusive=False)}
    calibration: str | None = None
    """Calibration text: 'embedded' or DOMAIN=PATH[,DOMAIN=PATH...] (data-driven methods)."""
    calibration_tokens: int = 16384
    """Calibration tokens read (data-driven methods)."""
    calibration_seq_len: int = 256
    """Calibration block length."""
    graph_density: float = 0.1
    """co-activation: fraction of neuron pairs kept as graph edges (the strongest)."""


@dataclass
class MergeOptions:
    RANGES: ClassVar[dict] = {"min_base_similarity": Range(-1, 1)}
    expert_model: list[str] = field(default_factory=list)
    """btx: a dense fine-tune of MODEL per expert (repeat the flag); each one's FFNs become one expert."""
    merge_others: Literal["average", "base"] = "average"
    """btx: attention, norms and embeddings averaged over the expert models (Branch-Train-MiX), or MODEL's
    (mergekit-moe)."""
    min_base_similarity: float = 0.5
    """btx: least cosine between an expert model's and MODEL's token embeddings (fine-tunes of one base keep
    them near 1; unrelated models are near 0)."""


@dataclass
class ConstructionConfig:
    RANGES: ClassVar[dict] = {"num_experts": at_least(1), "scale": positive(), "seed": seed_range()}
    method: str = "upcycle"
    """Construction method (moeify inspect lists them)."""
    num_experts: int = 8
    """Routed experts E."""
    seed: int = 0
    """Seed of partition, router and re-initialisation; same seed, same bytes."""
    scale: float | None = None
    """Output scale folded into each expert's down projection; default: the method's (E/k for splits)."""
    scale_placement: Literal["fold", "multiplier"] = "fold"
    """Where training keeps the scale: folded into down_proj, or as a fixed multiplier of the routed
    experts' outputs (LLaMA-MoE; AdamW then moves s x W_down s times faster). Written folded either way."""
    partition: Path | None = None
    """A `moeify split` partition file; its method and method options replace the given ones."""
    refit: bool = False
    """Refit each layer's router and down projections by least squares so each MoE block reproduces its dense
    FFN on the calibration text, layer by layer (training-free; needs --calibration; not for upcycling)."""
    format: str | None = None
    """Output format (mixtral, qwen2_moe, qwen3_moe, deepseek-v3); default: sigmoid routing -> deepseek-v3,
    else the dense family's own, else qwen2_moe."""
    router: RouterOptions = field(default_factory=RouterOptions)
    split: SplitOptions = field(default_factory=SplitOptions)
    upcycle: UpcycleOptions = field(default_factory=UpcycleOptions)
    clustering: ClusteringOptions = field(default_factory=ClusteringOptions)
    carve: CarveOptions = field(default_factory=CarveOptions)
    data: CalibrationOptions = field(default_factory=CalibrationOptions)
    merge: MergeOptions = field(default_factory=MergeOptions)

    @property
    def top_k(self) -> int:
        return self.router.top_k

    def read_paths(self) -> list[Path]:
        """The files and folders a construction reads besides the dense model (outputs must stay clear of them)."""
        paths = [self.partition, self.router.expert_prompts, *map(Path, self.merge.expert_model)]
        if self.data.calibration not in (None, "embedded"):
            paths += source_paths(self.data.calibration.split(","))
        return [path for path in paths if path is not None]

    def check_routing(self) -> None:
        """What RANGES cannot say alone: k at most E (the ranges themselves are checked by schema.validate)."""
        check_routing(self.num_experts, self.router.top_k)


# The leaves a partition file records and replaces: the method and its options (not the router).
PARTITION_GROUPS = ("split", "upcycle", "clustering", "carve", "data", "merge")
PARTITION_ROOT_KEYS = ("method", "num_experts", "seed")
PARTITION_KEYS = frozenset(PARTITION_ROOT_KEYS).union(*(to_flat(getattr(ConstructionConfig(), group)) for group in PARTITION_GROUPS))


def check_routing(num_experts: int, top_k: int) -> None:
    if num_experts < 1:
        raise MoeifyError(f"--num-experts must be at least 1, got {num_experts}")
    if top_k < 1:
        raise MoeifyError(f"--top-k must be at least 1, got {top_k}")
    if top_k > num_experts:
        raise MoeifyError(f"--top-k {top_k} is larger than --num-experts {num_experts}; choose top-k <= experts")


def method_options(config: ConstructionConfig) -> dict:
    """What a partition file records of how it was made: the method, E, seed and the method options."""
    recorded = {key: getattr(config, key) for key in PARTITION_ROOT_KEYS}
    for group in PARTITION_GROUPS:
        if group != "merge" or config.method == "btx":  # the expert models are recorded only where they are used
            recorded.update(to_flat(getattr(config, group)))
    if "expert_model" in recorded:  # local paths made absolute: the file may be used from another directory
        recorded["expert_model"] = [str(Path(m).resolve()) if Path(m).exists() else m for m in recorded["expert_model"]]
    return {k: v for k, v in recorded.items() if v is not None}


def with_method_options(config: ConstructionConfig, recorded: dict) -> ConstructionConfig:
    """`config` with the method and method options a partition file recorded (router options stay)."""
    return replace_flat(config, **{k: v for k, v in recorded.items() if k in PARTITION_KEYS})


def partition_conflicts(config: ConstructionConfig, recorded: dict) -> list[str]:
    """Method settings given (not left at their defaults) that differ from what a partition file records.
    The seed is not one: the partition's seed wins (it also seeds the router)."""
    values, defaults = method_options(config), method_options(ConstructionConfig())
    return [f"{key} {values[key]!r} (the file: {recorded[key]!r})" for key in recorded
            if key != "seed" and key in values and is_given(config, key, defaults.get(key)) and values[key] != recorded[key]]
