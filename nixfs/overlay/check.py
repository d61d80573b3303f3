"""Checks of an unmounted upper's format, for ``nixfs fsck``.

Walks the upper once with ``*at`` calls (never following a symlink) beside the
lower directory each upper directory merges with, and reports what a crash or
a hand edit can leave: temporaries outside the work folder, whiteouts and
markers of the wrong type, whiteouts and opaque markers with nothing below
them in the lower, redirects that point nowhere, and nixfs' own state folder
(``work/`` leftovers, the lock, the format file, damaged caches).

Repairs touch only the upper and keep the merged view as it was: a redundant
whiteout goes, a redirect that points nowhere goes (replaced by an opaque
marker where the directory's name has a lower directory: either way it merges
with nothing), a whiteout of the wrong type becomes an empty file.
"""

import contextlib
import os
import stat

import apsw

from ..fsckreport import HARMLESS, NOTE, Report
from . import upperformat as fmt
from .layers import O_DIR, O_DIR_PATH, made_writable, open_dir_path, times_kept
from .state import FORMAT_VERSION, remove_tree

REDIRECT_TMP = fmt.REDIRECT_MARKER + b".tmp"
CACHES = (b"listings.sqlite",)  # pure caches: a damaged one is deleted and refetched


@contextlib.contextmanager
def changing(dirfd: int):
    """Let a repair change entries of *dirfd*: writable for the moment, times kept
    (store paths are read-only with fixed times)."""
    with times_kept(dirfd), made_writable(dirfd):
        yield


def _remove(dirfd: int, name: bytes):
    def fix():
        with changing(dirfd):
            remove_tree(dirfd, name)
    return fix


def _replace_with_file(dirfd: int, name: bytes):
    def fix():
        with changing(dirfd):
            remove_tree(dirfd, name)
            os.close(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                             | os.O_CLOEXEC, 0o600, dir_fd=dirfd))
    return fix


def _drop_redirect(dirfd: int, *, opaque: bool):
    """A redirect that leads nowhere merges with nothing: so does no redirect, or an
    opaque marker where the directory's own name has a lower directory."""
    def fix():
        with changing(dirfd):
            remove_tree(dirfd, fmt.REDIRECT_MARKER)
            if opaque:
                fmt.make_opaque(dirfd)
    return fix


def _lstat(dirfd: int | None, name: bytes) -> os.stat_result | None:
    if dirfd is None:
        return None
    try:
        return os.stat(name, dir_fd=dirfd, follow_symlinks=False)
    except (FileNotFoundError, NotADirectoryError):
        return None


def _open_lower(dirfd: int | None, name: bytes) -> int | None:
    if dirfd is None:
        return None
    try:
        return os.open(name, O_DIR_PATH, dir_fd=dirfd)
    except OSError:  # missing, not a directory, a symlink (ELOOP), unreadable
        return None


def _open_lower_path(root_fd: int, path: bytes) -> int | None:
    try:
        return open_dir_path(root_fd, path)
    except OSError:  # missing, not a directory, a symlink (ELOOP)
        return None


def _xattr_opaque(dirfd: int) -> bool:
    for key in fmt.OPAQUE_XATTRS:
        try:
            if os.getxattr(f"/proc/self/fd/{dirfd}", key) == b"y":
                return True
        except OSError:
            pass
    return False


