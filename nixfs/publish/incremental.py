"""A generation written as copy-on-write files over the newest one: only what changed.

Each of the three files starts as an empty COW file over the base generation's
(``nixfs.cow``; the map names the base relative to the store, with the sha256 the
base's manifest states), opened through the ``nixfs-cow`` VFS.  What the lower
did since the base is read as a mount's follower reads it (``LowerFollower.
read_changes`` against the new index, which starts as the base's): the rows that
left go from the database, the index and the catalog; the new rows come with
their ids, references and the root's reference, enter the index and have their
listings read.  The lower facts of the manifest are carried from the base's and
updated by the changes (no scan of the database).

Some changes are not applied on top but answered by a whole generation (the
caller's): a chain deeper than ``MAX_DEPTH``, a delta grown past a quarter of
its base, a lower whose tables changed shape, or changes to its realisations.
"""

import hashlib
import logging
import os

from ..cow import cowmap
from ..cow.bases import base_opener
from ..cow.cowfile import CowFile
from ..nixdb.files import StoreFiles
from ..nixdb.follow import LowerFollower
from ..nixdb.lowerindex import SHOWN, LowerIndex
from ..nixdb.rows import basename
from ..nixdb.schema import read_shape
from . import dbfile, indexfile, manifest
from .catalog import Catalog
from .clock import Clock
from .generations import CATALOG, DB, FILES, INDEX, Generations

log = logging.getLogger(__name__)

MAX_DEPTH = 8


class NotIncremental(Exception):
    """These changes are written as a whole generation (the message says why)."""


class Unchanged(Exception):
    """The lower has not changed since the base generation."""


def write(gens: Generations, number: int, base: int, base_manifest: dict, *,
          force: bool = False, clock: Clock | None = None) -> dict:
    """Write generation *number* over *base*; the manifest's content (not yet sealed).
    NotIncremental if it must be whole, Unchanged (unless *force*) if there is nothing
    to write (the directory is then left to the caller)."""
    if base_manifest["depth"] + 1 > MAX_DEPTH:
        raise NotIncremental(f"the chain over generation {base} would be deeper than "
                             f"{MAX_DEPTH}")
    store, clock = gens.store, clock or Clock()
    for name in FILES:
        _create(gens, number, base, name, base_manifest["files"][name]["sha256"])
    clock.lap("create")
    index = LowerIndex(gens.file(number, INDEX), cow_root=store)
    try:
        changes = LowerFollower(StoreFiles(store, "", ""), None, {}).read_changes(index)
        clock.lap("changes")
        facts = base_manifest["lower_db"]
        if not (force or changes or (changes.max_id, changes.count) != (facts["max_id"],
                                                                       facts["count"])):
            raise Unchanged()
        db = dbfile.bulk_connection(gens.file(number, DB), cow_root=store)
        try:
            _check_applicable(db, changes)
            dbfile.apply(db, changes)
            facts = _facts(db, base_manifest["lower_db"], changes)
        finally:
            db.close()
        clock.lap("db")
        _update_index(index, changes, base_manifest["lower_db"]["schema"])
    finally:
        index.close()
    clock.lap("index")
    catalog_stats = _update_catalog(store, gens.file(number, CATALOG), changes)
    clock.lap("catalog")
    files = {}
    for name in FILES:
        dbfile.settle(gens.file(number, name), cow_root=store)
        files[name] = _entry(gens, number, base, name)
    clock.lap("settle")
    log.debug("generation %d over %d: %d rows added, %d deleted", number, base,
              len(changes.rows), len(changes.deleted))
    return {"lower_db": facts, "files": files, "depth": base_manifest["depth"] + 1,
            "catalog": catalog_stats,
            "changes": {"added": len(changes.rows), "deleted": len(changes.deleted)}}


def _create(gens: Generations, number: int, base: int, name: str, sha256: str) -> None:
    rel = gens.rel(base, name)
    opened = base_opener(gens.store)(rel)
    try:
        CowFile.create(gens.file(number, name), cowmap.map_path(gens.file(number, name)),
                       opened, base_path=rel, base_sha256=sha256).close()
    except BaseException:
        opened.close()
        raise


def _check_applicable(db, changes) -> None:
    if any(changes.ca.values()):
        raise NotIncremental("the lower's realisations changed")
    if changes.shape is not None and read_shape(db, where="the generation's database",
                                                unknown_ok=True) != changes.shape:
        raise NotIncremental("the lower database's tables changed shape")


def _facts(db, base_facts: dict, changes) -> dict:
    """The base's lower facts, brought up to *changes* with lookups only."""
    row = db.execute("select path from ValidPaths where id = ?", (changes.max_id,)).fetchone()
    sample = [s for s in base_facts["id_sample"] if s[0] not in changes.deleted]
    sample += [[i, r.path] for i, r in changes.rows if i % manifest.SAMPLE_STEP == 0]
    return dict(base_facts, max_id=changes.max_id, count=changes.count, state=changes.state,
                max_id_path=row[0] if row else None, id_sample=sample,
                id_sample_sha256=manifest.sample_sha256(sample), ca=manifest.ca_facts(db))


def _update_index(index: LowerIndex, changes, schema: int) -> None:
    with index.transaction():
        index.remove(changes.deleted.values())
        index.add((basename(row.path), i, SHOWN) for i, row in changes.rows)
    indexfile.record(index, max_id=changes.max_id, count=changes.count, schema=schema)


def _update_catalog(store: str, path: str, changes) -> dict:
    catalog = Catalog(store, path, cow=True)
    try:
        for lower_id, name in changes.deleted.items():
            catalog.remove(name, lower_id)
        for lower_id, row in changes.rows:
            catalog.add(basename(row.path), lower_id)
    finally:
        catalog.close()
    return catalog.stats()


def _entry(gens: Generations, number: int, base: int, name: str) -> dict:
    """The manifest entry of a COW file (its identity hash: see ``identity_sha256``)."""
    path = gens.file(number, name)
    with open(cowmap.map_path(path), "rb") as f:
        map_bytes = f.read()
    base_size = os.stat(gens.file(base, name)).st_size
    if os.stat(path).st_blocks * 512 > max(base_size // 4, 1 << 20):
        raise NotIncremental(f"the delta of {name} grew past a quarter of its base")
    m = cowmap.decode(map_bytes, path)
    return dict(manifest.file_entry(path, size=m.size, sha256=identity_sha256(path, map_bytes),
                                    base=gens.rel(base, name),
                                    map_sha256=hashlib.sha256(map_bytes).hexdigest()),
                sha256_kind=manifest.COW_IDENTITY)


def identity_sha256(delta_path: str, map_bytes: bytes) -> str:
    """What names a COW file's logical content without reading its base: the sha256 over
    its map (which names the base by its own sha256, and says which pages the delta
    holds) and those pages of the delta.  Two files with the same identity hold the same
    bytes; reading 1.4 GB to hash a generation of a million paths would take longer
    than all the rest of an incremental publish."""
    m = cowmap.decode(map_bytes, delta_path)
    h = hashlib.sha256(b"nixfs-cow-identity-1\0" + hashlib.sha256(map_bytes).digest())
    fd = os.open(delta_path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        for i, byte in enumerate(m.bits):
            if not byte:
                continue
            for bit in range(8):
                page = i * 8 + bit
                offset = page * m.page_size
                if byte >> bit & 1 and offset < m.size:
                    h.update(os.pread(fd, min(m.page_size, m.size - offset), offset))
    finally:
        os.close(fd)
    return h.hexdigest()
