import errno
import os
import re
from typing import TypeVar


class MoeifyError(ValueError):
    """A user-facing error: the message names the problem and the fix, in one line."""


_FIXES = {
    errno.ENOSPC: "free some space or write elsewhere",
    errno.EDQUOT: "free some space or write elsewhere",
    errno.EROFS: "write elsewhere",
    errno.EACCES: "check the permissions or write elsewhere",
    errno.EPERM: "check the permissions or write elsewhere",
}


def describe_os_error(error: OSError) -> str:
    """One line for an I/O failure: what, where, and what to do."""
    where = f" {error.filename}" if getattr(error, "filename", None) else ""
    reason = error.strerror or str(error) or type(error).__name__
    return f"cannot write or read{where}: {reason}; {_FIXES.get(error.errno, 'check the path and try again')}"


def describe_out_of_memory(error: BaseException) -> str | None:
    """One line for an allocation the machine cannot make (a setting sized the work too large), or None
    for any other error."""
    text = str(error)
    if not (isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError" or "can't allocate memory" in text):
        return None
    asked = re.search(r"tried to allocate (\d+) bytes", text) or re.search(r"Tried to allocate ([\d.]+ [KMGT]iB)", text)
    size = "" if asked is None else f" ({int(asked[1]) / 1e9:.1f} GB asked)" if asked[1].isdigit() else f" ({asked[1]} asked)"
    return (f"out of memory{size}: a setting sizes the work beyond this machine (experts, batch, sequence length, tokens); "
            "lower it or use a larger machine")


AnyError = TypeVar("AnyError", bound=BaseException)


def same_on_every_rank(error: AnyError) -> AnyError:
    """Mark an error the ranks of a torchrun job agreed on (through a collective): rank 0 prints it
    and the others exit quietly, so 64 ranks give one line, not 64."""
    error.printed_by = "RANK"  # type: ignore[attr-defined]
    return error


def same_on_every_local_rank(error: AnyError) -> AnyError:
    """Mark an error that follows from the command line (and the recipe it names): the ranks torchrun
    started on one node got the same one, so each node's local rank 0 prints it."""
    error.printed_by = "LOCAL_RANK"  # type: ignore[attr-defined]
    return error


def printed_like(error: AnyError, original: BaseException) -> AnyError:
    """`error`, which says more about `original`, printed by the same rank as `original` would be."""
    if hasattr(original, "printed_by"):
        error.printed_by = original.printed_by  # type: ignore[attr-defined]
    return error


def left_to_another_rank(error: BaseException) -> bool:
    """True where a marked error is printed by another rank (rank 0 of the job or of the node)."""
    variable = getattr(error, "printed_by", None)
    return variable is not None and os.environ.get(variable, "0") != "0"
