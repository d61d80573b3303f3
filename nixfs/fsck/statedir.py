"""The check of nixfs' own folder in an upper (``.nixfs``), for ``nixfs fsck``.

A crash or a hand edit can leave ``work/`` leftovers, a lock, format file or
work folder of the wrong type, an unknown format, or a damaged cache.  The
lower index is left to the database check (``db``), which knows what it holds.
"""

import os
import stat

import apsw

from ..cow.vfs import connect
from ..overlay import upperformat as fmt
from ..overlay.layers import O_DIR
from ..overlay.state import FORMATS
from .report import Report
from .upper import lstat_or_none, remove, remove_sqlite

CACHES = (b"listings.sqlite",)  # pure caches: a damaged one is deleted and refetched
STATE = b"/" + fmt.STATE_DIR


def _sqlite_ok(path: str, cow_root: str) -> str | None:
    """None if the SQLite file at *path* (through the nixfs-cow VFS if it is a
    copy-on-write file over a generation in *cow_root*) passes a quick check, else what
    is wrong."""
    try:
        conn = connect(path, base_root=cow_root, flags=apsw.SQLITE_OPEN_READWRITE)
        try:
            conn.setbusytimeout(5000)
            rows = conn.execute("pragma quick_check").fetchall()
        finally:
            conn.close()
    except (apsw.Error, OSError) as e:  # OSError: a copy-on-write file's map or base
        return f"{type(e).__name__}: {e}"
    if rows != [("ok",)]:
        return "; ".join(str(r[0]) for r in rows[:3])
    return None


def check_sqlite(state_fd: int, name: bytes, report: Report, kind: str, why: str,
                 cow_root: str) -> bool:
    """Report a damaged SQLite file in the state folder (repair: delete it); True if fine."""
    if lstat_or_none(state_fd, name) is None:
        return True
    problem = _sqlite_ok(f"/proc/self/fd/{state_fd}/{name.decode()}", cow_root)
    if problem is None:
        return True
    report.add(kind, STATE + b"/" + name, f"{problem} ({why})", fix=remove_sqlite(state_fd, name))
    return False


def _check_work(sfd: int, report: Report) -> None:
    wst = lstat_or_none(sfd, b"work")
    if wst is not None and not stat.S_ISDIR(wst.st_mode):
        report.add("state-folder", STATE + b"/work", "is not a directory",
                   fix=remove(sfd, b"work"))
    elif wst is not None:
        wfd = os.open(b"work", O_DIR, dir_fd=sfd)
        try:
            for name in sorted(os.fsencode(n) for n in os.listdir(wfd)):
                report.count("upper entries")
                report.add("stray-temporary", STATE + b"/work/" + name,
                           "left in the work folder by an interrupted daemon",
                           fix=remove(wfd, name))
        finally:
            os.close(wfd)


def _check_format(sfd: int, report: Report) -> None:
    fst = lstat_or_none(sfd, b"format")
    if fst is None:
        return
    if not stat.S_ISREG(fst.st_mode):
        report.add("state-folder", STATE + b"/format", "is not a regular file",
                   fix=remove(sfd, b"format"))
        return
    fd = os.open(b"format", os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=sfd)
    try:
        version = os.read(fd, 64)
    finally:
        os.close(fd)
    if version not in FORMATS:
        report.add("state-folder", STATE + b"/format",
                   f"unknown format {version[:20]!r} (another nixfs version?)")


def check_state(upper_fd: int, lower: str, report: Report) -> int | None:
    """Check ``.nixfs`` (but the lower index, which the database check owns); return
    its descriptor, or None if there is none to use.  *lower*: where the bases of its
    copy-on-write files are."""
    st = lstat_or_none(upper_fd, fmt.STATE_DIR)
    if st is None:
        return None
    if not stat.S_ISDIR(st.st_mode):
        report.add("state-folder", STATE, "is not a directory: nixfs cannot mount this "
                   "upper (move it away by hand)")
        return None
    sfd = os.open(fmt.STATE_DIR, O_DIR, dir_fd=upper_fd)
    _check_work(sfd, report)
    lst = lstat_or_none(sfd, b"lock")
    if lst is not None and not stat.S_ISREG(lst.st_mode):
        report.add("state-folder", STATE + b"/lock", "is not a regular file",
                   fix=remove(sfd, b"lock"))
    _check_format(sfd, report)
    for name in CACHES:
        check_sqlite(sfd, name, report, "damaged-cache", "a cache: deleting it is safe", lower)
    return sfd
