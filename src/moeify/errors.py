class MoeifyError(ValueError):
    """A user-facing error: the message names the problem and the fix, in one line."""
