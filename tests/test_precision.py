"""bf16 training on CPU (what GPU runs do), torch.compile of the MoE block, device-agnostic metrics."""

import pytest
import torch

from moeify.modeling import MoEBlock
from moeify.modeling.experts import Experts
from moeify.train.distributed import DistEnv
from moeify.train.loop import train
from moeify.train.step import reduce_stats
from tests.conftest import train_config


def _block(dispatch: str, capacity_factor: float | None = None, dtype=torch.float32) -> MoEBlock:
    torch.manual_seed(0)
    block = MoEBlock(32, 16, 4, 2, dispatch=dispatch, capacity_factor=capacity_factor)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.3)
    return block.to(dtype).train()


@pytest.mark.parametrize("dispatch", ["grouped_mm", "loop", "reference"])
def test_expert_gemms_take_bf16_operands_under_autocast(dispatch):
    experts = _block(dispatch).experts
    x = torch.randn(24, 32, generator=torch.Generator().manual_seed(1))
    indices = torch.randint(4, (24, 2), generator=torch.Generator().manual_seed(2))
    weights = torch.rand(24, 2, generator=torch.Generator().manual_seed(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = experts(x, indices, weights)
    explicit = Experts(4, 32, 16, dispatch)
    with torch.no_grad():
        explicit.gate_up_proj.copy_(experts.gate_up_proj.bfloat16())
        explicit.down_proj.copy_(experts.down_proj.bfloat16())
    explicit.bfloat16()
    assert mixed.dtype == torch.float32  # the caller's dtype back
    torch.testing.assert_close(mixed, explicit(x.bfloat16(), indices, weights).float(), rtol=0, atol=0)  # bf16 operands, exactly
    assert not torch.equal(mixed, experts(x, indices, weights))  # and not the fp32 computation


@pytest.mark.parametrize("settings", [
    dict(dispatch="grouped_mm"), dict(dispatch="loop"), dict(dispatch="reference"), dict(capacity_factor=1.0),
    dict(dispatch="loop", capacity_factor=1.5, activation_checkpointing="full"), dict(activation_checkpointing="full"),
], ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()))
def test_bf16_training_step_matches_fp32(settings, tiny_moe, tiny_data, tmp_path):
    # The first step's loss is computed before any update: bf16 keeps 8 bits of mantissa, so
    # activations carry ~0.4% relative error each; averaged over 8 x 31 predictions the mean loss
    # moves by far less. 1% of a loss near ln(320) = 5.8 is 0.06 nats.
    losses = {}
    for dtype in ("fp32", "bf16"):
        config = train_config(tiny_moe, tiny_data, tmp_path / dtype, dtype=dtype, max_tokens=8 * 32 * 2, **settings)
        losses[dtype] = train(config, progress=False).losses
    assert all(torch.isfinite(torch.tensor(losses["bf16"])))
    assert losses["bf16"][0] == pytest.approx(losses["fp32"][0], rel=1e-2)
    assert losses["bf16"] != losses["fp32"]  # bf16 did run


def test_dense_bf16_step_matches_fp32(tiny_models, tiny_data, tmp_path):
    losses = {dtype: train(train_config(tiny_models["llama"], tiny_data, tmp_path / dtype, dtype=dtype, max_tokens=8 * 32),
                           progress=False).losses[0] for dtype in ("fp32", "bf16")}
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=1e-2)


@pytest.mark.parametrize("capacity_factor", [None, 1.0], ids=["dropless", "capacity"])
def test_compiled_block_has_no_graph_breaks_and_matches_eager(capacity_factor):
    block = _block("auto", capacity_factor, torch.bfloat16)
    x = torch.randn(2, 24, 32, generator=torch.Generator().manual_seed(4)).bfloat16()

    def run(fn):
        block.zero_grad(set_to_none=True)
        x_in = x.clone().requires_grad_(True)
        out = fn(x_in)
        (out.hidden.float().sum() + out.balance_loss + out.z_loss).backward()
        return out.hidden, x_in.grad, block.experts.gate_up_proj.grad.clone(), block.router.weight.grad.clone()

    explanation = torch._dynamo.explain(block)(x)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    eager = run(block)
    assert block.experts.last_dispatch == "grouped_mm"
    compiled = run(torch.compile(block, fullgraph=True, backend="aot_eager"))
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2)


