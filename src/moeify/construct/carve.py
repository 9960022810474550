"""Training-free carving: an MoE cut from each dense FFN by what calibration text activates.

CMoE (Pei et al. 2025) and beyond. Layer by layer, in order, on the calibration tokens as the layers
already carved below pass them on (so each layer sees, and corrects for, its predecessors' errors):
1. contribution of neuron j to token t: c_tj = |h_tj| * ||down_j||, with h = silu(x gate^T) * (x up^T);
2. shared block: the S0 neurons of highest mean c^2 (or CMoE's activation rate: how often a neuron
   is among a token's 10 largest |h|);
3. routed experts: balanced k-means (construct/kmeans.py) of the other neurons' contribution
   patterns over tokens (L2-normalised, randomly projected to `pattern_dims`);
4. router: ridge regression of each expert's summed contribution on x, centred per token, so the
   top-k logits are the experts the token activates most; then the logit temperature (which moves
   the mixing weights, not the choice) is picked on a grid to minimise the layer's reconstruction error;
5. optionally a selection bias that evens the calibration load (DeepSeek-V3's sign rule, run to a fixed point);
6. expert scales: per-expert output factors by least squares on the dense FFN output (folded into down_proj).
Training against the dense FFN outputs is a later stage of its own, for every method: `moeify train --layerwise`.
The result is a Partition holding, per layer, the experts, the shared block, router rows, selection
bias and expert scales; `build` turns it into the MoE through the one construction path (plan.py).
"""

import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
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
from moeify.construct.seeding import PARTITION_STREAM, layer_generator
from moeify.errors import MoeifyError
from moeify.modeling.router import RouterSpec, TopKRouter

TEMPERATURES = (0.03, 0.1, 0.3, 1.0, 3.0)  # logit std after the fit is 1; 0.03 gives near-uniform mixing weights
GRID_TOKENS = 4096  # tokens the temperature grid is judged on
CHUNK = 2048  # tokens per chunk where [T, E, D] would be large


@dataclass
class CarvedLayer:
    experts_ES: torch.Tensor  # dense neuron indices per routed expert (sorted rows)
    shared_S: torch.Tensor  # the shared block's neurons (sorted)
    router_ED: torch.Tensor
    bias_E: torch.Tensor  # selection bias (fp32)
    scales_E: torch.Tensor  # per-expert output factor, on top of the plan's scale
    stats: dict


