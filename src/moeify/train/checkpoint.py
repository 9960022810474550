"""Resumable training checkpoints with torch.distributed.checkpoint (sharded under FSDP2).

out/checkpoints/step-000120/
  dcp/                model and optimizer state (one file per rank)
  trainer.json        step, tokens, scheduler, sampler position and domain weights, model identity
  rng-rank{R}.pt      each rank's torch RNG state
  manifest.json       every other file's size and BLAKE2b digest, written last
DCP stores every tensor whole (global shapes), so a run resumes under another layout: other
numbers of ranks, FSDP2, HSDP or expert parallelism.
A checkpoint is written to `.step-000120.tmp` and renamed when every rank has finished, so a
crash during a save leaves the previous checkpoints intact; only the newest `keep` are kept. A
write that fails on any rank stops every rank with that rank's reason (no rank waits on the others).
`--resume` checks the newest checkpoint against its manifest (the ranks share the reading) and, if a
file is missing, short or changed, renames it `damaged-step-…` and resumes from the newest intact one,
with a note naming both.
"""

import contextlib
import errno
import hashlib
import json
import shutil
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from moeify.errors import MoeifyError, same_on_every_rank
from moeify.train.distributed import DistEnv, gather_to_list

CHECKPOINTS = "checkpoints"
MANIFEST = "manifest.json"


def checkpoint_root(out: Path) -> Path:
    return out / CHECKPOINTS


def complete_checkpoints(out: Path) -> list[Path]:
    root = checkpoint_root(out)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.name.startswith("step-") and (p / "trainer.json").is_file())


@contextlib.contextmanager
def _single_process_is_intended():
    """DCP warns that it "assumes the intent" of one process when no process group exists; one process is
    what a run without torchrun is, so the warning only confuses."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is (disabled, )?unavailable or uninitialized")
        yield


def save_checkpoint(out: Path, step: int, model: nn.Module, optimizer, trainer_state: dict, env: DistEnv, keep: int) -> Path:
    root = checkpoint_root(out)
    final = root / f"step-{step:06d}"
    tmp = root / f".step-{step:06d}.tmp"
    error = None
    if env.is_main:
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        except OSError as failure:
            error = failure
    error = _agreed_error(error, env)
    if error is None:
        model_state, optim_state = get_state_dict(model, optimizer)
        try:
            with _single_process_is_intended():
                dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(tmp / "dcp"))
            torch.save(torch.get_rng_state(), tmp / f"rng-rank{env.rank}.pt")
        except (OSError, CheckpointException, RuntimeError) as failure:
            error = _os_error(failure, tmp)
        error = _agreed_error(error, env)
    manifest = {}
    if error is None:
        try:
            manifest = _file_digests(tmp, env)
        except OSError as failure:
            error = failure
        error = _agreed_error(error, env)
    if error is None and env.is_main:
        try:
            (tmp / "trainer.json").write_text(json.dumps(trainer_state, indent=2) + "\n")
            manifest |= _file_digests(tmp, env, only=["trainer.json"])
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
        except OSError as failure:
            error = failure
        if error is None:
            for old in complete_checkpoints(out)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    error = _agreed_error(error, env)
    if error is not None:  # a half-written checkpoint never looks complete, and every rank stops with the same reason
        if env.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            if root.is_dir() and not any(root.iterdir()):
                root.rmdir()  # the run's first checkpoint failed: no empty folder that looks like one
        raise error
    return final


def _digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "blake2b").hexdigest()


def _entry(path: Path) -> list:
    """A file's manifest entry: [size, BLAKE2b digest]."""
    return [path.stat().st_size, _digest(path)]


def _file_digests(directory: Path, env: DistEnv, only: list[str] | None = None) -> dict[str, list]:
    """{path relative to `directory`: [size, digest]} of its files (or of `only`, on this rank alone); the ranks
    read a share each (file i on rank i mod world), then exchange them."""
    if only is not None:
        return {name: _entry(directory / name) for name in only}
    files = sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)
    mine = {name: _entry(directory / name) for i, name in enumerate(files) if i % env.world_size == env.rank}
    merged: dict[str, list] = {}
    for part in gather_to_list(mine, env):
        merged |= part
    return merged