def test_metric_reduction_stays_on_the_tensors_device():
    env = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("meta"))
    stats = [torch.zeros(3, 2, dtype=torch.float64, device="meta"), torch.zeros(4, dtype=torch.float64, device="meta")]
    reduced = reduce_stats(stats, env)
    assert [t.device.type for t in reduced] == ["meta", "meta"] and [t.shape for t in reduced] == [(3, 2), (4,)]


def test_gpu_check_runs_in_smoke_mode_on_cpu(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parents[1] / "benchmarks" / "gpu_check.py"
    out = tmp_path / "smoke.json"
    subprocess.run([sys.executable, str(script), "--smoke", "--out", str(out)], check=True, capture_output=True, timeout=300)
    report = json.loads(out.read_text())
    runs = report["training"]["smoke-8x2"]["runs"]
    assert [(r["dispatch"], r["dispatch_taken"]) for r in runs] == [("grouped_mm", "grouped_mm"), ("loop", "loop")]
    assert all(r["tokens_per_s"] > 0 and r["mfu"] > 0 and 0 < r["loss"] < 10 for r in runs)
    assert report["block"][0]["moe_over_dense"] > 0
    # With the budget spent before the first measurement, every row says so and the JSON is whole.
    subprocess.run([sys.executable, str(script), "--smoke", "--budget-s", "0", "--out", str(out)], check=True, capture_output=True,
                   timeout=300)
    report = json.loads(out.read_text())
    rows = report["block"] + report["training"]["smoke-8x2"]["runs"]
    assert len(rows) == 3 and all(row["skipped"] == "the 0 s budget was spent" for row in rows)


def test_selective_checkpointing_saves_matmuls_and_recomputes_elementwise_work():
    from torch.utils.checkpoint import CheckpointPolicy, checkpoint

    from moeify.train.distributed import _selective_context, _selective_policy

    assert _selective_policy(None, torch.ops.aten.mm.default) == CheckpointPolicy.MUST_SAVE
    assert _selective_policy(None, torch.ops.aten._grouped_mm.default) == CheckpointPolicy.MUST_SAVE
    assert _selective_policy(None, torch.ops.aten.silu.default) == CheckpointPolicy.PREFER_RECOMPUTE
    calls = {"silu": 0}

    def layer(x, w):
        calls["silu"] += 1  # runs again in the backward only where something is recomputed
        return torch.nn.functional.silu(x @ w).sum()

    x, w = torch.randn(8, 8, requires_grad=True), torch.randn(8, 8, requires_grad=True)
    checkpoint(layer, x, w, use_reentrant=False, context_fn=_selective_context).backward()
    assert calls["silu"] == 2 and x.grad is not None


def test_chunked_loss_equals_the_full_cross_entropy_in_value_and_gradient():
    from moeify.modeling.chunked_loss import ChunkedLMHead

    torch.manual_seed(0)
    linear = torch.nn.Linear(16, 50, bias=False)
    head = ChunkedLMHead(linear, chunk=7)  # 3 x 10 = 30 positions: chunks of 7, the last one of 2
    hidden = torch.randn(3, 10, 16, requires_grad=True)
    targets = torch.randint(50, (3, 10))
    full = torch.nn.functional.cross_entropy(linear(hidden).transpose(1, 2), targets, reduction="none")
    full.sum().backward()
    expected = (hidden.grad.clone(), linear.weight.grad.clone())
    hidden.grad, linear.weight.grad = None, None
    head.targets = targets
    chunked = head(hidden)
    chunked.sum().backward()
    torch.testing.assert_close(chunked, full)
    torch.testing.assert_close((hidden.grad, linear.weight.grad), expected)
    head.targets = None
    torch.testing.assert_close(head(hidden), linear(hidden))  # evaluation: ordinary logits


@pytest.mark.parametrize("family", ["llama", "llama-tied"])
def test_training_with_a_chunked_loss_gives_the_same_losses(family, tiny_models, tiny_data, tmp_path):
    from moeify.build import build, build_config

    moe = build(build_config(model=str(tiny_models[family]), out=tmp_path / "moe", method="random-split", num_experts=4, top_k=2,
                             router_std=0.1), progress=False)
    losses = {chunk: train(train_config(moe, tiny_data, tmp_path / f"run{chunk}", loss_chunk=chunk, max_tokens=8 * 32 * 3),
                           progress=False).losses for chunk in (0, 13)}
    torch.testing.assert_close(losses[13], losses[0], rtol=1e-5, atol=1e-5)


def test_a_whole_stock_model_with_moeify_blocks_traces_without_graph_breaks():
    from transformers import AutoModelForCausalLM, MixtralConfig

    from moeify.modeling.hf import attach_moe_blocks

    config = MixtralConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    attach_moe_blocks(model, capacity_factor=1.5)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    model = model.bfloat16().train()
    explanation = torch._dynamo.explain(model)(torch.randint(256, (2, 16)))
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1


def test_the_optimizer_is_fused_on_cpu_and_updates_like_the_foreach_adamw():
    from moeify.train.config import TrainConfig
    from moeify.train.setup import make_optimizer

    config = TrainConfig(lr=1e-2, weight_decay=0.1)
    models = [_block("loop"), _block("loop")]
    groups = [{"params": [p for p in models[1].parameters() if p.dim() >= 2], "weight_decay": 0.1},
              {"params": [p for p in models[1].parameters() if p.dim() < 2], "weight_decay": 0.0}]
    optimizers = [make_optimizer(models[0], config),
                  torch.optim.AdamW(groups, lr=1e-2, betas=(config.beta1, config.beta2), foreach=True)]
    assert optimizers[0].defaults["fused"] and not optimizers[1].defaults["fused"]
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):  # the same gradients into both: only the update arithmetic differs
        grads = [torch.randn(p.shape, generator=generator) for p in models[0].parameters()]
        for model, optimizer in zip(models, optimizers):
            for p, grad in zip(model.parameters(), grads):
                p.grad = grad.clone()
            optimizer.step()
            optimizer.zero_grad()
    for fused, foreach in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(fused, foreach, rtol=1e-5, atol=1e-6)  # fp32 rounding of 5 updates of ~lr
    assert not torch.equal(models[0].experts.down_proj, _block("loop").experts.down_proj)  # it did update


