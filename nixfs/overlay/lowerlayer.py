"""The lower layer's calls as awaitables that run in worker threads.

The lower may be NFS or any slow or failing file system: its calls run behind
their own thread limit and a timeout, so a stalled lower never takes threads from
upper work nor stalls the event loop; what a call given up on returns late is
disposed of (descriptors closed), so an outage leaks nothing.
"""

import errno
import functools
import logging
import os
import threading

import trio

from .layers import Layer

log = logging.getLogger(__name__)


class LowerLayer:
    """The lower layer's primitives as awaitables that run in worker threads.

    A call that takes longer than *timeout* seconds (None or 0: no limit) fails with
    EIO; its thread is abandoned (it finishes or hangs on its own, never holding the
    event loop).  What an abandoned call returns when it finishes late is handed to
    its *late* callback in that thread (descriptors are closed there), so an outage
    leaks nothing.  The lower has its own thread limit: stalled lower calls never
    take threads from upper work.
    """

    def __init__(self, layer: Layer, *, threads: int = 8, timeout: float | None = None):
        self.layer = layer
        self.root_fd = layer.root_fd
        self.calls = layer.calls
        self.limiter = trio.CapacityLimiter(threads)
        self.timeout = timeout
        # Set when a call was given up on, cleared when any call returns (also one given
        # up on, finishing late): meanwhile answers known from before may be used.
        self.out = False

    async def run(self, fn, *args, late=None):
        """``fn(*args)`` in a worker thread; EIO after the timeout.  *late* gets the
        result of a call that finishes after it was given up."""
        box = _Late(late, self)
        with trio.move_on_after(self.timeout if self.timeout else float("inf")) as scope:
            return await trio.to_thread.run_sync(box.call, fn, *args, limiter=self.limiter,
                                                 abandon_on_cancel=True)
        assert scope.cancelled_caught
        box.abandon()
        self.calls["timeout"] += 1
        if not self.out:  # once per outage, not for every call it fails
            log.warning("the lower did not answer in %g s: answering EIO (lower_timeout)",
                        self.timeout)
        self.out = True
        raise OSError(errno.EIO, "the lower layer did not answer in time")

    async def run_on_layer(self, fn, *args, late=None, **kwargs):
        """``fn(layer, *args, **kwargs)`` in a worker thread: a blocking helper (a
        copy-up) that makes several lower calls through the layer, each counted."""
        return await self.run(functools.partial(fn, self.layer, *args, **kwargs), late=late)

    def close(self) -> None:
        self.layer.close()

    async def lstat(self, dirfd, name):
        return await self.run(self.layer.lstat, dirfd, name)

    async def fstat(self, fd):
        return await self.run(self.layer.fstat, fd)

    async def open_dir(self, dirfd, name):
        return await self.run(self.layer.open_dir, dirfd, name, late=os.close)

    async def open_dir_path(self, path):
        return await self.run(self.layer.open_dir_path, path, late=os.close)

    async def scandir(self, fd):
        return await self.run(self.layer.scandir, fd)

    async def readlink(self, dirfd, name):
        return await self.run(self.layer.readlink, dirfd, name)

    async def open(self, dirfd, name, flags):
        return await self.run(self.layer.open, dirfd, name, flags, late=os.close)

    async def listxattr(self, dirfd, name):
        return await self.run(self.layer.listxattr, dirfd, name)

    async def getxattr(self, dirfd, name, attr):
        return await self.run(self.layer.getxattr, dirfd, name, attr)


    async def read_listing(self, dirfd, name, keep_fd, depth_budget):
        return await self.run(self.layer.read_listing, dirfd, name, keep_fd, depth_budget,
                              late=_close_kept_fd)

    async def read_listings(self, dirfd, names, depth_budget):
        return await self.run(self.layer.read_listings, dirfd, names, depth_budget)

    async def scan_stats(self, fd):
        return await self.run(self.layer.scan_stats, fd)

    async def stat_names(self, fd, names):
        return await self.run(self.layer.stat_names, fd, names)

    async def read_xattrs(self, dirfd, name):
        return await self.run(self.layer.read_xattrs, dirfd, name)

    async def read_dir_xattrs(self, dirfd, names):
        return await self.run(self.layer.read_dir_xattrs, dirfd, names)

    async def read_at(self, dirfd, name, size, offset):
        return await self.run(self.layer.read_at, dirfd, name, size, offset)

    async def pread(self, fd, size, offset):
        self.calls["read"] += 1
        return await self.run(os.pread, fd, size, offset)


def _close_kept_fd(result) -> None:
    """A late ``read_listing`` result: close the directory it kept open."""
    if result[1] >= 0:
        os.close(result[1])


class _Late:
    """Hands the result of an abandoned call to its *late* callback, exactly once:
    whether the thread finishes before or after the caller gives up."""

    __slots__ = ("late", "lower", "lock", "abandoned", "done", "result")

    def __init__(self, late, lower: LowerLayer):
        self.late = late
        self.lower = lower
        self.lock = threading.Lock()
        self.abandoned = self.done = False
        self.result = None

    def call(self, fn, *args):
        try:
            result = fn(*args)
        finally:
            self.lower.out = False  # it answered (a plain store: safe from a thread)
        if self.late is not None:
            with self.lock:
                if self.abandoned:
                    self._dispose(result)
                else:
                    self.done, self.result = True, result
        return result

    def abandon(self) -> None:
        """The caller gave up: a result already there (delivered too late) is disposed of."""
        with self.lock:
            self.abandoned = True
            if self.done:
                self.done, result, self.result = False, self.result, None
                self._dispose(result)

    def _dispose(self, result) -> None:
        try:
            self.late(result)
        except Exception:
            log.exception("disposing of a late lower result")
