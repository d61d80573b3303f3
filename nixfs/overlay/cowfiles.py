"""Upper files that are copy-on-write over a base in the lower, served as ordinary files.

An upper regular file ``NAME`` with a map beside it (``upperformat.cow_map_name``) is a
COW file (nixfs/cow): its delta holds the pages written, a base in the lower the rest
(the client of a published generation makes ``var/nix/db/db.sqlite`` so, and a stock
Nix's SQLite uses it through the mount).  The merged view shows its logical content and
size; every read, write, truncation and fsync is the one CowFile's that this part keeps
per file, shared by every handle and node on it, so its map stays coherent.  A CowFile
is opened at the file's first use and kept until the file is unlinked or the mount ends
(a running mount keeps its bases open); its calls run in the lower's worker threads,
because a read may reach the base.

A COW file cannot be renamed or linked (EXDEV: ``mv`` copies it): its map would have to
follow in the same step.  Unlinked, its delta and map go; if the kernel still holds it
(an open file), both move into a folder of their own in the work folder, where its
CowFile goes on serving it until the node is dropped.
"""

import errno
import logging
import os
import stat
import threading

import trio

from . import upperformat as fmt
from .cowbases import BaseStats, opener
from .descriptors import Descriptors
from .inodes import Node
from .lowerlayer import LowerLayer
from .state import UpperState
from .upperlayer import UpperLayer
from .types import err
from ..cow.cowfile import CowFile
from ..cow.cowmap import CowError

log = logging.getLogger(__name__)


def with_size(st: os.stat_result, size: int, blocks: int) -> os.stat_result:
    """*st* with another st_size and st_blocks (the logical file's, not its delta's)."""
    fields = list(st)
    fields[6] = size
    extra = {name: getattr(st, name) for name in
             ("st_atime", "st_mtime", "st_ctime", "st_atime_ns", "st_mtime_ns", "st_ctime_ns",
              "st_blksize", "st_rdev")}
    extra["st_blocks"] = blocks
    return os.stat_result(fields, extra)


class CowEntry:
    """One open COW file: its CowFile, and the directory its delta and map are in (a
    descriptor of our own, which follows that directory through renames)."""

    def __init__(self, cow, dir_fd: int, name: bytes, key: tuple[int, int]):
        self.cow, self.dir_fd, self.name, self.key = cow, dir_fd, name, key
        self.active = 0  # calls under way in worker threads
        self.idle = trio.Event()
        self.idle.set()
        self.moving: trio.Event | None = None  # set while the files move (unlink)
        self.orphan: bytes | None = None  # its folder in the work folder, once unlinked
        self.closed = False
        self.closing = threading.Lock()
        self.nodes: set[int] = set()


