"""The pyfuse3 adapter: a protocol translator only.

Each handler turns a FUSE request into a call on the overlay model and its
answer into pyfuse3's types.  Handlers raise nothing but ``FUSEError``: every one
passes the gate of nixfs/fuse/errors.py.  The kernel's lookup counts are the model's:
the adapter only reports which entries a listing sent and which one it refused.
"""

import collections
import errno
import logging
import os
import stat

import pyfuse3

from . import features
from ..overlay import FIRST_HANDLE, Attr, Caller, Dirent, NegativeEntry, Overlay, SetAttr
from .errors import translate
from .notifier import ListingSnapshots
from .stale_attrs import StaleAttributes

log = logging.getLogger(__name__)

# pyfuse3 built with nixfs' patch series (scripts/pyfuse3/) lets the kernel keep listings
# and opens, keeps attributes and answers a listing's closing READDIRPLUS itself: each use
# asks features.FEATURES whether the installed pyfuse3 has that feature.
# At most this many (about 250 bytes each); more are answered by getattr as before.
KEPT_ATTRIBUTES_MAX = 100_000
_KEPT_KINDS = (stat.S_IFDIR, stat.S_IFLNK)  # what the kernel asks again (see FuseOps._reply)


def _entry(attr: Attr) -> pyfuse3.EntryAttributes:
    e = pyfuse3.EntryAttributes()
    st = attr.st
    e.st_ino = attr.ino
    e.generation = 0
    e.entry_timeout = attr.ttl
    e.attr_timeout = attr.ttl
    e.st_mode = st.st_mode
    e.st_nlink = attr.nlink
    e.st_uid = attr.uid
    e.st_gid = attr.gid
    e.st_rdev = st.st_rdev
    e.st_size = st.st_size
    e.st_blksize = st.st_blksize
    e.st_blocks = st.st_blocks
    e.st_atime_ns = st.st_atime_ns
    e.st_mtime_ns = st.st_mtime_ns
    e.st_ctime_ns = st.st_ctime_ns
    return e


def _dot_entry(ino: int) -> pyfuse3.EntryAttributes:
    """``.`` or ``..`` in a listing: the kernel takes only the inode number and type
    from it (it neither looks them up nor keeps their attributes), so no getattr."""
    e = pyfuse3.EntryAttributes()
    e.st_ino = ino
    e.st_mode = stat.S_IFDIR
    return e


def _caller(ctx) -> Caller:
    return Caller(ctx.uid, ctx.gid)


