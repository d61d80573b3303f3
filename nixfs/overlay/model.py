"""The merged view of a read-only lower and a writable upper.

This is the overlay's logic, free of FUSE: operations take nodes and names and
return attributes or raise ``OSError`` with the errno kernel overlayfs gives.

Concurrency: everything runs on the trio event loop.  Reads run freely; every
operation that changes the upper holds one lock, so its steps never interleave
with another change.  Lower calls are awaited (worker threads, see
``layers.LowerLayer``); upper metadata calls are local and made inline.
"""

import errno
import itertools
import logging
import os
import stat
from collections import OrderedDict
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass

import cachetools
import trio

from . import copyup, upperformat as fmt
from .dircache import DirCache, Listing, ListingStore
from .fdcache import FdCache, FdEntry
from .inodes import DERIVED, InodeTable, Node
from .layers import Layer, LowerLayer, made_writable, times_kept
from .policy import LowerPolicy
from .state import StateError, UpperState
from ..libc import RENAME_EXCHANGE, RENAME_NOREPLACE, renameat2

log = logging.getLogger(__name__)

# Open flags passed on to the layer; the others are the kernel's business.
_PASS_FLAGS = (os.O_ACCMODE | os.O_APPEND | os.O_NONBLOCK | os.O_SYNC | os.O_DSYNC
               | os.O_DIRECT | os.O_TRUNC | os.O_LARGEFILE)


# File handle numbers start here, above every inode number: a file system that lets the
# kernel keep opens (FuseOps files_by_inode) gets either, and tells them apart by size.
FIRST_HANDLE = 1 << 63

# Upper reads and writes up to this size are made inline: the upper is a local file
# system, and a worker-thread round trip costs more than such a call.
INLINE_IO = 64 * 1024


# Errors that mean "the lower is out" (a stall given up on, a failing or crashed
# server), not "the object changed".
_OUTAGE = frozenset((errno.EIO, errno.ETIMEDOUT, errno.ENOTCONN))


def _close_kept_fd(result) -> None:
    """A late ``read_listing`` result: close the directory it kept open."""
    if result[1] >= 0:
        os.close(result[1])


def _err(code: int, what: str = "") -> OSError:
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
    __slots__ = ("fh", "node", "fd", "upper", "flags", "shared")

    def __init__(self, fh: int, node: Node, fd: int, upper: bool, flags: int,
                 shared: bytes | None = None):
        self.fh, self.node, self.fd, self.upper, self.flags = fh, node, fd, upper, flags
        self.shared = shared  # the SharedFds key, if the descriptor is shared


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


@dataclass(slots=True)
class _Found:
    kind: int
    upper_st: os.stat_result | None
    lower: object
    lower_st: os.stat_result | None


def _shown_lower(listing: Listing) -> list[Entry]:
    """What a directory shows of its kept lower listing: every entry but ``.``,
    reserved names and kernel whiteouts (all of it when the directory is lower-only;
    ``_list`` merges it with the upper)."""
    shown = []
    for name, st in listing.stats():
        if name != b"." and not fmt.is_reserved(name) and not fmt.is_kernel_whiteout(st):
            shown.append(Entry(name, None, st))
    return shown


class NegativeEntry(FileNotFoundError):
    """ENOENT that the kernel may remember for *ttl* seconds."""

    def __init__(self, ttl: float):
        super().__init__(errno.ENOENT, os.strerror(errno.ENOENT))
        self.ttl = ttl


class SharedFds:
    """Open lower files of immutable objects, shared by every handle on them: opening
    the same store file again (every start of a program) costs no lower call."""

    def __init__(self, idle: int):
        self.idle = idle  # how many unused descriptors to keep
        self._fds: dict[bytes, list] = {}  # key -> [fd, users]
        self._unused: OrderedDict = OrderedDict()

    def acquire(self, key: bytes) -> int | None:
        item = self._fds.get(key)
        if item is None:
            return None
        item[1] += 1
        self._unused.pop(key, None)
        return item[0]

    def add(self, key: bytes, fd: int) -> int:
        item = self._fds.get(key)
        if item is not None:  # opened twice at once: keep one
            os.close(fd)
            item[1] += 1
            self._unused.pop(key, None)
            return item[0]
        self._fds[key] = [fd, 1]
        return fd

    def release(self, key: bytes) -> None:
        item = self._fds[key]
        item[1] -= 1
        if item[1] == 0:
            self._unused[key] = True
            while len(self._unused) > self.idle:
                old, _ = self._unused.popitem(last=False)
                os.close(self._fds.pop(old)[0])

    def forget(self, prefix: bytes) -> None:
        """Close unused descriptors at or below *prefix* (the object left the lower)."""
        for key in [k for k in self._unused if k == prefix or k.startswith(prefix + b"/")]:
            del self._unused[key]
            os.close(self._fds.pop(key)[0])

    def close(self) -> None:
        for fd, _ in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._unused.clear()

    def __len__(self) -> int:
        return len(self._fds)


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


def _new_times(changes: SetAttr, st) -> tuple[int, int]:
    """(atime, mtime) in ns for utime: what *changes* sets, the rest as *st* has it."""
    return (st.st_atime_ns if changes.atime_ns is None else changes.atime_ns,
            st.st_mtime_ns if changes.mtime_ns is None else changes.mtime_ns)


