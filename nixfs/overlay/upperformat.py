"""The upper layer's on-disk format: whiteouts, opaque directories, redirects.

nixfs writes a format that needs no privileges (the OCI layer convention):

- ``.wh.NAME`` beside ``NAME`` hides the lower ``NAME``.  An upper ``NAME`` next to
  it is still shown; if that is a directory it does not merge with the lower one.
- ``.wh..wh..opq`` inside a directory makes it opaque: no lower entries show.
- ``.wh..wh..nixfs-redirect`` inside a directory holds the lower path (``/`` and
  the path from the lower root, as raw bytes with no newline) whose entries the
  directory merges with.  It is written when a
  directory that has lower entries is renamed, and travels with the directory.
- ``.wh..wh..nixfs-cow.NAME`` beside ``NAME``: ``NAME`` is a copy-on-write delta, this
  its map (nixfs/cow owns the map's format; overlay/cowfiles serves the pair as one file).

It also reads what kernel overlayfs writes: character devices 0/0 as whiteouts,
``trusted.overlay.opaque``/``user.overlay.opaque`` = ``y`` and
``trusted.overlay.redirect``/``user.overlay.redirect``.

Names starting with ``.wh.`` are reserved: they never appear in the merged view
and cannot be created through it.  nixfs keeps its own state in ``.nixfs`` at
the upper's root, which the merged view does not show either.
"""

import itertools
import os
import stat

from ..cow.cowmap import MAP_PREFIX

WHITEOUT_PREFIX = b".wh."
OPAQUE_MARKER = b".wh..wh..opq"
REDIRECT_MARKER = b".wh..wh..nixfs-redirect"
REDIRECT_TMP = REDIRECT_MARKER + b".tmp"  # a redirect being written outside the work folder
# ``.wh..wh..nixfs-cow.NAME`` beside ``NAME``: NAME is a copy-on-write delta over a base
# in the lower, this its map (nixfs/cow; served as one ordinary file by overlay/cowfiles).
COW_MAP_PREFIX = MAP_PREFIX
STATE_DIR = b".nixfs"
# A file being written beside its final name, renamed there once complete (the GC root's
# store file, nixdb/gcroot.py): a crash can leave one behind.
TMP_SUFFIX = b".nixfs-tmp"
NAME_MAX = 255
# In the state folder: where copy-ups are built and removed trees emptied; the lock the
# mounted daemon holds (with its pid); the format version; the daemon's log.
WORK_DIR = b"work"
LOCK_FILE = b"lock"
FORMAT_FILE = b"format"
LOG_FILE = b"nixfs.log"
# In the state folder of an upper whose database is copy-on-write over a published
# generation of the lower (nixdb/fromgeneration.py): which one (its number and manifest
# hash), and a copy of the upper's own database rows (nixdb/ownrows.py), kept for when
# that generation is pruned before the next mount rebases onto a newer one.
GENERATION_FILE = b"generation"
OWN_ROWS_FILE = b"own-rows.sqlite"

# Kernel overlayfs keeps its metadata in these xattr namespaces; the merged view
# neither shows nor accepts them.
OVERLAY_XATTR_PREFIXES = ("trusted.overlay.", "user.overlay.")
OPAQUE_XATTRS = tuple(p + "opaque" for p in OVERLAY_XATTR_PREFIXES)
_REDIRECT_XATTRS = tuple(p + "redirect" for p in OVERLAY_XATTR_PREFIXES)


def is_reserved(name: bytes) -> bool:
    """True for names the merged view never shows and never creates."""
    return name.startswith(WHITEOUT_PREFIX)


def whiteout_name(name: bytes) -> bytes:
    return WHITEOUT_PREFIX + name


def cow_map_name(name: bytes) -> bytes:
    """The name of the map of a COW file named *name*, beside it."""
    return COW_MAP_PREFIX + name


def drop_stale_cow_map(dirfd: int, name: bytes) -> None:
    """Remove a COW map left beside *name* with no delta (an unlink of a COW file removes
    the delta first, then its map: a crash in between leaves one), before a new file
    takes the name, which it would otherwise claim as a COW."""
    if len(COW_MAP_PREFIX) + len(name) <= NAME_MAX:
        try:
            os.unlink(cow_map_name(name), dir_fd=dirfd)
        except FileNotFoundError:
            pass


