"""Listings of lower directories that never change, kept in memory and across mounts.

A valid Nix store path never changes, so what its directories hold (names,
attributes, symlink targets, and so which names do *not* exist) can be kept as
long as the path stays valid.  The policy says which lower paths are immutable
and gives each a key that changes when the path's validity does (the store
path's name and id in the lower database): a key never meets stale data.

A listing is one directory's entries with their stat and, for symlinks, the
target; ``.`` is the directory itself.  A non-directory store path is a listing
of just ``.``.  Listings are fetched whole (one worker-thread call), so every
later lookup in the directory, found or not, costs no lower call.

Memory is bounded (LRU by number of entries); the persistent copy lives in one
SQLite file in nixfs' state folder and is read and written directly (never
through FUSE).  A damaged record is dropped and fetched again.
"""

import logging
import os
import struct
from collections import OrderedDict
from typing import NamedTuple

import cachetools

from ..cow import vfs as cow_vfs
from ..cow.readcache import ReadCache

log = logging.getLogger(__name__)


class LStat(NamedTuple):
    """The fields of os.stat_result that nixfs uses, cheap to keep and to store."""
    st_mode: int
    st_ino: int
    st_dev: int
    st_nlink: int
    st_uid: int
    st_gid: int
    st_size: int
    st_atime_ns: int
    st_mtime_ns: int
    st_ctime_ns: int
    st_blksize: int
    st_blocks: int
    st_rdev: int


_HEAD = struct.Struct("<HI")  # name length, target length (0xFFFFFFFF: none)
_STAT = struct.Struct("<IQQQIIqqqqqqQ")  # LStat's fields in order
_NONE = 0xFFFFFFFF


def pack_stat(st) -> bytes:
    """A stat (os.stat_result or LStat) as a listing keeps it."""
    return _STAT.pack(st.st_mode, st.st_ino, st.st_dev, st.st_nlink, st.st_uid, st.st_gid,
                      st.st_size, st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns,
                      st.st_blksize, st.st_blocks, st.st_rdev)


class Listing(NamedTuple):
    """One directory's entries.  Stats are kept packed (about a quarter of the
    memory of stat tuples: a million-entry walk must stay in a bounded RSS) and
    unpacked when asked for."""
    entries: dict[bytes, bytes]     # name -> packed stat; b"." is the directory (or file) itself
    targets: dict[bytes, bytes]     # name -> symlink target

    def stat(self, name: bytes) -> LStat | None:
        packed = self.entries.get(name)
        return None if packed is None else LStat._make(_STAT.unpack(packed))

    def stats(self):
        """(name, stat) for every entry, ``.`` included."""
        for name, packed in self.entries.items():
            yield name, LStat._make(_STAT.unpack(packed))

    def __len__(self) -> int:
        return len(self.entries)


def encode(listing: Listing) -> bytes:
    out = bytearray()
    for name, packed in listing.entries.items():
        target = listing.targets.get(name)
        out += _HEAD.pack(len(name), _NONE if target is None else len(target))
        out += packed
        out += name
        if target is not None:
            out += target
    return bytes(out)


def decode(data: bytes) -> Listing:
    entries, targets = {}, {}
    pos = 0
    while pos < len(data):
        nlen, tlen = _HEAD.unpack_from(data, pos)
        pos += _HEAD.size
        st = data[pos:pos + _STAT.size]
        pos += _STAT.size
        name = data[pos:pos + nlen]
        pos += nlen
        if len(name) != nlen:
            raise ValueError("truncated listing")
        if tlen != _NONE:
            targets[name] = data[pos:pos + tlen]
            pos += tlen
        entries[name] = st
    return Listing(entries, targets)


_XHEAD = struct.Struct("<HH")  # entry name length, xattr count
_XATTR = struct.Struct("<HI")  # xattr name length, value length


def encode_xattrs(xmap: dict[bytes, dict[str, bytes]]) -> bytes:
    """A directory's entries' xattrs (only entries that have some)."""
    out = bytearray()
    for name, attrs in xmap.items():
        out += _XHEAD.pack(len(name), len(attrs)) + name
        for attr, value in attrs.items():
            raw = os.fsencode(attr)
            out += _XATTR.pack(len(raw), len(value)) + raw + value
    return bytes(out)


def decode_xattrs(data: bytes) -> dict[bytes, dict[str, bytes]]:
    xmap, pos = {}, 0
    while pos < len(data):
        nlen, count = _XHEAD.unpack_from(data, pos)
        pos += _XHEAD.size
        name, pos = data[pos:pos + nlen], pos + nlen
        attrs = {}
        for _ in range(count):
            alen, vlen = _XATTR.unpack_from(data, pos)
            pos += _XATTR.size
            attr, pos = os.fsdecode(data[pos:pos + alen]), pos + alen
            attrs[attr], pos = data[pos:pos + vlen], pos + vlen
        if pos > len(data):
            raise ValueError("truncated xattrs")
        xmap[name] = attrs
    return xmap


