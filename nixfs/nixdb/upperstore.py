"""Direct, read-only looks at the upper's ``store/``: which names a whiteout hides,
which the upper holds itself.

The database code asks these before the mount is live and from the worker while
it is, on the upper directly (an ``lstat`` or one listing, never a change); fsck
reads the upper's store with ``scan`` too.
"""

import errno
import os

from ..overlay import upperformat as fmt
from ..overlay.layers import O_DIR


class UpperStore:
    def __init__(self, upper: str):
        self.path = os.path.join(upper, "store")

    def hidden(self, name: bytes) -> bool:
        try:
            os.lstat(os.path.join(self.path, os.fsdecode(fmt.whiteout_name(name))))
            return True
        except (FileNotFoundError, OSError):
            pass
        try:
            st = os.lstat(os.path.join(self.path, os.fsdecode(name)))
        except OSError:
            return False
        return fmt.is_kernel_whiteout(st)

    def has(self, name: bytes) -> bool:
        try:
            st = os.lstat(os.path.join(self.path, os.fsdecode(name)))
        except OSError:
            return False
        return not fmt.is_kernel_whiteout(st)

    def hidden_names(self) -> set[bytes]:
        return self._scan()[0]

    def held_names(self) -> set[bytes]:
        """The names the upper's store holds itself (not whiteouts, not markers)."""
        return self._scan()[1]

    def _scan(self) -> tuple[set[bytes], set[bytes]]:
        try:
            fd = os.open(self.path, O_DIR)
        except OSError as e:
            if e.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                return set(), set()  # no store directory (a symlink is none): nothing there
            raise
        try:
            return scan(fd)
        finally:
            os.close(fd)


def scan(store_fd: int) -> tuple[set[bytes], set[bytes]]:
    """(names a whiteout hides, names the upper holds) of the upper's ``store/`` open as
    *store_fd*, from one listing; markers (``.wh..wh.*``) are neither."""
    hidden: set[bytes] = set()
    held: set[bytes] = set()
    with os.scandir(store_fd) as entries:
        for e in entries:
            name = os.fsencode(e.name)
            if name.startswith(fmt.WHITEOUT_PREFIX):
                if not name.startswith(fmt.WHITEOUT_PREFIX * 2):
                    hidden.add(name[len(fmt.WHITEOUT_PREFIX):])
            elif (not e.is_dir(follow_symlinks=False) and
                  fmt.is_kernel_whiteout(e.stat(follow_symlinks=False))):
                hidden.add(name)
            else:
                held.add(name)
    return hidden, held
