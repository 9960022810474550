"""Formula-level tests of the reference-faithful options: each checks moeify against the reference's
definition on a case small enough to compute by hand or directly."""

import math

import pytest
import torch
from safetensors.torch import load_file

from moeify.checkpoint.dense import DenseCheckpoint
from moeify.construct import ConstructionConfig, ConstructionPlan
from moeify.construct.methods import DropUpcycle, NoiseUpcycle
from moeify.modeling.losses import cv_squared, smooth_load
from moeify.schema import from_flat
from moeify.train.loop import train
from tests.conftest import train_config


def _plan(dense_path, **settings) -> tuple[DenseCheckpoint, ConstructionPlan]:
    dense = DenseCheckpoint(dense_path)
    return dense, ConstructionPlan.make(dense, from_flat(ConstructionConfig, settings), progress=False)


def _phi(x: float) -> float:
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


def test_smooth_load_is_the_normal_cdf_of_the_thresholds():
    # One token, 3 experts, k = 1. Noisy logits [1.2, 0.1, -2]: the top-1 is expert 0; the (k+1)-th
    # largest is 0.1. Expert 0 (in) stays in while clean + noise > 0.1; experts 1, 2 (out) get in when
    # clean + noise > 1.2, the k-th largest (Shazeer et al. 2017, LLaMA-MoE's _prob_in_top_k).
    clean = torch.tensor([[1.0, 0.0, -1.0]], requires_grad=True)
    noisy = torch.tensor([[1.2, 0.1, -2.0]])
    std = torch.tensor([[1.0, 0.5, 2.0]])
    load = smooth_load(clean, noisy, std, top_k=1)
    expected = [_phi((1.0 - 0.1) / 1.0), _phi((0.0 - 1.2) / 0.5), _phi((-1.0 - 1.2) / 2.0)]
    assert load.tolist() == pytest.approx(expected, abs=1e-6)
    load.sum().backward()
    assert (clean.grad > 0).all()  # the load carries gradient to the router (counts do not)
    assert smooth_load(clean.detach(), noisy, std, top_k=3).tolist() == [1.0, 1.0, 1.0]  # k = E: always in


def test_llama_moe_load_judges_in_or_out_by_the_noise_term_alone():
    # Noisy [1.2, 0.5, -2], clean [1, 0.6, -1]: the noise terms are [0.2, -0.1, -1]. Expert 0 is in the top 1;
    # Shazeer's formula keeps it on the "in" side (its noisy logit 1.2 beats the 2nd largest, 0.5), LLaMA-MoE's
    # code compares its noise term 0.2 with 0.5 and puts it on the "out" side: Phi((1 - 1.2) / 1).
    clean, noisy, std = torch.tensor([[1.0, 0.6, -1.0]]), torch.tensor([[1.2, 0.5, -2.0]]), torch.tensor([[1.0, 0.5, 2.0]])
    shazeer = smooth_load(clean, noisy, std, top_k=1)
    reference = smooth_load(clean, noisy, std, top_k=1, noise_alone=True)
    assert shazeer.tolist() == pytest.approx([_phi((1.0 - 0.5) / 1.0), _phi((0.6 - 1.2) / 0.5), _phi((-1.0 - 1.2) / 2.0)], abs=1e-6)
    assert reference.tolist() == pytest.approx([_phi((1.0 - 1.2) / 1.0), _phi((0.6 - 1.2) / 0.5), _phi((-1.0 - 1.2) / 2.0)], abs=1e-6)


def test_cv_squared_unbiased_and_population():
    x = torch.tensor([1.0, 2.0, 3.0, 6.0])  # mean 3, squared deviations 4 + 1 + 0 + 9 = 14
    assert cv_squared(x, unbiased=True).item() == pytest.approx((14 / 3) / 9)
    assert cv_squared(x).item() == pytest.approx((14 / 4) / 9)


