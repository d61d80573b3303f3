"""A merged database built over the lower's published generation instead of copied.

``nixfs publish`` writes generations of a shared store (nixfs/publish/): a
checkpointed snapshot of its Nix database whose GC root already references every
path, the lower index, and a catalog of listings.  A fresh upper takes the newest one
that passes its check: its merged database, lower index and listings become
copy-on-write files (nixfs/cow/) over the generation's, so the upper holds only the
pages written to them, and every lower path is valid, indexed and listed at once.
As in a first build (``firstbuild``), the upper's own rows are adopted and what it
hides leaves; the caller then catches up with the live lower from the generation's
ids (``follow``), so a path the lower lost since is never valid.

A later mount that finds a newer generation, or finds the upper's own pruned,
rebases: the same build over the newest, adopting the upper's own rows from its
database in place or their copy, kept current while mounted (``ownrows``).  All is
built in the work folder; the index's rename is the commit point, as in a first
build: a crash half-way leaves no index, and the next mount starts over.
"""

import json
import logging
import os
import time

from ..publish.generations import CATALOG, DB, GENERATIONS, INDEX, MANIFEST
from ..overlay.state import mark_copy_on_write
from ..publish.verify import Generation, find_usable
from . import cowfiles, dbstate, gcroot, genrecord, ownrows
from .files import StoreFiles
from .lowerindex import BROKEN, LowerIndex
from .merged import MergedDb, open_db
from .rows import basename
from .schema import STORE_DIR
from .upperstore import UpperStore

log = logging.getLogger(__name__)


def newest(files: StoreFiles, setting: str) -> Generation | None:
    """The lower's newest generation that passes its check, or None: none published,
    ``-o generation=off``, or none usable (``find_usable`` says why in one warning)."""
    if setting == "off" or not os.path.isdir(os.path.join(files.lower, GENERATIONS)):
        return None
    return find_usable(files.lower, files.lower_db)


def newer(files: StoreFiles, setting: str, current: dict | None) -> Generation | None:
    """The generation a complete database over *current* rebases onto: a newer usable
    one, or None (kept).  A copied database (*current* None) is never converted."""
    if current is None:
        return None
    target = newest(files, setting)
    if target is None or target.number <= current["generation"]:
        return None
    log.info("rebasing the merged database from generation %d onto generation %d",
             current["generation"], target.number)
    return target


def replacing(files: StoreFiles, setting: str, current: dict) -> Generation | None:
    """What a database over *current*, a generation that is gone (pruned), is built over
    again: the newest usable generation, or None (copied; its own rows then come from
    their copy, ``ownrows``)."""
    target = newest(files, setting)
    if target is not None:
        log.info("generation %d, which the merged database is built over, is gone: "
                 "rebasing onto generation %d", current["generation"], target.number)
    else:
        log.warning("generation %d, which the merged database is built over, is gone and "
                    "no other is usable: copying the lower's database", current["generation"])
    return target


def present(files: StoreFiles, current: dict) -> bool:
    """Whether the generation *current* names is still there, unchanged."""
    manifest = os.path.join(files.lower, GENERATIONS, str(current["generation"]), MANIFEST)
    try:
        with open(manifest) as f:
            return json.load(f).get("sha256") == current["manifest_sha256"]
    except (OSError, ValueError):
        return False


def build(files: StoreFiles, upper_store: UpperStore, version: int,
          generation: Generation) -> LowerIndex:
    """Build the upper's database, index and listings over *generation*; returns the index."""
    t0 = time.monotonic()
    os.makedirs(files.merged_dir, exist_ok=True)
    tmp = {name: os.path.join(files.work, f"generation.{name}") for name in (DB, INDEX, CATALOG)}
    for path in tmp.values():
        cowfiles.remove(path)
    mark_copy_on_write(files.state_dir)  # an older nixfs then refuses this upper
    for name, path in tmp.items():
        cowfiles.create_over(files.lower, generation, name, path)
    gone, adopted = _fill(files, upper_store, tmp[DB])
    _record(tmp[INDEX], files.lower, gone, generation.manifest["lower_db"].get("state"))
    if adopted:
        ownrows.write(files, upper_store, tmp[DB])  # their copy, should this build be cut short
    for path in tmp.values():
        cowfiles.sync(path)
    _install(files, tmp, version, generation)
    log.info("built the merged database over generation %d of the lower: %d upper paths "
             "adopted in %.2f s", generation.number, adopted, time.monotonic() - t0)
    return LowerIndex(files.index_path, cow_root=files.lower)


def _fill(files: StoreFiles, upper_store: UpperStore, tmp_db: str):
    """Paths the upper hides leave the new database, the upper's own rows come in.
    Returns (names of the lower paths that left, number adopted)."""
    db = MergedDb(open_db(tmp_db, cow_root=files.lower))  # a few writes: no bulk mode
    try:
        with db.conn:
            hidden = upper_store.hidden_names()
            gone = db.remove([f"{STORE_DIR}/{os.fsdecode(n)}" for n in hidden],
                             keep=[gcroot.root_path()]) if hidden else set()
            adopted = ownrows.adopt(files, upper_store, db)
        db.conn.execute("pragma journal_mode=wal").fetchall()
    finally:
        db.close()
    return {basename(p) for p in gone}, adopted


def _record(tmp_index: str, lower: str, gone: set[bytes], lower_state) -> None:
    """The lower paths that left the database are not shown (the rest of the index is
    the generation's, complete and durable: nothing is left for ``rootfill``).  The
    name of the lower's state the generation was read in (``dbstate``; None from an
    older publish) goes beside its count: the catch-up skips the count where the live
    lower still has it."""
    index = LowerIndex(tmp_index, cow_root=lower)
    try:
        with index.transaction():
            index.set_state(gone, BROKEN)
            index.put("lower_state", dbstate.encode(lower_state))
    finally:
        index.close()


def _install(files: StoreFiles, tmp: dict, version: int, generation: Generation) -> None:
    """Move the new files into place, the index last: its rename is the commit point.
    The old index goes first, so a crash between leaves no index (the next mount
    starts over, adopting the upper's rows from whichever database is then in place)."""
    cowfiles.remove(files.index_path)
    cowfiles.install(tmp[DB], files.merged_db)
    with open(os.path.join(files.merged_dir, "schema"), "w") as f:
        f.write(str(version))
    cowfiles.install(tmp[CATALOG], genrecord.listings_path(files))
    genrecord.write(files, generation.number, generation.manifest_sha256)
    gcroot.install_files(files.upper)
    for directory in (files.merged_dir, files.state_dir):
        cowfiles.sync(directory)
    cowfiles.install(tmp[INDEX], files.index_path)  # the commit point
    cowfiles.sync(files.state_dir)
