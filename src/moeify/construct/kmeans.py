"""Balanced k-means: every cluster gets exactly N/K points (LLaMA-MoE's Independent-Clustering).

Lloyd iterations whose assignment step solves the size-constrained transport problem
(minimise the summed squared distance with exactly N/K points per cluster) in three stages:
1. entropic optimal transport (log-domain Sinkhorn, temperature annealed) gives per-cluster
   prices p_K, the duals of the size constraints;
2. each point takes the cheapest cluster under cost + price, filled greedily in order of
   decisiveness so that no cluster exceeds N/K;
3. pairwise exchange: for every pair of clusters, swap points while a swap lowers the cost.
Prices carry over between Lloyd iterations, so later assignments take few Sinkhorn steps.
"""

from dataclasses import dataclass

import math

import torch


@dataclass
class KMeansResult:
    labels_N: torch.Tensor  # cluster of each point
    centroids_KD: torch.Tensor
    objective: float  # sum of squared distances to the assigned centroid
    iterations: int


def squared_distances(points_ND: torch.Tensor, centroids_KD: torch.Tensor, norms_N: torch.Tensor | None = None) -> torch.Tensor:
    norms_N = (points_ND * points_ND).sum(1) if norms_N is None else norms_N
    return (norms_N[:, None] - 2 * points_ND @ centroids_KD.T + (centroids_KD * centroids_KD).sum(1)).clamp_min_(0)


def _sinkhorn_prices(cost_NK: torch.Tensor, prices_K: torch.Tensor, steps: int) -> torch.Tensor:
    N, K = cost_NK.shape
    spread = float(cost_NK.std()) + 1e-12
    for temperature in torch.logspace(-1, -3, steps).tolist():
        tau = temperature * spread
        scaled_KN = -cost_NK.T / tau
        for _ in range(3):
            logits_KN = scaled_KN - prices_K[:, None] / tau
            row_N = torch.logsumexp(logits_KN, dim=0)
            # each cluster receives N/K points: log sum_i exp(-(c_ik + p_k)/tau - row_i) = log(N/K) - log N
            prices_K = prices_K + tau * (torch.logsumexp(logits_KN - row_N, dim=1) + math.log(K))
    return prices_K - prices_K.mean()


def _greedy_fill(cost_NK: torch.Tensor, size: int) -> torch.Tensor:
    """Each point to its cheapest cluster with room; the most decided points choose first."""
    N, K = cost_NK.shape
    order_NK = cost_NK.argsort(dim=1)
    best2 = cost_NK.gather(1, order_NK[:, :2])
    point_order = (best2[:, 1] - best2[:, 0]).argsort(descending=True, stable=True)
    labels = torch.full((N,), -1, dtype=torch.long)
    room = [size] * K
    preferences = order_NK[point_order].tolist()
    for point, prefs in zip(point_order.tolist(), preferences):
        for cluster in prefs:
            if room[cluster]:
                room[cluster] -= 1
                labels[point] = cluster
                break
    return labels


def _pairwise_exchange(cost_NK: torch.Tensor, labels_N: torch.Tensor, max_sweeps: int = 20) -> torch.Tensor:
    K = cost_NK.shape[1]
    labels_N = labels_N.clone()
    for _ in range(max_sweeps):
        swapped = 0
        for a in range(K):
            for b in range(a + 1, K):
                in_a = (labels_N == a).nonzero().squeeze(1)
                in_b = (labels_N == b).nonzero().squeeze(1)
                move_a = cost_NK[in_a, b] - cost_NK[in_a, a]  # cost change if a point of a goes to b
                move_b = cost_NK[in_b, a] - cost_NK[in_b, b]
                sa, ia = move_a.sort()
                sb, ib = move_b.sort()
                n = min(len(sa), len(sb))
                gain = sa[:n] + sb[:n]
                count = int((gain < -1e-9).sum())
                if count:
                    labels_N[in_a[ia[:count]]] = b
                    labels_N[in_b[ib[:count]]] = a
                    swapped += count
        if not swapped:
            break
    return labels_N


def balanced_assignment(cost_NK: torch.Tensor, prices_K: torch.Tensor | None = None,
                        sinkhorn_steps: int = 20, exchange_sweeps: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels with exactly N/K points per cluster and low total cost; returns (labels, prices)."""
    N, K = cost_NK.shape
    prices_K = torch.zeros(K, dtype=cost_NK.dtype) if prices_K is None else prices_K
    prices_K = _sinkhorn_prices(cost_NK, prices_K, sinkhorn_steps)
    labels = _greedy_fill(cost_NK + prices_K, N // K)
    return _pairwise_exchange(cost_NK, labels, exchange_sweeps), prices_K


def _kmeans_plus_plus(points_ND: torch.Tensor, norms_N: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    N = points_ND.shape[0]
    chosen = [int(torch.randint(N, (1,), generator=generator))]
    nearest_N = squared_distances(points_ND, points_ND[chosen], norms_N).squeeze(1)
    for _ in range(1, k):
        index = int(torch.multinomial(nearest_N + 1e-12, 1, generator=generator))
        chosen.append(index)
        nearest_N = torch.minimum(nearest_N, squared_distances(points_ND, points_ND[index:index + 1], norms_N).squeeze(1))
    return points_ND[chosen].clone()


def balanced_kmeans(points_ND: torch.Tensor, k: int, seed: int = 0, max_iterations: int = 100, restarts: int = 1) -> KMeansResult:
    """Balanced k-means (N divisible by k); the best of `restarts` k-means++ starts."""
    N = points_ND.shape[0]
    if N % k:
        raise ValueError(f"{N} points do not split into {k} equal clusters")
    points_ND = points_ND.float()
    norms_N = (points_ND * points_ND).sum(1)
    generator = torch.Generator().manual_seed(seed)
    best: KMeansResult | None = None
    for _ in range(restarts):
        centroids_KD = _kmeans_plus_plus(points_ND, norms_N, k, generator)
        labels_N = torch.full((N,), -1, dtype=torch.long)
        prices_K = None
        changed = N
        for iteration in range(1, max_iterations + 1):
            cost_NK = squared_distances(points_ND, centroids_KD, norms_N)
            # Cheap assignments while the centroids move; a full exchange once they settle.
            settled = changed < N // 1000
            new_labels, prices_K = balanced_assignment(cost_NK, prices_K, 20 if iteration == 1 else 4, 20 if settled else 1)
            changed = int((new_labels != labels_N).sum())
            labels_N = new_labels
            centroids_KD = torch.zeros_like(centroids_KD).index_add_(0, labels_N, points_ND) / (N // k)
            if settled and changed == 0:
                break
        objective = float(squared_distances(points_ND, centroids_KD, norms_N).gather(1, labels_N[:, None]).sum())
        if best is None or objective < best.objective:
            best = KMeansResult(labels_N, centroids_KD, objective, iteration)
    assert best is not None
    return best