def damage(path: Path, env: DistEnv) -> str | None:
    """Why the checkpoint at `path` cannot be resumed from (a file missing, short or changed; an unreadable
    manifest or trainer state), or None. A checkpoint written before manifests existed is taken as it is."""
    problem = None
    try:
        json.loads((path / "trainer.json").read_text())
        expected = json.loads((path / MANIFEST).read_text()) if (path / MANIFEST).exists() else {}
    except OSError as failure:
        problem, expected = f"{Path(failure.filename or MANIFEST).name} is unreadable ({failure.strerror})", {}
    except ValueError:
        problem, expected = "trainer.json or manifest.json is cut short or not JSON", {}
    for i, (name, (size, digest)) in enumerate(sorted(expected.items())):
        if problem is not None:
            break
        if i % env.world_size != env.rank:
            continue
        file = path / name
        if not file.is_file():
            problem = f"{name} is missing"
        elif file.stat().st_size != size:
            problem = f"{name} has {file.stat().st_size} bytes, {size} were written"
        elif _digest(file) != digest:
            problem = f"{name} has changed since it was written"
    return next((found for found in gather_to_list(problem, env) if found is not None), None)


def resumable_checkpoint(out: Path, env: DistEnv) -> Path:
    """The newest intact checkpoint; damaged newer ones are renamed `damaged-step-…` (kept, never resumed),
    and a note names them and the one resumed from."""
    damaged = []
    for path in reversed(complete_checkpoints(out)):
        problem = damage(path, env)
        if problem is None:
            if damaged and env.is_main:
                print(f"moeify: note: {'; '.join(damaged)}; resuming from {path.name}", file=sys.stderr)
            return path
        kept = path.with_name(f"damaged-{path.name}")
        if env.is_main:
            shutil.rmtree(kept, ignore_errors=True)
            path.rename(kept)
        if env.distributed:
            gather_to_list(None, env)  # every rank sees the rename before looking again
        damaged.append(f"checkpoint {path} is damaged ({problem}), kept as {kept.name}")
    raise MoeifyError(f"--resume: no intact checkpoint in {checkpoint_root(out)} ({'; '.join(damaged) or 'none'}); "
                      "start afresh with --force")


def _agreed_error(error: OSError | None, env: DistEnv) -> OSError | None:
    """The first rank's failure, on every rank (None when all succeeded): a rank that failed alone
    would otherwise leave the others waiting at the next collective until the job is killed."""
    if not env.distributed:
        return error
    report = None if error is None else (error.errno, error.strerror or str(error), error.filename)
    reports = gather_to_list(report, env)
    first = next((report for report in reports if report is not None), None)  # what rank 0 reports
    if first is None:
        return None
    if error is None:
        error = OSError(*first) if first[0] is not None else OSError(first[1])
        report = first
    # One line for a disk every rank found full, whichever file each was writing; another reason is printed too.
    same_kind = report[0] == first[0] if first[0] is not None else report[1] == first[1]
    return same_on_every_rank(error) if same_kind else error


def _os_error(error: Exception, where: Path) -> OSError:
    """DCP wraps each rank's failure in a CheckpointException; the OSError inside is what the user needs.
    torch's zip writer (torch.save, DCP's small objects) reports a short write, as on a full disk, as a
    RuntimeError "unexpected pos"; that becomes ENOSPC on `where`. Any other RuntimeError is a bug: re-raised."""
    if isinstance(error, OSError):
        return error
    failures = [failure[0] if isinstance(failure, tuple) else failure for failure in getattr(error, "failures", {}).values()]
    for failure in failures:
        inner = failure
        while inner is not None and not isinstance(inner, OSError):
            inner = inner.__cause__ or inner.__context__
        if inner is not None:
            return inner
    first = failures[0] if failures else error
    if _short_write(first):
        return OSError(errno.ENOSPC, "No space left on device (a write came up short)", str(where))
    if isinstance(error, RuntimeError):
        raise error
    return OSError(f"{type(first).__name__}: {str(first).splitlines()[0] if str(first) else 'checkpoint write failed'}")


def _short_write(error: BaseException) -> bool:
    return isinstance(error, RuntimeError) and "unexpected pos" in str(error)


def load_checkpoint(path: Path, model: nn.Module, optimizer, env: DistEnv, identity: dict) -> dict:
    """Restore model, optimizer and this rank's RNG; return the trainer state."""
    trainer_state = json.loads((path / "trainer.json").read_text())
    differing = sorted(k for k in identity if trainer_state["identity"].get(k) != identity[k])
    if differing:
        raise MoeifyError(
            f"checkpoint {path} is from another model or set-up (differs in: {', '.join(differing)}); "
            "resume with the same --model and settings, or start afresh with --force"
        )
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    with _single_process_is_intended():
        dcp.load(state, checkpoint_id=str(path / "dcp"))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    # Model and optimizer state reshard to any layout. The random stream (noisy gating) is per rank:
    # a rank the saving run did not have starts a fresh one, seeded from the step and its rank.
    rng_file = path / f"rng-rank{env.rank}.pt"
    if rng_file.is_file():
        torch.set_rng_state(torch.load(rng_file))
    else:
        torch.manual_seed(trainer_state["step"] * 100_003 + env.rank)
    return trainer_state
