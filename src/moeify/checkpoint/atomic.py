"""The one output rule of every verb that writes, and outputs that appear whole or not at all.

- An output is never an input of its command, never inside one and never holds one, with or without
  --force (`build M --out M`, `export X --out PARENT_OF_X` and `data prepare --source web=S --out S`
  are refused before any work).
- An existing non-empty output is replaced only with --force, and only if moeify wrote it: a directory
  holding moeify's marker file (or, from before the marker, an MoE manifest or a training run's first
  files), a file that the verb recognises as its own. Anything else is the user's and is never deleted.
- Directories are written into a hidden sibling and renamed when complete; files likewise. The sibling
  names this host and process: one left by a process killed outright (SIGKILL) is removed by the next
  write of the same output on the same host.
- Names that become path components (domains, experiment arms) are single plain components.
"""

import contextlib
import contextvars
import json
import os
import re
import shutil
import socket
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import moeify
from moeify.errors import MoeifyError

MARKER = ".moeify-output"
"""Written into every directory moeify creates as an output; --force replaces only such directories."""
_LEGACY_MANIFEST = "moeify.json"  # MoE directories written before the marker existed

_READ_BY_CALLER: contextvars.ContextVar[tuple[Path, ...]] = contextvars.ContextVar("read_by_caller", default=())


@contextmanager
def also_reading(paths: Iterable[Path | str | None]) -> Iterator[None]:
    """Inputs read before the verb's function runs (the CLI's --recipe): every output rule checked
    inside the block counts them as inputs too."""
    token = _READ_BY_CALLER.set((*_READ_BY_CALLER.get(), *(Path(p) for p in paths if p is not None)))
    try:
        yield
    finally:
        _READ_BY_CALLER.reset(token)


def written_by_moeify(directory: Path) -> bool:
    return (directory / MARKER).is_file() or (directory / _LEGACY_MANIFEST).is_file() or _legacy_training_run(directory)


def _legacy_training_run(directory: Path) -> bool:
    """A `moeify train` run directory from before the marker: its config.yaml and first metrics record."""
    try:
        with open(directory / "config.yaml") as config, open(directory / "metrics.jsonl") as metrics:
            return config.readline() == "train:\n" and metrics.readline().startswith('{"step": 0, "tokens": 0, "domain_weights": ')
    except OSError:
        return False


def _absolute(path: Path | str) -> Path:
    return Path(os.path.abspath(Path(path).expanduser()))


def _real(path: Path | str) -> Path:
    return Path(path).expanduser().resolve()


def check_not_an_input(out: Path, reads: Iterable[Path | str | None], flag: str = "--out") -> None:
    """Refuse an output that is, holds or lies inside any input (symbolic links followed). Inputs that do
    not exist (an embedded model's name) are skipped: nothing there can be lost."""
    target = {_absolute(out), _real(out)}
    for source in [*reads, *_READ_BY_CALLER.get()]:
        if source is None or not Path(source).expanduser().exists():
            continue
        for read in {_absolute(source), _real(source)}:
            for written in target:
                relation = ("is" if written == read else "holds" if written in read.parents
                            else "lies inside" if read in written.parents else None)
                if relation:
                    raise MoeifyError(f"{flag} {out} {relation} the input {source}; write the output outside the command's "
                                      "inputs (nothing was written)")


def check_output(out: Path, force: bool, reads: Iterable[Path | str | None] = (), flag: str = "--out",
                 ours: Callable[[Path], bool] | None = None) -> None:
    """The output rule, checked before any work: see the module docstring. `ours(path)` tells whether an
    existing output is moeify's (default: a directory with the marker or manifest)."""
    check_not_an_input(out, reads, flag)
    if os.path.lexists(out) and not out.is_dir() and not out.is_file():  # renaming onto it would replace it
        raise MoeifyError(f"{flag} {out} is not a regular file or directory (a device, pipe, socket or broken link); give "
                          "another path")
    is_file_output = ours is not None
    if out.exists() and not out.is_dir() and not is_file_output:
        raise MoeifyError(f"{flag} {out} is a file; give a directory path")
    if is_file_output and out.is_dir():
        raise MoeifyError(f"{flag} {out} is a directory; give a file path")
    occupied = out.is_file() if is_file_output else out.is_dir() and any(out.iterdir())
    if not occupied:
        return
    mine = ours(out) if is_file_output else written_by_moeify(out)
    if not mine:
        what = "exists and is not a file" if is_file_output else "is not empty and not a directory"
        raise MoeifyError(f"{flag} {out} {what} moeify wrote; choose another path (--force replaces only moeify's own "
                          "outputs, never anything else)")
    if not force:
        raise MoeifyError(f"{flag} {out} exists; choose another path or pass --force to replace it")


