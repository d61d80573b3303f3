"""A Nix store as the lower: what the merged view shows of it, asked on every lookup.

The view shows a lower ``store/`` entry only if the lower database holds it as a
valid path (per nixfs' index): no ``.links``, no ``.nfs*`` files, no half-copied
paths or lock files, so Nix's GC and ``--optimise`` never see them.  The lower's
``var/nix/db`` (and its temporary roots and daemon socket) never show: the
merged state directory has its own.

This is the hot path (the overlay asks it for every request below the store):
it answers from memory where it can and never waits on the database work,
which runs in the background (``storeservice``).  A lower path removed through
the mount is only queued here for that work.  What it must ask the index is
asked inline when the index is a local file, and through the lower's runner when
its pages lie on the lower (a copy-on-write file over a published generation's
index): an index read stuck on an NFS lower then fails one request with EIO
after the lower's timeout instead of stalling the event loop.
"""

import bisect
import errno
import threading

import cachetools
import trio

from ..overlay.policy import LowerPolicy
from .lowerindex import LowerIndex

# Lower entries of var/nix the merged view never shows: the merged state is its own.
UPPER_ONLY = {b"db", b"temproots", b"daemon-socket", b"gc.lock", b"userpool"}
# The lower's var/nixfs holds what `nixfs publish` writes for mounts to read (its
# generations' files are copy-on-write deltas, not what they show): never shown.
PUBLISHED = b"nixfs"


def listing_key(name: bytes, lower_id: int, rel: bytes) -> bytes:
    """The cache key of the listing at *rel* (b"" for the path itself) in the store path
    *name* with id *lower_id*: valid exactly as long as the path is (its id changes if
    it leaves and comes back).  Published catalogs use the same keys."""
    return b"%s\0%d\0%s" % (name, lower_id, rel)


