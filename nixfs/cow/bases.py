"""What a COW file's base can be: a plain read-only file, or a COW file (a chain), found
by the path its map records relative to a root.

The overlay opens bases itself (with *at calls and O_NOFOLLOW on its layers); everything
else (the VFS, publish, tests) opens them by path below a root with ``base_opener``.
"""

import collections
import errno
import functools
import hashlib
import os
import threading

from . import cowmap
from .cowfile import CowFile
from .cowmap import CowError

_RDONLY = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
# Directories on the way to a base are only walked through (*at calls), never read: an
# O_PATH descriptor, which a FUSE or NFS lower answers with a lookup alone (a readable one
# costs an open and a release of the directory too, for every base opened).
_DIRECTORY = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class ReadOnlyFile:
    """A plain file as a base (pread and size, like a CowFile's); the size is read once,
    because a base never changes."""

    def __init__(self, fd: int):
        self._fd = fd
        self._size = os.fstat(fd).st_size
        self.pread = functools.partial(os.pread, fd)  # (n, offset): straight to C, per page

    @classmethod
    def open(cls, path, dir_fd: int | None = None) -> "ReadOnlyFile":
        return cls(os.open(path, _RDONLY, dir_fd=dir_fd))

    def size(self) -> int:
        return self._size

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
            self.pread = _closed  # never a read of a descriptor number reused since


def _closed(n: int, offset: int) -> bytes:
    raise OSError(errno.EBADF, "COW base closed")


def content_sha256(f, chunk: int = 1 << 20) -> str:
    """The sha256 (hex) of the logical content of *f* (a CowFile or a ReadOnlyFile): what a
    manifest states of a file, whatever its delta and base hold."""
    digest, size = hashlib.sha256(), f.size()
    for offset in range(0, size, chunk):
        digest.update(f.pread(min(chunk, size - offset), offset))
    return digest.hexdigest()


def base_opener(root, max_depth: int = 16):
    """An ``open_base`` for paths relative to *root* (a directory's path, or a descriptor
    on it that stays the caller's): a file with a map beside it opens as a read-only
    CowFile over its own base (a chain), else as a plain file.  No symlink below *root* is
    followed, as in the layers (each directory is opened with O_NOFOLLOW)."""

    def open_base(rel_path: str, depth: int = 0):
        parts = rel_path.split("/")
        if not rel_path or rel_path.startswith("/") or {"", ".", ".."} & set(parts):
            raise CowError(f"{rel_path!r}: a COW base must be a plain path inside its root")
        if depth >= max_depth:
            raise CowError(f"{rel_path}: COW chain deeper than {max_depth}")
        key = _KEPT.key(root, parts[:-1])
        dir_fd = _KEPT.get(key)
        kept = dir_fd is not None
        if not kept:
            dir_fd = _open_parent(root, parts[:-1], rel_path)
            _KEPT.put(key, dir_fd)
        name, map_name = parts[-1], cowmap.map_name(parts[-1])
        try:
            if cowmap.path_id(map_name, dir_fd) is None:
                try:
                    return ReadOnlyFile.open(name, dir_fd=dir_fd)
                finally:
                    os.close(dir_fd)
            try:
                return CowFile.open(name, map_name, lambda rel: open_base(rel, depth + 1),
                                    readonly=True, dir_fd=dir_fd, owns_dir_fd=True)
            except BaseException:
                os.close(dir_fd)
                raise
        except FileNotFoundError:
            if kept:  # the directory kept is gone (pruned, maybe made again): walk afresh
                _KEPT.drop(key)
                return open_base(rel_path, depth)
            raise CowError(f"{rel_path}: COW base missing (below {_name(root)})") from None
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise CowError(f"{rel_path}: COW base is a symlink (below {_name(root)})") from None
            raise

    return open_base


def _open_parent(root, dirs: list[str], rel_path: str) -> int:
    """A descriptor on the directory holding *rel_path* (the caller closes it)."""
    fd = os.dup(root) if isinstance(root, int) else \
        os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in dirs:
            inner = os.open(part, _DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = inner
    except BaseException as e:
        os.close(fd)
        if isinstance(e, FileNotFoundError):
            raise CowError(f"{rel_path}: COW base missing (below {_name(root)})") from None
        if isinstance(e, OSError) and e.errno in (errno.ELOOP, errno.ENOTDIR):
            raise CowError(f"{rel_path}: COW base's directory is a symlink or a file") from None
        raise
    return fd


def _name(root) -> str:
    return f"descriptor {root}" if isinstance(root, int) else os.fsdecode(root)


class _KeptParents:
    """Descriptors on the directories bases were found in, by the root's identity and
    the directories below it.  A base's directory (a published generation's) never
    changes while it exists, and walking to it again costs a lookup per level on a FUSE
    or NFS lower that caches no names (a mount opens its generation's files a dozen
    times).  The key tells that a root path still names the same directory: the path a
    pinned ``/proc/self/fd/N`` root stands for (N may be reused for another), else the
    root's device and inode.  A directory removed since shows as a missing base in it:
    the walk is then made afresh."""

    LIMIT = 32

    def __init__(self):
        self._fds: collections.OrderedDict = collections.OrderedDict()
        self._lock = threading.Lock()
        os.register_at_fork(after_in_child=self._after_fork)

    def _after_fork(self) -> None:
        self._lock = threading.Lock()  # a thread of the parent may have held it

    @staticmethod
    def key(root, dirs: list[str]):
        """The key of *dirs* below *root* (None: not kept, for a descriptor root or a
        base beside the root)."""
        if isinstance(root, int) or not dirs:
            return None
        try:
            if os.fsdecode(root).startswith("/proc/self/fd/"):
                return os.readlink(root), tuple(dirs)  # no call on the lower
            st = os.stat(root)
        except OSError:
            return None
        return st.st_dev, st.st_ino, tuple(dirs)

    def get(self, key) -> int | None:
        """A descriptor of its own on the directory kept under *key* (the caller closes it)."""
        if key is None:
            return None
        with self._lock:
            fd = self._fds.get(key)
            if fd is None:
                return None
            self._fds.move_to_end(key)
            return os.dup(fd)

    def put(self, key, fd: int) -> None:
        if key is None:
            return
        with self._lock:
            if key in self._fds:
                return
            self._fds[key] = os.dup(fd)
            while len(self._fds) > self.LIMIT:
                os.close(self._fds.popitem(last=False)[1])

    def drop(self, key) -> None:
        with self._lock:
            fd = self._fds.pop(key, None)
            if fd is not None:
                os.close(fd)


_KEPT = _KeptParents()
