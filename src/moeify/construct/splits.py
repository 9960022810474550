"""Construction methods that look at the weights or at calibration data (LLaMA-MoE §1).

Each produces a whole Partition (every layer) in one pass, to be saved by `moeify split`.
"""

import sys

import numpy as np
import torch
from tqdm import tqdm

from moeify.checkpoint.dense import DenseCheckpoint
from moeify.construct import calibration as calib
from moeify.construct.config import ConstructionConfig, method_options
from moeify.construct.kmeans import balanced_kmeans
from moeify.construct.methods import (
    CALIBRATION_OPTIONS,
    ConstructionMethod,
    check_equal_split,
)
from moeify.construct.partition import Partition, model_fingerprint
from moeify.errors import MoeifyError

EMPTY = torch.zeros(0, dtype=torch.long)
# Co-activation graphs held at once (F x F fp32 per layer: 0.5 GB for a 7B model's F = 11008); the
# layers beyond it are counted in further calibration passes, each stopping at its last layer.
GRAPH_MEMORY_BYTES = 4 * 2**30


class _Split(ConstructionMethod):
    layerwise = False

    def check(self, ffn_size: int, options: ConstructionConfig) -> None:
        check_equal_split(ffn_size, options, self.shared_size(ffn_size, options))

    def shared_size(self, ffn_size: int, options: ConstructionConfig) -> int:
        return 0

    def expert_size(self, ffn_size: int, options: ConstructionConfig) -> int:
        return (ffn_size - self.shared_size(ffn_size, options)) // options.num_experts

    def make_partition(self, dense: DenseCheckpoint, options: ConstructionConfig, progress: bool = True) -> Partition:
        raise NotImplementedError

    def _partition(self, dense: DenseCheckpoint, options: ConstructionConfig, experts: list[torch.Tensor],
                   shared: list[torch.Tensor], info: dict, centroids: list[torch.Tensor] | None = None) -> Partition:
        F = dense.ffn_size
        return Partition(self.name, options.num_experts, self.expert_size(F, options), self.shared_size(F, options),
                         [e.sort(dim=1).values for e in experts], [s.sort().values for s in shared], model_fingerprint(dense),
                         method_options(options), info, centroids)


def _layers(dense: DenseCheckpoint, label: str, progress: bool):
    return tqdm(range(dense.num_layers), desc=label, unit="layer", disable=not progress, file=sys.stderr)


class Clustering(_Split):
    name = "clustering"
    description = "balanced k-means on L2-normalised up_proj rows (LLaMA-MoE Independent-Clustering)"
    options = frozenset({"cluster_on", "restarts"})
    router_inits = ("normal", "centroids")

    def check(self, ffn_size: int, options: ConstructionConfig) -> None:
        super().check(ffn_size, options)
        if options.clustering.cluster_on not in ("up", "gate"):
            raise MoeifyError(f"--cluster-on must be up or gate, got {options.clustering.cluster_on!r}")

    def make_partition(self, dense: DenseCheckpoint, options: ConstructionConfig, progress: bool = True) -> Partition:
        experts, centroids, objectives = [], [], []
        for layer in _layers(dense, "k-means", progress):
            rows = dense.get(f"model.layers.{layer}.mlp.{options.clustering.cluster_on}_proj.weight").float()
            result = balanced_kmeans(torch.nn.functional.normalize(rows, dim=1), options.num_experts,
                                     seed=options.seed + layer, restarts=options.clustering.restarts)
            experts.append(result.labels_N.argsort(stable=True).view(options.num_experts, -1))
            centroids.append(result.centroids_KD)
            objectives.append(round(result.objective, 6))
        return self._partition(dense, options, experts, [EMPTY] * len(experts), {"objective": objectives}, centroids)


def _load_calibration(dense: DenseCheckpoint, options: ConstructionConfig, method: str, needed_blocks: int) -> calib.CalibrationData:
    if options.data.calibration is None:
        raise MoeifyError(f"--method {method} needs calibration text: give --calibration embedded or --calibration DOMAIN=PATH")
    data = calib.load_calibration(options.data.calibration, dense.path, options.data.calibration_tokens, options.data.calibration_seq_len)
    if len(data.blocks_NS) < needed_blocks:
        raise MoeifyError(
            f"calibration data {options.data.calibration!r} gives {len(data.blocks_NS)} blocks of {options.data.calibration_seq_len} tokens; "
            f"--method {method} needs at least {needed_blocks}: give more text, a larger --calibration-tokens "
            f"or a smaller --calibration-seq-len"
        )
    return data


