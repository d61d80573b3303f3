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
from collections import OrderedDict

import trio

from .listingformat import (DECODE_ERRORS, LStat, Listing, decode, decode_xattrs,  # noqa: F401
                            encode, encode_xattrs, pack_stat)
from .liststore import ListingStore

log = logging.getLogger(__name__)


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
                # Queries of the on-disk copy (over a generation, a worker trip each).
                "store_queries": self.store.queries if self.store else 0,
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

    def has(self, path: bytes, key: bytes) -> bool:
        """Whether memory holds *path*'s listing under *key* (nothing counted)."""
        item = self._lru.get(path)
        return item is not None and item[0] == key

    async def get(self, path: bytes, key: bytes, tree=None) -> Listing | None:
        """The listing of *path*, kept under *key*.  *tree*: the policy's ``cache_tree``,
        asked on a miss of memory when the store is a published catalog: the rest of the
        tree is then read along (``load_trees``)."""
        item = self._lru.get(path)
        if item is not None and item[0] == key:
            self._lru.move_to_end(path)
            self.hits += 1
            return item[1]
        listing = None
        if self.store is not None:
            where = await tree(path) if tree is not None and self.reads_trees else None
            if where is not None:
                await self.load_trees([(key, *where)])
                item = self._lru.get(path)
                if item is not None and item[0] == key:
                    return item[1]  # counted in loads by load_trees
            else:
                listing = self.store.decode_all(await self._stored([key])).get(key)
        if listing is None:
            self.misses += 1
            return None
        self.loads += 1
        self._remember(path, key, listing)
        return listing

    # Over a published catalog, a listing missing from memory is read with the listings
    # after it in key order in the same tree (its store path's), at most this many, in
    # one trip to a worker: a walk into a store path then costs one trip, not one for
    # every directory in it (14,000 for the bench store's 2,000 paths).
    TREE_RECORDS = 256

    @property
    def reads_trees(self) -> bool:
        """Whether the store is read a tree at a time (it is a published catalog)."""
        return self.run is not None

    async def load_trees(self, wanted: list[tuple[bytes, bytes, bytes]]) -> set[bytes]:
        """For each ``(key, top, prefix)`` (a listing's *key*; the lower path *top* of
        its tree, whose listings are kept under *prefix* + their path below *top*): the
        store's listings of that tree from *key* on, ``TREE_RECORDS`` at most, all in
        one query (in a worker, decoded there); each one not in memory is remembered.
        The keys of *wanted* that the store has."""
        ranges = [(key, _after(prefix), self.TREE_RECORDS) for key, _, prefix in wanted]
        found = await self.run(_read_ranges, self.store, ranges,
                               [len(prefix) for _, _, prefix in wanted])
        had = set()
        for (key, top, prefix), (listings, damaged) in zip(wanted, found):
            for bad in damaged:
                self.store.dropped(bad)
            if key in listings:
                had.add(key)
            else:
                self.store.queried([key], {})
            for got, listing in listings.items():
                rel = got[len(prefix):]
                path = top + b"/" + rel if rel else top
                item = self._lru.get(path)
                if item is None or item[0] != got:
                    self.loads += 1
                    self._remember(path, got, listing)
        return had

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


def _after(prefix: bytes) -> bytes:
    """The least key past every key that starts with *prefix*."""
    head = prefix.rstrip(b"\xff")
    return head[:-1] + bytes([head[-1] + 1]) if head else b"\xff" * (len(prefix) + 1)


def _read_ranges(store: ListingStore, ranges: list[tuple[bytes, bytes, int]],
                 prefix_lengths: list[int]):
    """``store.query_ranges`` decoded (in a worker thread): for each range, its
    listings by key and the keys of records that did not decode (damaged).  A key whose
    part past its tree's prefix holds a NUL is no listing (a directory's xattrs, kept
    beside it under its key and a suffix) and is left out."""
    out = []
    for records, skip in zip(store.query_ranges(ranges), prefix_lengths):
        listings, damaged = {}, []
        for key, data in records.items():
            if b"\0" in key[skip:]:
                continue
            try:
                listings[key] = decode(data)
            except DECODE_ERRORS:
                damaged.append(key)
        out.append((listings, damaged))
    return out
