"""A generation's ``db.sqlite``: the lower's rows, with nixfs' GC root referencing each.

The lower database is copied without a lock (``firstbuild.clone``: Snapshot, the
store's own Nix never waits), so every lower row keeps its id and every column.
The GC root row (``gcroot.root_row``) gets a fixed id far above any lower id,
``ROOT_ID``: a later generation then adds the lower's new rows under their own
ids without meeting it, and Nix on a client keeps counting above it.  Its
references to every lower path are written here in one statement, on a file
nobody sees yet (no journal), where a client's first build would spend seconds.

The file is left in rollback mode, checkpointed: no ``-wal`` or ``-shm`` beside
it, readable from a read-only export.  ``apply`` brings a copy (a COW file over
the previous generation's) up to what the lower changed since.
"""

import os
import time

import apsw

from ..cow import cowmap
from ..cow import vfs as cow_vfs
from ..nixdb import gcroot
from ..nixdb.firstbuild import clone
from ..nixdb.merged import open_db
from ..nixdb.schema import quote

ROOT_ID = 1 << 62


class DbError(Exception):
    """The generation's database could not be written as it must be."""


def copy_lower(lower_db: str, dest: str) -> dict | None:
    """A consistent copy of the lower database at *dest*, in rollback mode; the name of
    the state copied (``nixdb.dbstate``: the manifest's, for clients to skip a count)."""
    state = clone(lower_db, dest)
    conn = apsw.Connection(dest)
    try:
        conn.execute("pragma journal_mode=delete").fetchall()
    finally:
        conn.close()
    return state


def bulk_connection(path: str, cow_root: str | None = None) -> apsw.Connection:
    """A connection for writing a file nobody reads yet (a COW one with its bases below
    *cow_root*): no journal, no syncs (a publish that dies leaves an incomplete
    generation, never used)."""
    conn = cow_vfs.connect(path, base_root=cow_root)
    for pragma in ("journal_mode=off", "synchronous=off", "cache_size=-400000"):
        conn.execute(f"pragma {pragma}").fetchall()
    return conn


def add_root(path: str) -> int:
    """Add the GC root row at ROOT_ID and its references to every other path; the
    number of references."""
    conn = open_db(path, bulk=True)
    try:
        with conn:
            _insert_root(conn)
            conn.execute("insert into Refs (referrer, reference) select ?, id from ValidPaths "
                         "where id < ?", (ROOT_ID, ROOT_ID))
        return conn.changes()
    finally:
        conn.close()


def _insert_root(conn) -> None:
    if conn.execute("select 1 from ValidPaths where id >= ? or path = ?",
                    (ROOT_ID, gcroot.root_path())).fetchone():
        raise DbError("the lower database already holds nixfs' GC root or ids past "
                      f"{ROOT_ID}: it is no store nixfs can publish")
    row = gcroot.root_row(int(time.time()))
    cols = ("id",) + row.columns()
    conn.execute(f"insert into ValidPaths ({', '.join(map(quote, cols))}) values "
                 f"({', '.join('?' * len(cols))})", (ROOT_ID,) + row.all_values())


def settle(path: str, cow_root: str | None = None) -> None:
    """Leave the SQLite file at *path* in rollback mode with nothing beside it, on disk
    (a COW file: its delta and its map)."""
    conn = cow_vfs.connect(path, base_root=cow_root)
    try:
        conn.execute("pragma journal_mode=delete").fetchall()
    finally:
        conn.close()
    for suffix in ("-wal", "-shm", "-journal"):
        if os.path.exists(path + suffix):
            raise DbError(f"{path}{suffix} is left beside the generation's file")
    cowmap.fsync_path(path)
    if cow_root is not None:
        cowmap.fsync_path(cowmap.map_path(path))


# ---------------------------------------------------------------------- incremental

def apply(conn, changes) -> None:
    """Bring a generation's database (a copy of the previous one, *conn*) to the
    lower's state in *changes* (``follow.LowerChanges``): rows that left go with
    their references, new rows come with their own ids, references, derivation
    outputs and the root's reference."""
    conn.execute("pragma foreign_keys=1").fetchall()
    with conn:
        for lower_id in changes.deleted:
            conn.execute("delete from Refs where reference = ?", (lower_id,))
            conn.execute("delete from ValidPaths where id = ?", (lower_id,))
        for lower_id, row in changes.rows:
            cols = ("id",) + row.columns()
            conn.execute(f"insert into ValidPaths ({', '.join(map(quote, cols))}) values "
                         f"({', '.join('?' * len(cols))})", (lower_id,) + row.all_values())
        for lower_id, row in changes.rows:
            _insert_refs(conn, lower_id, changes.refs.get(lower_id, []))
            for out in changes.outputs.get(lower_id, []):
                cols = ("drv",) + tuple(out)
                conn.execute(f"insert or replace into DerivationOutputs "
                             f"({', '.join(map(quote, cols))}) values "
                             f"({', '.join('?' * len(cols))})", (lower_id,) + tuple(out.values()))
        conn.executemany("insert or ignore into Refs (referrer, reference) values (?, ?)",
                         ((ROOT_ID, i) for i, _ in changes.rows))


def _insert_refs(conn, referrer: int, references) -> None:
    for path in references:
        found = conn.execute("select id from ValidPaths where path = ?", (path,)).fetchone()
        if found is None:
            raise DbError(f"the lower's new row {referrer} references {path}, which the "
                          "generation lacks")
        conn.execute("insert or ignore into Refs (referrer, reference) values (?, ?)",
                     (referrer, found[0]))
