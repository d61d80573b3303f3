"""Blocking calls that may touch the lower, run in worker threads behind a limit and a timeout.

The lower may be NFS or any slow or failing file system.  Everything that can block on
it goes through one runner: the lower layer's own calls (``lowerlayer``) and the reads
of files whose content lies on the lower (a published generation's catalog and lower
index, read through copy-on-write files).  So a stalled lower never stalls the event
loop nor takes threads from upper work, and fails with EIO after the timeout; what a
call given up on returns late is disposed of (descriptors closed), so an outage leaks
nothing.
"""

import errno
import logging
import threading

import trio

log = logging.getLogger(__name__)


class LowerRunner:
    """Runs ``fn(*args)`` in a worker thread, at most *threads* at once.

    A call that takes longer than *timeout* seconds (None or 0: no limit) fails with
    EIO; its thread is abandoned (it finishes or hangs on its own, never holding the
    event loop).  What an abandoned call returns when it finishes late is handed to
    its *late* callback in that thread."""

    def __init__(self, *, threads: int = 8, timeout: float | None = None):
        self.limiter = trio.CapacityLimiter(threads)
        self.timeout = timeout
        self.timeouts = 0  # calls given up on
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
        self.timeouts += 1
        if not self.out:  # once per outage, not for every call it fails
            log.warning("the lower did not answer in %g s: answering EIO (lower_timeout)",
                        self.timeout)
        self.out = True
        raise OSError(errno.EIO, "the lower layer did not answer in time")


class _Late:
    """Hands the result of an abandoned call to its *late* callback, exactly once:
    whether the thread finishes before or after the caller gives up."""

    __slots__ = ("late", "runner", "lock", "abandoned", "done", "result")

    def __init__(self, late, runner: LowerRunner):
        self.late = late
        self.runner = runner
        self.lock = threading.Lock()
        self.abandoned = self.done = False
        self.result = None

    def call(self, fn, *args):
        try:
            result = fn(*args)
        finally:
            self.runner.out = False  # it answered (a plain store: safe from a thread)
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
