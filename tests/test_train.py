"""The training engine on tiny models, one process (multi-process runs are in test_distributed.py)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from moeify.data.sampler import DynamicWeights
from moeify.errors import MoeifyError
from moeify.train.loop import train
from tests.conftest import logits_of, train_config


def _metrics(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_training_lowers_heldout_loss_and_exports(tiny_moe, tiny_data, tmp_path):
    result = train(train_config(tiny_moe, tiny_data, tmp_path / "run", export=True), progress=False)
    records = _metrics(tmp_path / "run")
    start, end = records[0]["heldout_loss"], records[-1]["heldout_loss"]
    assert sum(end.values()) < sum(start.values()) - 0.5, (start, end)
    step = records[-1]
    assert all(torch.isfinite(torch.tensor(step[k])) for k in ("balance_loss", "z_loss", "grad_norm", "router_entropy"))
    assert len(step["expert_load"]) == 2 and all(abs(sum(layer) - 1) < 1e-6 for layer in step["expert_load"])
    assert step["dropped_tokens"] == 0 and step["mfu"] > 0 and step["tokens"] == 12 * 8 * 32
    assert records[1]["lr"] < records[2]["lr"] and records[-1]["lr"] < records[2]["lr"]  # warm-up, then decay
    # The exported stock checkpoint reloads in transformers with the trained weights.
    assert result.model_dir is not None and json.loads((result.model_dir / "moeify.json").read_text())["training"]["steps"] == 12
    ids = torch.randint(0, 320, (1, 16))
    assert not torch.allclose(logits_of(result.model_dir, ids), logits_of(tiny_moe, ids))
    assert (tmp_path / "run" / "tensorboard").is_dir()


def test_resume_continues_with_identical_losses(tiny_moe, tiny_data, tmp_path):
    settings = dict(checkpoint_every=3, noisy_gate=True, bias_update_rate=1e-3, domain_weights="uniform")
    full = train(train_config(tiny_moe, tiny_data, tmp_path / "full", **settings), progress=False)
    first = train(train_config(tiny_moe, tiny_data, tmp_path / "split", **settings), progress=False, stop_after_steps=5)
    assert first.steps == 5
    second = train(train_config(tiny_moe, tiny_data, tmp_path / "split", resume=True, **settings), progress=False)
    assert second.steps == 12
    torch.testing.assert_close(first.losses + second.losses, full.losses, rtol=1e-6, atol=1e-6)
    kept = sorted(p.name for p in (tmp_path / "split" / "checkpoints").iterdir())
    assert kept == ["step-000009", "step-000012"]  # keep_checkpoints=2


def test_resume_skips_a_damaged_checkpoint_and_logs_each_step_once(tiny_moe, tiny_data, tmp_path, capsys):
    settings = dict(checkpoint_every=3, noisy_gate=True)
    full = train(train_config(tiny_moe, tiny_data, tmp_path / "full", **settings), progress=False)
    out = tmp_path / "split"
    train(train_config(tiny_moe, tiny_data, out, **settings), progress=False, stop_after_steps=8)  # checkpoints 6 and 8 kept
    newest = out / "checkpoints" / "step-000008"
    shard = max((newest / "dcp").glob("*.distcp"), key=lambda p: p.stat().st_size)
    shard.write_bytes(shard.read_bytes()[:-100])  # a file cut short, as by a full disk or a copy stopped midway
    capsys.readouterr()
    resumed = train(train_config(tiny_moe, tiny_data, out, resume=True, **settings), progress=False)
    note = capsys.readouterr().err
    assert f"checkpoint {newest} is damaged (dcp/{shard.name} has" in note and "kept as damaged-step-000008; resuming from step-000006" in note
    assert (out / "checkpoints" / "damaged-step-000008").is_dir()  # kept, never resumed from
    assert resumed.losses == pytest.approx(full.losses[6:], abs=1e-6)  # from step 6's checkpoint
    steps = [r["step"] for r in _metrics(out) if "loss" in r]
    assert steps == list(range(1, 13))  # steps 7 and 8 ran twice and are logged once


def test_resume_with_every_checkpoint_damaged_names_the_fix(tiny_moe, tiny_data, tmp_path):
    out = tmp_path / "run"
    train(train_config(tiny_moe, tiny_data, out, checkpoint_every=2, keep_checkpoints=1), progress=False, stop_after_steps=2)
    (out / "checkpoints" / "step-000002" / "trainer.json").write_text('{"step": 2, "tok')
    with pytest.raises(MoeifyError, match=r"--resume: no intact checkpoint in .*; start afresh with --force"):
        train(train_config(tiny_moe, tiny_data, out, resume=True), progress=False)


def test_sigkill_during_checkpoint_save_leaves_previous_checkpoint_resumable(tiny_moe, tiny_data, tmp_path):
    out = tmp_path / "run"
    config = ["--model", str(tiny_moe), "--data", str(tiny_data), "--out", str(out), "--batch-size", "8", "--micro-batch", "4",
              "--max-tokens", str(8 * 32 * 400), "--checkpoint-every", "1", "--keep-checkpoints", "3", "--no-export"]
    process = subprocess.Popen([sys.executable, "-m", "moeify", "train", *config], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    killed_in_save = False
    while time.time() < deadline and process.poll() is None:
        root = out / "checkpoints"
        if root.is_dir() and len(list(root.glob("step-*"))) >= 2 and list(root.glob(".step-*.tmp")):
            os.kill(process.pid, signal.SIGKILL)
            killed_in_save = True
            break
        time.sleep(0.001)
    process.wait()
    assert killed_in_save, "the run ended before a save could be interrupted"
    complete = sorted((out / "checkpoints").glob("step-*"))
    assert complete and list((out / "checkpoints").glob(".step-*.tmp"))
    resumed = train(train_config(tiny_moe, tiny_data, out, max_tokens=8 * 32 * 400, resume=True, checkpoint_every=1,
                                 keep_checkpoints=3), progress=False, stop_after_steps=1)
    assert resumed.steps == int(complete[-1].name.split("-")[1]) + 1


def test_sigterm_finishes_the_step_checkpoints_and_says_how_to_resume(tiny_moe, tiny_data, tmp_path):
    """As a scheduler (Slurm, Kubernetes) stops a job: SIGTERM, then SIGKILL some seconds later."""
    out = tmp_path / "run"
    config = ["--model", str(tiny_moe), "--data", str(tiny_data), "--out", str(out), "--batch-size", "8", "--micro-batch", "4",
              "--max-tokens", str(8 * 32 * 400), "--no-export"]
    process = subprocess.Popen([sys.executable, "-m", "moeify", "train", *config], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not ((out / "metrics.jsonl").exists() and len(_metrics(out)) >= 3):
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr[-2000:]
    step = max(r["step"] for r in _metrics(out))
    assert 2 <= step < 400 and (out / "checkpoints" / f"step-{step:06d}").is_dir()
    assert f"stopped by SIGTERM after step {step}, checkpointed; continue with --resume --out {out}" in stdout
    resumed = train(train_config(tiny_moe, tiny_data, out, max_tokens=8 * 32 * 400, resume=True), progress=False, stop_after_steps=1)
    assert resumed.steps == step + 1


def test_capacity_factor_one_drops_tokens_and_dropless_none(tiny_moe, tiny_data, tmp_path):
    capped = train(train_config(tiny_moe, tiny_data, tmp_path / "cf1", capacity_factor=1.0, max_tokens=8 * 32 * 2), progress=False)
    dropless = train(train_config(tiny_moe, tiny_data, tmp_path / "none", max_tokens=8 * 32 * 2), progress=False)
    assert capped.steps == dropless.steps == 2
    assert all(r["dropped_tokens"] > 0 for r in _metrics(tmp_path / "cf1")[1:])
    assert all(r["dropped_tokens"] == 0 for r in _metrics(tmp_path / "none")[1:])


def test_dynamic_rules_move_weight_to_domain_furthest_above_reference():
    weights = {"easy": 0.5, "hard": 0.3, "mid": 0.2}
    losses = {"easy": 1.0, "hard": 4.0, "mid": 2.0}
    reference = {"easy": 1.0, "hard": 2.5, "mid": 1.8}
    for rule in ("softmax", "clipped-exp"):
        new = DynamicWeights(reference, rule).update(weights, losses)
        assert new["hard"] > weights["hard"] and new["easy"] < weights["easy"]
        assert abs(sum(new.values()) - 1) < 1e-9


def test_dynamic_sampling_end_to_end_logs_weight_updates(tiny_moe, tiny_data, tmp_path):
    # References far below the 'code' loss and at the others' loss: weight must flow to 'code'.
    references = "code=0.0,docstrings=20,reference=20"
    train(train_config(tiny_moe, tiny_data, tmp_path / "dyn", dynamic="softmax", eval_every=2, domain_weights="uniform",
                       reference_losses=references, max_tokens=8 * 32 * 6), progress=False)
    records = [r for r in _metrics(tmp_path / "dyn") if "domain_weights" in r]
    assert records[0]["domain_weights"]["code"] == pytest.approx(1 / 3)
    assert records[-1]["domain_weights"]["code"] > 0.9


def test_dense_model_trains_too(tiny_models, tiny_data, tmp_path):
    result = train(train_config(tiny_models["llama"], tiny_data, tmp_path / "dense", max_tokens=8 * 32 * 3), progress=False)
    assert result.steps == 3 and "balance_loss" not in _metrics(tmp_path / "dense")[-1]


def test_bad_inputs(tiny_moe, tiny_models, tiny_data, tmp_path):
    from moeify.data.prepare import PrepareConfig, prepare

    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("   \n")
    with pytest.raises(MoeifyError, match="no text"):
        prepare(PrepareConfig(str(tiny_moe), sources=[f"web={tmp_path / 'empty'}"], out=tmp_path / "d1"), progress=False)
    (tmp_path / "small.txt").write_text("a few words only")
    with pytest.raises(MoeifyError, match="fewer than one block"):
        prepare(PrepareConfig(str(tiny_moe), sources=[f"web={tmp_path / 'small.txt'}"], out=tmp_path / "d2"), progress=False)
    assert not (tmp_path / "d1").exists() and not (tmp_path / "d2").exists()
    with pytest.raises(MoeifyError, match="another tokenizer"):
        smol_like = tmp_path / "other-tok"
        import shutil

        shutil.copytree(tiny_moe, smol_like)
        (smol_like / "tokenizer.json").write_text((smol_like / "tokenizer.json").read_text().replace("<eos>", "<end>"))
        train(train_config(smol_like, tiny_data, tmp_path / "r0"), progress=False)
    train(train_config(tiny_moe, tiny_data, tmp_path / "r1", max_tokens=8 * 32), progress=False)
    with pytest.raises(MoeifyError, match="another model"):
        train(train_config(tiny_models["llama"], tiny_data, tmp_path / "r1", resume=True), progress=False)
    with pytest.raises(MoeifyError, match="earlier run"):
        train(train_config(tiny_moe, tiny_data, tmp_path / "r1"), progress=False)
    with pytest.raises(MoeifyError, match="became nan at step 2; training stopped, last good checkpoint: .*step-000001"):
        train(train_config(tiny_moe, tiny_data, tmp_path / "r2", lr=1e12, warmup_steps=0, grad_clip=0, checkpoint_every=1), progress=False)
    assert [p.name for p in (tmp_path / "r2" / "checkpoints").iterdir()] == ["step-000001"]


def _tensors(path):
    from safetensors.torch import load_file

    return load_file(str(path / "model" / "model.safetensors"))


@pytest.mark.parametrize("trainable, frozen, moving", [
    ("moe", "model.layers.0.self_attn.q_proj.weight", "model.layers.0.block_sparse_moe.gate.weight"),
    ("frozen-router", "model.layers.0.block_sparse_moe.gate.weight", "model.layers.0.self_attn.q_proj.weight"),
])
def test_trainable_options(trainable, frozen, moving, tiny_moe, tiny_data, tmp_path):
    from safetensors.torch import load_file

    train(train_config(tiny_moe, tiny_data, tmp_path / "run", trainable=trainable, max_tokens=8 * 32 * 2, export=True), progress=False)
    before, after = load_file(str(tiny_moe / "model.safetensors")), _tensors(tmp_path / "run")
    assert torch.equal(before[frozen], after[frozen])
    assert not torch.equal(before[moving], after[moving])


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_gives_the_same_losses(mode, tiny_moe, tiny_data, tmp_path):
    plain = train(train_config(tiny_moe, tiny_data, tmp_path / "a", max_tokens=8 * 32 * 3), progress=False)
    checkpointed = train(train_config(tiny_moe, tiny_data, tmp_path / "b", max_tokens=8 * 32 * 3, activation_checkpointing=mode),
                         progress=False)
    torch.testing.assert_close(checkpointed.losses, plain.losses, rtol=1e-5, atol=1e-5)
