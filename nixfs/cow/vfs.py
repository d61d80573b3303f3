"""The ``nixfs-cow`` SQLite VFS: nixfs' own connections read and write COW files as
ordinary databases (the merged db before mounting, the lower index, the listings).

It inherits everything from SQLite's default VFS but the COW main file's reads, writes,
size, truncation and sync, which go to the file's CowFile (shared.py: one per delta in a
process).  The default VFS still opens the delta itself, so its locks (POSIX locks on the
delta) and, in WAL mode, its ``-shm`` shared memory and ``-wal`` beside the delta are the
real ones: two processes can use one COW database.  A file without a map beside it is a
plain file through this VFS (``connect`` then uses the default VFS directly).

Supported: rollback journals (delete, truncate, persist) and WAL, with locking_mode normal
or exclusive, synchronous full, normal or off.  The COW file's map on disk is how another
process sees this one's writes to the database file: it is written durably at every sync,
and (not durably) where SQLite hands a change over without a sync — at
``SQLITE_FCNTL_SYNC`` (sent in place of the sync with synchronous=off, before a journal is
finalised), at the end of a checkpoint's copying (``SQLITE_FCNTL_CKPT_DONE``) and at every
unlock.  A reader takes a newer map when it locks the file, when a checkpoint starts and,
because WAL readers take no file lock per transaction, in WAL mode at each read (one stat
of the map; in rollback mode the lock covers it).
Memory-mapped I/O is never used: the VFS offers SQLite no xFetch (apsw's VFS files are
version 2), so ``PRAGMA mmap_size`` stays 0.

A COW file's base is named in its map relative to a root; the connection says which (the
URI parameter ``nixfs_cow_root``, set by ``connect``).
"""

import os
import threading
import urllib.parse

import apsw

from . import cowmap, shared
from .bases import base_opener
from .cowmap import CowError

VFS_NAME = "nixfs-cow"
ROOT_PARAMETER = "nixfs_cow_root"
_DEFAULT = ""  # the VFS inherited from: SQLite's default (unix)
_OPEN_FLAGS = apsw.SQLITE_OPEN_READWRITE | apsw.SQLITE_OPEN_CREATE

_registered = None
_register_lock = threading.Lock()
# COW databases (their paths) whose -wal this process has open: in WAL mode a reader takes
# no file lock per transaction, so those reads look for a newer map each time.
_wal_open: dict[str, int] = {}
_wal_lock = threading.Lock()


def _forget_in_child() -> None:
    global _wal_lock
    _wal_lock = threading.Lock()
    _wal_open.clear()


os.register_at_fork(after_in_child=_forget_in_child)  # as shared.py's registry


class CowVFSFile(apsw.VFSFile):
    """A COW main database file: the default VFS's file on the delta for locks and shared
    memory, the CowFile for the content."""

    def __init__(self, name, flags, path: str, root: str):
        super().__init__(_DEFAULT, name, flags)
        self._path = path
        try:
            readonly = bool(flags[1] & apsw.SQLITE_OPEN_READONLY
                            or flags[0] & apsw.SQLITE_OPEN_READONLY)
            self._cow = shared.acquire(path, base_opener(root), readonly=readonly)
        except BaseException:
            super().xClose()
            raise

    def xRead(self, amount: int, offset: int) -> bytes:
        if self._path in _wal_open:
            self._cow.refresh()
        return self._cow.pread(amount, offset)

    def xWrite(self, data, offset: int) -> None:
        self._cow.pwrite(data, offset)

    def xTruncate(self, newsize: int) -> None:
        self._cow.truncate(newsize)
        self._cow.publish()  # a WAL checkpoint with synchronous=off truncates, then nothing

    def xSync(self, flags: int) -> None:
        self._cow.fsync()

    def xFileSize(self) -> int:
        self._cow.refresh()
        return self._cow.size()

    def xLock(self, level: int) -> None:
        super().xLock(level)
        if level == apsw.SQLITE_LOCK_SHARED:
            self._cow.refresh()

    def xUnlock(self, level: int) -> None:
        self._cow.publish()
        super().xUnlock(level)

    def xFileControl(self, op: int, ptr: int) -> bool:
        if op == apsw.SQLITE_FCNTL_SIZE_HINT:
            return True  # the delta is sparse: nothing to reserve
        if op == apsw.SQLITE_FCNTL_CKPT_START:
            self._cow.refresh()
        elif op in (apsw.SQLITE_FCNTL_SYNC, apsw.SQLITE_FCNTL_CKPT_DONE):
            self._cow.publish()
        return super().xFileControl(op, ptr)

    def xClose(self) -> None:
        try:
            super().xClose()
        finally:
            shared.release(self._cow)


