"""The merged view of a read-only lower and a writable upper: the one door to it.

This is the overlay's logic, free of FUSE: operations take nodes and names and
return attributes or raise ``OSError`` with the errno kernel overlayfs gives.
``Overlay`` builds the parts, each of one job, hands each what it needs, and
passes every operation to the part that does it:

- ``descriptors``: open directories of both layers, by node;
- ``nodes``: the nodes the kernel holds (made, trimmed, forgotten);
- ``listings``: kept listings of immutable lower objects, and read-ahead;
- ``names``: name resolution, stat and attributes, lookup;
- ``readdir``: merged directory listings, symlink targets;
- ``copying``: copy-up;  ``orphans``: objects removed while still held;
- ``creating`` and ``removing``: namespace changes;
- ``attributes``: setattr, xattrs;  ``files``: file data;
- ``outside``: changes from outside the mount.

Concurrency: everything runs on the trio event loop.  Reads run freely; every
operation that changes the upper holds one lock (the change lock, made here and
given to the parts that change), so its steps never interleave with another
change.  Lower calls are awaited (worker threads, see ``lowerlayer.LowerLayer``);
upper metadata calls are local and made inline.
"""

import os

import trio

from .attributes import Attributes
from .copying import CopyUp
from .cowfiles import CowFiles
from .creating import Creating
from .descriptors import Descriptors
from .dircache import DirCache
from .liststore import ListingStore
from .files import FileData
from .inodes import InodeTable, Node
from .layers import Layer
from .lowerlayer import LowerLayer
from .lowerrunner import LowerRunner
from .upperlayer import UpperLayer
from .listings import Listings
from .names import Names, Shown
from .nodes import Nodes
from .orphans import Orphans
from .outside import Outside
from .policy import LowerPolicy
from .readdir import DirReader
from .removing import Removing
from .state import StateError, UpperState
from .types import Attr, Caller, DirHandle, Handle, Notifier, OpenTable, SetAttr


