"""nixfs' own folder at the upper's root (``.nixfs``), hidden from the merged view.

It holds ``work/``, where copy-ups are built and removed directories are emptied
before they become visible or disappear (it is on the upper's file system, so a
rename moves things in and out at once), and ``lock``, held by the mounted
daemon so that two daemons never share one upper.
"""

import errno
import fcntl
import os
import stat

from .layers import O_DIR
from .upperformat import STATE_DIR

FORMAT_VERSION = b"1\n"


class UpperInUse(Exception):
    """Another nixfs daemon has this upper mounted."""


class UpperState:
    def __init__(self, upper_fd: int):
        self.fd = _ensure_dir(upper_fd, STATE_DIR, 0o700)
        self.work_fd = _ensure_dir(self.fd, b"work", 0o700)
        self._lock_fd: int | None = None
        try:
            os.stat(b"format", dir_fd=self.fd)
        except FileNotFoundError:
            fd = os.open(b"format", os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644, dir_fd=self.fd)
            os.write(fd, FORMAT_VERSION)
            os.close(fd)

    def close(self) -> None:
        self.unlock()
        os.close(self.work_fd)
        os.close(self.fd)

    def lock(self) -> None:
        """Take the upper for this process; UpperInUse if another daemon has it."""
        fd = os.open(b"lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600, dir_fd=self.fd)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise UpperInUse(f"the upper is in use by another nixfs (pid {holder})") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def recover(self) -> list[bytes]:
        """Remove what an interrupted daemon left in the work folder; return the names."""
        names = [os.fsencode(n) for n in os.listdir(self.work_fd)]
        for name in names:
            self.discard(name)
        return names

    def discard(self, name: bytes) -> None:
        """Remove ``work/name`` and everything below it."""
        remove_tree(self.work_fd, name)


def remove_tree(dirfd: int, name: bytes) -> None:
    """Remove *name* in *dirfd* recursively without following symlinks.

    Read-only directories (Nix makes store paths so) are made writable first.
    """
    try:
        st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(name, dir_fd=dirfd)
        return
    if st.st_mode & 0o700 != 0o700:
        os.chmod(name, stat.S_IMODE(st.st_mode) | 0o700, dir_fd=dirfd)
    fd = os.open(name, O_DIR, dir_fd=dirfd)
    try:
        for child in os.listdir(fd):
            remove_tree(fd, os.fsencode(child))
    finally:
        os.close(fd)
    os.rmdir(name, dir_fd=dirfd)


def _ensure_dir(dirfd: int, name: bytes, mode: int) -> int:
    try:
        os.mkdir(name, mode, dir_fd=dirfd)
    except FileExistsError:
        pass
    try:
        return os.open(name, O_DIR, dir_fd=dirfd)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            raise OSError(e.errno, f"{name.decode()} in the upper is not a directory") from None
        raise
