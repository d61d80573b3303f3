"""File data: reads, writes and syncs, by open file and by node.

By open file: the adapter opens and releases, and each handle holds a
descriptor of the layer its node lived in when opened (an immutable lower
file's is shared by every reader).  By node: when the kernel keeps opens (the
adapter answers open with ENOSYS), reads and writes name the node, and a
descriptor per node and use is kept instead; a lower file is copied up at its
first write.  A node unlinked while held reads and writes its orphan's
descriptor.  A copy-on-write upper file is served by its CowFile instead (cowfiles),
whichever way it is reached.  Small upper reads and writes are made inline (the upper is local);
larger ones, and every lower one, in worker threads.
"""

import errno
import os
import stat

import trio

from .copying import CopyUp
from .cowfiles import CowFiles
from .descriptors import Descriptors
from .fdcache import FdCache, FdEntry
from .inodes import Node
from .lowerlayer import LowerLayer
from .upperlayer import UpperLayer
from .nodes import Nodes
from .orphans import Orphans
from .sharedfds import SharedFds
from .types import PASS_FLAGS, Handle, OpenTable, err
from ..libc import syncfs

# Upper reads and writes up to this size are made inline: the upper is a local file
# system, and a worker-thread round trip costs more than such a call.
INLINE_IO = 64 * 1024