class ListingStore:
    """The persistent half: ``listings(key, data)`` in a SQLite file."""

    FILE = "listings.sqlite"
    # Of a published catalog (the base of a copy-on-write file at *path*, on the lower),
    # this much is kept in memory, read in large chunks: most listings are larger than
    # what SQLite keeps of a record in its page, so each would cost reads of its own past
    # SQLite's page cache, each a round trip to an NFS lower or a seek on a cold disk.
    BASE_CACHE = 16 * 1024 * 1024

    def __init__(self, path: str, *, cow_root: str | None = None):
        """*cow_root*: where the base of a copy-on-write file at *path* is."""
        self.path = path
        self.base: ReadCache | None = None  # the catalog's content as read (a COW file's base)
        self.conn = cow_vfs.connect(path, base_root=cow_root, wrap_base=self._cached)
        self.conn.setbusytimeout(10_000)
        self.conn.execute("pragma journal_mode=wal").fetchall()
        self.conn.execute("pragma synchronous=off").fetchall()  # a lost write is a refetch
        self.conn.execute("create table if not exists listings "
                          "(key blob primary key, data blob not null) without rowid")
        self.pending: dict[bytes, bytes] = {}
        # Keys just found missing: a cold walk asks for each one twice or more (a
        # read-ahead checks before it fetches, a listing of the store for every path).
        self._absent: cachetools.LRUCache = cachetools.LRUCache(8192)

    def _cached(self, base) -> ReadCache:
        self.base = ReadCache(base, limit=self.BASE_CACHE)
        return self.base

    def base_reads(self) -> int:
        """Chunks read from the catalog below (reads of the lower, when it is a generation's)."""
        return self.base.base_reads if self.base is not None else 0

    def get(self, key: bytes) -> Listing | None:
        return self._get(key, decode)

    def put(self, key: bytes, listing: Listing) -> None:
        self._put(key, encode(listing))

    # A directory's entries' xattrs live beside its listing, under its key plus a suffix
    # (listing keys hold exactly two NULs, so the two never meet).
    def get_xattrs(self, key: bytes) -> dict[bytes, dict[str, bytes]] | None:
        return self._get(key + b"\0xattrs", decode_xattrs)

    def put_xattrs(self, key: bytes, xmap: dict[bytes, dict[str, bytes]]) -> None:
        self._put(key + b"\0xattrs", encode_xattrs(xmap))

    def _get(self, key: bytes, decoder):
        data = self.pending.get(key)
        if data is None:
            if key in self._absent:
                return None
            row = self.conn.execute("select data from listings where key = ?", (key,)).fetchone()
            if row is None:
                self._absent[key] = True
                return None
            data = row[0]
        return self._decoded(key, data, decoder)

    def _decoded(self, key: bytes, data: bytes, decoder):
        """*data* decoded, or None (and the record dropped, to be fetched again) if damaged."""
        try:
            return decoder(data)
        except (ValueError, struct.error, UnicodeError):
            log.warning("a damaged cached listing was dropped")
            self.conn.execute("delete from listings where key = ?", (key,))
            return None

    def get_many(self, keys: list[bytes]) -> dict[bytes, Listing]:
        """The kept listings of those of *keys* that have one (one query for all)."""
        found, ask = {}, []
        for key in keys:
            if key in self.pending:
                found[key] = self.pending[key]
            elif key not in self._absent:
                ask.append(key)
        if ask:
            marks = ",".join("?" * len(ask))
            found.update(self.conn.execute(
                f"select key, data from listings where key in ({marks})", ask))
        out = {}
        for key, data in found.items():
            listing = self._decoded(key, data, decode)
            if listing is not None:
                out[key] = listing
        return out

    def _put(self, key: bytes, data: bytes) -> None:
        self._absent.pop(key, None)
        self.pending[key] = data
        if len(self.pending) >= 256:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            with self.conn:
                self.conn.executemany("insert or replace into listings values (?, ?)",
                                      self.pending.items())
            self.pending.clear()

    def drop_prefix(self, prefix: bytes) -> None:
        self.flush()
        self.conn.execute("delete from listings where key >= ? and key < ?",
                          (prefix, prefix + b"\xff"))

    def close(self) -> None:
        self.flush()
        self.conn.close()

    def size_bytes(self) -> int:
        return sum(os.stat(self.path + s).st_size for s in ("", "-wal")
                   if os.path.exists(self.path + s))


