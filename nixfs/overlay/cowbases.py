"""Opening the base of a copy-on-write file: a file in the lower, never written.

A COW file's map names its base by a path relative to the lower root (a published
generation's file, itself maybe a COW delta over an older one: a chain).  The base is
opened one directory at a time with ``O_NOFOLLOW`` through the lower layer's own calls,
read-only, in the worker thread that opens the COW file; its reads (each counted) run
in the worker threads that serve the COW file's reads, since the lower may be NFS.
"""

import os
import stat

from . import upperformat as fmt
from .layers import Layer
from ..cow.cowfile import CowFile


class BaseStats:
    """Reads the bases of COW files answered (status), counted from worker threads."""

    def __init__(self):
        self.reads = 0
        self.bytes = 0
        self.opened = 0

    def as_dict(self) -> dict:
        return {"reads": self.reads, "bytes": self.bytes, "opened": self.opened}


class BaseFile:
    """A plain base file of the lower, open read-only: what a CowFile reads its base by."""

    def __init__(self, layer: Layer, fd: int, counts: BaseStats):
        self.layer, self.fd, self.counts = layer, fd, counts
        self._size = os.fstat(fd).st_size  # a base never changes while it is used

    def pread(self, size: int, offset: int) -> bytes:
        self.layer.calls["read"] += 1
        self.counts.reads += 1
        data = os.pread(self.fd, size, offset)
        self.counts.bytes += len(data)
        return data

    def size(self) -> int:
        return self._size

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def split_rel(rel_path) -> tuple[bytes, bytes]:
    """(directory, name) of a path relative to the lower root; ValueError for a path that
    leaves it (absolute, empty or with ``..``)."""
    rel = os.fsencode(rel_path)
    parts = rel.split(b"/")
    if rel.startswith(b"/") or not rel or any(p in (b"", b".", b"..") for p in parts):
        raise ValueError(f"a COW base must be a plain path below the lower root: {rel_path!r}")
    return b"/".join(parts[:-1]), parts[-1]


def opener(layer: Layer, counts: BaseStats):
    """The ``open_base(rel_path)`` callable the cow module opens bases by: through *layer*
    (call it in a worker thread)."""

    def open_base(rel_path):
        directory, name = split_rel(rel_path)
        dfd = layer.reach_dir_path(directory)
        try:
            try:
                layer.lstat(dfd, fmt.cow_map_name(name))
            except FileNotFoundError:
                fd = layer.open(dfd, name, os.O_RDONLY)
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    os.close(fd)
                    raise OSError(f"the COW base {os.fsdecode(rel_path)} is no regular file")
                counts.opened += 1
                return BaseFile(layer, fd, counts)
            # A delta over an older base: opened read-only, its map never rewritten.
            st = layer.lstat(dfd, name)
            if not stat.S_ISREG(st.st_mode):
                raise OSError(f"the COW base {os.fsdecode(rel_path)} is no regular file")
            counts.opened += 1
            # (Read-only, it never uses the directory again: closed below.)
            return CowFile.open(name, fmt.cow_map_name(name), open_base, readonly=True,
                                dir_fd=dfd)
        finally:
            os.close(dfd)

    return open_base