class TreeCheck:
    """One walk of the upper beside the lower."""

    def __init__(self, upper_fd: int, lower_fd: int, report: Report, *, nix: bool):
        self.upper_fd = upper_fd
        self.lower_fd = lower_fd
        self.report = report
        self.nix = nix

    def run(self) -> None:
        # Each directory: (upper fd, path, lower fd it would merge with, lower fd it merges with).
        self._dir(os.dup(self.upper_fd), b"", os.dup(self.lower_fd), os.dup(self.lower_fd))

    def _redirect(self, ufd: int, rel: bytes, st: os.stat_result, fix) -> tuple[bool, bytes | None]:
        """(usable, target) of a directory's redirect marker; reports what is wrong with it."""
        path = rel + b"/" + fmt.REDIRECT_MARKER
        if not stat.S_ISREG(st.st_mode):
            self.report.add("bad-marker", path, "a redirect marker that is not a regular file "
                            "(the directory cannot be read through the mount)", fix=fix)
            return False, None
        fd = os.open(fmt.REDIRECT_MARKER, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=ufd)
        try:
            data = os.read(fd, 65536)
        finally:
            os.close(fd)
        target = data.strip(b"/")
        parts = target.split(b"/")
        if not target or b"\0" in target or b".." in parts or b"." in parts or b"" in parts:
            self.report.add("bad-redirect", path, f"holds no usable lower path ({data[:80]!r})",
                            fix=fix)
            return False, None
        return True, target

    def _dir(self, ufd: int, rel: bytes, cand: int | None, eff: int | None) -> None:
        """Check the upper directory *ufd* (closed here) and everything below it.

        *cand* is the lower directory it would merge with if nothing hid it (for the
        opaque marker's use), *eff* the one it merges with (None if opaque or hidden)."""
        stack = [(ufd, rel, cand, eff)]
        while stack:
            ufd, rel, cand, eff = stack.pop()
            try:
                stack.extend(reversed(self._entries(ufd, rel, cand, eff)))  # in name order
            finally:
                for fd in {ufd, cand, eff} - {None}:
                    os.close(fd)

    def _entries(self, ufd: int, rel: bytes, cand: int | None, eff: int | None):
        report = self.report
        names = sorted(os.fsencode(n) for n in os.listdir(ufd))
        present = set(names)
        opaque = _xattr_opaque(ufd)
        if fmt.OPAQUE_MARKER in present:
            st = os.stat(fmt.OPAQUE_MARKER, dir_fd=ufd, follow_symlinks=False)
            path = rel + b"/" + fmt.OPAQUE_MARKER
            if not stat.S_ISREG(st.st_mode):
                report.add("bad-marker", path, "an opaque marker that is not a regular file",
                           fix=_replace_with_file(ufd, fmt.OPAQUE_MARKER))
            if cand is None:
                report.add("redundant-opaque", path, "nothing in the lower below it",
                           severity=HARMLESS, fix=_remove(ufd, fmt.OPAQUE_MARKER))
            opaque = True
        if opaque:
            eff = None  # closed by the caller
        children = []
        for name in names:
            report.count("upper entries")
            path = rel + b"/" + name
            if rel == b"" and name == fmt.STATE_DIR:
                continue
            try:
                st = os.stat(name, dir_fd=ufd, follow_symlinks=False)
            except FileNotFoundError:
                continue
            if name in (fmt.OPAQUE_MARKER, fmt.REDIRECT_MARKER):
                continue  # the opaque marker is checked above, a redirect by its parent
            in_store = self.nix and rel == b"/store"
            if name == REDIRECT_TMP or (in_store and name.endswith(fmt.TMP_SUFFIX)):
                report.add("stray-temporary", path, "a temporary file of an interrupted write",
                           fix=_remove(ufd, name))
                continue
            if name.startswith(fmt.WHITEOUT_PREFIX + fmt.WHITEOUT_PREFIX):
                report.add("unknown-marker", path, "a marker nixfs does not know (left alone)",
                           severity=NOTE)
                continue
            if name.startswith(fmt.WHITEOUT_PREFIX):
                target = name[len(fmt.WHITEOUT_PREFIX):]
                if not (stat.S_ISREG(st.st_mode) and st.st_size == 0):
                    report.add("bad-whiteout", path, "a whiteout that is not an empty regular "
                               f"file (mode {st.st_mode:o}, {st.st_size} bytes)",
                               fix=_replace_with_file(ufd, name))
                if _lstat(eff, target) is None:
                    report.add("redundant-whiteout", path, "hides nothing in the lower",
                               severity=HARMLESS, fix=_remove(ufd, name))
                continue
            if fmt.is_kernel_whiteout(st):
                if _lstat(eff, name) is None:
                    report.add("redundant-whiteout", path, "a kernel whiteout that hides "
                               "nothing in the lower", severity=HARMLESS, fix=_remove(ufd, name))
                continue
            if not stat.S_ISDIR(st.st_mode):
                continue
            try:
                cfd = os.open(name, O_DIR, dir_fd=ufd)
            except PermissionError:
                report.add("unreadable", path, "an upper directory fsck cannot read",
                           severity=NOTE)
                continue
            hidden = fmt.whiteout_name(name) in present if fmt.whiteout_fits(name) else False
            ccand = _open_lower(eff, name)  # the lower directory its name gives it
            ceff = None if ccand is None or hidden else os.dup(ccand)
            rst = _lstat(cfd, fmt.REDIRECT_MARKER)
            if rst is not None:
                # A redirect replaces the name's lower directory, also for a hidden name.
                if ceff is not None:
                    os.close(ceff)
                ceff = None
                fix = _drop_redirect(cfd, opaque=ccand is not None and not hidden)
                usable, target = self._redirect(cfd, path, rst, fix)
                if usable:
                    ceff = _open_lower_path(self.lower_fd, target)
                    if ceff is None:
                        report.add("dangling-redirect", path + b"/" + fmt.REDIRECT_MARKER,
                                   f"points to /{target.decode(errors='replace')}, which the "
                                   "lower does not have", severity=HARMLESS, fix=fix)
                    elif ccand is None:
                        ccand = os.dup(ceff)
            children.append((cfd, path, ccand, ceff))
        return children


