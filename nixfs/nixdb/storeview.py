"""A Nix store as the lower: what the merged view shows, and following the lower live.

The view shows a lower ``store/`` entry only if the lower database holds it as a
valid path (per nixfs' index): no ``.links``, no ``.nfs*`` files, no half-copied
paths or lock files, so Nix's GC and ``--optimise`` never see them.  The lower's
``var/nix/db`` (and its temporary roots and daemon socket) never show: the
merged state directory has its own.

``StoreService`` runs in the daemon's nursery.  It polls the lower database (a
few cheap opens), applies what changed to the merged database through the
mount (so nixfs' writes share Nix's locks and ``-shm``), then tells the overlay,
which drops what it and the kernel cached about those entries.
"""

import bisect
import errno
import logging
import time

import cachetools
import trio

from ..overlay.policy import LowerPolicy
from .lowerindex import LowerIndex
from .worker import WorkerError

log = logging.getLogger(__name__)

STORE = (b"store",)
# Lower entries of var/nix the merged view never shows: the merged state is its own.
UPPER_ONLY = {b"db", b"temproots", b"daemon-socket", b"gc.lock", b"userpool"}


class NixStorePolicy(LowerPolicy):
    def __init__(self, index: LowerIndex, on_whiteout=None):
        self.index = index
        self.on_whiteout = on_whiteout  # callback(name): the StoreService's whiteout_made
        # name -> (lower id, state) or None, as the index says: asked on every request
        # below the store (an SQLite query each would be a third of a getxattr's cost).
        # Kept while the index is unchanged: any commit by another connection (the
        # sync worker) bumps its data version; forget() drops a name the overlay hears of.
        self._states: cachetools.LRUCache = cachetools.LRUCache(50_000)
        self._version = None
        # The shown names following the last read-ahead's, in name order: a walk asks
        # for the next few after each store path, so one query serves many asks.
        self._following: list[bytes] = []

    def stats(self) -> dict:
        return self.index.stats()

    def _check_version(self) -> None:
        version = self.index.conn.data_version()
        if version != self._version:
            self._states.clear()
            self._following = []
            self._version = version

    def _state(self, name: bytes):
        self._check_version()
        try:
            return self._states[name]
        except KeyError:
            state = self._states[name] = self.index.state(name)
            return state

    def read_ahead(self, lower_path, count):
        # A walk of the store visits store paths in the order it lists them: by name.
        parts = lower_path.split(b"/")
        if len(parts) != 2 or parts[0] != b"store":
            return []
        name = parts[1]
        self._check_version()
        following = self._following
        at = bisect.bisect_right(following, name)
        if not (following and following[0] <= name and at + count <= len(following)):
            following = self._following = [name] + self.index.shown_after(name, 8 * count)
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

    def cache_key(self, lower_path):
        parts = lower_path.split(b"/", 2)
        if len(parts) < 2 or parts[0] != b"store":
            return None
        state = self._state(parts[1])
        if state is None or state[1] != 0:
            return None
        # Valid exactly as long as this path is: its id changes if it leaves and comes back.
        return b"%s\0%d\0%s" % (parts[1], state[0], parts[2] if len(parts) > 2 else b"")

    def link_lower_errno(self, dest_tag):
        # nix-store --optimise links every file of every valid path into store/.links; for
        # a lower file that would copy it into the upper.  Nix 2.8 takes ENOSPC from that
        # link() as "do not deduplicate this file" and goes on.
        return errno.ENOSPC if dest_tag == "store/.links" else None

    def lower_visible(self, parent_tag, name):
        if parent_tag == "store":
            state = self._state(name)
            return state is not None and state[1] == 0
        if parent_tag == "var/nix":
            return name not in UPPER_ONLY
        return True

    def lower_names(self, parent_tag):
        return self.index.shown_names() if parent_tag == "store" else None

    def whiteout_made(self, parent_tag, name):
        if parent_tag == "store" and self.on_whiteout is not None:
            self.on_whiteout(name)


