"""Changes nixfs makes to the merged store database (``MNT/var/nix/db/db.sqlite``).

Once mounted, the merged database is only opened through the mount, so that
SQLite's POSIX locks and ``-shm`` pages are the ones Nix uses (the FUSE kernel
module keeps both per inode).  Before the mount goes live it is opened directly.

Ids are the merged database's own: a row copied from the lower gets the next
free id, and references are mapped by store path.
"""

import os
from dataclasses import dataclass

import apsw

from .schema import check_tables

COLUMNS = ("path", "hash", "registrationTime", "deriver", "narSize", "ultimate", "sigs", "ca")


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

    def values(self) -> tuple:
        return (self.path, self.hash, self.registrationTime, self.deriver, self.narSize,
                self.ultimate, self.sigs, self.ca)


def open_db(path: str, *, bulk: bool = False) -> apsw.Connection:
    """A connection as Nix makes them (foreign keys on); *bulk* for a database nobody
    else can see yet (no journal, large cache)."""
    conn = apsw.Connection(path)
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
        self.conn.execute(f"insert into ValidPaths ({', '.join(COLUMNS)}) values "
                          f"({', '.join('?' * len(COLUMNS))})", row.values())
        return self.conn.last_insert_rowid()

    def replace(self, row_id: int, row: PathRow) -> None:
        """Give an existing row another layer's facts (same path, other build)."""
        self.conn.execute("update ValidPaths set hash = ?, registrationTime = ?, deriver = ?, "
                          "narSize = ?, ultimate = ?, sigs = ?, ca = ? where id = ?",
                          row.values()[1:] + (row_id,))

    def add_refs(self, referrer: int, references) -> None:
        self.conn.executemany("insert or ignore into Refs (referrer, reference) values (?, ?)",
                              ((referrer, r) for r in references))

    def add_outputs(self, drv: int, outputs) -> None:
        self.conn.executemany("insert or replace into DerivationOutputs (drv, id, path) "
                              "values (?, ?, ?)", ((drv, name, path) for name, path in outputs))

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
