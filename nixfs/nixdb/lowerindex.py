"""nixfs' own index of the lower store's valid paths (``UPPER/.nixfs/lower-index.sqlite``).

The merged view shows a lower store entry only if the lower database says it
is a valid path, so lookups in ``store/`` ask this index.  It lives beside the
merged database, not in it: the daemon reads it directly (microseconds, no FUSE
round trip, no risk of waiting on its own mount), while the merged database is
only ever touched through the mount once mounted.

``paths`` holds one row per valid lower path: its name in ``store/``, its id in
the lower database, and whether the merged view shows it (a path whose closure
lost a member, hidden by ``rm``, is kept but not shown).  ``ca_rows`` holds the
lower's realisations carried into the merged database (``carows``).  ``meta``
records how far the lower database has been followed.
"""

import os

import apsw

from ..cow import vfs as cow_vfs
from .schema import STORE_DIR

CA_FOLLOWED = ("Realisations", "BuildTraceV3")  # the ca tables nixfs follows (carows)

SHOWN, BROKEN = 0, 1

# Made after the first build, off the path to a usable mount (deletions are found by id).
ID_INDEX = "create index if not exists paths_lower_id on paths(lower_id)"
SCHEMA = """
create table if not exists paths (
    name     blob primary key,      -- basename in store/, e.g. b"<hash>-hello-2.12"
    lower_id integer not null,      -- ValidPaths.id in the lower database
    state    integer not null default 0  -- 0 shown, 1 not shown (closure broken or hidden)
) without rowid;
create table if not exists meta (key text primary key, value) without rowid;
-- Realisations of the lower carried into the merged database, by their lower id.
create table if not exists ca_rows (
    tbl      text not null,         -- Realisations or BuildTraceV3
    lower_id integer not null,      -- its id in the lower database
    drv      text not null,         -- its key there: drvPath, outputName
    output   text not null,
    primary key (tbl, lower_id)
) without rowid;
-- The few paths not shown, found without a scan (empty while every path is shown).
create index if not exists paths_not_shown on paths(state) where state != 0;
"""