def check_tree(upper_fd: int, lower_fd: int, report: Report, *, nix: bool) -> None:
    TreeCheck(upper_fd, lower_fd, report, nix=nix).run()


def _sqlite_ok(path: str) -> str | None:
    """None if the SQLite file at *path* passes a quick check, else what is wrong."""
    try:
        conn = apsw.Connection(path, flags=apsw.SQLITE_OPEN_READWRITE)
        try:
            conn.setbusytimeout(5000)
            rows = conn.execute("pragma quick_check").fetchall()
        finally:
            conn.close()
    except apsw.Error as e:
        return f"{type(e).__name__}: {e}"
    if rows != [("ok",)]:
        return "; ".join(str(r[0]) for r in rows[:3])
    return None


def remove_sqlite(dirfd: int, name: bytes):
    def fix():
        for suffix in (b"", b"-wal", b"-shm", b"-journal"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name + suffix, dir_fd=dirfd)
    return fix


def check_sqlite(state_fd: int, name: bytes, report: Report, kind: str, why: str) -> bool:
    """Report a damaged SQLite file in the state folder (repair: delete it); True if fine."""
    if _lstat(state_fd, name) is None:
        return True
    problem = _sqlite_ok(f"/proc/self/fd/{state_fd}/{name.decode()}")
    if problem is None:
        return True
    report.add(kind, b"/.nixfs/" + name, f"{problem} ({why})", fix=remove_sqlite(state_fd, name))
    return False


def check_state(upper_fd: int, report: Report) -> int | None:
    """Check ``.nixfs`` (but the lower index, which the database check owns); return
    its descriptor, or None if there is none to use."""
    st = _lstat(upper_fd, fmt.STATE_DIR)
    if st is None:
        return None
    if not stat.S_ISDIR(st.st_mode):
        report.add("state-folder", b"/.nixfs", "is not a directory: nixfs cannot mount this "
                   "upper (move it away by hand)")
        return None
    sfd = os.open(fmt.STATE_DIR, O_DIR, dir_fd=upper_fd)
    wst = _lstat(sfd, b"work")
    if wst is not None and not stat.S_ISDIR(wst.st_mode):
        report.add("state-folder", b"/.nixfs/work", "is not a directory",
                   fix=_remove(sfd, b"work"))
    elif wst is not None:
        wfd = os.open(b"work", O_DIR, dir_fd=sfd)
        try:
            for name in sorted(os.fsencode(n) for n in os.listdir(wfd)):
                report.count("upper entries")
                report.add("stray-temporary", b"/.nixfs/work/" + name,
                           "left in the work folder by an interrupted daemon",
                           fix=_remove(wfd, name))
        finally:
            os.close(wfd)
    lst = _lstat(sfd, b"lock")
    if lst is not None and not stat.S_ISREG(lst.st_mode):
        report.add("state-folder", b"/.nixfs/lock", "is not a regular file",
                   fix=_remove(sfd, b"lock"))
    fst = _lstat(sfd, b"format")
    if fst is not None:
        if not stat.S_ISREG(fst.st_mode):
            report.add("state-folder", b"/.nixfs/format", "is not a regular file",
                       fix=_remove(sfd, b"format"))
        else:
            fd = os.open(b"format", os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=sfd)
            try:
                version = os.read(fd, 64)
            finally:
                os.close(fd)
            if version != FORMAT_VERSION:
                report.add("state-folder", b"/.nixfs/format",
                           f"unknown format {version[:20]!r} (another nixfs version?)")
    for name in CACHES:
        check_sqlite(sfd, name, report, "damaged-cache", "a cache: deleting it is safe")
    return sfd
