"""One log setup for the daemon and its database worker process.

The default log is ``UPPER/.nixfs/nixfs.log``, in a folder the upper's owner
controls: a symlink (or a FIFO) planted at that name must never make a root
daemon append to what it points at, nor hang it.  So the log is only ever
opened by name with ``O_NOFOLLOW`` and kept only if it is a regular file.

Two processes write the one file, and only one may rotate it, or each would
rename the other's file away: the daemon rotates (it logs nearly everything).
The worker never opens the log by name at its start: it inherits the file the
daemon has open (so it cannot be sent elsewhere by a name changed since), and
appends to it with ``O_APPEND`` like the daemon.  Once the daemon has rotated,
the name holds a new file: the worker moves on to it, opened again without
following a symlink, and keeps its current file whenever that is refused.
"""

import errno
import logging
import logging.handlers
import os
import stat
import sys

FORMAT = "%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s"
ROTATE_BYTES = 8 << 20
BACKUPS = 2


def open_log(path: str, *, create: bool = True):
    """*path* opened for appending, never through a symlink, and only if it is a
    regular file (a FIFO is refused, not waited on); raises OSError."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    fd = os.open(path, flags | (os.O_CREAT if create else 0), 0o644)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "a", encoding="utf-8", errors="backslashreplace")


def refusal(path: str, e: OSError) -> str:
    """Why *path* cannot be the log, in a line for the user."""
    if os.path.islink(path):
        return (f"the log {path} is a symbolic link, which nixfs does not follow: give the "
                "file it points to")
    return f"cannot open the log {path}: {e.strerror or e}"


class DaemonLog(logging.handlers.RotatingFileHandler):
    """The daemon's log file: opened without following symlinks, rotated by size."""

    def __init__(self, path: str):
        super().__init__(path, maxBytes=ROTATE_BYTES, backupCount=BACKUPS, encoding="utf-8")

    def _open(self):
        return open_log(self.baseFilename)

    def shared_fd(self) -> int:
        """A duplicate of the open log's descriptor, for a worker to append to (the
        caller closes it).  Under the handler's lock: never a file half rotated."""
        with self.lock:
            if self.stream is None:
                self.stream = self._open()
            self.stream.flush()
            return os.dup(self.stream.fileno())


class WorkerLog(logging.StreamHandler):
    """The worker's side: appends to the file it was given, moving on to the file at
    *path* once the daemon has rotated (without following a symlink there)."""

    def __init__(self, fd: int, path: str):
        super().__init__(os.fdopen(fd, "a", encoding="utf-8", errors="backslashreplace"))
        self.path = path

    def _follow_rotation(self) -> None:
        try:
            named = os.lstat(self.path)
            if os.path.samestat(named, os.fstat(self.stream.fileno())):
                return
            new = open_log(self.path, create=False)  # the daemon makes the new file
        except OSError:
            return  # gone, a symlink, ...: stay with the file we have
        self.stream.close()
        self.stream = new

    def emit(self, record: logging.LogRecord) -> None:
        self._follow_rotation()
        super().emit(record)

    def close(self) -> None:
        with self.lock:
            self.stream.close()
        super().close()


def _install(handler: logging.Handler, debug: bool) -> None:
    handler.setFormatter(logging.Formatter(FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else logging.INFO)


def setup_daemon(path: str | None, debug: bool) -> DaemonLog | None:
    """Log to *path* (None: to stderr); returns the file's handler.  Raises OSError
    where *path* cannot be the log (see ``refusal``)."""
    handler = DaemonLog(path) if path is not None else None
    _install(handler or logging.StreamHandler(sys.stderr), debug)
    return handler


def setup_worker(fd: int | None, path: str | None, debug: bool) -> None:
    """Log where the daemon logs: to the file *fd* it passed, else to stderr."""
    _install(WorkerLog(fd, path) if fd is not None else logging.StreamHandler(sys.stderr), debug)
