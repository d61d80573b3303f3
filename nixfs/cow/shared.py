"""One CowFile per delta in a process, shared by everything in it that opens the file.

A CowFile keeps its map in memory, so two CowFiles on one delta in one process would not
see each other's writes; and closing a second descriptor on the delta would drop the POSIX
locks SQLite holds on it (fcntl locks belong to the process and the inode, and any close
releases them).  So the VFS (and the overlay, when the daemon serves a COW file it also
opens through SQLite) take the delta's CowFile here, counted, and the last release closes
it.  Other processes are kept coherent by the map on disk (CowFile.publish/refresh).
"""

import errno
import os
import threading

from . import cowmap
from .cowfile import CowFile

_lock = threading.Lock()
_open: dict[tuple[int, int], list] = {}  # (st_dev, st_ino) of the delta -> [CowFile, uses]
_READ_ONLY_ERRORS = (errno.EROFS, errno.EACCES, errno.EPERM)


def acquire(delta_path, open_base, *, readonly: bool = False) -> CowFile:
    """The process's CowFile on *delta_path* (its map beside it), opened if need be: for
    writing where the file allows it, so a later writer in the process can share it."""
    st = os.stat(delta_path, follow_symlinks=False)
    key = (st.st_dev, st.st_ino)
    with _lock:
        entry = _open.get(key)
        if entry is None:
            entry = _open[key] = [_open_cow(delta_path, open_base, readonly), 0]
        elif not readonly and entry[0].readonly:
            raise OSError(errno.EROFS, f"{os.fsdecode(delta_path)}: COW file is open read-only")
        entry[1] += 1
        return entry[0]


def _open_cow(delta_path, open_base, readonly: bool) -> CowFile:
    mpath = cowmap.map_path(delta_path)
    if not readonly:
        try:
            return CowFile.open(delta_path, mpath, open_base)
        except OSError as e:
            if e.errno not in _READ_ONLY_ERRORS:
                raise
    return CowFile.open(delta_path, mpath, open_base, readonly=True)


def release(cow: CowFile) -> None:
    """One use less; the last closes it (fsync'ing what changed), under the registry's lock
    so that no new user opens the delta with the map not yet written."""
    with _lock:
        for key, entry in _open.items():
            if entry[0] is cow:
                entry[1] -= 1
                if entry[1] == 0:
                    del _open[key]
                    cow.close()
                return
    raise ValueError("COW file not acquired here")


def _forget_in_child() -> None:
    """A forked child (the daemon forks at start) starts with no shared files: the parent's
    are the parent's (its connections do not carry over a fork), and a lock some thread
    held at the fork would never be released."""
    global _lock
    _lock = threading.Lock()
    _open.clear()


os.register_at_fork(after_in_child=_forget_in_child)


def open_count() -> int:
    """How many deltas the process has open (for stats and tests)."""
    with _lock:
        return len(_open)