class Overlay:
    def __init__(self, lower: str, upper: str, *, owner: tuple[int, int] | None = None,
                 privileged: bool | None = None, readonly: bool = False, ttl: float = 1.0,
                 lower_threads: int = 8, lower_timeout: float | None = None,
                 fd_cache: int = 1024, policy: LowerPolicy | None = None,
                 listings: ListingStore | None = None, immutable_ttl: float = 3600.0,
                 max_nodes: int = 100_000, notify: Notifier | None = None,
                 state: UpperState | None = None, nodeless_listings: bool = False,
                 lower_runner: LowerRunner | None = None):
        self.upper = UpperLayer(upper, name="upper")
        # *lower_runner*: shared with the parts outside that read the lower too (a Nix
        # store's policy, over a generation's index); else one of *lower_threads*.
        runner = lower_runner or LowerRunner(threads=lower_threads, timeout=lower_timeout)
        self.lower = LowerLayer(Layer(lower, name="lower"), runner)
        # *state*: the upper's, taken by the daemon before it prepared anything there.
        self.state = state or UpperState(self.upper.root_fd)
        if not self.state.belongs_to(self.upper.root_fd):
            raise StateError("the upper changed while it was being mounted")
        privileged = os.geteuid() == 0 if privileged is None else privileged
        self._policy = policy = policy or LowerPolicy()
        self._notify = notify = notify or Notifier()
        self.dircache = DirCache(listings, run=self.lower.run)
        self.inodes = inodes = InodeTable(on_drop=self._dropped)
        self.root = inodes.root
        lock = trio.Lock()  # the change lock
        handles = OpenTable()
        up, low = self.upper, self.lower
        self._dirs = dirs = Descriptors(up, low, self.root, self.state.work_fd,
                                        privileged=privileged, capacity=fd_cache)
        self._nodes = nodes = Nodes(inodes, dirs, policy, notify, max_nodes=max_nodes)
        self._listings = kept = Listings(dirs, low, inodes, nodes, policy, self.dircache,
                                         lower_threads=lower_threads)
        self._copying = copying = CopyUp(dirs, up, low, self.state, notify, privileged=privileged)
        self._orphans = orphans = Orphans(dirs, up, low, copying, lock)
        self._cows = cows = CowFiles(dirs, up, low, self.state, readonly=readonly)
        self._names = names = Names(dirs, up, low, inodes, nodes, kept, orphans, policy, lock,
                                    Shown(owner, ttl, immutable_ttl), cows, readonly=readonly)
        # *nodeless_listings*: the adapter can send listing entries without nodes; those
        # of a listing past half the node budget go so (overlay/readdir.py).
        self._reader = reader = DirReader(dirs, up, low, inodes, nodes, names, kept, policy,
                                          handles, max_nodes // 2 if nodeless_listings else None)
        self._creating = Creating(dirs, up, inodes, nodes, names, copying, policy, lock, cows,
                                  privileged=privileged)
        self._removing = Removing(dirs, up, inodes, nodes, names, reader, copying, orphans,
                                  policy, lock, self.state, cows, readonly=readonly)
        self._attributes = Attributes(dirs, up, low, nodes, names, kept, copying, orphans, lock,
                                      cows, owner=owner, readonly=readonly)
        self._files = files = FileData(dirs, up, low, nodes, copying, orphans, handles, lock,
                                       cows, readonly=readonly)
        self._outside = Outside(dirs, up, inodes, nodes, names, kept, files.lower_files, policy,
                                notify, lock, self.state)

    def close(self) -> None:
        self._files.close()
        self._cows.close()
        if self.dircache.store is not None:
            self.dircache.store.close()
        self._orphans.close()
        self._dirs.close()
        self.state.close()
        self.upper.close()
        self.lower.close()

    def _dropped(self, node: Node) -> None:
        """A node left the table: every part lets go of what it kept for it."""
        self._notify.node_detached(node.ino)
        self._names.dropped(node)
        self._nodes.dropped(node)
        self._dirs.forget(node)
        self._files.dropped(node)
        self._cows.dropped(node)
        self._orphans.dropped(node)

    # What the model is plugged into (given to the constructor, read by the daemon).

    @property
    def policy(self) -> LowerPolicy:
        return self._policy

    @property
    def notify(self) -> Notifier:
        return self._notify

    # Counters and sizes (nixfs status).

    def stats(self) -> dict:
        """What the model reports of itself, each part's figures under status' names."""
        return {
            "lower_calls": self.lower.counts(), "upper_calls": dict(self.upper.calls),
            "lower_timeout_s": self.lower.timeout or 0,
            "copy_ups": self._copying.copy_ups, "stale_answers": self._names.stale_answers,
            "nodes": len(self.inodes), "nodes_trimmed": self._nodes.trims,
            "entries_without_node": self._reader.nodeless_sent,
            "open_dir_fds": len(self._dirs.fds),
            "shared_lower_files": len(self._files.lower_files),
            "node_file_fds": len(self._files.file_fds),
            "cache": self.dircache.stats(),
            "cow_files": self._cows.stats(),
        }

    @property
    def copy_ups(self) -> int:
        return self._copying.copy_ups

    @property
    def stale_answers(self) -> int:
        return self._names.stale_answers

    @property
    def trims(self) -> int:
        return self._nodes.trims

    @property
    def fds(self):
        """The open directories of both layers."""
        return self._dirs.fds

    @property
    def file_fds(self):
        return self._files.file_fds

    @property
    def lower_files(self):
        return self._files.lower_files

    # Nodes and names.

    def node(self, ino: int) -> Node:
        return self._nodes.node(ino)

    def find(self, *names: bytes) -> Node | None:
        return self._nodes.find(*names)

    def forget(self, ino: int, count: int) -> None:
        self._nodes.forget(ino, count)

    def entry_sent(self, node: Node) -> None:
        self._nodes.entry_sent(node)

    def entry_refused(self, node: Node) -> None:
        self._nodes.entry_refused(node)

    def trim(self) -> None:
        self._nodes.trim()

    def attributes_settled(self, node: Node) -> bool:
        return self._nodes.attributes_settled(node)

    def lower_path(self, node: Node) -> bytes:
        return self._dirs.lower_path(node)

    async def lookup(self, parent: Node, name: bytes) -> tuple[Node, Attr]:
        return await self._names.lookup(parent, name)

    async def hold_cow_file(self, *names: bytes) -> bool:
        """Open the COW file at *names* (below the root) now, as its first use would: it
        keeps its bases open until the unmount, so a base removed meanwhile (a pruned
        generation) leaves it serving.  False where that file is no COW file."""
        node = self.root
        for name in names:
            node, _ = await self._names.live_child(node, name)  # (no reference the kernel holds)
        return await self._cows.of(node) is not None

    async def getattr(self, node: Node) -> Attr:
        return await self._names.getattr(node)

    # Directories and symlinks.

    async def list_dir(self, node: Node) -> DirHandle:
        return await self._reader.list_dir(node)

    async def opendir(self, node: Node) -> DirHandle:
        return await self._reader.opendir(node)

    async def readdir_entry(self, dh: DirHandle, index: int) -> tuple[Node, Attr] | None:
        return await self._reader.readdir_entry(dh, index)

    def releasedir(self, fh: int) -> None:
        self._reader.releasedir(fh)

    def dirhandle(self, fh: int) -> DirHandle:
        return self._reader.dirhandle(fh)

    async def readlink(self, node: Node) -> bytes:
        return await self._reader.readlink(node)

    # Namespace changes.

    async def mkdir(self, parent: Node, name: bytes, mode: int, caller: Caller):
        return await self._creating.mkdir(parent, name, mode, caller)

    async def mknod(self, parent: Node, name: bytes, mode: int, rdev: int, caller: Caller):
        return await self._creating.mknod(parent, name, mode, rdev, caller)

    async def symlink(self, parent: Node, name: bytes, target: bytes, caller: Caller):
        return await self._creating.symlink(parent, name, target, caller)

    async def create(self, parent: Node, name: bytes, mode: int, flags: int, caller: Caller):
        """A new file, open: (handle, node, attr)."""
        node, attr, fd = await self._creating.create(parent, name, mode, flags, caller)
        return self._files.new_handle(node, fd, True, flags), node, attr

    async def link(self, node: Node, new_parent: Node, new_name: bytes) -> Attr:
        return await self._creating.link(node, new_parent, new_name)

    async def unlink(self, parent: Node, name: bytes) -> None:
        await self._removing.unlink(parent, name)

    async def rmdir(self, parent: Node, name: bytes) -> None:
        await self._removing.rmdir(parent, name)

    async def rename(self, old_parent: Node, old_name: bytes, new_parent: Node, new_name: bytes,
                     flags: int = 0) -> None:
        await self._removing.rename(old_parent, old_name, new_parent, new_name, flags)

    # Attributes.

    async def setattr(self, node: Node, changes: SetAttr, handle: Handle | None = None) -> Attr:
        return await self._attributes.setattr(node, changes, handle)

    async def getxattr(self, node: Node, name: bytes) -> bytes:
        return await self._attributes.getxattr(node, name)

    async def listxattr(self, node: Node) -> list[bytes]:
        return await self._attributes.listxattr(node)

    async def setxattr(self, node: Node, name: bytes, value: bytes) -> None:
        await self._attributes.setxattr(node, name, value)

    async def removexattr(self, node: Node, name: bytes) -> None:
        await self._attributes.removexattr(node, name)

    def statfs(self) -> os.statvfs_result:
        return self._attributes.statfs()

    # File data.

    def handle(self, fh: int) -> Handle:
        return self._files.handles.file(fh)

    async def open(self, node: Node, flags: int) -> Handle:
        return await self._files.open(node, flags)

    async def read(self, h: Handle, offset: int, size: int) -> bytes:
        return await self._files.read(h, offset, size)

    async def write(self, h: Handle, offset: int, data: bytes) -> int:
        return await self._files.write(h, offset, data)

    async def fsync(self, h: Handle, datasync: bool) -> None:
        await self._files.fsync(h, datasync)

    def release(self, fh: int) -> None:
        self._files.release(fh)

    async def read_node(self, node: Node, offset: int, size: int) -> bytes:
        return await self._files.read_node(node, offset, size)

    async def write_node(self, node: Node, offset: int, data: bytes) -> int:
        return await self._files.write_node(node, offset, data)

    async def fsync_node(self, node: Node, datasync: bool) -> None:
        await self._files.fsync_node(node, datasync)

    def keep_by_node(self, h: Handle) -> None:
        self._files.keep_by_node(h)

    async def fsyncdir(self, node: Node, datasync: bool) -> None:
        await self._files.fsyncdir(node, datasync)

    async def sync(self) -> None:
        await self._files.sync()

    # Changes from outside.

    async def lower_entry_changed(self, dir_names: tuple[bytes, ...], name: bytes) -> None:
        await self._outside.lower_entry_changed(dir_names, name)

    async def discard_upper(self, dir_names: tuple[bytes, ...], name: bytes) -> bool:
        return await self._outside.discard_upper(dir_names, name)

    async def unhide(self, dir_names: tuple[bytes, ...], name: bytes) -> bool:
        return await self._outside.unhide(dir_names, name)
