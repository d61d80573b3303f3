"""``nixfs fsck``: check (and repair) an unmounted upper.

It refuses an upper a daemon holds (the daemon's ``.nixfs/lock``) and holds
that lock itself while it works, so no mount starts in between.  The checks
live beside what they check: ``overlay/check.py`` (the upper's format and
nixfs' state folder), ``nixdb/check.py`` (the merged Nix database against the
files).  Repairs change only the upper; the lower is only read.

A progress bar (rich) shows on stderr when it is a terminal and the run takes
more than a moment; elsewhere a line every ten seconds says how far it got.
"""

import logging
import os
import stat
import sys
import time

from .fsckreport import Report
from .overlay import upperformat as fmt
from .overlay.check import check_state, check_tree
from .overlay.layers import O_DIR
from .overlay.state import UpperInUse, take_lock
from .usage import UsageError, check_dir, is_within

log = logging.getLogger(__name__)


class Progress:
    """Counts per phase, shown as a rich progress line on a terminal after *delay* s."""

    def __init__(self, *, tty: bool | None = None, delay: float = 0.5, every: float = 10.0):
        self.tty = sys.stderr.isatty() if tty is None else tty
        self.delay, self.every = delay, every
        self.start = time.monotonic()
        self.last_line = self.start
        self.bar = None
        self.tasks: dict[str, int] = {}

    def __call__(self, phase: str, count: int) -> None:
        if count % 256:
            return
        now = time.monotonic()
        if now - self.start < self.delay:
            return
        if self.tty:
            if now - self.last_line >= 0.1:
                self.last_line = now
                self._show(phase, count)
        elif now - self.last_line >= self.every:
            self.last_line = now
            print(f"nixfs fsck: {count} {phase} checked...", file=sys.stderr, flush=True)

    def _show(self, phase: str, count: int) -> None:
        if self.bar is None:
            from rich.progress import Progress as Bar, SpinnerColumn, TextColumn, TimeElapsedColumn
            self.bar = Bar(SpinnerColumn(), TextColumn("{task.description}"),
                           TextColumn("{task.completed}"), TimeElapsedColumn(), transient=True)
            self.bar.start()
        if phase not in self.tasks:
            self.tasks[phase] = self.bar.add_task(f"checking {phase}", total=None)
        self.bar.update(self.tasks[phase], completed=count)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def _lock(upper_fd: int) -> int | None:
    """Take the upper as a daemon would; UsageError if a daemon has it."""
    try:
        st = os.stat(fmt.STATE_DIR, dir_fd=upper_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None
    if not stat.S_ISDIR(st.st_mode):
        return None  # reported by the state check; no daemon can use this upper
    sfd = os.open(fmt.STATE_DIR, O_DIR, dir_fd=upper_fd)
    try:
        return take_lock(sfd)
    except UpperInUse as e:
        raise UsageError(f"the upper is in use by a nixfs mount (pid {e.holder}): unmount it "
                         "first; fsck checks unmounted uppers only") from None
    except OSError:
        return None  # not a regular file: reported by the state check
    finally:
        os.close(sfd)


def fsck(lower: str, upper: str, *, repair: bool = False, nix: bool = True,
         progress: Progress | None = None) -> Report:
    """Check the upper *upper* of the lower *lower*; repair what can be with *repair*."""
    lower = check_dir(lower, "lower", writable=False)
    upper = check_dir(upper, "upper", writable=repair)
    if lower == upper or is_within(upper, lower) or is_within(lower, upper):
        raise UsageError("the lower and the upper overlap")
    from .nixdb.sync import StoreSync
    nix = nix and StoreSync.is_nix_store(lower)
    report = Report(repair=repair, progress=progress)
    upper_fd = os.open(upper, O_DIR)
    lower_fd = os.open(lower, O_DIR)
    lock_fd = state_fd = None
    try:
        lock_fd = _lock(upper_fd)
        state_fd = check_state(upper_fd, report)
        check_tree(upper_fd, lower_fd, report, nix=nix)
        if nix:
            from .nixdb.check import check_db
            check_db(lower, upper, upper_fd, state_fd, report)
    finally:
        for fd in (state_fd, lock_fd, lower_fd, upper_fd):
            if fd is not None:
                os.close(fd)
        if progress is not None:
            progress.close()
    return report
