"""A stand-in for the overlay model that records what the FUSE adapter asks of it.

The adapter's tests (test_fuse_adapter.py) drive FuseOps' handlers in-process against
this, without a mount and without the real model's layers, so that each test sees exactly
which model call a request became and what the adapter made of the answer.  It keeps the
kernel's reference counts the way the real model does (lookup, mkdir, mknod, symlink,
create and link give one each, entry_sent one, forget takes them back), so a test can
check that the adapter reports listings' entries and never counts by itself.
"""

import collections
import os
import stat
import types

from nixfs.overlay import FIRST_HANDLE, Attr, DirHandle, Dirent, Handle, NegativeEntry

ROOT_INO = 1


class FakeNode:
    def __init__(self, ino: int, parent, name: bytes, kind: int):
        self.ino, self.parent, self.name, self.kind = ino, parent, name, kind


def stat_of(kind: int, ino: int, size: int = 0) -> types.SimpleNamespace:
    """What a layer's lstat would say, with a distinct value in every field the adapter copies."""
    return types.SimpleNamespace(
        st_mode=kind | 0o640, st_ino=ino + 1000, st_nlink=7, st_uid=11, st_gid=12,
        st_rdev=0x0803 if kind in (stat.S_IFBLK, stat.S_IFCHR) else 0, st_size=size,
        st_blksize=4096, st_blocks=8, st_atime_ns=1_000_000_001, st_mtime_ns=2_000_000_002,
        st_ctime_ns=3_000_000_003)


