"""The rows of the paths an upper holds itself: found, kept aside, carried into a new
merged database.

A merged database is built anew when its index is lost, and when a mount rebases
onto a newer published generation (``fromgeneration``); the rows of the upper's own
paths (what Nix built or added there) must reach the new one, or Nix forgets them.
They are read from the upper's database in place.  Over a generation that database
is a copy-on-write file whose base may have been pruned meanwhile: then they come
from ``UPPER/.nixfs/own-rows.sqlite``, the copy every clean unmount of such an upper
writes.  The rows are found by the upper's store listing, so the cost grows with the
upper, never with the lower.
"""

import logging
import os

import apsw

from ..cow.cowmap import fsync_path
from ..overlay import upperformat as fmt
from . import gcroot
from .files import StoreFiles
from .merged import MergedDb, open_db, select_rows, table_columns
from .rows import insert_rows, refs_and_outputs
from .schema import STORE_DIR, SchemaError, carry_shape, quote, read_shape
from .upperstore import UpperStore

log = logging.getLogger(__name__)

# What the copy holds: the rows, their references and derivation outputs (with their
# tables' own definitions, so columns a Nix added travel too).
COPIED_TABLES = ("ValidPaths", "Refs", "DerivationOutputs")
# What reading a database can fail with, besides SQLite's own errors: a base that is
# gone or damaged (a copy-on-write file's CowError is an OSError), a shape nixfs cannot read.
READ_ERRORS = (apsw.Error, SchemaError, OSError)


def select_own(conn, upper_store: UpperStore) -> list:
    """(id, PathRow) of the rows of *conn* whose paths the upper holds (not nixfs' GC
    root), ascending id: one lookup per upper entry."""
    rows = []
    for name in upper_store.held_names():
        path = f"{STORE_DIR}/{os.fsdecode(name)}"
        if path != gcroot.root_path():
            rows += select_rows(conn, "path = ?", (path,))
    rows.sort(key=lambda r: r[0])
    return rows


def adopt(files: StoreFiles, upper_store: UpperStore, db: MergedDb) -> int:
    """Carry the rows of the upper's own paths into *db* (a database being built), from
    the upper's database in place, else from its copy; returns how many.  Where
    neither can be read, one error line: the paths stay unregistered (Nix rebuilds or
    substitutes them when needed)."""
    sources = [p for p in (files.merged_db, own_rows_path(files)) if os.path.exists(p)]
    errors = []
    for source in sources:
        try:
            return _adopt_from(source, files.lower, upper_store, db)
        except READ_ERRORS as e:
            errors.append(f"{source}: {e}")
            if source == files.merged_db and len(sources) > 1:
                log.warning("the upper's earlier database is unreadable (%s): its own paths' "
                            "rows come from its copy of the last clean unmount", e)
    if errors:
        log.error("the upper's earlier database is unreadable (%s): its paths stay "
                  "unregistered; Nix rebuilds or substitutes them when needed",
                  "; ".join(errors))
    return 0


def _adopt_from(source: str, lower: str, upper_store: UpperStore, db: MergedDb) -> int:
    old = open_db(source, cow_root=lower)
    try:
        old_shape = read_shape(old, where="the upper's earlier database", unknown_ok=True)
        rows = [(i, r) for i, r in select_own(old, upper_store) if db.id_of(r.path) is None]
        refs, outputs = refs_and_outputs(old, [i for i, _ in rows])
    finally:
        old.close()
    if rows:
        carry_shape(old_shape, db.conn)  # columns a Nix on the mount added come along
    insert_rows(db, rows, refs, outputs, None, upper_store)
    return len(rows)


def own_rows_path(files: StoreFiles) -> str:
    return os.path.join(files.state_dir, os.fsdecode(fmt.OWN_ROWS_FILE))


def remove(files: StoreFiles) -> None:
    """The copy is not needed once the database in place is a whole copy."""
    try:
        os.unlink(own_rows_path(files))
    except FileNotFoundError:
        pass


def write(files: StoreFiles, upper_store: UpperStore, source: str | None = None) -> int:
    """Write ``own-rows.sqlite`` from the merged database (unmounted: nothing else has
    it open) or *source*, to a temporary name in the work folder, synced, then renamed
    into place; returns the rows written."""
    tmp = os.path.join(files.work, os.fsdecode(b"own-rows.%d.sqlite" % os.getpid()))
    for suffix in ("", "-journal"):
        if os.path.exists(tmp + suffix):
            os.unlink(tmp + suffix)
    conn = open_db(source or files.merged_db, cow_root=files.lower)
    try:
        own = select_own(conn, upper_store)
        count = _copy(conn, [i for i, _ in own], tmp)
    finally:
        conn.close()
    fsync_path(tmp)
    os.rename(tmp, own_rows_path(files))
    fsync_path(files.state_dir)
    return count


def _copy(conn, own_ids: list[int], dest: str) -> int:
    """The rows *own_ids* of *conn*, the rows they refer to (by path, on reading) and
    their references and outputs, into a new database at *dest*."""
    out = apsw.Connection(dest)
    try:
        with out:
            for table in COPIED_TABLES:
                (sql,) = conn.execute("select sql from sqlite_master where type = 'table' "
                                      "and name = ?", (table,)).fetchone()
                out.execute(sql)
            refs = [r for i in own_ids for r in conn.execute(
                "select referrer, reference from Refs where referrer = ?", (i,))]
            ids = sorted(set(own_ids) | {ref for _, ref in refs})
            _copy_rows(conn, out, "ValidPaths", "id", ids)
            out.executemany("insert into Refs (referrer, reference) values (?, ?)", refs)
            _copy_rows(conn, out, "DerivationOutputs", "drv", own_ids)
    finally:
        out.close()
    return len(own_ids)


def _copy_rows(conn, out, table: str, key: str, ids) -> None:
    columns = table_columns(conn, table)
    cols, marks = ", ".join(map(quote, columns)), ", ".join("?" * len(columns))
    for i in ids:
        out.executemany(f"insert into {quote(table)} ({cols}) values ({marks})",
                        conn.execute(f"select {cols} from {quote(table)} where {quote(key)} = ?",
                                     (i,)).fetchall())

