"""Open directories of both layers, by node: every other part's way into a layer.

An operation on ``dir/name`` costs one ``*at`` call on ``dir``'s descriptor, kept
open in a bounded cache keyed by (layer, node number), so a descriptor follows its
directory through renames as the node does.  Here too: a node's lower path, the
upper object of a node as (directory, name), and the helpers that let nixfs change
an upper directory without showing it (read-only ones, times kept).
"""

import errno
import os
from contextlib import asynccontextmanager, contextmanager

from . import upperformat as fmt
from .fdcache import FdCache, FdEntry
from .inodes import DERIVED, Node
from .layers import made_writable, times_kept
from .lowerlayer import LowerLayer
from .upperlayer import UpperLayer
from .types import err


class Descriptors:
    def __init__(self, upper: UpperLayer, lower: LowerLayer, root: Node, work_fd: int, *,
                 privileged: bool, capacity: int):
        self.upper, self.lower, self.root = upper, lower, root
        self.work_fd = work_fd
        self.privileged = privileged
        self.fds = FdCache(capacity)
        self._root_entries = {"u": FdEntry(upper.root_fd), "l": FdEntry(lower.root_fd)}
        for e in self._root_entries.values():
            e.pins = 1 << 62
        self._work_names = fmt.WorkNames()

    def close(self) -> None:
        self.fds.clear()

    @contextmanager
    def upper_fd(self, node: Node):
        """The upper directory of *node* (which must have one), open."""
        entry = self._upper_entry(node)
        try:
            yield entry.fd
        finally:
            self.fds.release(entry)

    def _upper_entry(self, node: Node) -> FdEntry:
        if node is self.root:
            return self._root_entries["u"]
        entry = self.fds.acquire(("u", node.ino))
        if entry is not None:
            return entry
        if node.parent is None:
            raise err(errno.ENOENT, "removed")
        with self.upper_fd(node.parent) as pfd:
            fd = self.upper.open_dir(pfd, node.name)
        return self.fds.insert(("u", node.ino), fd)

    @asynccontextmanager
    async def lower_fd(self, node: Node):
        """The lower directory of *node* (which must have one), open."""
        entry = await self._lower_entry(node)
        try:
            yield entry.fd
        finally:
            self.fds.release(entry)

    async def _lower_entry(self, node: Node) -> FdEntry:
        if node is self.root:
            return self._root_entries["l"]
        entry = self.fds.acquire(("l", node.ino))
        if entry is not None:
            return entry
        if node.lower is DERIVED:
            if node.parent is None:
                raise err(errno.ENOENT, "removed")
            async with self.lower_fd(node.parent) as pfd:
                fd = await self.lower.open_dir(pfd, node.name)
        elif node.lower is None:
            raise err(errno.ENOENT, "no lower directory")
        else:
            fd = await self.lower.open_dir_path(node.lower)
        return self.fds.insert(("l", node.ino), fd)

    def has_lower_fd(self, node: Node) -> bool:
        return ("l", node.ino) in self.fds

    def adopt_lower_fd(self, node: Node, fd: int) -> None:
        """Keep *fd*, opened elsewhere (a listing's fetch), as *node*'s lower directory;
        closed instead if the node was removed meanwhile or someone else opened it."""
        if node.parent is None or ("l", node.ino) in self.fds:
            os.close(fd)
        else:
            self.fds.release(self.fds.insert(("l", node.ino), fd))

    def forget(self, node: Node) -> None:
        """The directory descriptors of *node* no longer lead to it."""
        self.fds.drop(("u", node.ino))
        self.fds.drop(("l", node.ino))

    def forget_lower(self, node: Node) -> None:
        self.fds.drop(("l", node.ino))

    def lower_path(self, node: Node) -> bytes:
        if node.lower is DERIVED:
            parent = self.lower_path(node.parent)
            return parent + b"/" + node.name if parent else node.name
        return node.lower

    def child_lower_path(self, parent: Node, name: bytes) -> bytes:
        base = self.lower_path(parent)
        return base + b"/" + name if base else name

    @contextmanager
    def upper_object(self, node: Node):
        """(dirfd, name) of *node*'s upper object; the root is (root fd, '.')."""
        if node is self.root:
            yield self.upper.root_fd, b"."
            return
        if node.parent is None:
            raise err(errno.ENOENT, "removed")
        with self.upper_fd(node.parent) as pfd:
            yield pfd, node.name

    async def lower_object_call(self, node: Node, call, *args):
        """``call(dirfd, name, *args)``, a LowerLayer method, on *node*'s lower object."""
        if node is self.root:
            return await call(self.lower.root_fd, b".", *args)
        if node.parent is None:
            raise err(errno.ENOENT, "removed")  # as upper_object says for an upper one
        async with self.lower_fd(node.parent) as pfd:
            return await call(pfd, node.name, *args)

    @contextmanager
    def writable(self, dirfd: int):
        """Let an unprivileged daemon change an upper directory it made read-only.

        Nix makes store paths read-only; the user may still delete in them after
        making them writable, but nixfs' own markers (whiteouts, copy-ups) go in
        without asking, as kernel overlayfs' do with the mounter's credentials.
        """
        if self.privileged:
            yield
            return
        with made_writable(dirfd):
            yield

    @staticmethod
    @contextmanager
    def keep_times(dirfd: int):
        """A copy-up into a directory is not a change of that directory: keep its times."""
        with times_kept(dirfd):
            yield

    def work_name(self, kind: str = "tmp") -> bytes:
        """A free name in the work folder for something of *kind* being built or removed."""
        return self._work_names.next(kind)

    def discard_upper(self, pfd: int, name: bytes) -> bytes:
        """Move the upper ``pfd/name`` into the work folder at once (its removal can then
        take its time); the name it has there."""
        trash = self.work_name("trash")
        self.upper.rename(pfd, name, self.work_fd, trash)
        return trash
