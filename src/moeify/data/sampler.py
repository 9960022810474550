"""Domain-weighted sampling of packed blocks: static weights, or dynamic (Sheared-LLaMA) ones.

The sampler draws the *global* sequence of (domain, block) pairs from one seeded generator; in a
distributed job every rank draws the same sequence and keeps its own slice, so the global batch
does not depend on the number of ranks.
"""

import math
from dataclasses import dataclass

import numpy as np

from moeify.errors import MoeifyError

# SlimPajama domain mixtures (LLaMA-MoE §2; Sheared-LLaMA's is what the released models used).
PRESETS: dict[str, dict[str, float]] = {
    "llama": {"commoncrawl": 0.67, "c4": 0.15, "github": 0.045, "wikipedia": 0.045, "book": 0.045, "arxiv": 0.025, "stackexchange": 0.02},
    "sheared-llama": {"commoncrawl": 0.361, "c4": 0.492, "github": 0.008, "wikipedia": 0.031, "book": 0.091, "arxiv": 0.007, "stackexchange": 0.01},
}


def static_weights(spec: str, block_counts: dict[str, int]) -> dict[str, float]:
    """uniform | proportional | a preset name | explicit "a=0.5,b=0.5" (normalised)."""
    domains = sorted(block_counts)
    if spec == "uniform":
        raw = {d: 1.0 for d in domains}
    elif spec == "proportional":
        raw = {d: float(block_counts[d]) for d in domains}
    elif spec in PRESETS:
        raw = PRESETS[spec]
        if set(raw) != set(domains):
            raise MoeifyError(
                f"preset {spec!r} needs the domains {', '.join(sorted(raw))}, but the data has {', '.join(domains)}; "
                "name your sources after SlimPajama's domains or give explicit weights"
            )
    else:
        raw = {}
        for part in spec.split(","):
            domain, sep, value = part.partition("=")
            try:
                raw[domain.strip()] = float(value)
            except ValueError:
                sep = ""
            if not sep:
                raise MoeifyError(f"domain weights {spec!r}: expected uniform, proportional, {', '.join(PRESETS)} or a=0.5,b=0.5")
        if set(raw) != set(domains) or not all(math.isfinite(w) and w >= 0 for w in raw.values()) or sum(raw.values()) <= 0:
            raise MoeifyError(f"domain weights {spec!r} must give a non-negative weight to each of: {', '.join(domains)}")
    total = sum(raw.values())
    return {d: raw[d] / total for d in domains}


@dataclass
class DynamicWeights:
    """Sheared-LLaMA dynamic batch loading.

    rule "softmax":     w <- softmax(log w + eta * (L - R))
    rule "clipped-exp": w <- normalise(w * exp(max(0, L - R)))
    then light smoothing toward uniform: w <- (1 - c) w + c / K.
    L: per-domain held-out loss now; R: the reference loss for that domain.
    """

    reference: dict[str, float]
    rule: str = "softmax"
    eta: float = 1.0
    smoothing: float = 1e-4

    def __post_init__(self):
        if self.rule not in ("softmax", "clipped-exp"):
            raise MoeifyError(f"dynamic rule {self.rule!r} is unknown; choose softmax or clipped-exp")

    def update(self, weights: dict[str, float], losses: dict[str, float]) -> dict[str, float]:
        domains = sorted(weights)
        excess = np.array([losses[d] - self.reference[d] for d in domains])
        w = np.array([weights[d] for d in domains])
        if self.rule == "softmax":
            logits = np.log(np.maximum(w, 1e-30)) + self.eta * excess
            w = np.exp(logits - logits.max())
        else:
            w = w * np.exp(np.maximum(0.0, excess))
        w = w / w.sum()
        w = (1 - self.smoothing) * w + self.smoothing / len(domains)
        return {d: float(v) for d, v in zip(domains, w)}


class DomainSampler:
    """Draws (domain, block index) pairs: a domain by weight, then that domain's next block.

    Each domain walks through a seeded permutation of its blocks, a new one per epoch.
    """

    def __init__(self, block_counts: dict[str, int], weights: dict[str, float], seed: int):
        self.domains = sorted(block_counts)
        self.block_counts = block_counts
        self.seed = seed
        self.weights = dict(weights)
        self.rng = np.random.default_rng([seed, 0x5A])
        self.position = {d: 0 for d in self.domains}
        self._orders: dict[tuple[str, int], np.ndarray] = {}

    def set_weights(self, weights: dict[str, float]) -> None:
        assert math.isclose(sum(weights.values()), 1.0, rel_tol=1e-6), weights
        self.weights = dict(weights)

    def _order(self, domain: str, epoch: int) -> np.ndarray:
        key = (domain, epoch)
        if key not in self._orders:
            self._orders = {k: v for k, v in self._orders.items() if k[0] != domain}
            rng = np.random.default_rng([self.seed, self.domains.index(domain), epoch])
            self._orders[key] = rng.permutation(self.block_counts[domain])
        return self._orders[key]

    def draw(self, count: int) -> list[tuple[str, int]]:
        p = np.array([self.weights[d] for d in self.domains])
        picks = self.rng.choice(len(self.domains), size=count, p=p / p.sum())
        out = []
        for i in picks:
            domain = self.domains[i]
            epoch, offset = divmod(self.position[domain], self.block_counts[domain])
            out.append((domain, int(self._order(domain, epoch)[offset])))
            self.position[domain] += 1
        return out

    def state_dict(self) -> dict:
        return {"rng": self.rng.bit_generator.state, "position": dict(self.position), "weights": dict(self.weights)}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]
        self.position = dict(state["position"])
        self.weights = dict(state["weights"])
