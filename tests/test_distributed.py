"""Real multi-process runs: torchrun, gloo, FSDP2 / DDP, against one process with the same global batch."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moeify.train.loop import train
from tests.conftest import train_config

STEPS = 6


def free_port() -> int:
    """A TCP port free on the loopback now (the OS picks it), for a rendezvous without torchrun."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_group(command: list[str], timeout: float) -> subprocess.CompletedProcess:
    """Run a launcher in its own process group; on timeout kill the group (torchrun's workers too)."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        raise AssertionError(f"{command[:6]}... timed out after {timeout}s:\n{stderr[-3000:]}") from None
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def moeify_errors(stderr: str) -> list[str]:
    """The `moeify: error:` lines of a launcher's stderr (torchrun adds its own report of the failed ranks)."""
    return [line for line in stderr.splitlines() if line.startswith("moeify: error:")]


def _torchrun(tiny_moe: Path, tiny_data: Path, out: Path, parallel: str, *extra: str) -> list[dict]:
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "moeify", "train",
        "--model", str(tiny_moe), "--data", str(tiny_data), "--out", str(out), "--batch-size", "8", "--micro-batch", "2",
        "--max-tokens", str(8 * 32 * STEPS), "--lr", "3e-3", "--warmup-steps", "2", "--eval-blocks", "4",
        "--parallel", parallel, *extra,
    ]
    result = run_group(command, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "returned a view tensor" not in result.stderr  # FSDP2's warning about the root's output
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("parallel", ["fsdp", "ddp"])
def test_two_ranks_match_one_rank(parallel, tiny_moe, tiny_data, tmp_path):
    # One process: micro-batch 4 x accumulation 2. Two ranks: micro-batch 2 each x accumulation 2.
    # Same global batch, same samples in the same order. The cross-entropy is the same function of the
    # same tokens; what differs is float summation order (all-reduce of gradients, sharded optimizer
    # update) and the Switch aux loss, which is computed per rank on half the tokens (its f*P product
    # is not linear in the batch). With coefficient 0.01 that moves the loss by well under 1e-3.
    single = train(train_config(tiny_moe, tiny_data, tmp_path / "one", max_tokens=8 * 32 * STEPS, export=False), progress=False)
    records = _torchrun(tiny_moe, tiny_data, tmp_path / "two", parallel, "--no-export")
    losses = [r["loss"] for r in records[1:]]
    assert len(losses) == STEPS
    for step, (a, b) in enumerate(zip(losses, single.losses), 1):
        assert abs(a - b) < 2e-3, f"step {step}: {a} vs {b}"
    assert abs(losses[-1] - losses[0]) > 0.1  # it did train


def test_fsdp2_with_compile_matches_one_eager_rank(tiny_moe, tiny_data, tmp_path):
    # torchtitan's order, compile each decoder layer then fully_shard it, on 2 ranks; compiled kernels
    # reorder float arithmetic by ~1e-6, far inside the two-ranks-vs-one tolerance above.
    single = train(train_config(tiny_moe, tiny_data, tmp_path / "one", max_tokens=8 * 32 * STEPS, export=False), progress=False)
    records = _torchrun(tiny_moe, tiny_data, tmp_path / "two", "fsdp", "--no-export", "--compile")
    losses = [r["loss"] for r in records[1:]]
    assert len(losses) == STEPS
    for step, (a, b) in enumerate(zip(losses, single.losses), 1):
        assert abs(a - b) < 2e-3, f"step {step}: {a} vs {b}"


def test_fsdp2_bf16_mixed_precision_matches_one_rank(tiny_moe, tiny_data, tmp_path):
    # FSDP2 gathers bf16 parameters (MixedPrecisionPolicy param_dtype=bf16) and reduces gradients in
    # fp32; one process computes under bf16 autocast from fp32 weights. Both round the same matmul
    # operands to bf16, but in other places (FSDP also holds norms, residual stream and attention in
    # bf16; autocast keeps them fp32), so they differ by bf16 rounding: a relative 2^-8 per value,
    # averaging to ~1e-3 of the loss here. 1e-2 absolute on a loss near 5.8 bounds that with room.
    # A small --loss-chunk also runs the chunked cross-entropy (recomputed in the backward) under FSDP2.
    single = train(train_config(tiny_moe, tiny_data, tmp_path / "one", max_tokens=8 * 32 * STEPS, export=False, dtype="bf16",
                                loss_chunk=16), progress=False)
    records = _torchrun(tiny_moe, tiny_data, tmp_path / "two", "fsdp", "--no-export", "--dtype", "bf16", "--loss-chunk", "16")
    losses = [r["loss"] for r in records[1:]]
    assert len(losses) == STEPS
    for step, (a, b) in enumerate(zip(losses, single.losses), 1):
        assert abs(a - b) < 1e-2, f"step {step}: {a} vs {b}"
    assert abs(losses[-1] - losses[0]) > 0.1  # it did train


def test_fsdp_run_exports_and_resumes(tiny_moe, tiny_data, tmp_path):
    out = tmp_path / "run"
    records = _torchrun(tiny_moe, tiny_data, out, "fsdp", "--checkpoint-every", "3", "--stop-after-steps", "3", "--no-export")
    assert records[-1]["step"] == 3
    assert sorted(p.name for p in (out / "checkpoints" / "step-000003" / "dcp").iterdir() if p.suffix == ".distcp") == [
        "__0_0.distcp", "__1_0.distcp"]
    records = _torchrun(tiny_moe, tiny_data, out, "fsdp", "--resume", "--checkpoint-every", "3")
    full = _torchrun(tiny_moe, tiny_data, tmp_path / "full", "fsdp", "--no-export")
    assert [r["step"] for r in records[1:]] == list(range(1, STEPS + 1))  # metrics.jsonl continues across the resume
    assert [r["loss"] for r in records[1:]] == pytest.approx([r["loss"] for r in full[1:]], abs=1e-5)
    assert (out / "model" / "model.safetensors").exists()


def test_an_error_every_rank_meets_is_printed_once(tiny_moe, tmp_path):
    # The data check runs on rank 0 and is broadcast: before, each of the N ranks printed the line.
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "moeify", "train",
               "--model", str(tiny_moe), "--data", str(tmp_path / "nothing"), "--out", str(tmp_path / "out")]
    result = run_group(command, timeout=120)
    assert result.returncode != 0
    errors = moeify_errors(result.stderr)
    assert errors == [f"moeify: error: {tmp_path / 'nothing'} is not a prepared data directory (no meta.json); run `moeify data prepare` first"]