def whiteout_fits(name: bytes) -> bool:
    """Whether ``.wh.NAME`` is a legal name; longer names get a kernel whiteout."""
    return len(name) + len(WHITEOUT_PREFIX) <= NAME_MAX


def state_dir(upper: str) -> str:
    """The path of nixfs' own folder in the upper at *upper*."""
    return os.path.join(upper, os.fsdecode(STATE_DIR))


class WorkNames:
    """Names for the work folder: ``KIND.PID.N`` (``tmp`` a copy being built, ``wh`` a
    whiteout, ``trash`` a tree being removed), never the same twice in a process."""

    def __init__(self):
        self._numbers = itertools.count(1)

    def next(self, kind: str = "tmp") -> bytes:
        return f"{kind}.{os.getpid()}.{next(self._numbers)}".encode()


def is_kernel_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def is_overlay_xattr(name: str) -> bool:
    return name.startswith(OVERLAY_XATTR_PREFIXES)


def _xattr_path(fd: int) -> str:
    # O_PATH descriptors cannot be used with f*xattr; their /proc link can.
    return f"/proc/self/fd/{fd}"


def read_dir_flags(dirfd: int) -> tuple[bool, bytes | None]:
    """Return ``(opaque, redirect)`` for an upper directory open as *dirfd*.

    *redirect* is a lower path relative to the lower root, or a bare name that is
    relative to the parent's lower directory (kernel overlayfs' short form),
    marked by not starting with ``/``; nixfs' own redirects are always absolute.
    """
    opaque = _exists(dirfd, OPAQUE_MARKER)
    redirect = None
    try:
        fd = os.open(REDIRECT_MARKER, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirfd)
    except FileNotFoundError:
        pass
    else:
        try:
            redirect = b"/" + _read_all(fd).strip(b"/")  # exact bytes: names may hold newlines
        finally:
            os.close(fd)
    try:
        names = os.listxattr(_xattr_path(dirfd))
    except OSError:
        names = []
    for name in names:
        if name in OPAQUE_XATTRS:
            opaque = opaque or _getxattr(dirfd, name) == b"y"
        elif name in _REDIRECT_XATTRS and redirect is None:
            value = _getxattr(dirfd, name)
            if value:
                redirect = value.rstrip(b"\0")
    return opaque, redirect


def write_redirect(dirfd: int, lower_path: bytes, work: tuple[int, bytes] | None = None) -> None:
    """Record that the directory open as *dirfd* merges with *lower_path*.

    Written to a temporary name and renamed, so a crash leaves the old marker or
    the new one, never a torn one.  With *work* (the work folder's descriptor and a
    free name there) the temporary is made in the work folder, which the next
    mount empties, so a crash leaves nothing behind in the tree either.
    """
    tmp_dir, tmp = work if work is not None else (dirfd, REDIRECT_TMP)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600, dir_fd=tmp_dir)
    try:
        os.write(fd, b"/" + lower_path.strip(b"/"))
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.rename(tmp, REDIRECT_MARKER, src_dir_fd=tmp_dir, dst_dir_fd=dirfd)
    except BaseException:
        os.unlink(tmp, dir_fd=tmp_dir)
        raise


def make_whiteout(dirfd: int, name: bytes) -> None:
    """Hide the lower *name*: ``.wh.NAME``, or a kernel whiteout if that is too long."""
    if whiteout_fits(name):
        fd = os.open(whiteout_name(name), os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600, dir_fd=dirfd)
        os.close(fd)
    else:
        os.mknod(name, stat.S_IFCHR | 0o600, 0, dir_fd=dirfd)


def has_whiteout(dirfd: int, name: bytes) -> bool:
    return whiteout_fits(name) and _exists(dirfd, whiteout_name(name))


def make_opaque(dirfd: int) -> None:
    fd = os.open(OPAQUE_MARKER, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600, dir_fd=dirfd)
    os.close(fd)


def _exists(dirfd: int, name: bytes) -> bool:
    try:
        os.stat(name, dir_fd=dirfd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def _getxattr(fd: int, name: str) -> bytes | None:
    try:
        return os.getxattr(_xattr_path(fd), name)
    except OSError:
        return None


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    return b"".join(chunks)
