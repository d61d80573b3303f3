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
import threading
from collections import OrderedDict

import cachetools
import trio

from ..cow import vfs as cow_vfs
from ..cow.readcache import ReadCache
from .listingformat import (LStat, Listing, decode, decode_xattrs, encode,  # noqa: F401
                            encode_xattrs, pack_stat)

log = logging.getLogger(__name__)


class ListingStore:
    """The persistent half: ``listings(key, data)`` in a SQLite file.

    What is in memory (listings not yet written, keys just found missing) is answered
    inline; a query of the file is ``query``, which callers may run in a worker thread
    (``on_lower``: the file is a published catalog's copy, read from the lower).  The
    connection is used by one thread at a time (``lock``)."""

    FILE = "listings.sqlite"
    # Of a published catalog (the base of a copy-on-write file at *path*, on the lower),
    # this much is kept in memory, read in large chunks: most listings are larger than
    # what SQLite keeps of a record in its page, so each would cost reads of its own past
    # SQLite's page cache, each a round trip to an NFS lower or a seek on a cold disk.
    BASE_CACHE = 16 * 1024 * 1024
    FLUSH_AT = 256  # listings kept in memory before they are written

    def __init__(self, path: str, *, cow_root: str | None = None):
        """*cow_root*: where the base of a copy-on-write file at *path* is."""
        self.path = path
        self.base: ReadCache | None = None  # the catalog's content as read (a COW file's base)
        self.lock = threading.Lock()
        self.conn = cow_vfs.connect(path, base_root=cow_root, wrap_base=self._cached)
        self.conn.setbusytimeout(10_000)
        self.conn.execute("pragma journal_mode=wal").fetchall()
        self.conn.execute("pragma synchronous=off").fetchall()  # a lost write is a refetch
        self.conn.execute("create table if not exists listings "
                          "(key blob primary key, data blob not null) without rowid")
        self.pending: dict[bytes, bytes] = {}
        self._deferred = False  # a user writes batches itself (take_batch, in a worker)
        self._writing: dict[bytes, bytes] = {}  # taken from pending, being written
        self._damaged: set[bytes] = set()  # keys whose record is to be deleted
        # Keys just found missing: a cold walk asks for each one twice or more (a
        # read-ahead checks before it fetches, a listing of the store for every path).
        self._absent: cachetools.LRUCache = cachetools.LRUCache(8192)

    def _cached(self, base) -> ReadCache:
        self.base = ReadCache(base, limit=self.BASE_CACHE)
        return self.base

    @property
    def on_lower(self) -> bool:
        """Whether a query may read the lower (the file's base is a generation's catalog)."""
        return self.base is not None

    def base_reads(self) -> int:
        """Chunks read from the catalog below (reads of the lower, when it is a generation's)."""
        return self.base.base_reads if self.base is not None else 0

    def in_memory(self, keys: list[bytes]) -> tuple[dict[bytes, bytes], list[bytes]]:
        """Of *keys*: the records known without a query, and the keys to query."""
        found, ask = {}, []
        for key in keys:
            data = self.pending.get(key) or self._writing.get(key)
            if data is not None:
                found[key] = data
            elif key not in self._absent:
                ask.append(key)
        return found, ask

    def query(self, keys: list[bytes]) -> dict[bytes, bytes]:
        """The stored records of *keys* (blocking: may read the lower)."""
        marks = ",".join("?" * len(keys))
        with self.lock:
            return dict(self.conn.execute(
                f"select key, data from listings where key in ({marks})", keys))

    def queried(self, asked: list[bytes], found: dict[bytes, bytes]) -> None:
        """Note which of the *asked* keys a query did not find."""
        for key in asked:
            if key not in found:
                self._absent[key] = True

    def decoded(self, key: bytes, data: bytes, decoder):
        """*data* decoded, or None (and the record dropped, to be fetched again) if damaged."""
        try:
            return decoder(data)
        except (ValueError, struct.error, UnicodeError):
            log.warning("a damaged cached listing was dropped")
            self._damaged.add(key)
            return None

    def get(self, key: bytes) -> Listing | None:
        return self._get(key, decode)

    def put(self, key: bytes, listing: Listing) -> None:
        self._put(key, encode(listing))

    # A directory's entries' xattrs live beside its listing, under its key plus a suffix
    # (listing keys hold exactly two NULs, so the two never meet).
    XATTRS = b"\0xattrs"

    def get_xattrs(self, key: bytes) -> dict[bytes, dict[str, bytes]] | None:
        return self._get(key + self.XATTRS, decode_xattrs)

    def put_xattrs(self, key: bytes, xmap: dict[bytes, dict[str, bytes]]) -> None:
        self._put(key + self.XATTRS, encode_xattrs(xmap))

    def _get(self, key: bytes, decoder):
        """A record read inline (a caller on no event loop, or a store not on the lower)."""
        found, ask = self.in_memory([key])
        if ask:
            found = self.query(ask)
            self.queried(ask, found)
        data = found.get(key)
        return None if data is None else self.decoded(key, data, decoder)

    def get_many(self, keys: list[bytes]) -> dict[bytes, Listing]:
        """The kept listings of those of *keys* that have one (one query for all)."""
        found, ask = self.in_memory(keys)
        if ask:
            more = self.query(ask)
            self.queried(ask, more)
            found.update(more)
        return self.decode_all(found)

    def decode_all(self, found: dict[bytes, bytes]) -> dict[bytes, Listing]:
        out = {}
        for key, data in found.items():
            listing = self.decoded(key, data, decode)
            if listing is not None:
                out[key] = listing
        return out

    def _put(self, key: bytes, data: bytes) -> None:
        self._absent.pop(key, None)
        self._damaged.discard(key)
        self.pending[key] = data
        if len(self.pending) >= self.FLUSH_AT and not self._deferred:
            self.flush()

    def defer_writes(self) -> None:
        """Leave writing to the user (``take_batch``/``write_batch``, in a worker)."""
        self._deferred = True

    def take_batch(self) -> tuple[dict[bytes, bytes], set[bytes]] | None:
        """What is to be written (taken from memory: reads find it meanwhile), or None
        if nothing is, or a batch is being written."""
        if self._writing or not (self.pending or self._damaged):
            return None
        batch, self.pending = self.pending, {}
        damaged, self._damaged = self._damaged, set()
        self._writing = batch
        return batch, damaged

    def write_batch(self, batch: dict[bytes, bytes], damaged: set[bytes]) -> None:
        """Write a taken batch (blocking: may read the lower)."""
        with self.lock, self.conn:
            self.conn.executemany("delete from listings where key = ?",
                                  [(key,) for key in damaged])
            self.conn.executemany("insert or replace into listings values (?, ?)",
                                  batch.items())

    def batch_done(self) -> None:
        self._writing = {}

    def flush(self) -> None:
        taken = self.take_batch()
        if taken is not None:
            try:
                self.write_batch(*taken)
            finally:
                self.batch_done()

    def drop_prefix(self, prefix: bytes) -> None:
        self.flush()
        with self.lock:
            self.conn.execute("delete from listings where key >= ? and key < ?",
                              (prefix, prefix + b"\xff"))

    def close(self, wait: float = 10.0) -> None:
        """Write what is pending and close; if a read stuck on the lower still holds the
        connection after *wait* seconds, leave it (a cache: what is lost is fetched again)."""
        if not self.lock.acquire(timeout=wait):
            log.warning("the cached listings could not be closed: the lower does not answer")
            return
        self.lock.release()
        self._writing = {}  # a batch written in a worker is done: it held the lock
        self.flush()
        self.conn.close()

    def size_bytes(self) -> int:
        return sum(os.stat(self.path + s).st_size for s in ("", "-wal")
                   if os.path.exists(self.path + s))


