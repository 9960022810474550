"""Least-squares refit of a constructed MoE against its dense FFNs (`build --refit`); training-free.

Layer by layer, on the calibration tokens as the layers already refitted below pass them on (each layer
sees, and corrects for, its predecessors' errors), with y(x) the dense FFN's output:
1. router (linear gates): ridge regression on x of each expert's use to the token, the projection of the
   expert's output on y(x) minus the shared block's output, centred per token; rows scaled to unit logit
   std, then the temperature (which sets the mixing weights) picked on a grid: the one whose down projections
   (step 2) solved on half the tokens reconstruct the other half best;
2. down projections: with the routing fixed the block is linear in every down projection,
   block(x_t) = sum_e w_te D_e h_e(x_t) + D_s h_s(x_t), h the SwiGLU activations. One ridge least squares
   over [D_1 ... D_E D_s] (pulled towards the constructed weights, so a rarely chosen expert keeps its own)
   minimises sum_t ||block(x_t) - y(x_t)||^2. It absorbs the output scale, so a split with k = E becomes the
   dense FFN exactly.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moeify.construct import calibration as calib
from moeify.construct.carve import LayerWalk, relative_error, ridge_router_rows
from moeify.construct.config import ConstructionConfig
from moeify.errors import MoeifyError
from moeify.modeling.canonical import FFNWeights, MoELayer
from moeify.modeling.router import TopKRouter

TEMPERATURES = (0.03, 0.1, 0.3, 1.0)  # logit std after the fit is 1
ROUTER_RIDGE = 1e-2  # relative to the mean diagonal of X^T X
DOWN_RIDGE = 1e-3  # relative to the mean diagonal of the activations' Gram matrix
CHUNK = 2048  # tokens per fp32 product in the Gram sums


def check_refit(config: ConstructionConfig, ffn_size: int, expert_size: int, shared_size: int, online: bool) -> None:
    """One line for a refit that cannot run: no calibration text, online upcycling, an MLP gate, or experts
    that repeat neurons (upcycling: each copy would get a down projection of its own to solve for)."""
    if not config.refit:
        return
    if online:
        raise MoeifyError("--refit runs the dense model on calibration text, which online upcycling does not do on every rank: "
                          "`moeify build --refit` the MoE once and train the built checkpoint")
    if config.data.calibration is None:
        raise MoeifyError("--refit needs calibration text: add --calibration embedded (or DOMAIN=PATH,...)")
    if config.router.gate != "linear":
        raise MoeifyError("--refit fits a linear router; drop --gate mlp or --refit")
    if config.num_experts * expert_size + shared_size > ffn_size:
        raise MoeifyError(f"--refit solves one down projection column per dense neuron; --method {config.method} gives "
                          f"{config.num_experts} experts of {expert_size} neurons (copies of the FFN's {ffn_size}): drop --refit "
                          f"(an upcycled MoE already starts at the dense model)")


@dataclass
class RefitStats:
    error_before: list[float]
    error_after: list[float]
    temperatures: list[float | None]


class Refitter:
    """Refits each layer in order; `layer(index, moe_layer)` must be called for 0, 1, 2, ... in turn."""

    def __init__(self, dense_path, config: ConstructionConfig):
        data = calib.load_calibration(config.data.calibration, dense_path, config.data.calibration_tokens,
                                      config.data.calibration_seq_len)
        self.model = calib.load_dense_model(dense_path)
        self.walk = LayerWalk(self.model, data.blocks_NS)
        self.spec, self.top_k = config.router.spec(), config.router.top_k
        self.tokens = data.tokens
        self.stats = RefitStats([], [], [])

    @torch.no_grad()
    def layer(self, index: int, moe: MoELayer) -> MoELayer:
        x_TD = self.walk.mlp_inputs(index).float()
        target_TD = self.model.model.layers[index].mlp(x_TD).float()
        refitted, before, output_TD, temperature = refit_layer(moe, x_TD, target_TD, self.spec, self.top_k)
        self.stats.error_before.append(before)
        self.stats.error_after.append(relative_error(output_TD, target_TD))
        self.stats.temperatures.append(temperature)
        self.walk.advance(output_TD)
        return refitted

    def summary(self) -> str:
        before, after = self.stats.error_before, self.stats.error_after
        chosen = [t for t in self.stats.temperatures if t is not None]
        counts = ", ".join(f"{t:g} x{chosen.count(t)}" for t in TEMPERATURES if t in chosen)
        return (f"refit on {self.tokens} calibration tokens: each layer's relative squared error against the dense FFN, mean "
                f"{sum(before) / len(before):.4f} -> {sum(after) / len(after):.4f} (worst {max(before):.4f} -> {max(after):.4f})"
                + (f"; router temperatures {counts}" if counts else ""))


@torch.no_grad()
def refit_layer(moe: MoELayer, x_TD: torch.Tensor, target_TD: torch.Tensor, spec, top_k: int
                ) -> tuple[MoELayer, float, torch.Tensor, float | None]:
    """(refitted layer, relative error before, its output on x_TD after, the router's temperature or None)."""
    dtype = moe.router.dtype
    experts = [FFNWeights(e.gate.float(), e.up.float(), e.down.float()) for e in moe.experts]
    shared = FFNWeights(moe.shared.gate.float(), moe.shared.up.float(), moe.shared.down.float()) if moe.shared is not None else None
    blocks = experts + ([shared] if shared is not None else [])
    layout = Layout([ffn.down.shape[1] for ffn in experts], shared.down.shape[1] if shared is not None else 0)
    gate, up = torch.cat([ffn.gate for ffn in blocks]), torch.cat([ffn.up for ffn in blocks])
    activations_TN = F.silu(x_TD @ gate.T) * (x_TD @ up.T)  # every neuron's activation, like carve's h_TF
    down_DN = torch.cat([ffn.down for ffn in blocks], dim=1)
    router = TopKRouter(x_TD.shape[1], len(experts), top_k, spec=spec).requires_grad_(False)
    router.weight.copy_(moe.router.float())
    if moe.selection_bias is not None:
        router.selection_bias.copy_(moe.selection_bias.float())
    before = relative_error(layout.features(router, x_TD, activations_TN) @ down_DN.T, target_TD)
    temperature = None
    if top_k == len(experts):  # every expert is chosen: zero logits give equal weights, which the downs then absorb
        router.weight.zero_()
    else:
        weight_ED = fitted_router(layout, activations_TN, down_DN, x_TD, target_TD)
        temperature = choose_temperature(router, weight_ED, layout, activations_TN, down_DN, x_TD, target_TD)
        router.weight.copy_(weight_ED * temperature)
    features_TN = layout.features(router, x_TD, activations_TN)
    down_DN = solve_downs(features_TN, target_TD, down_DN)
    output_TD = features_TN @ down_DN.T
    downs = down_DN.to(dtype).split(layout.sizes, dim=1)
    cast = [FFNWeights(e.gate.to(dtype), e.up.to(dtype), down.contiguous()) for e, down in zip(experts, downs)]
    refitted_shared = FFNWeights(moe.shared.gate, moe.shared.up, downs[-1].contiguous()) if moe.shared is not None else None
    refitted = MoELayer(router.weight.to(dtype).clone(), cast, moe.router_mlp_out, moe.selection_bias, refitted_shared, moe.shared_gate)
    return refitted, before, output_TD, temperature


@dataclass(frozen=True)
class Layout:
    """Where each routed expert's neurons, then the shared block's, sit along the concatenated neuron axis N."""

    expert_sizes: list[int]
    shared_size: int

    @property
    def sizes(self) -> list[int]:
        return self.expert_sizes + ([self.shared_size] if self.shared_size else [])

    def expert_of_neuron(self) -> torch.Tensor:
        """[N]: the routed expert of each neuron (E for the shared block's)."""
        return torch.repeat_interleave(torch.arange(len(self.sizes)), torch.tensor(self.sizes))

    def features(self, router: TopKRouter, x_TD: torch.Tensor, activations_TN: torch.Tensor) -> torch.Tensor:
        """[T, N]: what the down projections multiply, each expert's activations times its mixing weight
        (0 when the expert is not chosen; 1 for the shared block)."""
        routing = router(x_TD)
        coefficients_TE = torch.zeros(x_TD.shape[0], router.num_experts + 1).scatter(1, routing.indices_TK, routing.weights_TK.float())
        coefficients_TE[:, -1] = 1.0
        return activations_TN * coefficients_TE[:, self.expert_of_neuron()]


def fitted_router(layout: Layout, activations_TN: torch.Tensor, down_DN: torch.Tensor, x_TD: torch.Tensor,
                  target_TD: torch.Tensor) -> torch.Tensor:
    """[E, D] router rows (unit logit std): ridge regression on x of each expert's use to each token, the
    projection of its output on what the shared block leaves of the dense output, centred per token."""
    E = len(layout.expert_sizes)
    expert_N = layout.expert_of_neuron()
    shared_N = expert_N == E
    residual_TD = target_TD - activations_TN[:, shared_N] @ down_DN[:, shared_N].T
    # <down_e h_e, r> summed neuron by neuron: (h * (r down)) over each expert's neurons
    use_TE = torch.zeros(x_TD.shape[0], E + 1).index_add_(1, expert_N, activations_TN * (residual_TD @ down_DN))[:, :E]
    return ridge_router_rows(x_TD, use_TE / residual_TD.norm(dim=1, keepdim=True).clamp_min(1e-12), ROUTER_RIDGE)


def choose_temperature(router: TopKRouter, weight_ED: torch.Tensor, layout: Layout, activations_TN: torch.Tensor,
                       down_DN: torch.Tensor, x_TD: torch.Tensor, target_TD: torch.Tensor) -> float:
    """The logit temperature whose down projections, solved on the first half of the tokens, reconstruct the
    second half best (judged after the solve: before it, near-uniform weights always look best)."""
    half = x_TD.shape[0] // 2
    errors = []
    for temperature in TEMPERATURES:
        router.weight.copy_(weight_ED * temperature)
        features_TN = layout.features(router, x_TD, activations_TN)
        solved_DN = solve_downs(features_TN[:half], target_TD[:half], down_DN)
        errors.append(float((features_TN[half:] @ solved_DN.T - target_TD[half:]).pow(2).sum()))
    return TEMPERATURES[errors.index(min(errors))]


def solve_downs(features_TN: torch.Tensor, target_TD: torch.Tensor, current_DN: torch.Tensor) -> torch.Tensor:
    """[D, N]: argmin ||features down^T - target||^2 + ridge ||down - current||^2, every down projection at once."""
    gram_NN = torch.zeros(features_TN.shape[1], features_TN.shape[1], dtype=torch.float64)
    rhs_ND = torch.zeros(features_TN.shape[1], target_TD.shape[1], dtype=torch.float64)
    for start in range(0, features_TN.shape[0], CHUNK):  # fp32 products, fp64 sums
        part = slice(start, start + CHUNK)
        gram_NN += (features_TN[part].T @ features_TN[part]).double()
        rhs_ND += (features_TN[part].T @ target_TD[part]).double()
    ridge = DOWN_RIDGE * gram_NN.diagonal().mean().clamp_min(1e-30)
    eye = torch.eye(len(gram_NN), dtype=torch.float64)
    return torch.linalg.solve(gram_NN + ridge * eye, rhs_ND + ridge * current_DN.T.double()).T.float()