class FileData:
    def __init__(self, dirs: Descriptors, upper: UpperLayer, lower: LowerLayer, nodes: Nodes,
                 copying: CopyUp, orphans: Orphans, handles: OpenTable, lock: trio.Lock,
                 cows: CowFiles, *, readonly: bool):
        self.dirs, self.upper, self.lower, self.nodes = dirs, upper, lower, nodes
        self.cows = cows
        self.copying, self.orphans, self.handles, self.lock = copying, orphans, handles, lock
        self.readonly = readonly
        self.lower_files = SharedFds(256)
        # Upper files read or written by node (no open file: the kernel keeps opens), by
        # ("r" or "w", node number): one descriptor per node and use, closed by LRU.
        self.file_fds = FdCache(128)
        self.data_limiter = trio.CapacityLimiter(8)

    def close(self) -> None:
        for h in self.handles.take_all():
            if isinstance(h, Handle) and h.shared is None and h.cow is None:
                os.close(h.fd)
        self.lower_files.close()
        self.file_fds.clear()

    def dropped(self, node: Node) -> None:
        self.file_fds.drop(("r", node.ino))
        self.file_fds.drop(("w", node.ino))

    # By open file.

    def new_handle(self, node: Node, fd: int, upper: bool, flags: int) -> Handle:
        return self._add(Handle(self.handles.number(), node, fd, upper, flags))

    def _add(self, h: Handle) -> Handle:
        self.handles.add(h)
        return h

    async def open(self, node: Node, flags: int) -> Handle:
        if node.is_dir:
            raise err(errno.EISDIR)
        writing = flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC
        if writing:
            if self.readonly:
                raise err(errno.EROFS)
            async with self.lock:
                await self.copying.copy_up(node, truncate=bool(flags & os.O_TRUNC))
                cow = await self.cows.of(node)
                if cow is not None and flags & os.O_TRUNC:
                    await self.cows.truncate(cow, 0)
        else:
            cow = await self.cows.of(node) if node.upper else None
        if cow is not None:
            return self._add(Handle(self.handles.number(), node, -1, True, flags, cow=cow))
        if (not writing and node.kind == stat.S_IFREG and self.nodes.immutable(node)
                and flags & PASS_FLAGS & ~os.O_LARGEFILE == os.O_RDONLY):
            key, fd = await self._shared_lower_fd(node)
            h = self.new_handle(node, fd, False, flags)
            h.shared = key
            return h
        fd = await self._open_top(node, flags & PASS_FLAGS)
        return self.new_handle(node, fd, node.upper, flags)

    async def _shared_lower_fd(self, node: Node) -> tuple[bytes, int]:
        """The descriptor of an immutable lower file shared by all its readers (and its
        key, for lower_files.release)."""
        key = self.dirs.lower_path(node)
        fd = self.lower_files.acquire(key)
        if fd is None:
            fd = self.lower_files.add(key, await self._open_top(node, os.O_RDONLY))
        return key, fd

    async def _open_top(self, node: Node, flags: int) -> int:
        if node.parent is None:
            raise err(errno.ENOENT, "removed")
        if node.upper:
            with self.dirs.upper_fd(node.parent) as pfd:
                return self.upper.open(pfd, node.name, flags)
        async with self.dirs.lower_fd(node.parent) as pfd:
            return await self.lower.open(pfd, node.name, flags)

    async def read(self, h: Handle, offset: int, size: int) -> bytes:
        if h.cow is not None:
            return await self.cows.pread(h.cow, size, offset)
        if not h.upper and h.node.upper:
            # Copied up since it was opened: read the copy, as kernel overlayfs does.
            fd = await self._open_top(h.node, h.flags & PASS_FLAGS & ~os.O_TRUNC)
            self._close_handle_fd(h)
            h.fd, h.upper, h.shared = fd, True, None
        if h.upper:
            return await self._upper_pread(h.fd, size, offset)
        return await self.lower.pread(h.fd, size, offset)

    async def write(self, h: Handle, offset: int, data: bytes) -> int:
        if h.cow is not None:
            return await self.cows.pwrite(h.cow, data, offset)
        if not h.upper:
            raise err(errno.EBADF)
        return await self._upper_pwrite(h.fd, data, offset)

    async def fsync(self, h: Handle, datasync: bool) -> None:
        if h.cow is not None:
            await self.cows.fsync(h.cow)
        elif h.upper:
            await self._sync_fd(h.fd, datasync)

    def release(self, fh: int) -> None:
        h = self.handles.pop(fh)
        if isinstance(h, Handle) and h.cow is None:  # (a CowFile outlives its handles)
            self._close_handle_fd(h)

    def _close_handle_fd(self, h: Handle) -> None:
        if h.shared is not None:
            self.lower_files.release(h.shared)
        else:
            os.close(h.fd)

    # By node (the kernel keeps opens), orphans included.

    async def read_node(self, node: Node, offset: int, size: int) -> bytes:
        if node.is_dir:
            raise err(errno.EISDIR)
        cow = await self._cow(node)
        if cow is not None:
            return await self.cows.pread(cow, size, offset)
        if node.parent is None:  # unlinked while the kernel holds it
            fd = self.orphans.fd(node)
            if self.orphans.is_lower(node):
                return await self.lower.pread(fd, size, offset)
            return await self._upper_pread(fd, size, offset)
        if node.upper:
            entry = self._kept_file_fd(node, "r")
            try:
                return await self._upper_pread(entry.fd, size, offset)
            finally:
                self.file_fds.release(entry)
        if node.kind == stat.S_IFREG and self.nodes.immutable(node):
            key, fd = await self._shared_lower_fd(node)
            try:
                return await self.lower.pread(fd, size, offset)
            finally:
                self.lower_files.release(key)
        # A file of a lower that may change: opened for this read only, as an open would.
        async with self.dirs.lower_fd(node.parent) as pfd:
            return await self.lower.read_at(pfd, node.name, size, offset)

    async def write_node(self, node: Node, offset: int, data: bytes) -> int:
        if node.is_dir:
            raise err(errno.EISDIR)
        if self.readonly:
            raise err(errno.EROFS)
        if not node.upper and node.parent is not None:
            async with self.lock:
                await self.copying.copy_up(node)
        cow = await self._cow(node)
        if cow is not None:
            return await self.cows.pwrite(cow, data, offset)
        if node.parent is None:  # unlinked while the kernel holds it (or during the copy)
            return await self._upper_pwrite(await self.orphans.writable(node), data, offset)
        entry = self._kept_file_fd(node, "w")
        try:
            return await self._upper_pwrite(entry.fd, data, offset)
        finally:
            self.file_fds.release(entry)

    async def fsync_node(self, node: Node, datasync: bool) -> None:
        # A lower file (orphaned or not) was never written: nothing of ours to sync.
        cow = await self._cow(node)
        if cow is not None:
            await self.cows.fsync(cow)
        elif node.parent is None:
            if not self.orphans.is_lower(node):
                await self._sync_fd(self.orphans.fd(node), datasync)
        elif node.upper:
            entry = self._kept_file_fd(node, "r")
            try:
                await self._sync_fd(entry.fd, datasync)
            finally:
                self.file_fds.release(entry)

    async def _cow(self, node: Node):
        """*node*'s CowEntry if it is a copy-on-write file (orphaned or not), else None."""
        if node.parent is None:
            return self.cows.known(node)
        return await self.cows.of(node) if node.upper else None

    def keep_by_node(self, h: Handle) -> None:
        """Make a new file's open descriptor (read-write) the one its node's reads and
        writes use: a file created read-only can still be written through it."""
        self.handles.pop(h.fh)
        self.file_fds.release(self.file_fds.insert(("w", h.node.ino), h.fd))

    def _kept_file_fd(self, node: Node, use: str) -> FdEntry:
        """A descriptor of *node*'s upper file for *use* ("r" or "w"), pinned: a writable
        one serves reads too."""
        entry = self.file_fds.acquire(("w", node.ino))
        if entry is None and use == "r":
            entry = self.file_fds.acquire(("r", node.ino))
        if entry is None:
            with self.dirs.upper_fd(node.parent) as pfd:
                fd = self.upper.open(pfd, node.name, os.O_RDWR if use == "w" else os.O_RDONLY)
            entry = self.file_fds.insert((use, node.ino), fd)
        return entry

    # The calls themselves.

    async def _upper_pread(self, fd: int, size: int, offset: int) -> bytes:
        if size <= INLINE_IO:
            return self.upper.pread(fd, size, offset)  # local and small: a thread hop costs more
        return await trio.to_thread.run_sync(self.upper.pread, fd, size, offset,
                                             limiter=self.data_limiter)

    async def _upper_pwrite(self, fd: int, data: bytes, offset: int) -> int:
        if len(data) <= INLINE_IO:
            return self.upper.pwrite(fd, data, offset)
        return await trio.to_thread.run_sync(self.upper.pwrite, fd, data, offset,
                                             limiter=self.data_limiter)

    async def _sync_fd(self, fd: int, datasync: bool) -> None:
        await trio.to_thread.run_sync(self.upper.fsync, fd, datasync, limiter=self.data_limiter)

    async def fsyncdir(self, node: Node, datasync: bool) -> None:
        if node.upper:
            with self.dirs.upper_fd(node) as fd:
                await trio.to_thread.run_sync(self.upper.fsync, fd, limiter=self.data_limiter)

    async def sync(self) -> None:
        """Flush everything written to the upper to disk."""
        await trio.to_thread.run_sync(syncfs, self.upper.root_fd)
