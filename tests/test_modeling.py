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
    y, aux = block(x)
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
    y_ref, aux_ref, grads_ref = _run(_block(T, D, F, E, k, "reference"), x)
    y, aux, grads = _run(_block(T, D, F, E, k, dispatch), x)
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


def test_auto_dispatch_chooses_a_path_that_runs():
    block = _block(10, 10, 8, 4, 2, "auto")  # 10 not aligned -> loop
    y, _ = block(torch.randn(1, 10, 10))
    assert y.shape == (1, 10, 10) and torch.isfinite(y).all()


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
        torch.testing.assert_close(ours(x)[0], stock(x), rtol=1e-5, atol=1e-6)
