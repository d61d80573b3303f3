"""What a COW file's base can be: a plain read-only file, or a COW file (a chain), found
by the path its map records relative to a root.

The overlay opens bases itself (with *at calls and O_NOFOLLOW on its layers); everything
else (the VFS, publish, tests) opens them by path below a root with ``base_opener``.
"""

import os

from . import cowmap
from .cowfile import CowFile
from .cowmap import CowError

_RDONLY = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC


class ReadOnlyFile:
    """A plain file as a base (pread and size, like a CowFile's); the size is read once,
    because a base never changes."""

    def __init__(self, fd: int):
        self._fd = fd
        self._size = os.fstat(fd).st_size

    @classmethod
    def open(cls, path, dir_fd: int | None = None) -> "ReadOnlyFile":
        return cls(os.open(path, _RDONLY, dir_fd=dir_fd))

    def pread(self, n: int, offset: int) -> bytes:
        return os.pread(self._fd, n, offset)

    def size(self) -> int:
        return self._size

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def base_opener(root, max_depth: int = 16):
    """An ``open_base`` for paths relative to the directory *root*: a file with a map
    beside it opens as a (read-only) CowFile over its own base, else as a plain file."""
    root = os.fsencode(root)

    def open_base(rel_path: str, depth: int = 0):
        parts = rel_path.split("/")
        if rel_path.startswith("/") or ".." in parts or not rel_path:
            raise CowError(f"{rel_path!r}: a COW base must be a path inside {os.fsdecode(root)}")
        if depth >= max_depth:
            raise CowError(f"{rel_path}: COW chain deeper than {max_depth}")
        path = os.path.join(root, os.fsencode(rel_path))
        mpath = cowmap.map_path(path)
        if not os.path.lexists(mpath):
            try:
                return ReadOnlyFile.open(path)
            except FileNotFoundError:
                raise CowError(f"{os.fsdecode(path)}: COW base missing") from None
        return CowFile.open(path, mpath, lambda rel: open_base(rel, depth + 1), readonly=True)

    return open_base
