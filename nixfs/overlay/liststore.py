"""The persistent half of the listing cache: records in one SQLite file.

Split from dircache.py (the in-memory half and the walk's use of both): this part
alone knows the file, its table and its write batching.  The file is nixfs' own
(read and written directly, never through FUSE) or, over a published generation,
a copy-on-write file whose base is the generation's catalog on the lower: then a
query may read the lower, and callers run it in a worker thread.
"""

import logging
import os
import threading

import cachetools

from ..cow import vfs as cow_vfs
from ..cow.readcache import ReadCache
from .listingformat import DECODE_ERRORS, Listing, decode, decode_xattrs, encode, encode_xattrs

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
        self.queries = 0  # queries of the file (over a generation: trips to a worker each)
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
            self.queries += 1
            return dict(self.conn.execute(
                f"select key, data from listings where key in ({marks})", keys))

    def query_ranges(self, ranges: list[tuple[bytes, bytes, int]]) -> list[dict[bytes, bytes]]:
        """The stored records with keys from *start* (included) to *end* (not), at most
        *limit* of each ``(start, end, limit)`` in key order, in one call (blocking: may
        read the lower).  Records next to each other in key order are next to each other
        in the file: a range costs a descent of the tree and a few pages after it, where
        each key of it asked alone costs a descent (and a trip to a worker) of its own."""
        with self.lock:
            self.queries += 1
            return [dict(self.conn.execute(
                "select key, data from listings where key >= ? and key < ? "
                "order by key limit ?", (start, end, limit))) for start, end, limit in ranges]

    def queried(self, asked: list[bytes], found: dict[bytes, bytes]) -> None:
        """Note which of the *asked* keys a query did not find."""
        for key in asked:
            if key not in found:
                self._absent[key] = True

    def decoded(self, key: bytes, data: bytes, decoder):
        """*data* decoded, or None (and the record dropped, to be fetched again) if damaged."""
        try:
            return decoder(data)
        except DECODE_ERRORS:
            self.dropped(key)
            return None

    def dropped(self, key: bytes) -> None:
        """The record of *key* is damaged: it is deleted at the next write, fetched again."""
        log.warning("a damaged cached listing was dropped")
        self._damaged.add(key)

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
