"""The rest of a first build, done after the mount went live: the fsyncs that make
the clone durable, then the GC root's references to every lower path.

The caller (the worker) holds Nix's GC lock shared until this is done, so no
collector runs before every lower path is referenced.  The references are added
in short batches through the mount (the database is live): Nix's writers wait
briefly at most, and the lower index records how far it got, so a crash resumes
where it stopped.
"""

import logging
import os
import time

from . import gcroot
from .files import StoreFiles
from .lowerindex import LowerIndex

log = logging.getLogger(__name__)


def unfinished(index: LowerIndex) -> bool:
    """Whether a first build still has its fsyncs or its root's references to do."""
    return (index.get("durable", 1) == 0 or
            index.get("root_refs_upto", 0) < index.get("root_refs_target", 0))


def finish(files: StoreFiles, index: LowerIndex, db_through_mount, stats: dict,
           batch: int = 20_000, batches: int | None = None) -> bool:
    """Some of the rest of a first build: at most *batches* batches of the root's
    references (after the fsyncs); True once all is done."""
    if index.get("durable", 1) == 0:
        _make_durable(files, index)
    return _reference_lower(index, db_through_mount, stats, batch, batches)


def _reference_lower(index: LowerIndex, db_through_mount, stats: dict, batch: int,
                     batches: int | None) -> bool:
    """Up to *batches* batches of the root's references; True once every lower path
    is referenced.  Through the mount SQLite's page reads and WAL writes are FUSE
    round trips: several times the cost of the same statements on the file
    (docs/performance.md)."""
    upto = index.get("root_refs_upto", 0)
    target = index.get("root_refs_target", 0)
    if upto >= target:
        return True
    t0 = time.monotonic()
    db = db_through_mount()
    try:
        root_id = db.id_of(gcroot.root_path())
        while upto < target and batches != 0:
            batches = None if batches is None else batches - 1
            end = min(upto + batch, target)
            with db.begin():  # short transactions: Nix's writers wait briefly at most
                db.conn.execute("insert or ignore into Refs (referrer, reference) select ?, id "
                                "from ValidPaths where id > ? and id <= ? and id != ?",
                                (root_id, upto, end, root_id))
            with index.transaction():
                index.put("root_refs_upto", end)
            upto = end
    finally:
        db.close()
    stats["root_refs_s"] = stats.get("root_refs_s", 0.0) + time.monotonic() - t0
    if upto >= target:
        log.info("the GC root references every lower path (%.1f s)", stats["root_refs_s"])
    return upto >= target


def _make_durable(files: StoreFiles, index: LowerIndex) -> None:
    t0 = time.monotonic()
    index.make_id_index()
    for path in (files.merged_db, files.index_path):
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)  # the file, whoever wrote it: our clone and Nix's writes
        finally:
            os.close(fd)
    with index.transaction():
        index.put("durable", 1)
    log.info("the first build is on disk (%.1f s)", time.monotonic() - t0)
