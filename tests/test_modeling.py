"""Every dispatch path equals the reference path, in outputs and gradients; the block equals Mixtral's."""

import pytest
import torch
from transformers import MixtralConfig
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

from moeify.modeling import Experts, MoEBlock, TopKRouter, switch_aux_loss
from moeify.modeling.grouped_mm import grouped_mm_supported

SHAPES = [  # (tokens, hidden, expert size, experts, top-k)
    (37, 16, 24, 4, 2),
    (64, 32, 8, 8, 3),
    (5, 16, 32, 8, 1),  # fewer tokens than experts: some experts get none
    (20, 10, 20, 6, 6),  # k = E; hidden 10 (40 bytes) is not 16-byte aligned for grouped_mm
]


def _block(T, D, F, E, k, dispatch, seed=0):
    torch.manual_seed(seed)
    block = MoEBlock(D, F, E, k, dispatch=dispatch)
    with torch.no_grad():
        block.router.weight.normal_(0, 1.0)
        block.experts.gate_up_proj.normal_(0, 0.2)
        block.experts.down_proj.normal_(0, 0.2)
    return block


def _run(block, x):
    x = x.clone().requires_grad_(True)
    out = block(x)
    y, aux = out.hidden, out.balance_loss + out.z_loss
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().add(aux).backward()
    grads = [x.grad, block.router.weight.grad, block.experts.gate_up_proj.grad, block.experts.down_proj.grad]
    return y.detach(), aux.detach(), grads


@pytest.mark.parametrize("dispatch", ["grouped_mm", "loop"])
@pytest.mark.parametrize("shape", SHAPES)
def test_dispatch_matches_reference(shape, dispatch):
    T, D, F, E, k = shape
    x = torch.randn(2, T, D, generator=torch.Generator().manual_seed(1))
    if dispatch == "grouped_mm" and not grouped_mm_supported(x, torch.empty(E, 2 * F, D), torch.empty(E, D, F)):
        pytest.skip("grouped_mm unavailable for this shape (needs 16-byte aligned dims)")
    reference, block = _block(T, D, F, E, k, "reference"), _block(T, D, F, E, k, dispatch)
    y_ref, aux_ref, grads_ref = _run(reference, x)
    y, aux, grads = _run(block, x)
    assert (reference.experts.last_dispatch, block.experts.last_dispatch) == ("reference", dispatch)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(aux, aux_ref)
    for name, g, g_ref in zip(["input", "router", "gate_up", "down"], grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-5, msg=f"gradient of {name}")


def test_unused_expert_gets_zero_gradient():
    experts = Experts(4, 16, 8, dispatch="loop")
    torch.nn.init.normal_(experts.gate_up_proj)
    torch.nn.init.normal_(experts.down_proj)
    x = torch.randn(6, 16)
    indices = torch.tensor([[0, 1]] * 6)
    experts(x, indices, torch.full((6, 2), 0.5)).sum().backward()
    assert experts.down_proj.grad[2:].abs().max() == 0
    assert experts.down_proj.grad[:2].abs().min() > 0


@pytest.mark.parametrize("hidden", [10, 16])
def test_auto_dispatch_takes_grouped_mm_where_it_applies_and_the_loop_elsewhere(hidden):
    block = _block(10, hidden, 8, 4, 2, "auto")
    x = torch.randn(1, 10, hidden)
    expected = "grouped_mm" if grouped_mm_supported(x, block.experts.gate_up_proj, block.experts.down_proj) else "loop"
    y = block(x).hidden
    assert block.experts.last_dispatch == expected and (hidden == 10) == (expected == "loop")  # 10 fp32 = 40 bytes: unaligned
    torch.testing.assert_close(y, _block(10, hidden, 8, 4, 2, "reference")(x).hidden, rtol=1e-5, atol=1e-5)



def test_auto_dispatch_takes_the_loop_in_float64():
    """grouped_mm takes fp32/bf16/fp16 only; a float64 block (a debugging or checking run) must still compute."""
    block, reference = _block(10, 16, 8, 4, 2, "auto").double(), _block(10, 16, 8, 4, 2, "reference").double()
    x = torch.randn(1, 10, 16, dtype=torch.float64)
    y = block(x).hidden
    assert block.experts.last_dispatch == "loop" and y.dtype == torch.float64
    torch.testing.assert_close(y, reference(x).hidden)

def test_router_is_topk_then_softmax():
    router = TopKRouter(4, 5, 2)
    with torch.no_grad():
        router.weight.copy_(torch.eye(5, 4))
    routing = router(torch.tensor([[3.0, 1.0, 2.0, 0.0]]))
    assert routing.indices_TK.tolist() == [[0, 2]]
    torch.testing.assert_close(routing.weights_TK, torch.tensor([[3.0, 2.0]]).softmax(-1))


