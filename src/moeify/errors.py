import errno


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