class StoreService:
    """Follows the lower store while mounted (the database work runs in SyncWorker)."""

    def __init__(self, worker, overlay, *, finish_pending: bool = False, interval: float = 0.5):
        self.worker = worker
        self.finish_pending = finish_pending
        self.overlay = overlay
        self.interval = interval
        self._wake = trio.Event()
        self._hide: set[bytes] = set()
        self._scope = trio.CancelScope()
        self._stopped = trio.Event()
        self._paused_until = 0.0
        self._busy = False
        self.errors = 0
        self.last_error = ""
        self.duplicates = 0
        self.last_ok = 0.0  # when a round last found the merged database in step
        # Hiding and unhiding take turns: an unhide must not remove a whiteout while the
        # hide it undoes is half done (a crash then left a shown path with no row).
        self._hide_lock = trio.Lock()

    def whiteout_made(self, name: bytes) -> None:
        """A lower store path was removed through the mount: hide it in the database."""
        if self.overlay.policy.index.state(name):
            self._hide.add(name)
            self._wake.set()

    def stats(self) -> dict:
        """How following the lower goes, for ``nixfs status``."""
        last = self.last_ok
        return {"last_sync_age_s": round(time.time() - last, 1) if last else None,
                "sync_errors": self.errors, "last_sync_error": self.last_error,
                "upper_copies_dropped": self.duplicates,
                "first_build_finishing": self.finish_pending}

    async def start(self) -> None:
        """Before the mount is announced: hold Nix's GC lock if a first build is unfinished."""
        if self.finish_pending:
            await self.worker.call("hold_gc_lock")

    async def run(self) -> None:
        with self._scope:
            while True:
                if not self.finish_pending:
                    with trio.move_on_after(self.interval):
                        await self._wake.wait()
                self._wake = trio.Event()
                if trio.current_time() < self._paused_until:
                    await trio.sleep_until(self._paused_until)
                    continue
                self._busy = True
                try:
                    if self.finish_pending:
                        self.finish_pending = not await self.worker.call("finish_step")
                    await self.step()
                    self.last_ok = time.time()
                except (OSError, WorkerError) as e:
                    self.errors += 1
                    error = str(e).strip().splitlines()[-1]
                    if error != self.last_error:  # once, not every round it keeps failing
                        log.warning("following the lower store: %s", e)
                    self.last_error = error
                finally:
                    self._busy = False
        self._stopped.set()

    async def stop(self) -> None:
        """Stop following; returns once no request is under way (the mount still answers)."""
        self._scope.cancel()
        await self._stopped.wait()

    async def pause(self, seconds: float) -> None:
        """Hold all database work (an unmount is coming): the worker keeps nothing open
        on the mount.  Resumes by itself if the mount is still there after *seconds*.

        An unfinished first build is finished first: until then the worker holds
        Nix's GC lock, and dropping it early could let a collector in too soon."""
        while self.finish_pending and not self._stopped.is_set():
            await trio.sleep(0.05)
        self._paused_until = trio.current_time() + seconds
        self._wake.set()
        # Not longer than the pause: a round stuck on a hung lower must not hang the
        # unmount (which then goes on, or says the mount is busy).
        with trio.move_on_after(seconds):
            while self._busy:
                await trio.sleep(0.01)

    async def sync_now(self) -> None:
        """``nixfs sync``: a round now, however long until the next."""
        await self.step(force=True)
        self.last_ok = time.time()

    async def step(self, force: bool = False) -> None:
        """One round: hide what was removed through the mount, then follow the lower."""
        async with self._hide_lock:
            if self._hide:
                names, self._hide = self._hide, set()
                try:
                    hidden = await self.worker.call("hide", sorted(names))
                except BaseException:
                    self._hide |= names  # not done: the next round tries again
                    raise
                self._forget(hidden)
        result = await self.worker.call("step", force)
        if result is None:
            return
        shown, hidden, duplicates = result
        self._forget(list(hidden) + list(shown))
        for name in duplicates:
            if await self.overlay.discard_upper(STORE, name):
                self.duplicates += 1
                log.info("dropped the upper copy of %s: the lower has it", name.decode())

    async def unhide(self, names: list[bytes]) -> list[bytes]:
        """``nixfs unhide``: show hidden lower paths again, with what they took along."""
        async with self._hide_lock:
            self._hide -= set(names)  # a hide still queued would undo this unhide
            for name in names:
                await self.overlay.unhide(STORE, name)
            restored = await self.worker.call("restore", names)
        self._forget(restored)
        return restored

    def _forget(self, names) -> None:
        for name in names:
            self.overlay.lower_entry_changed(STORE, name)
