"""The two layers, seen as directory descriptors.

Every access is an ``*at`` call on a directory descriptor with a single-component
name and ``O_NOFOLLOW``/``AT_SYMLINK_NOFOLLOW``, so a symlink inside a layer is
never followed.  Each call is counted by kind: the counts are what tests and
``nixfs status`` use to show how often a (possibly slow) lower is touched.

The upper is local and answered inline; only it is written (``upperlayer``).
The lower may be NFS: its calls run in worker threads behind a limit and a
timeout (``lowerlayer``), so a slow or hung lower never stalls the event loop
and fails with EIO instead of hanging.
"""

import collections
import errno
import os
import stat
from contextlib import contextmanager

O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
O_DIR_PATH = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def open_dir(dirfd: int, name: bytes) -> int:
    """Open a subdirectory; ELOOP/ENOTDIR if it is a symlink or no directory."""
    try:
        return os.open(name, O_DIR, dir_fd=dirfd)
    except PermissionError:
        # An unreadable directory can still be walked through (mode 0311).
        return os.open(name, O_DIR_PATH, dir_fd=dirfd)


def open_dir_path(root_fd: int, path: bytes, open_one=open_dir) -> int:
    """Open a directory by a path below *root_fd*, one component at a time (each
    opened by *open_one*, so never through a symlink)."""
    fd = os.dup(root_fd)
    try:
        for part in path.split(b"/"):
            if not part or part == b".":
                continue
            if part == b"..":
                raise OSError(errno.EINVAL, "'..' in a layer path")
            child = open_one(fd, part)
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


@contextmanager
def made_writable(dirfd: int):
    """Let this process change entries of an upper directory it (or Nix) made
    read-only, for the moment: its mode is put back after."""
    st = os.fstat(dirfd)
    if st.st_mode & 0o300 == 0o300:
        yield
        return
    path = f"/proc/self/fd/{dirfd}"
    os.chmod(path, stat.S_IMODE(st.st_mode) | 0o300)
    try:
        yield
    finally:
        os.chmod(path, stat.S_IMODE(st.st_mode))


@contextmanager
def times_kept(dirfd: int):
    """Change entries of a directory without it showing as changed: its times are put back."""
    st = os.fstat(dirfd)
    try:
        yield
    finally:
        os.utime(f"/proc/self/fd/{dirfd}", ns=(st.st_atime_ns, st.st_mtime_ns))


NO_XATTRS = (errno.ENOTSUP, errno.EPERM, errno.EACCES)  # none readable here: {}
GONE_XATTR = (errno.ENODATA,) + NO_XATTRS  # one listed but not readable: left out


def read_all_xattrs(target, *, follow_symlinks: bool = True, calls=None) -> dict[str, bytes]:
    """Every xattr of *target* (a path, or a descriptor) that the caller may read, {}
    where none may be; *calls*, if given, counts the listxattr and getxattr calls."""
    if calls is not None:
        calls["listxattr"] += 1
    try:
        names = os.listxattr(target, follow_symlinks=follow_symlinks)
    except OSError as e:
        if e.errno in NO_XATTRS:
            return {}
        raise
    out = {}
    for attr in names:
        if calls is not None:
            calls["getxattr"] += 1
        try:
            out[attr] = os.getxattr(target, attr, follow_symlinks=follow_symlinks)
        except OSError as e:
            if e.errno not in GONE_XATTR:
                raise
    return out


