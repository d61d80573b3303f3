"""A directory kept within reach after something is mounted over it.

``nixfs mount --lower /nix ... /nix`` covers its own lower.  The overlay layers
hold directory descriptors opened before the mount, but the Nix database code
opens paths under the lower, and those would go through the new mount into the
daemon itself.  A descriptor opened before mounting and reached as
``/proc/self/fd/N/...`` keeps those opens on the real lower: the kernel follows
that link to the directory it holds, never to its name.  A child process given
the descriptor at the same number (``pass_fds``) reaches it by the same path.

Users never see that path: messages show the lower's own name.
"""

import logging
import os


class PinnedDir:
    """*path*, opened now; ``via`` reaches it for this process whatever covers *path* later.
    *shown_as*: the name messages show for it (default *path*)."""

    def __init__(self, path: str, shown_as: str | None = None):
        self.path = shown_as or path
        self.fd = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        self.via = f"/proc/self/fd/{self.fd}"
        if not os.path.isdir(self.via):  # no /proc: only the name is left
            self.via = self.path if shown_as is None else path

    def shown(self, text: str) -> str:
        """*text* with the lower's own name where it says ``via``."""
        return text.replace(self.via, self.path) if self.via != self.path else text

    def log_filter(self, record: logging.LogRecord) -> bool:
        """A logging filter that shows the lower's name in every message."""
        message = record.getMessage()
        if self.via in message:
            record.msg, record.args = self.shown(message), ()
        return True

    def close(self) -> None:
        os.close(self.fd)


def proc_available() -> bool:
    """Whether ``/proc/self/fd`` works here (a pinned directory needs it)."""
    return os.path.isdir("/proc/self/fd")