def shared_size_for_ratio(ffn_size: int, num_experts: int, top_k: int, ratio: float) -> int:
    """The shared block S0 for which (S0 + k (F - S0) / E) / F = ratio, checked to divide."""
    if top_k == num_experts:
        raise MoeifyError("--activation-ratio needs --top-k below --num-experts (with k = E every neuron is active)")
    exact = ffn_size * (ratio * num_experts - top_k) / (num_experts - top_k)
    shared = round(exact)
    if abs(exact - shared) > 1e-6 or not 0 <= shared < ffn_size or (ffn_size - shared) % num_experts:
        sizes = range(1, ffn_size // num_experts + 1)  # expert size S; S0 = F - E S
        ratios = [1 - (num_experts - top_k) * s / ffn_size for s in sizes]
        near = sorted((r for r in ratios if 0 < r < 1 and (top_k * ffn_size / num_experts) <= r * ffn_size + 1e-9),
                      key=lambda r: abs(r - ratio))[:4]
        raise MoeifyError(f"--activation-ratio {ratio:g} with {num_experts} experts, top-{top_k} and FFN size {ffn_size} needs a "
                          f"shared block of {exact:.1f} neurons, not a whole number that leaves equal experts; "
                          f"choose one of {', '.join(f'{r:.4g}' for r in sorted(near))} or other --num-experts/--top-k")
    return shared


def activation_ratio(ffn_size: int, expert_size: int, shared_size: int, top_k: int) -> float:
    """Active FFN neurons per token (k routed experts plus the shared block) over the dense FFN's."""
    return (top_k * expert_size + shared_size) / ffn_size


@dataclass(frozen=True)
class RatioShape:
    num_experts: int
    top_k: int
    shared_size: int


def shape_at_ratio(ffn_size: int, ratio: float, blocks: int, with_shared: bool) -> RatioShape:
    """The FFN cut into `blocks` equal blocks, ratio x blocks of them active per token; with_shared
    keeps half the active blocks (rounded down) as one shared block, the rest routed."""
    active = ratio * blocks
    if ffn_size % blocks or abs(active - round(active)) > 1e-9 or not 0 < round(active) < blocks:
        raise MoeifyError(f"--activation-ratio {ratio:g} of --blocks {blocks} is {active:g} blocks and the FFN has {ffn_size} "
                          f"neurons: choose blocks that divide {ffn_size} and a ratio that is a whole number of them "
                          f"(e.g. --blocks 16 with 0.25, 0.5 or 0.75)")
    active = round(active)
    shared = active // 2 if with_shared else 0
    return RatioShape(blocks - shared, active - shared, shared * ffn_size // blocks)


def initial_weight(router: RouterSpec, num_experts: int, top_k: int) -> float:
    """A chosen expert's mixing weight when all logits are equal; its inverse is carve's scale, so
    that with near-equal logits each chosen expert adds its neurons' dense output unchanged."""
    if router.routing == "topk-softmax" or router.renormalize:
        return 1 / top_k
    return 1 / num_experts if router.routing == "softmax-topk" else 0.5


def routed_coefficients(router: TopKRouter, x_TD: torch.Tensor, factor_E: torch.Tensor) -> torch.Tensor:
    """[T, E]: each expert's factor on its output per token (mixing weight x scale, 0 when not chosen)."""
    routing = router(x_TD)
    return torch.zeros(x_TD.shape[0], router.num_experts).scatter(1, routing.indices_TK, routing.weights_TK) * factor_E


def relative_error(output_TD: torch.Tensor, target_TD: torch.Tensor) -> float:
    """||output - target||^2 / ||target||^2."""
    return float((output_TD - target_TD).pow(2).sum() / target_TD.pow(2).sum().clamp_min(1e-30))


def ridge_router_rows(x_TD: torch.Tensor, score_TE: torch.Tensor, ridge: float) -> torch.Tensor:
    """[E, D] fp32 rows W minimising ||x W^T - s||^2 + ridge mean(diag X^T X) ||W||^2, s the scores centred
    per token (so the top-k logits are the best-scored experts), scaled to unit logit std."""
    x = x_TD.double()
    gram_DD = x.T @ x
    centred_TE = (score_TE - score_TE.mean(dim=1, keepdim=True)).double()
    weight_ED = torch.linalg.solve(gram_DD + ridge * gram_DD.diagonal().mean() * torch.eye(len(gram_DD), dtype=torch.float64),
                                   x.T @ centred_TE).T
    return (weight_ED / (x @ weight_ED.T).std().clamp_min(1e-30)).float()


def expert_outputs(h_TF: torch.Tensor, down_DF: torch.Tensor, experts_ES: torch.Tensor) -> torch.Tensor:
    """[T, E, D]: each routed expert's full output per token."""
    h_TES = h_TF[:, experts_ES]
    return torch.einsum("tes,des->ted", h_TES, down_DF[:, experts_ES])


class LayerCarver:
    """Carves one layer from its FFN inputs X [T, D] and dense FFN weights; `carve()` runs steps 1-7."""

    def __init__(self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, x_TD: torch.Tensor,
                 options: ConstructionConfig, shared_size: int, scale: float, layer: int):
        self.gate, self.up, self.down, self.x_TD = gate.float(), up.float(), down.float(), x_TD.float()
        self.options, self.shared_size, self.scale, self.layer = options, shared_size, scale, layer
        self.E, self.k = options.num_experts, options.router.top_k
        self.h_TF = F.silu(self.x_TD @ self.gate.T) * (self.x_TD @ self.up.T)
        self.target_TD = self.h_TF @ self.down.T
        self.router = TopKRouter(self.x_TD.shape[1], self.E, self.k, spec=options.router.spec())
        self.shared_TD = torch.zeros_like(self.target_TD)  # the shared block's output, once it is chosen
        self.output_TD: torch.Tensor | None = None  # the carved FFN on the calibration tokens, after carve()

    @torch.no_grad()
    def carve(self) -> CarvedLayer:
        contribution_TF = self.h_TF.abs() * self.down.norm(dim=0)
        shared = self.choose_shared(contribution_TF)
        self.shared_TD = self.h_TF[:, shared] @ self.down[:, shared].T
        experts = self.cluster(contribution_TF, shared)
        stats: dict = {}
        if self.k == self.E:  # every expert is chosen: zero logits give equal weights, so the dense FFN exactly
            self.router.weight.data.zero_()
            scales = torch.ones(self.E)
        else:
            self.fit_router(contribution_TF, experts)
            stats["temperature"] = self.choose_temperature(experts)
            if self.options.carve.balance_bias:
                self.balance()
            scales = self.fit_scales(experts) if self.options.carve.expert_scales else torch.ones(self.E)
        self.output_TD = torch.cat([self._carved(part, experts, scales) for part in self._chunks(slice(None))])
        stats["error"] = relative_error(self.output_TD, self.target_TD)
        return CarvedLayer(experts, shared, self.router.weight.detach().clone(), self.router.selection_bias.clone(), scales, stats)

    def choose_shared(self, contribution_TF: torch.Tensor) -> torch.Tensor:
        if self.shared_size == 0:
            return torch.zeros(0, dtype=torch.long)
        if self.options.carve.shared_by == "rate":
            top_TK = self.h_TF.abs().topk(min(10, self.h_TF.shape[1]), dim=1).indices
            score_F = torch.zeros(self.h_TF.shape[1]).index_add_(0, top_TK.flatten(), torch.ones(top_TK.numel()))
            score_F = score_F + 1e-6 * contribution_TF.mean(0) / contribution_TF.mean().clamp_min(1e-30)  # ties by contribution
        else:
            score_F = contribution_TF.pow(2).mean(0)
        return score_F.topk(self.shared_size).indices.sort().values

    def cluster(self, contribution_TF: torch.Tensor, shared_S: torch.Tensor) -> torch.Tensor:
        routed = torch.ones(contribution_TF.shape[1], dtype=torch.bool)
        routed[shared_S] = False
        rest = routed.nonzero().squeeze(1)
        patterns = F.normalize(contribution_TF[:, rest].T, dim=1)
        dims = self.options.carve.pattern_dims
        if dims and patterns.shape[1] > dims:  # Johnson-Lindenstrauss: distances kept, k-means 8x cheaper
            generator = layer_generator(self.options.seed, self.layer, PARTITION_STREAM)
            patterns = F.normalize(patterns @ torch.randn(patterns.shape[1], dims, generator=generator), dim=1)
        labels = balanced_kmeans(patterns, self.E, seed=self.options.seed + self.layer).labels_N
        return rest[labels.argsort(stable=True).view(self.E, -1)].sort(dim=1).values

    def fit_router(self, contribution_TF: torch.Tensor, experts_ES: torch.Tensor) -> None:
        """Ridge regression x -> centred per-expert contribution; rows rescaled to unit logit std."""
        score_TE = torch.stack([contribution_TF[:, e].sum(1) for e in experts_ES], dim=1)
        self.router.weight.data.copy_(ridge_router_rows(self.x_TD, score_TE, self.options.carve.router_ridge))

    def _coefficients(self, x_TD: torch.Tensor, scales_E: torch.Tensor) -> torch.Tensor:
        return routed_coefficients(self.router, x_TD, self.scale * scales_E)

    def _chunks(self, tokens: slice):
        start, stop = tokens.start or 0, min(tokens.stop or self.x_TD.shape[0], self.x_TD.shape[0])
        return [slice(first, min(first + CHUNK, stop)) for first in range(start, stop, CHUNK)]

    def _carved(self, part: slice, experts_ES: torch.Tensor, scales_E: torch.Tensor,
                y_TED: torch.Tensor | None = None) -> torch.Tensor:
        """The carved FFN's output on tokens `part`: the shared block's plus each routed expert's
        output times its coefficient (mixing weight x scale, 0 when not chosen)."""
        y_TED = expert_outputs(self.h_TF[part], self.down, experts_ES) if y_TED is None else y_TED
        return self.shared_TD[part] + torch.einsum("te,ted->td", self._coefficients(self.x_TD[part], scales_E), y_TED)

    def errors(self, experts_ES: torch.Tensor, settings: list[tuple[torch.Tensor, torch.Tensor]],
               tokens: slice = slice(None)) -> list[float]:
        """Relative squared error of the carved output against the dense FFN's, for each setting
        (router weight, expert scales); the experts' outputs are computed once per chunk for all."""
        current = self.router.weight.data.clone()
        squared, total = [0.0] * len(settings), 0.0
        try:
            for part in self._chunks(tokens):
                y_TED = expert_outputs(self.h_TF[part], self.down, experts_ES)
                target_TD = self.target_TD[part]
                total += float(target_TD.pow(2).sum())
                for i, (weight_ED, scales_E) in enumerate(settings):
                    self.router.weight.data.copy_(weight_ED)
                    squared[i] += float((self._carved(part, experts_ES, scales_E, y_TED) - target_TD).pow(2).sum())
        finally:
            self.router.weight.data.copy_(current)
        return [value / max(total, 1e-30) for value in squared]

    def error(self, experts_ES: torch.Tensor, scales_E: torch.Tensor) -> float:
        return self.errors(experts_ES, [(self.router.weight.data, scales_E)])[0]

    def choose_temperature(self, experts_ES: torch.Tensor) -> float:
        fitted = self.router.weight.data.clone()
        tokens = slice(0, min(GRID_TOKENS, self.x_TD.shape[0]))
        errors = self.errors(experts_ES, [(fitted * t, torch.ones(self.E)) for t in TEMPERATURES], tokens)
        best = TEMPERATURES[errors.index(min(errors))]
        self.router.weight.data.copy_(fitted * best)
        return best

    @torch.no_grad()
    def balance(self, iterations: int = 200) -> None:
        """Selection bias nudged by sign(mean load - load) until the calibration load is even."""
        logits = self.router.gate_logits(self.x_TD)
        spec = self.router.spec
        scores = logits if spec.routing == "topk-softmax" else (logits.softmax(-1) if spec.routing == "softmax-topk" else logits.sigmoid())
        step = float(scores.std()) * 0.02
        bias = torch.zeros(self.E)
        for _ in range(iterations):
            load = torch.bincount((scores + bias).topk(self.k, dim=1).indices.flatten(), minlength=self.E).float()
            bias += step * torch.sign(load.mean() - load)
        self.router.selection_bias.copy_(bias)

    @torch.no_grad()
    def fit_scales(self, experts_ES: torch.Tensor) -> torch.Tensor:
        """Per-expert factors a_e minimising sum_t ||r_t - sum_e a_e m_te y_te||^2 (r: dense minus shared),
        with a small pull towards 1 so a rarely chosen expert keeps its own output."""
        gram_EE = torch.zeros(self.E, self.E, dtype=torch.float64)
        rhs_E = torch.zeros(self.E, dtype=torch.float64)
        for part in self._chunks(slice(None)):
            coef_TE = self._coefficients(self.x_TD[part], torch.ones(self.E))
            z_TED = expert_outputs(self.h_TF[part], self.down, experts_ES) * coef_TE[:, :, None]
            residual_TD = self.target_TD[part] - self.shared_TD[part]
            # batched per token, not einsum: these two contractions over (t, d) ran 6-10x slower as einsum on CPU
            gram_EE += torch.bmm(z_TED, z_TED.transpose(1, 2)).sum(0).double()
            rhs_E += torch.bmm(z_TED, residual_TD[:, :, None]).sum((0, 2)).double()
        pull = 1e-3 * gram_EE.diagonal().mean()
        return torch.linalg.solve(gram_EE + pull * torch.eye(self.E, dtype=torch.float64), rhs_E + pull).float()


class _Recorder(torch.nn.Module):
    """Stands in for a layer's MLP: keeps its input and adds nothing, so the layer returns its residual."""

    def __init__(self):
        super().__init__()
        self.inputs: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.inputs.append(x.detach())
        return torch.zeros_like(x)


@torch.no_grad()
def first_layer_inputs(model: torch.nn.Module, blocks_NS: torch.Tensor, batch_size: int) -> list[tuple[torch.Tensor, dict]]:
    """(hidden states, keyword arguments) that layer 0 receives, per batch of calibration blocks."""
    captured: list[tuple[torch.Tensor, dict]] = []

    def catch(module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append((hidden, {k: v for k, v in kwargs.items() if k != "hidden_states"}))
        raise calib.StopForward

    handle = model.model.layers[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for start in range(0, len(blocks_NS), batch_size):
            try:
                model(blocks_NS[start:start + batch_size], use_cache=False)
            except calib.StopForward:
                pass
    finally:
        handle.remove()
    return captured


class LayerWalk:
    """The dense model's layers in order on calibration blocks, each MLP replaced by what the caller makes of
    it: `mlp_inputs(L)` gives layer L's FFN inputs [T, D] (after its attention, on what the layers below
    passed on), `advance(output_TD)` adds the caller's FFN output to the residual for layer L + 1."""

    def __init__(self, model: torch.nn.Module, blocks_NS: torch.Tensor, batch_size: int = 8):
        self.model = model
        self.batches = first_layer_inputs(model, blocks_NS, batch_size)
        self.residuals: list[torch.Tensor] = []
        self.inputs: list[torch.Tensor] = []

    @torch.no_grad()
    def mlp_inputs(self, index: int) -> torch.Tensor:
        layer = self.model.model.layers[index]
        mlp, recorder = layer.mlp, _Recorder()
        layer.mlp = recorder
        try:
            self.residuals = [_first(layer(hidden, **kwargs)) for hidden, kwargs in self.batches]
        finally:
            layer.mlp = mlp
        self.inputs = recorder.inputs
        return torch.cat([x.reshape(-1, x.shape[-1]) for x in self.inputs])

    def advance(self, output_TD: torch.Tensor) -> None:
        outputs = output_TD.split([x.shape[:-1].numel() for x in self.inputs])
        self.batches = [(residual + y.view_as(x).to(residual.dtype), kwargs)
                        for residual, x, y, (_, kwargs) in zip(self.residuals, self.inputs, outputs, self.batches)]
        self.residuals, self.inputs = [], []


def _first(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


class Carve(ConstructionMethod):
    name = "carve"
    description = ("training-free carving from calibration activations: shared block by contribution, experts by balanced "
                   "k-means of activation patterns, least-squares router and expert scales (CMoE and beyond)")
    needs_calibration = True
    options = CALIBRATION_OPTIONS | {"shared_size", "activation_ratio", "shared_by", "pattern_dims", "router_ridge", "expert_scales",
                                     "balance_bias"}
    layerwise = False
    scale_from_options = True
    router_inits = ("fitted", "normal")

    def default_router_init(self) -> str:
        return "fitted"

    def shared_size(self, ffn_size: int, options: ConstructionConfig) -> int:
        if options.split.shared_size is not None:
            return options.split.shared_size
        E, k = options.num_experts, options.router.top_k
        if options.carve.activation_ratio is not None:
            return shared_size_for_ratio(ffn_size, E, k, options.carve.activation_ratio)
        return k * ffn_size // (E + k) if ffn_size % (E + k) == 0 else 0  # CMoE's layout: k shared blocks of the expert size

    def expert_size(self, ffn_size: int, options: ConstructionConfig) -> int:
        return (ffn_size - self.shared_size(ffn_size, options)) // options.num_experts

    def check(self, ffn_size: int, options: ConstructionConfig) -> None:
        if options.split.shared_size is not None and options.carve.activation_ratio is not None:
            raise MoeifyError("give --shared-size or --activation-ratio, not both (the ratio decides the shared size)")
        if options.router.gate != "linear":
            raise MoeifyError("--method carve fits a linear router; drop --gate mlp")
        if options.carve.balance_bias and options.router.routing != "sigmoid-topk":
            raise MoeifyError("--balance-bias needs a format that holds a selection bias: add --routing sigmoid-topk "
                              "(the DeepSeek-V3 format), or drop --balance-bias")
        check_equal_split(ffn_size, options, self.shared_size(ffn_size, options))

    def default_scale(self, ffn_size: int, options: ConstructionConfig, top_k: int, router: RouterSpec) -> float:
        return 1 / initial_weight(router, options.num_experts, top_k)

    def make_partition(self, dense: DenseCheckpoint, options: ConstructionConfig, progress: bool = True) -> Partition:
        data = calib.load_calibration(options.data.calibration, dense.path, options.data.calibration_tokens,
                                      options.data.calibration_seq_len)
        needed = 2 * dense.hidden_size
        if data.tokens < needed:
            raise MoeifyError(f"calibration data {options.data.calibration!r} gives {data.tokens} tokens; --method carve needs at "
                              f"least {needed} (twice the hidden size, for the router fit): give more text or a larger "
                              f"--calibration-tokens")
        F_, shared_size = dense.ffn_size, self.shared_size(dense.ffn_size, options)
        scale = options.scale if options.scale is not None else self.default_scale(F_, options, options.router.top_k, options.router.spec())
        model = calib.load_dense_model(dense.path)
        walk = LayerWalk(model, data.blocks_NS)
        layers: list[CarvedLayer] = []
        bar = tqdm(model.model.layers, desc="carve", unit="layer", disable=not progress, file=sys.stderr)
        with torch.no_grad():
            for index, layer in enumerate(bar):
                mlp = layer.mlp
                carver = LayerCarver(mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight, walk.mlp_inputs(index), options,
                                     shared_size, scale, index)
                carved = carver.carve()
                layers.append(carved)
                bar.set_postfix(error=f"{carved.stats['error']:.3f}")
                walk.advance(carver.output_TD)  # what the next layer receives
                del carver
        info = {"calibration_tokens": data.tokens, "scale": scale,
                "reconstruction_error": [round(c.stats["error"], 6) for c in layers],
                "temperature": [c.stats.get("temperature") for c in layers]}
        return Partition(self.name, options.num_experts, self.expert_size(F_, options), shared_size,
                         [c.experts_ES for c in layers], [c.shared_S for c in layers], model_fingerprint(dense),
                         method_options(options), info, router=[c.router_ED for c in layers],
                         selection_bias=[c.bias_E for c in layers], expert_scales=[c.scales_E for c in layers])