_MADE: dict[Path, Path | None] = {}  # a claimed directory -> the outermost directory its claim created


def make_directory(directory: Path) -> Path | None:
    """Create `directory` and its missing parents; the outermost one created (absolute), None if it existed."""
    missing = [path for path in [_absolute(directory), *_absolute(directory).parents] if not path.exists()]
    directory.mkdir(parents=True, exist_ok=True)
    return missing[-1] if missing else None


def discard_unused(directory: Path) -> None:
    """Remove a run directory this call claimed if nothing but moeify's marker is in it, and the parents its
    claim created if they are empty now: a run that failed before its first result leaves nothing behind
    (never removes anything else)."""
    if directory.is_dir() and {p.name for p in directory.iterdir()} <= {MARKER}:
        shutil.rmtree(directory, ignore_errors=True)
        remove_made(directory.parent, _MADE.pop(_absolute(directory), None))


def remove_made(directory: Path, made: Path | None) -> None:
    """Remove `directory` and its parents up to `made` (what make_directory created), each only if empty."""
    for path in [_absolute(directory), *_absolute(directory).parents]:
        if made is None or not (path == made or made in path.parents):
            break
        with contextlib.suppress(OSError):  # not empty: something else is in it now
            path.rmdir()


def write_marker(directory: Path, verb: str) -> None:
    (directory / MARKER).write_text(json.dumps({"written_by": f"moeify {moeify.__version__}", "verb": verb}) + "\n")


def safe_name(name: str, what: str) -> str:
    """`name` if it can be a single file or folder name: no separators, not `.`/`..`, no leading dot."""
    if not name or name in (".", "..") or name.startswith(".") or any(c in name for c in "/\\\0") or not name.isprintable():
        raise MoeifyError(f"{what} {name!r} cannot name a file: use letters, digits, '-', '_' or '.', with no '/' and not "
                          "starting with '.'")
    return name


def _replace(tmp: Path, out: Path) -> None:
    if out.exists():
        old = out.parent / f".{out.name}.old-{socket.gethostname()}-{os.getpid()}"
        out.rename(old)
        tmp.rename(out)
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink()
    else:
        tmp.rename(out)


def _temporary(out: Path) -> Path:
    """The hidden sibling `out` is written into; those of processes of this host that no longer run are removed."""
    host = socket.gethostname()
    pattern = re.compile(rf"\.{re.escape(out.name)}\.tmp-(?:(?P<host>.+)-)?(?P<pid>\d+)")  # not .old-: a replaced output
    if out.parent.is_dir():
        for sibling in out.parent.iterdir():
            found = pattern.fullmatch(sibling.name)
            if found and found["host"] in (None, host) and not _running(int(found["pid"])):
                if sibling.is_dir() and not sibling.is_symlink():
                    shutil.rmtree(sibling, ignore_errors=True)
                else:
                    sibling.unlink(missing_ok=True)
    return out.parent / f".{out.name}.tmp-{host}-{os.getpid()}"


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


@contextmanager
def atomic_directory(out: Path, force: bool = False, reads: Iterable[Path | str | None] = (), verb: str = "",
                     flag: str = "--out", cache: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that replaces `out` only if the block finishes without error.
    `cache`: `out` is a path inside moeify's cache, replaced whatever it holds."""
    out = Path(out)
    if not cache:
        check_output(out, force, reads, flag)
    made = make_directory(out.parent)
    tmp = _temporary(out)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        write_marker(tmp, verb)
        if not cache:
            check_output(out, force, reads, flag)  # again: it may have been made meanwhile
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        remove_made(out.parent, made)
        raise


@contextmanager
def atomic_file(out: Path, force: bool, reads: Iterable[Path | str | None], ours: Callable[[Path], bool],
                flag: str = "--out") -> Iterator[Path]:
    """Yield a temporary file path that replaces `out` (under the output rule) only if the block finishes."""
    out = Path(out)
    check_output(out, force, reads, flag, ours)
    made = make_directory(out.parent)
    tmp = _temporary(out)
    try:
        yield tmp
        check_output(out, force, reads, flag, ours)
        tmp.replace(out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        remove_made(out.parent, made)
        raise


def claim_directory(out: Path, force: bool, reads: Iterable[Path | str | None], verb: str | None, flag: str = "--out") -> None:
    """A run directory written over time (training, experiments): the output rule, the old one removed
    (--force, moeify's only), then created, with the marker unless `verb` is None (the caller writes it
    with the first file of the run)."""
    check_output(out, force, reads, flag)
    if out.is_dir() and any(out.iterdir()):
        shutil.rmtree(out)
    _MADE[_absolute(out)] = make_directory(out)
    if verb is not None:
        write_marker(out, verb)