class FakeOverlay:
    """The calls FuseOps makes on an Overlay, each recorded in ``calls`` as (name, args).

    ``fail_with``: an exception the next call raises (then cleared).  ``gone``: names a
    listing holds that readdir_entry says vanished meanwhile.
    """

    def __init__(self, names=(b"a", b"b", b"c")):
        self.calls: list[tuple[str, tuple]] = []
        self.refs: collections.Counter[int] = collections.Counter()  # ino -> kernel references
        self.refused: list[int] = []
        self.fail_with: BaseException | None = None
        self.gone: set[bytes] = set()
        # Names readdir_entry gives as a Dirent (no node): inode 1000 + their index.
        self.nodeless: set[bytes] = set()
        self.notify = None  # the real model gets its notifier from the daemon, not the adapter
        self.root = FakeNode(ROOT_INO, None, b"", stat.S_IFDIR)
        self.nodes = {ROOT_INO: self.root}
        self._next_ino = ROOT_INO + 1
        self._next_fh = FIRST_HANDLE
        self.handles: dict[int, Handle | DirHandle] = {}
        self.names = list(names)

    # -- helpers

    def _call(self, name: str, *args) -> None:
        self.calls.append((name, args))
        if self.fail_with is not None:
            failure, self.fail_with = self.fail_with, None
            raise failure

    def called(self, name: str) -> list[tuple]:
        return [args for n, args in self.calls if n == name]

    def add(self, parent, name: bytes, kind: int) -> FakeNode:
        node = FakeNode(self._next_ino, parent, name, kind)
        self._next_ino += 1
        self.nodes[node.ino] = node
        return node

    def attr(self, node, **kw) -> Attr:
        return Attr(ino=node.ino, st=stat_of(node.kind, node.ino), nlink=3, uid=21, gid=22,
                    ttl=kw.pop("ttl", 5.0), **kw)

    def _made(self, parent, name, kind):
        node = self.add(parent, name, kind)
        self.refs[node.ino] += 1
        return node, self.attr(node)

    def _fh(self) -> int:
        self._next_fh += 1
        return self._next_fh

    # -- the Overlay calls the adapter makes

    def node(self, ino: int):
        if ino not in self.nodes:
            raise OSError(116, "stale")  # ESTALE, as the model says
        return self.nodes[ino]

    async def lookup(self, parent, name):
        self._call("lookup", parent, name)
        if name == b"negative":
            raise NegativeEntry(86400.0)
        node = self.add(parent, name, stat.S_IFREG)
        self.refs[node.ino] += 1
        return node, self.attr(node)

    def forget(self, ino, count):
        self._call("forget", ino, count)
        self.refs[ino] -= count

    def entry_sent(self, node):
        self._call("entry_sent", node)
        self.refs[node.ino] += 1

    def entry_refused(self, node):
        self._call("entry_refused", node)
        self.refused.append(node.ino)

    async def getattr(self, node):
        self._call("getattr", node)
        return self.attr(node)

    def handle(self, fh):
        self._call("handle", fh)
        return self.handles[fh]

    async def setattr(self, node, changes, handle):
        self._call("setattr", node, changes, handle)
        return self.attr(node)

    async def readlink(self, node):
        self._call("readlink", node)
        return b"target"

    async def mknod(self, parent, name, mode, rdev, caller):
        self._call("mknod", parent, name, mode, rdev, caller)
        return self._made(parent, name, stat.S_IFMT(mode))

    async def mkdir(self, parent, name, mode, caller):
        self._call("mkdir", parent, name, mode, caller)
        return self._made(parent, name, stat.S_IFDIR)

    async def symlink(self, parent, name, target, caller):
        self._call("symlink", parent, name, target, caller)
        return self._made(parent, name, stat.S_IFLNK)

    async def unlink(self, parent, name):
        self._call("unlink", parent, name)

    async def rmdir(self, parent, name):
        self._call("rmdir", parent, name)

    async def rename(self, old_parent, old_name, new_parent, new_name, flags):
        self._call("rename", old_parent, old_name, new_parent, new_name, flags)

    async def link(self, node, new_parent, new_name):
        self._call("link", node, new_parent, new_name)
        self.refs[node.ino] += 1
        return self.attr(node)

    async def open(self, node, flags):
        self._call("open", node, flags)
        h = Handle(self._fh(), node, -1, True, flags)
        self.handles[h.fh] = h
        return h

    async def create(self, parent, name, mode, flags, caller):
        self._call("create", parent, name, mode, flags, caller)
        node, attr = self._made(parent, name, stat.S_IFREG)
        h = Handle(self._fh(), node, -1, True, flags)
        self.handles[h.fh] = h
        return h, node, attr

    def keep_by_node(self, handle):
        self._call("keep_by_node", handle)

    async def read(self, handle, off, size):
        self._call("read", handle, off, size)
        return b"by handle"

    async def read_node(self, node, off, size):
        self._call("read_node", node, off, size)
        return b"by node"

    async def write(self, handle, off, buf):
        self._call("write", handle, off, buf)
        return len(buf)

    async def write_node(self, node, off, buf):
        self._call("write_node", node, off, buf)
        return len(buf)

    def release(self, fh):
        self._call("release", fh)

    async def fsync(self, handle, datasync):
        self._call("fsync", handle, datasync)

    async def fsync_node(self, node, datasync):
        self._call("fsync_node", node, datasync)

    async def list_dir(self, node):
        self._call("list_dir", node)
        return DirHandle(0, node, [types.SimpleNamespace(name=n) for n in self.names])

    async def opendir(self, node):
        self._call("opendir", node)
        dh = await self.list_dir(node)
        dh.fh = self._fh()
        self.handles[dh.fh] = dh
        return dh

    def dirhandle(self, fh):
        return self.handles[fh]

    async def readdir_entry(self, dh, index):
        name = dh.entries[index].name
        self._call("readdir_entry", dh, index)
        if name in self.gone:
            return None
        if name in self.nodeless:
            return Dirent(1000 + index, stat.S_IFREG)
        node = self.add(dh.node, name, stat.S_IFREG)
        return node, self.attr(node)

    def releasedir(self, fh):
        self._call("releasedir", fh)

    async def fsyncdir(self, node, datasync):
        self._call("fsyncdir", node, datasync)

    def statfs(self):
        self._call("statfs")
        self.statvfs = os.statvfs("/")  # what the test compares with (free counts move)
        return self.statvfs

    async def getxattr(self, node, name):
        self._call("getxattr", node, name)
        return b"value"

    async def listxattr(self, node):
        self._call("listxattr", node)
        return [b"user.a"]

    async def setxattr(self, node, name, value):
        self._call("setxattr", node, name, value)

    async def removexattr(self, node, name):
        self._call("removexattr", node, name)

    def attributes_settled(self, node) -> bool:
        return False
