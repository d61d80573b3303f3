"""The first mount of a Nix store: the merged database cloned from the lower's.

The lower database is cloned (a reflink where the file system offers one, else
an in-kernel copy) with its committed WAL frames folded in, so every lower path
is valid at once with its own rows; nixfs then adds its GC root and adopts rows
of paths the upper already holds.  The private index of lower paths is written
last: its rename is the commit point of the first build.

Only what a query needs is done before the mount goes live (about a second for
a million paths).  The GC root's references, the index's id order and the
fsyncs follow once it is live (``rootfill``).
"""

import logging
import os
import time

import apsw

from . import cowfiles, dbstate, gcroot, genrecord, ownrows
from .files import StoreFiles
from .lowerindex import BROKEN, LowerIndex
from .merged import MergedDb, open_db
from .rows import basename
from .schema import STORE_DIR, read_shape
from .snapshot import Snapshot, SnapshotError
from .upperstore import UpperStore

log = logging.getLogger(__name__)

CLONE_ATTEMPTS = 8  # a lower that keeps changing while it is copied is refused after these


def build(files: StoreFiles, upper_store: UpperStore, version: int) -> LowerIndex:
    """Clone the lower database into the upper and index it; returns the index."""
    t0 = time.monotonic()
    os.makedirs(files.merged_dir, exist_ok=True)
    tmp_db = os.path.join(files.work, "merged.sqlite")
    tmp_index = os.path.join(files.work, "lower-index.sqlite")
    for path in (tmp_db, tmp_index, tmp_index + "-wal", tmp_index + "-shm"):
        if os.path.exists(path):
            os.unlink(path)
    state = clone(files.lower_db, tmp_db)
    t_clone = time.monotonic()
    LowerIndex.create_from(tmp_index, tmp_db)  # every lower path, shown
    t_index = time.monotonic()
    max_id, count, gone, adopted = _fill(files, upper_store, tmp_db)
    _record(tmp_index, gone, max_id, count, version, state)
    _install(files, tmp_db, tmp_index, version)
    log.info("built the merged database: %d lower paths, %d upper paths adopted in %.1f s "
             "(clone %.1f s, index %.1f s)", count, adopted, time.monotonic() - t0,
             t_clone - t0, t_index - t_clone)
    return LowerIndex(files.index_path, cow_root=files.lower)


def clone(lower_db: str, dest: str) -> dict | None:
    """A consistent copy of the lower database at *dest* (not yet synced), read without
    a lock; returns the name of the state copied (``dbstate``).  SnapshotError if it kept
    changing, SchemaError for a shape nixfs cannot follow."""
    for attempt in range(CLONE_ATTEMPTS):
        with Snapshot(lower_db) as snap:
            snap.clone_to(dest, sync=False)
            if snap.validate():
                state = dbstate.of(snap)
                break
    else:
        raise SnapshotError(f"{lower_db} kept changing while being copied")
    clone = apsw.Connection(dest, flags=apsw.SQLITE_OPEN_READONLY)
    try:
        read_shape(clone)  # a shape nixfs could not follow live is refused now
    finally:
        clone.close()
    return state


def _fill(files: StoreFiles, upper_store: UpperStore, tmp_db: str):
    """Make the clone the merged database: paths the upper hides leave, the upper's
    own rows come in, the GC root is added.  Returns (lower max id, lower count,
    paths that left, number adopted)."""
    db = MergedDb(open_db(tmp_db, bulk=True))
    try:
        with db.conn:
            max_id, count = db.conn.execute(
                "select coalesce(max(id), 0), count(*) from ValidPaths").fetchone()
            hidden = upper_store.hidden_names()
            gone = db.remove([f"{STORE_DIR}/{os.fsdecode(n)}" for n in hidden]) if hidden else set()
            adopted = ownrows.adopt(files, upper_store, db)
            db.insert(gcroot.root_row(int(time.time())))
        db.conn.execute("pragma journal_mode=wal").fetchall()
    finally:
        db.close()
    return max_id, count, gone, adopted


def _record(tmp_index: str, gone, max_id: int, count: int, version: int,
            lower_state: dict | None) -> None:
    """The new index's state: what left is not shown, how far the lower was read (and
    the name of the state read there), and that the GC root's references and the fsyncs
    are still to do."""
    index = LowerIndex(tmp_index)
    try:
        with index.transaction():
            index.set_state({basename(p) for p in gone}, BROKEN)
            for key, value in (("lower_max_id", max_id), ("lower_count", count),
                               ("schema", version), ("root", gcroot.root_path()),
                               ("root_refs_upto", 0), ("root_refs_target", max_id),
                               ("durable", 0), ("state", "complete"),
                               ("lower_state", dbstate.encode(lower_state))):
                index.put(key, value)
    finally:
        index.close()


def _install(files: StoreFiles, tmp_db: str, tmp_index: str, version: int) -> None:
    """Move the merged database and its GC root into place, the index last.  An index
    already there (of a database over a generation that is gone) is removed first, so a
    crash half-way leaves none: the next mount starts over."""
    cowfiles.remove(files.index_path)
    cowfiles.install(tmp_db, files.merged_db)
    with open(os.path.join(files.merged_dir, "schema"), "w") as f:
        f.write(str(version))
    gcroot.install_files(files.upper)
    genrecord.forget(files)
    for suffix in ("-wal", "-shm"):
        if os.path.exists(tmp_index + suffix):
            os.rename(tmp_index + suffix, files.index_path + suffix)
    os.rename(tmp_index, files.index_path)  # the commit point
    ownrows.remove(files)
