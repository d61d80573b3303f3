"""``nixfs fsck``: one run of the checks of an unmounted upper (and its repairs).

It refuses an upper a daemon holds (the daemon's ``.nixfs/lock``) and holds
that lock itself while it works, so no mount starts in between.  Then come
the checks, in order: nixfs' state folder (``statedir``), the upper's tree
beside the lower (``tree``), and for a Nix store the merged database against
the files (``db``).  Repairs change only the upper; the lower is only read.
"""

import os
import stat

from ..overlay import upperformat as fmt
from ..overlay.layers import O_DIR
from ..overlay.state import UpperInUse, take_lock
from ..usage import UsageError, check_dir, is_within
from .progress import Progress
from .report import Report
from .statedir import check_state
from .tree import check_tree


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
    from ..nixdb.files import is_nix_store
    nix = nix and is_nix_store(lower)
    report = Report(repair=repair, progress=progress)
    upper_fd = os.open(upper, O_DIR)
    lower_fd = os.open(lower, O_DIR)
    lock_fd = state_fd = None
    try:
        lock_fd = _lock(upper_fd)
        state_fd = check_state(upper_fd, lower, report)
        check_tree(upper_fd, lower_fd, report, nix=nix)
        if nix:
            from .db import check_db
            check_db(lower, upper, upper_fd, state_fd, report)
    finally:
        for fd in (state_fd, lock_fd, lower_fd, upper_fd):
            if fd is not None:
                os.close(fd)
        if progress is not None:
            progress.close()
    return report