class LowerIndex:
    FILE = "lower-index.sqlite"

    def __init__(self, path: str, *, cow_root: str | None = None):
        """*cow_root*: where the base of a copy-on-write index is (a published
        generation's, or one over it), relative to which its map names it."""
        self.path = path
        self.cow_root = cow_root
        self.conn = self._open(path, cow_root)

    @property
    def on_lower(self) -> bool:
        """Whether a query may read the lower: the file is copy-on-write over a base
        there (a published generation's index)."""
        return self.cow_root is not None and cow_vfs.is_cow(self.path)

    @staticmethod
    def _open(path: str, cow_root: str | None = None) -> apsw.Connection:
        conn = cow_vfs.connect(path, base_root=cow_root)
        conn.setbusytimeout(60_000)
        conn.execute("pragma journal_mode=wal").fetchall()
        conn.execute("pragma synchronous=normal").fetchall()
        conn.execute(SCHEMA).fetchall()  # apsw runs every statement as the cursor is read
        return conn

    @classmethod
    def create_from(cls, path: str, store_db: str) -> None:
        """Write a new index of every path in the store database *store_db*, in bulk
        (the file is new: no journal; its id order index is made later)."""
        conn = apsw.Connection(path, flags=apsw.SQLITE_OPEN_READWRITE | apsw.SQLITE_OPEN_CREATE
                               | apsw.SQLITE_OPEN_URI)
        try:
            for pragma in ("journal_mode=off", "synchronous=off", "cache_size=-500000"):
                conn.execute(f"pragma {pragma}").fetchall()
            conn.execute(SCHEMA).fetchall()
            conn.execute("attach ? as src", (f"file:{store_db}?mode=ro",))
            conn.execute("insert into paths select cast(substr(path, length(?) + 2) as blob), id, 0 "
                         "from src.ValidPaths order by 1", (STORE_DIR,))
            for table in CA_FOLLOWED:
                if conn.execute("select 1 from src.sqlite_master where type = 'table' and "
                                "name = ?", (table,)).fetchone():
                    conn.execute(f"insert into ca_rows select ?, id, drvPath, outputName "
                                 f"from src.{table}", (table,))
                    max_id, count = conn.execute(f"select coalesce(max(id), 0), count(*) "
                                                 f"from src.{table}").fetchone()
                    conn.executemany("insert or replace into meta values (?, ?)",
                                     ((f"ca_max:{table}", max_id), (f"ca_count:{table}", count)))
            conn.execute("detach src")
            conn.execute("pragma journal_mode=wal").fetchall()
        finally:
            conn.close()

    def reader(self) -> "LowerIndex":
        """A second connection, for another thread."""
        other = LowerIndex.__new__(LowerIndex)
        other.path, other.cow_root = self.path, self.cow_root
        other.conn = self._open(self.path, self.cow_root)
        return other

    def close(self) -> None:
        self.conn.close()

    # ------------------------------------------------------------------ queries

    def shown(self, name: bytes) -> bool:
        row = self.conn.execute("select state from paths where name = ?", (name,)).fetchone()
        return row is not None and row[0] == SHOWN

    def state(self, name: bytes) -> tuple[int, int] | None:
        """(lower_id, state) of *name*, or None if it is no valid lower path."""
        return self.conn.execute("select lower_id, state from paths where name = ?",
                                 (name,)).fetchone()

    def states(self, names: list[bytes]) -> dict[bytes, tuple[int, int]]:
        """``state`` of each of *names* that is a valid lower path, in one query."""
        marks = ",".join("?" * len(names))
        return {name: (lower_id, state) for name, lower_id, state in self.conn.execute(
            f"select name, lower_id, state from paths where name in ({marks})", names)}

    def shown_after(self, name: bytes, count: int) -> list[tuple[bytes, int]]:
        """(name, lower_id) of the next *count* shown paths after *name*, in name order
        (the order the store is listed in)."""
        return self.conn.execute(
            "select name, lower_id from paths where name > ? and state = 0 order by name "
            "limit ?", (name, count)).fetchall()

    def shown_names(self) -> list[bytes]:
        return [r[0] for r in self.conn.execute("select name from paths where state = 0")]

    def not_shown_names(self) -> list[bytes]:
        return [r[0] for r in self.conn.execute("select name from paths where state != 0")]

    def not_shown_count(self) -> int:
        return self.conn.execute("select count(*) from paths where state != 0").fetchone()[0]

    def ids_upto(self, up_to: int):
        """(lower_id, name) of every path with a lower id up to *up_to*, ascending id
        (one cursor: constant memory, for a merge walk against the lower's ids)."""
        return self.conn.execute("select lower_id, name from paths where lower_id <= ? "
                                 "order by lower_id", (up_to,))

    def ca_rows_upto(self, table: str, up_to: int):
        """(lower_id, drvPath, outputName) of the *table* rows carried, ascending id."""
        return self.conn.execute("select lower_id, drv, output from ca_rows where tbl = ? "
                                 "and lower_id <= ? order by lower_id", (table, up_to))

    def data_version(self) -> int:
        """Changes whenever another connection commits to the index (SQLite's
        ``data_version``): a cache of its answers is current while this is unchanged."""
        return self.conn.data_version()

    def count(self) -> int:
        return self.conn.execute("select count(*) from paths").fetchone()[0]

    def get(self, key: str, default=None):
        row = self.conn.execute("select value from meta where key = ?", (key,)).fetchone()
        return default if row is None else row[0]

    # ------------------------------------------------------------------ changes

    def transaction(self):
        """A write transaction (a context manager): commits on success, else rolls back."""
        return self.conn

    def make_id_index(self) -> None:
        """The lower-id order index, made once the first build is usable (``ID_INDEX``)."""
        self.conn.execute(ID_INDEX)

    def put(self, key: str, value) -> None:
        self.conn.execute("insert or replace into meta values (?, ?)", (key, value))

    def add(self, rows) -> None:
        """Rows of (name, lower_id, state)."""
        self.conn.executemany("insert or replace into paths values (?, ?, ?)", rows)

    def remove(self, names) -> None:
        self.conn.executemany("delete from paths where name = ?", ((n,) for n in names))

    def set_state(self, names, state: int) -> None:
        self.conn.executemany("update paths set state = ? where name = ?",
                              ((state, n) for n in names))

    def record_ca(self, table: str, deleted_ids, added) -> None:
        """The *table* rows with lower ids *deleted_ids* are gone; *added* rows of
        (table, lower_id, drvPath, outputName) were carried."""
        self.conn.executemany("delete from ca_rows where tbl = ? and lower_id = ?",
                              ((table, i) for i in deleted_ids))
        self.conn.executemany("insert or replace into ca_rows values (?, ?, ?, ?)", added)

    def stats(self) -> dict:
        """What ``nixfs status`` shows of the index: paths, those not shown, its size."""
        # The count the index followed (a count(*) would read every page of the file).
        return {"lower_paths": self.get("lower_count") or self.count(),
                "lower_paths_not_shown": self.not_shown_count(),
                "lower_max_id": self.get("lower_max_id", 0),
                "index_bytes": self.size_bytes()}

    def size_bytes(self) -> int:
        total = 0
        for suffix in ("", "-wal", "-shm"):
            try:
                total += os.stat(self.path + suffix).st_size
            except FileNotFoundError:
                pass
        return total
