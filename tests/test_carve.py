"""Training-free carving (construct/carve.py): coverage, determinism, the fitted router, dense reproduction."""

import json

import pytest
import torch
from safetensors import safe_open

from moeify.build import build, build_config
from moeify.cli import main
from moeify.construct import ConstructionConfig, Partition
from moeify.construct.carve import CHUNK, LayerCarver, activation_ratio, routed_coefficients, shared_size_for_ratio
from moeify.errors import MoeifyError
from moeify.schema import replace_flat
from tests.conftest import logits_of

CALIBRATION = ["--calibration", "embedded", "--calibration-tokens", "2048", "--calibration-seq-len", "64"]


def _split(dense, out, *flags) -> Partition:
    assert main(["split", str(dense), "--method", "carve", *CALIBRATION, "--out", str(out), *flags]) == 0
    return Partition.load(out)


@pytest.fixture(scope="module")
def carved(tiny_models, tmp_path_factory) -> tuple[Partition, object]:
    path = tmp_path_factory.mktemp("carve") / "p.safetensors"
    return _split(tiny_models["llama"], path, "--num-experts", "6", "--activation-ratio", "0.5"), path


def test_carve_covers_every_neuron_once_with_the_requested_sizes(carved):
    partition, _ = carved
    # F = 96, E = 6, k = 2 at 50%: S0 + 2 (96 - S0) / 6 = 48 gives S0 = 24, experts of 12
    assert (partition.shared_size, partition.expert_size, partition.num_experts) == (24, 12, 6)
    assert activation_ratio(96, partition.expert_size, partition.shared_size, 2) == 0.5
    for experts, shared in zip(partition.experts, partition.shared):
        assert experts.shape == (6, 12) and shared.shape == (24,)
        assert torch.equal(torch.cat([experts.flatten(), shared]).sort().values, torch.arange(96))
    assert [r.shape for r in partition.router] == [(6, 64)] * 2
    assert all(0 < e < 1 for e in partition.stats["reconstruction_error"])


def test_same_seed_same_bytes_other_seed_other_carve(carved, tiny_models, tmp_path):
    partition, path = carved
    again = tmp_path / "again.safetensors"
    _split(tiny_models["llama"], again, "--num-experts", "6", "--activation-ratio", "0.5")
    assert again.read_bytes() == path.read_bytes()
    other = _split(tiny_models["llama"], tmp_path / "other.safetensors", "--num-experts", "6", "--activation-ratio", "0.5", "--seed", "1")
    assert any(not torch.equal(a, b) for a, b in zip(other.experts, partition.experts))


