"""Balanced k-means: every cluster gets exactly N/K points (LLaMA-MoE's Independent-Clustering).

Lloyd iterations whose assignment step solves the size-constrained transport problem
(minimise the summed squared distance with exactly N/K points per cluster) in three stages:
1. entropic optimal transport (log-domain Sinkhorn, temperature annealed) gives per-cluster
   prices p_K, the duals of the size constraints;
2. each point takes the cheapest cluster under cost + price, filled greedily in order of
   decisiveness so that no cluster exceeds N/K;
3. pairwise exchange: for every pair of clusters, swap points while a swap lowers the cost.
Prices carry over between Lloyd iterations, so later assignments take few Sinkhorn steps.
Once Lloyd converges, swaps that account for the centroids moving (which Lloyd's fixed-centroid
assignment cannot see) and further Lloyd iterations alternate; this finds markedly lower
objectives than restarting from other seeds (BENCHMARKS.md).
"""

import math
from dataclasses import dataclass

import torch


@dataclass
class KMeansResult:
    labels_N: torch.Tensor  # cluster of each point
    centroids_KD: torch.Tensor
    objective: float  # sum of squared distances to the assigned centroid
    iterations: int


def squared_distances(points_ND: torch.Tensor, centroids_KD: torch.Tensor, norms_N: torch.Tensor | None = None) -> torch.Tensor:
    norms_N = (points_ND * points_ND).sum(1) if norms_N is None else norms_N
    return (norms_N[:, None] - points_ND @ (2 * centroids_KD).T + (centroids_KD * centroids_KD).sum(1)).clamp_min_(0)


def _logsumexp(x: torch.Tensor, dim: int) -> torch.Tensor:
    """logsumexp with terms below e^-60 of the maximum dropped: the same value in fp32, and several
    times faster on CPU than torch.logsumexp, whose exp is slow on very negative arguments."""
    peak = x.amax(dim=dim, keepdim=True)
    return (x - peak).clamp_min_(-60).exp_().sum(dim=dim).log_() + peak.squeeze(dim)


def _sinkhorn_prices(cost_NK: torch.Tensor, prices_K: torch.Tensor, steps: int) -> torch.Tensor:
    N, K = cost_NK.shape
    spread = float(cost_NK.std()) + 1e-12
    for temperature in torch.logspace(-1, -3, steps).tolist():
        tau = temperature * spread
        scaled_KN = -cost_NK.T / tau
        for _ in range(3):
            logits_KN = scaled_KN - prices_K[:, None] / tau
            row_N = _logsumexp(logits_KN, dim=0)
            # each cluster receives N/K points: log sum_i exp(-(c_ik + p_k)/tau - row_i) = log(N/K) - log N
            prices_K = prices_K + tau * (_logsumexp(logits_KN - row_N, dim=1) + math.log(K))
    return prices_K - prices_K.mean()


def _greedy_fill(cost_NK: torch.Tensor, size: int) -> torch.Tensor:
    """Each point to its cheapest cluster; where a cluster overflows, its most decided points stay
    (largest gap between best and second-best cost) and the others, most decided first, take
    their cheapest cluster with room."""
    N, K = cost_NK.shape
    best2 = cost_NK.topk(2, dim=1, largest=False)
    labels = best2.indices[:, 0].clone()
    order = (best2.values[:, 1] - best2.values[:, 0]).argsort(descending=True, stable=True)
    ordered_labels = labels[order]
    grouped = ordered_labels.argsort(stable=True)  # by cluster, most decided first within each
    starts = torch.bincount(labels, minlength=K).cumsum(0) - torch.bincount(labels, minlength=K)
    rank = torch.empty(N, dtype=torch.long)
    rank[grouped] = torch.arange(N) - starts[ordered_labels[grouped]]
    evicted = order[rank >= size]
    labels[evicted] = -1
    room = (size - torch.bincount(labels[labels >= 0], minlength=K)).tolist()
    for point, prefs in zip(evicted.tolist(), cost_NK[evicted].argsort(dim=1).tolist()):
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
    """Greedy k-means++ (as scikit-learn): each new centre is the best of 2 + log(k) candidates drawn
    proportionally to the squared distance to the nearest centre so far."""
    N = points_ND.shape[0]
    trials = 2 + int(math.log(k))
    chosen = [int(torch.randint(N, (1,), generator=generator))]
    nearest_N = squared_distances(points_ND, points_ND[chosen], norms_N).squeeze(1)
    for _ in range(1, k):
        candidates = torch.multinomial(nearest_N + 1e-12, trials, replacement=True, generator=generator)
        distances_NC = torch.minimum(nearest_N[:, None], squared_distances(points_ND, points_ND[candidates], norms_N))
        best = int(distances_NC.sum(0).argmin())
        chosen.append(int(candidates[best]))
        nearest_N = distances_NC[:, best]
    return points_ND[chosen].clone()


