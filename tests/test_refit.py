"""build --refit (construct/refit.py): the least-squares refit of routers and down projections against the dense FFNs."""

import json

import pytest
import torch
import torch.nn.functional as F

from moeify.build import build, build_config
from moeify.construct.refit import DOWN_RIDGE, Layout, refit_layer, solve_downs
from moeify.modeling.canonical import FFNWeights, MoELayer
from moeify.modeling.router import RouterSpec, TopKRouter
from tests.conftest import logits_of

CALIBRATION = dict(calibration="embedded", calibration_tokens=2048, calibration_seq_len=64)


def _ffn(hidden: int, size: int, generator: torch.Generator) -> FFNWeights:
    return FFNWeights(*(torch.randn(shape, generator=generator) * 0.3 for shape in ((size, hidden), (size, hidden), (hidden, size))))


def test_with_every_expert_chosen_a_mis_scaled_split_becomes_the_dense_model(tiny_models, tmp_path):
    # k = E and a split covering every neuron: the block is linear in the down projections with the dense
    # FFN's own activations as features, so least squares recovers the dense down projection whatever the scale.
    dense = tiny_models["llama"]
    ids = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(0))
    settings = dict(model=str(dense), method="random-split", num_experts=4, top_k=4, scale=3.0)
    plain = build(build_config(out=tmp_path / "plain", **settings), progress=False)
    refitted = build(build_config(out=tmp_path / "refit", refit=True, **settings, **CALIBRATION), progress=False)
    reference = logits_of(dense, ids)
    plain_error = (logits_of(plain, ids) - reference).abs().max()
    refit_error = (logits_of(refitted, ids) - reference).abs().max()
    assert refit_error < 1e-4 and plain_error > 100 * refit_error, (plain_error, refit_error)  # each FFN's output x 3 before
    manifest = json.loads((refitted / "moeify.json").read_text())
    assert manifest["refit"] == {"calibration": "embedded", "calibration_tokens": 2048, "calibration_seq_len": 64}


def test_the_solved_down_projections_zero_the_gradient_of_the_ridge_objective():
    # argmin ||phi W^T - y||^2 + r ||W - W0||^2 has gradient phi^T (phi W^T - y) + r (W - W0)^T = 0 there.
    g = torch.Generator().manual_seed(1)
    hidden, size, E = 16, 8, 4
    layout = Layout([size] * E, size)
    router = TopKRouter(hidden, E, 2, spec=RouterSpec()).requires_grad_(False)
    router.weight.normal_(generator=g)
    x_TD, target_TD = torch.randn(3000, hidden, generator=g), torch.randn(3000, hidden, generator=g)
    activations_TN = torch.randn(3000, (E + 1) * size, generator=g)
    features_TN = layout.features(router, x_TD, activations_TN)
    chosen_TE = torch.zeros(3000, E, dtype=torch.bool).scatter(1, router(x_TD).indices_TK, True)
    assert torch.equal(features_TN[:, :E * size] != 0, chosen_TE.repeat_interleave(size, dim=1))  # unchosen experts: 0
    assert torch.equal(features_TN[:, E * size:], activations_TN[:, E * size:])  # the shared block: always, weight 1
    current_DN = torch.randn(hidden, (E + 1) * size, generator=g)
    solved_DN = solve_downs(features_TN, target_TD, current_DN).double()
    phi, y = features_TN.double(), target_TD.double()
    ridge = DOWN_RIDGE * (phi.T @ phi).diagonal().mean()
    gradient = phi.T @ (phi @ solved_DN.T - y) + ridge * (solved_DN - current_DN.double()).T
    assert gradient.abs().max() < 1e-6 * (phi.T @ y).abs().max()


def test_refit_lowers_a_random_split_s_error_on_the_layer_it_was_fitted_on():
    g = torch.Generator().manual_seed(2)
    hidden, ffn = 32, 64
    dense = _ffn(hidden, ffn, g)
    x_TD = torch.randn(4096, hidden, generator=g)
    target_TD = (F.silu(x_TD @ dense.gate.T) * (x_TD @ dense.up.T)) @ dense.down.T
    neurons = torch.randperm(ffn, generator=g).view(4, 16)
    experts = [FFNWeights(dense.gate[n], dense.up[n], dense.down[:, n] * 2) for n in neurons]  # E/k = 2
    layer = MoELayer(torch.randn(4, hidden, generator=g) * 0.02, experts)
    refitted, before, output_TD, _ = refit_layer(layer, x_TD, target_TD, RouterSpec(), top_k=2)
    after = float((output_TD - target_TD).pow(2).sum() / target_TD.pow(2).sum())
    assert after < 0.75 * before, (before, after)  # random weights hold little structure; SmolLM2 in BENCHMARKS.md
    assert all(torch.equal(new.gate, old.gate) and torch.equal(new.up, old.up) for new, old in zip(refitted.experts, experts))


@pytest.mark.parametrize("flags, message", [
    (dict(method="random-split"), "--refit needs calibration text"),
    (dict(method="upcycle", **CALIBRATION), "an upcycled MoE already starts at the dense model"),
    (dict(method="random-split", gate="mlp", format="moeify", **CALIBRATION), "--refit fits a linear router"),
])
def test_refit_that_cannot_run_is_refused_before_anything_is_written(tiny_models, tmp_path, flags, message):
    from moeify.errors import MoeifyError

    with pytest.raises(MoeifyError, match=message):
        build(build_config(model=str(tiny_models["llama"]), out=tmp_path / "moe", refit=True, **flags), progress=False)
    assert not (tmp_path / "moe").exists()