def test_the_fitted_router_sends_a_token_made_of_one_experts_neurons_to_that_expert():
    # A synthetic FFN of 4 groups of 8 neurons; group g reads (and writes) only coordinates 8g..8g+7,
    # and each calibration token excites one or two groups. The carve must find the groups and route to them.
    torch.manual_seed(0)
    D, E, S = 32, 4, 8
    gate, up = torch.zeros(E * S, D), torch.zeros(E * S, D)
    for g in range(E):
        gate[g * S:(g + 1) * S, g * S:(g + 1) * S] = torch.randn(S, S).abs() + 0.5
        up[g * S:(g + 1) * S, g * S:(g + 1) * S] = torch.randn(S, S).abs() + 0.5
    down = up.T.clone()
    groups = torch.randint(0, E, (4096, 2))
    mask = torch.zeros(4096, D)
    for column in range(2):
        mask[torch.arange(4096)[:, None], groups[:, column:column + 1] * S + torch.arange(S)] = 1
    x_TD = torch.rand(4096, D) * mask + 0.01 * torch.randn(4096, D)
    options = replace_flat(ConstructionConfig(method="carve", num_experts=E), top_k=1, pattern_dims=0)
    carver = LayerCarver(gate, up, down, x_TD, options, shared_size=0, scale=1.0, layer=0)
    result = carver.carve()
    groups_found = sorted((experts // S).unique().tolist() for experts in result.experts_ES)
    assert groups_found == [[0], [1], [2], [3]]
    for expert, neurons in enumerate(result.experts_ES):
        token = (gate[neurons] + up[neurons]).sum(0, keepdim=True)
        assert int((token @ result.router_ED.T).argmax()) == expert


def test_the_carved_output_is_each_neuron_times_its_experts_coefficient():
    # What the next layer receives and the reported error, computed per chunk from the experts'
    # outputs, equal the carved FFN written out neuron by neuron: h * (coefficient of the neuron's
    # expert, 1 for the shared block), then down_proj; over more tokens than one chunk.
    torch.manual_seed(0)
    D, F, E, shared = 16, 48, 4, 16
    gate, up, down = torch.randn(F, D), torch.randn(F, D), torch.randn(D, F)
    x_TD = torch.randn(CHUNK + 300, D)
    options = replace_flat(ConstructionConfig(method="carve", num_experts=E), top_k=2, pattern_dims=0, shared_size=shared)
    carver = LayerCarver(gate, up, down, x_TD, options, shared_size=shared, scale=2.0, layer=0)
    result = carver.carve()
    h_TF = torch.nn.functional.silu(x_TD @ gate.T) * (x_TD @ up.T)
    with torch.no_grad():
        coef_TE = routed_coefficients(carver.router, x_TD, 2.0 * result.scales_E)
    coef_TF = torch.ones_like(h_TF)
    for expert, neurons in enumerate(result.experts_ES):
        coef_TF[:, neurons] = coef_TE[:, expert, None]
    assert set(result.shared_S.tolist()).isdisjoint(result.experts_ES.flatten().tolist())
    expected_TD, dense_TD = (h_TF * coef_TF) @ down.T, h_TF @ down.T
    torch.testing.assert_close(carver.output_TD, expected_TD, atol=1e-4, rtol=1e-5)
    error = float((expected_TD - dense_TD).pow(2).sum() / dense_TD.pow(2).sum())
    assert 0 < result.stats["error"] == pytest.approx(error, rel=1e-4)


def test_k_equal_to_e_reproduces_the_dense_model(tiny_models, tmp_path):
    dense = tiny_models["llama"]
    out = build(build_config(model=str(dense), out=tmp_path / "moe", method="carve", num_experts=4, top_k=4, shared_size=32,
                             calibration="embedded", calibration_tokens=1024, calibration_seq_len=64), progress=False)
    ids = torch.randint(0, 320, (2, 24))
    torch.testing.assert_close(logits_of(out, ids), logits_of(dense, ids), atol=1e-5, rtol=0)


def test_carve_is_closer_to_dense_than_a_random_split_at_the_same_ratio(tiny_models, tmp_path):
    dense = tiny_models["llama"]
    ids = torch.randint(0, 320, (4, 32), generator=torch.Generator().manual_seed(0))
    reference = logits_of(dense, ids)
    errors = {}
    calibration = dict(calibration="embedded", calibration_tokens=2048, calibration_seq_len=64)
    for method in ("carve", "random-split"):
        out = build(build_config(model=str(dense), out=tmp_path / method, method=method, num_experts=4, top_k=2, shared_size=32,
                                 **(calibration if method == "carve" else {})), progress=False)
        errors[method] = (logits_of(out, ids) - reference).pow(2).mean().item()
    assert errors["carve"] < errors["random-split"], errors  # random weights: little structure to find (SmolLM2: BENCHMARKS.md)


def test_balance_bias_evens_the_calibration_load_in_the_deepseek_format(tiny_models, tmp_path):
    path = tmp_path / "b.safetensors"
    partition = _split(tiny_models["llama"], path, "--num-experts", "6", "--routing", "sigmoid-topk", "--balance-bias")
    assert any(bias.abs().max() > 0 for bias in partition.selection_bias)
    out = tmp_path / "moe"
    assert main(["build", str(tiny_models["llama"]), "--partition", str(path), "--routing", "sigmoid-topk", "--out", str(out)]) == 0
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        stored = f.get_tensor("model.layers.0.mlp.gate.e_score_correction_bias")
    torch.testing.assert_close(stored, partition.selection_bias[0])


def test_activation_ratio_that_does_not_divide_names_the_ratios_that_do():
    assert shared_size_for_ratio(1536, 14, 2, 0.25) == 192  # CMoE's S2A2E16 on SmolLM2
    with pytest.raises(MoeifyError, match=r"choose one of .*0\.25"):
        shared_size_for_ratio(1536, 14, 2, 0.26)
