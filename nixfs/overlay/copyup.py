"""Copying an object from the lower layer into the upper's work folder.

Copy-up is atomic: the copy is built under a temporary name in the work folder
(on the upper's file system), complete with data, owner, mode, xattrs and times,
and synced; the caller then renames it into place.  A reader sees the lower
object or the finished copy, never a partial one, also after a crash, and a
crash leaves at most a temporary file that the next mount removes.

These functions block; the caller runs them in a worker thread.
"""

import errno
import logging
import os
import stat

from .layers import Layer
from .state import remove_tree
from .upperformat import is_overlay_xattr

log = logging.getLogger(__name__)

_CHUNK = 1 << 20
_NO_FAST_COPY = (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EBADF)


def copy_to_work(lower: Layer, dirfd: int, name: bytes, work_fd: int, tmp: bytes, *,
                 truncate: bool, privileged: bool) -> os.stat_result:
    """Build a copy of lower ``dirfd/name`` at ``work_fd/tmp``; return the lower stat.

    On failure (ENOSPC on a full upper, EIO from the lower) the partial copy is
    removed at once: it would otherwise hold the space a full disk needs back."""
    try:
        return _copy_to_work(lower, dirfd, name, work_fd, tmp, truncate=truncate,
                             privileged=privileged)
    except BaseException:
        try:
            remove_tree(work_fd, tmp)
        except OSError as e:
            log.warning("removing the partial copy %r: %s", tmp, e)
        raise


def _copy_to_work(lower: Layer, dirfd: int, name: bytes, work_fd: int, tmp: bytes, *,
                  truncate: bool, privileged: bool) -> os.stat_result:
    st = lower.lstat(dirfd, name)
    mode = st.st_mode
    if stat.S_ISREG(mode):
        src = lower.open(dirfd, name, os.O_RDONLY)
        try:
            dst = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                          0o600, dir_fd=work_fd)
            try:
                if not truncate:
                    copy_data(src, dst, st.st_size, lower)
                os.fsync(dst)
            finally:
                os.close(dst)
        finally:
            os.close(src)
    elif stat.S_ISLNK(mode):
        os.symlink(lower.readlink(dirfd, name), tmp, dir_fd=work_fd)
    elif stat.S_ISDIR(mode):
        os.mkdir(tmp, 0o700, dir_fd=work_fd)
    else:
        os.mknod(tmp, mode, st.st_rdev, dir_fd=work_fd)
    try:
        xattrs = lower.read_xattrs(dirfd, name)
    except OSError as e:
        log.warning("copy-up of %r: cannot read xattrs: %s", name, e)
        xattrs = {}
    apply_metadata(work_fd, tmp, st, xattrs, privileged=privileged)
    return st


def copy_open_file(lower: Layer, fd: int, work_fd: int, *, privileged: bool) -> int:
    """A private copy of the open lower file *fd* (one unlinked while open): a nameless
    file in the work folder with its data, mode, owner (when privileged) and times;
    its descriptor, open read-write."""
    st = os.fstat(fd)
    new = os.open(".", os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600, dir_fd=work_fd)
    try:
        copy_data(fd, new, st.st_size, lower)
        os.fchmod(new, stat.S_IMODE(st.st_mode))
        if privileged:
            os.fchown(new, st.st_uid, st.st_gid)
        os.utime(new, ns=(st.st_atime_ns, st.st_mtime_ns))
    except BaseException:
        os.close(new)
        raise
    return new


def apply_metadata(dirfd: int, name: bytes, st: os.stat_result, xattrs: dict[str, bytes], *,
                   privileged: bool) -> None:
    """Give ``dirfd/name`` the owner (when privileged), xattrs, mode and times of *st*."""
    is_link = stat.S_ISLNK(st.st_mode)
    if privileged:
        os.chown(name, st.st_uid, st.st_gid, dir_fd=dirfd, follow_symlinks=False)
    if xattrs:
        set_xattrs(dirfd, name, xattrs)
    if not is_link:
        # After chown, which clears set-id bits on files.
        os.chmod(name, stat.S_IMODE(st.st_mode), dir_fd=dirfd)
    os.utime(name, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=dirfd, follow_symlinks=False)


def set_xattrs(dirfd: int, name: bytes, xattrs: dict[str, bytes]) -> None:
    fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirfd)
    try:
        path = f"/proc/self/fd/{fd}"
        for key, value in xattrs.items():
            if is_overlay_xattr(key):
                continue
            try:
                os.setxattr(path, key, value)
            except OSError as e:
                # Namespaces this process may not write (trusted., security.) are left out,
                # as kernel overlayfs leaves them out for an unprivileged mounter.
                if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EACCES):
                    raise
                log.debug("copy-up of %r: xattr %s not copied: %s", name, key, e)
    finally:
        os.close(fd)


def copy_data(src: int, dst: int, size: int, counter: Layer | None = None) -> None:
    """Copy *size* bytes keeping holes, so a sparse file stays sparse."""
    off = 0
    while off < size:
        try:
            data = os.lseek(src, off, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # only a hole is left
                break
            if e.errno != errno.EINVAL:
                raise
            data, hole = off, size  # no hole support: copy everything
        else:
            hole = min(os.lseek(src, data, os.SEEK_HOLE), size)
        _copy_range(src, dst, data, hole - data, counter)
        off = hole
    os.ftruncate(dst, size)


def _copy_range(src: int, dst: int, off: int, count: int, counter: Layer | None) -> None:
    end = off + count
    fast = True
    while off < end:
        n = min(_CHUNK, end - off)
        if counter is not None:
            counter.calls["read"] += 1
        if fast:
            try:
                done = os.copy_file_range(src, dst, n, off, off)
            except OSError as e:
                if e.errno not in _NO_FAST_COPY:
                    raise
                fast = False
                continue
        else:
            buf = os.pread(src, n, off)
            done = os.pwrite(dst, buf, off) if buf else 0
        if done == 0:  # the file shrank under us
            break
        off += done