def test_noisy_cv2_block_uses_the_smooth_load(tiny_moe):
    # Through the smooth load the noise network gets gradient from the load term; with counts only the
    # importance term reaches it. Same noise draw (seed), so the two gradients differ only there.
    from moeify.modeling.load import load_moe_model

    grads = {}
    for smooth in (True, False):
        model, blocks = load_moe_model(tiny_moe, noisy=True)
        block = blocks[0].block
        block.balance_loss, block.cv2_smooth_load, block.cv2_unbiased = "cv2", smooth, True
        block.train()
        torch.manual_seed(0)
        block(torch.randn(2, 16, block.router.weight.shape[1])).balance_loss.backward()
        grads[smooth] = block.router.noise_weight.grad.clone()
    assert grads[True].abs().sum() > 0 and not torch.allclose(grads[True], grads[False])


@pytest.mark.parametrize("routing, expected_scale", [("topk-softmax", 2.0), ("softmax-topk", 4.0)])
def test_megatron_weight_scaling_spreads_s_over_the_three_matrices(routing, expected_scale, tiny_models):
    # Granular, 2 copies x G = 2 slices, k = 2: Megatron's s is G for top-k-then-softmax and
    # copies x G^2 / k = 4 for softmax-then-top-k; gate, up and down are each multiplied by s^(1/3).
    unnormalised = {"renormalize": False} if routing == "softmax-topk" else {}  # topk-softmax always sums to 1
    dense, plan = _plan(tiny_models["llama"], method="granular-upcycle", num_experts=4, granularity=2, top_k=2, routing=routing,
                        weight_scaling="megatron", **unnormalised)
    assert plan.scale == expected_scale
    gate, up, down = dense.ffn(0)
    half = gate.shape[0] // 2
    factor = expected_scale ** (1 / 3)
    for e, expert in enumerate(plan.layer(dense, 0).experts):
        rows = slice((e % 2) * half, (e % 2 + 1) * half)
        assert torch.equal(expert.gate, (gate[rows] * factor).contiguous())
        assert torch.equal(expert.up, (up[rows] * factor).contiguous())
        assert torch.equal(expert.down, (down[:, rows] * factor).contiguous())


def test_megatron_scaling_of_plain_upcycling_with_softmax_first_is_e_over_k(tiny_models):
    _, exact = _plan(tiny_models["llama"], method="upcycle", num_experts=8, top_k=2, routing="softmax-topk", renormalize=False)
    _, megatron = _plan(tiny_models["llama"], method="upcycle", num_experts=8, top_k=2, routing="softmax-topk", renormalize=False,
                        weight_scaling="megatron")
    assert (exact.scale, megatron.scale) == (1.0, 4.0)


def _drop(indices: str, stats: str, experts: int = 1, ratio: float = 0.5, neurons: int = 96, width: int = 64):
    torch.manual_seed(1)
    weights = (torch.randn(neurons, width), torch.randn(neurons, width), torch.randn(width, neurons))
    options = from_flat(ConstructionConfig, {"method": "drop-upcycle", "num_experts": experts, "drop_ratio": ratio,
                                             "drop_indices": indices, "drop_stats": stats})
    return weights, [DropUpcycle().perturb(weights, options, 0, e) for e in range(experts)]


def _changed(before, after) -> list[torch.Tensor]:
    """Per matrix, which neurons (rows of gate/up, columns of down) were re-drawn."""
    return [(b != a).any(dim=1) for b, a in zip(before[:2], after[:2])] + [(before[2] != after[2]).any(dim=0)]


@pytest.mark.parametrize("indices", ["shared", "independent"])
def test_drop_indices_shared_or_independent_per_matrix(indices):
    # r = 0.5 of 96 neurons per expert, 64 experts: the neurons left untouched in all three matrices are
    # 1 - r = 0.5 when one set serves all three, and about (1 - r)^3 = 0.125 with a set per matrix
    # (the authors' code); over 64 x 96 neurons the standard error is 0.004.
    before, experts = _drop(indices, "matrix", experts=64)
    untouched = []
    for after in experts:
        gate, up, down = _changed(before, after)
        assert gate.sum() == up.sum() == down.sum() == 48
        untouched.append((~gate & ~up & ~down).float().mean())
    fraction = torch.stack(untouched).mean().item()
    assert fraction == (0.5 if indices == "shared" else pytest.approx(0.125, abs=0.02))


