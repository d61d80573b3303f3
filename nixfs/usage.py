"""Bad input and the checks of the directories a user names (``mount``, ``fsck``).

UsageError is what every command reports in one line with exit code 2; the
checks here are the ones more than one command makes of a lower and an upper.
"""

import os


class UsageError(Exception):
    """Bad input: reported in one line with exit code 2."""


def is_within(path: str, top: str) -> bool:
    """*path* is *top* or below it (both canonical)."""
    return path == top or path.startswith(top.rstrip("/") + "/")


def check_dir(path: str, what: str, *, writable: bool) -> str:
    """The canonical path of the directory *path* (the *what*: lower, upper), which this
    process may read (and write, with *writable*); UsageError saying why not."""
    if not os.path.lexists(path):
        raise UsageError(f"{what} {path} does not exist")
    if not os.path.isdir(path):
        raise UsageError(f"{what} {path} is not a directory")
    need = os.R_OK | os.X_OK | (os.W_OK if writable else 0)
    if not os.access(path, need):
        mode = "read and write" if writable else "read"
        raise UsageError(f"{what} {path}: permission denied (nixfs must {mode} it)")
    return os.path.realpath(path)