class Overlay:
    def __init__(self, lower: str, upper: str, *, owner: tuple[int, int] | None = None,
                 privileged: bool | None = None, readonly: bool = False, ttl: float = 1.0,
                 lower_threads: int = 8, lower_timeout: float | None = None,
                 fd_cache: int = 1024, policy: LowerPolicy | None = None,
                 listings: ListingStore | None = None, immutable_ttl: float = 3600.0,
                 max_nodes: int = 100_000, notify: Notifier | None = None,
                 state: UpperState | None = None):
        self.upper = Layer(upper, name="upper")
        self.lower = LowerLayer(Layer(lower, name="lower"), threads=lower_threads,
                                timeout=lower_timeout)
        # *state*: the upper's, taken by the daemon before it prepared anything there.
        self.state = state or UpperState(self.upper.root_fd)
        if not self.state.belongs_to(self.upper.root_fd):
            raise StateError("the upper changed while it was being mounted")
        self.work_fd = self.state.work_fd
        self.privileged = os.geteuid() == 0 if privileged is None else privileged
        self.owner = owner
        self.readonly = readonly
        self.ttl = ttl
        self.inodes = InodeTable()
        self.inodes.on_drop = self._on_drop
        self.root = self.inodes.root
        self.policy = policy or LowerPolicy()
        self.root.tag = LowerPolicy.ROOT
        self.dircache = DirCache(listings)
        self.immutable_ttl = immutable_ttl
        # Entries read below an immutable lower directory in the same worker-thread
        # call as its own listing: a walk into a store path then costs one trip, not
        # one per directory; a single lookup reads at most this much more than it needs.
        self.prefetch_entries = 512
        # Store paths fetched in the background ahead of a walk (see _read_further), a
        # batch of them per worker-thread call.
        self.read_ahead_paths = 16
        self.read_ahead_batch = 4
        self._read_ahead: cachetools.LRUCache = cachetools.LRUCache(4096)  # read, not yet used
        self._ahead_pending: set[bytes] = set()
        self._ahead_limiter = trio.CapacityLimiter(max(1, lower_threads // 2))
        self._fetching: dict[bytes, trio.Event] = {}
        self._xattrs: cachetools.LRUCache = cachetools.LRUCache(20_000)
        self.lower_files = SharedFds(256)
        self.max_nodes = max_nodes
        self._made_since_trim = 0
        self._trim_asked: set[int] = set()  # nodes the kernel was asked to forget
        self.trims = 0
        self.fds = FdCache(fd_cache)
        self._root_entries = {"u": FdEntry(self.upper.root_fd), "l": FdEntry(self.lower.root_fd)}
        for e in self._root_entries.values():
            e.pins = 1 << 62
        self.handles: dict[int, Handle | DirHandle] = {}
        # Nodes removed from the tree while the kernel still holds them (an open file,
        # a working directory): a descriptor, so their attributes (and a file's data) can
        # still be read (see _keep_orphan).
        self._orphans: dict[int, int] = {}
        self._lower_orphans: set[int] = set()  # of those, lower files (read-only, never copied)
        self._fh = itertools.count(FIRST_HANDLE)
        # Upper files read or written by node (no open file: the kernel keeps opens), by
        # ("r" or "w", node number): one descriptor per node and use, closed by LRU.
        self.file_fds = FdCache(128)
        self._tmp = itertools.count(1)
        self._lock = trio.Lock()
        self.data_limiter = trio.CapacityLimiter(8)
        self.copy_ups = 0
        # The last stat each lower directory's node got: during a lower outage a path walk
        # through directories already known still works (the kernel revalidates them).
        self._known_dirs: dict[int, os.stat_result] = {}
        self.stale_answers = 0
        self.notify = notify or Notifier()  # the FUSE adapter's: drops the kernel's caches

    def stats(self) -> dict:
        """The model's counters (and its listing cache's), for ``nixfs status``."""
        return {"lower_calls": dict(self.lower.layer.calls), "upper_calls": dict(self.upper.calls),
                "lower_timeout_s": self.lower.timeout or 0,
                "copy_ups": self.copy_ups, "stale_answers": self.stale_answers,
                "nodes": len(self.inodes), "nodes_trimmed": self.trims,
                "open_dir_fds": len(self.fds), "shared_lower_files": len(self.lower_files),
                "node_file_fds": len(self.file_fds), "cache": self.dircache.stats()}

    def close(self) -> None:
        for h in list(self.handles.values()):
            if isinstance(h, Handle) and h.shared is None:
                os.close(h.fd)
        self.handles.clear()
        self.lower_files.close()
        if self.dircache.store is not None:
            self.dircache.store.close()
        for fd in self._orphans.values():
            os.close(fd)
        self._orphans.clear()
        self._lower_orphans.clear()
        self.fds.clear()
        self.file_fds.clear()
        self.state.close()
        self.upper.close()
        self.lower.layer.close()

    # ------------------------------------------------------------------ descriptors

    def _on_drop(self, node: Node) -> None:
        self.notify.node_detached(node.ino)
        self._known_dirs.pop(node.ino, None)
        self._trim_asked.discard(node.ino)
        self.fds.drop(("u", node.ino))
        self.fds.drop(("l", node.ino))
        self.file_fds.drop(("r", node.ino))
        self.file_fds.drop(("w", node.ino))
        orphan = self._orphans.pop(node.ino, None)
        self._lower_orphans.discard(node.ino)
        if orphan is not None:
            os.close(orphan)

    @contextmanager
    def _upper_fd(self, node: Node):
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
            raise _err(errno.ENOENT, "removed")
        with self._upper_fd(node.parent) as pfd:
            fd = self.upper.open_dir(pfd, node.name)
        return self.fds.insert(("u", node.ino), fd)

    @asynccontextmanager
    async def _lower_fd(self, node: Node):
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
                raise _err(errno.ENOENT, "removed")
            async with self._lower_fd(node.parent) as pfd:
                fd = await self.lower.open_dir(pfd, node.name)
        elif node.lower is None:
            raise _err(errno.ENOENT, "no lower directory")
        else:
            fd = await self.lower.open_dir_path(node.lower)
        return self.fds.insert(("l", node.ino), fd)

    def lower_path(self, node: Node) -> bytes:
        if node.lower is DERIVED:
            parent = self.lower_path(node.parent)
            return parent + b"/" + node.name if parent else node.name
        return node.lower

    @contextmanager
    def _writable(self, dirfd: int):
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

    def _work_name(self, kind: str = "tmp") -> bytes:
        return f"{kind}.{os.getpid()}.{next(self._tmp)}".encode()

    # ------------------------------------------------------------------ resolving names

    def _check_name(self, name: bytes) -> None:
        if len(name) > fmt.NAME_MAX:
            raise _err(errno.ENAMETOOLONG)

    def _hidden_name(self, parent: Node, name: bytes) -> bool:
        return fmt.is_reserved(name) or (parent is self.root and name == fmt.STATE_DIR)

    def _upper_probe(self, parent: Node, name: bytes):
        """What the upper says of *name*: (stat or None, lower hidden, opaque, redirect)."""
        if not parent.upper:
            return None, False, False, None
        with self._upper_fd(parent) as pfd:
            try:
                st = self.upper.lstat(pfd, name)
            except FileNotFoundError:
                st = None
            if st is not None and fmt.is_kernel_whiteout(st):
                return None, True, False, None
            hidden = parent.lower is not None and fmt.has_whiteout(pfd, name)
            opaque, redirect = False, None
            if st is not None and stat.S_ISDIR(st.st_mode):
                cfd = self.upper.open_dir(pfd, name)
                try:
                    opaque, redirect = fmt.read_dir_flags(cfd)
                finally:
                    os.close(cfd)
        return st, hidden, opaque, redirect

    def _redirect_target(self, parent: Node, redirect: bytes):
        if redirect.startswith(b"/"):
            return redirect.strip(b"/")
        if parent.lower is None:
            return None
        base = self.lower_path(parent)
        return base + b"/" + redirect if base else redirect

    def _lower_visible(self, parent: Node, name: bytes) -> bool:
        return parent.tag is None or self.policy.lower_visible(parent.tag, name)

    async def _lower_stat(self, parent: Node, name: bytes) -> os.stat_result | None:
        """The lower entry's stat; None if there is none, or it is a whiteout device
        (hidden, as kernel overlayfs hides whiteouts in any layer: shown, a copy-up
        would turn it into a whiteout of the upper and the name would vanish)."""
        st = await self._lower_entry_stat(parent, name)
        return None if st is None or fmt.is_kernel_whiteout(st) else st

    async def _lower_entry_stat(self, parent: Node, name: bytes) -> os.stat_result | None:
        if parent.lower is None or not self._lower_visible(parent, name):
            return None
        listing = await self._node_listing(parent)
        if listing is not None:
            return listing.stat(name) if name != b"." else None
        listing = await self._listing_at(parent, name, self._child_lower_path(parent, name))
        if listing is not None:
            return listing.stat(b".")
        try:
            async with self._lower_fd(parent) as pfd:
                return await self.lower.lstat(pfd, name)
        except (FileNotFoundError, NotADirectoryError):
            return None

    # ------------------------------------------------------------------ immutable lower objects

    def _child_lower_path(self, parent: Node, name: bytes) -> bytes:
        base = self.lower_path(parent)
        return base + b"/" + name if base else name

    async def _listing_at(self, parent: Node, name: bytes, path: bytes,
                          node: Node | None = None, *, further: bool = True) -> Listing | None:
        """The listing of the lower object *path* (``parent``'s lower entry *name*) if
        the policy keeps it: from memory, from the store, or fetched in one go.

        When *node* is that object's node, a fetch also keeps its open lower
        directory for it: the walk's next step down then needs no second open."""
        key = self.policy.cache_key(path)
        if key is None:
            return None
        listing = self.dircache.get(path, key)
        if listing is not None:
            if self._read_ahead.pop(path, None) is not None:
                self._read_further(parent, path)  # a walk reached what was read ahead
            return listing
        busy = self._fetching.get(path)
        if busy is not None:  # someone is fetching it: wait for theirs
            await busy.wait()
            return self.dircache.get(path, key)
        self._fetching[path] = done = trio.Event()
        try:
            keep = node is not None and ("l", node.ino) not in self.fds
            async with self._lower_fd(parent) as pfd:
                listings, fd = await self.lower.run(self.lower.layer.read_listing, pfd, name,
                                                    keep, self.prefetch_entries,
                                                    late=_close_kept_fd)
            if fd >= 0:
                if node.parent is None or ("l", node.ino) in self.fds:
                    os.close(fd)  # removed meanwhile, or someone else opened it
                else:
                    self.fds.release(self.fds.insert(("l", node.ino), fd))
        except (FileNotFoundError, NotADirectoryError):
            return None
        finally:
            del self._fetching[path]
            done.set()
        listing = self._keep_listings(path, key, listings)
        if further:  # a request's fetch, not a read-ahead
            self._read_further(parent, path)
        return listing

    def _keep_listings(self, path: bytes, key: bytes, listings: dict) -> Listing:
        """Keep what ``read_listing`` read at *path*; its own listing."""
        listing = listings.pop(b"")
        self.dircache.put(path, key, listing)
        for rel, below in listings.items():  # the directories below, read on the way
            sub = path + b"/" + rel
            sub_key = self.policy.cache_key(sub)
            if sub_key is not None:
                self.dircache.put(sub, sub_key, below)
        return listing

    def _read_further(self, parent: Node, path: bytes) -> None:
        """Fetch, in the background, the immutable lower paths the policy expects a
        walk to want next: a cold walk (or NFS) then waits on several at once rather
        than one after another.  At most ``read_ahead_paths`` ahead, in batches of
        ``read_ahead_batch`` per worker-thread call (each call costs the event loop
        more than a listing), on at most half the lower's threads."""
        if not self.read_ahead_paths:
            return
        wanted = self.policy.read_ahead(path, self.read_ahead_paths)
        new = [ahead for ahead in wanted if ahead not in self._ahead_pending
               and ahead not in self._fetching and ahead not in self._read_ahead]
        if len(wanted) == self.read_ahead_paths:  # not the end: wait for a full batch
            new = new[:len(new) - len(new) % self.read_ahead_batch]
        for at in range(0, len(new), self.read_ahead_batch):
            batch = new[at:at + self.read_ahead_batch]
            self._ahead_pending.update(batch)
            trio.lowlevel.spawn_system_task(self._fetch_ahead, parent, batch)

    async def _fetch_ahead(self, parent: Node, paths: list[bytes]) -> None:
        """Fetch *paths* (immutable lower entries of *parent*) in one worker call."""
        done = trio.Event()
        try:
            async with self._ahead_limiter:
                if self.inodes.get(parent.ino) is not parent:
                    return  # the directory went meanwhile
                todo = []
                for path in paths:
                    key = self.policy.cache_key(path)
                    if (key is not None and path not in self._fetching
                            and self.dircache.get(path, key) is None):
                        todo.append((path, key))
                        self._fetching[path] = done
                if not todo:
                    return
                async with self._lower_fd(parent) as pfd:
                    found = await self.lower.run(self._read_listings, pfd,
                                                 [path.rsplit(b"/", 1)[1] for path, _ in todo])
                for (path, key), listings in zip(todo, found):
                    if listings is not None:
                        self._keep_listings(path, key, listings)
                        self._read_ahead[path] = True
        except Exception as e:  # a read-ahead is a guess: its failure is no one's error
            log.debug("reading %r ahead: %s", paths, e)
        finally:
            for path in paths:
                self._ahead_pending.discard(path)
                if self._fetching.get(path) is done:
                    del self._fetching[path]
            done.set()

    def _read_listings(self, dirfd: int, names: list[bytes]) -> list[dict | None]:
        """(In a worker thread) ``read_listing`` of each name; None where it is gone."""
        out = []
        for name in names:
            try:
                out.append(self.lower.layer.read_listing(dirfd, name, False,
                                                         self.prefetch_entries)[0])
            except (FileNotFoundError, NotADirectoryError):
                out.append(None)
        return out

    async def _node_listing(self, node: Node) -> Listing | None:
        """The kept listing of a node's lower object, if there is one to keep."""
        if node.lower is not DERIVED or node.parent is None:
            return None
        return await self._listing_at(node.parent, node.name, self.lower_path(node), node)

    def _kept_stats(self, node: Node, names: list[bytes]):
        """Split *names* of *node*'s lower into (name, stat) pairs known from kept
        listings (their ``.``) and the names still to stat."""
        base = self.lower_path(node)
        known, unknown = [], []
        for name in names:
            path = base + b"/" + name if base else name
            key = self.policy.cache_key(path)
            listing = self.dircache.get(path, key) if key is not None else None
            if listing is not None:
                known.append((name, listing.stat(b".")))
            else:
                unknown.append(name)
        return known, unknown

    def _immutable(self, node: Node) -> bool:
        """A lower object the policy says never changes (and no upper copy of it)."""
        if node.upper or node.lower is not DERIVED or node.parent is None:
            return False
        return self.policy.immutable(node.parent.tag)

    def attributes_settled(self, node: Node) -> bool:
        """Whether the kernel may keep *node*'s attributes for good: an object that never
        changes, still in the table and not asked to be forgotten."""
        return (self.inodes.get(node.ino) is node and node.ino not in self._trim_asked
                and self._immutable(node))

    async def _lower_xattrs(self, node: Node) -> dict[str, bytes]:
        """All xattrs of an immutable lower object, kept (exec asks for
        security.capability every time, ``ls -l`` for every entry): those of a whole
        kept directory's entries are read in one trip and kept beside its listing."""
        parent = node.parent
        if parent is not None and self._immutable(parent):
            ppath = self.lower_path(parent)
            pkey = self.policy.cache_key(ppath)
            listing = await self._node_listing(parent) if pkey is not None else None
            if listing is not None:
                xmap = self.dircache.get_xattrs(ppath, pkey)
                if xmap is None:
                    names = [n for n in listing.entries if n != b"."]
                    async with self._lower_fd(parent) as pfd:
                        xmap = await self.lower.run(self.lower.layer.read_dir_xattrs, pfd, names)
                    self.dircache.put_xattrs(ppath, pkey, xmap)
                return xmap.get(node.name, {})
        # A store path itself (its parent, the store, changes): kept on its own.
        path = self.lower_path(node)
        key = self.policy.cache_key(path)
        if key is not None:
            own = self.dircache.get_xattrs(path + b"/.", key + b"\0self")
            if own is None:
                async with self._lower_fd(node.parent) as pfd:
                    own = {b".": await self.lower.run(self.lower.layer.read_xattrs, pfd, node.name)}
                self.dircache.put_xattrs(path + b"/.", key + b"\0self", own)
            return own[b"."]
        xattrs = self._xattrs.get(path)
        if xattrs is None:
            async with self._lower_fd(node.parent) as pfd:
                xattrs = await self.lower.run(self.lower.layer.read_xattrs, pfd, node.name)
            self._xattrs[path] = xattrs
        return xattrs

    async def _resolve(self, parent: Node, name: bytes, lower_st=...) -> _Found:
        """Find *name* in *parent* across the layers; ENOENT if it is not there.

        *lower_st* may carry what a listing already learned of the lower entry.
        """
        up_st, hidden, opaque, redirect = self._upper_probe(parent, name)
        if up_st is not None and not stat.S_ISDIR(up_st.st_mode):
            return _Found(stat.S_IFMT(up_st.st_mode), up_st, None, None)
        if up_st is not None:
            if redirect is not None:
                return _Found(stat.S_IFDIR, up_st, self._redirect_target(parent, redirect), None)
            if opaque or hidden or parent.lower is None:
                return _Found(stat.S_IFDIR, up_st, None, None)
            if lower_st is ...:
                lower_st = await self._lower_stat(parent, name)
            merged = lower_st is not None and stat.S_ISDIR(lower_st.st_mode)
            return _Found(stat.S_IFDIR, up_st, DERIVED if merged else None, lower_st)
        if hidden or parent.lower is None:
            raise _err(errno.ENOENT)
        if lower_st is ...:
            lower_st = await self._lower_stat(parent, name)
        if lower_st is None:
            raise _err(errno.ENOENT)
        return _Found(stat.S_IFMT(lower_st.st_mode), None, DERIVED, lower_st)

    async def _child(self, parent: Node, name: bytes, lower_st=...) -> tuple[Node, os.stat_result]:
        """The node for *name* in *parent* and its current stat; ENOENT if absent."""
        if not parent.is_dir:
            raise _err(errno.ENOTDIR)
        if self._hidden_name(parent, name):
            raise _err(errno.ENOENT)
        node = self.inodes.child(parent, name)
        if node is not None:
            if not node.upper and lower_st is not ... and lower_st is not None:
                return node, lower_st
            try:
                return node, await self._stat(node)
            except FileNotFoundError:
                # An upper object removed behind the mount's back (local-overlay:// deletes
                # upper copies in the upper layer itself) may uncover a lower one: forget
                # this name and look again.  Not while a change holds the lock: it may be
                # between moving the upper object and updating the table.
                if (not node.upper or self._lock.locked()
                        or self.inodes.child(parent, name) is not node):
                    raise
                self._unlink_node(node, parent, name)
        found = await self._resolve(parent, name, lower_st)
        node = self.inodes.child(parent, name)  # someone may have made it meanwhile
        if node is not None:
            return node, await self._stat(node)
        st = found.upper_st or found.lower_st
        if found.upper_st is not None and not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1:
            node = self.inodes.by_upper_ino(st.st_ino)
            if node is not None:
                self.inodes.attach(node, parent, name)
                return node, st
        node = self._new_node(parent, name, found.kind, found.upper_st is not None, found.lower)
        if found.upper_st is not None and st.st_nlink > 1 and not node.is_dir:
            self.inodes.register_upper_ino(node, st.st_ino)
        return node, st

    async def _live_child(self, parent: Node, name: bytes, lower_st=...) -> tuple[Node, os.stat_result]:
        """``_child`` for a node about to be handed to the kernel: never one dropped while
        it awaited (the kernel may forget a node while it looks the same name up again,
        e.g. after a revalidation found a new node)."""
        while True:
            node, st = await self._child(parent, name, lower_st)
            if self.inodes.get(node.ino) is node:
                return node, st

    def _new_node(self, parent: Node, name: bytes, kind: int, upper: bool, lower) -> Node:
        node = self.inodes.add(parent, name, kind, upper, lower)
        if parent.tag is not None and kind == stat.S_IFDIR:
            node.tag = self.policy.tag(parent.tag, name)
        self._made_since_trim += 1
        if len(self.inodes) > self.max_nodes and self._made_since_trim > self.max_nodes // 20:
            self.trim()
        return node

    def trim(self) -> None:
        """Keep memory bounded: ask the kernel to forget the oldest nodes beyond the
        budget.  It drops those entries it does not use and sends FORGETs, which
        remove the nodes; what it still uses (open files, working directories) stays.
        The FORGETs come late (the kernel takes the asks one at a time), so nodes
        already asked count as going: asking again would only queue more asks."""
        excess = len(self.inodes) - self.max_nodes
        # Some room beyond the excess, so that this runs once per batch of new nodes.
        batch = excess + self.max_nodes // 10 - len(self._trim_asked)
        if batch > 0:
            victims = self.inodes.oldest_leaves(batch, scan=4 * batch, skip=self._trim_asked)
            for node in victims:
                self.notify.entry_changed(node.parent.ino, node.name)
            self.inodes.to_back(victims)
            self._trim_asked.update(node.ino for node in victims)
            self.trims += len(victims)
        self._made_since_trim = 0

    async def _exists(self, parent: Node, name: bytes) -> bool:
        try:
            await self._child(parent, name)
        except FileNotFoundError:
            return False
        return True

    async def _lower_has(self, parent: Node, name: bytes) -> bool:
        """Whether removing the upper *name* would uncover a lower entry."""
        if parent.lower is None:
            return False
        if parent.upper:
            with self._upper_fd(parent) as pfd:
                try:
                    st = self.upper.lstat(pfd, name)
                    if fmt.is_kernel_whiteout(st):
                        return False
                except FileNotFoundError:
                    pass
                if fmt.has_whiteout(pfd, name):
                    return False
        return await self._lower_stat(parent, name) is not None

    # ------------------------------------------------------------------ attributes

    async def _stat(self, node: Node) -> os.stat_result:
        if node is self.root:
            return self.upper.fstat(self.upper.root_fd)
        if node.parent is None:
            orphan = self._orphans.get(node.ino)
            if orphan is None:
                raise _err(errno.ENOENT, "removed")
            return os.fstat(orphan)
        if node.upper:
            with self._upper_fd(node.parent) as pfd:
                return self.upper.lstat(pfd, node.name)
        # During a lower outage a directory already known answers with what the lower last
        # said of it, so path walks through it (the kernel revalidates every ttl) go on.
        known = self._known_dirs.get(node.ino)
        if known is not None and self.lower.out:
            self.stale_answers += 1
            return known
        try:
            st = await self._lower_stat(node.parent, node.name)
        except OSError as e:
            if e.errno not in _OUTAGE or known is None:
                raise
            self.stale_answers += 1
            return known
        if st is None:
            raise _err(errno.ENOENT, "gone from the lower")
        return st

    def _attr(self, node: Node, st: os.stat_result) -> Attr:
        if node.kind == stat.S_IFDIR and not node.upper:
            self._known_dirs[node.ino] = st
        nlink = 1 if node.merged else st.st_nlink
        if self.owner is not None:
            uid, gid = self.owner
        else:
            uid, gid = st.st_uid, st.st_gid
        fixed = self._immutable(node)
        return Attr(node.ino, st, nlink, uid, gid, self.immutable_ttl if fixed else self.ttl, fixed)

    async def getattr(self, node: Node) -> Attr:
        return self._attr(node, await self._stat(node))

    # ------------------------------------------------------------------ lookup and listing

    def node(self, ino: int) -> Node:
        node = self.inodes.get(ino)
        if node is None:
            raise _err(errno.ESTALE)
        return node

    async def lookup(self, parent: Node, name: bytes) -> tuple[Node, Attr]:
        """Find *name*; the kernel now holds one more reference to the node.

        A name missing from a lower directory that never changes raises NegativeEntry,
        which the kernel may keep."""
        self._check_name(name)
        try:
            node, st = await self._live_child(parent, name)
        except FileNotFoundError:
            if (not parent.upper and parent.lower is DERIVED and parent.is_dir
                    and self.policy.complete(parent.tag) and self._immutable(parent)):
                raise NegativeEntry(self.immutable_ttl) from None
            raise
        node.lookups += 1
        return node, self._attr(node, st)

    def forget(self, ino: int, count: int) -> None:
        self.inodes.forget(ino, count)
        self._trim_asked.discard(ino)  # answered: if the kernel still holds it, ask anew

    async def _list(self, node: Node, *, with_stats: bool) -> list[Entry]:
        """The merged entries of a directory, upper first."""
        entries: dict[bytes, Entry] = {}
        hidden: set[bytes] = set()
        if node.upper:
            with self._upper_fd(node) as fd:
                for name, kind in self.upper.scandir(fd):
                    if fmt.is_reserved(name):
                        hidden.add(name[len(fmt.WHITEOUT_PREFIX):])
                        continue
                    if node is self.root and name == fmt.STATE_DIR:
                        continue
                    st = None
                    if with_stats or kind == 0:
                        try:
                            st = self.upper.lstat(fd, name)
                        except FileNotFoundError:
                            continue
                        if fmt.is_kernel_whiteout(st):
                            hidden.add(name)
                            continue
                    entries[name] = Entry(name, st, None)
        kept = await self._node_listing(node) if node.lower is not None else None
        if kept is not None:
            for entry in _shown_lower(kept):
                if entry.name in hidden or self._hidden_name(node, entry.name):
                    continue
                if entry.name in entries:
                    entries[entry.name].lower_st = entry.lower_st
                else:
                    entries[entry.name] = entry
        elif node.lower is not None:
            names = self.policy.lower_names(node.tag) if node.tag is not None else None
            try:
                async with self._lower_fd(node) as fd:
                    if names is not None:
                        names = [n for n in names if n not in entries and n not in hidden]
                        if with_stats:
                            lower, names = self._kept_stats(node, names)
                            lower += await self.lower.run(self.lower.layer.stat_names, fd, names)
                        else:
                            lower = [(n, None) for n in names]
                    elif with_stats:
                        lower = await self.lower.run(self.lower.layer.scan_stats, fd)
                    else:
                        listed = await self.lower.scandir(fd)
                        # Whiteout devices are hidden: stat what is not plainly a file,
                        # a directory or a symlink (rare: devices, FIFOs, sockets).
                        odd = [n for n, kind in listed if kind == 0]
                        odd_st = dict(await self.lower.run(self.lower.layer.stat_names, fd, odd)
                                      if odd else [])
                        lower = [(n, odd_st.get(n)) for n, kind in listed if kind or n in odd_st]
            except (FileNotFoundError, NotADirectoryError):
                lower = []  # a redirect whose lower directory is gone
            for name, st in lower:
                if name in hidden or self._hidden_name(node, name) or (
                        st is not None and fmt.is_kernel_whiteout(st)):
                    continue
                if names is None and not self._lower_visible(node, name):
                    continue  # (names from the policy are visible by definition)
                if name in entries:
                    entries[name].lower_st = st
                else:
                    entries[name] = Entry(name, None, st)
        return list(entries.values())

    async def list_dir(self, node: Node) -> DirHandle:
        """A snapshot of a directory's merged entries (not registered as open)."""
        if not node.is_dir:
            raise _err(errno.ENOTDIR)
        fixed = (not node.upper and self.policy.complete(node.tag) and self._immutable(node))
        if fixed:
            # An immutable lower-only directory (most of a store walk): its kept listing
            # is all there is to show, with nothing to merge.
            kept = await self._node_listing(node)
            if kept is not None:
                return DirHandle(next(self._fh), node, _shown_lower(kept), True)
        return DirHandle(next(self._fh), node, await self._list(node, with_stats=True), fixed)

    async def opendir(self, node: Node) -> DirHandle:
        dh = await self.list_dir(node)
        self.handles[dh.fh] = dh
        return dh

    async def readdir_entry(self, dh: DirHandle, index: int) -> tuple[Node, Attr] | None:
        """The node of entry *index* (not yet referenced), or None if it is gone."""
        entry = dh.entries[index]
        parent = dh.node
        child = self.inodes.child(parent, entry.name)
        if dh.fixed and entry.upper_st is None and self.policy.immutable(parent.tag):
            # In an immutable lower-only directory the listing's stat is the object's:
            # no layer to ask, whether the node is new or still known.
            st = entry.lower_st
            if child is None:
                child = self._new_node(parent, entry.name, stat.S_IFMT(st.st_mode), False, DERIVED)
            elif child.upper or child.lower is not DERIVED:
                child = None  # copied up meanwhile: ask the layers below
            if child is not None:
                return child, self._attr(child, st)
        elif child is None:
            # The listing already looked at both layers: what it saw makes the node,
            # unless it is an upper directory (whose markers decide how it merges).
            st = entry.upper_st or entry.lower_st
            if entry.upper_st is None and entry.lower_st is not None:
                node = self._new_node(parent, entry.name, stat.S_IFMT(st.st_mode), False, DERIVED)
                return node, self._attr(node, st)
            if st is not None and not stat.S_ISDIR(st.st_mode) and st.st_nlink == 1:
                node = self._new_node(parent, entry.name, stat.S_IFMT(st.st_mode), True, None)
                return node, self._attr(node, st)
        try:
            node, st = await self._live_child(parent, entry.name, entry.lower_st)
        except FileNotFoundError:
            return None
        return node, self._attr(node, st)

    def releasedir(self, fh: int) -> None:
        self.handles.pop(fh, None)

    def dirhandle(self, fh: int) -> DirHandle:
        dh = self.handles.get(fh)
        if not isinstance(dh, DirHandle):
            raise _err(errno.EBADF)
        return dh

    async def readlink(self, node: Node) -> bytes:
        if node.kind != stat.S_IFLNK:
            raise _err(errno.EINVAL)
        if node.upper:
            with self._upper_fd(node.parent) as pfd:
                return self.upper.readlink(pfd, node.name)
        listing = await self._node_listing(node.parent)
        if listing is None:
            listing = await self._node_listing(node)
            name = b"."
        else:
            name = node.name
        if listing is not None and name in listing.targets:
            return listing.targets[name]
        async with self._lower_fd(node.parent) as pfd:
            return await self.lower.readlink(pfd, node.name)

    # ------------------------------------------------------------------ copy-up

    async def _copy_up(self, node: Node, *, truncate: bool = False) -> None:
        """Give *node* an upper object (lock held).  Directories get metadata only."""
        if node.upper:
            return
        if node.parent is None:
            raise _err(errno.ENOENT, "removed")
        await self._copy_up(node.parent)
        tmp = self._work_name()
        async with self._lower_fd(node.parent) as lpfd:
            # (copy_to_work removes its partial copy when it fails; one given up on is
            # removed when its thread finishes, so a full disk gets its space back.)
            st = await self.lower.run(
                lambda: copyup.copy_to_work(self.lower.layer, lpfd, node.name, self.work_fd, tmp,
                                            truncate=truncate, privileged=self.privileged),
                late=lambda _: self.state.discard(tmp))
        try:
            with self._upper_fd(node.parent) as upfd, self._keep_times(upfd), self._writable(upfd):
                os.rename(tmp, node.name, src_dir_fd=self.work_fd, dst_dir_fd=upfd)
                if node.is_dir:
                    # Renaming a directory may touch its times on some file systems.
                    os.utime(node.name, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=upfd,
                             follow_symlinks=False)
        except BaseException:
            self.state.discard(tmp)
            raise
        node.upper = True
        if not node.is_dir:
            node.lower = None
        self.copy_ups += 1
        self.notify.attr_changed(node.ino)  # e.g. a merged directory's link count is 1

    @contextmanager
    def _keep_times(self, dirfd: int):
        """A copy-up into a directory is not a change of that directory: keep its times."""
        with times_kept(dirfd):
            yield

    # ------------------------------------------------------------------ creating

    def _check_new(self, parent: Node, name: bytes) -> None:
        self._check_name(name)
        if self.readonly:
            raise _err(errno.EROFS)
        if fmt.is_reserved(name):
            raise _err(errno.EINVAL, "names starting with .wh. are reserved for whiteouts")
        if parent is self.root and name == fmt.STATE_DIR:
            raise _err(errno.EPERM, "the name of nixfs' state folder is reserved")

    async def _create(self, parent: Node, name: bytes, caller: Caller, mode: int, make):
        """Create *name* with ``make(dirfd, name)``; return (node, attr, make's result)."""
        self._check_new(parent, name)
        async with self._lock:
            if await self._exists(parent, name):
                raise _err(errno.EEXIST)
            await self._copy_up(parent)
            with self._upper_fd(parent) as pfd, self._writable(pfd):
                # A directory made where a lower entry is whited out is marked opaque too,
                # so that every reader of the upper (not only nixfs) sees it replace that entry.
                hides_lower = self._clear_kernel_whiteout(pfd, name) or (
                    parent.lower is not None and fmt.has_whiteout(pfd, name))
                opaque = hides_lower and stat.S_ISDIR(mode)
                result = make(pfd, name)
                try:
                    self._set_owner(pfd, name, caller, mode)
                    if opaque:
                        cfd = self.upper.open_dir(pfd, name)
                        try:
                            fmt.make_opaque(cfd)
                        finally:
                            os.close(cfd)
                    st = self._give_mode(pfd, name, mode, self.upper.lstat(pfd, name))
                except BaseException:
                    if isinstance(result, int):
                        os.close(result)
                    self._undo_create(pfd, name)
                    raise
            node = self._new_node(parent, name, stat.S_IFMT(st.st_mode), True, None)
            node.lookups += 1
            return node, self._attr(node, st), result

    @staticmethod
    def _undo_create(pfd: int, name: bytes) -> None:
        try:
            os.rmdir(name, dir_fd=pfd)
        except NotADirectoryError:
            os.unlink(name, dir_fd=pfd)
        except OSError:
            pass

    def _clear_kernel_whiteout(self, pfd: int, name: bytes) -> bool:
        """Turn a kernel whiteout at *name* into ours, so *name* can be created.

        Returns whether there was one.
        """
        try:
            st = self.upper.lstat(pfd, name)
        except FileNotFoundError:
            return False
        if not fmt.is_kernel_whiteout(st):
            return False
        if fmt.whiteout_fits(name):
            fmt.make_whiteout(pfd, name)
        os.unlink(name, dir_fd=pfd)
        return True

    def _set_owner(self, pfd: int, name: bytes, caller: Caller, mode: int) -> None:
        if not self.privileged:
            return
        parent_st = os.fstat(pfd)
        gid = -1 if parent_st.st_mode & stat.S_ISGID else caller.gid
        os.chown(name, caller.uid, gid, dir_fd=pfd, follow_symlinks=False)

    def _give_mode(self, pfd: int, name: bytes, mode: int, st: os.stat_result) -> os.stat_result:
        """Make the new upper object's permissions exactly those the kernel asked for; its
        stat after.

        The kernel has applied the caller's umask to *mode* already; the daemon's own
        umask (applied again by mkdir/open/mknod) must not take more bits away, nor may
        the chown to the caller (which clears set-id bits).  A directory keeps the
        set-group-ID bit it inherited from its parent.  Costs a call only where the
        mode came out different."""
        if stat.S_ISLNK(st.st_mode):
            return st
        wanted = stat.S_IMODE(mode)
        if stat.S_ISDIR(st.st_mode):
            wanted |= st.st_mode & stat.S_ISGID
        if stat.S_IMODE(st.st_mode) == wanted:
            return st
        os.chmod(name, wanted, dir_fd=pfd)
        return self.upper.lstat(pfd, name)

    async def mkdir(self, parent: Node, name: bytes, mode: int, caller: Caller):
        def make(pfd, name):
            os.mkdir(name, stat.S_IMODE(mode), dir_fd=pfd)
        node, attr, _ = await self._create(parent, name, caller, mode | stat.S_IFDIR, make)
        return node, attr

    async def mknod(self, parent: Node, name: bytes, mode: int, rdev: int, caller: Caller):
        def make(pfd, name):
            os.mknod(name, mode, rdev, dir_fd=pfd)
        node, attr, _ = await self._create(parent, name, caller, mode, make)
        return node, attr

    async def symlink(self, parent: Node, name: bytes, target: bytes, caller: Caller):
        def make(pfd, name):
            os.symlink(target, name, dir_fd=pfd)
        node, attr, _ = await self._create(parent, name, caller, stat.S_IFLNK | 0o777, make)
        return node, attr

    async def create(self, parent: Node, name: bytes, mode: int, flags: int, caller: Caller):
        def make(pfd, name):
            return self.upper.open(pfd, name, (flags & _PASS_FLAGS) | os.O_CREAT | os.O_EXCL,
                                   stat.S_IMODE(mode))
        node, attr, fd = await self._create(parent, name, caller, mode, make)
        return self._new_handle(node, fd, True, flags), node, attr

    async def link(self, node: Node, new_parent: Node, new_name: bytes) -> Attr:
        self._check_new(new_parent, new_name)
        if node.is_dir:
            raise _err(errno.EPERM)
        async with self._lock:
            if await self._exists(new_parent, new_name):
                raise _err(errno.EEXIST)
            if not node.upper:
                refused = self.policy.link_lower_errno(new_parent.tag)
                if refused:
                    raise _err(refused, "linking this lower file would copy it up")
            await self._copy_up(node)
            await self._copy_up(new_parent)
            if node.parent is None:
                raise _err(errno.ENOENT)
            with self._upper_fd(node.parent) as sfd, self._upper_fd(new_parent) as dfd, \
                    self._writable(dfd):
                self._clear_kernel_whiteout(dfd, new_name)
                os.link(node.name, new_name, src_dir_fd=sfd, dst_dir_fd=dfd, follow_symlinks=False)
                st = self.upper.lstat(dfd, new_name)
            self.inodes.attach(node, new_parent, new_name)
            self.inodes.register_upper_ino(node, st.st_ino)
            node.lookups += 1
            return self._attr(node, st)

    # ------------------------------------------------------------------ removing

    def _kernel_whiteout(self, pfd: int, name: bytes) -> None:
        """Put a character-device whiteout at *name*, for names too long for ``.wh.``.

        Built in the work folder and renamed into place, so a non-directory that
        was there is replaced at once.
        """
        tmp = self._work_name("wh")
        os.mknod(tmp, stat.S_IFCHR | 0o600, 0, dir_fd=self.work_fd)
        try:
            os.rename(tmp, name, src_dir_fd=self.work_fd, dst_dir_fd=pfd)
        except BaseException:
            self.state.discard(tmp)
            raise

    def _discard_upper(self, pfd: int, name: bytes) -> None:
        """Remove an upper directory (holding only markers) at once, then its content."""
        trash = self._work_name("trash")
        os.rename(name, trash, src_dir_fd=pfd, dst_dir_fd=self.work_fd)
        self.state.discard(trash)

    async def unlink(self, parent: Node, name: bytes) -> None:
        self._check_remove(name)
        async with self._lock:
            node, _ = await self._child(parent, name)
            if node.is_dir:
                raise _err(errno.EISDIR)
            await self._remove(parent, name, node)

    async def rmdir(self, parent: Node, name: bytes) -> None:
        self._check_remove(name)
        async with self._lock:
            node, _ = await self._child(parent, name)
            if not node.is_dir:
                raise _err(errno.ENOTDIR)
            if await self._list(node, with_stats=False):
                raise _err(errno.ENOTEMPTY)
            await self._remove(parent, name, node)

    def _check_remove(self, name: bytes) -> None:
        self._check_name(name)
        if self.readonly:
            raise _err(errno.EROFS)

    async def _remove(self, parent: Node, name: bytes, node: Node) -> None:
        cover = await self._lower_has(parent, name)
        await self._copy_up(parent)
        await self._keep_orphan(node)
        hid_lower = cover
        with self._upper_fd(parent) as pfd, self._writable(pfd):
            if cover and fmt.whiteout_fits(name):
                fmt.make_whiteout(pfd, name)
                cover = False
            if node.upper and node.is_dir:
                self._discard_upper(pfd, name)
            elif node.upper and not cover:
                os.unlink(name, dir_fd=pfd)
            if cover:
                self._kernel_whiteout(pfd, name)
        self._unlink_node(node, parent, name)
        if hid_lower and parent.tag is not None:
            self.policy.whiteout_made(parent.tag, name)

    async def _keep_orphan(self, node: Node) -> None:
        """Before *node* loses its last name, keep a handle on its object if the kernel
        still holds the node (an unlinked open file, a removed working directory).

        A regular file's is open for reading (and writing, if it is in the upper and the
        daemon may): when the kernel keeps opens, reads and writes of an unlinked open
        file come by node, and this is what they use."""
        if node.lookups == 0 or node.aliases or node.ino in self._orphans:
            return
        tries = [os.O_PATH]
        if node.kind == stat.S_IFREG:
            tries[:0] = [os.O_RDWR, os.O_RDONLY] if node.upper else [os.O_RDONLY]

        def keep(pfd):
            for flags in tries:
                try:
                    return os.open(node.name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=pfd)
                except OSError:
                    if flags == os.O_PATH:
                        raise
        try:
            if node.upper:
                with self._upper_fd(node.parent) as pfd:
                    fd = keep(pfd)
            else:
                async with self._lower_fd(node.parent) as pfd:
                    fd = await self.lower.run(keep, pfd, late=os.close)
        except OSError:
            return
        self._orphans[node.ino] = fd
        if not node.upper and node.kind == stat.S_IFREG:
            self._lower_orphans.add(node.ino)

    def _unlink_node(self, node: Node, parent: Node, name: bytes) -> None:
        self.notify.node_detached(node.ino)
        self._forget_dir_fds(node)
        self.inodes.detach(node, parent, name)

    def _forget_dir_fds(self, node: Node) -> None:
        if node.is_dir:
            self.fds.drop(("u", node.ino))
            self.fds.drop(("l", node.ino))

    # ------------------------------------------------------------------ rename

    async def rename(self, old_parent: Node, old_name: bytes, new_parent: Node, new_name: bytes,
                     flags: int = 0) -> None:
        self._check_name(old_name)
        self._check_new(new_parent, new_name)
        if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE) or (
                flags & RENAME_NOREPLACE and flags & RENAME_EXCHANGE):
            raise _err(errno.EINVAL)
        async with self._lock:
            src, _ = await self._child(old_parent, old_name)
            try:
                dst, _ = await self._child(new_parent, new_name)
            except FileNotFoundError:
                dst = None
            if flags & RENAME_EXCHANGE:
                if dst is None:
                    raise _err(errno.ENOENT)
                await self._exchange(old_parent, old_name, src, new_parent, new_name, dst)
                return
            if dst is not None:
                if flags & RENAME_NOREPLACE:
                    raise _err(errno.EEXIST)
                if dst is src:
                    return  # two links of one file: POSIX says do nothing
                if src.is_dir and not dst.is_dir:
                    raise _err(errno.ENOTDIR)
                if dst.is_dir and not src.is_dir:
                    raise _err(errno.EISDIR)
            if src.is_dir and self._is_ancestor(src, new_parent):
                raise _err(errno.EINVAL)
            # In kernel overlayfs' order, so that a rename that fails leaves the same
            # (invisible but for link counts) copy-ups: a target with lower entries is
            # checked first, the source copied up, then a pure upper target checked.
            target_dir = dst is not None and dst.is_dir
            if target_dir and dst.lower is not None and await self._list(dst, with_stats=False):
                raise _err(errno.ENOTEMPTY)
            await self._copy_up(src)
            if target_dir and dst.lower is None and await self._list(dst, with_stats=False):
                raise _err(errno.ENOTEMPTY)
            await self._move(old_parent, old_name, src, new_parent, new_name, dst)

    def _is_ancestor(self, node: Node, other: Node | None) -> bool:
        while other is not None:
            if other is node:
                return True
            other = other.parent
        return False

    async def _move(self, old_parent, old_name, src, new_parent, new_name, dst) -> None:
        same_place = old_parent is new_parent and old_name == new_name
        cover_old = await self._lower_has(old_parent, old_name)
        cover_new = src.is_dir and await self._lower_has(new_parent, new_name)
        await self._copy_up(src)
        await self._copy_up(new_parent)
        redirect = self.lower_path(src) if src.is_dir and src.lower is not None else None
        if dst is not None:
            await self._keep_orphan(dst)
        with self._upper_fd(old_parent) as ofd, self._upper_fd(new_parent) as nfd, \
                self._writable(ofd), self._writable(nfd):
            if src.is_dir and not same_place:
                with self._upper_fd(src) as sfd, self._keep_times(sfd), self._writable(sfd):
                    if redirect is not None:
                        fmt.write_redirect(sfd, redirect, (self.work_fd, self._work_name()))
                    elif cover_new:
                        fmt.make_opaque(sfd)
            short = fmt.whiteout_fits(old_name)
            if cover_old and short:
                fmt.make_whiteout(ofd, old_name)
            if dst is not None and dst.is_dir and dst.upper:
                try:
                    os.rename(old_name, new_name, src_dir_fd=ofd, dst_dir_fd=nfd)
                except OSError as e:
                    if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                        raise
                    self._discard_upper(nfd, new_name)  # it held only markers
                    os.rename(old_name, new_name, src_dir_fd=ofd, dst_dir_fd=nfd)
            else:
                os.rename(old_name, new_name, src_dir_fd=ofd, dst_dir_fd=nfd)
            if cover_old and not short:
                self._kernel_whiteout(ofd, old_name)
        if cover_old and old_parent.tag is not None:
            self.policy.whiteout_made(old_parent.tag, old_name)
        if redirect is not None:
            src.lower = redirect
        if dst is not None:
            self._unlink_node(dst, new_parent, new_name)
        self.inodes.move(src, old_parent, old_name, new_parent, new_name)

    async def _exchange(self, a_parent, a_name, a, b_parent, b_name, b) -> None:
        if a is b:
            return
        if (a.is_dir and self._is_ancestor(a, b_parent)) or (b.is_dir and self._is_ancestor(b, a_parent)):
            raise _err(errno.EINVAL)
        # Each object lands where the other was: a directory there must not merge
        # with that name's lower entry unless it brings its own (a redirect).
        moves = []
        for node, to_parent, to_name in ((a, b_parent, b_name), (b, a_parent, a_name)):
            cover = node.is_dir and await self._lower_has(to_parent, to_name)
            moves.append((node, cover))
        for node in (a, b):
            await self._copy_up(node)
        await self._copy_up(a_parent)
        await self._copy_up(b_parent)
        redirects = {}
        for node, cover in moves:
            if node.is_dir:
                with self._upper_fd(node) as fd, self._keep_times(fd), self._writable(fd):
                    if node.lower is not None:
                        redirects[node] = self.lower_path(node)
                        fmt.write_redirect(fd, redirects[node],
                                           (self.work_fd, self._work_name()))
                    elif cover:
                        fmt.make_opaque(fd)
        with self._upper_fd(a_parent) as afd, self._upper_fd(b_parent) as bfd, \
                self._writable(afd), self._writable(bfd):
            renameat2(afd, a_name, bfd, b_name, RENAME_EXCHANGE)
        for node, path in redirects.items():
            node.lower = path
        self.inodes.exchange(a, a_parent, a_name, b, b_parent, b_name)

    # ------------------------------------------------------------------ changes from outside

    def find(self, *names: bytes) -> Node | None:
        """The node at a merged path if the kernel holds it (no I/O)."""
        node = self.root
        for name in names:
            node = self.inodes.child(node, name)
            if node is None:
                return None
        return node

    def lower_entry_changed(self, dir_names: tuple[bytes, ...], name: bytes) -> None:
        """The lower gained or lost *name* (or the policy changed its mind about it):
        forget what nixfs and the kernel cached about that entry."""
        path = b"/".join(dir_names + (name,))
        self.policy.forget(path)
        self.dircache.forget(path)
        self.lower_files.forget(path)
        for key in [k for k in self._xattrs if k == path or k.startswith(path + b"/")]:
            del self._xattrs[key]
        parent = self.find(*dir_names)
        if parent is None:
            return  # nobody has looked below it: nothing is cached
        self.notify.listing_changed(parent.ino)
        child = self.inodes.child(parent, name)
        if child is not None:
            if child.upper:
                if child.is_dir and child.lower is not None:
                    self.fds.drop(("l", child.ino))
                    child.lower = None if not self._lower_visible(parent, name) else child.lower
            else:
                # What is below it left the lower too (nodes the kernel still holds, e.g.
                # a working directory, answer from the lower from now on: "gone").
                for below in self.inodes.descendants(child):
                    self.notify.node_detached(below.ino)
                self._unlink_node(child, parent, name)
        self.notify.entry_changed(parent.ino, name)

    async def discard_upper(self, dir_names: tuple[bytes, ...], name: bytes) -> bool:
        """Remove the upper copy of ``dir/name`` so the lower one shows (a duplicate)."""
        async with self._lock:
            pfd = self.upper.open_dir_path(b"/".join(dir_names))
            try:
                try:
                    st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
                except FileNotFoundError:
                    return False
                if fmt.is_kernel_whiteout(st):
                    return False
                with self._writable(pfd):
                    trash = self._work_name("trash")
                    os.rename(name, trash, src_dir_fd=pfd, dst_dir_fd=self.work_fd)
            finally:
                os.close(pfd)
            parent = self.find(*dir_names)
            child = self.inodes.child(parent, name) if parent else None
            if child is not None:
                self._unlink_node(child, parent, name)
            if parent is not None:
                self.notify.entry_changed(parent.ino, name)
                self.notify.listing_changed(parent.ino)
        await trio.to_thread.run_sync(self.state.discard, trash)
        return True

    async def unhide(self, dir_names: tuple[bytes, ...], name: bytes) -> bool:
        """Undo the whiteout of a lower ``dir/name``; False if there was none."""
        async with self._lock:
            pfd = self.upper.open_dir_path(b"/".join(dir_names))
            try:
                removed = False
                with self._writable(pfd):
                    if fmt.whiteout_fits(name):
                        try:
                            os.unlink(fmt.whiteout_name(name), dir_fd=pfd)
                            removed = True
                        except FileNotFoundError:
                            pass
                    try:
                        st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
                        if fmt.is_kernel_whiteout(st):
                            os.unlink(name, dir_fd=pfd)
                            removed = True
                    except FileNotFoundError:
                        pass
            finally:
                os.close(pfd)
            if removed:
                self.lower_entry_changed(dir_names, name)
            return removed

    # ------------------------------------------------------------------ attributes, xattrs

    async def setattr(self, node: Node, changes: SetAttr, handle: Handle | None = None) -> Attr:
        if self.readonly:
            raise _err(errno.EROFS)
        if node.parent is None and node is not self.root:
            return await self._setattr_orphan(node, changes)
        async with self._lock:
            await self._copy_up(node, truncate=changes.size == 0)
            fd_for_size = handle.fd if handle is not None and handle.upper else None
            with self._object(node) as (pfd, name):
                if changes.size is not None:
                    if node.is_dir:
                        raise _err(errno.EISDIR)
                    if fd_for_size is not None:
                        os.ftruncate(fd_for_size, changes.size)
                    else:
                        fd = self.upper.open(pfd, name, os.O_WRONLY)
                        try:
                            os.ftruncate(fd, changes.size)
                        finally:
                            os.close(fd)
                ids = self._new_owner(changes)
                if ids is not None:
                    os.chown(name, *ids, dir_fd=pfd, follow_symlinks=False)
                if changes.mode is not None:
                    if node.kind == stat.S_IFLNK:
                        raise _err(errno.EOPNOTSUPP)
                    os.chmod(name, stat.S_IMODE(changes.mode), dir_fd=pfd)
                if changes.atime_ns is not None or changes.mtime_ns is not None:
                    os.utime(name, ns=_new_times(changes, self.upper.lstat(pfd, name)),
                             dir_fd=pfd, follow_symlinks=False)
                st = self.upper.lstat(pfd, name)
            return self._attr(node, st)

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
        the descriptor kept for it (see _keep_orphan); a lower file gets its private
        copy first, as for a write, so the lower is never changed."""
        if node.kind != stat.S_IFREG:
            raise _err(errno.ENOENT, "removed")
        fd = await self._writable_orphan(node)
        if changes.size is not None:
            os.ftruncate(fd, changes.size)
        ids = self._new_owner(changes)
        if ids is not None:
            os.fchown(fd, *ids)
        if changes.mode is not None:
            os.fchmod(fd, stat.S_IMODE(changes.mode))
        if changes.atime_ns is not None or changes.mtime_ns is not None:
            os.utime(fd, ns=_new_times(changes, os.fstat(fd)))
        return self._attr(node, os.fstat(fd))

    @contextmanager
    def _object(self, node: Node):
        """(dirfd, name) of *node*'s upper object; the root is (root fd, '.')."""
        if node is self.root:
            yield self.upper.root_fd, b"."
            return
        if node.parent is None:
            raise _err(errno.ENOENT, "removed")
        with self._upper_fd(node.parent) as pfd:
            yield pfd, node.name

    async def _lower_object_call(self, node: Node, fn, *args):
        if node is self.root:
            return await self.lower.run(fn, self.lower.root_fd, b".", *args)
        if node.parent is None:
            raise _err(errno.ENOENT, "removed")  # as _object says for an upper one
        async with self._lower_fd(node.parent) as pfd:
            return await self.lower.run(fn, pfd, node.name, *args)

    async def getxattr(self, node: Node, name: bytes) -> bytes:
        key = os.fsdecode(name)
        if fmt.is_overlay_xattr(key):
            raise _err(errno.ENODATA)
        try:
            if node.upper:
                with self._object(node) as (pfd, n):
                    return self.upper.getxattr(pfd, n, key)
            if self._immutable(node):
                value = (await self._lower_xattrs(node)).get(key)
                if value is None:
                    raise _err(errno.ENODATA)
                return value
            return await self._lower_object_call(node, self.lower.layer.getxattr, key)
        except OSError as e:
            if e.errno == errno.ENOTSUP:
                raise _err(errno.ENODATA) from None
            raise

    async def listxattr(self, node: Node) -> list[bytes]:
        try:
            if node.upper:
                with self._object(node) as (pfd, n):
                    names = self.upper.listxattr(pfd, n)
            elif self._immutable(node):
                names = list(await self._lower_xattrs(node))
            else:
                names = await self._lower_object_call(node, self.lower.layer.listxattr)
        except OSError as e:
            if e.errno == errno.ENOTSUP:
                return []
            raise
        return [os.fsencode(n) for n in names if not fmt.is_overlay_xattr(n)]

    async def setxattr(self, node: Node, name: bytes, value: bytes) -> None:
        key = os.fsdecode(name)
        if self.readonly:
            raise _err(errno.EROFS)
        if fmt.is_overlay_xattr(key):
            raise _err(errno.EPERM, "overlay xattrs are reserved")
        async with self._lock:
            await self._copy_up(node)
            with self._object(node) as (pfd, n):
                copyup.set_xattr(pfd, n, key, value)

    async def removexattr(self, node: Node, name: bytes) -> None:
        if self.readonly:
            raise _err(errno.EROFS)
        await self.getxattr(node, name)  # ENODATA without a copy-up
        key = os.fsdecode(name)
        async with self._lock:
            await self._copy_up(node)
            with self._object(node) as (pfd, n):
                fd = os.open(n, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=pfd)
                try:
                    os.removexattr(f"/proc/self/fd/{fd}", key)
                finally:
                    os.close(fd)

    def statfs(self) -> os.statvfs_result:
        return os.fstatvfs(self.upper.root_fd)

    # ------------------------------------------------------------------ file data

    def _new_handle(self, node: Node, fd: int, upper: bool, flags: int) -> Handle:
        h = Handle(next(self._fh), node, fd, upper, flags)
        self.handles[h.fh] = h
        return h

    def handle(self, fh: int) -> Handle:
        h = self.handles.get(fh)
        if not isinstance(h, Handle):
            raise _err(errno.EBADF)
        return h

    async def open(self, node: Node, flags: int) -> Handle:
        if node.is_dir:
            raise _err(errno.EISDIR)
        writing = flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC
        if writing:
            if self.readonly:
                raise _err(errno.EROFS)
            async with self._lock:
                await self._copy_up(node, truncate=bool(flags & os.O_TRUNC))
        if (not writing and node.kind == stat.S_IFREG and self._immutable(node)
                and flags & _PASS_FLAGS & ~os.O_LARGEFILE == os.O_RDONLY):
            key, fd = await self._shared_lower_fd(node)
            h = self._new_handle(node, fd, False, flags)
            h.shared = key
            return h
        fd = await self._open_top(node, flags & _PASS_FLAGS)
        return self._new_handle(node, fd, node.upper, flags)

    async def _shared_lower_fd(self, node: Node) -> tuple[bytes, int]:
        """The descriptor of an immutable lower file shared by all its readers (and its
        key, for lower_files.release)."""
        key = self.lower_path(node)
        fd = self.lower_files.acquire(key)
        if fd is None:
            fd = self.lower_files.add(key, await self._open_top(node, os.O_RDONLY))
        return key, fd

    async def _open_top(self, node: Node, flags: int) -> int:
        if node.parent is None:
            raise _err(errno.ENOENT, "removed")
        if node.upper:
            with self._upper_fd(node.parent) as pfd:
                return self.upper.open(pfd, node.name, flags)
        async with self._lower_fd(node.parent) as pfd:
            return await self.lower.open(pfd, node.name, flags)

    async def read(self, h: Handle, offset: int, size: int) -> bytes:
        if not h.upper and h.node.upper:
            # Copied up since it was opened: read the copy, as kernel overlayfs does.
            fd = await self._open_top(h.node, h.flags & _PASS_FLAGS & ~os.O_TRUNC)
            self._close_handle_fd(h)
            h.fd, h.upper, h.shared = fd, True, None
        if h.upper:
            return await self._upper_pread(h.fd, size, offset)
        return await self._lower_pread(h.fd, size, offset)

    async def write(self, h: Handle, offset: int, data: bytes) -> int:
        if not h.upper:
            raise _err(errno.EBADF)
        return await self._upper_pwrite(h.fd, data, offset)

    async def fsync(self, h: Handle, datasync: bool) -> None:
        if h.upper:
            await self._sync_fd(h.fd, datasync)

    def release(self, fh: int) -> None:
        h = self.handles.pop(fh, None)
        if isinstance(h, Handle):
            self._close_handle_fd(h)

    def _close_handle_fd(self, h: Handle) -> None:
        if h.shared is not None:
            self.lower_files.release(h.shared)
        else:
            os.close(h.fd)

    # ------------------------------------------------------------------ file data by node
    # When the kernel keeps opens (the adapter answers open with ENOSYS), it sends no
    # OPEN or RELEASE: reads and writes name the node, and nixfs keeps descriptors per
    # node instead of per open file.  A lower file is copied up at its first write.

    async def read_node(self, node: Node, offset: int, size: int) -> bytes:
        if node.is_dir:
            raise _err(errno.EISDIR)
        if node.parent is None:  # unlinked while the kernel holds it
            fd = self._orphan_fd(node)
            if node.ino in self._lower_orphans:
                return await self._lower_pread(fd, size, offset)
            return await self._upper_pread(fd, size, offset)
        if node.upper:
            entry = self._kept_file_fd(node, "r")
            try:
                return await self._upper_pread(entry.fd, size, offset)
            finally:
                self.file_fds.release(entry)
        if node.kind == stat.S_IFREG and self._immutable(node):
            key, fd = await self._shared_lower_fd(node)
            try:
                return await self._lower_pread(fd, size, offset)
            finally:
                self.lower_files.release(key)
        # A file of a lower that may change: opened for this read only, as an open would.
        async with self._lower_fd(node.parent) as pfd:
            return await self.lower.run(self.lower.layer.read_at, pfd, node.name, size, offset)

    async def write_node(self, node: Node, offset: int, data: bytes) -> int:
        if node.is_dir:
            raise _err(errno.EISDIR)
        if self.readonly:
            raise _err(errno.EROFS)
        if not node.upper and node.parent is not None:
            async with self._lock:
                await self._copy_up(node)
        if node.parent is None:  # unlinked while the kernel holds it (or during the copy)
            return await self._upper_pwrite(await self._writable_orphan(node), data, offset)
        entry = self._kept_file_fd(node, "w")
        try:
            return await self._upper_pwrite(entry.fd, data, offset)
        finally:
            self.file_fds.release(entry)

    async def fsync_node(self, node: Node, datasync: bool) -> None:
        # A lower file (orphaned or not) was never written: nothing of ours to sync.
        if node.parent is None:
            if node.ino not in self._lower_orphans:
                await self._sync_fd(self._orphan_fd(node), datasync)
        elif node.upper:
            entry = self._kept_file_fd(node, "r")
            try:
                await self._sync_fd(entry.fd, datasync)
            finally:
                self.file_fds.release(entry)

    def keep_by_node(self, h: Handle) -> None:
        """Make a new file's open descriptor (read-write) the one its node's reads and
        writes use: a file created read-only can still be written through it."""
        self.handles.pop(h.fh, None)
        self.file_fds.release(self.file_fds.insert(("w", h.node.ino), h.fd))

    def _kept_file_fd(self, node: Node, use: str) -> FdEntry:
        """A descriptor of *node*'s upper file for *use* ("r" or "w"), pinned: a writable
        one serves reads too."""
        entry = self.file_fds.acquire(("w", node.ino))
        if entry is None and use == "r":
            entry = self.file_fds.acquire(("r", node.ino))
        if entry is None:
            with self._upper_fd(node.parent) as pfd:
                fd = self.upper.open(pfd, node.name, os.O_RDWR if use == "w" else os.O_RDONLY)
            entry = self.file_fds.insert((use, node.ino), fd)
        return entry

    async def _writable_orphan(self, node: Node) -> int:
        """The descriptor an unlinked file is written through.  A lower file's is
        read-only: it gets a private copy in the work directory now (kernel overlayfs
        copies up when such a file is opened for writing, before the unlink)."""
        if node.ino not in self._lower_orphans:
            return self._orphan_fd(node)
        async with self._lock:  # one copy, however many writes wait for it
            if node.ino not in self._lower_orphans:
                return self._orphan_fd(node)
            return await self._copy_orphan(node, self._orphan_fd(node))

    async def _copy_orphan(self, node: Node, fd: int) -> int:
        def copy() -> int:
            st = os.fstat(fd)
            new = os.open(".", os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600, dir_fd=self.work_fd)
            try:
                copyup.copy_data(fd, new, st.st_size, self.lower.layer)
                os.fchmod(new, stat.S_IMODE(st.st_mode))
                if self.privileged:
                    os.fchown(new, st.st_uid, st.st_gid)
                os.utime(new, ns=(st.st_atime_ns, st.st_mtime_ns))
            except BaseException:
                os.close(new)
                raise
            return new
        new = await self.lower.run(copy, late=os.close)
        os.close(fd)
        self._orphans[node.ino] = new
        self._lower_orphans.discard(node.ino)
        return new

    def _orphan_fd(self, node: Node) -> int:
        fd = self._orphans.get(node.ino)
        if fd is None:
            raise _err(errno.ENOENT, "removed")
        return fd  # (an O_PATH one, where no better could be had, answers EBADF)

    async def _upper_pread(self, fd: int, size: int, offset: int) -> bytes:
        self.upper.calls["read"] += 1
        if size <= INLINE_IO:
            return os.pread(fd, size, offset)  # local and small: a thread hop costs more
        return await trio.to_thread.run_sync(os.pread, fd, size, offset,
                                             limiter=self.data_limiter)

    async def _upper_pwrite(self, fd: int, data: bytes, offset: int) -> int:
        self.upper.calls["write"] += 1
        if len(data) <= INLINE_IO:
            return os.pwrite(fd, data, offset)
        return await trio.to_thread.run_sync(os.pwrite, fd, data, offset,
                                             limiter=self.data_limiter)

    async def _lower_pread(self, fd: int, size: int, offset: int) -> bytes:
        self.lower.calls["read"] += 1
        return await self.lower.run(os.pread, fd, size, offset)

    async def _sync_fd(self, fd: int, datasync: bool) -> None:
        await trio.to_thread.run_sync(os.fdatasync if datasync else os.fsync, fd,
                                      limiter=self.data_limiter)

    async def fsyncdir(self, node: Node, datasync: bool) -> None:
        if node.upper:
            with self._upper_fd(node) as fd:
                await trio.to_thread.run_sync(os.fsync, fd, limiter=self.data_limiter)

    async def sync(self) -> None:
        """Flush everything written to the upper to disk."""
        from ..libc import syncfs
        await trio.to_thread.run_sync(syncfs, self.upper.root_fd)
