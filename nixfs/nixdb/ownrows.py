"""The rows of the paths an upper holds itself: found, kept aside, carried into a new
merged database.

A merged database is built anew when its index is lost, and when a mount rebases
onto a newer published generation (``fromgeneration``); the rows of the upper's own
paths (what Nix built or added there) must reach the new one, or Nix forgets them.
They are read from the upper's database in place.  Over a generation that database
is a copy-on-write file whose base may have been pruned meanwhile: then they come
from ``UPPER/.nixfs/own-rows.sqlite``, their copy.  The worker updates it in the
round after Nix committed a row of an upper path (``Keeper``), so a daemon killed or
unmounted by ``fusermount -u`` after its base was pruned loses at most that round's;
every clean unmount writes it once more.  The rows are found by the upper's store
listing, so the cost grows with the upper, never with the lower.
"""

import logging
import os
import time

import apsw

from ..cow.cowmap import fsync_path
from ..overlay import upperformat as fmt
from . import dbstate, gcroot
from .files import StoreFiles
from .merged import MergedDb, open_db, select_rows, table_columns
from .rows import basename, insert_rows, refs_and_outputs
from .schema import STORE_DIR, SchemaError, carry_shape, quote, read_shape
from .snapshot import clone_range
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
                            "rows come from their copy (own-rows.sqlite)", e)
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
    return len(_write(files, upper_store, source))


def _write(files: StoreFiles, upper_store: UpperStore, source: str | None) -> set[bytes]:
    """``write``; returns the names of the paths whose rows it wrote."""
    tmp = _fresh_tmp(files)
    conn = open_db(source or files.merged_db, cow_root=files.lower)
    try:
        own = select_own(conn, upper_store)
        _copy(conn, [i for i, _ in own], tmp)
    finally:
        conn.close()
    _install(files, tmp)
    return {basename(r.path) for _, r in own}


def _fresh_tmp(files: StoreFiles) -> str:
    tmp = os.path.join(files.work, os.fsdecode(b"own-rows.%d.sqlite" % os.getpid()))
    for suffix in ("", "-journal"):
        if os.path.exists(tmp + suffix):
            os.unlink(tmp + suffix)
    return tmp


def _install(files: StoreFiles, tmp: str) -> None:
    fsync_path(tmp)
    os.rename(tmp, own_rows_path(files))
    fsync_path(files.state_dir)


def _append(files: StoreFiles, through_mount: str, names: set[bytes]) -> set[bytes] | None:
    """Add the rows of *names* (upper paths the copy lacks) to ``own-rows.sqlite``, which
    the merged database at *through_mount* wrote whole earlier in this mount (so its ids
    are the database's): a copy of the file (bytes, on the upper's disk) grows by them
    and replaces it, the same way a whole write does.  Returns the names added, or None
    where the copy cannot simply grow (a path or id in it now names another row, a
    changed table): the caller then writes it whole."""
    tmp = _fresh_tmp(files)
    try:
        _copy_file(own_rows_path(files), tmp)
    except FileNotFoundError:
        return None
    conn = open_db(through_mount)
    try:
        own = [r for n in sorted(names)
               for r in select_rows(conn, "path = ?", (f"{STORE_DIR}/{os.fsdecode(n)}",))]
        out = apsw.Connection(tmp)
        try:
            with out:
                if not _add(conn, out, own):
                    return None
        except apsw.Error:
            return None
        finally:
            out.close()
    finally:
        conn.close()
    _install(files, tmp)
    return {basename(r.path) for _, r in own}


def _add(conn, out, own: list) -> bool:
    """The rows *own* of *conn* with their references, the rows those refer to and their
    outputs, into the copy *out*; False (nothing added) if a row there is in the way."""
    held = dict(out.execute("select id, path from ValidPaths"))
    held_paths = set(held.values())
    if any(i in held or r.path in held_paths for i, r in own):
        return False
    own_ids = [i for i, _ in own]
    refs = [r for i in own_ids for r in conn.execute(
        "select referrer, reference from Refs where referrer = ?", (i,))]
    referred = {ref for _, ref in refs} - set(own_ids)
    for ref in referred & held.keys():
        (path,) = conn.execute("select path from ValidPaths where id = ?", (ref,)).fetchone()
        if path != held[ref]:
            return False
    _copy_rows(conn, out, "ValidPaths", "id", sorted(set(own_ids) | (referred - held.keys())))
    out.executemany("insert into Refs (referrer, reference) values (?, ?)", refs)
    _copy_rows(conn, out, "DerivationOutputs", "drv", own_ids)
    return True


