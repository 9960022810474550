"""Expert parallelism, HSDP and expert-aware sharding: real 4-rank torchrun jobs (gloo) against one process."""

import json
import sys
from pathlib import Path

import pytest
from transformers import AutoConfig

from moeify.plan_memory import moe_meta_model, plan_memory
from moeify.train.loop import train
from moeify.train.parallelize import Layout
from tests.conftest import error_lines, train_config
from tests.test_communication import assert_as_planned
from tests.test_distributed import run_group
from tests.test_online import ONLINE_FLAGS, _assert_same_as_offline, _initial_weights

STEPS = 6
TRAIN = ["--batch-size", "8", "--lr", "3e-3", "--warmup-steps", "2", "--eval-blocks", "4", "--no-export"]


def _torchrun(out: Path, tiny_data: Path, *flags: str, ranks: int = 4, check: bool = True):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks), "-m", "moeify", "train",
               "--data", str(tiny_data), "--out", str(out), *TRAIN, *flags]
    result = run_group(command, timeout=300)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _losses(out: Path) -> list[float]:
    return [r["loss"] for r in _records(out) if "loss" in r]


# An EP group meets at its experts with the tokens of its ranks: EP2 on 4 ranks with micro-batch 1
# computes each MoE layer over 2 sequences, as one process with micro-batch 2 does; EP4 over 4.
# Routing, capacity drops (global per expert, GShard order) and the balance losses (the group's
# counts and probabilities) are then the same functions of the same tokens. What differs is float
# summation order: gradients reduced over 4 ranks, expert outputs mixed after the all-to-all instead
# of before the down projection. That moves the loss by ~1e-6 per step, compounding through AdamW
# to ~1e-4 by step 6 here (lr 3e-3); 1e-3 bounds it and is far below a step's change (~0.07).
CASES = {
    "ep2-dropless-switch": (["--ep", "2"], 2, []),
    "ep2-capacity-cv2": (["--ep", "2"], 2, ["--capacity-factor", "1.0", "--balance-loss", "cv2"]),
    "ep4-dropless-cv2": (["--ep", "4"], 4, ["--balance-loss", "cv2"]),
    "ep4-capacity-switch": (["--ep", "4"], 4, ["--capacity-factor", "1.0"]),
    "hsdp2-ep2-capacity": (["--ep", "2", "--hsdp", "2"], 2, ["--capacity-factor", "1.0"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_expert_parallel_layouts_match_one_process(case, tiny_moe, tiny_data, tmp_path):
    layout, single_micro, options = CASES[case]
    settings = {"capacity_factor": 1.0} if "--capacity-factor" in options else {}
    if "cv2" in options:
        settings["balance_loss"] = "cv2"
    single = train(train_config(tiny_moe, tiny_data, tmp_path / "one", max_tokens=8 * 32 * STEPS, micro_batch=single_micro, **settings),
                   progress=False)
    _torchrun(tmp_path / "ep", tiny_data, "--model", str(tiny_moe), "--micro-batch", "1", "--max-tokens", str(8 * 32 * STEPS),
              *layout, *options, "--count-collectives")
    records = [r for r in _records(tmp_path / "ep") if "loss" in r]
    ep, hsdp = int(layout[1]), int(layout[3]) if "--hsdp" in layout else 1
    assert_as_planned(records[-1], tiny_moe, Layout(4, ep=ep, hsdp=hsdp), 2, 32, capacity_factor=settings.get("capacity_factor"))
    assert len(records) == STEPS
    for step, (a, b) in enumerate(zip([r["loss"] for r in records], single.losses), 1):
        assert abs(a - b) < 1e-3, f"step {step}: {a} vs {b}"
    single_records = [r for r in _records(tmp_path / "one") if "loss" in r]
    assert records[0]["balance_loss"] == pytest.approx(single_records[0]["balance_loss"], rel=1e-5)
    if settings.get("capacity_factor"):  # the same assignments dropped (the first step's weights are identical)
        assert records[0]["dropped_tokens"] == single_records[0]["dropped_tokens"] > 0
    assert abs(records[-1]["loss"] - records[0]["loss"]) > 0.1  # it did train


def test_resume_across_layouts(tiny_moe, tiny_data, tmp_path):
    # One run, two steps at a time: 1 process -> EP2 x FSDP2 -> EP4 -> 1 process, against one
    # uninterrupted process. Without a balance loss every layout computes the same function of the same
    # batch (the micro-batch grouping only matters through the per-group balance statistics); the
    # tolerance is the float-summation one of the test above.
    budget = ["--max-tokens", str(8 * 32 * 8), "--balance-loss", "none", "--checkpoint-every", "2"]
    reference = train(train_config(tiny_moe, tiny_data, tmp_path / "reference", max_tokens=8 * 32 * 8, balance_loss="none"),
                      progress=False).losses
    out = tmp_path / "run"
    from moeify.cli import main

    common = ["train", "--model", str(tiny_moe), "--data", str(tiny_data), "--out", str(out), *TRAIN, *budget]
    assert main([*common, "--micro-batch", "4", "--stop-after-steps", "2"]) == 0
    _torchrun(out, tiny_data, "--model", str(tiny_moe), "--micro-batch", "1", *budget, "--ep", "2", "--resume", "--stop-after-steps", "2")
    _torchrun(out, tiny_data, "--model", str(tiny_moe), "--micro-batch", "1", *budget, "--ep", "4", "--resume", "--stop-after-steps", "2")
    assert main([*common, "--micro-batch", "4", "--resume"]) == 0
    losses = _losses(out)
    assert len(losses) == 8
    assert losses == pytest.approx(reference, abs=1e-3)
    assert losses[:2] == reference[:2]  # the first segment is the same process and settings


def test_online_upcycling_with_expert_parallelism_equals_build(tiny_models, tiny_moe, tiny_data, tmp_path):
    _torchrun(tmp_path / "init", tiny_data, "--from-dense", str(tiny_models["llama"]), *ONLINE_FLAGS, "--micro-batch", "1",
              "--max-tokens", str(8 * 32), "--ep", "2", "--stop-after-steps", "0")
    _assert_same_as_offline(_initial_weights(tmp_path / "init", AutoConfig.from_pretrained(tiny_moe)), tiny_moe)


def test_more_ranks_than_experts_shards_without_padding_as_planned(tiny_models, tiny_data, tmp_path):
    # 2 experts on 4 ranks: FSDP2's default Shard(0) would give ranks 2 and 3 one expert of padding each.
    from moeify.build import build, build_config

    dense = tiny_models["llama"]
    offline = build(build_config(model=str(dense), out=tmp_path / "offline", method="upcycle", num_experts=2, top_k=1), progress=False)
    flags = ["--from-dense", str(dense), "--method", "upcycle", "--experts", "2", "--top-k", "1", "--micro-batch", "1",
             "--max-tokens", str(8 * 32)]
    _torchrun(tmp_path / "init", tiny_data, *flags, "--stop-after-steps", "0")
    _assert_same_as_offline(_initial_weights(tmp_path / "init", AutoConfig.from_pretrained(offline)), offline)
    _torchrun(tmp_path / "step", tiny_data, *flags)
    first, step_one = _records(tmp_path / "init")[0], _records(tmp_path / "step")[1]
    dense_config = AutoConfig.from_pretrained(dense)
    planned = plan_memory(moe_meta_model(dense_config, 2, 1, dense_config.intermediate_size), Layout(4), seq_len=32,
                          micro_batch=1, compute_bytes=4)
    assert first["parameter_bytes_per_rank"] == [planned.parameters] * 4
    assert step_one["gradient_bytes_per_rank"] == [planned.gradients] * 4
    assert max(step_one["optimizer_bytes_per_rank"]) == planned.optimizer
    # No padding: the 4 ranks together hold exactly the parameters (the experts are sharded on a
    # dimension 4 divides; the tiny model's other tensors, 64 and 320 rows, divide by 4 too).
    assert sum(first["parameter_bytes_per_rank"]) == planned.total_params * 4


@pytest.mark.parametrize("flags, message", [
    (["--ep", "2"], "--ep 2 must divide the 1 ranks of a shard group"),
    (["--hsdp", "2"], "--hsdp 2 must divide the 1 ranks"),
])
def test_bad_layouts_on_one_process(flags, message, tiny_moe, tiny_data, tmp_path, capsys):
    from moeify.cli import main

    assert main(["train", "--model", str(tiny_moe), "--data", str(tiny_data), "--out", str(tmp_path / "run"), *TRAIN, *flags]) != 0
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and message in lines[0], lines
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.parametrize("flags, message", [
    (["--model", "MOE", "--ep", "2", "--parallel", "ddp"], "--ep and --hsdp shard with FSDP2; use --parallel fsdp"),
    (["--from-dense", "DENSE", "--method", "random-split", "--experts", "3", "--top-k", "1", "--ep", "2"], "--ep 2 must divide the 3 experts"),
    (["--model", "DENSE", "--ep", "2"], "--ep 2 splits the experts of an MoE; this model is dense"),
])
def test_bad_layouts_on_two_ranks(flags, message, tiny_models, tiny_moe, tiny_data, tmp_path):
    flags = [{"MOE": str(tiny_moe), "DENSE": str(tiny_models["llama"])}.get(f, f) for f in flags]
    result = _torchrun(tmp_path / "run", tiny_data, *flags, "--micro-batch", "1", ranks=2, check=False)
    assert result.returncode != 0
    assert f"moeify: error: {message}" in result.stderr, result.stderr[-2000:]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # stopped before any training step


def test_global_capacity_keeps_what_one_process_keeps():
    # kept_counts decides from the group's counts alone which of each rank's assignments fit; one
    # process holding the ranks' tokens one after another ranks them with capacity_ranks (GShard).
    import torch

    from moeify.modeling.expert_parallel import kept_counts
    from moeify.modeling.moe_block import capacity_ranks

    torch.manual_seed(0)
    R, T, K, E, C = 3, 10, 2, 4, 6
    indices_RTK = torch.stack([torch.randperm(E)[:K] for _ in range(R * T)]).view(R, T, K)
    counts_RKE = torch.zeros(R, K, E, dtype=torch.long)
    for r in range(R):
        for c in range(K):
            counts_RKE[r, c] = torch.bincount(indices_RTK[r, :, c], minlength=E)
    kept_RKE = kept_counts(counts_RKE, C)
    ranks_TK = capacity_ranks(indices_RTK.reshape(R * T, K), E).view(R, T, K)
    for r in range(R):
        for c in range(K):
            expected = torch.bincount(indices_RTK[r, :, c][ranks_TK[r, :, c] < C], minlength=E)
            assert torch.equal(kept_RKE[r, c], expected)
    assert kept_RKE.sum(dim=(0, 1)).max() <= C and (kept_RKE < counts_RKE).any()  # the limit binds somewhere
    # A hand case: one expert, 2 ranks, 3 first and 2 second choices each, capacity 7: all first choices
    # (6) and rank 0's first second choice fit.
    assert kept_counts(torch.tensor([[[3], [2]], [[3], [2]]]), 7).tolist() == [[[3], [1]], [[3], [0]]]


def test_distillation_under_expert_parallelism_matches_one_process(tiny_moe, tiny_data, tmp_path):
    # EP2 on 4 ranks, the dense teacher sharded over the dense mesh beside the student: the same objective,
    # the teacher's CE and the KL as one process with micro-batch 2 (tolerance as above).
    steps = 4
    single = train(train_config(tiny_moe, tiny_data, tmp_path / "one", max_tokens=8 * 32 * steps, micro_batch=2, distill=True,
                                distill_alpha=0.5), progress=False)
    _torchrun(tmp_path / "ep", tiny_data, "--model", str(tiny_moe), "--micro-batch", "1", "--max-tokens", str(8 * 32 * steps),
              "--ep", "2", "--distill", "--distill-alpha", "0.5")
    records = [r for r in _records(tmp_path / "ep") if "distill_loss" in r]
    expected = [r for r in _records(tmp_path / "one") if "distill_loss" in r]
    assert len(records) == len(expected) == steps and single.finished
    for a, b in zip(records, expected):
        assert abs(a["distill_loss"] - b["distill_loss"]) < 1e-3 and abs(a["teacher_ce"] - b["teacher_ce"]) < 1e-5, (a, b)
