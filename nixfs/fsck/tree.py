"""The check of an unmounted upper's tree, for ``nixfs fsck``.

Walks the upper once with ``*at`` calls (never following a symlink) beside the
lower directory each upper directory merges with, and reports what a crash or
a hand edit can leave: temporaries outside the work folder, whiteouts and
markers of the wrong type, whiteouts and opaque markers with nothing below
them in the lower, redirects that point nowhere, and copy-on-write maps that
are damaged or have no delta beside them.

Repairs touch only the upper and keep the merged view as it was: a redundant
whiteout goes, a redirect that points nowhere goes (replaced by an opaque
marker where the directory's name has a lower directory: either way it merges
with nothing), a whiteout of the wrong type becomes an empty file.
"""

import os
import stat

from ..cow import cowmap
from ..overlay import upperformat as fmt
from ..overlay.layers import O_DIR, O_DIR_PATH, open_dir_path
from ..overlay.state import remove_tree
from .report import HARMLESS, NOTE, Report
from .upper import changing, lstat_or_none, remove, replace_with_file


def _drop_redirect(dirfd: int, *, opaque: bool):
    """A redirect that leads nowhere merges with nothing: so does no redirect, or an
    opaque marker where the directory's own name has a lower directory."""
    def fix():
        with changing(dirfd):
            remove_tree(dirfd, fmt.REDIRECT_MARKER)
            if opaque:
                fmt.make_opaque(dirfd)
    return fix


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
        """Check the entries of *ufd*; return its subdirectories to walk, as
        (upper fd, path, candidate lower fd, effective lower fd)."""
        names = sorted(os.fsencode(n) for n in os.listdir(ufd))
        present = set(names)
        if self._opaque(ufd, rel, cand, present):
            eff = None  # closed by the caller
        children = []
        for name in names:
            self.report.count("upper entries")
            if rel == b"" and name == fmt.STATE_DIR:
                continue  # checked by statedir
            child = self._entry(ufd, rel, name, eff, present)
            if child is not None:
                children.append(child)
        return children

    def _opaque(self, ufd: int, rel: bytes, cand: int | None, present: set[bytes]) -> bool:
        """Whether the directory is opaque; checks its opaque marker."""
        opaque = _xattr_opaque(ufd)
        if fmt.OPAQUE_MARKER in present:
            st = os.stat(fmt.OPAQUE_MARKER, dir_fd=ufd, follow_symlinks=False)
            path = rel + b"/" + fmt.OPAQUE_MARKER
            if not stat.S_ISREG(st.st_mode):
                self.report.add("bad-marker", path, "an opaque marker that is not a regular file",
                                fix=replace_with_file(ufd, fmt.OPAQUE_MARKER))
            if cand is None:
                self.report.add("redundant-opaque", path, "nothing in the lower below it",
                                severity=HARMLESS, fix=remove(ufd, fmt.OPAQUE_MARKER))
            opaque = True
        return opaque

    def _entry(self, ufd: int, rel: bytes, name: bytes, eff: int | None, present: set[bytes]):
        """Check the entry *name*; a directory to walk into, else None."""
        path = rel + b"/" + name
        st = lstat_or_none(ufd, name)
        if st is None or name in (fmt.OPAQUE_MARKER, fmt.REDIRECT_MARKER):
            return None  # the opaque marker is checked by _opaque, a redirect by its parent
        if self._marker(ufd, rel, name, st, eff) or not stat.S_ISDIR(st.st_mode):
            return None
        try:
            cfd = os.open(name, O_DIR, dir_fd=ufd)
        except PermissionError:
            self.report.add("unreadable", path, "an upper directory fsck cannot read",
                            severity=NOTE)
            return None
        hidden = fmt.whiteout_name(name) in present if fmt.whiteout_fits(name) else False
        return self._subdir(cfd, path, _open_lower(eff, name), hidden)

    def _marker(self, ufd: int, rel: bytes, name: bytes, st: os.stat_result,
                eff: int | None) -> bool:
        """Check *name* if it is a temporary, a whiteout or a marker (then True)."""
        report, path = self.report, rel + b"/" + name
        in_store = self.nix and rel == b"/store"
        if name == fmt.REDIRECT_TMP or (in_store and name.endswith(fmt.TMP_SUFFIX)):
            report.add("stray-temporary", path, "a temporary file of an interrupted write",
                       fix=remove(ufd, name))
        elif name.startswith(fmt.COW_MAP_PREFIX):
            self._cow_map(ufd, path, name)
        elif name.startswith(cowmap.TMP_PREFIX):
            report.add("stray-temporary", path, "a COW map of an interrupted write",
                       severity=HARMLESS, fix=remove(ufd, name))
        elif name.startswith(fmt.WHITEOUT_PREFIX + fmt.WHITEOUT_PREFIX):
            report.add("unknown-marker", path, "a marker nixfs does not know (left alone)",
                       severity=NOTE)
        elif name.startswith(fmt.WHITEOUT_PREFIX):
            if not (stat.S_ISREG(st.st_mode) and st.st_size == 0):
                report.add("bad-whiteout", path, "a whiteout that is not an empty regular "
                           f"file (mode {st.st_mode:o}, {st.st_size} bytes)",
                           fix=replace_with_file(ufd, name))
            if lstat_or_none(eff, name[len(fmt.WHITEOUT_PREFIX):]) is None:
                report.add("redundant-whiteout", path, "hides nothing in the lower",
                           severity=HARMLESS, fix=remove(ufd, name))
        elif fmt.is_kernel_whiteout(st):
            if lstat_or_none(eff, name) is None:
                report.add("redundant-whiteout", path, "a kernel whiteout that hides "
                           "nothing in the lower", severity=HARMLESS, fix=remove(ufd, name))
        else:
            return False
        return True

    def _cow_map(self, ufd: int, path: bytes, name: bytes) -> None:
        """The map of a copy-on-write file: its delta beside it, and readable.  One with
        no delta is what a crash in the middle of an unlink leaves (nothing shows it)."""
        delta = name[len(fmt.COW_MAP_PREFIX):]
        st = lstat_or_none(ufd, delta)
        if st is None:
            self.report.add("stale-cow-map", path, "a COW map with no delta beside it",
                            severity=HARMLESS, fix=remove(ufd, name))
            return
        try:
            cowmap.read(name, ufd)
        except cowmap.CowError as e:
            self.report.add("cow-map-damaged", path, f"{e.strerror} (reads of the file fail)")
            return
        if not stat.S_ISREG(st.st_mode):
            self.report.add("cow-map-damaged", path, "the COW map of something that is not "
                            "a regular file")

    def _subdir(self, cfd: int, path: bytes, ccand: int | None, hidden: bool):
        """The upper directory *cfd* with the lower ones it merges with: *ccand*, the
        one its name gives it, unless hidden or replaced by its redirect."""
        ceff = None if ccand is None or hidden else os.dup(ccand)
        rst = lstat_or_none(cfd, fmt.REDIRECT_MARKER)
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
                    self.report.add("dangling-redirect", path + b"/" + fmt.REDIRECT_MARKER,
                                    f"points to /{target.decode(errors='replace')}, which the "
                                    "lower does not have", severity=HARMLESS, fix=fix)
                elif ccand is None:
                    ccand = os.dup(ceff)
        return cfd, path, ccand, ceff


def check_tree(upper_fd: int, lower_fd: int, report: Report, *, nix: bool) -> None:
    TreeCheck(upper_fd, lower_fd, report, nix=nix).run()
