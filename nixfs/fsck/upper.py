"""How the checks of ``nixfs fsck`` look at the upper and repair it.

Every look is an ``*at`` call on a directory descriptor that never follows a
symlink, and every repair changes only the upper, keeping the merged view as it
was: a directory a repair changes gets its mode and times back (store paths are
read-only with fixed times).  A repair is handed to the report as a function,
applied at once with ``--repair`` while the check still holds the descriptors.
"""

import contextlib
import os

from ..cow import cowmap
from ..overlay.layers import made_writable, times_kept
from ..overlay.state import remove_tree


def lstat_or_none(dirfd: int | None, name: bytes) -> os.stat_result | None:
    """The entry *name* of *dirfd* (not followed), or None if there is none."""
    if dirfd is None:
        return None
    try:
        return os.stat(name, dir_fd=dirfd, follow_symlinks=False)
    except (FileNotFoundError, NotADirectoryError):
        return None


@contextlib.contextmanager
def changing(dirfd: int):
    """Let a repair change entries of *dirfd*: writable for the moment, times kept."""
    with times_kept(dirfd), made_writable(dirfd):
        yield


def remove(dirfd: int, name: bytes):
    """The repair that removes *name* (a whole tree if it is a directory)."""
    def fix():
        with changing(dirfd):
            remove_tree(dirfd, name)
    return fix


def replace_with_file(dirfd: int, name: bytes):
    """The repair that makes *name* an empty regular file (a marker of the wrong type)."""
    def fix():
        with changing(dirfd):
            remove_tree(dirfd, name)
            os.close(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                             | os.O_CLOEXEC, 0o600, dir_fd=dirfd))
    return fix


def remove_sqlite(dirfd: int, name: bytes):
    """The repair that deletes the SQLite database *name* with its journal files (and its
    map, if it is a copy-on-write file)."""
    def fix():
        for other in (name + b"-wal", name + b"-shm", name + b"-journal",
                      cowmap.map_name(name), name):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(other, dir_fd=dirfd)
    return fix