class WalFile(apsw.VFSFile):
    """The -wal of a COW database: a plain file, counted while open (``_wal_open``)."""

    def __init__(self, name, flags, main: str):
        super().__init__(_DEFAULT, name, flags)
        self._main = main
        with _wal_lock:
            _wal_open[main] = _wal_open.get(main, 0) + 1

    def xClose(self) -> None:
        try:
            super().xClose()
        finally:
            with _wal_lock:
                left = _wal_open.get(self._main, 1) - 1  # (none: opened before a fork)
                if left:
                    _wal_open[self._main] = left
                else:
                    _wal_open.pop(self._main, None)


class CowVFS(apsw.VFS):
    def __init__(self):
        super().__init__(VFS_NAME, _DEFAULT)

    def xFullPathname(self, name: str) -> str:
        # SQLite's unix VFS resolves symlinks here and says so (SQLITE_OK_SYMLINK), which
        # apsw takes for an error: a path through a symlink (fsck's /proc/self/fd/N/...,
        # an upper below a symlinked folder) would not open.  Resolve them alike.
        return os.path.realpath(name)

    def xOpen(self, name, flags):
        if isinstance(name, apsw.URIFilename) and flags[0] & apsw.SQLITE_OPEN_MAIN_DB:
            path = name.filename()
            if os.path.lexists(cowmap.map_path(path)):
                root = name.uri_parameter(ROOT_PARAMETER)
                if not root:
                    raise CowError(f"{path}: a COW database opened without {ROOT_PARAMETER}")
                return CowVFSFile(name, flags, path, root)
        elif flags[0] & apsw.SQLITE_OPEN_WAL:
            main = _filename(name).removesuffix("-wal")
            if os.path.lexists(cowmap.map_path(main)):
                return WalFile(name, flags, main)
        return apsw.VFSFile(_DEFAULT, name, flags)


def _filename(name) -> str:
    return name.filename() if isinstance(name, apsw.URIFilename) else name


def register() -> str:
    """Register the ``nixfs-cow`` VFS with SQLite (once per process); its name."""
    global _registered
    with _register_lock:
        if _registered is None:
            _registered = CowVFS()
    return VFS_NAME


def is_cow(path) -> bool:
    return os.path.lexists(cowmap.map_path(os.fsdecode(path)))


def uri(path, base_root, immutable: bool = False) -> str:
    """A URI that opens *path* through the VFS with its bases below *base_root*."""
    params = {ROOT_PARAMETER: os.fsdecode(os.path.abspath(base_root))}
    if immutable:
        params["immutable"] = "1"
    return ("file:" + urllib.parse.quote(os.fsdecode(os.path.abspath(path))) + "?"
            + urllib.parse.urlencode(params))


def connect(path, *, base_root=None, flags: int = _OPEN_FLAGS, immutable: bool = False,
            wrap_base=None, **kw) -> apsw.Connection:
    """An apsw connection to *path*: through ``nixfs-cow`` if it is a COW file (its bases
    below *base_root*), else a plain one.  *immutable*: the file never changes (a published
    generation's): no locks, no -shm, also on a read-only share.  *wrap_base*: applied to
    a COW file's opened base, what the file reads its base through while this process has
    it open (a readcache.ReadCache: for a base on a slow lower that is read all over).  A
    damaged COW file raises CowError here, with a message naming what is wrong."""
    path = os.fsdecode(path)
    if not is_cow(path):
        if immutable:
            return apsw.Connection("file:" + urllib.parse.quote(os.path.abspath(path))
                                   + "?immutable=1", flags=flags | apsw.SQLITE_OPEN_URI, **kw)
        return apsw.Connection(path, flags=flags, **kw)
    if base_root is None:
        raise CowError(f"{path}: a COW database needs the root of its bases")
    register()
    opener = base_opener(base_root)
    if wrap_base is not None:
        # The COW file opened here is the one the connection shares (shared.py): its base
        # is the wrapped one for as long as the process has the file open.
        plain = opener
        opener = lambda rel: wrap_base(plain(rel))  # noqa: E731
    readonly = bool(flags & apsw.SQLITE_OPEN_READONLY)
    holding = shared.acquire(path, opener, readonly=readonly)  # errors surface here, plainly
    try:
        return apsw.Connection(uri(path, base_root, immutable), vfs=VFS_NAME,
                               flags=flags | apsw.SQLITE_OPEN_URI, **kw)
    finally:
        shared.release(holding)
