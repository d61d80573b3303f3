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
        self._map_path, self._dir_fd, self._readonly = map_path, dir_fd, readonly
        self._ps = m.page_size
        self._lock = threading.Lock()
        self._data_dirty = False  # delta written since its last fdatasync
        self._map_state = _CLEAN
        self._cut = False  # the delta may extend past the size (a truncation, a crash)

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
        fd = os.open(delta_path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                     | os.O_CLOEXEC, mode, dir_fd=dir_fd)
        try:
            map_fd = cowmap.write(map_path, m, dir_fd, durable=True, keep_open=True)
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, map_fd, m, base, map_path, dir_fd, readonly=False)

    @classmethod
    def open(cls, delta_path, map_path, open_base, *, readonly: bool = False,
             dir_fd: int | None = None) -> "CowFile":
        """The COW file at *delta_path* with its map at *map_path*; its base is opened by
        ``open_base(rel_path)`` (a CowFile or anything with pread/size/close).  A missing
        or damaged map, a missing delta or a base of the wrong size is a CowError."""
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
        return cow

    # -- reading -------------------------------------------------------------------------

    @property
    def readonly(self) -> bool:
        return self._readonly

    def size(self) -> int:
        return self._map.size

    def blocks(self) -> int:
        """The delta's st_blocks: what this file occupies on the upper's disk."""
        return os.fstat(self._fd).st_blocks

    def pread(self, n: int, offset: int) -> bytes:
        m = self._map
        end = min(offset + n, m.size)
        if offset >= end:
            return b""
        ps = self._ps
        first, last = offset // ps, (end - 1) // ps
        if first != last:
            return self._read_runs(m, offset, end, first, last)
        bits = m.bits
        if first >> 3 < len(bits) and bits[first >> 3] >> (first & 7) & 1:
            return self._read_delta(offset, end)
        return self._read_below(m, offset, end)

    def _read_runs(self, m: CowMap, offset: int, end: int, first: int, last: int) -> bytes:
        """A read over several pages: one pread per run of pages from the same place."""
        parts, pos, page, ps = [], offset, first, self._ps
        while pos < end:
            present = _has(m.bits, page)
            nxt = page + 1
            while nxt <= last and _has(m.bits, nxt) == present:
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
        data = self._base.pread(min(stop, limit) - start, start)
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
            if offset % ps and not _has(m.bits, first):
                start = first * ps
                parts.insert(0, self._read_below(m, start, offset))
            fill_end = min((last + 1) * ps, old)
            if end < fill_end and not _has(m.bits, last):
                parts.append(self._read_below(m, end, fill_end))
            self._write_parts(parts, start)
            changed = _mark(m.bits, first, last)
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
                _clear_from(m.bits, -(-n // self._ps))
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
        if old % self._ps and _has(m.bits, page):
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
        if cut and self._cut and cowmap.is_current(self._map_path, self._map_fd, self._dir_fd):
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
        new_fd = cowmap.write(self._map_path, self._map, self._dir_fd, durable=durable,
                              keep_open=True)
        os.close(self._map_fd)
        self._map_fd = new_fd

    def refresh(self) -> bool:
        """Take the map another process wrote since this one was read (True if there was
        one).  Only when this file has nothing unpublished: SQLite's locks guarantee it."""
        if cowmap.is_current(self._map_path, self._map_fd, self._dir_fd):
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
            os.close(self._map_fd)
            self._map_fd, self._map = map_fd, m
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
                if self._base is not None:
                    self._base.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


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


def _has(bits: bytearray, page: int) -> bool:
    i = page >> 3
    return i < len(bits) and bool(bits[i] >> (page & 7) & 1)


def _mark(bits: bytearray, first: int, last: int) -> bool:
    """Set pages first..last; whether any was not set."""
    need = (last >> 3) + 1
    if len(bits) < need:
        bits.extend(bytes(need - len(bits)))
    changed = False
    for page in range(first, last + 1):
        i, bit = page >> 3, 1 << (page & 7)
        if not bits[i] & bit:
            bits[i] |= bit
            changed = True
    return changed


def _clear_from(bits: bytearray, page: int) -> None:
    """Clear every page from *page* on (the bitmap shrinks to what is left)."""
    whole, spare = divmod(page, 8)
    keep = whole + (spare > 0)
    del bits[keep:]
    if spare and len(bits) == keep:
        bits[-1] &= (1 << spare) - 1