@pytest.mark.parametrize("loss_chunk", [0, 8])
def test_compiled_layers_share_one_graph_in_a_training_step(loss_chunk):
    # Dynamo's recompile limit is 8 per code object: if anything in a layer's forward differs per
    # layer (a KV cache indexed by layer), layers past the 8th silently run eager.
    from torch._dynamo.utils import counters
    from transformers import AutoModelForCausalLM, MixtralConfig

    from moeify.evaluate.scoring import autocast_for
    from moeify.modeling.chunked_loss import install_chunked_loss
    from moeify.modeling.hf import attach_moe_blocks
    from moeify.train.distributed import compile_layers
    from moeify.train.heldout import sequence_losses

    config = MixtralConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=10, num_attention_heads=4,
                           num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).train()
    attach_moe_blocks(model)
    install_chunked_loss(model, loss_chunk)
    compile_layers(model, backend="eager")
    torch._dynamo.reset()
    counters.clear()
    for _ in range(2):
        with autocast_for(torch.device("cpu"), torch.bfloat16):
            loss = sequence_losses(model, torch.randint(256, (2, 17))).mean()
        loss.backward()
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"] and not counters["unimplemented"]


def test_the_gpu_peak_is_the_boards_own():
    from moeify.train.metrics import datasheet_peak_tflops

    assert datasheet_peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert datasheet_peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert datasheet_peak_tflops("NVIDIA H100 NVL") == 835.0
    assert datasheet_peak_tflops("NVIDIA H200") == 989.0
    assert datasheet_peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert datasheet_peak_tflops("Tesla T4") is None  # then MFU asks for --peak-tflops


def test_training_with_compile_gives_the_eager_losses(tiny_moe, tiny_data, tmp_path):
    # `train --compile` end to end (inductor, fp32 on CPU: the loop dispatch, whose per-expert
    # sizes break the graph by design). Compiled kernels fuse and reorder float arithmetic.
    losses = {compiled: train(train_config(tiny_moe, tiny_data, tmp_path / str(compiled), compile=compiled, max_tokens=8 * 32 * 3),
                              progress=False).losses for compiled in (False, True)}
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)