class Layer:
    """Synchronous primitives on one layer, counted by kind."""

    def __init__(self, root: str, *, name: str):
        self.name = name
        self.root = root
        self.root_fd = os.open(root, O_DIR)
        self.calls: collections.Counter[str] = collections.Counter()

    def close(self) -> None:
        os.close(self.root_fd)

    def lstat(self, dirfd: int, name: bytes) -> os.stat_result:
        self.calls["lstat"] += 1
        return os.stat(name, dir_fd=dirfd, follow_symlinks=False)

    def fstat(self, fd: int) -> os.stat_result:
        self.calls["fstat"] += 1
        return os.fstat(fd)

    def open_dir(self, dirfd: int, name: bytes) -> int:
        """Open a subdirectory; ELOOP/ENOTDIR if it is a symlink or no directory."""
        self.calls["open_dir"] += 1
        return open_dir(dirfd, name)

    def open_dir_path(self, path: bytes) -> int:
        """Open a directory by a path below the root, one component at a time."""
        return open_dir_path(self.root_fd, path, self.open_dir)

    def reach_dir_path(self, path: bytes) -> int:
        """An ``O_PATH`` descriptor on a directory below the root, for ``*at`` calls in it
        (not for listing it): each level is a lookup alone, where an open of a readable
        directory costs a FUSE or NFS lower an open and a release too."""
        return open_dir_path(self.root_fd, path, self._reach_dir)

    def _reach_dir(self, dirfd: int, name: bytes) -> int:
        self.calls["reach_dir"] += 1
        return os.open(name, O_DIR_PATH, dir_fd=dirfd)

    def scandir(self, fd: int) -> list[tuple[bytes, int]]:
        """List a directory as ``(name, d_type-ish S_IFMT or 0)`` pairs.

        The type is 0 where the file system does not say; callers stat those.
        """
        self.calls["readdir"] += 1
        out = []
        with os.scandir(fd) as it:
            for entry in it:
                name = os.fsencode(entry.name)
                if entry.is_dir(follow_symlinks=False):
                    kind = stat.S_IFDIR
                elif entry.is_symlink():
                    kind = stat.S_IFLNK
                elif entry.is_file(follow_symlinks=False):
                    kind = stat.S_IFREG
                else:
                    kind = 0
                out.append((name, kind))
        return out

    def names(self, fd: int) -> list[bytes]:
        """A directory's names alone, for callers that stat every entry anyway."""
        self.calls["readdir"] += 1
        with os.scandir(fd) as it:
            return [os.fsencode(entry.name) for entry in it]

    def scan_stats(self, fd: int) -> list[tuple[bytes, os.stat_result]]:
        """List a directory with the lstat of each entry, in one go (one thread hop)."""
        out = []
        for name, _ in self.scandir(fd):
            try:
                out.append((name, self.lstat(fd, name)))
            except FileNotFoundError:
                pass
        return out

    def stat_names(self, fd: int, names: list[bytes]) -> list[tuple[bytes, os.stat_result]]:
        """The lstat of each of *names* that exists (a listing known from elsewhere)."""
        out = []
        for name in names:
            try:
                out.append((name, self.lstat(fd, name)))
            except FileNotFoundError:
                pass
        return out

    def read_listing(self, dirfd: int, name: bytes, keep_fd: bool = False, depth_budget: int = 0):
        """Everything about ``dirfd/name`` in one go: its stat as ``.``, a directory's
        entries with theirs, symlink targets (for a kept, immutable object).

        Returns ``(listings, fd)``.  *listings* maps a path relative to *name* (``b""``
        for *name* itself) to its listing: with a *depth_budget*, the directories
        below are read too, breadth first, until about that many entries are read,
        so walking into an immutable tree costs one trip to a worker thread rather
        than one per directory.  With *keep_fd*, a directory's descriptor stays
        open for the caller to keep; otherwise, or for a non-directory, fd is -1."""
        from .dircache import Listing, pack_stat
        st = self.lstat(dirfd, name)
        if not stat.S_ISDIR(st.st_mode):
            targets = {b".": self.readlink(dirfd, name)} if stat.S_ISLNK(st.st_mode) else {}
            return {b"": Listing({b".": pack_stat(st)}, targets)}, -1
        fd = self.open_dir(dirfd, name)
        out = {}
        try:
            queue, read = [(b"", fd, st)], 0
            while queue:
                rel, dfd, dst = queue.pop(0)
                try:
                    # Each stat packed at once: this runs beside the event loop, which
                    # wants the interpreter lock back.
                    entries, targets = {b".": pack_stat(dst)}, {}
                    for child in self.names(dfd):
                        try:
                            cst = self.lstat(dfd, child)
                        except FileNotFoundError:
                            continue
                        entries[child] = pack_stat(cst)
                        if stat.S_ISLNK(cst.st_mode):
                            targets[child] = self.readlink(dfd, child)
                        elif stat.S_ISDIR(cst.st_mode) and read + len(entries) < depth_budget:
                            try:
                                sub = self.open_dir(dfd, child)
                            except PermissionError:
                                continue  # read when someone goes there
                            queue.append((rel + b"/" + child if rel else child, sub, cst))
                    out[rel] = Listing(entries, targets)
                    read += len(entries)
                finally:
                    if dfd != fd:
                        os.close(dfd)
        except BaseException:
            for _, dfd, _ in queue:
                os.close(dfd)
            os.close(fd)
            raise
        if not keep_fd:
            os.close(fd)
            fd = -1
        return out, fd

    def read_listings(self, dirfd: int, names: list[bytes],
                      depth_budget: int = 0) -> list[dict | None]:
        """``read_listing`` of each of *names* (listings only); None where one is gone."""
        out = []
        for name in names:
            try:
                out.append(self.read_listing(dirfd, name, False, depth_budget)[0])
            except (FileNotFoundError, NotADirectoryError):
                out.append(None)
        return out

    def readlink(self, dirfd: int, name: bytes) -> bytes:
        self.calls["readlink"] += 1
        return os.readlink(name, dir_fd=dirfd)

    def open(self, dirfd: int, name: bytes, flags: int, mode: int = 0o600) -> int:
        self.calls["open"] += 1
        return os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=dirfd)

    def read_at(self, dirfd: int, name: bytes, size: int, offset: int) -> bytes:
        """Open, read, close: a file that may change between reads."""
        fd = self.open(dirfd, name, os.O_RDONLY)
        try:
            self.calls["read"] += 1
            return os.pread(fd, size, offset)
        finally:
            os.close(fd)

    @contextmanager
    def _object_path(self, dirfd: int, name: bytes):
        """A path to ``dirfd/name`` itself (never what a symlink there points to), for
        the xattr calls, which have no ``*at`` form."""
        fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirfd)
        try:
            yield f"/proc/self/fd/{fd}"
        finally:
            os.close(fd)

    def listxattr(self, dirfd: int, name: bytes) -> list[str]:
        self.calls["listxattr"] += 1
        with self._object_path(dirfd, name) as path:
            return os.listxattr(path)

    def getxattr(self, dirfd: int, name: bytes, attr: str) -> bytes:
        self.calls["getxattr"] += 1
        with self._object_path(dirfd, name) as path:
            return os.getxattr(path, attr)

    def read_xattrs(self, dirfd: int, name: bytes) -> dict[str, bytes]:
        """All xattrs of an object that the caller may read (for copy-up)."""
        with self._object_path(dirfd, name) as path:
            return read_all_xattrs(path, calls=self.calls)

    def read_dir_xattrs(self, dirfd: int, names: list[bytes]) -> dict[bytes, dict[str, bytes]]:
        """The xattrs of each of *names* in *dirfd* that has any (one trip for a
        whole directory of an immutable lower: ``ls -l`` asks for every entry)."""
        out = {}
        for name in names:
            try:
                attrs = self.read_xattrs(dirfd, name)
            except FileNotFoundError:
                continue
            if attrs:
                out[name] = attrs
        return out
