"""Objects removed from the tree while the kernel still holds their node.

An unlinked open file, a removed working directory: the kernel goes on asking
for their attributes (and a file's data).  Before such a node loses its last
name, a descriptor of its object is kept here, until the node is dropped.
A lower file's is read-only; it gets a private copy at its first write.
"""

import errno
import os
import stat

import trio

from .copying import CopyUp
from .descriptors import Descriptors
from .inodes import Node
from .lowerlayer import LowerLayer
from .upperlayer import UpperLayer
from .types import err


def _open_nofollow(dirfd: int, name: bytes, flags: int) -> int:
    """(In a worker thread, on the lower.)"""
    return os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirfd)


class Orphans:
    def __init__(self, dirs: Descriptors, upper: UpperLayer, lower: LowerLayer, copying: CopyUp,
                 lock: trio.Lock):
        self.dirs, self.upper, self.lower = dirs, upper, lower
        self.copying, self.lock = copying, lock
        self._fds: dict[int, int] = {}  # node number -> descriptor
        self._lower: set[int] = set()  # of those, lower files (read-only, never copied)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._lower.clear()

    def dropped(self, node: Node) -> None:
        """*node* left the table: its object is let go."""
        fd = self._fds.pop(node.ino, None)
        self._lower.discard(node.ino)
        if fd is not None:
            os.close(fd)

    async def keep(self, node: Node) -> None:
        """Before *node* loses its last name, keep a handle on its object if the kernel
        still holds the node (an unlinked open file, a removed working directory).

        A regular file's is open for reading (and writing, if it is in the upper and the
        daemon may): when the kernel keeps opens, reads and writes of an unlinked open
        file come by node, and this is what they use."""
        if node.lookups == 0 or node.aliases or node.ino in self._fds:
            return
        tries = [os.O_PATH]
        if node.kind == stat.S_IFREG:
            tries[:0] = [os.O_RDWR, os.O_RDONLY] if node.upper else [os.O_RDONLY]

        def keep(pfd, open_one=_open_nofollow):
            for flags in tries:
                try:
                    return open_one(pfd, node.name, flags)
                except OSError:
                    if flags == os.O_PATH:
                        raise
        try:
            if node.upper:
                with self.dirs.upper_fd(node.parent) as pfd:
                    fd = keep(pfd, self.upper.open)
            else:
                async with self.dirs.lower_fd(node.parent) as pfd:
                    fd = await self.lower.run(keep, pfd, late=os.close)
        except OSError:
            return
        self._fds[node.ino] = fd
        if not node.upper and node.kind == stat.S_IFREG:
            self._lower.add(node.ino)

    def is_lower(self, node: Node) -> bool:
        """Whether *node*'s kept object is a lower file (never written)."""
        return node.ino in self._lower

    def fd(self, node: Node) -> int:
        fd = self._fds.get(node.ino)
        if fd is None:
            raise err(errno.ENOENT, "removed")
        return fd  # (an O_PATH one, where no better could be had, answers EBADF)

    def stat(self, node: Node) -> os.stat_result:
        fd = self.fd(node)
        # (A lower file's descriptor is open already: its fstat names nothing in the lower.)
        return os.fstat(fd) if node.ino in self._lower else self.upper.fstat(fd)

    async def writable(self, node: Node) -> int:
        """The descriptor an unlinked file is written through.  A lower file's is
        read-only: it gets a private copy in the work directory now (kernel overlayfs
        copies up when such a file is opened for writing, before the unlink)."""
        if node.ino not in self._lower:
            return self.fd(node)
        async with self.lock:  # one copy, however many writes wait for it
            if node.ino not in self._lower:
                return self.fd(node)
            new = await self.copying.copy_open_file(self.fd(node))
            self._fds[node.ino] = new
            self._lower.discard(node.ino)
            return new
