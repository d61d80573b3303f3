"""Starting a mount: checks, then the daemon forked (or kept in the foreground), and
the answer the daemon gives its parent once the file system answers, or why not.

``nixfs mount`` returns only when the mount is usable or has failed: the forked daemon
reports through a pipe (``ok``, or ``CODE:message``), and the parent prints the failure
and exits with its code.  In the foreground there is no parent: the daemon prints it.
"""

import os
import signal
import sys

from .. import libc
from ..config import MountConfig
from .preflight import check, is_nix_store


class Report:
    """How the daemon tells whoever waits for it that the start went well, or not.

    *ready_fd* is the pipe to the parent (None in the foreground); *on_ready* is what
    the foreground does once the mount is usable.  Answered once: a later failure
    (the daemon's end) is only logged."""

    def __init__(self, ready_fd: int | None, on_ready=None):
        self.ready_fd = ready_fd
        self.on_ready = on_ready

    @property
    def to_parent(self) -> bool:
        return self.ready_fd is not None

    def __call__(self, message: str, code: int = 0) -> int:
        """Tell the waiting parent how the start went; return *code*."""
        if self.ready_fd is not None:
            os.write(self.ready_fd, (f"{code}:{message}" if code else "ok").encode())
            os.close(self.ready_fd)
        elif code:
            print(f"nixfs: {message}", file=sys.stderr)
        elif self.on_ready is not None:
            self.on_ready()
        return code


def store_uri(mountpoint: str) -> str:
    """How a stock Nix reaches the store mounted at *mountpoint* (``.../nix``)."""
    from ..nixdb.gc import nix_store_args
    args = nix_store_args(mountpoint)
    return f"--store '{args[1]}'" if args else "/nix (the default store)"


def mount(cfg: MountConfig) -> int:
    """Check, then serve *cfg* in the foreground or from a daemon; return the exit code."""
    from .serve import serve
    check(cfg)
    nix = is_nix_store(cfg)

    def announce():
        if nix and not cfg.quiet:
            print(f"nixfs: {cfg.mountpoint} merges the Nix store {cfg.lower}; Nix uses it with "
                  f"{store_uri(cfg.mountpoint)}", flush=True)

    if cfg.foreground:
        return serve(cfg, Report(None, on_ready=announce))
    r, w = os.pipe()
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:  # the daemon
        os.close(r)
        os.setsid()
        code = 1
        try:
            if cfg.exit_with_parent:
                _exit_with(parent)
            code = serve(cfg, Report(w))
        finally:
            os._exit(code)
    os.close(w)
    return _wait_for_daemon(r, pid, announce)


def _wait_for_daemon(r: int, pid: int, announce) -> int:
    """The daemon's answer on the pipe *r*: 0 once it serves, else its code (printed)."""
    with os.fdopen(r, "rb") as pipe:
        answer = pipe.read().decode(errors="replace").strip()
    if answer == "ok":
        announce()
        return 0
    code, _, message = answer.partition(":")
    if not message:
        _, status = os.waitpid(pid, 0)
        code, message = "1", f"the daemon exited with status {os.waitstatus_to_exitcode(status)}"
    print(f"nixfs: {message}", file=sys.stderr)
    return int(code)


def exit_now(code: int) -> None:
    """End the ``nixfs mount`` that started a daemon, now that it answered: the daemon is
    a forked copy, so this process holds nothing to close, and Python's own shutdown of
    every module the daemon needed (trio, pyfuse3, the overlay) took 0.05-0.27 s here,
    on the way to the first answer of whoever waits for the mount."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _exit_with(parent: int) -> None:
    """Get SIGTERM (and so unmount) when *parent* dies: nothing else would end a mount in
    a namespace whose other processes are gone."""
    libc.set_parent_death_signal(signal.SIGTERM)
    if os.getppid() != parent:
        raise SystemExit(1)