def test_a_disk_filling_at_a_checkpoint_under_torchrun_is_printed_once(tiny_moe, tiny_data, tmp_path, monkeypatch):
    # Both ranks stop with the agreed reason; only rank 0 prints it (the loop rewords it, keeping that).
    from tests.test_bad_input import _MOUNTED, target

    with target(tmp_path, "full-1m", monkeypatch) as full:
        if _MOUNTED["full-1m"] != "tmpfs mount":
            pytest.skip("needs a real 1 MiB tmpfs (mount not allowed here); test_bad_input covers one process")
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "moeify", "train",
                   "--model", str(tiny_moe), "--data", str(tiny_data), "--out", str(full / "run"), "--batch-size", "8",
                   "--micro-batch", "2", "--max-tokens", "512", "--eval-blocks", "1", "--checkpoint-every", "1", "--no-export"]
        result = run_group(command, timeout=180)
        root = full / "run" / "checkpoints"  # removed with the failed first checkpoint
        leftovers = sorted(p.name for p in root.iterdir()) if root.exists() else []
    assert result.returncode != 0
    errors = moeify_errors(result.stderr)
    assert len(errors) == 1, result.stderr[-3000:]
    assert "No space left on device" in errors[0] and "training stopped at step 1; no checkpoint was completed" in errors[0]
    assert leftovers == []


@pytest.mark.parametrize("flags", [["--lr", "abc"], ["--batch-size", "0"], ["--no-such-flag"]])
def test_a_bad_command_line_is_printed_by_each_nodes_local_rank_0(flags, monkeypatch, capsys):
    # Every rank torchrun starts on a node has the same command line, so the others say nothing.
    from moeify.cli import main

    monkeypatch.setenv("RANK", "5")
    for local_rank, printed in (("1", False), ("0", True)):
        monkeypatch.setenv("LOCAL_RANK", local_rank)
        assert main(["train", "--data", "x", *flags]) == 2
        stderr = capsys.readouterr().err
        assert stderr.startswith("moeify: error:") == printed and (stderr.count("\n") == 1 if printed else stderr == "")


def _save_with_failing_ranks(rank: int, port: int, out: Path, failing_rank: int | str, failing_file: str) -> None:
    """One of two gloo ranks (or "every" rank) cannot write `failing_file` (the disk fills under it);
    then both save again."""
    import errno
    import pathlib
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    from moeify.errors import describe_os_error, left_to_another_rank
    from moeify.train.checkpoint import save_checkpoint
    from moeify.train.distributed import DistEnv

    failing_file = failing_file.format(rank=rank)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=30))
    env = DistEnv(rank, 2, rank, torch.device("cpu"))
    model = torch.nn.Linear(4, 4)
    optimizer = torch.optim.AdamW(model.parameters())
    disk_full = OSError(errno.ENOSPC, "No space left on device", failing_file)
    real_save, real_write_text = torch.save, pathlib.Path.write_text

    def save(obj, path, *args, **kwargs):  # DCP also saves into in-memory buffers, which have no name
        if getattr(path, "name", None) == failing_file:
            raise disk_full
        return real_save(obj, path, *args, **kwargs)

    def write_text(path, *args, **kwargs):
        if path.name == failing_file:
            raise disk_full
        return real_write_text(path, *args, **kwargs)

    if rank == failing_rank or failing_rank == "every":
        torch.save, pathlib.Path.write_text = save, write_text
    try:
        save_checkpoint(out, 1, model, optimizer, {"step": 1}, env, keep=2)
        outcome, printed = "saved", True
    except OSError as error:
        outcome, printed = describe_os_error(error), not left_to_another_rank(error)
    torch.save, pathlib.Path.write_text = real_save, real_write_text
    dist.barrier()
    root = out / "checkpoints"  # removed with the failed first checkpoint when nothing else is in it
    leftovers = sorted(p.name for p in root.iterdir()) if root.exists() else []
    dist.barrier()
    save_checkpoint(out, 2, model, optimizer, {"step": 2}, env, keep=2)  # the group is still in step
    (out / f"outcome-{rank}.json").write_text(json.dumps({"first": outcome, "printed": printed, "leftovers": leftovers}))
    dist.destroy_process_group()


