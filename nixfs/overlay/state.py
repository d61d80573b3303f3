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

from ..cow.cowmap import fsync_path
from .layers import O_DIR
from .upperformat import (FORMAT_FILE, GENERATION_FILE, LOCK_FILE, LOG_FILE, OWN_ROWS_FILE,
                          STATE_DIR, WORK_DIR)

# The upper's format: 2 may hold copy-on-write files (a merged database over a published
# generation, nixfs/cow/), which a nixfs that knows only 1 would read as their bare deltas,
# so it refuses 2.  A new upper is written as 2; one of format 1 is served as it is, and
# becomes 2 only when copy-on-write files go into it (``mark_copy_on_write``).
FORMAT_VERSION = b"2\n"
FORMATS = (b"1\n", FORMAT_VERSION)


def mark_copy_on_write(state_dir: str) -> None:
    """Make the upper's format 2 before copy-on-write files go into it (atomic, durable)."""
    path = os.path.join(state_dir, os.fsdecode(FORMAT_FILE))
    with open(path, "rb") as f:
        if f.read(64) == FORMAT_VERSION:
            return
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, FORMAT_VERSION)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)
    fsync_path(state_dir)


class UpperInUse(Exception):
    """Another nixfs daemon has this upper mounted."""

    def __init__(self, holder: str):
        super().__init__(f"the upper is in use by another nixfs (pid {holder})")
        self.holder = holder


class StateError(Exception):
    """``UPPER/.nixfs`` is damaged or foreign: the mount is refused with this message
    rather than guessing (nothing in the upper is changed)."""


# Files of the state folder nixfs opens by name: a symlink there (planted in a user's
# upper for a root daemon) would make nixfs write wherever it points.
_OWN_FILES = (LOCK_FILE, FORMAT_FILE, LOG_FILE, GENERATION_FILE, OWN_ROWS_FILE)


class UpperState:
    def __init__(self, upper_fd: int):
        self.fd = _ensure_dir(upper_fd, STATE_DIR, 0o700)
        try:
            self.work_fd = _ensure_dir(self.fd, WORK_DIR, 0o700, STATE_DIR + b"/" + WORK_DIR)
            self._lock_fd: int | None = None
            self._check_files()
            self._check_format()
        except BaseException:
            if hasattr(self, "work_fd"):
                os.close(self.work_fd)
            os.close(self.fd)
            raise

    @classmethod
    def open(cls, upper: str) -> "UpperState":
        """The state folder of the upper directory *upper*, for a daemon that takes the
        upper (``lock``) before it builds its overlay on it."""
        fd = os.open(upper, O_DIR)
        try:
            return cls(fd)
        finally:
            os.close(fd)

    def belongs_to(self, upper_fd: int) -> bool:
        """Whether this is the state folder of the upper open as *upper_fd*."""
        try:
            st = os.stat(STATE_DIR, dir_fd=upper_fd, follow_symlinks=False)
        except OSError:
            return False
        return os.path.samestat(st, os.fstat(self.fd))

    def _check_files(self) -> None:
        for name in _OWN_FILES:
            try:
                st = os.stat(name, dir_fd=self.fd, follow_symlinks=False)
            except FileNotFoundError:
                continue
            if not stat.S_ISREG(st.st_mode):
                raise StateError(f"{STATE_DIR.decode()}/{name.decode()} in the upper is not a "
                                 "regular file (a symlink?): refusing to use it; remove it")

    def _check_format(self) -> None:
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(FORMAT_FILE, flags, 0o644, dir_fd=self.fd)
        try:
            version = os.pread(fd, 64, 0)
            if not version.strip():  # new, or a crash right after creating it
                os.pwrite(fd, FORMAT_VERSION, 0)
            elif version not in FORMATS:
                shown = version[:20].decode(errors="replace").strip()
                where = (STATE_DIR + b"/" + FORMAT_FILE).decode()
                raise StateError(f"the upper's format is {shown!r} ({where}), "
                                 "this nixfs knows '1' and '2': a newer "
                                 "nixfs made it, or the file is damaged")
        finally:
            os.close(fd)

    def close(self) -> None:
        self.unlock()
        os.close(self.work_fd)
        os.close(self.fd)

    def lock(self) -> None:
        """Take the upper for this process; UpperInUse if another daemon has it."""
        fd = take_lock(self.fd)
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


def take_lock(state_fd: int) -> int:
    """The state folder's ``lock``, held (the descriptor) until closed; UpperInUse
    naming the holder's pid if another process has it, OSError if it cannot be opened
    (a symlink there is never followed)."""
    fd = os.open(LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                 dir_fd=state_fd)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise UpperInUse(holder) from None
    return fd


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


def _ensure_dir(dirfd: int, name: bytes, mode: int, label: bytes | None = None) -> int:
    try:
        os.mkdir(name, mode, dir_fd=dirfd)
    except FileExistsError:
        pass
    try:
        return os.open(name, O_DIR, dir_fd=dirfd)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            raise StateError(f"{(label or name).decode()} in the upper is not a directory "
                             "(a symlink or a file?): refusing to use it; remove it") from None
        raise