def test_drop_stats_replaced_draws_from_the_replaced_weights():
    # A gate matrix whose rows have very different means (row j around 10 j): the re-drawn rows' mean
    # follows the replaced rows' mean under `replaced`, and the whole matrix's under `matrix`.
    torch.manual_seed(2)
    gate = torch.randn(96, 64) + 10 * torch.arange(96.0)[:, None]
    weights = (gate, torch.randn(96, 64), torch.randn(64, 96))
    for stats in ("replaced", "matrix"):
        options = from_flat(ConstructionConfig, {"method": "drop-upcycle", "num_experts": 1, "drop_ratio": 0.25, "drop_stats": stats})
        new_gate = DropUpcycle().perturb(weights, options, 0, 0)[0]
        rows = (new_gate != gate).any(dim=1)
        replaced, fresh = gate[rows], new_gate[rows]
        target = replaced if stats == "replaced" else gate
        assert fresh.mean().item() == pytest.approx(target.mean().item(), abs=3 * target.std().item() / math.sqrt(fresh.numel()) + 0.5)
        assert fresh.std().item() == pytest.approx(target.std().item(), rel=0.05)
    assert abs(replaced.mean() - gate.mean()) > 20  # the case tells the two apart (seeded)


def test_noise_baseline_statistics():
    # The authors' baseline: N(0, 0.02) added to int(r F) random neurons of each matrix, drawn per matrix.
    torch.manual_seed(3)
    weights = (torch.randn(96, 64), torch.randn(96, 64), torch.randn(64, 96))
    options = from_flat(ConstructionConfig, {"method": "noise-upcycle", "num_experts": 1, "noise_relative": False, "noise_fraction": 0.5})
    assert NoiseUpcycle.sigma(options) == 0.02  # the authors' sigma is that mode's default
    noised = NoiseUpcycle().perturb(weights, options, 0, 0)
    changed = _changed(weights, noised)
    assert [int(c.sum()) for c in changed] == [48, 48, 48]
    assert not torch.equal(changed[0], changed[1])  # a set per matrix
    deltas = torch.cat([(n - w)[c].flatten() for n, w, c in zip(noised[:2], weights[:2], changed[:2])])
    assert deltas.std().item() == pytest.approx(0.02, rel=0.05) and abs(deltas.mean().item()) < 0.002
    relative = from_flat(ConstructionConfig, {"method": "noise-upcycle", "num_experts": 1})
    assert NoiseUpcycle.sigma(relative) == 0.01
    assert all(c.all() for c in _changed(weights, NoiseUpcycle().perturb(weights, relative, 0, 0)))  # moeify's: every weight


def test_mlp_gate_second_layer_identity_or_normal(tiny_models):
    dense, identity = _plan(tiny_models["llama"], method="upcycle", num_experts=8, gate="mlp")
    assert torch.equal(identity.layer(dense, 0).router_mlp_out, torch.eye(8))
    dense, normal = _plan(tiny_models["llama"], method="upcycle", num_experts=8, gate="mlp", mlp_gate_init="normal", router_std=0.02)
    out = normal.layer(dense, 0).router_mlp_out
    assert out.std().item() == pytest.approx(0.02, rel=0.25) and abs(out.diagonal().mean().item()) < 0.02


def _train_scaled(tiny_models, tiny_data, tmp_path, placement: str, **overrides):
    from moeify.build import build, build_config

    moe = build(build_config(model=str(tiny_models["llama"]), out=tmp_path / f"moe-{placement}", method="random-split", num_experts=4,
                             top_k=2, scale=3.0, scale_placement=placement, router_std=0.1), progress=False)
    settings = dict(max_tokens=8 * 32, weight_decay=0.0, warmup_steps=0, export=True) | overrides
    result = train(train_config(moe, tiny_data, tmp_path / f"run-{placement}", **settings), progress=False)
    return load_file(str(moe / "model.safetensors")), load_file(str(result.model_dir / "model.safetensors"))


