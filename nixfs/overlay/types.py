"""The values the overlay model hands out and takes: attributes, open files and
directories, the caller, requested changes, and the errors it raises.

They sit apart from the model's parts so that each part (and the FUSE adapter)
can name them without importing the parts that make them.
"""

import errno
import itertools
import os
from dataclasses import dataclass

from .inodes import Node

# File handle numbers start here, above every inode number: a file system that lets the
# kernel keep opens (FuseOps files_by_inode) gets either, and tells them apart by size.
FIRST_HANDLE = 1 << 63

# Open flags passed on to the layer; the others are the kernel's business.
PASS_FLAGS = (os.O_ACCMODE | os.O_APPEND | os.O_NONBLOCK | os.O_SYNC | os.O_DSYNC
              | os.O_DIRECT | os.O_TRUNC | os.O_LARGEFILE)

# Errors that mean "the lower is out" (a stall given up on, a failing or crashed
# server), not "the object changed".
OUTAGE = frozenset((errno.EIO, errno.ETIMEDOUT, errno.ENOTCONN))


def err(code: int, what: str = "") -> OSError:
    """The OSError the model raises for *code*, with what went wrong if it helps."""
    return OSError(code, os.strerror(code) + (f": {what}" if what else ""))


@dataclass(slots=True)
class Attr:
    """What the kernel is told about a node: the layer's stat with our overrides."""
    ino: int
    st: os.stat_result
    nlink: int
    uid: int
    gid: int
    ttl: float
    # The node is an immutable lower object: these attributes stay valid until the
    # model says attr_changed() or node_detached() for it (so the adapter may keep them).
    fixed: bool = False


@dataclass(slots=True)
class Caller:
    uid: int
    gid: int


@dataclass(slots=True)
class SetAttr:
    """Requested changes; None means unchanged."""
    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    size: int | None = None
    atime_ns: int | None = None
    mtime_ns: int | None = None


class Handle:
    """An open file: a descriptor in the layer the node lived in when opened."""
    __slots__ = ("fh", "node", "fd", "upper", "flags", "shared", "cow")

    def __init__(self, fh: int, node: Node, fd: int, upper: bool, flags: int,
                 shared: bytes | None = None, cow=None):
        self.fh, self.node, self.fd, self.upper, self.flags = fh, node, fd, upper, flags
        self.shared = shared  # the SharedFds key, if the descriptor is shared
        self.cow = cow  # a copy-on-write file's CowEntry (then no descriptor: fd is -1)


@dataclass(slots=True)
class Entry:
    """One name of a directory listing with what the listing learned about it."""
    name: bytes
    upper_st: os.stat_result | None
    lower_st: os.stat_result | None


class DirHandle:
    __slots__ = ("fh", "node", "entries", "fixed")

    def __init__(self, fh: int, node: Node, entries: list[Entry], fixed: bool = False):
        self.fh, self.node, self.entries = fh, node, entries
        self.fixed = fixed  # a listing that cannot change: the kernel may keep it


class OpenTable:
    """Open files and directories by handle number (one numbering for both)."""

    def __init__(self):
        self._open: dict[int, Handle | DirHandle] = {}
        self._numbers = itertools.count(FIRST_HANDLE)

    def number(self) -> int:
        """A handle number never handed out before."""
        return next(self._numbers)

    def add(self, h: Handle | DirHandle) -> None:
        self._open[h.fh] = h

    def pop(self, fh: int) -> Handle | DirHandle | None:
        return self._open.pop(fh, None)

    def file(self, fh: int) -> Handle:
        h = self._open.get(fh)
        if not isinstance(h, Handle):
            raise err(errno.EBADF)
        return h

    def dir(self, fh: int) -> DirHandle:
        dh = self._open.get(fh)
        if not isinstance(dh, DirHandle):
            raise err(errno.EBADF)
        return dh

    def take_all(self) -> list[Handle | DirHandle]:
        """Every open handle, forgotten here (at unmount)."""
        out = list(self._open.values())
        self._open.clear()
        return out


class NegativeEntry(FileNotFoundError):
    """ENOENT that the kernel may remember for *ttl* seconds."""

    def __init__(self, ttl: float):
        super().__init__(errno.ENOENT, os.strerror(errno.ENOENT))
        self.ttl = ttl


class Notifier:
    """How the model tells the kernel that something it may have cached changed.

    The FUSE adapter implements it; without FUSE (unit tests) nothing is cached.
    """

    def attr_changed(self, ino: int) -> None:
        pass

    def node_detached(self, ino: int) -> None:
        """The node left the tree (unlinked, its lower object gone, or forgotten):
        what was said of it before no longer holds."""

    def entry_changed(self, parent_ino: int, name: bytes) -> None:
        pass

    def listing_changed(self, ino: int) -> None:
        """A directory's entries changed behind the kernel's back."""