def rebalance(parts_F: torch.Tensor, affinity_FF: torch.Tensor, num_parts: int) -> torch.Tensor:
    """Equal part sizes: repeatedly move the neuron of an over-full part that loses the least
    affinity (sum of edge weights to its part's members) into an under-full part."""
    parts_F = parts_F.clone()
    target = len(parts_F) // num_parts
    affinity_FE = affinity_FF @ torch.nn.functional.one_hot(parts_F, num_parts).to(affinity_FF.dtype)
    while True:
        sizes = torch.bincount(parts_F, minlength=num_parts)
        over, under = sizes > target, sizes < target
        if not over.any():
            return parts_F
        movable = over[parts_F]
        gain_FE = affinity_FE - affinity_FE.gather(1, parts_F[:, None])
        gain_FE[~movable] = -torch.inf
        gain_FE[:, ~under] = -torch.inf
        flat = int(gain_FE.argmax())
        neuron, part = divmod(flat, num_parts)
        affinity_FE[:, parts_F[neuron]] -= affinity_FF[:, neuron]
        affinity_FE[:, part] += affinity_FF[:, neuron]
        parts_F[neuron] = part


class CoActivation(_Split):
    name = "co-activation"
    description = "METIS partition of the neuron co-activation graph, rebalanced (MoEfication)"
    needs_calibration = True
    options = CALIBRATION_OPTIONS | {"graph_density"}

    def check(self, ffn_size: int, options: ConstructionConfig) -> None:
        super().check(ffn_size, options)
        if not 0 < options.data.graph_density <= 1:
            raise MoeifyError(f"--graph-density must be in (0, 1], got {options.data.graph_density}")

    def make_partition(self, dense: DenseCheckpoint, options: ConstructionConfig, progress: bool = True) -> Partition:
        import pymetis

        data = _load_calibration(dense, options, self.name, 4)
        model = calib.load_dense_model(dense.path)
        ffn = model.config.intermediate_size
        chunks = calib.layer_chunks(len(model.model.layers), ffn * ffn * 4, GRAPH_MEMORY_BYTES)
        graphs: dict[int, torch.Tensor] = {}
        experts, cuts = [], []
        metis_options = pymetis.Options(seed=options.seed)
        for layer in _layers(dense, "METIS", progress):
            if layer not in graphs:  # the next chunk of layers' graphs, the previous ones freed
                chunk = next(c for c in chunks if layer in c)
                graphs = calib.coactivation_graphs(model, data, layers=chunk)
                if chunk is chunks[-1]:
                    model = None  # not needed for the METIS partitions
            graph = graphs.pop(layer).fill_diagonal_(0)
            threshold = torch.quantile(graph.flatten()[::max(1, graph.numel() // 1_000_000)], 1 - options.data.graph_density)
            kept = (graph >= threshold) & (graph > 0)
            kept = kept | kept.T
            rows, cols = kept.nonzero(as_tuple=True)
            weights = (graph[rows, cols] / graph.max() * 1000).round().clamp_min(1).long()
            xadj = np.concatenate([[0], torch.bincount(rows, minlength=len(graph)).cumsum(0).numpy()])
            cut, membership = pymetis.part_graph(options.num_experts, pymetis.CSRAdjacency(xadj, cols.numpy()),
                                                 eweights=weights.numpy(), options=metis_options)
            parts = rebalance(torch.tensor(membership), graph.double(), options.num_experts)
            experts.append(parts.argsort(stable=True).view(options.num_experts, -1))
            cuts.append(int(cut))
        info = {"calibration_blocks": len(data.blocks_NS), "metis_edge_cut": cuts}
        return self._partition(dense, options, experts, [EMPTY] * len(experts), info)


def greedy_assign(scores_GF: torch.Tensor, capacity: int) -> torch.Tensor:
    """Repeatedly give the highest remaining (group, neuron) score to its group until every group
    holds `capacity` neurons; no neuron twice. Returns [G, capacity] neuron indices."""
    G, F = scores_GF.shape
    order = scores_GF.flatten().argsort(descending=True, stable=True).tolist()
    taken = [False] * F
    members: list[list[int]] = [[] for _ in range(G)]
    for flat in order:
        group, neuron = divmod(flat, F)
        if not taken[neuron] and len(members[group]) < capacity:
            taken[neuron] = True
            members[group].append(neuron)
    return torch.tensor(members)


def comparable_scores(importance_GLF: torch.Tensor, mode: str) -> torch.Tensor:
    """Importance as compared across groups: each group's share of its own total per layer, or raw."""
    if mode == "raw":
        return importance_GLF
    return importance_GLF / importance_GLF.sum(dim=-1, keepdim=True).clamp_min(1e-30)


def shared_neurons(importance_GF: torch.Tensor, size: int, selection: str, top: int | None = None) -> torch.Tensor:
    """Sharing-Inter's shared block of `size` neurons: those with the highest summed importance, or
    LLaMA-MoE's rule ("frequency"): count how many groups have each neuron among their `top` (the
    routed expert size) most important, take the neurons of the highest count (lowest index first, up
    to what the block still holds), drop them from every group's list, count again, until full."""
    if selection == "summed":
        return importance_GF.sum(dim=0).topk(size).indices
    top = top or size
    order_GF = importance_GF.argsort(dim=1, descending=True, stable=True)
    taken_F = torch.zeros(importance_GF.shape[1], dtype=torch.bool)
    shared: list[int] = []
    while len(shared) < size:
        count_F = torch.zeros(importance_GF.shape[1], dtype=torch.long)
        for order_F in order_GF:
            count_F[order_F[~taken_F[order_F]][:top]] += 1
        chosen = (count_F == count_F.max()).nonzero().squeeze(1)[: size - len(shared)]
        shared += chosen.tolist()
        taken_F[chosen] = True
    return torch.tensor(shared)


class _GradientSplit(_Split):
    """Importance per calibration group of every neuron: sum of |h * dL/dh| over the group's tokens.
    Groups: the domains when there are exactly E of them, else a balanced k-means of the blocks."""

    needs_calibration = True
    options = CALIBRATION_OPTIONS | {"importance_scores"}

    def make_partition(self, dense: DenseCheckpoint, options: ConstructionConfig, progress: bool = True) -> Partition:
        E = options.num_experts
        data = _load_calibration(dense, options, self.name, calib.min_blocks(E))
        model = calib.load_dense_model(dense.path)
        groups_N, grouping = calib.calibration_groups(model, data, E, options.seed)
        importance_GLF = comparable_scores(calib.gradient_importance(model, data, groups_N, E), options.split.importance_scores)
        experts, shared = [], []
        for layer in range(dense.num_layers):
            routed, common = self.split_layer(importance_GLF[:, layer], dense.ffn_size, options)
            experts.append(routed)
            shared.append(common)
        return self._partition(dense, options, experts, shared, {"calibration_blocks": len(data.blocks_NS), "grouping": grouping})

    def split_layer(self, importance_GF: torch.Tensor, ffn_size: int, options: ConstructionConfig) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


class SharingInner(_GradientSplit):
    name = "sharing-inner"
    description = "each expert takes its group's most important neurons; experts may overlap (LLaMA-MoE)"
    options = _GradientSplit.options | {"expert_size"}

    def check(self, ffn_size: int, options: ConstructionConfig) -> None:
        ConstructionMethod.check(self, ffn_size, options)
        size = self.expert_size(ffn_size, options)
        if not 0 < size <= ffn_size:
            raise MoeifyError(f"--expert-size must be in [1, {ffn_size}], got {size}")

    def expert_size(self, ffn_size: int, options: ConstructionConfig) -> int:
        return options.split.expert_size or ffn_size // options.num_experts

    def split_layer(self, importance_GF: torch.Tensor, ffn_size: int, options: ConstructionConfig) -> tuple[torch.Tensor, torch.Tensor]:
        size = self.expert_size(ffn_size, options)
        return importance_GF.topk(size, dim=1).indices, EMPTY


class SharingInter(_GradientSplit):
    name = "sharing-inter"
    description = "neurons important to most groups form an always-active shared expert; the rest are routed (LLaMA-MoE)"
    options = _GradientSplit.options | {"expert_size", "shared_size", "shared_selection"}

    def shared_size(self, ffn_size: int, options: ConstructionConfig) -> int:
        return options.split.shared_size if options.split.shared_size is not None else ffn_size // (options.num_experts + 1)

    def expert_size(self, ffn_size: int, options: ConstructionConfig) -> int:
        return options.split.expert_size or (ffn_size - self.shared_size(ffn_size, options)) // options.num_experts

    def check(self, ffn_size: int, options: ConstructionConfig) -> None:
        ConstructionMethod.check(self, ffn_size, options)
        shared, size = self.shared_size(ffn_size, options), self.expert_size(ffn_size, options)
        if not 0 < shared < ffn_size:
            raise MoeifyError(f"--shared-size must be in [1, {ffn_size - 1}], got {shared}")
        if size < 1 or size > ffn_size - shared:
            raise MoeifyError(f"--expert-size must be in [1, {ffn_size - shared}] (the neurons left after the shared expert), got {size}")

    def split_layer(self, importance_GF: torch.Tensor, ffn_size: int, options: ConstructionConfig) -> tuple[torch.Tensor, torch.Tensor]:
        shared_size, size = self.shared_size(ffn_size, options), self.expert_size(ffn_size, options)
        shared = shared_neurons(importance_GF, shared_size, options.split.shared_selection, size)
        rest = torch.ones(ffn_size, dtype=torch.bool)
        rest[shared] = False
        remaining = rest.nonzero().squeeze(1)
        scores = importance_GF[:, remaining]
        if size * options.num_experts == len(remaining):  # the routed neurons tile exactly: no overlap
            routed = greedy_assign(scores, size)
        else:
            routed = scores.topk(size, dim=1).indices
        return remaining[routed], shared


class GradientGreedy(_GradientSplit):
    name = "gradient-greedy"
    description = "highest (group, neuron) importance first, until every expert is full; no overlap (LLaMA-MoE)"

    def split_layer(self, importance_GF: torch.Tensor, ffn_size: int, options: ConstructionConfig) -> tuple[torch.Tensor, torch.Tensor]:
        return greedy_assign(importance_GF, self.expert_size(ffn_size, options)), EMPTY

