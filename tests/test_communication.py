"""Gradient communication per optimizer step: collectives counted at the dispatcher (`--count-collectives`) on
gloo ranks, with 1 and 4 micro-batches per step. The gradient reduction that can wait runs once per step."""

import json
import sys
from pathlib import Path

import torch

from tests.test_distributed import run_group

STEPS = 3


def _run(tiny_moe: Path, tiny_data: Path, out: Path, ranks: int, batch: int, micro: int, *flags: str) -> list[dict]:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks), "-m", "moeify", "train",
               "--model", str(tiny_moe), "--data", str(tiny_data), "--out", str(out), "--batch-size", str(batch),
               "--micro-batch", str(micro), "--max-tokens", str(batch * 32 * STEPS), "--lr", "3e-3", "--warmup-steps", "1",
               "--eval-blocks", "2", "--no-export", "--count-collectives", *flags]
    result = run_group(command, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "collectives" in r]


def _calls(steps: list[dict], kind: str, group: str) -> list[int]:
    return [step["collectives"].get(kind, {}).get(group, [0, 0])[0] for step in steps]


def _losses(steps: list[dict]) -> torch.Tensor:
    return torch.tensor([step["loss"] for step in steps])


# Other micro-batch sizes: the Switch aux loss is computed per micro-batch (not linear in the batch), which moves
# the loss by well under 2e-3 (see test_distributed); the same micro-batches: float summation order only.
OTHER_MICRO_BATCHES = dict(rtol=0, atol=2e-3)


def test_ddp_all_reduces_the_gradients_once_per_step(tiny_moe, tiny_data, tmp_path):
    one = _run(tiny_moe, tiny_data, tmp_path / "one", 2, 8, 4, "--parallel", "ddp")
    four = _run(tiny_moe, tiny_data, tmp_path / "four", 2, 8, 1, "--parallel", "ddp")
    assert len(one) == len(four) == STEPS
    assert _calls(four, "all_reduce", "0,1") == _calls(one, "all_reduce", "0,1"), (one[0]["collectives"], four[0]["collectives"])
    torch.testing.assert_close(_losses(four), _losses(one), **OTHER_MICRO_BATCHES)


def test_fsdp2_reduce_scatters_once_per_step_with_gradient_sync_step(tiny_moe, tiny_data, tmp_path):
    one = _run(tiny_moe, tiny_data, tmp_path / "one", 2, 8, 4)
    every = _run(tiny_moe, tiny_data, tmp_path / "every", 2, 8, 1)
    once = _run(tiny_moe, tiny_data, tmp_path / "once", 2, 8, 1, "--gradient-sync", "step")
    per_step = _calls(one, "reduce_scatter", "0,1")
    assert per_step[0] > 0 and _calls(once, "reduce_scatter", "0,1") == per_step
    assert _calls(every, "reduce_scatter", "0,1") == [4 * n for n in per_step]
    torch.testing.assert_close(_losses(once), _losses(every), rtol=1e-5, atol=1e-5)


def test_hsdp_all_reduces_across_replicas_once_per_step(tiny_moe, tiny_data, tmp_path):
    # 4 ranks as 2 replicas x 2 shards: rank 0's replica group is ranks 0 and 2.
    one = _run(tiny_moe, tiny_data, tmp_path / "one", 4, 16, 4, "--hsdp", "2")
    four = _run(tiny_moe, tiny_data, tmp_path / "four", 4, 16, 1, "--hsdp", "2")
    across = _calls(one, "all_reduce", "0,2")
    assert across[0] > 0 and _calls(four, "all_reduce", "0,2") == across, (one[0]["collectives"], four[0]["collectives"])
    assert _calls(four, "reduce_scatter", "0,1") == [4 * n for n in _calls(one, "reduce_scatter", "0,1")]  # within a replica: as before
    torch.testing.assert_close(_losses(four), _losses(one), **OTHER_MICRO_BATCHES)


def test_plan_memory_counts_the_unsharded_gradients_of_gradient_sync_step():
    from transformers import LlamaConfig

    from moeify.plan_memory import moe_meta_model, plan_memory
    from moeify.train.parallelize import Layout
    from tests.conftest import COMMON

    model = moe_meta_model(LlamaConfig(**COMMON), 4, 2, 96)
    sharded = plan_memory(model, Layout(4), seq_len=32, micro_batch=1, compute_bytes=4)
    kept = plan_memory(model, Layout(4), seq_len=32, micro_batch=1, compute_bytes=4, gradient_sync="step")
    assert sharded.gradients * 4 == kept.gradients == kept.total_params * 4  # a quarter each (no padding) vs the whole model
    experts = sum(p.numel() for n, p in model.named_parameters() if n.endswith(("gate_up_proj", "down_proj")) and ".experts." in n)
    with_ep = plan_memory(model, Layout(4, ep=2), seq_len=32, micro_batch=1, compute_bytes=4, gradient_sync="step")
    assert with_ep.gradients == (kept.total_params - experts // 2) * 4  # a rank gathers only its own experts