class NixStorePolicy(LowerPolicy):
    REMEMBERED_ASK = 1024  # names asked at once whose states are remembered (a listing's chunk)

    def __init__(self, index: LowerIndex, *, run=None):
        """*run*: how an index query is awaited, ``run(fn, *args)`` in a worker thread
        (the lower's runner), or None: inline on the event loop."""
        self.index = index
        self._run = run
        # The index's connection is used by one thread at a time (apsw refuses two).
        self._lock = threading.Lock()
        # Lower store paths removed through the mount, for the service to take out of the
        # database (removed_paths()); queued here, never waited on.
        self._removed, self._removed_queue = trio.open_memory_channel(float("inf"))
        # name -> (lower id, state) or None, as the index says: asked on every request
        # below the store (an SQLite query each would be a third of a getxattr's cost).
        # Kept while the index is unchanged: any commit by another connection (the
        # sync worker) bumps its data version; forget() drops a name the overlay hears of.
        self._states: cachetools.LRUCache = cachetools.LRUCache(50_000)
        self._version = index.data_version()
        # The shown names following the last read-ahead's, in name order: a walk asks
        # for the next few after each store path, so one query serves many asks.
        self._following: list[bytes] = []
        self.queries = 0  # index queries made (the rest were answered from memory)
        self._index_stats: dict = {}  # the index's figures as last read (refresh_stats)

    async def _query(self, fn, *args):
        """``fn(*args)`` on the index, and whether its answer may be remembered: not if
        an answer already remembered is newer (queries in worker threads may return out
        of order)."""
        self.queries += 1
        if self._run is None:
            version, result = self._locked(fn, *args)
        else:
            version, result = await self._run(self._locked, fn, *args)
        return result, self._seen_version(version)

    def _locked(self, fn, *args):
        with self._lock:
            result = fn(*args)
            return self.index.data_version(), result

    def _check_version(self) -> None:
        """Drop what is remembered if the index changed since (a commit by any
        connection: the data version is the connection's, kept in memory).  Skipped
        while a query holds the connection: its answer brings the version."""
        if self._lock.acquire(blocking=False):
            try:
                version = self.index.data_version()
            finally:
                self._lock.release()
            self._seen_version(version)

    def _seen_version(self, version: int) -> bool:
        """Note the data version an answer was read at; whether it is the newest seen."""
        if version > self._version:
            self._states.clear()
            self._following = []
            self._version = version
        return version == self._version

    async def _state(self, name: bytes):
        self._check_version()
        state = self._states.get(name, self)
        if state is self:
            state, keep = await self._query(self.index.state, name)
            if keep:
                self._states[name] = state
        return state

    async def _states_of(self, names: list[bytes]) -> dict:
        """``_state`` of many names in one index query for those not remembered.  A
        chunk of a listing is remembered (the walk makes the entries' nodes and reads
        their listings next, asking each name again); a longer ask is not (a
        million-name listing would only churn the cache)."""
        self._check_version()
        found, missing = {}, []
        for name in names:
            state = self._states.get(name, self)
            if state is self:
                missing.append(name)
            else:
                found[name] = state
        if missing:
            states, keep = await self._query(self.index.states, missing)
            found.update(states)
            if keep and len(missing) <= self.REMEMBERED_ASK:
                for name in missing:
                    self._states[name] = states.get(name)
        return found

    async def cache_keys(self, lower_paths):
        names = [p.split(b"/", 2) for p in lower_paths]
        if not all(len(parts) == 2 and parts[0] == b"store" for parts in names):
            return await super().cache_keys(lower_paths)
        states = await self._states_of([parts[1] for parts in names])
        keys = []
        for _, name in names:
            state = states.get(name)
            keys.append(listing_key(name, state[0], b"")
                        if state is not None and state[1] == 0 else None)
        return keys

    async def entry_numbers(self, parent_tag, names):
        if parent_tag != "store":
            return [None] * len(names)
        states = await self._states_of(names)
        # A lower id is never given to another path, and a path that leaves and comes
        # back gets a new one: the number of an entry shown from the lower.
        return [state[0] if state is not None and state[1] == 0 else None
                for state in map(states.get, names)]

    async def read_ahead(self, lower_path, count):
        # A walk of the store visits store paths in the order it lists them: by name.
        parts = lower_path.split(b"/")
        if len(parts) != 2 or parts[0] != b"store":
            return []
        name = parts[1]
        self._check_version()
        following = self._following
        at = bisect.bisect_right(following, name)
        if not (following and following[0] <= name and at + count <= len(following)):
            after, keep = await self._query(self.index.shown_after, name, 8 * count)
            following = [name] + [n for n, _ in after]
            if keep:
                self._following = following
                # The walk looks these up next: their states come with them, so those
                # lookups need no query of their own (over a generation each would be a
                # round trip through the lower's threads).
                for n, lower_id in after:
                    self._states[n] = (lower_id, 0)
            at = 1
        return [b"store/" + n for n in following[at:at + count]]

    def forget(self, lower_path):
        parts = lower_path.split(b"/")
        if len(parts) == 2 and parts[0] == b"store":
            self._states.pop(parts[1], None)

    def tag(self, parent_tag, name):
        if parent_tag == self.ROOT:
            return {b"store": "store", b"var": "var"}.get(name)
        if parent_tag == "var" and name == b"nix":
            return "var/nix"
        if parent_tag == "store":
            return "store/.links" if name == b".links" else "storepath"
        if parent_tag == "storepath":
            return "storepath"
        return None

    def immutable(self, parent_tag):
        # A valid store path never changes (lower objects only: upper ones are not asked).
        return parent_tag in ("store", "storepath")

    def complete(self, tag):
        return tag == "storepath"

    async def _shown_store_path(self, lower_path):
        """(name, lower id, rest below it) of a lower path in a store path the view shows
        from the lower, or None."""
        parts = lower_path.split(b"/", 2)
        if len(parts) < 2 or parts[0] != b"store":
            return None
        state = await self._state(parts[1])
        if state is None or state[1] != 0:
            return None
        return parts[1], state[0], parts[2] if len(parts) > 2 else b""

    async def cache_key(self, lower_path):
        found = await self._shown_store_path(lower_path)
        return None if found is None else listing_key(*found)

    async def cache_tree(self, lower_path):
        found = await self._shown_store_path(lower_path)
        if found is None:
            return None
        name, lower_id, _ = found
        return b"store/" + name, listing_key(name, lower_id, b"")

    def link_lower_errno(self, dest_tag):
        # nix-store --optimise links every file of every valid path into store/.links; for
        # a lower file that would copy it into the upper.  Nix 2.8 takes ENOSPC from that
        # link() as "do not deduplicate this file" and goes on.
        return errno.ENOSPC if dest_tag == "store/.links" else None

    async def lower_visible(self, parent_tag, name):
        if parent_tag == "store":
            state = await self._state(name)
            return state is not None and state[1] == 0
        if parent_tag == "var/nix":
            return name not in UPPER_ONLY
        if parent_tag == "var":
            return name != PUBLISHED
        return True

    async def lower_names(self, parent_tag):
        if parent_tag != "store":
            return None
        return (await self._query(self.index.shown_names))[0]

    async def whiteout_made(self, parent_tag, name):
        if parent_tag != "store":
            return
        try:
            known = await self._state(name)
        except OSError:  # the index did not answer: the service's own index decides
            known = True
        if known:
            self._removed.send_nowait(name)

    async def refresh_stats(self) -> None:
        """Read the index's figures for ``stats`` (off the event loop where the index
        lies on the lower); a lower that does not answer leaves the last ones."""
        try:
            self._index_stats = (await self._query(self.index.stats))[0]
        except OSError:
            pass

    def stats(self) -> dict:
        return {**self._index_stats, "index_queries": self.queries}

    def removed_paths(self) -> trio.MemoryReceiveChannel:
        """The queue of lower store paths removed through the mount (``whiteout_made``)."""
        return self._removed_queue
