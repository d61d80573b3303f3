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

import json
import logging
import os
import subprocess
import sys
import traceback

import trio

log = logging.getLogger(__name__)


class WorkerError(Exception):
    """The worker process failed a request (its traceback is in the message)."""


class SyncWorker:
    """Daemon side: starts the worker and sends it requests, one at a time."""

    def __init__(self, lower: str, upper: str, state_dir: str, mountpoint: str,
                 log_file=None, debug: bool = False, keep_fds: tuple = (),
                 db_dir: str | None = None):
        self.args = (lower, upper, state_dir, mountpoint, db_dir, debug)
        self.log_file = log_file  # the daemon's logs.DaemonLog; None: it logs to stderr
        self.keep_fds = keep_fds  # the worker's at the same numbers (a lower under the mount)
        self.proc = None
        self.conn = None
        self.limiter = trio.CapacityLimiter(1)

    def start(self) -> None:
        # A plain subprocess (not multiprocessing, whose helper processes would inherit
        # the caller's stdout): only two pipe ends are passed, stdio goes nowhere.
        import nixfs
        from multiprocessing.connection import Connection
        to_worker_r, to_worker_w = os.pipe()
        from_worker_r, from_worker_w = os.pipe()
        env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(nixfs.__file__)))
        # The log the daemon has open, never its name (see nixfs/logs.py); also the
        # worker's stderr, so even a worker that dies starting leaves its reason there.
        log_fd = None if self.log_file is None else self.log_file.shared_fd()
        log_args = (None, None) if log_fd is None else (log_fd, self.log_file.baseFilename)
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "nixfs.nixdb.worker", str(to_worker_r), str(from_worker_w),
                 json.dumps([*self.args, *log_args])],
                pass_fds=(to_worker_r, from_worker_w, *self.keep_fds,
                          *(() if log_fd is None else (log_fd,))),
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log_fd, env=env)
        finally:
            os.close(to_worker_r)
            os.close(from_worker_w)
            if log_fd is not None:
                os.close(log_fd)
        self._send = Connection(to_worker_w, readable=False)
        self._recv = Connection(from_worker_r, writable=False)

    def ensure_started(self) -> None:
        """The worker process, started if it is not running.  Called at each request,
        and by the daemon as the mount goes live: over a generation the worker opens the
        lower index at once, while the index's bases are there (``_Handler``)."""
        if self.proc is None or self.proc.poll() is not None:
            self.start()

    def _call(self, op: str, args: tuple):
        self.ensure_started()
        try:
            self._send.send((op, args))
            status, value = self._recv.recv()
        except (EOFError, OSError):
            self.proc = None
            raise WorkerError("the database worker died") from None
        if status != "ok":
            raise WorkerError(value)
        return value

    async def call(self, op: str, *args):
        # Cancellable, so a request stuck on a hung lower never keeps the daemon from
        # shutting down (stop() then kills the worker).  The abandoned thread keeps the
        # limiter until it has read its answer, so the next request never gets it.
        return await trio.to_thread.run_sync(self._call, op, args, limiter=self.limiter,
                                             abandon_on_cancel=True)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                self._send.send(("quit", ()))
            except OSError:
                pass
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                try:
                    self.proc.wait(5)
                except subprocess.TimeoutExpired:
                    # Stuck in a request a (FUSE) lower already has: it ends when the
                    # lower answers.  The daemon need not wait for that.
                    log.warning("the database worker (pid %d) waits on the lower; leaving it",
                                self.proc.pid)
        if self.proc is not None:
            self._send.close()
            self._recv.close()
        self.proc = None