def test_switch_aux_loss_bounds():
    balanced = switch_aux_loss(torch.zeros(8, 4), torch.arange(8).remainder(4).view(8, 1))
    collapsed = switch_aux_loss(torch.tensor([[10.0, 0, 0, 0]]).repeat(8, 1), torch.zeros(8, 1, dtype=torch.long))
    torch.testing.assert_close(balanced, torch.tensor(1.0))
    assert collapsed > 3.9


@pytest.mark.parametrize("dispatch", ["reference", "loop", "grouped_mm"])
def test_block_matches_stock_mixtral_block(dispatch):
    config = MixtralConfig(hidden_size=32, intermediate_size=16, num_local_experts=4, num_experts_per_tok=2)
    torch.manual_seed(0)
    stock = MixtralSparseMoeBlock(config)
    for p in stock.parameters():
        torch.nn.init.normal_(p, 0, 0.3)
    ours = MoEBlock(32, 16, 4, 2, dispatch=dispatch)
    with torch.no_grad():
        ours.router.weight.copy_(stock.gate.weight)
        ours.experts.gate_up_proj.copy_(stock.experts.gate_up_proj)
        ours.experts.down_proj.copy_(stock.experts.down_proj)
    x = torch.randn(3, 7, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x).hidden, stock(x), rtol=1e-5, atol=1e-6)


def test_capacity_ranks_give_first_choices_priority_then_earlier_tokens():
    from moeify.modeling.losses import expert_counts
    from moeify.modeling.moe_block import capacity_ranks

    # Expert 0 gets three 1st choices, then token 3's 2nd; expert 1 gets token 3's 1st choice, then
    # three 2nd choices. With 3 slots each, the last arrival at each expert (rank 3) is dropped.
    indices = torch.tensor([[0, 1], [0, 1], [0, 1], [1, 0]])
    assert capacity_ranks(indices, num_experts=2).tolist() == [[0, 1], [1, 2], [2, 3], [0, 3]]
    assert torch.equal(capacity_ranks(indices, 2, expert_counts(indices, 2)), capacity_ranks(indices, 2))  # counts given


@pytest.mark.parametrize("dispatch", ["grouped_mm", "loop"])
def test_capacity_factor_drops_and_matches_reference(dispatch):
    x = torch.randn(1, 40, 16, generator=torch.Generator().manual_seed(3))
    outs = {}
    for path in ("reference", dispatch):
        block = _block(40, 16, 8, 4, 2, path)
        block.capacity_factor = 1.0
        with torch.no_grad():
            block.router.selection_bias[0] = 100.0  # every token picks expert 0: it overflows
        outs[path] = _run(block, x), block(x).dropped
    (y_ref, _, g_ref), dropped_ref = outs["reference"]
    (y, _, g), dropped = outs[dispatch]
    assert dropped == dropped_ref and dropped > 0
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_dropless_reports_zero_dropped():
    assert _block(40, 16, 8, 4, 2, "loop")(torch.randn(1, 40, 16)).dropped == 0


def test_noisy_gating_only_in_training_and_learns_its_scale():
    router = TopKRouter(8, 4, 2, noisy=True)
    torch.nn.init.normal_(router.weight)
    assert router.noise_weight.abs().sum() == 0  # zero-initialised
    x = torch.randn(64, 8)
    router.eval()
    torch.testing.assert_close(router(x).logits_TE, router(x).logits_TE)
    router.train()
    noisy = router(x)
    assert not torch.equal(noisy.logits_TE, router(x).logits_TE)
    noisy.weights_TK.pow(2).sum().backward()
    assert router.noise_weight.grad.abs().sum() > 0


def test_selection_bias_changes_choice_not_weights():
    router = TopKRouter(2, 3, 1)
    with torch.no_grad():
        router.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))
        router.selection_bias.copy_(torch.tensor([0.0, 0.0, 5.0]))
    routing = router(torch.tensor([[2.0, 1.0]]))
    assert routing.indices_TK.tolist() == [[2]]  # bias wins the selection
    torch.testing.assert_close(routing.logits_TE, torch.tensor([[2.0, 1.0, 0.0]]))  # logits unbiased


def test_cv_squared_balance_loss():
    from moeify.modeling.losses import cv_squared_balance_loss

    balanced = cv_squared_balance_loss(torch.ones(4, 1), torch.arange(4).view(4, 1), 4)
    skewed = cv_squared_balance_loss(torch.ones(4, 1), torch.zeros(4, 1, dtype=torch.long), 4)
    assert balanced.item() == pytest.approx(0.0, abs=1e-6)
    assert skewed.item() == pytest.approx(6.0)  # CV^2 of [4,0,0,0] is 3, for importance and load
