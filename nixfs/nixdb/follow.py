"""Following the lower database while mounted (and at a remount): by its ids.

``ValidPaths.id`` only grows: rows above the last id seen are new, and a count
that does not add up means deletions, found by a merge walk of the ids the
index holds.  Nothing ever rescans the whole lower, and the count is skipped where
the live database provably is in the state the index followed last (``dbstate``:
the name of that state is kept beside the count).  Rows travel with every
column the lower has; before each change the merged database is given the
lower's shape (``schema.carry_shape``), and the lower's realisations follow
their paths (``carows``).

Ordering keeps Nix safe: a new lower path is made valid in the merged database
(with its GC root reference, in one transaction) before the merged view shows
its files (the index commits after the database); a path that left the lower
leaves the database with everything that refers to it, then the view.
"""

import os
import time
from dataclasses import dataclass, field

import apsw

from . import carows, dbstate, gcroot
from .files import StoreFiles
from .lowerindex import BROKEN, SHOWN, LowerIndex
from .merged import MergedDb, select_rows
from .rows import basename, insert_rows, missing, refs_and_outputs
from .schema import STORE_DIR, SchemaError, Shape, carry_shape, read_shape
from .snapshot import read_consistent
from .upperstore import UpperStore


@dataclass
class LowerChanges:
    """What one consistent read of the lower database found since the last one."""
    max_id: int
    count: int
    rows: list = field(default_factory=list)        # (lower_id, PathRow) ascending
    refs: dict = field(default_factory=dict)        # lower_id -> [reference path]
    outputs: dict = field(default_factory=dict)     # lower_id -> [DerivationOutputs row]
    deleted: dict = field(default_factory=dict)     # lower_id -> name
    shape: Shape | None = None                      # the lower database's tables and columns
    ca: dict = field(default_factory=dict)          # ca table -> carows.CaChanges
    state: dict | None = None                       # the name of the state read (dbstate)

    def __bool__(self):
        return bool(self.rows or self.deleted or any(self.ca.values()))


@dataclass
class SyncResult:
    shown: list = field(default_factory=list)       # names the view now shows
    hidden: list = field(default_factory=list)      # names the view no longer shows
    duplicates: list = field(default_factory=list)  # upper copies identical to a lower path
    index_rows: list = field(default_factory=list)  # (name, lower_id, state) for the index
    lower_broken: list = field(default_factory=list)  # lower paths that lost a reference


