"""Writing a whole generation: the lower database, its index and catalog, from scratch.

The first generation, and a compaction when a chain of COW generations grew too
deep.  The three files are written in the generation's directory (which nobody
uses before its manifest exists): the lower database copied lock-free, the index
of its rows, then at once the root's references with the database settled (one
thread, SQLite's work without the interpreter lock) and the catalog (the walk of
the store, this thread).
"""

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor

import apsw

from . import dbfile, indexfile, manifest
from . import catalog as catalog_file
from .generations import CATALOG, DB, INDEX, Generations

log = logging.getLogger(__name__)


def write(gens: Generations, number: int, lower_db: str, schema: int) -> dict:
    """Write generation *number* whole; the manifest's content (not yet sealed)."""
    t0 = time.monotonic()
    db, index, catalog = (gens.file(number, n) for n in (DB, INDEX, CATALOG))
    state = dbfile.copy_lower(lower_db, db)
    facts = dict(lower_db_facts(db, schema), state=state)
    t_copy = time.monotonic()
    indexfile.write(index, db, max_id=facts["max_id"], count=facts["count"], schema=schema)
    t_index = time.monotonic()
    with ThreadPoolExecutor(max_workers=3) as pool:
        db_done = pool.submit(_finish_db, db)
        cat_stats = catalog_file.write(gens.store, index, catalog)
        dbfile.settle(catalog)
        hashes = {CATALOG: pool.submit(manifest.file_sha256, catalog)}
        dbfile.settle(index)
        hashes[INDEX] = pool.submit(manifest.file_sha256, index)
        refs = db_done.result()
        hashes[DB] = pool.submit(manifest.file_sha256, db)
        files = {name: _entry(gens.file(number, name), hashes[name].result())
                 for name in (DB, INDEX, CATALOG)}
    log.debug("generation %d written whole in %.1f s (copy %.1f s, index %.1f s, %d root "
             "references, catalog of %d paths)", number, time.monotonic() - t0,
             t_copy - t0, t_index - t_copy, refs, cat_stats["paths"])
    return {"lower_db": facts, "files": files, "depth": 0, "catalog": cat_stats}


def lower_db_facts(db: str, schema: int) -> dict:
    conn = apsw.Connection(db, flags=apsw.SQLITE_OPEN_READONLY)
    try:
        return manifest.lower_facts(conn, schema, below=dbfile.ROOT_ID)
    finally:
        conn.close()


def _finish_db(db: str) -> int:
    refs = dbfile.add_root(db)
    dbfile.settle(db)
    return refs


def _entry(path: str, sha256: str) -> dict:
    size = os.stat(path).st_size
    return manifest.file_entry(path, size=size, sha256=sha256)
