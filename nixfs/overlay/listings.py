"""Listings of immutable lower objects, kept, and fetched ahead of a walk.

The policy names the lower paths that never change and gives each a cache key;
this part alone pairs those keys with the listing cache (memory and the on-disk
store), fetches a missing listing in one worker-thread call (with the directories
below it, up to a budget), fetches in the background what a walk will want next,
and keeps the xattrs of such objects.  Everyone else asks it for a listing by node.
"""

import logging

import cachetools
import trio

from .descriptors import Descriptors
from .dircache import DirCache, Listing
from .inodes import DERIVED, InodeTable, Node
from .lowerlayer import LowerLayer
from .nodes import Nodes
from .policy import LowerPolicy

log = logging.getLogger(__name__)


class Listings:
    def __init__(self, dirs: Descriptors, lower: LowerLayer, inodes: InodeTable, nodes: Nodes,
                 policy: LowerPolicy, dircache: DirCache, *, lower_threads: int):
        self.dirs, self.lower, self.inodes, self.nodes = dirs, lower, inodes, nodes
        self.policy, self.dircache = policy, dircache
        # Entries read below an immutable lower directory in the same worker-thread
        # call as its own listing: a walk into a store path then costs one trip, not
        # one per directory; a single lookup reads at most this much more than it needs.
        self.prefetch_entries = 512
        # Store paths fetched in the background ahead of a walk (see _read_further), a
        # batch of them per worker-thread call.
        self.read_ahead_paths = 16
        self.read_ahead_batch = 4
        # Over a published catalog a batch is one range query of its file, which keeps the
        # trees next to each other.  A cold walk of the bench store outran 16 paths: 250
        # catalog reads came on a request's path (about 2 ms each); 150 with these.
        self.catalog_ahead_paths = 64
        self.catalog_ahead_batch = 8
        self._read_ahead: cachetools.LRUCache = cachetools.LRUCache(4096)  # read, not yet used
        self._ahead_pending: set[bytes] = set()
        self._ahead_limiter = trio.CapacityLimiter(max(1, lower_threads // 2))
        self._fetching: dict[bytes, trio.Event] = {}
        self._xattrs: cachetools.LRUCache = cachetools.LRUCache(20_000)

    async def node_listing(self, node: Node) -> Listing | None:
        """The kept listing of a node's lower object, if there is one to keep."""
        if node.lower is not DERIVED or node.parent is None:
            return None
        return await self.listing_at(node.parent, node.name, self.dirs.lower_path(node), node)

    async def listing_at(self, parent: Node, name: bytes, path: bytes,
                         node: Node | None = None, *, further: bool = True) -> Listing | None:
        """The listing of the lower object *path* (``parent``'s lower entry *name*) if
        the policy keeps it: from memory, from the store, or fetched in one go.

        When *node* is that object's node, a fetch also keeps its open lower
        directory for it: the walk's next step down then needs no second open."""
        key = await self.policy.cache_key(path)
        if key is None:
            return None
        # Over a published catalog a miss of memory reads the rest of its tree along.
        from_store = self.dircache.reads_trees and not self.dircache.has(path, key)
        listing = await self.dircache.get(path, key, self.policy.cache_tree)
        if listing is not None:
            if self._read_ahead.pop(path, None) is not None:
                await self._read_further(parent, path)  # a walk reached what was read ahead
            elif from_store and further:
                await self._read_beyond_tree(parent, path)
            return listing
        busy = self._fetching.get(path)
        if busy is not None:  # someone is fetching it: wait for theirs
            await busy.wait()
            return await self.dircache.get(path, key)
        self._fetching[path] = done = trio.Event()
        try:
            keep = node is not None and not self.dirs.has_lower_fd(node)
            async with self.dirs.lower_fd(parent) as pfd:
                listings, fd = await self.lower.read_listing(pfd, name, keep,
                                                             self.prefetch_entries)
            if fd >= 0:
                self.dirs.adopt_lower_fd(node, fd)
        except (FileNotFoundError, NotADirectoryError):
            return None
        finally:
            del self._fetching[path]
            done.set()
        listing = await self._keep_listings(path, key, listings)
        if further:  # a request's fetch, not a read-ahead
            await self._read_further(parent, path)
        return listing

    async def _keep_listings(self, path: bytes, key: bytes, listings: dict) -> Listing:
        """Keep what ``read_listing`` read at *path*; its own listing."""
        listing = listings.pop(b"")
        self.dircache.put(path, key, listing)
        for rel, below in listings.items():  # the directories below, read on the way
            sub = path + b"/" + rel
            sub_key = await self.policy.cache_key(sub)
            if sub_key is not None:
                self.dircache.put(sub, sub_key, below)
        return listing

    async def _read_further(self, parent: Node, path: bytes) -> None:
        """Fetch, in the background, the immutable lower paths the policy expects a
        walk to want next: a cold walk (or NFS) then waits on several at once rather
        than one after another.  At most ``read_ahead_paths`` ahead, in batches of
        ``read_ahead_batch`` per worker-thread call (each call costs the event loop
        more than a listing; ``catalog_ahead_*`` over a published catalog), on at most
        half the lower's threads."""
        paths, size = ((self.catalog_ahead_paths, self.catalog_ahead_batch)
                       if self.dircache.reads_trees else
                       (self.read_ahead_paths, self.read_ahead_batch))
        if not paths:
            return
        try:
            wanted = await self.policy.read_ahead(path, paths)
        except OSError as e:  # a guess not made: the request that asked goes on
            log.debug("reading ahead of %r: %s", path, e)
            return
        new = [ahead for ahead in wanted if ahead not in self._ahead_pending
               and ahead not in self._fetching and ahead not in self._read_ahead]
        if len(wanted) == paths:  # not the end: wait for a full batch
            new = new[:len(new) - len(new) % size]
        for at in range(0, len(new), size):
            batch = new[at:at + size]
            self._ahead_pending.update(batch)
            trio.lowlevel.spawn_system_task(self._fetch_ahead, parent, batch)

    async def _read_beyond_tree(self, parent: Node, path: bytes) -> None:
        """A walk read *path* (*parent*'s entry) from a published catalog: read ahead of
        the tree that holds it, as of a fetch from the lower."""
        where = await self.policy.cache_tree(path)
        if where is None:
            return
        top = where[0]
        for _ in range(path.count(b"/") - top.count(b"/")):  # up to the top's parent
            parent = parent.parent
            if parent is None:
                return
        await self._read_further(parent, top)

    async def _trees_ahead(self, paths: list[bytes]) -> list[bytes]:
        """Of *paths*, the trees a published catalog holds, read in one worker call
        (marked read ahead); the paths left to fetch from the lower."""
        keys = [await self.policy.cache_key(path) for path in paths]
        wanted = [(key, *where) for key, where in
                  zip(keys, [await self.policy.cache_tree(path) for path in paths])
                  if key and where]
        had = await self.dircache.load_trees(wanted) if wanted else set()
        left = []
        for path, key in zip(paths, keys):
            if key in had:
                self._read_ahead[path] = True
            else:
                left.append(path)
        return left

    async def _fetch_ahead(self, parent: Node, paths: list[bytes]) -> None:
        """Fetch *paths* (immutable lower entries of *parent*) in one worker call."""
        done = trio.Event()
        try:
            async with self._ahead_limiter:
                if self.inodes.get(parent.ino) is not parent:
                    return  # the directory went meanwhile
                todo, left = [], paths
                if self.dircache.reads_trees:  # from the catalog, what it has
                    left = await self._trees_ahead(
                        [path for path in paths if path not in self._fetching])
                for path in left:
                    key = await self.policy.cache_key(path)
                    if (key is not None and path not in self._fetching
                            and await self.dircache.get(path, key) is None):
                        todo.append((path, key))
                        self._fetching[path] = done
                if not todo:
                    return
                async with self.dirs.lower_fd(parent) as pfd:
                    found = await self.lower.read_listings(
                        pfd, [path.rsplit(b"/", 1)[1] for path, _ in todo], self.prefetch_entries)
                for (path, key), listings in zip(todo, found):
                    if listings is not None:
                        await self._keep_listings(path, key, listings)
                        self._read_ahead[path] = True
        except Exception as e:  # a read-ahead is a guess: its failure is no one's error
            log.debug("reading %r ahead: %s", paths, e)
        finally:
            for path in paths:
                self._ahead_pending.discard(path)
                if self._fetching.get(path) is done:
                    del self._fetching[path]
            done.set()

    async def kept_stats(self, node: Node, names: list[bytes]):
        """Split *names* of *node*'s lower into (name, stat) pairs known from kept
        listings (their ``.``) and the names still to stat."""
        base = self.dirs.lower_path(node)
        paths = [base + b"/" + name if base else name for name in names]
        listings = await self.dircache.get_many(paths, await self.policy.cache_keys(paths))
        known, unknown = [], []
        for name, listing in zip(names, listings):
            if listing is not None:
                known.append((name, listing.stat(b".")))
            else:
                unknown.append(name)
        return known, unknown

    async def lower_xattrs(self, node: Node) -> dict[str, bytes]:
        """All xattrs of an immutable lower object, kept (exec asks for
        security.capability every time, ``ls -l`` for every entry): those of a whole
        kept directory's entries are read in one trip and kept beside its listing."""
        parent = node.parent
        if parent is not None and self.nodes.immutable(parent):
            ppath = self.dirs.lower_path(parent)
            pkey = await self.policy.cache_key(ppath)
            listing = await self.node_listing(parent) if pkey is not None else None
            if listing is not None:
                xmap = await self.dircache.get_xattrs(ppath, pkey)
                if xmap is None:
                    names = [n for n in listing.entries if n != b"."]
                    async with self.dirs.lower_fd(parent) as pfd:
                        xmap = await self.lower.read_dir_xattrs(pfd, names)
                    self.dircache.put_xattrs(ppath, pkey, xmap)
                return xmap.get(node.name, {})
        # A store path itself (its parent, the store, changes): kept on its own.
        path = self.dirs.lower_path(node)
        key = await self.policy.cache_key(path)
        if key is not None:
            own = await self.dircache.get_xattrs(path + b"/.", key + b"\0self")
            if own is None:
                async with self.dirs.lower_fd(node.parent) as pfd:
                    own = {b".": await self.lower.read_xattrs(pfd, node.name)}
                self.dircache.put_xattrs(path + b"/.", key + b"\0self", own)
            return own[b"."]
        xattrs = self._xattrs.get(path)
        if xattrs is None:
            async with self.dirs.lower_fd(node.parent) as pfd:
                xattrs = await self.lower.read_xattrs(pfd, node.name)
            self._xattrs[path] = xattrs
        return xattrs

    def forget(self, path: bytes) -> None:
        """The lower changed at *path*: drop what is kept of it and below it."""
        self.dircache.forget(path)
        for key in [k for k in self._xattrs if k == path or k.startswith(path + b"/")]:
            del self._xattrs[key]
