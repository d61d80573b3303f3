"""The upper layer: the layer nixfs writes, every change counted like the reads.

Only the upper has these calls, so the lower cannot be written by mistake.  As
for reads, each is an ``*at`` call on a directory descriptor with a single name
that never follows a symlink.
"""

import os

from .layers import Layer
from ..libc import RENAME_EXCHANGE, renameat2


class UpperLayer(Layer):
    def mkdir(self, dirfd: int, name: bytes, mode: int) -> None:
        self.calls["mkdir"] += 1
        os.mkdir(name, mode, dir_fd=dirfd)

    def mknod(self, dirfd: int, name: bytes, mode: int, rdev: int = 0) -> None:
        self.calls["mknod"] += 1
        os.mknod(name, mode, rdev, dir_fd=dirfd)

    def symlink(self, target: bytes, dirfd: int, name: bytes) -> None:
        self.calls["symlink"] += 1
        os.symlink(target, name, dir_fd=dirfd)

    def link(self, src_dirfd: int, src: bytes, dst_dirfd: int, dst: bytes) -> None:
        self.calls["link"] += 1
        os.link(src, dst, src_dir_fd=src_dirfd, dst_dir_fd=dst_dirfd, follow_symlinks=False)

    def rename(self, src_dirfd: int, src: bytes, dst_dirfd: int, dst: bytes) -> None:
        self.calls["rename"] += 1
        os.rename(src, dst, src_dir_fd=src_dirfd, dst_dir_fd=dst_dirfd)

    def exchange(self, a_dirfd: int, a: bytes, b_dirfd: int, b: bytes) -> None:
        """Swap two names atomically (both must exist)."""
        self.calls["rename"] += 1
        renameat2(a_dirfd, a, b_dirfd, b, RENAME_EXCHANGE)

    def unlink(self, dirfd: int, name: bytes) -> None:
        self.calls["unlink"] += 1
        os.unlink(name, dir_fd=dirfd)

    def rmdir(self, dirfd: int, name: bytes) -> None:
        self.calls["rmdir"] += 1
        os.rmdir(name, dir_fd=dirfd)

    def chown(self, dirfd: int, name: bytes, uid: int, gid: int) -> None:
        self.calls["setattr"] += 1
        os.chown(name, uid, gid, dir_fd=dirfd, follow_symlinks=False)

    def chmod(self, dirfd: int, name: bytes, mode: int) -> None:
        """(Not for symlinks: Linux cannot change theirs.)"""
        self.calls["setattr"] += 1
        os.chmod(name, mode, dir_fd=dirfd)

    def utime(self, dirfd: int, name: bytes, ns: tuple[int, int]) -> None:
        self.calls["setattr"] += 1
        os.utime(name, ns=ns, dir_fd=dirfd, follow_symlinks=False)

    def ftruncate(self, fd: int, size: int) -> None:
        self.calls["setattr"] += 1
        os.ftruncate(fd, size)

    def fchown(self, fd: int, uid: int, gid: int) -> None:
        self.calls["setattr"] += 1
        os.fchown(fd, uid, gid)

    def fchmod(self, fd: int, mode: int) -> None:
        self.calls["setattr"] += 1
        os.fchmod(fd, mode)

    def futime(self, fd: int, ns: tuple[int, int]) -> None:
        self.calls["setattr"] += 1
        os.utime(fd, ns=ns)

    def pread(self, fd: int, size: int, offset: int) -> bytes:
        self.calls["read"] += 1
        return os.pread(fd, size, offset)

    def pwrite(self, fd: int, data: bytes, offset: int) -> int:
        self.calls["write"] += 1
        return os.pwrite(fd, data, offset)

    def fsync(self, fd: int, datasync: bool = False) -> None:
        self.calls["fsync"] += 1
        (os.fdatasync if datasync else os.fsync)(fd)

    def statfs(self) -> os.statvfs_result:
        self.calls["statfs"] += 1
        return os.fstatvfs(self.root_fd)

    def setxattr(self, dirfd: int, name: bytes, attr: str, value: bytes) -> None:
        self.calls["setxattr"] += 1
        with self._object_path(dirfd, name) as path:
            os.setxattr(path, attr, value)

    def removexattr(self, dirfd: int, name: bytes, attr: str) -> None:
        self.calls["removexattr"] += 1
        with self._object_path(dirfd, name) as path:
            os.removexattr(path, attr)
