"""Gradient communication per optimizer step: collectives counted at the dispatcher (`--count-collectives`) on
gloo ranks, with 1 and 4 micro-batches per step. The gradient reduction that can wait runs once per step."""

import json
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from moeify.modeling.hf import attach_moe_blocks
from moeify.plan_communication import collectives
from moeify.train.parallelize import Layout
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


def assert_as_planned(step: dict, model_path: Path, layout: Layout, micro_batches: int, tokens: int, sync: str = "micro-batch",
                      capacity_factor: float | None = None) -> None:
    """`plan-memory`'s collectives against those counted in one optimizer step: calls and bytes exact for
    parameters and gradients (a group may add small calls: routing counts, balance losses, step statistics,
    under 1 KiB each); the all-to-all of tokens within bounds (the plan assumes T k rows a call, balanced;
    counted is each call's input: half the calls send this rank's kept assignments, at most T k, all of them
    when dropless; half send back what its experts received, at most CF T k with a capacity factor, ep T k
    without); and nothing over 1 KiB a call that the plan does not list."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_path))
        attach_moe_blocks(model)
    counted = {(kind, group): value for kind, groups in step["collectives"].items() for group, value in groups.items()}
    planned = collectives(model, layout, micro_batches, tokens, 4, sync)
    assert planned
    for entry in planned:
        calls, size = counted.pop((entry.kind, ",".join(map(str, entry.ranks))), [0, 0])
        if entry.exact:
            extra = calls - entry.calls
            assert extra >= 0 and 0 <= size - entry.bytes <= 1024 * extra, (entry, calls, size)
        elif capacity_factor is None:
            assert calls == entry.calls and entry.bytes / 2 < size <= (1 + layout.ep) / 2 * entry.bytes, (entry, calls, size)
        else:
            assert calls == entry.calls and 0 < size <= (1 + capacity_factor) / 2 * entry.bytes, (entry, calls, size)
    for key, (calls, size) in counted.items():
        assert size <= 1024 * calls, f"{key}: {calls} calls, {size} bytes, not in the plan"


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
    assert_as_planned(four[-1], tiny_moe, Layout(2, parallel="ddp"), 4, 32)


def test_fsdp2_reduce_scatters_once_per_step_with_gradient_sync_step(tiny_moe, tiny_data, tmp_path):
    one = _run(tiny_moe, tiny_data, tmp_path / "one", 2, 8, 4)
    every = _run(tiny_moe, tiny_data, tmp_path / "every", 2, 8, 1)
    once = _run(tiny_moe, tiny_data, tmp_path / "once", 2, 8, 1, "--gradient-sync", "step")
    per_step = _calls(one, "reduce_scatter", "0,1")
    assert per_step[0] > 0 and _calls(once, "reduce_scatter", "0,1") == per_step
    assert _calls(every, "reduce_scatter", "0,1") == [4 * n for n in per_step]
    torch.testing.assert_close(_losses(once), _losses(every), rtol=1e-5, atol=1e-5)
    # resumed across the change: one step reduced every micro-batch, then the rest once per step
    _run(tiny_moe, tiny_data, tmp_path / "changed", 2, 8, 1, "--checkpoint-every", "1", "--stop-after-steps", "1")
    changed = _run(tiny_moe, tiny_data, tmp_path / "changed", 2, 8, 1, "--resume", "--gradient-sync", "step")
    torch.testing.assert_close(_losses(changed), _losses(every), rtol=1e-5, atol=1e-5)
    assert _calls(changed, "reduce_scatter", "0,1")[1:] == per_step[1:]
    assert_as_planned(one[-1], tiny_moe, Layout(2), 1, 4 * 32)
    assert_as_planned(every[-1], tiny_moe, Layout(2), 4, 32)
    assert_as_planned(once[-1], tiny_moe, Layout(2), 4, 32, "step")


def test_hsdp_all_reduces_across_replicas_once_per_step(tiny_moe, tiny_data, tmp_path):
    # 4 ranks as 2 replicas x 2 shards: rank 0's replica group is ranks 0 and 2.
    one = _run(tiny_moe, tiny_data, tmp_path / "one", 4, 16, 4, "--hsdp", "2")
    four = _run(tiny_moe, tiny_data, tmp_path / "four", 4, 16, 1, "--hsdp", "2")
    across = _calls(one, "all_reduce", "0,2")
    assert across[0] > 0 and _calls(four, "all_reduce", "0,2") == across, (one[0]["collectives"], four[0]["collectives"])
    assert _calls(four, "reduce_scatter", "0,1") == [4 * n for n in _calls(one, "reduce_scatter", "0,1")]  # within a replica: as before
    torch.testing.assert_close(_losses(four), _losses(one), **OTHER_MICRO_BATCHES)
    assert_as_planned(four[-1], tiny_moe, Layout(4, hsdp=2), 4, 32)


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


def test_plan_memory_puts_each_collective_on_its_link():
    from moeify.plan_memory import PlanMemoryConfig, run_plan_memory

    def plan(**settings) -> dict:
        step = json.loads(run_plan_memory(PlanMemoryConfig("llama-3-8b", gpus=64, ep=8, batch_size=512, json=True, **settings)))["step"]
        return step | {"by": {(c["kind"], c["group"]): c for c in step["collectives"]}}

    default = plan()  # 8 micro-batches a rank; EP groups are 8 consecutive ranks (one node), expert shards stride 8
    assert default["by"][("all_to_all", "expert parallel")]["link"] == "intra"
    assert default["by"][("all_gather", "expert shard")]["link"] == default["by"][("reduce_scatter", "shard")]["link"] == "inter"
    assert default["by"][("reduce_scatter", "shard")]["calls"] == 33 * 8  # 32 layers and the root, every micro-batch
    assert default["step_s_serial"] == pytest.approx(default["compute_s"] + default["communication_s"])
    assert default["mfu_overlapped"] > default["mfu_serial"] > 0
    once = plan(gradient_sync="step")
    assert once["by"][("reduce_scatter", "shard")]["calls"] == 33 and once["communication_s"] < default["communication_s"]
    one_node = plan(gpus_per_node=64)
    assert {c["link"] for c in one_node["collectives"]} == {"intra"} and one_node["step_s_serial"] < default["step_s_serial"]


def test_expert_parallel_groups_reduce_once_per_step_with_gradient_sync_step(tiny_moe, tiny_data, tmp_path):
    # EP 2 on 4 ranks: the experts are FSDP2 units of their own over the expert-shard group (ranks 0, 2); with
    # --gradient-sync step their reduce-scatters, like the dense ones, run once per step at accumulation 4.
    once = _run(tiny_moe, tiny_data, tmp_path / "once", 4, 16, 1, "--ep", "2", "--gradient-sync", "step")
    assert _calls(once, "reduce_scatter", "0,2")[0] == 2  # one per MoE layer
    assert_as_planned(once[-1], tiny_moe, Layout(4, ep=2), 4, 32, "step")
