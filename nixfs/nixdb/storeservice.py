"""Following the lower store while mounted: the background service of a Nix store mount.

``StoreService`` runs in the daemon's nursery.  It polls the lower database (a
few cheap opens), applies what changed to the merged database through the
mount (so nixfs' writes share Nix's locks and ``-shm``), then tells the overlay,
which drops what it and the kernel cached about those entries.  It also takes
lower store paths removed through the mount out of the database (the policy,
``storepolicy``, queues them).  The database work itself runs in the worker
process (``worker``): nothing here blocks the event loop.
"""

import logging
import time

import trio

from .worker import WorkerError

log = logging.getLogger(__name__)

STORE = (b"store",)


class StoreService:
    """Follows the lower store while mounted (the database work runs in SyncWorker).

    *whiteouts* is the policy's queue of lower store paths removed through the mount
    (``NixStorePolicy.removed_paths``)."""

    def __init__(self, worker, overlay, whiteouts: trio.MemoryReceiveChannel, *,
                 finish_pending: bool = False, generation: dict | None = None,
                 interval: float = 0.5):
        self.worker = worker
        self.generation = generation  # the published generation the database is built over
        self.finish_pending = finish_pending
        self.overlay = overlay
        self.interval = interval
        self._whiteouts = whiteouts
        self._nap = trio.CancelScope()  # the wait between rounds; pause() ends it early
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

    def _take_whiteouts(self) -> None:
        """Move what the policy queued into the next round's hides."""
        while True:
            try:
                self._hide.add(self._whiteouts.receive_nowait())
            except trio.WouldBlock:
                return

    def stats(self) -> dict:
        """How following the lower goes, for ``nixfs status``."""
        last = self.last_ok
        return {"last_sync_age_s": round(time.time() - last, 1) if last else None,
                "sync_errors": self.errors, "last_sync_error": self.last_error,
                "upper_copies_dropped": self.duplicates,
                "first_build_finishing": self.finish_pending, "generation": self.generation}

    async def sync_now(self) -> None:
        """``nixfs sync``: a round now, however long until the next."""
        await self.step(force=True)

    async def start(self) -> None:
        """Before the mount is announced: over a generation, its bases held from now on,
        so a prune while mounted leaves the mount serving (the database's by the overlay;
        the worker, started at once without waiting for it, opens the index's); Nix's
        GC lock held if a first build is unfinished."""
        if self.generation is not None:
            await self.overlay.hold_cow_file(b"var", b"nix", b"db", b"db.sqlite")
            await trio.to_thread.run_sync(self.worker.ensure_started)
        if self.finish_pending:
            await self.worker.call("hold_gc_lock")

    async def run(self) -> None:
        with self._scope:
            while True:
                if not self.finish_pending:
                    with trio.move_on_after(self.interval) as self._nap:
                        self._hide.add(await self._whiteouts.receive())  # a whiteout: now
                if trio.current_time() < self._paused_until:
                    await trio.sleep_until(self._paused_until)
                    continue
                await self._round()
        self._stopped.set()

    async def _round(self) -> None:
        """One round of run(): a failure is counted and logged once, and tried again."""
        self._busy = True
        try:
            if self.finish_pending:
                self.finish_pending = not await self.worker.call("finish_step")
            await self.step()
        except (OSError, WorkerError) as e:
            self.errors += 1
            error = str(e).strip().splitlines()[-1]
            if error != self.last_error:  # once, not every round it keeps failing
                log.warning("following the lower store: %s", e)
            self.last_error = error
        finally:
            self._busy = False

    async def stop(self) -> None:
        """Stop following; returns once no request is under way (the mount still answers)."""
        self._scope.cancel()
        await self._stopped.wait()
        with trio.move_on_after(10):
            await self._keep_own_rows()

    async def _keep_own_rows(self) -> None:
        """Over a generation, copy the upper's own rows aside before the mount ends
        (``ownrows``): read through the mount, whose bases stay open even if the
        generation was pruned meanwhile, for the next mount to rebase with."""
        if self.generation is None:
            return
        try:
            await self.worker.call("keep_own_rows")
        except (OSError, WorkerError) as e:
            log.warning("cannot copy the upper's own database rows aside: %s",
                        str(e).strip().splitlines()[-1])

    async def pause(self, seconds: float) -> None:
        """Hold all database work (an unmount is coming): the worker keeps nothing open
        on the mount.  Resumes by itself if the mount is still there after *seconds*.

        An unfinished first build is finished first: until then the worker holds
        Nix's GC lock, and dropping it early could let a collector in too soon."""
        while self.finish_pending and not self._stopped.is_set():
            await trio.sleep(0.05)
        self._paused_until = trio.current_time() + seconds
        self._nap.cancel()
        # Not longer than the pause: a round stuck on a hung lower must not hang the
        # unmount (which then goes on, or says the mount is busy).
        with trio.move_on_after(seconds):
            while self._busy:
                await trio.sleep(0.01)
            await self._keep_own_rows()

    async def step(self, force: bool = False) -> None:
        """One round: hide what was removed through the mount, then follow the lower."""
        async with self._hide_lock:
            self._take_whiteouts()
            if self._hide:
                names, self._hide = self._hide, set()
                try:
                    hidden = await self.worker.call("hide", sorted(names))
                except BaseException:
                    self._hide |= names  # not done: the next round tries again
                    raise
                await self._forget(hidden)
        result = await self.worker.call("step", force)
        if result is not None:
            shown, hidden, duplicates = result
            await self._forget(list(hidden) + list(shown))
            for name in duplicates:
                if await self.overlay.discard_upper(STORE, name):
                    self.duplicates += 1
                    log.info("dropped the upper copy of %s: the lower has it", name.decode())
        self.last_ok = time.time()

    async def unhide(self, names: list[bytes]) -> list[bytes]:
        """``nixfs unhide``: show hidden lower paths again, with what they took along."""
        async with self._hide_lock:
            self._take_whiteouts()
            self._hide -= set(names)  # a hide still queued would undo this unhide
            for name in names:
                await self.overlay.unhide(STORE, name)
            restored = await self.worker.call("restore", names)
        await self._forget(restored)
        return restored

    async def _forget(self, names) -> None:
        for name in names:
            await self.overlay.lower_entry_changed(STORE, name)
