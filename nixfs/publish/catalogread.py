"""Reading one store path's catalog records, as a client's mount would, in fewer calls.

A catalog must hold exactly what a mount learns of a path (``Layer.read_listing``
of all its directories, ``read_xattrs`` of the path, ``read_dir_xattrs`` of each
directory's entries), but a publish reads a million paths, so the layer's
general code costs too much per path: it opens each directory twice (once to
list it, once by path from the root for its entries' xattrs) and each object
once more for its xattrs (``O_PATH``, then ``/proc/self/fd``).  Here each
directory is opened once and everything about it is asked through that one
descriptor: its stat (``fstat``), its own xattrs (``flistxattr``), its entries'
(``llistxattr`` by ``/proc/self/fd/N/name``, never following a symlink).

Anything out of the ordinary (a store path that is no directory, a directory
this process may not read, an error of any kind) is read by the layer's own
code instead, so the two can only differ where a test would show it
(tests/unit/test_catalogread.py compares them).
"""

import errno
import os
import stat

from ..overlay.dircache import Listing, pack_stat
from ..overlay.layers import Layer, read_all_xattrs

O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
ALL = 1 << 62  # read_listing's budget: every directory of a path


class Unusual(Exception):
    """This path is read by the layer's general code instead."""


def read_path(layer: Layer, store_fd: int, name: bytes):
    """``(listings, own xattrs, entry xattrs)`` of the store path *name*: listings by
    path relative to it (``b""`` itself), the entries' xattrs of each listing with more
    than ``.``.  OSError if the path is gone or cannot be read."""
    try:
        return _read_fast(store_fd, name)
    except (Unusual, OSError):
        return read_general(layer, store_fd, name)


def read_general(layer: Layer, store_fd: int, name: bytes):
    """The same through the layer's code, as a mount reads it."""
    found, _ = layer.read_listing(store_fd, name, False, ALL)
    own = layer.read_xattrs(store_fd, name)
    xmaps = {}
    for rel, listing in found.items():
        names = [n for n in listing.entries if n != b"."]
        if names:
            fd = layer.open_dir_path(b"store/" + name + (b"/" + rel if rel else b""))
            try:
                xmaps[rel] = layer.read_dir_xattrs(fd, names)
            finally:
                os.close(fd)
    return found, own, xmaps


def _read_fast(store_fd: int, name: bytes):
    try:
        fd = os.open(name, O_DIR, dir_fd=store_fd)
    except OSError as e:
        if e.errno in (errno.ENOTDIR, errno.ELOOP, errno.EACCES, errno.EPERM):
            raise Unusual() from None
        raise
    found, xmaps = {}, {}
    try:
        own = read_all_xattrs(fd)
        queue = [(b"", fd, os.fstat(fd))]
        try:
            while queue:
                rel, dfd, dst = queue.pop(0)
                try:
                    _read_dir(rel, dfd, dst, found, xmaps, queue)
                finally:
                    if dfd != fd:
                        os.close(dfd)
        finally:
            for _, dfd, _ in queue:
                os.close(dfd)
    finally:
        os.close(fd)
    return found, own, xmaps


def _read_dir(rel: bytes, dfd: int, dst, found: dict, xmaps: dict, queue: list) -> None:
    entries, targets, attrs = {b".": pack_stat(dst)}, {}, {}
    with os.scandir(dfd) as it:
        names = [os.fsencode(e.name) for e in it]
    for child in names:
        try:
            cst = os.stat(child, dir_fd=dfd, follow_symlinks=False)
        except FileNotFoundError:
            continue
        entries[child] = pack_stat(cst)
        if stat.S_ISLNK(cst.st_mode):
            targets[child] = os.readlink(child, dir_fd=dfd)
        elif stat.S_ISDIR(cst.st_mode):
            try:
                sub = os.open(child, O_DIR, dir_fd=dfd)
            except PermissionError:
                raise Unusual() from None  # the layer opens it O_PATH, and fails to list it
            queue.append((rel + b"/" + child if rel else child, sub, cst))
        path = b"/proc/self/fd/%d/%s" % (dfd, child)
        try:
            child_attrs = read_all_xattrs(path, follow_symlinks=False)
        except FileNotFoundError:
            continue
        if child_attrs:
            attrs[child] = child_attrs
    found[rel] = Listing(entries, targets)
    if len(entries) > 1:
        xmaps[rel] = attrs