def test_a_multiplier_scaled_expert_moves_s_times_further_under_adamw(tiny_models, tiny_data, tmp_path):
    # LLaMA-MoE trains W with output s * expert(x; W): Adam's first step moves W by lr * sign(grad), so
    # the effective s * W moves s times as far as a folded s * W trained directly (same gradient signs).
    # The exported models hold the effective weights (folded on export), so their one-step changes of
    # the routed down projections are in ratio s = 3.
    steps = {}
    for placement in ("fold", "multiplier"):
        built, trained = _train_scaled(tiny_models, tiny_data, tmp_path, placement, lr=1e-3)
        steps[placement] = {k: trained[k] - built[k] for k in built if ".experts." in k and k.endswith("w2.weight")}
    ratios = torch.cat([(steps["multiplier"][k] / steps["fold"][k]).flatten() for k in steps["fold"]])
    assert ratios.median().item() == pytest.approx(3.0, rel=1e-3)
    assert ((ratios - 3.0).abs() < 0.03).float().mean() > 0.99


def test_the_multiplier_is_folded_back_on_export(tiny_models, tiny_data, tmp_path):
    # With a learning rate too small to move fp32 weights, the exported model is the built one: the
    # multiplier was folded back into down_proj (forgetting it would leave W / 3).
    built, exported = _train_scaled(tiny_models, tiny_data, tmp_path, "multiplier", lr=1e-20)
    for name, tensor in built.items():
        assert torch.allclose(exported[name], tensor, rtol=1e-6, atol=0), name


def test_shared_block_by_frequency_or_summed_importance():
    # 3 groups, 5 neurons, S = 2. Neuron 1 is huge in one group only (sum 100, in 1 top-2); neuron 4
    # is small but in every group's top-2; neuron 0 is in two. LLaMA-MoE's rule takes {4, 0}; the
    # summed rule {1, 0}.
    from moeify.construct.splits import comparable_scores, shared_neurons

    importance = torch.tensor([[5.0, 0, 0, 1, 2], [5.0, 0, 1, 0, 2], [0.0, 100, 0, 0, 2]])
    assert shared_neurons(importance, 2, "frequency").tolist() == [4, 0]
    assert sorted(shared_neurons(importance, 2, "summed").tolist()) == [0, 1]
    # Recounted after each pick (LLaMA-MoE's expert_split_residual.py): neuron 1 is in both top-2s and goes first;
    # without it group 0's top-2 is {0, 2} and group 1's {2, 3}, so 2 is in both and goes next. Counting once
    # would tie 0 and 2 (one top list each) and take 0, the larger sum.
    recount = torch.tensor([[6.0, 3, 2, 1], [1.0, 3, 4, 2]])
    assert shared_neurons(recount, 2, "frequency").tolist() == [1, 2]
    shares = comparable_scores(importance[:, None], "share")[:, 0]
    assert torch.allclose(shares.sum(dim=1), torch.ones(3)) and torch.equal(comparable_scores(importance, "raw"), importance)


def test_the_multiplier_survives_resume(tiny_models, tiny_data, tmp_path):
    from moeify.build import build, build_config

    moe = build(build_config(model=str(tiny_models["llama"]), out=tmp_path / "moe", method="random-split", num_experts=4, top_k=2,
                             scale=3.0, scale_placement="multiplier", router_std=0.1), progress=False)
    settings = dict(max_tokens=8 * 32 * 4, checkpoint_every=2)
    full = train(train_config(moe, tiny_data, tmp_path / "full", **settings), progress=False).losses
    train(train_config(moe, tiny_data, tmp_path / "split", **settings), progress=False, stop_after_steps=2)
    resumed = train(train_config(moe, tiny_data, tmp_path / "split", resume=True, **settings), progress=False).losses
    assert resumed == full[2:]
