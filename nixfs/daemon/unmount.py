"""``nixfs umount``: unmount, then wait until the daemon has written everything out.

The command side of a mount's end: it refuses at once, naming them, while processes
use the mount (unless told to detach it), asks the daemon to let go of the mount
itself, unmounts (mount(2) where this process may, fusermount3 otherwise) and waits
for the daemon to exit, which it does once the upper is synced.
"""

import errno
import os
import subprocess
import sys
import time

from .. import control, holders, libc, runtime
from ..usage import UsageError
from .preflight import may_mount


def _umount2(path: str, flags: int) -> int:
    try:
        libc.umount2(path.encode(), flags)
    except OSError as e:
        return e.errno
    return 0


def umount(mountpoint: str, *, lazy: bool = False, timeout: float = 600.0) -> int:
    """Unmount a nixfs mount and wait until its daemon has written everything out;
    refuse at once, naming them, while processes use it (unless *lazy*)."""
    mnt = runtime.canonical(mountpoint)
    entry = runtime.find_mount(mnt)
    if entry is None:
        raise UsageError(f"{mountpoint} is not mounted")
    if entry.fstype != runtime.FSTYPE:
        raise UsageError(f"{mountpoint} is not a nixfs mount (it is {entry.fstype})")
    info = runtime.read_record(mnt)
    daemon = {info["pid"]} if info else set()
    users = [h for h in holders.find(entry, spare=daemon) if not h.only_a_copy]
    if users and not lazy:
        raise UsageError(f"{mountpoint} is busy: {holders.describe(users)} (stop them, or "
                         "detach it now with --lazy)")
    _pause(mnt, info)
    code = _detach(mountpoint, mnt) if lazy else _unmount(mountpoint, mnt, entry, daemon)
    if code or info is None:
        return code
    # Gone here; copies of it in other mount namespaces keep its daemon serving them.
    left = holders.lasting(entry, spare=daemon)
    if left:
        done = "detached" if lazy else "unmounted here"
        print(f"nixfs: {mountpoint} is {done}; its daemon (pid {info['pid']}) writes "
              f"everything out and exits once {holders.describe(left)} let go", file=sys.stderr)
        return 0
    _wait_for_exit(info["pid"], timeout)
    return 0


def _pause(mnt: str, info: dict | None) -> None:
    """Make the daemon's own database work and stats (stale_attrs) let go of the mount."""
    if info is not None:
        try:
            control.request(mnt, "pause")
        except control.ControlError:
            pass


def _unmount(mountpoint: str, mnt: str, entry, daemon: set[int]) -> int:
    """A plain unmount; the daemon itself may hold a file there for a moment."""
    err = errno.EPERM
    if may_mount():
        for _ in range(20):
            err = _umount2(mnt, 0)
            if err != errno.EBUSY:
                break
            time.sleep(0.1)
    if err == errno.EBUSY:
        held = holders.find(entry, spare=daemon)
        who = holders.describe(held) if held else "processes this user cannot inspect"
        raise UsageError(f"{mountpoint} is busy: {who} (stop them, or detach it now with --lazy)")
    return _fusermount(mountpoint, mnt, lazy=False) if err else 0


def _detach(mountpoint: str, mnt: str) -> int:
    err = _umount2(mnt, libc.MNT_DETACH) if may_mount() else errno.EPERM
    return _fusermount(mountpoint, mnt, lazy=True) if err else 0


def _fusermount(mountpoint: str, mnt: str, *, lazy: bool) -> int:
    """An ordinary user unmounts through the setuid helper."""
    cmd = ["fusermount3", "-u"] + (["-z"] if lazy else []) + [mnt]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        message = proc.stderr.strip() or f"fusermount3 exited with {proc.returncode}"
        if "busy" in message.lower():
            raise UsageError(f"{mountpoint} is busy: {message} (or use --lazy)")
        print(f"nixfs: {message}", file=sys.stderr)
        return 1
    return 0


def _wait_for_exit(pid: int, timeout: float) -> None:
    import select
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        deadline = time.monotonic() + timeout
        warned = False
        while not poller.poll(1000):
            if not warned and time.monotonic() > deadline - timeout + 5:
                print(f"nixfs: waiting for the daemon (pid {pid}) to write everything out...",
                      file=sys.stderr)
                warned = True
            if time.monotonic() > deadline:
                raise UsageError(f"the daemon (pid {pid}) did not exit within {timeout:.0f} s")
    finally:
        os.close(pidfd)
