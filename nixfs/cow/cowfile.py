"""A copy-on-write file: reads fall through to a read-only base, writes go to a delta.

A fresh upper starts from a published generation's files without copying them: its db,
lower index and listings are COW files over the generation's (a chain when the generation
is itself incremental).  This is the file primitive the overlay serves through FUSE and the
``nixfs-cow`` SQLite VFS (vfs.py) reads and writes; cowmap.py holds the map's format.

Reads: a page in the delta comes from the delta; else, below ``base_limit``, from the base
(bytes past ``base_limit`` are zero); else zeros; never past the logical size.  A write
into a page not yet in the delta first reads the rest of the page from below, so the delta
holds whole pages.  The map (in memory: a bytearray bitmap) is written whole at every
``fsync()`` and at ``close()``, after the delta is synced: what was fsync'ed survives a
crash, and unsynced writes may be lost (the old content shows, from base or delta).

A truncation is made durable like any other change: in memory until ``fsync()``, and the
delta is cut only after the new map is on disk (cutting first would let a crash show zeros
where the old map still promises delta pages).  So delta bytes at or past the logical size
are unspecified, never read, and zeroed when the file grows over them again.  The cut is
made at an ``fsync()`` whose map is the current one, never at ``close()`` (a closing
SQLite connection holds no lock, and another process may be growing the file).

Several processes may open one COW file when SQLite's locks order their writes (vfs.py):
``publish()`` writes the map without syncing, ``refresh()`` takes another's newer map.

Thread-safety: ``pread`` may run in any number of threads at once, also while one writes;
``pwrite``, ``truncate``, ``fsync``, ``refresh`` and ``close`` take one lock.
"""

import errno
import os
import threading

from . import cowmap
from .cowmap import BaseRef, CowError, CowMap

_RDONLY = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
_RDWR = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC
_CLEAN, _PUBLISHED, _DIRTY = 0, 1, 2  # the map on disk: durable, written unsynced, stale


