"""The process that does nixfs' database work through its own mount.

Why a process and not a thread: SQLite on the merged database does file I/O on
nixfs' own mount, answered by the daemon's event loop.  apsw keeps Python's GIL
through some SQLite calls (closing a connection checkpoints the WAL, for one),
so a thread doing that I/O would starve the very loop that must answer it.  A
separate process has its own GIL; its POSIX locks and its mapping of ``-shm``
are still the kernel's per-inode ones for the mount, shared with Nix.

The worker reads the lower database (lock-free snapshots), applies changes to
the merged one through the mount and keeps the lower index; the daemon only
tells the overlay what changed.
"""

import logging
import multiprocessing
import os
import traceback

import trio

log = logging.getLogger(__name__)


class WorkerError(Exception):
    """The worker process failed a request (its traceback is in the message)."""


class SyncWorker:
    """Daemon side: starts the worker and sends it requests, one at a time."""

    def __init__(self, lower: str, upper: str, state_dir: str, mountpoint: str):
        self.args = (lower, upper, state_dir, mountpoint)
        self.proc = None
        self.conn = None
        self.limiter = trio.CapacityLimiter(1)

    def start(self) -> None:
        ctx = multiprocessing.get_context("spawn")  # no fork of a threaded trio process
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(child, *self.args), name="nixfs-db",
                                daemon=True)
        self.proc.start()
        child.close()

    def _call(self, op: str, args: tuple):
        if self.proc is None or not self.proc.is_alive():
            self.start()
        self.conn.send((op, args))
        try:
            status, value = self.conn.recv()
        except EOFError:
            self.proc = None
            raise WorkerError("the database worker died") from None
        if status != "ok":
            raise WorkerError(value)
        return value

    async def call(self, op: str, *args):
        return await trio.to_thread.run_sync(self._call, op, args, limiter=self.limiter)

    def stop(self) -> None:
        if self.proc is not None and self.proc.is_alive():
            try:
                self.conn.send(("quit", ()))
            except OSError:
                pass
            self.proc.join(10)
            if self.proc.is_alive():
                self.proc.kill()
        self.proc = None


class _Handler:
    """Worker side: each request opens the merged database through the mount and
    closes it again, so the mount is never kept busy between requests."""

    def __init__(self, lower, upper, state_dir, mountpoint):
        from .lowerindex import LowerIndex
        from .sync import StoreSync
        self.sync = StoreSync(lower, upper, state_dir)
        self.sync.index = LowerIndex(self.sync.index_path)
        self.db_path = os.path.join(mountpoint, "var/nix/db/db.sqlite")

    def _db(self):
        from .merged import MergedDb, open_db
        return MergedDb(open_db(self.db_path))

    def step(self, force: bool = False):
        """Follow the lower: returns (shown, hidden, duplicates) names, or None."""
        if not (self.sync.changed() or force):
            return None
        changes = self.sync.read_changes()
        if not changes and changes.max_id == self.sync.index.get("lower_max_id", 0):
            return None
        db = self._db()
        try:
            r = self.sync.apply(db, changes)
        finally:
            db.close()
        return r.shown, r.hidden, r.duplicates

    def hide(self, names):
        db = self._db()
        try:
            return self.sync.hide(db, set(names))
        finally:
            db.close()

    def restore(self, names):
        db = self._db()
        try:
            return self.sync.restore(db, list(names))
        finally:
            db.close()

    def stats(self):
        return dict(self.sync.stats)


def _serve(conn, lower, upper, state_dir, mountpoint) -> None:
    logging.basicConfig(level=logging.INFO)
    handler = _Handler(lower, upper, state_dir, mountpoint)
    while True:
        try:
            op, args = conn.recv()
        except (EOFError, OSError):
            return  # the daemon is gone
        if op == "quit":
            return
        try:
            conn.send(("ok", getattr(handler, op)(*args)))
        except Exception:
            conn.send(("err", traceback.format_exc()))