class CowFiles:
    def __init__(self, dirs: Descriptors, upper: UpperLayer, lower: LowerLayer,
                 state: UpperState, *, readonly: bool):
        self.dirs, self.upper, self.lower, self.state = dirs, upper, lower, state
        self.readonly = readonly  # a read-only mount opens its COW files so
        self._by_node: dict[int, CowEntry | None] = {}  # None: known not to be a COW file
        self._by_file: dict[tuple[int, int], CowEntry] = {}  # the delta's (st_dev, st_ino)
        self._opening: dict[tuple[int, int], trio.Event] = {}
        self._orphans: set[CowEntry] = set()  # unlinked, still held
        self._broken: set[tuple[int, int]] = set()  # files that failed to open (logged)
        self.bases = BaseStats()
        self.counts = {"read": 0, "write": 0, "truncate": 0, "fsync": 0, "opened": 0}

    def stats(self) -> dict:
        return {"open": len(self._by_file), **self.counts, "base": self.bases.as_dict()}

    def close(self) -> None:
        """At unmount: every CowFile closed (its map written)."""
        for entry in [*self._by_file.values(), *self._orphans]:
            self._close_entry(entry)
        self._by_file.clear()
        self._orphans.clear()
        self._by_node.clear()

    # Which nodes are COW files.

    def is_cow(self, node: Node) -> bool:
        """Whether *node* is a COW file (one upper lstat the first time it is asked)."""
        if node.ino in self._by_node:
            return self._by_node[node.ino] is not None
        if node.kind != stat.S_IFREG or not node.upper or node.parent is None:
            return False
        if not self._has_map(node):
            self._by_node[node.ino] = None
            return False
        return True

    def _has_map(self, node: Node) -> bool:
        if node.parent is None or not node.upper or node.kind != stat.S_IFREG:
            return False
        if len(fmt.COW_MAP_PREFIX) + len(node.name) > fmt.NAME_MAX:
            return False
        with self.dirs.upper_fd(node.parent) as pfd:
            try:
                self.upper.lstat(pfd, fmt.cow_map_name(node.name))
            except FileNotFoundError:
                return False
        return True

    def known(self, node: Node) -> CowEntry | None:
        """*node*'s open COW file, if it has one (no I/O)."""
        return self._by_node.get(node.ino)

    async def of(self, node: Node) -> CowEntry | None:
        """*node*'s COW file, opened if need be; None if it is no COW file."""
        entry = self._by_node.get(node.ino)
        if entry is not None or node.parent is None:
            return entry
        if not self.is_cow(node):
            return None
        with self.dirs.upper_fd(node.parent) as pfd:
            st = self.upper.lstat(pfd, node.name)
            key = (st.st_dev, st.st_ino)
            while key in self._opening:  # another task is opening it: use its CowFile
                await self._opening[key].wait()
            entry = self._by_file.get(key)
            if entry is None:
                entry = await self._open(pfd, node.name, key)
        entry.nodes.add(node.ino)  # (also if it was unlinked meanwhile: it serves the orphan)
        self._by_node[node.ino] = entry
        return entry

    async def _open(self, pfd: int, name: bytes, key: tuple[int, int]) -> CowEntry:
        done = self._opening[key] = trio.Event()
        try:
            dir_fd = self.upper.open_dir(pfd, b".")
            try:
                cow = await self.lower.run_on_layer(_open_cow, dir_fd, name, self.bases,
                                                    self.readonly, late=_close_late)
            except BaseException as e:
                os.close(dir_fd)
                if isinstance(e, CowError) and key not in self._broken:
                    self._broken.add(key)  # (said once; every use fails)
                    log.error("%s", e)
                raise
        finally:
            del self._opening[key]
            done.set()
        entry = self._by_file[key] = CowEntry(cow, dir_fd, name, key)
        self.counts["opened"] += 1
        return entry

    def dropped(self, node: Node) -> None:
        """*node* left the table; an unlinked COW file no other node holds is closed."""
        entry = self._by_node.pop(node.ino, None)
        if entry is None:
            return
        entry.nodes.discard(node.ino)
        if entry.orphan is not None and not entry.nodes:
            try:
                trio.lowlevel.spawn_system_task(self._close_orphan, entry)
            except RuntimeError:  # not in the event loop (the mount is ending)
                self._close_entry(entry)
                self._orphans.discard(entry)

    async def _close_orphan(self, entry: CowEntry) -> None:
        await entry.idle.wait()
        await trio.to_thread.run_sync(self._close_entry, entry)
        self._orphans.discard(entry)  # (until here, the end of the mount closes it)

    def _close_entry(self, entry: CowEntry) -> None:
        with entry.closing:  # (from a worker thread, or at the end of the mount)
            if entry.closed:
                return
            entry.closed = True
        try:
            entry.cow.close()
            if entry.orphan is not None:
                self.state.discard(entry.orphan)
        except Exception:
            log.exception("closing the COW file %s", os.fsdecode(entry.name))
        finally:
            os.close(entry.dir_fd)

    def stat(self, node: Node, st: os.stat_result) -> os.stat_result:
        """*st* (the delta's) as the merged view shows it: the logical size."""
        entry = self._by_node.get(node.ino)
        if entry is None:
            return st
        return with_size(st, entry.cow.size(), entry.cow.blocks())

    async def shown(self, node: Node, st: os.stat_result) -> os.stat_result:
        """``stat`` for a node that may not have been looked at yet.  One that cannot be
        opened (a damaged map, its base out of reach) shows its delta's stat: its name
        can still be removed, and every read of it fails (EIO), never reads zeros."""
        if node.upper and node.kind == stat.S_IFREG:
            try:
                await self.of(node)
            except OSError:
                pass
        return self.stat(node, st)

    # The file's data: each call in a worker thread of the lower.

    async def _call(self, entry: CowEntry, what: str, fn, *args):
        while entry.moving is not None:
            await entry.moving.wait()
        self.counts[what] += 1
        entry.active += 1
        entry.idle = trio.Event() if entry.active == 1 else entry.idle
        try:
            return await self.lower.run(fn, *args)
        except CowError as e:  # (EIO) a damaged map, a changed base
            log.error("%s", e)
            raise
        finally:
            entry.active -= 1
            if entry.active == 0:
                entry.idle.set()

    async def pread(self, entry: CowEntry, size: int, offset: int) -> bytes:
        return await self._call(entry, "read", entry.cow.pread, size, offset)

    async def pwrite(self, entry: CowEntry, data: bytes, offset: int) -> int:
        await self._call(entry, "write", _published(entry.cow.pwrite), data, offset)
        return len(data)

    async def truncate(self, entry: CowEntry, size: int) -> None:
        await self._call(entry, "truncate", _published(entry.cow.truncate), size)

    async def fsync(self, entry: CowEntry) -> None:
        await self._call(entry, "fsync", entry.cow.fsync)

    # Namespace changes (the caller holds the change lock).

    async def check_movable(self, *nodes: Node | None) -> None:
        """EXDEV if one of *nodes* is a COW file: renamed or linked, its map would have
        to follow in the same step (``mv`` then copies, as across file systems)."""
        for node in nodes:
            if node is not None and self.is_cow(node):
                raise err(errno.EXDEV, "a copy-on-write file cannot be renamed or linked")

    async def before_unlink(self, node: Node) -> CowEntry | None:
        """Ready *node* (a COW file) to be unlinked: its CowFile open, no call under way,
        new ones held back until ``unlinked``.  None if it cannot be opened (a damaged
        map): then its files are simply removed."""
        try:
            entry = await self.of(node)
        except OSError as e:
            log.warning("unlinking the COW file %s, which cannot be opened: %s",
                        os.fsdecode(node.name), e)
            entry = None
        if entry is not None:
            entry.moving = trio.Event()
            await entry.idle.wait()
        return entry

    def remove(self, pfd: int, name: bytes, entry: CowEntry | None) -> None:
        """Take the COW file *name* out of the upper directory *pfd*: the delta first, then
        the map (a crash between leaves a map with no delta, which nothing shows and a
        new file of that name drops).  An open one moves to a work folder of its own."""
        map_name = fmt.cow_map_name(name)
        if entry is None:
            self.upper.unlink(pfd, name)
            self.upper.unlink(pfd, map_name)
            return
        folder = self.dirs.work_name("cow")
        work_fd = self.dirs.work_fd
        self.upper.mkdir(work_fd, folder, 0o700)
        new_dir = self.upper.open_dir(work_fd, folder)
        try:
            self.upper.rename(pfd, name, new_dir, entry.name)
            self.upper.rename(pfd, map_name, new_dir, fmt.cow_map_name(entry.name))
            os.dup2(new_dir, entry.dir_fd)  # its paths now lead to the folder
        finally:
            os.close(new_dir)
        entry.orphan = folder
        del self._by_file[entry.key]
        self._orphans.add(entry)

    def unlinked(self, entry: CowEntry | None) -> None:
        """After ``remove`` (before the node is unlinked, which may drop it and so close
        the file): calls go on, now on the moved files."""
        if entry is not None and entry.moving is not None:
            moving, entry.moving = entry.moving, None
            moving.set()


def _open_cow(layer, dir_fd: int, name: bytes, bases: BaseStats, readonly: bool):
    """(In a worker thread.)  The CowFile of the upper delta *name* in *dir_fd*, its
    bases opened through the lower *layer*."""
    return CowFile.open(name, fmt.cow_map_name(name), opener(layer, bases), dir_fd=dir_fd,
                        readonly=readonly)


def _close_late(cow) -> None:
    """A CowFile opened after its opener gave up (the lower did not answer in time)."""
    cow.close()


def _published(change):
    """*change* (a CowFile's pwrite or truncate), then its map written if that changed it.

    A write that returned must survive the daemon's death as a plain file's does (SQLite
    relies on it for a process crash: with ``synchronous=off``, or between a checkpoint's
    copying and its WAL's reuse), and a page the map does not name reads as its old
    content.  Not durable: a power loss keeps what the last fsync made durable.  Only a
    write that adds pages (or changes the size) rewrites the map."""
    def run(*args):
        result = change(*args)
        change.__self__.publish()
        return result
    return run