class DirCache:
    """Immutable lower listings by lower path, bounded in memory, backed by a store.

    Memory answers inline.  A store whose file reads the lower (a published catalog's
    copy) is queried and written through *run* (the lower layer's: worker threads, its
    limit and timeout), so a catalog read stuck on an NFS lower stalls one request, not
    the event loop; a local store is queried inline (a page or two of a local file)."""

    def __init__(self, store: ListingStore | None = None, max_entries: int = 100_000,
                 *, run=None):
        self.store = store
        # How a blocking store call is awaited: ``run(fn, *args)``, or None: inline.
        self.run = run if store is not None and store.on_lower else None
        if self.run is not None:
            store.defer_writes()
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

    async def _stored(self, keys: list[bytes]) -> dict[bytes, bytes]:
        """The store's records of *keys*: memory first, then one query (awaited through
        the lower's workers when it may read the lower)."""
        found, ask = self.store.in_memory(keys)
        if ask:
            more = (await self.run(self.store.query, ask) if self.run is not None
                    else self.store.query(ask))
            self.store.queried(ask, more)
            found.update(more)
        return found

    async def get(self, path: bytes, key: bytes) -> Listing | None:
        item = self._lru.get(path)
        if item is not None and item[0] == key:
            self._lru.move_to_end(path)
            self.hits += 1
            return item[1]
        listing = None
        if self.store is not None:
            listing = self.store.decode_all(await self._stored([key])).get(key)
        if listing is None:
            self.misses += 1
            return None
        self.loads += 1
        self._remember(path, key, listing)
        return listing

    async def get_many(self, paths: list[bytes],
                       keys: list[bytes | None]) -> list[Listing | None]:
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
        stored = {}
        if self.store is not None and load:
            stored = self.store.decode_all(await self._stored([keys[i] for i in load]))
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
            self._write_later()

    def _write_later(self) -> None:
        """Enough kept listings of a store on the lower: written in the background,
        through the lower's workers (a failed write loses a cache's records, no more)."""
        if self.run is not None and len(self.store.pending) >= self.store.FLUSH_AT:
            taken = self.store.take_batch()
            if taken is not None:
                trio.lowlevel.spawn_system_task(self._write, taken)

    async def _write(self, taken) -> None:
        try:
            await self.run(self.store.write_batch, *taken)
        except Exception as e:
            log.warning("cached listings not written: %s", e)
        finally:
            self.store.batch_done()

    def _remember(self, path: bytes, key: bytes, listing: Listing) -> None:
        old = self._lru.pop(path, None)
        if old is not None:
            self._size -= len(old[1])
        self._lru[path] = (key, listing)
        self._size += len(listing)
        while self._size > self.max_entries and len(self._lru) > 1:
            _, (_, dropped) = self._lru.popitem(last=False)
            self._size -= len(dropped)

    async def get_xattrs(self, path: bytes,
                         key: bytes) -> dict[bytes, dict[str, bytes]] | None:
        """The xattrs of the entries of directory *path*, if read before."""
        item = self._xattrs.get(path)
        if item is not None and item[0] == key:
            self._xattrs.move_to_end(path)
            return item[1]
        xmap = None
        if self.store is not None:
            skey = key + self.store.XATTRS
            data = (await self._stored([skey])).get(skey)
            xmap = None if data is None else self.store.decoded(skey, data, decode_xattrs)
        if xmap is not None:
            self._remember_xattrs(path, key, xmap)
        return xmap

    def put_xattrs(self, path: bytes, key: bytes, xmap: dict[bytes, dict[str, bytes]]) -> None:
        self._remember_xattrs(path, key, xmap)
        if self.store is not None:
            self.store.put_xattrs(key, xmap)
            self._write_later()

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