class LowerFollower:
    def __init__(self, files: StoreFiles, upper_store: UpperStore, stats: dict):
        self.lower_db = files.lower_db
        self.upper_store = upper_store
        self.stats = stats
        self._lower_sig = None

    def lower_signature(self):
        """Cheap identity of the lower database's current state (fresh opens: NFS
        revalidates what it cached on open)."""
        sig = []
        for suffix in ("", "-wal"):
            try:
                fd = os.open(self.lower_db + suffix, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                sig.append(None)
                continue
            try:
                st = os.fstat(fd)
                sig.append((st.st_ino, st.st_size, st.st_mtime_ns, os.pread(fd, 32, 0)))
            finally:
                os.close(fd)
        return tuple(sig)

    def forget_signature(self) -> None:
        """Make the next ``changed()`` say yes (a change was seen but not followed)."""
        self._lower_sig = None

    def changed(self) -> bool:
        self.stats["lower_polls"] += 1
        sig = self.lower_signature()
        if sig == self._lower_sig:
            return False
        self._lower_sig = sig
        return True

    def read_changes(self, index: LowerIndex) -> LowerChanges:
        last_max = index.get("lower_max_id", 0)
        last_count = index.get("lower_count", 0)
        last_state = index.get("lower_state")

        def read(conn, snap):
            state = dbstate.of(snap)
            max_id = conn.execute("select coalesce(max(id), 0) from ValidPaths").fetchone()[0]
            if max_id == last_max and dbstate.same(last_state, state):
                count = last_count  # the state the index followed: nothing was deleted
            else:
                count = conn.execute("select count(*) from ValidPaths").fetchone()[0]
            try:
                shape = read_shape(conn)
            except SchemaError:
                if not snap.validate():  # a torn read, not the lower's shape: read again
                    raise apsw.CorruptError("the lower database changed while being read")
                raise
            changes = LowerChanges(max_id, count, shape=shape, state=state)
            changes.ca = carows.read(conn, changes.shape, index)
            if max_id > last_max:
                changes.rows = select_rows(conn, "id > ?", (last_max,))
                changes.refs, changes.outputs = refs_and_outputs(conn, [i for i, _ in changes.rows])
            if count != last_count + len(changes.rows):
                changes.deleted = dict(missing(
                    conn.execute("select id from ValidPaths where id <= ? order by id", (last_max,)),
                    index.ids_upto(last_max)))
            return changes

        return read_consistent(self.lower_db, read)

    def apply(self, db: MergedDb, changes: LowerChanges, index: LowerIndex) -> SyncResult:
        """Bring the merged database and the index up to *changes*."""
        result = SyncResult()
        if self.settled(index, changes):
            return result
        with db.begin():
            if changes.shape is not None:
                carry_shape(changes.shape, db.conn)  # before any row: all or nothing
            root_id = db.id_of(gcroot.root_path())
            if changes.deleted:
                self._remove_deleted(db, changes, index, result)
            self._insert_new(db, changes, root_id, result)
            ca_done = carows.apply(db, changes.ca)
        with index.transaction():
            carows.record(index, ca_done)
            if changes.deleted:
                index.remove(changes.deleted.values())
                index.set_state(result.lower_broken, BROKEN)
            index.add(result.index_rows)
            index.put("lower_max_id", changes.max_id)
            index.put("lower_count", changes.count)
            index.put("lower_state", dbstate.encode(changes.state))
            index.put("last_sync_time", time.time())
        self.stats["syncs"] += 1
        self.stats["added"] += len(result.shown)
        self.stats["removed"] += len(changes.deleted)
        self.stats["last_sync"] = time.time()
        return result

    def settled(self, index: LowerIndex, changes: LowerChanges) -> bool:
        """Whether *changes* hold nothing to follow; if so, their state is noted."""
        if changes or changes.max_id != index.get("lower_max_id", 0):
            return False
        self._note_state(index, changes)
        return True

    def _note_state(self, index: LowerIndex, changes: LowerChanges) -> None:
        """*changes* found nothing to do: the index followed the lower up to their state
        too, so keep its name (a checkpoint of the lower renames an unchanged state;
        the next catch-up then skips the count again)."""
        state = dbstate.encode(changes.state)
        if state != index.get("lower_state") and changes.count == index.get("lower_count", 0):
            with index.transaction():
                index.put("lower_state", state)

    def _remove_deleted(self, db: MergedDb, changes: LowerChanges, index: LowerIndex,
                        result: SyncResult) -> None:
        """Paths that left the lower leave the database, with what refers to them."""
        leaving = [f"{STORE_DIR}/{os.fsdecode(n)}" for n in changes.deleted.values()
                   if not self.upper_store.has(n)]
        gone = db.remove(leaving, keep=[gcroot.root_path()])
        result.hidden.extend(changes.deleted.values())
        broken = {basename(p) for p in gone} - set(changes.deleted.values())
        result.lower_broken = [n for n in broken if index.state(n)]
        result.hidden.extend(result.lower_broken)

    def _insert_new(self, db: MergedDb, changes: LowerChanges, root_id,
                    result: SyncResult) -> None:
        """New lower paths become valid (those a whiteout hides only enter the index)."""
        rows = []
        for lower_id, row in changes.rows:
            name = basename(row.path)
            if self.upper_store.hidden(name):
                result.index_rows.append((name, lower_id, BROKEN))
                continue
            rows.append((lower_id, row))
        added, dups = insert_rows(db, rows, changes.refs, changes.outputs, root_id,
                                  self.upper_store)
        for lower_id, row in rows:
            name = basename(row.path)
            state = SHOWN if lower_id in added or name in dups else BROKEN
            result.index_rows.append((name, lower_id, state))
            if state == SHOWN:
                result.shown.append(name)
        result.duplicates.extend(dups)
