"""Refreshing, off the caller's path, attributes the kernel marks stale after a read.

When the kernel reads a directory's listing or a symlink's target from nixfs (not from
its own cache), it marks the object's atime stale (``fuse_invalidate_atime``; only a
read-only superblock is spared), and the next ``stat`` of it waits for a GETATTR round
trip however long the attribute timeout: a second walk of a tree makes one for every
directory and symlink the first walk read, and each costs the caller a sleep and a
wake-up (on a virtual machine whose idle CPUs halt, 35-75 µs). For objects whose
attributes never change (inside valid lower store paths) the daemon stats them itself
through the mount a moment later, from a thread, so that the caller's next ``stat`` is
answered from the kernel's cache.

The stats run in a thread of their own at the lowest priority (``SCHED_IDLE``): they take
CPU time only where the walk itself leaves some (and keep that CPU from halting). A stat
through the mount holds the mount busy while it waits, so an unmount asks the daemon to
pause first (``pause``), and a batch is short.
"""

from __future__ import annotations

import itertools
import logging
import os
import queue
import threading
from typing import Callable

import pyfuse3
import trio

from . import features
from ..overlay.inodes import Node

log = logging.getLogger(__name__)

# After a listing's last reply the kernel asks once more (an empty reply ends it) and
# marks the atime after that: a stat before would be marked stale again.
DELAY = 0.05
# The task wakes at most this often and hands what is ready to the thread, BATCH paths
# at a time: each hand-over passes the interpreter lock between the thread and the event
# loop, which delays the requests of a busy walk; a batch is short, so a pause waits little.
INTERVAL = 0.1
BATCH = 512
PENDING_MAX = 20_000  # beyond this, objects are left to the caller's own GETATTR


class StaleAttributes:
    """Objects whose kernel attributes just went stale, and the task that refreshes them."""

    def __init__(self, mountpoint: str, settled: Callable[[Node], bool]):
        self._root = os.fsencode(mountpoint)
        self._settled = settled  # still worth refreshing (never changes, still known)
        self._pending: dict[Node, float] = {}  # -> when it went stale, oldest first
        self._work = trio.Event()
        self._stop = threading.Event()  # tells a batch of os.lstat calls to end early
        self._idle = trio.Event()
        self._idle.set()
        self._batches: queue.SimpleQueue = queue.SimpleQueue()  # to the thread; None ends it
        self._paused_until = 0.0
        self.refreshed = 0
        self.failed = 0

    def stats(self) -> dict:
        return {"done": self.refreshed, "failed": self.failed}

    def stale(self, node: Node) -> None:
        """The kernel has just read *node*'s listing or target itself."""
        if len(self._pending) < PENDING_MAX:
            self._pending.pop(node, None)  # to the end: stale again, from now
            self._pending[node] = trio.current_time()
            self._work.set()

    async def pause(self, seconds: float) -> None:
        """Stat nothing through the mount for *seconds* (an unmount is coming); returns
        once no stat is under way."""
        self._paused_until = trio.current_time() + seconds
        self._pending.clear()
        self._stop.set()
        # A batch takes milliseconds, but at the lowest priority on a busy machine it may
        # wait for CPU time: the unmount retries a while on EBUSY anyway.
        with trio.move_on_after(2):
            await self._idle.wait()

    async def run(self) -> None:
        token = trio.lowlevel.current_trio_token()
        threading.Thread(target=self._thread, args=(token,), name="nixfs-stale-attrs",
                         daemon=True).start()
        try:
            while True:
                if not self._pending:
                    await self._work.wait()
                    self._work = trio.Event()
                await trio.sleep(max(INTERVAL, self._paused_until - trio.current_time()))
                while self._paused_until <= trio.current_time():
                    ready = trio.current_time() - DELAY
                    nodes = [node for node, when in itertools.islice(self._pending.items(), BATCH)
                             if when <= ready]
                    if not nodes:
                        break
                    for node in nodes:
                        del self._pending[node]
                    paths = [self._root + b"/" + n.path() for n in nodes if self._settled(n)]
                    if paths:
                        await self._stat(paths)
        finally:
            self._batches.put(None)

    async def _stat(self, paths: list[bytes]) -> None:
        finished = trio.Event()
        result = []

        def deliver(counts: tuple[int, int]) -> None:
            result.append(counts)
            finished.set()

        self._stop.clear()
        self._idle = trio.Event()
        try:
            self._batches.put((paths, deliver))
            await finished.wait()
        finally:
            self._idle.set()
        done, tried = result[0]
        self.refreshed += done
        if done < tried:
            self.failed += tried - done
            log.debug("refreshing attributes: %d of %d stats failed", tried - done, tried)

    def _thread(self, token) -> None:
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        except OSError as e:
            log.debug("refreshing attributes at normal priority: %s", e)
        while (batch := self._batches.get()) is not None:
            paths, deliver = batch
            counts = self._stat_all(paths)
            try:
                trio.from_thread.run_sync(deliver, counts, trio_token=token)
            except trio.RunFinishedError:
                return

    def _stat_all(self, paths: list[bytes]) -> tuple[int, int]:
        """(stats that succeeded, stats tried)

        nixfs' pyfuse3 patch stats a batch without the interpreter lock; os.lstat in a
        thread waits for the lock after every call while the daemon is busy, and falls behind.
        """
        if features.FEATURES.refresh_attributes:
            return pyfuse3.refresh_attributes(paths), len(paths)
        done = tried = 0
        for path in paths:
            if self._stop.is_set():
                break
            tried += 1
            try:
                os.lstat(path)
                done += 1
            except OSError:
                pass
        return done, tried
