"""Changes nixfs makes to the merged store database (``MNT/var/nix/db/db.sqlite``).

Once mounted, the merged database is only opened through the mount, so that
SQLite's POSIX locks and ``-shm`` pages are the ones Nix uses (the FUSE kernel
module keeps both per inode).  Before the mount goes live it is opened directly.

Ids are the merged database's own: a row copied from the lower gets the next
free id, and references are mapped by store path.  Columns a Nix added to
``ValidPaths`` or ``DerivationOutputs`` beyond Nix 2.8's (Determinate Nix's
``provenance``, say) travel with their rows.
"""

import os
from dataclasses import dataclass

import apsw

from ..cow.vfs import connect
from .schema import check_tables, quote

COLUMNS = ("path", "hash", "registrationTime", "deriver", "narSize", "ultimate", "sigs", "ca")
OUTPUT_KEY = ("drv",)  # DerivationOutputs' column that holds a (database-specific) id


@dataclass
class PathRow:
    """A ValidPaths row without its (database-specific) id."""
    path: str
    hash: str
    registrationTime: int
    deriver: str | None
    narSize: int | None
    ultimate: int | None
    sigs: str | None
    ca: str | None
    extra: tuple = ()  # ((column, value), ...) beyond COLUMNS, as the source has them

    def values(self) -> tuple:
        return (self.path, self.hash, self.registrationTime, self.deriver, self.narSize,
                self.ultimate, self.sigs, self.ca)

    def columns(self) -> tuple:
        return COLUMNS + tuple(c for c, _ in self.extra)

    def all_values(self) -> tuple:
        return self.values() + tuple(v for _, v in self.extra)


def table_columns(conn, table: str) -> list[str]:
    return [r[1] for r in conn.execute(f"pragma table_info({quote(table)})")]


def select_rows(conn, where: str, args=()) -> list:
    """(id, PathRow) of the ValidPaths rows matching *where*, ascending id, with every
    column the table has."""
    extra = [c for c in table_columns(conn, "ValidPaths") if c not in COLUMNS and c != "id"]
    cols = ", ".join(quote(c) for c in ("id",) + COLUMNS + tuple(extra))
    n = len(COLUMNS) + 1
    return [(r[0], PathRow(*r[1:n], extra=tuple(zip(extra, r[n:]))))
            for r in conn.execute(f"select {cols} from ValidPaths where {where} order by id", args)]


def select_outputs(conn, drv: int) -> list[dict]:
    """The DerivationOutputs rows of *drv*, every column but the id of the derivation."""
    cols = [c for c in table_columns(conn, "DerivationOutputs") if c not in OUTPUT_KEY]
    return [dict(zip(cols, r)) for r in conn.execute(
        f"select {', '.join(map(quote, cols))} from DerivationOutputs where drv = ?", (drv,))]


def open_db(path: str, *, bulk: bool = False, cow_root: str | None = None) -> apsw.Connection:
    """A connection as Nix makes them (foreign keys on); *bulk* for a database nobody
    else can see yet (no journal, large cache).  A copy-on-write database (one built
    over a published generation) opens through the nixfs-cow VFS, its base found in
    *cow_root* (the lower)."""
    conn = connect(path, base_root=cow_root)
    conn.setbusytimeout(600_000)  # Nix holds the write lock only briefly; never give up early
    if bulk:
        for pragma in ("journal_mode=off", "synchronous=off", "cache_size=-1000000"):
            conn.execute(f"pragma {pragma}").fetchall()
    conn.execute("pragma foreign_keys=1").fetchall()
    check_tables(conn)
    return conn


class MergedDb:
    def __init__(self, conn: apsw.Connection):
        self.conn = conn

    def close(self) -> None:
        self.conn.close()

    def begin(self):
        """An immediate write transaction (a context manager)."""
        return _Immediate(self.conn)

    def id_of(self, path: str) -> int | None:
        row = self.conn.execute("select id from ValidPaths where path = ?", (path,)).fetchone()
        return row[0] if row else None

    def hash_of(self, path: str) -> str | None:
        row = self.conn.execute("select hash from ValidPaths where path = ?", (path,)).fetchone()
        return row[0] if row else None

    def insert(self, row: PathRow) -> int:
        cols = row.columns()
        self.conn.execute(f"insert into ValidPaths ({', '.join(map(quote, cols))}) values "
                          f"({', '.join('?' * len(cols))})", row.all_values())
        return self.conn.last_insert_rowid()

    def replace(self, row_id: int, row: PathRow) -> None:
        """Give an existing row another layer's facts (same path, other build)."""
        cols = row.columns()[1:]
        self.conn.execute(f"update ValidPaths set {', '.join(quote(c) + ' = ?' for c in cols)} "
                          "where id = ?", row.all_values()[1:] + (row_id,))

    def add_refs(self, referrer: int, references) -> None:
        self.conn.executemany("insert or ignore into Refs (referrer, reference) values (?, ?)",
                              ((referrer, r) for r in references))

    def add_outputs(self, drv: int, outputs) -> None:
        """*outputs*: DerivationOutputs rows as dicts of column -> value, without drv."""
        for out in outputs:
            cols = ("drv",) + tuple(out)
            self.conn.execute(f"insert or replace into DerivationOutputs "
                              f"({', '.join(map(quote, cols))}) values "
                              f"({', '.join('?' * len(cols))})", (drv, *out.values()))

    def has_table(self, table: str) -> bool:
        return self.conn.execute("select 1 from sqlite_master where type = 'table' and name = ?",
                                 (table,)).fetchone() is not None

    def referrers_closure(self, paths, keep=()) -> set[str]:
        """*paths* (those present) and every path that refers to one of them, transitively;
        paths in *keep* are neither included nor followed."""
        kept = {i for i in (self.id_of(p) for p in keep) if i is not None}
        ids = {i for i in (self.id_of(p) for p in paths) if i is not None} - kept
        todo = list(ids)
        while todo:
            i = todo.pop()
            for (r,) in self.conn.execute("select referrer from Refs where reference = ?", (i,)):
                if r not in ids and r not in kept:
                    ids.add(r)
                    todo.append(r)
        return {self.conn.execute("select path from ValidPaths where id = ?", (i,)).fetchone()[0]
                for i in ids}

    def remove(self, paths, keep=()) -> set[str]:
        """Invalidate *paths* and everything that refers to them but *keep* (whose
        references to them go); return what went."""
        gone = self.referrers_closure(paths, keep)
        ids = [self.id_of(p) for p in gone]
        # References to what goes are dropped first, so "on delete restrict" never fires.
        self.conn.executemany("delete from Refs where reference = ?", ((i,) for i in ids))
        if self.has_table("RealisationsRefs") and self.has_table("Realisations"):
            # Realisations of what goes leave with it (on delete cascade); one that refers
            # to them would hold them back (on delete restrict).
            self.conn.executemany(
                "delete from RealisationsRefs where realisationReference in "
                "(select id from Realisations where outputPath = ?)", ((i,) for i in ids))
        self.conn.executemany("delete from ValidPaths where id = ?", ((i,) for i in ids))
        return gone


class _Immediate:
    def __init__(self, conn):
        self.conn = conn

    def __enter__(self):
        self.conn.execute("begin immediate")
        return self

    def __exit__(self, exc_type, exc, tb):
        self.conn.execute("rollback" if exc_type else "commit")


def db_size(db_dir: str) -> int:
    total = 0
    for name in ("db.sqlite", "db.sqlite-wal", "db.sqlite-shm"):
        try:
            st = os.stat(os.path.join(db_dir, name))
            total += st.st_blocks * 512
        except FileNotFoundError:
            pass
    return total
