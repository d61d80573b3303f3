"""Writing a whole generation: the lower database, its index and catalog, from scratch.

The first generation, and a compaction when a chain of COW generations grew too
deep.  The three files are written in the generation's directory (which nobody
uses before its manifest exists): the lower database copied lock-free, the index
of its rows, then at once the root's references with the database settled and the
database's and index's hashes (one thread: SQLite's and hashlib's work without the
interpreter lock) and the catalog (the walk of the store, in worker processes); last
the catalog's hash.
"""

import logging
import os
from concurrent.futures import ThreadPoolExecutor

import apsw

from . import dbfile, indexfile, manifest
from . import catalog as catalog_file
from .clock import Clock
from .generations import CATALOG, DB, INDEX, Generations

log = logging.getLogger(__name__)


def write(gens: Generations, number: int, lower_db: str, schema: int,
          clock: Clock | None = None) -> dict:
    """Write generation *number* whole; the manifest's content (not yet sealed)."""
    clock = clock or Clock()
    db, index, catalog = (gens.file(number, n) for n in (DB, INDEX, CATALOG))
    state = dbfile.copy_lower(lower_db, db)
    facts = dict(lower_db_facts(db, schema), state=state)
    clock.lap("copy")
    indexfile.write(index, db, max_id=facts["max_id"], count=facts["count"], schema=schema)
    dbfile.settle(index)  # final before the catalog's workers read it: hashed meanwhile
    clock.lap("index")
    with ThreadPoolExecutor(max_workers=1) as pool:
        db_done = pool.submit(_finish_db, db, index)
        cat_stats = catalog_file.write(gens.store, index, catalog)
        clock.lap("catalog")
        refs, hashes = db_done.result()
        clock.lap("root")
    dbfile.settle(catalog)
    hashes[CATALOG] = manifest.file_sha256(catalog)
    files = {name: _entry(gens.file(number, name), hashes[name]) for name in (DB, INDEX, CATALOG)}
    clock.lap("hashes")
    log.debug("generation %d written whole (%d root references, catalog of %d paths): %s",
              number, refs, cat_stats["paths"], clock.phases)
    return {"lower_db": facts, "files": files, "depth": 0, "catalog": cat_stats}


def lower_db_facts(db: str, schema: int) -> dict:
    conn = apsw.Connection(db, flags=apsw.SQLITE_OPEN_READONLY)
    try:
        return manifest.lower_facts(conn, schema, below=dbfile.ROOT_ID)
    finally:
        conn.close()


def _finish_db(db: str, index: str) -> tuple[int, dict]:
    """The root's references and the two files' hashes, while the catalog is walked
    (hashlib and SQLite work without the interpreter lock: a third of the publish's
    work that would otherwise come after the walk)."""
    refs = dbfile.add_root(db)
    dbfile.settle(db)
    return refs, {DB: manifest.file_sha256(db), INDEX: manifest.file_sha256(index)}


def _entry(path: str, sha256: str) -> dict:
    size = os.stat(path).st_size
    return manifest.file_entry(path, size=size, sha256=sha256)
