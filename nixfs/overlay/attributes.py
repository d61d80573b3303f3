"""Changing attributes, and extended attributes: setattr, xattrs, statfs.

A change copies the object up first (the lower is never changed) and is made on
the upper object by name, or on the descriptor kept for a file unlinked while
open.  Kernel overlayfs' own xattrs are neither shown nor accepted; those of an
immutable lower object come from the listing cache.
"""

import errno
import os
import stat

import trio

from . import upperformat as fmt
from .copying import CopyUp
from .cowfiles import CowFiles
from .descriptors import Descriptors
from .inodes import Node
from .lowerlayer import LowerLayer
from .upperlayer import UpperLayer
from .listings import Listings
from .names import Names
from .nodes import Nodes
from .orphans import Orphans
from .types import Attr, Handle, SetAttr, err


def _new_times(changes: SetAttr, st) -> tuple[int, int]:
    """(atime, mtime) in ns for utime: what *changes* sets, the rest as *st* has it."""
    return (st.st_atime_ns if changes.atime_ns is None else changes.atime_ns,
            st.st_mtime_ns if changes.mtime_ns is None else changes.mtime_ns)


class Attributes:
    def __init__(self, dirs: Descriptors, upper: UpperLayer, lower: LowerLayer, nodes: Nodes,
                 names: Names, listings: Listings, copying: CopyUp, orphans: Orphans,
                 lock: trio.Lock, cows: CowFiles, *, owner: tuple[int, int] | None,
                 readonly: bool):
        self.cows = cows
        self.dirs, self.upper, self.lower, self.nodes, self.names = dirs, upper, lower, nodes, names
        self.listings, self.copying, self.orphans, self.lock = listings, copying, orphans, lock
        self.owner, self.readonly = owner, readonly

    async def setattr(self, node: Node, changes: SetAttr, handle: Handle | None = None) -> Attr:
        if self.readonly:
            raise err(errno.EROFS)
        if node.parent is None and node is not self.dirs.root:
            return await self._setattr_orphan(node, changes)
        async with self.lock:
            await self.copying.copy_up(node, truncate=changes.size == 0)
            fd_for_size = handle.fd if handle is not None and handle.upper else None
            cow = await self.cows.of(node) if changes.size is not None and node.upper else None
            if cow is not None:
                await self.cows.truncate(cow, changes.size)
            with self.dirs.upper_object(node) as (pfd, name):
                if changes.size is not None and cow is None:
                    if node.is_dir:
                        raise err(errno.EISDIR)
                    if fd_for_size is not None:
                        self.upper.ftruncate(fd_for_size, changes.size)
                    else:
                        fd = self.upper.open(pfd, name, os.O_WRONLY)
                        try:
                            self.upper.ftruncate(fd, changes.size)
                        finally:
                            os.close(fd)
                ids = self._new_owner(changes)
                if ids is not None:
                    self.upper.chown(pfd, name, *ids)
                if changes.mode is not None:
                    if node.kind == stat.S_IFLNK:
                        raise err(errno.EOPNOTSUPP)
                    self.upper.chmod(pfd, name, stat.S_IMODE(changes.mode))
                if changes.atime_ns is not None or changes.mtime_ns is not None:
                    self.upper.utime(pfd, name, _new_times(changes, self.upper.lstat(pfd, name)))
                st = self.upper.lstat(pfd, name)
            return self.names.attr(node, await self.names.shown_stat(node, st))

    def _new_owner(self, changes: SetAttr) -> tuple[int, int] | None:
        """The (uid, gid) to give the upper object (-1: unchanged), or None for no chown."""
        uid, gid = changes.uid, changes.gid
        if self.owner is not None:
            # Everything shows as the mounting user's; only a real change is passed on.
            uid = None if uid == self.owner[0] else uid
            gid = None if gid == self.owner[1] else gid
        if uid is None and gid is None:
            return None
        return (-1 if uid is None else uid, -1 if gid is None else gid)

    async def _setattr_orphan(self, node: Node, changes: SetAttr) -> Attr:
        """ftruncate, fchmod, fchown or futimens of a file unlinked while open: done on
        the descriptor kept for it (see Orphans.keep); a lower file gets its private
        copy first, as for a write, so the lower is never changed."""
        if node.kind != stat.S_IFREG:
            raise err(errno.ENOENT, "removed")
        fd = await self.orphans.writable(node)
        cow = self.cows.known(node)
        if changes.size is not None and cow is not None:
            await self.cows.truncate(cow, changes.size)
        elif changes.size is not None:
            self.upper.ftruncate(fd, changes.size)
        ids = self._new_owner(changes)
        if ids is not None:
            self.upper.fchown(fd, *ids)
        if changes.mode is not None:
            self.upper.fchmod(fd, stat.S_IMODE(changes.mode))
        if changes.atime_ns is not None or changes.mtime_ns is not None:
            self.upper.futime(fd, _new_times(changes, self.upper.fstat(fd)))
        return self.names.attr(node, self.cows.stat(node, self.upper.fstat(fd)))

    async def getxattr(self, node: Node, name: bytes) -> bytes:
        key = os.fsdecode(name)
        if fmt.is_overlay_xattr(key):
            raise err(errno.ENODATA)
        try:
            if node.upper:
                with self.dirs.upper_object(node) as (pfd, n):
                    return self.upper.getxattr(pfd, n, key)
            if self.nodes.immutable(node):
                value = (await self.listings.lower_xattrs(node)).get(key)
                if value is None:
                    raise err(errno.ENODATA)
                return value
            return await self.dirs.lower_object_call(node, self.lower.getxattr, key)
        except OSError as e:
            if e.errno == errno.ENOTSUP:
                raise err(errno.ENODATA) from None
            raise

    async def listxattr(self, node: Node) -> list[bytes]:
        try:
            if node.upper:
                with self.dirs.upper_object(node) as (pfd, n):
                    names = self.upper.listxattr(pfd, n)
            elif self.nodes.immutable(node):
                names = list(await self.listings.lower_xattrs(node))
            else:
                names = await self.dirs.lower_object_call(node, self.lower.listxattr)
        except OSError as e:
            if e.errno == errno.ENOTSUP:
                return []
            raise
        return [os.fsencode(n) for n in names if not fmt.is_overlay_xattr(n)]

    async def setxattr(self, node: Node, name: bytes, value: bytes) -> None:
        key = os.fsdecode(name)
        if self.readonly:
            raise err(errno.EROFS)
        if fmt.is_overlay_xattr(key):
            raise err(errno.EPERM, "overlay xattrs are reserved")
        async with self.lock:
            await self.copying.copy_up(node)
            with self.dirs.upper_object(node) as (pfd, n):
                self.upper.setxattr(pfd, n, key, value)

    async def removexattr(self, node: Node, name: bytes) -> None:
        if self.readonly:
            raise err(errno.EROFS)
        await self.getxattr(node, name)  # ENODATA without a copy-up
        key = os.fsdecode(name)
        async with self.lock:
            await self.copying.copy_up(node)
            with self.dirs.upper_object(node) as (pfd, n):
                self.upper.removexattr(pfd, n, key)

    def statfs(self) -> os.statvfs_result:
        return self.upper.statfs()