@pytest.mark.parametrize("failing_rank, failing_file", [(1, "rng-rank1.pt"), (0, "trainer.json"), ("every", "rng-rank{rank}.pt")])
def test_a_checkpoint_write_failing_on_some_rank_stops_every_rank(failing_rank, failing_file, tmp_path):
    # Before, the other rank waited at a barrier for the failed one until the job was killed.
    import torch.multiprocessing as mp

    context = mp.start_processes(_save_with_failing_ranks, args=(free_port(), tmp_path, failing_rank, failing_file), nprocs=2,
                                 join=False, start_method="spawn")
    deadline = time.monotonic() + 120
    while not context.join(timeout=max(1.0, deadline - time.monotonic())):  # True once both ranks have ended well
        assert time.monotonic() < deadline, "the ranks did not finish"
    outcomes = [json.loads((tmp_path / f"outcome-{rank}.json").read_text()) for rank in range(2)]
    for rank, outcome in enumerate(outcomes):  # each rank's own failure, or the first rank's when it had none
        file = failing_file.format(rank=rank)
        assert outcome["first"] == f"cannot write or read {file}: No space left on device; free some space or write elsewhere"
        assert outcome["leftovers"] == []  # neither a temporary nor a checkpoint that looks complete
    assert [outcome["printed"] for outcome in outcomes] == [True, False]  # one line, from rank 0, whichever ranks failed
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000002"]
    assert (tmp_path / "checkpoints" / "step-000002" / "trainer.json").is_file()


def _worker_pids(launcher: int) -> dict[int, int]:
    """LOCAL_RANK -> pid of each worker torchrun started (its children carrying LOCAL_RANK)."""
    workers = {}
    for child in Path(f"/proc/{launcher}/task/{launcher}/children").read_text().split():
        try:
            environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        rank = next((line.split(b"=", 1)[1] for line in environ if line.startswith(b"LOCAL_RANK=")), None)
        if rank is not None:
            workers[int(rank)] = int(child)
    return workers


def test_a_rank_killed_mid_training_ends_the_job_and_resume_matches(tiny_moe, tiny_data, tmp_path):
    # SIGKILL on rank 1 (out of memory, a lost node): torchrun ends the job (rank 0, blocked in a collective with
    # a dead peer, is stopped by the launcher), and --resume from the last checkpoint gives the losses of a run
    # never interrupted (the same 400-step schedule, stopped at the same step).
    def command(out: Path, *extra: str) -> list[str]:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "moeify", "train",
                "--model", str(tiny_moe), "--data", str(tiny_data), "--out", str(out), "--batch-size", "8", "--micro-batch", "2",
                "--max-tokens", str(8 * 32 * 400), "--lr", "3e-3", "--warmup-steps", "2", "--eval-blocks", "4", "--checkpoint-every", "1",
                "--no-export", *extra]

    def losses(out: Path) -> dict[int, float]:
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["loss"] for r in records if "loss" in r}

    out = tmp_path / "killed"
    process = subprocess.Popen(command(out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (out / "checkpoints" / "step-000002").is_dir():
            time.sleep(0.1)
        os.kill(_worker_pids(process.pid)[1], signal.SIGKILL)
        killed_at = time.time()
        process.communicate(timeout=90)
        assert process.returncode != 0 and time.time() - killed_at < 60
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    last = max(int(p.name.split("-")[1]) for p in (out / "checkpoints").iterdir() if p.name.startswith("step-"))
    resumed = run_group(command(out, "--resume", "--stop-after-steps", "3"), timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    full = run_group(command(tmp_path / "full", "--stop-after-steps", str(last + 3)), timeout=300)
    assert full.returncode == 0, full.stderr[-3000:]
    expected, got = losses(tmp_path / "full"), losses(out)
    assert sorted(got) == list(range(1, last + 4))  # each step logged once
    for step in range(last + 1, last + 4):
        assert got[step] == pytest.approx(expected[step], abs=1e-5), step