class DirCache:
    """Immutable lower listings by lower path, bounded in memory, backed by a store."""

    def __init__(self, store: ListingStore | None = None, max_entries: int = 100_000):
        self.store = store
        self.max_entries = max_entries
        self._lru: OrderedDict[bytes, tuple[bytes, Listing]] = OrderedDict()  # path -> (key, l)
        self._size = 0
        # path -> (key, {entry name: xattrs}) for directories whose entries' xattrs were read
        self._xattrs: OrderedDict[bytes, tuple[bytes, dict]] = OrderedDict()
        self.max_xattr_dirs = 20_000
        self.hits = 0
        self.misses = 0
        self.loads = 0  # found in the persistent store

    def stats(self) -> dict:
        """Hits, misses and size, for ``nixfs status``."""
        asked = self.hits + self.loads + self.misses
        return {"hits": self.hits, "misses": self.misses, "loaded_from_disk": self.loads,
                "listings": len(self),
                "bytes_on_disk": self.store.size_bytes() if self.store else 0,
                # Chunks of a published generation's catalog read (from the lower).
                "catalog_reads": self.store.base_reads() if self.store else 0,
                # Answered without a lower call (memory or the on-disk copy), of every
                # cacheable listing asked.
                "hit_ratio": round((self.hits + self.loads) / asked, 3) if asked else None}

    def get(self, path: bytes, key: bytes) -> Listing | None:
        item = self._lru.get(path)
        if item is not None and item[0] == key:
            self._lru.move_to_end(path)
            self.hits += 1
            return item[1]
        listing = self.store.get(key) if self.store is not None else None
        if listing is None:
            self.misses += 1
            return None
        self.loads += 1
        self._remember(path, key, listing)
        return listing

    def get_many(self, paths: list[bytes], keys: list[bytes | None]) -> list[Listing | None]:
        """``get`` of each path with its key (None: not kept), the on-disk copies in
        one query: a store listing asks this of every store path."""
        found: list[Listing | None] = [None] * len(paths)
        load = []
        for i, (path, key) in enumerate(zip(paths, keys)):
            item = self._lru.get(path) if key is not None else None
            if item is not None and item[0] == key:
                self._lru.move_to_end(path)
                self.hits += 1
                found[i] = item[1]
            elif key is not None:
                load.append(i)
        stored = self.store.get_many([keys[i] for i in load]) if self.store and load else {}
        for i in load:
            listing = stored.get(keys[i])
            if listing is None:
                self.misses += 1
            else:
                self.loads += 1
                self._remember(paths[i], keys[i], listing)
                found[i] = listing
        return found

    def put(self, path: bytes, key: bytes, listing: Listing) -> None:
        self._remember(path, key, listing)
        if self.store is not None:
            self.store.put(key, listing)

    def _remember(self, path: bytes, key: bytes, listing: Listing) -> None:
        old = self._lru.pop(path, None)
        if old is not None:
            self._size -= len(old[1])
        self._lru[path] = (key, listing)
        self._size += len(listing)
        while self._size > self.max_entries and len(self._lru) > 1:
            _, (_, dropped) = self._lru.popitem(last=False)
            self._size -= len(dropped)

    def get_xattrs(self, path: bytes, key: bytes) -> dict[bytes, dict[str, bytes]] | None:
        """The xattrs of the entries of directory *path*, if read before."""
        item = self._xattrs.get(path)
        if item is not None and item[0] == key:
            self._xattrs.move_to_end(path)
            return item[1]
        xmap = self.store.get_xattrs(key) if self.store is not None else None
        if xmap is not None:
            self._remember_xattrs(path, key, xmap)
        return xmap

    def put_xattrs(self, path: bytes, key: bytes, xmap: dict[bytes, dict[str, bytes]]) -> None:
        self._remember_xattrs(path, key, xmap)
        if self.store is not None:
            self.store.put_xattrs(key, xmap)

    def _remember_xattrs(self, path: bytes, key: bytes, xmap: dict) -> None:
        self._xattrs[path] = (key, xmap)
        self._xattrs.move_to_end(path)
        while len(self._xattrs) > self.max_xattr_dirs:
            self._xattrs.popitem(last=False)

    def forget(self, path: bytes) -> None:
        """Drop *path* and everything below it from memory (the persistent copies
        are keyed by validity and simply never asked for again)."""
        prefix = path + b"/"
        for p in [p for p in self._lru if p == path or p.startswith(prefix)]:
            self._size -= len(self._lru.pop(p)[1])
        for p in [p for p in self._xattrs if p == path or p.startswith(prefix)]:
            del self._xattrs[p]

    def __len__(self) -> int:
        return len(self._lru)
