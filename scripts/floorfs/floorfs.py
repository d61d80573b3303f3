#!/usr/bin/env python3
"""floorfs.py: the least a FUSE file system on nixfs' pyfuse3 can cost a tree walk.

A benchmark peer of scripts/bench, not part of nixfs: the Python twin of floorfs.c.
It serves, read-only, a copy in memory of a directory tree taken at start, through
the pyfuse3 that nixfs runs on (with nixfs' patch series: listings and opens kept by
the kernel, a listing's closing request answered in C, the device polled before
sleeping) and with nothing else: every answer is ready before it is asked for.  A
walk through it costs what pyfuse3 and its event loop add to the FUSE protocol;
what nixfs costs beyond that is its own model's work on the request's path.

    floorfs.py [--poll-us N] SOURCE MOUNTPOINT   (foreground; umount MOUNTPOINT to stop)
"""
import argparse
import errno
import os
import stat
import sys

import pyfuse3
import trio

FOREVER = 1e9  # seconds: the tree never changes


class Tree:
    """Every object below SOURCE: its answer to the kernel, its children, its target."""

    def __init__(self, source: str):
        self.entries: list[pyfuse3.EntryAttributes] = []  # by inode - 1
        self.paths: list[str] = []
        self.children: dict[int, list[tuple[bytes, int]]] = {}
        self.targets: dict[int, bytes] = {}
        self.by_name: dict[tuple[int, bytes], int] = {}
        root = self._add(source)
        self._scan(root, source)

    def _add(self, path: str) -> int:
        st = os.lstat(path)
        e = pyfuse3.EntryAttributes()
        for field in ("st_mode", "st_nlink", "st_uid", "st_gid", "st_rdev", "st_size",
                      "st_blksize", "st_blocks", "st_atime_ns", "st_mtime_ns", "st_ctime_ns"):
            setattr(e, field, getattr(st, field))
        e.st_ino = len(self.entries) + 1
        e.entry_timeout = e.attr_timeout = FOREVER
        self.entries.append(e)
        self.paths.append(path)
        if stat.S_ISLNK(st.st_mode):
            self.targets[e.st_ino] = os.fsencode(os.readlink(path))
        return e.st_ino

    def _scan(self, ino: int, path: str) -> None:
        kids = []
        with os.scandir(path) as it:
            names = sorted(entry.name for entry in it)
        for name in names:
            child = self._add(os.path.join(path, name))
            kids.append((os.fsencode(name), child))
            self.by_name[(ino, os.fsencode(name))] = child
        self.children[ino] = kids
        for _, child in kids:
            if stat.S_ISDIR(self.entries[child - 1].st_mode):
                self._scan(child, self.paths[child - 1])


class FloorOps(pyfuse3.Operations):
    readdir_by_inode = True  # opendir answers ENOSYS: the kernel keeps every listing
    enable_cache_symlinks = True

    def __init__(self, tree: Tree):
        super().__init__()
        self.tree = tree

    def _entry(self, ino: int) -> pyfuse3.EntryAttributes:
        if not 1 <= ino <= len(self.tree.entries):
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self.tree.entries[ino - 1]

    async def lookup(self, parent, name, ctx):
        ino = self.tree.by_name.get((parent, name))
        if ino is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._entry(ino)

    async def getattr(self, inode, ctx):
        return self._entry(inode)

    async def readlink(self, inode, ctx):
        target = self.tree.targets.get(inode)
        if target is None:
            raise pyfuse3.FUSEError(errno.EINVAL)
        return target

    async def opendir(self, inode, ctx):
        raise pyfuse3.FUSEError(errno.ENOSYS)

    async def readdir(self, inode, start_id, token):
        """Offsets: 0 the start, k after the k-th child; True: the last one was sent."""
        kids = self.tree.children.get(inode, [])
        for k in range(start_id, len(kids)):
            name, child = kids[k]
            if not pyfuse3.readdir_reply(token, name, self.tree.entries[child - 1], k + 1):
                return False
        return True

    async def open(self, inode, flags, ctx):
        if flags & (os.O_WRONLY | os.O_RDWR):
            raise pyfuse3.FUSEError(errno.EROFS)
        self._entry(inode)
        return pyfuse3.FileInfo(fh=inode, keep_cache=True)

    async def read(self, fh, off, size):
        fd = os.open(self.tree.paths[fh - 1], os.O_RDONLY | os.O_NOFOLLOW)
        try:
            return os.pread(fd, size, off)
        finally:
            os.close(fd)

    async def forget(self, inode_list):
        pass  # nodes are never freed: the tree does not change


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--poll-us", type=int, default=0)
    p.add_argument("source")
    p.add_argument("mountpoint")
    args = p.parse_args()
    if args.poll_us < 0:
        p.error("--poll-us must be 0 or more")
    missing = [f for f in ("READDIR_BY_INODE", "READDIR_END", "POLL_BEFORE_SLEEP")
               if not getattr(pyfuse3, f, False)]
    if missing:
        sys.exit("floorfs.py: this pyfuse3 lacks nixfs' patch series (scripts/build-pyfuse3): "
                 + ", ".join(missing))
    tree = Tree(args.source)
    options = set(pyfuse3.default_options) | {"ro", "allow_other", "fsname=floorfs.py"}
    pyfuse3.init(FloorOps(tree), args.mountpoint, options)
    print(f"floorfs.py: {len(tree.entries)} nodes from {args.source} on {args.mountpoint}",
          file=sys.stderr, flush=True)
    try:
        trio.run(pyfuse3.main, 1, 8, args.poll_us)
    finally:
        pyfuse3.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