def _copy_file(source: str, dest: str) -> None:
    """*source* (never through a symlink) copied to a new file *dest*."""
    src = os.open(source, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        dst = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            clone_range(src, dst, os.fstat(src).st_size)
        finally:
            os.close(dst)
    finally:
        os.close(src)


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


def _copied_names(files: StoreFiles) -> set[bytes]:
    """The names of the paths whose rows ``own-rows.sqlite`` holds (none if unreadable);
    rows it holds for the paths they refer to come along, harmless: only the upper's
    paths are ever adopted from it."""
    try:
        conn = apsw.Connection(own_rows_path(files), flags=apsw.SQLITE_OPEN_READONLY)
    except apsw.Error:
        return set()
    try:
        return {basename(p) for (p,) in conn.execute("select path from ValidPaths")}
    except apsw.Error:
        return set()
    finally:
        conn.close()


class Keeper:
    """Keeps ``own-rows.sqlite`` current while an upper over a generation is mounted.

    Asked once a round (the worker's), it updates the copy when the upper holds a path
    whose row the merged database has and the copy lacks.  A round in which neither the
    upper's store directory nor the database's files changed costs four ``stat``s; one
    in which they did, a listing of the upper's store and a lookup per path of it not
    in the copy yet.  The mount's first update writes the copy whole (a lookup per upper
    path), later ones add the new rows to a byte copy of it.  None grows with the lower.
    Rows of paths the upper let go stay in the copy until its next rewrite: adoption
    only takes the paths the upper holds."""

    # A stamp taken within this of its newest time may share a clock tick with a change
    # made just after it: the next round looks again (dbstate's reason, and its bound).
    RACY_NS = dbstate.RACY_NS

    def __init__(self, files: StoreFiles, upper_store: UpperStore):
        self.files, self.upper_store = files, upper_store
        self._stamp = None
        self._copied: set[bytes] | None = None  # read from the copy at the first round
        self._whole = False  # whether this mount wrote the copy whole (then it grows)
        self._last_error = ""

    def refresh(self, through_mount: str) -> int | None:
        """The rows written, or None (the copy is current).  A failure is logged once
        and tried again next round: following the lower goes on."""
        stamp = self._stamp_now()
        if stamp is not None and stamp == self._stamp:
            return None
        try:
            count = self._refresh(through_mount)
        except READ_ERRORS as e:
            if str(e) != self._last_error:
                log.warning("cannot copy the upper's own database rows aside (%s): tried "
                            "again next round", e)
            self._last_error = str(e)
            return None
        self._last_error = ""
        racy = stamp is None or time.time_ns() - max(t for t, _ in stamp) < self.RACY_NS
        self._stamp = None if racy else stamp
        return count

    def _refresh(self, through_mount: str) -> int | None:
        if self._copied is None:
            self._copied = _copied_names(self.files)
        held = self.upper_store.held_names() - {os.fsencode(gcroot.root_basename())}
        self._copied &= held
        missing = held - self._copied
        if not missing or not self._any_row(through_mount, missing):
            return None
        t0 = time.monotonic()
        added = _append(self.files, through_mount, missing) if self._whole else None
        if added is None:
            added = self._copied = _write(self.files, self.upper_store, through_mount)
            self._whole = True
        self._copied |= added
        log.info("kept the rows of %d upper paths aside (%d now, %s) in %.3f s", len(added),
                 len(self._copied), own_rows_path(self.files), time.monotonic() - t0)
        return len(added)

    def _any_row(self, through_mount: str, names: set[bytes]) -> bool:
        conn = open_db(through_mount)
        try:
            return any(select_rows(conn, "path = ?", (f"{STORE_DIR}/{os.fsdecode(n)}",))
                       for n in names)
        finally:
            conn.close()

    def _stamp_now(self):
        """(mtime, size) of the upper's store directory and the database's files, or
        None if one cannot be read."""
        db = self.files.merged_db
        stamp = []
        for path in (self.upper_store.path, db, db + "-wal", db + "-journal"):
            try:
                st = os.stat(path, follow_symlinks=False)
                stamp.append((st.st_mtime_ns, st.st_size))
            except FileNotFoundError:
                stamp.append((0, -1))
            except OSError:
                return None
        return tuple(stamp)
