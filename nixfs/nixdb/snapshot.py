"""A lock-free, consistent view of a SQLite database that someone else writes.

The lower store's database may sit on NFS, where SQLite's locks are unreliable
and a stale lock can hang every reader, or on a read-only mount where no
``-shm`` can be made; its writer (nix-daemon) keeps recent transactions in
``db.sqlite-wal`` until a checkpoint.  So nixfs reads it without any lock:

- it parses the WAL itself (``wal``: header, salts, checksums) and takes every
  frame up to the last committed transaction;
- an apsw VFS presents "main file overlaid with those frames" to SQLite as an
  immutable database in rollback mode;
- after reading, ``validate()`` checks that no checkpoint or WAL restart could
  have torn what was read: the main file is unchanged, or the WAL is the same
  generation and no page read from the main file holds a version that a frame
  appended since carries (a checkpoint may copy such frames into the main file
  at any time, also before the page was read).  A failed validation means: read
  again.
"""

import itertools
import os
import struct
import threading
import time
import zlib

import apsw

from .wal import WalIndex

_VFS_NAME = "nixfs-snapshot"


class SnapshotError(Exception):
    """The database could not be read consistently."""


class Snapshot:
    """One consistent read of the database at *path* (and its ``-wal``)."""

    _counter = itertools.count()
    _registry: dict[str, "Snapshot"] = {}
    _registry_lock = threading.Lock()

    def __init__(self, path: str):
        self.path = path
        self.db_fd = -1
        self.wal_fd = -1
        self.wal = WalIndex()
        self.main_pages_read: dict[int, int] = {}  # page -> crc32 of what was read
        self._clone = None  # a clone's path: its pages stand for what was read
        self.reads = 0

    def __enter__(self) -> "Snapshot":
        self.open()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def open(self) -> None:
        self.opened_ns = time.time_ns()  # before any stat: what ``dbstate`` judges by
        # A fresh open() makes an NFS client revalidate what it cached (close-to-open).
        self.db_fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        self.main_st = os.fstat(self.db_fd)
        try:
            self.wal_fd = os.open(self.path + "-wal", os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            self.wal_fd = -1
        else:
            self.wal = WalIndex.read(self.wal_fd)
        self.header = header = os.pread(self.db_fd, 100, 0)
        if len(header) >= 100 and header[:16] == b"SQLite format 3\0":
            size = struct.unpack(">H", header[16:18])[0]
            self.page_size = 65536 if size == 1 else size
        elif self.wal.page_size:
            self.page_size = self.wal.page_size
        else:
            raise SnapshotError(f"{self.path} is not a SQLite database")
        if self.wal.page_size and self.wal.page_size != self.page_size:
            self.wal = WalIndex()  # a WAL from another life of the file: unusable

    def close(self) -> None:
        for fd in (self.db_fd, self.wal_fd):
            if fd >= 0:
                os.close(fd)
        self.db_fd = self.wal_fd = -1
        with self._registry_lock:
            for key, snap in list(self._registry.items()):
                if snap is self:
                    del self._registry[key]

    # ------------------------------------------------------------------ the view

    def size(self) -> int:
        if self.wal.db_pages:
            return self.wal.db_pages * self.page_size
        return self.main_st.st_size

    def read(self, amount: int, offset: int) -> bytes:
        self.reads += 1
        out = bytearray()
        end = min(offset + amount, self.size())
        pos = offset
        while pos < end:
            pgno = pos // self.page_size + 1
            in_page = pos % self.page_size
            n = min(self.page_size - in_page, end - pos)
            frame = self.wal.pages.get(pgno)
            if frame is not None:
                chunk = os.pread(self.wal_fd, n, frame + in_page)
            else:
                chunk = os.pread(self.db_fd, n, pos)
                if pgno not in self.main_pages_read:
                    page = chunk if n == self.page_size else self._main_page(pgno)
                    self.main_pages_read[pgno] = zlib.crc32(page)
            out += chunk
            pos += n
        if offset <= 19 and offset + len(out) > 18:
            # Present the file in rollback mode: the WAL is already folded in.
            for i in (18, 19):
                if offset <= i < offset + len(out) and out[i - offset] == 2:
                    out[i - offset] = 1
        return bytes(out)

    def _main_page(self, pgno: int) -> bytes:
        return os.pread(self.db_fd, self.page_size, (pgno - 1) * self.page_size)

    def _not_from(self, appended: dict[int, list[int]], wal_fd: int) -> bool:
        """Whether no page read from the main file is a version one of these appended
        frames carries (which a checkpoint could have put there)."""
        clone = os.open(self._clone, os.O_RDONLY | os.O_CLOEXEC) if self._clone else -1
        try:
            for pgno, offsets in appended.items():
                if pgno not in self.main_pages_read:
                    continue
                if clone >= 0:
                    seen = zlib.crc32(os.pread(clone, self.page_size, (pgno - 1) * self.page_size))
                else:
                    seen = self.main_pages_read[pgno]
                for off in offsets:
                    if zlib.crc32(os.pread(wal_fd, self.page_size, off)) == seen:
                        return False
            return True
        finally:
            if clone >= 0:
                os.close(clone)

    def validate(self) -> bool:
        """Whether everything read since open() belongs to one committed state."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return False
        main_same = (st.st_ino, st.st_size, st.st_mtime_ns) == (
            self.main_st.st_ino, self.main_st.st_size, self.main_st.st_mtime_ns)
        try:
            fd = os.open(self.path + "-wal", os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return main_same
        try:
            if self.wal_fd < 0 or self.wal.generation is None:
                # There was no usable WAL: any committed frame now may have been checkpointed.
                return main_same and WalIndex.read(fd).db_pages == 0
            appended = self.wal.appended_pages(fd)
            if appended is None:
                return False  # the WAL restarted: the main file may hold anything newer
            return self._not_from(appended, fd)
        finally:
            os.close(fd)

    # ------------------------------------------------------------------ SQLite access

    def connect(self) -> apsw.Connection:
        """A read-only connection on this snapshot (no locks, no journal)."""
        _ensure_vfs()
        key = f"/{_VFS_NAME}/{next(self._counter)}"
        with self._registry_lock:
            self._registry[key] = self
        return apsw.Connection(f"file:{key}?immutable=1",
                               flags=apsw.SQLITE_OPEN_READONLY | apsw.SQLITE_OPEN_URI,
                               vfs=_VFS_NAME)

    def clone_to(self, dest: str, *, sync: bool = True) -> None:
        """Write this snapshot as a database file at *dest* (WAL mode, as the source is)."""
        size = self.size()
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            clone_range(self.db_fd, fd, min(size, self.main_st.st_size))
            self._clone = dest
            self.main_pages_read.update(dict.fromkeys(
                (p for p in range(1, self.main_st.st_size // self.page_size + 1)
                 if p not in self.wal.pages), 0))
            for pgno, frame in self.wal.pages.items():
                if pgno * self.page_size <= size:
                    os.pwrite(fd, os.pread(self.wal_fd, self.page_size, frame),
                              (pgno - 1) * self.page_size)
            os.ftruncate(fd, size)
            if sync:
                os.fsync(fd)
        finally:
            os.close(fd)


def clone_range(src: int, dst: int, size: int) -> None:
    """Copy *size* bytes: a reflink where the file system offers one, else in-kernel."""
    try:
        import fcntl
        FICLONE = 0x40049409
        fcntl.ioctl(dst, FICLONE, src)
        return
    except OSError:
        pass
    off = 0
    while off < size:
        try:
            n = os.copy_file_range(src, dst, min(size - off, 1 << 30), off, off)
        except OSError:
            n = os.pwrite(dst, os.pread(src, min(size - off, 1 << 20), off), off)
        if n == 0:
            break
        off += n


class _SnapshotFile:
    def __init__(self, snap: Snapshot):
        self.snap = snap

    def xRead(self, amount, offset):
        data = self.snap.read(amount, offset)
        if len(data) < amount:
            raise apsw.IOError("short read")  # SQLite zero-fills on SQLITE_IOERR_SHORT_READ
        return data

    def xFileSize(self):
        return self.snap.size()

    def xWrite(self, data, offset):
        raise apsw.ReadOnlyError("snapshot")

    def xTruncate(self, size):
        raise apsw.ReadOnlyError("snapshot")

    def xSync(self, flags):
        pass

    def xLock(self, level):
        pass

    def xUnlock(self, level):
        pass

    def xCheckReservedLock(self):
        return False

    def xFileControl(self, op, ptr):
        return False

    def xSectorSize(self):
        return 4096

    def xDeviceCharacteristics(self):
        return apsw.SQLITE_IOCAP_IMMUTABLE

    def xClose(self):
        pass


class _SnapshotVFS(apsw.VFS):
    def __init__(self):
        super().__init__(_VFS_NAME, base="")

    def xOpen(self, name, flags):
        key = name.filename() if isinstance(name, apsw.URIFilename) else name
        snap = Snapshot._registry.get(key)
        if snap is None:
            raise apsw.CantOpenError(f"no snapshot for {key}")
        flags[1] = apsw.SQLITE_OPEN_READONLY
        return _SnapshotFile(snap)

    def xAccess(self, name, flags):
        return False

    def xFullPathname(self, name):
        return name

    def xDelete(self, name, syncdir):
        raise apsw.ReadOnlyError("snapshot")


_vfs = None
_vfs_lock = threading.Lock()


def _ensure_vfs() -> None:
    global _vfs
    with _vfs_lock:
        if _vfs is None:
            _vfs = _SnapshotVFS()


def read_consistent(path: str, fn, *, attempts: int = 20):
    """Run ``fn(connection, snapshot)`` on consistent snapshots of *path* until one
    validates; SnapshotError after *attempts* tries (with growing pauses between them,
    so a busy writer's checkpoint can pass)."""
    for attempt in range(attempts):
        if attempt:
            time.sleep(min(0.2, 0.002 * 2 ** attempt))
        with Snapshot(path) as snap:
            conn = snap.connect()
            try:
                result = fn(conn, snap)
            except apsw.Error as e:
                # A torn read looks like corruption; it is one only if nothing changed.
                if snap.validate():
                    raise SnapshotError(f"{path}: {e}") from e
                continue
            finally:
                conn.close()
            if snap.validate():
                return result
    raise SnapshotError(f"{path} kept changing while being read ({attempts} tries)")