class FuseOps(pyfuse3.Operations):
    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = False
    # With the patched pyfuse3 (features.FEATURES.cache_symlinks; a stock one ignores
    # this): the kernel keeps symlink targets (a node never changes target:
    # a lower path that changes gets a new node).
    enable_cache_symlinks = True

    def __init__(self, overlay: Overlay, snapshots: ListingSnapshots, *, listings: str = "best",
                 opens: str = "best", xattrs: bool = True,
                 stale_attrs: StaleAttributes | None = None,
                 readdir_reply=pyfuse3.readdir_reply,
                 readdir_reply_without_node=getattr(pyfuse3, "readdir_reply_without_node", None)):
        """*snapshots* are those the overlay's KernelNotifier drops; *stale_attrs*
        refreshes what the kernel's reads made stale (None: nothing to refresh)."""
        super().__init__()
        self.fs = overlay
        # (token, name, entry, next_id) -> False when the reply is full: pyfuse3's, which
        # needs the token of a request from the kernel (a test drives readdir with its own).
        self._readdir_reply = readdir_reply
        # (token, name, ino, mode, next_id) -> False when full: an entry that gives the
        # kernel no node (features.readdir_without_node), for the model's Dirents.
        self._reply_without_node = readdir_reply_without_node
        # Without xattrs every xattr request is answered ENOSYS: the kernel then answers
        # EOPNOTSUPP itself and never asks again (an exec asks security.capability, `ls -l`
        # two names per entry: each a round trip otherwise).
        self.xattrs = xattrs
        # "kernel": the kernel keeps every listing (no OPENDIR/RELEASEDIR at all);
        # "fixed": it keeps those of directories that cannot change; "none".
        have = features.FEATURES
        if have.absent():
            log.debug("pyfuse3 lacks these features of nixfs' patch: %s",
                      " ".join(have.absent()))
        if listings == "best":
            listings = ("kernel" if have.readdir_by_inode else "fixed" if have.cache_readdir
                        else "none")
        if ((listings == "kernel" and not have.readdir_by_inode)
                or (listings == "fixed" and not have.cache_readdir)):
            log.warning("pyfuse3 lacks nixfs' patch: listings=%s is not available", listings)
            listings = "none"
        self.listings = listings
        self.readdir_by_inode = listings == "kernel"
        # "kernel": the kernel keeps opens of files (no OPEN/RELEASE, reads by inode);
        # "nixfs": every open is a file handle here.
        if opens == "best":
            opens = "kernel" if have.files_by_inode else "nixfs"
        if opens == "kernel" and not have.files_by_inode:
            log.warning("pyfuse3 lacks nixfs' patch: opens=kernel is not available")
            opens = "nixfs"
        self.opens = opens
        self.files_by_inode = opens == "kernel"
        self._by_inode = snapshots  # ino -> DirHandle
        self.requests: collections.Counter[str] = collections.Counter()
        self.errors = 0
        self.stale_attrs = stale_attrs

    def _node(self, ino):
        return self.fs.node(ino)

    def stats(self) -> dict:
        """The adapter's counters and choices, for ``nixfs status``."""
        return {"fuse_requests": dict(self.requests), "errors": self.errors,
                "kernel_listings": self.listings, "opens": self.opens, "xattrs": self.xattrs,
                "kept_attributes": self.kept_attributes()}

    @staticmethod
    def kept_attributes() -> dict:
        """How many inodes' attributes pyfuse3 keeps, the GETATTRs it answered from them,
        and the closing READDIRPLUS requests it answered itself."""
        have = features.FEATURES
        kept, answered = pyfuse3.kept_attributes_stats() if have.keep_attributes else (0, 0)
        ends = pyfuse3.readdir_ends_stats()[1] if have.readdir_end else 0
        return {"inodes": kept, "getattr_answered": answered, "available": have.keep_attributes,
                "readdir_ends_answered": ends}

    def _reply(self, attr: Attr) -> pyfuse3.EntryAttributes:
        """The entry for *attr*, kept in pyfuse3 when it is an immutable lower
        directory or symlink: the kernel asks for their attributes again after
        reading a listing or target uncached (it marks the atime stale), so a second
        tree walk would cost a round trip through Python for each.  The model says
        attr_changed or node_detached before they stop being true."""
        e = _entry(attr)
        if (attr.fixed and features.FEATURES.keep_attributes
                and stat.S_IFMT(attr.st.st_mode) in _KEPT_KINDS
                and pyfuse3.kept_attributes_stats()[0] < KEPT_ATTRIBUTES_MAX):
            pyfuse3.keep_attributes(e)
        return e

    @translate
    async def lookup(self, parent_inode, name, ctx=None):
        try:
            _, attr = await self.fs.lookup(self._node(parent_inode), name)
        except NegativeEntry as e:
            entry = pyfuse3.EntryAttributes()  # inode 0: "not there", for entry_timeout
            entry.st_ino = 0
            entry.entry_timeout = e.ttl
            return entry
        return self._reply(attr)

    def forget(self, inode_list):
        self.requests["forget"] += 1
        for ino, count in inode_list:
            self.fs.forget(ino, count)

    @translate
    async def getattr(self, inode, ctx=None):
        return self._reply(await self.fs.getattr(self._node(inode)))

    @translate
    async def setattr(self, inode, attr, fields, fh, ctx):
        changes = SetAttr()
        if fields.update_mode:
            changes.mode = attr.st_mode
        if fields.update_uid:
            changes.uid = attr.st_uid
        if fields.update_gid:
            changes.gid = attr.st_gid
        if fields.update_size:
            changes.size = attr.st_size
        if fields.update_atime:
            changes.atime_ns = attr.st_atime_ns
        if fields.update_mtime:
            changes.mtime_ns = attr.st_mtime_ns
        handle = self.fs.handle(fh) if fh is not None else None
        return _entry(await self.fs.setattr(self._node(inode), changes, handle))

    @translate
    async def readlink(self, inode, ctx):
        node = self._node(inode)
        target = await self.fs.readlink(node)
        self._went_stale(node)
        return target

    @translate
    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        _, attr = await self.fs.mknod(self._node(parent_inode), name, mode, rdev, _caller(ctx))
        return _entry(attr)

    @translate
    async def mkdir(self, parent_inode, name, mode, ctx):
        _, attr = await self.fs.mkdir(self._node(parent_inode), name, mode, _caller(ctx))
        return _entry(attr)

    @translate
    async def symlink(self, parent_inode, name, target, ctx):
        _, attr = await self.fs.symlink(self._node(parent_inode), name, target, _caller(ctx))
        return _entry(attr)

    @translate
    async def unlink(self, parent_inode, name, ctx):
        await self.fs.unlink(self._node(parent_inode), name)

    @translate
    async def rmdir(self, parent_inode, name, ctx):
        await self.fs.rmdir(self._node(parent_inode), name)

    @translate
    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        await self.fs.rename(self._node(parent_inode_old), name_old,
                             self._node(parent_inode_new), name_new, flags)

    @translate
    async def link(self, inode, new_parent_inode, new_name, ctx):
        return _entry(await self.fs.link(self._node(inode), self._node(new_parent_inode), new_name))

    @translate
    async def open(self, inode, flags, ctx):
        if self.files_by_inode:
            # The kernel then sends no OPEN or RELEASE for any file again and keeps file
            # pages across opens: starting a program from the store costs no round trip.
            # Reads and writes come by inode (see _by_node); O_TRUNC comes as a setattr.
            self._node(inode)
            raise pyfuse3.FUSEError(errno.ENOSYS)
        h = await self.fs.open(self._node(inode), flags)
        return pyfuse3.FileInfo(fh=h.fh, keep_cache=True)

    @translate
    async def create(self, parent_inode, name, mode, flags, ctx):
        # Once open answered ENOSYS the kernel sends no RELEASE for a created file either:
        # its (read-write) descriptor becomes the node's, and its reads come by inode.
        by_node = self.files_by_inode
        h, _, attr = await self.fs.create(self._node(parent_inode), name, mode,
                                          os.O_RDWR if by_node else flags, _caller(ctx))
        if by_node:
            self.fs.keep_by_node(h)
        return pyfuse3.FileInfo(fh=0 if by_node else h.fh, keep_cache=True), _entry(attr)

    def _by_node(self, fh: int) -> bool:
        """Whether *fh* is an inode: a file opened while open answers ENOSYS, or made
        by create then (handles made before start above every inode)."""
        return self.files_by_inode and fh < FIRST_HANDLE

    @translate
    async def read(self, fh, off, size):
        if self._by_node(fh):
            return await self.fs.read_node(self._node(fh), off, size)
        return await self.fs.read(self.fs.handle(fh), off, size)

    @translate
    async def write(self, fh, off, buf):
        if self._by_node(fh):
            return await self.fs.write_node(self._node(fh), off, buf)
        return await self.fs.write(self.fs.handle(fh), off, buf)

    @translate
    async def flush(self, fh):
        # Writes reach the upper file at once and the kernel keeps locks itself, so a
        # close has nothing to flush: ENOSYS tells the kernel never to send FLUSH again,
        # one round trip less for every close (every program start-up from the store).
        raise pyfuse3.FUSEError(errno.ENOSYS)

    @translate
    async def release(self, fh):
        self.fs.release(fh)

    @translate
    async def fsync(self, fh, datasync):
        if self._by_node(fh):
            await self.fs.fsync_node(self._node(fh), bool(datasync))
        else:
            await self.fs.fsync(self.fs.handle(fh), bool(datasync))

    @translate
    async def opendir(self, inode, ctx):
        if self.readdir_by_inode:
            raise pyfuse3.FUSEError(errno.ENOSYS)  # the kernel keeps listings; see readdir
        dh = await self.fs.opendir(self._node(inode))
        if dh.fixed and self.listings == "fixed":
            # The kernel keeps this listing: a warm walk makes no READDIRPLUS round trip.
            return pyfuse3.FileInfo(fh=dh.fh, keep_cache=True)
        return dh.fh

    async def _listing_by_inode(self, ino: int, start_id: int):
        """The snapshot a readdir by inode continues (a new one from offset 0)."""
        dh = self._by_inode.get(ino) if start_id else None
        if dh is None:
            dh = await self.fs.list_dir(self._node(ino))
            # A listing that cannot change reads the same again: kept only when it
            # does not fit one reply (see readdir).
            if not dh.fixed:
                self._by_inode[ino] = dh
        return dh

    @translate
    async def readdir(self, fh, start_id, token) -> bool:
        """Reply from *start_id* on; True when the last entry is in the reply (pyfuse3
        answers the kernel's next, closing request of this listing itself)."""
        # Offsets 0 and 1 are "." and ".."; the kernel takes no reference for them.
        # (With readdir_by_inode, *fh* is the directory's inode.)
        dh = (await self._listing_by_inode(fh, start_id) if self.readdir_by_inode
              else self.fs.dirhandle(fh))
        if start_id == 0:
            if not self._readdir_reply(token, b".", _dot_entry(dh.node.ino), 1):
                return False
            start_id = 1
        if start_id == 1:
            parent = dh.node.parent or self.fs.root
            if not self._readdir_reply(token, b"..", _dot_entry(parent.ino), 2):
                return False
            start_id = 2
        for index in range(start_id - 2, len(dh.entries)):
            found = await self.fs.readdir_entry(dh, index)
            if found is None:
                continue
            if isinstance(found, Dirent):  # no node: no lookup reference to count
                if not self._reply_without_node(token, dh.entries[index].name, found.ino,
                                                found.mode, index + 3):
                    if self.readdir_by_inode:
                        self._by_inode[dh.node.ino] = dh
                    return False
                continue
            node, attr = found
            if not self._readdir_reply(token, dh.entries[index].name, self._reply(attr), index + 3):
                self.fs.entry_refused(node)
                if self.readdir_by_inode:
                    self._by_inode[dh.node.ino] = dh  # the kernel goes on from here
                return False
            self.fs.entry_sent(node)
        self._went_stale(dh.node)
        return True

    def _went_stale(self, node) -> None:
        """The kernel read *node*'s listing or target itself: it now holds its atime
        stale, so its next stat would wait for a GETATTR (see stale_attrs)."""
        if self.stale_attrs is not None and self.fs.attributes_settled(node):
            self.stale_attrs.stale(node)

    @translate
    async def releasedir(self, fh):
        self.fs.releasedir(fh)

    @translate
    async def fsyncdir(self, fh, datasync):
        await self.fs.fsyncdir(self.fs.dirhandle(fh).node, bool(datasync))

    @translate
    async def statfs(self, ctx):
        vfs = self.fs.statfs()
        out = pyfuse3.StatvfsData()
        for field in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files",
                      "f_ffree", "f_favail", "f_namemax"):
            setattr(out, field, getattr(vfs, field))
        return out

    def _xattr_node(self, inode):
        """The node whose xattrs are asked for.  ENOSYS when the mount shows none: the
        kernel then answers every xattr request itself and never asks again."""
        if not self.xattrs:
            raise pyfuse3.FUSEError(errno.ENOSYS)
        return self._node(inode)

    @translate
    async def getxattr(self, inode, name, ctx):
        return await self.fs.getxattr(self._xattr_node(inode), name)

    @translate
    async def listxattr(self, inode, ctx):
        return await self.fs.listxattr(self._xattr_node(inode))

    @translate
    async def setxattr(self, inode, name, value, ctx):
        await self.fs.setxattr(self._xattr_node(inode), name, value)

    @translate
    async def removexattr(self, inode, name, ctx):
        await self.fs.removexattr(self._xattr_node(inode), name)

    @translate
    async def access(self, inode, mode, ctx):
        # default_permissions: the kernel checks; only existence matters here.
        self._node(inode)
        return True