class _Handler:
    """Worker side: each request opens the merged database through the mount and
    closes it again, so the mount is never kept busy between requests."""

    def __init__(self, lower, upper, state_dir, mountpoint, db_dir):
        import apsw
        from .sync import StoreSync
        self.sync = StoreSync(lower, upper, state_dir, db_dir=db_dir)
        # At once (the daemon starts the worker as the mount goes live), so its bases are
        # held from then on.  One started after its generation was pruned cannot open
        # it: it still keeps the upper's own rows aside, and following the lower fails
        # (said once) until the next mount rebases.
        try:
            self.sync.ensure_index()
        except (OSError, apsw.Error) as e:
            log.error("cannot open the lower index (%s): not following the lower store "
                      "until the next mount", e)
        self.db_path = os.path.join(mountpoint, "var/nix/db/db.sqlite")
        self.gc_lock_path = os.path.join(mountpoint, "var/nix/gc.lock")
        self.gc_lock_fd = None
        self.own_rows = None  # over a generation, what keeps their copy current

    def _keep_own_rows_current(self) -> None:
        """Over a generation, the upper's own rows copied aside in the round after Nix
        committed one (``ownrows.Keeper``), not only at a clean unmount."""
        from . import genrecord, ownrows
        if self.own_rows is None:
            if genrecord.recorded(self.sync.files) is None:
                self.own_rows = False  # a copied database: read in place, always
                return
            self.own_rows = ownrows.Keeper(self.sync.files, self.sync.upper_store)
        if self.own_rows:
            self.own_rows.refresh(self.db_path)

    def _db(self):
        from .merged import MergedDb, open_db
        return MergedDb(open_db(self.db_path))

    def step(self, force: bool = False):
        """Follow the lower: returns (shown, hidden, duplicates) names, or None."""
        self._keep_own_rows_current()
        self.sync.ensure_index()
        if not (self.sync.changed() or force):
            return None
        try:
            changes = self.sync.read_changes()
            if self.sync.settled(changes):
                return None
            db = self._db()
            try:
                r = self.sync.apply(db, changes)
            finally:
                db.close()
        except BaseException:
            self.sync.forget_signature()  # not followed: the next round tries again
            raise
        return r.shown, r.hidden, r.duplicates

    def hold_gc_lock(self):
        """Take Nix's GC lock shared (through the mount: it is Nix's own lock), so no
        collector starts before the first build is finished."""
        import fcntl
        if self.gc_lock_fd is None:
            fd = os.open(self.gc_lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            fcntl.flock(fd, fcntl.LOCK_SH)  # Nix locks gc.lock with flock(), not fcntl()
            self.gc_lock_fd = fd

    def finish_step(self):
        """Some of the rest of a first build; True once it is all done (lock released)."""
        self.sync.ensure_index()
        done = self.sync.finish(self._db, batches=1)
        if done and self.gc_lock_fd is not None:
            os.close(self.gc_lock_fd)
            self.gc_lock_fd = None
        return done

    def hide(self, names):
        self.sync.ensure_index()
        db = self._db()
        try:
            return self.sync.hide(db, set(names))
        finally:
            db.close()

    def restore(self, names):
        self.sync.ensure_index()
        db = self._db()
        try:
            return self.sync.restore(db, list(names))
        finally:
            db.close()

    def keep_own_rows(self):
        """The upper's own rows copied aside, read through the mount (``ownrows``)."""
        return self.sync.keep_own_rows(self.db_path)

    def stats(self):
        return dict(self.sync.stats)


def _serve(send, recv, lower, upper, state_dir, mountpoint, db_dir, debug, log_fd,
           log_path) -> None:
    from .. import logs
    from .schema import SchemaError
    # Where the daemon logs; never to the terminal the mount was started from.
    logs.setup_worker(log_fd, log_path, debug)
    handler = _Handler(lower, upper, state_dir, mountpoint, db_dir)
    while True:
        try:
            op, args = recv.recv()
        except (EOFError, OSError):
            return  # the daemon is gone
        if op == "quit":
            return
        try:
            send.send(("ok", getattr(handler, op)(*args)))
        except SchemaError as e:
            # A shape nixfs refuses to carry: the one line that names it is the whole story.
            send.send(("err", str(e)))
        except Exception:
            send.send(("err", traceback.format_exc()))


if __name__ == "__main__":
    from multiprocessing.connection import Connection
    _serve(Connection(int(sys.argv[2]), readable=False), Connection(int(sys.argv[1]), writable=False),
           *json.loads(sys.argv[3]))