class CowFile:
    """One COW file: its delta descriptor, its map in memory, its opened base (owned:
    closed with it)."""

    def __init__(self, fd: int, map_fd: int, m: CowMap, base, map_path, dir_fd, readonly):
        self._fd, self._map_fd, self._map, self._base = fd, map_fd, m, base
        self._map_id = cowmap.file_id(map_fd)  # which map file this one is (path_id)
        self._map_path, self._dir_fd, self._readonly = map_path, dir_fd, readonly
        self._ps = m.page_size
        self._shift = m.page_size.bit_length() - 1  # page sizes are powers of two
        self._base_pread = base.pread if base is not None else None
        self._lock = threading.Lock()
        self._data_dirty = False  # delta written since its last fdatasync
        self._map_state = _CLEAN
        self._cut = False  # the delta may extend past the size (a truncation, a crash)
        self._owns_dir_fd = False

    # -- opening -------------------------------------------------------------------------

    @classmethod
    def create(cls, delta_path, map_path, base, *, base_path: str | None = None,
               base_sha256: str | None = None, page_size: int = cowmap.DEFAULT_PAGE_SIZE,
               dir_fd: int | None = None, mode: int = 0o644) -> "CowFile":
        """A new COW file over the opened *base* (None: over nothing), whose map names it
        *base_path* (relative to the root its openers use) and *base_sha256*.  The delta
        must not exist; the map is written durably before this returns."""
        if base is not None and not base_path:
            raise ValueError("a COW file over a base needs the base's path")
        size = base.size() if base is not None else 0
        ref = BaseRef(base_path, size, base_sha256) if base is not None else None
        m = CowMap(page_size, size, size, ref, bytearray())
        cowmap.check(m, os.fsdecode(map_path))
        if cowmap.path_id(delta_path, dir_fd) is not None:
            raise FileExistsError(errno.EEXIST, "COW delta exists", os.fsdecode(delta_path))
        # The map first: a crash before the delta exists leaves only a hidden map (the next
        # create replaces it), never a delta without its map (an error to open).
        map_fd = cowmap.write(map_path, m, dir_fd, durable=True, keep_open=True)
        try:
            fd = os.open(delta_path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                         | os.O_CLOEXEC, mode, dir_fd=dir_fd)
            os.fsync(fd)
            cowmap.sync_dir(os.path.dirname(os.fsencode(delta_path)), dir_fd)
        except BaseException:
            os.close(map_fd)
            raise
        return cls(fd, map_fd, m, base, map_path, dir_fd, readonly=False)

    @classmethod
    def open(cls, delta_path, map_path, open_base, *, readonly: bool = False,
             dir_fd: int | None = None, owns_dir_fd: bool = False) -> "CowFile":
        """The COW file at *delta_path* with its map at *map_path* (both relative to
        *dir_fd* if given: it must stay open while the file is, and is closed with it if
        *owns_dir_fd*); its base is opened by ``open_base(rel_path)`` (a CowFile or
        anything with pread/size/close).  A missing or damaged map, a missing delta or a
        base of the wrong size is a CowError."""
        map_fd = cowmap.open_map(map_path, dir_fd)
        try:
            m = cowmap.read_fd(map_fd, os.fsdecode(map_path))
            try:
                fd = os.open(delta_path, _RDONLY if readonly else _RDWR, dir_fd=dir_fd)
            except FileNotFoundError:
                raise CowError(f"{os.fsdecode(delta_path)}: COW delta missing") from None
        except BaseException:
            os.close(map_fd)
            raise
        try:
            base = _open_checked_base(m, open_base, map_path)
        except BaseException:
            os.close(fd)
            os.close(map_fd)
            raise
        cow = cls(fd, map_fd, m, base, map_path, dir_fd, readonly)
        cow._cut = not readonly
        cow._owns_dir_fd = owns_dir_fd
        return cow

    # -- reading -------------------------------------------------------------------------

    @property
    def readonly(self) -> bool:
        return self._readonly

    @property
    def base_ref(self) -> BaseRef | None:
        """The base as the map names it (path, size, stated sha256): which generation."""
        return self._map.base

    @property
    def page_size(self) -> int:
        return self._ps

    def size(self) -> int:
        return self._map.size

    def blocks(self) -> int:
        """The delta's st_blocks: what this file occupies on the upper's disk."""
        return os.fstat(self._fd).st_blocks

    def pread(self, n: int, offset: int) -> bytes:
        # The FUSE layer calls this for every page read: the one-page cases are inline.
        m = self._map
        end = offset + n
        if end > m.size:
            end = m.size
        if offset >= end:
            return b""
        shift = self._shift
        first, last = offset >> shift, (end - 1) >> shift
        if first != last:
            return self._read_runs(m, offset, end, first, last)
        bits = m.bits
        if first >> 3 < len(bits) and bits[first >> 3] >> (first & 7) & 1:
            data = os.pread(self._fd, end - offset, offset)
        elif end <= m.base_limit:
            data = self._base_pread(end - offset, offset)
        else:
            return self._read_below(m, offset, end)
        return data if len(data) == end - offset else data + bytes(end - offset - len(data))

    def _read_runs(self, m: CowMap, offset: int, end: int, first: int, last: int) -> bytes:
        """A read over several pages: one pread per run of pages from the same place."""
        bits = m.bits
        covering = bits[first >> 3:(last >> 3) + 1]  # whole bytes: may name pages around
        if not covering.strip(b"\0"):
            return self._read_below(m, offset, end)  # none in the delta (a fresh COW)
        if (last >> 3) < len(bits) and not covering.strip(b"\xff"):
            return self._read_delta(offset, end)  # all in the delta
        parts, pos, page, ps = [], offset, first, self._ps
        while pos < end:
            present = cowmap.has_page(m.bits, page)
            nxt = page + 1
            while nxt <= last and cowmap.has_page(m.bits, nxt) == present:
                nxt += 1
            stop = min(nxt * ps, end)
            parts.append(self._read_delta(pos, stop) if present else self._read_below(m, pos, stop))
            pos, page = stop, nxt
        return b"".join(parts)

    def _read_delta(self, start: int, stop: int) -> bytes:
        data = os.pread(self._fd, stop - start, start)
        return data if len(data) == stop - start else data + bytes(stop - start - len(data))

    def _read_below(self, m: CowMap, start: int, stop: int) -> bytes:
        """[start, stop) as the base shows it: zero at and past base_limit."""
        limit = m.base_limit
        if start >= limit:
            return bytes(stop - start)
        data = self._base_pread(min(stop, limit) - start, start)
        return data if len(data) == stop - start else data + bytes(stop - start - len(data))

    # -- writing -------------------------------------------------------------------------

    def pwrite(self, data, offset: int) -> int:
        n = len(data)
        self._writable()
        if offset < 0:
            raise OSError(errno.EINVAL, "negative offset")
        if not n:
            return 0
        with self._lock:
            m, ps, end = self._map, self._ps, offset + n
            old = m.size
            if offset > old:
                self._zero_tail(m, old, offset)
            first, last = offset // ps, (end - 1) // ps
            parts, start = [data], offset
            if offset % ps and not cowmap.has_page(m.bits, first):
                start = first * ps
                parts.insert(0, self._read_below(m, start, offset))
            fill_end = min((last + 1) * ps, old)
            if end < fill_end and not cowmap.has_page(m.bits, last):
                parts.append(self._read_below(m, end, fill_end))
            self._write_parts(parts, start)
            changed = cowmap.mark_pages(m.bits, first, last)
            if end > old:
                m.size, changed = end, True
            if changed:
                self._map_state = _DIRTY
        return n

    def truncate(self, n: int) -> None:
        self._writable()
        if n < 0:
            raise OSError(errno.EINVAL, "negative size")
        with self._lock:
            m = self._map
            if n < m.size:
                m.size = n
                m.base_limit = min(m.base_limit, n)
                cowmap.clear_from(m.bits, -(-n // self._ps))
                self._cut = True
            elif n > m.size:
                self._zero_tail(m, m.size, n)
                m.size = n
            else:
                return
            self._map_state = _DIRTY

    def _zero_tail(self, m: CowMap, old: int, new_end: int) -> None:
        """Growing from *old*: the delta's stale bytes past it in a present page go."""
        page = old // self._ps
        if old % self._ps and cowmap.has_page(m.bits, page):
            self._write_parts([bytes(min((page + 1) * self._ps, new_end) - old)], old)

    def _write_parts(self, parts: list, offset: int) -> None:
        self._data_dirty = True
        done = os.pwritev(self._fd, parts, offset)
        total = sum(len(p) for p in parts)
        if done < total:  # a short write (a full disk reports ENOSPC on the retry)
            rest = memoryview(b"".join(parts))[done:]
            while rest:
                wrote = os.pwrite(self._fd, rest, offset + done)
                rest, done = rest[wrote:], done + wrote

    def _writable(self) -> None:
        if self._readonly:
            raise OSError(errno.EBADF, "COW file opened read-only")

    # -- making it last ------------------------------------------------------------------

    def fsync(self) -> None:
        """The delta synced, then the map written whole and durably: all written so far
        survives a crash."""
        if self._readonly:
            return
        with self._lock:
            self._sync()

    def _sync(self, cut: bool = True) -> None:
        if self._data_dirty:
            os.fdatasync(self._fd)
            self._data_dirty = False
        if self._map_state == _DIRTY:
            self._replace_map(durable=True)
        elif self._map_state == _PUBLISHED:
            # Made durable where it is, not written again: another process may have
            # replaced it since (building on it, under SQLite's locks), and a rename now
            # would put the older map back.
            os.fsync(self._map_fd)
            cowmap.sync_dir(os.path.dirname(os.fsencode(self._map_path)), self._dir_fd)
        self._map_state = _CLEAN
        if cut and self._cut and self._map_is_current():
            if os.fstat(self._fd).st_size > self._map.size:
                os.ftruncate(self._fd, self._map.size)
            self._cut = False

    def publish(self) -> None:
        """Write the map (not durably) if it changed: another process sees the changes
        (``refresh``); a power loss may still lose them.  For the VFS, at the moments
        SQLite hands a change to other connections without an fsync."""
        if self._readonly or self._map_state != _DIRTY:
            return
        with self._lock:
            if self._map_state == _DIRTY:
                self._replace_map(durable=False)
                self._map_state = _PUBLISHED

    def _replace_map(self, durable: bool) -> None:
        self._hold_map(cowmap.write(self._map_path, self._map, self._dir_fd, durable=durable,
                                    keep_open=True))

    def _hold_map(self, map_fd: int) -> None:
        os.close(self._map_fd)
        self._map_fd, self._map_id = map_fd, cowmap.file_id(map_fd)

    def _map_is_current(self) -> bool:
        return cowmap.path_id(self._map_path, self._dir_fd) == self._map_id

    def refresh(self) -> bool:
        """Take the map another process wrote since this one was read (True if there was
        one).  Only when this file has nothing unpublished: SQLite's locks guarantee it."""
        if self._map_is_current():
            return False
        with self._lock:
            if self._map_state == _DIRTY:
                raise CowError(f"{os.fsdecode(self._map_path)}: COW map replaced by another "
                               "process while this one had unwritten changes")
            map_fd = cowmap.open_map(self._map_path, self._dir_fd)
            try:
                m = cowmap.read_fd(map_fd, os.fsdecode(self._map_path))
                if m.base != self._map.base or m.page_size != self._ps:
                    raise CowError(f"{os.fsdecode(self._map_path)}: COW map now names another base")
            except BaseException:
                os.close(map_fd)
                raise
            self._hold_map(map_fd)
            self._map = m
            self._cut = not self._readonly
        return True

    def close(self) -> None:
        """fsync (if anything changed) and close the delta, the map and the base."""
        with self._lock:
            if self._fd < 0:
                return
            try:
                if not self._readonly and (self._data_dirty or self._map_state != _CLEAN):
                    self._sync(cut=False)  # unlocked: another process may be growing it
            finally:
                os.close(self._fd)
                os.close(self._map_fd)
                self._fd = -1
                if self._owns_dir_fd:
                    os.close(self._dir_fd)
                if self._base is not None:
                    self._base.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def remove(delta_path, map_path, dir_fd: int | None = None) -> None:
    """Unlink a COW file: the delta first, so a crash in between leaves only a map (hidden,
    and replaced by the next ``create``), never a delta that reads as damaged."""
    os.unlink(delta_path, dir_fd=dir_fd)
    try:
        os.unlink(map_path, dir_fd=dir_fd)
    except FileNotFoundError:
        pass


def _open_checked_base(m: CowMap, open_base, map_path):
    if m.base is None:
        return None
    base = open_base(m.base.path)
    if base.size() != m.base.size:
        size = base.size()
        base.close()
        raise CowError(f"{os.fsdecode(map_path)}: COW base {m.base.path} is {size} bytes, "
                       f"the map expects {m.base.size} (the base changed)")
    return base