@dataclass
class _Lloyd:
    centroids_KD: torch.Tensor
    labels_N: torch.Tensor
    prices_K: torch.Tensor | None = None
    changed: int = -1
    iterations: int = 0
    converged: bool = False

    def run(self, points_ND: torch.Tensor, norms_N: torch.Tensor, iterations: int) -> "_Lloyd":
        N, k = points_ND.shape[0], self.centroids_KD.shape[0]
        for _ in range(iterations):
            if self.converged:
                break
            cost_NK = squared_distances(points_ND, self.centroids_KD, norms_N)
            # Cheap assignments while the centroids move; a full exchange once they settle.
            settled = 0 <= self.changed < N // 1000
            labels, self.prices_K = balanced_assignment(cost_NK, self.prices_K, 20 if self.prices_K is None else 4,
                                                        20 if settled else 1)
            self.changed = int((labels != self.labels_N).sum())
            self.labels_N = labels
            self.centroids_KD = torch.zeros_like(self.centroids_KD).index_add_(0, labels, points_ND) / (N // k)
            self.iterations += 1
            self.converged = settled and self.changed == 0
        return self

    def objective(self, points_ND: torch.Tensor, norms_N: torch.Tensor) -> float:
        return float(squared_distances(points_ND, self.centroids_KD, norms_N).gather(1, self.labels_N[:, None]).sum())


def _round_robin(k: int) -> list[list[tuple[int, int]]]:
    """Every pair of k clusters once, in rounds of disjoint pairs (the circle method)."""
    players = list(range(k)) + ([-1] if k % 2 else [])
    rounds = []
    for _ in range(len(players) - 1):
        half = len(players) // 2
        rounds.append([(min(p, q), max(p, q)) for p, q in zip(players[:half], reversed(players[half:])) if p >= 0 and q >= 0])
        players = [players[0], players[-1], *players[1:-1]]
    return rounds


def _swap_refinement(points_ND: torch.Tensor, norms_N: torch.Tensor, state: _Lloyd, candidates: int = 48,
                     max_sweeps: int = 2) -> bool:
    """Swaps that account for the centroids moving (Hartigan-style), which Lloyd's fixed-centroid
    assignment cannot see. Swapping x_i (cluster a) with x_j (cluster b), both of size n, changes the
    objective by exactly  2 (c_a - c_b) . (x_i - x_j) - 2 |x_i - x_j|^2 / n.  For each pair of
    clusters the most promising candidates are scored, the improving swaps taken greedily (each point
    once), and the batch kept if it lowers the pair's objective, which for equal sizes is
    constant - n (|c_a|^2 + |c_b|^2); else only the single best swap. Returns whether any was made."""
    labels, centroids = state.labels_N, state.centroids_KD
    k = centroids.shape[0]
    n = points_ND.shape[0] // k
    improved = False
    for _ in range(max_sweeps):
        swaps = 0
        for pairs in _round_robin(k):  # disjoint pairs: their swaps do not interact, one cost update per round
            cost_NK = squared_distances(points_ND, centroids, norms_N)
            for a, b in pairs:
                in_a = (labels == a).nonzero().squeeze(1)
                in_b = (labels == b).nonzero().squeeze(1)
                top_a = in_a[(cost_NK[in_a, b] - cost_NK[in_a, a]).topk(min(candidates, n), largest=False).indices]
                top_b = in_b[(cost_NK[in_b, a] - cost_NK[in_b, b]).topk(min(candidates, n), largest=False).indices]
                lloyd = (cost_NK[top_a, b] - cost_NK[top_a, a])[:, None] + (cost_NK[top_b, a] - cost_NK[top_b, b])[None, :]
                gap = norms_N[top_a][:, None] + norms_N[top_b][None, :] - 2 * points_ND[top_a] @ points_ND[top_b].T
                change = (lloyd - 2 * gap / n).flatten()
                order = change.argsort()
                chosen, used_a, used_b = [], set(), set()
                for flat in order[: int((change < -1e-7).sum())].tolist():
                    i, j = flat // len(top_b), flat % len(top_b)
                    if i not in used_a and j not in used_b:
                        used_a.add(i), used_b.add(j), chosen.append((i, j))
                if not chosen:
                    continue
                before = float(centroids[a].dot(centroids[a]) + centroids[b].dot(centroids[b]))
                for batch in (chosen, chosen[:1]):
                    i, j = top_a[[c[0] for c in batch]], top_b[[c[1] for c in batch]]
                    shift = (points_ND[j].sum(0) - points_ND[i].sum(0)) / n
                    new_a, new_b = centroids[a] + shift, centroids[b] - shift
                    if float(new_a.dot(new_a) + new_b.dot(new_b)) > before:
                        labels[i], labels[j] = b, a
                        centroids[a], centroids[b] = new_a, new_b
                        swaps += len(batch)
                        break
        improved |= swaps > 0
        if not swaps:
            break
    return improved


def balanced_kmeans(points_ND: torch.Tensor, k: int, seed: int = 0, max_iterations: int = 100, restarts: int = 1,
                    probe_iterations: int = 6) -> KMeansResult:
    """Balanced k-means (N divisible by k). With restarts > 1, each k-means++ start runs
    `probe_iterations` Lloyd steps and only the best continues to convergence."""
    N = points_ND.shape[0]
    if N % k:
        raise ValueError(f"{N} points do not split into {k} equal clusters")
    points_ND = points_ND.float()
    norms_N = (points_ND * points_ND).sum(1)
    generator = torch.Generator().manual_seed(seed)
    runs = [_Lloyd(_kmeans_plus_plus(points_ND, norms_N, k, generator), torch.full((N,), -1, dtype=torch.long))
            for _ in range(restarts)]
    if restarts > 1:
        best = min((run.run(points_ND, norms_N, probe_iterations) for run in runs), key=lambda r: r.objective(points_ND, norms_N))
    else:
        best = runs[0]
    best.run(points_ND, norms_N, max_iterations - best.iterations)
    for _ in range(3):  # alternate exact swaps and Lloyd until neither improves
        if not _swap_refinement(points_ND, norms_N, best):
            break
        best.converged, best.changed = False, 0
        best.run(points_ND, norms_N, max_iterations)
    return KMeansResult(best.labels_N, best.centroids_KD, best.objective(points_ND, norms_N), best.iterations)
