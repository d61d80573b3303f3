"""Telling the kernel (and pyfuse3) what the model changed behind its back.

The overlay model says what changed through its ``Notifier`` interface
(nixfs/overlay/model.py) and never imports pyfuse3; this is the implementation that
reaches the kernel: its entry and attribute caches, the listings it keeps, and the
attributes nixfs had pyfuse3 keep for immutable lower directories and symlinks.
"""

from __future__ import annotations

import errno
import logging
import cachetools
import pyfuse3
import trio

from . import features

log = logging.getLogger(__name__)


def drop_kept(ino: int) -> None:
    """pyfuse3 answers for *ino* no longer (see FuseOps._reply)."""
    if features.FEATURES.keep_attributes:
        pyfuse3.drop_attributes(ino)


def _invalidate_data(ino: int) -> None:
    try:
        pyfuse3.invalidate_inode(ino, attr_only=False)
    except OSError:
        pass  # the kernel does not have it: nothing to drop


class ListingSnapshots(cachetools.LRUCache):
    """The listings ``FuseOps.readdir`` continues by inode (the kernel keeps listings: no
    handle holds them), shared with the KernelNotifier, which drops one that changed."""

    def __init__(self, maxsize: int = 512):
        super().__init__(maxsize)

    def drop(self, ino: int) -> None:
        self.pop(ino, None)
        if features.FEATURES.readdir_end:
            pyfuse3.forget_readdir_end(ino)


class KernelNotifier:
    """Drops what the kernel cached about objects the model changed behind its back.

    Only attributes and entries from a request handler: page invalidation from inside one
    could wait on a page whose read waits on us (a listing's pages are dropped by a thread).
    """

    def __init__(self, snapshots: ListingSnapshots):
        self.snapshots = snapshots  # the adapter's own listings, continued by inode

    def attr_changed(self, ino: int) -> None:
        drop_kept(ino)
        try:
            pyfuse3.invalidate_inode(ino, attr_only=True)
        except OSError as e:
            if e.errno != errno.ENOENT:  # the kernel does not have it: nothing to drop
                log.warning("invalidating inode %d: %s", ino, e)

    def node_detached(self, ino: int) -> None:
        drop_kept(ino)

    def entry_changed(self, parent_ino: int, name: bytes) -> None:
        pyfuse3.invalidate_entry_async(parent_ino, name, ignore_enoent=True)

    def listing_changed(self, ino: int) -> None:
        self.snapshots.drop(ino)
        # Drops the kernel's kept listing too (its pages), so not from within a request
        # handler: a thread does it.
        trio.lowlevel.spawn_system_task(trio.to_thread.run_sync, _invalidate_data, ino)
