"""Keeping the merged store database in step with the lower store's.

First mount: the lower database is cloned (a reflink where the file system
offers one, else an in-kernel copy) with its committed WAL frames folded in, so
every lower path is valid at once with its own rows; nixfs then adds its GC root
and adopts rows of paths the upper already holds.  The private index of lower
paths is written last: it is the commit point of the first build.

Afterwards the lower database is followed by its ids (``ValidPaths.id`` only
grows): rows above the last seen id are new, and a count that does not add up
means deletions, found by comparing ids.  Nothing ever rescans the whole lower.
Rows travel with every column the lower has; before each change the merged
database is given the lower's shape (``schema.carry_shape``), and the lower's
realisations follow their paths (``carows``).

Ordering keeps Nix safe: a new lower path is made valid in the merged database
(with its GC root reference, in one transaction) before the merged view shows
its files; a path that left the lower leaves the database with everything that
refers to it, then the view.
"""

import logging
import os
import time

import apsw
from dataclasses import dataclass, field

from ..overlay import upperformat as fmt
from . import carows, gcroot
from .lowerindex import BROKEN, SHOWN, LowerIndex
from .merged import MergedDb, open_db, select_outputs, select_rows
from .schema import STORE_DIR, SchemaError, Shape, carry_shape, read_schema_version, read_shape
from .snapshot import Snapshot, SnapshotError, read_consistent

log = logging.getLogger(__name__)



def basename(path: str) -> bytes:
    return path.rsplit("/", 1)[1].encode()


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

    def __bool__(self):
        return bool(self.rows or self.deleted or any(self.ca.values()))


@dataclass
class SyncResult:
    shown: list = field(default_factory=list)       # names the view now shows
    hidden: list = field(default_factory=list)      # names the view no longer shows
    duplicates: list = field(default_factory=list)  # upper copies identical to a lower path


def _rows_from(conn, where: str, args) -> list:
    return select_rows(conn, where, args)


def _refs_and_outputs(conn, ids) -> tuple[dict, dict]:
    refs: dict = {}
    outputs: dict = {}
    for i in ids:
        refs[i] = [p for (p,) in conn.execute(
            "select v.path from Refs r join ValidPaths v on v.id = r.reference "
            "where r.referrer = ?", (i,))]
        out = select_outputs(conn, i)
        if out:
            outputs[i] = out
    return refs, outputs


def _missing(present, known):
    """(id, name) of *known* (ascending ids) whose id is not in *present* (ascending):
    a merge walk in constant memory."""
    present = iter(present)
    current = next(present, None)
    for i, name in known:
        while current is not None and current[0] < i:
            current = next(present, None)
        if current is None or current[0] != i:
            yield i, name


class UpperStore:
    """Direct, read-only looks at the upper's ``store/`` (whiteouts, upper copies)."""

    def __init__(self, upper: str):
        self.path = os.path.join(upper, "store")

    def hidden(self, name: bytes) -> bool:
        try:
            os.lstat(os.path.join(self.path, os.fsdecode(fmt.whiteout_name(name))))
            return True
        except (FileNotFoundError, OSError):
            pass
        try:
            st = os.lstat(os.path.join(self.path, os.fsdecode(name)))
        except OSError:
            return False
        return fmt.is_kernel_whiteout(st)

    def has(self, name: bytes) -> bool:
        try:
            st = os.lstat(os.path.join(self.path, os.fsdecode(name)))
        except OSError:
            return False
        return not fmt.is_kernel_whiteout(st)

    def hidden_names(self) -> set[bytes]:
        out = set()
        try:
            entries = os.scandir(self.path)
        except FileNotFoundError:
            return out
        with entries:
            for e in entries:
                name = os.fsencode(e.name)
                if name.startswith(fmt.WHITEOUT_PREFIX):
                    out.add(name[len(fmt.WHITEOUT_PREFIX):])
                elif not e.is_dir(follow_symlinks=False) and self.hidden(name):
                    out.add(name)
        return out


class StoreSync:
    """The merged database of one mount and how it follows the lower."""

    def __init__(self, lower: str, upper: str, state_dir: str):
        self.lower = lower
        self.upper = upper
        self.lower_db_dir = os.path.join(lower, "var/nix/db")
        self.lower_db = os.path.join(self.lower_db_dir, "db.sqlite")
        self.merged_dir = os.path.join(upper, "var/nix/db")
        self.merged_db = os.path.join(self.merged_dir, "db.sqlite")
        self.index_path = os.path.join(state_dir, LowerIndex.FILE)
        self.work = os.path.join(state_dir, "work")
        self.upper_store = UpperStore(upper)
        self.index: LowerIndex | None = None
        self.stats = {"syncs": 0, "added": 0, "removed": 0, "duplicates": 0, "last_sync": 0.0,
                      "lower_polls": 0}
        self._lower_sig = None

    @staticmethod
    def is_nix_store(lower: str) -> bool:
        return os.path.isfile(os.path.join(lower, "var/nix/db/db.sqlite")) and \
            os.path.isdir(os.path.join(lower, "store"))

    # ------------------------------------------------------------------ before mounting

    def prepare(self) -> None:
        """Make the merged database current, working on the upper directly.

        Runs before the mount is live, when nothing else can have the files open.
        """
        version = read_schema_version(self.lower_db_dir)
        if os.path.exists(self.index_path):
            self.index = self._open_index()
        if self.index is not None:
            if self.index.get("durable", 1) == 0 and not self._intact():
                log.error("the merged database of an interrupted first mount is damaged: rebuilding")
                with self.index.transaction():
                    self.index.put("state", "damaged")
            if self.index.get("state") == "complete" and os.path.exists(self.merged_db):
                if self.index.get("schema") != version:
                    raise SchemaError(f"the lower store's database changed from schema "
                                      f"{self.index.get('schema')} to {version}; "
                                      "remove the upper's var/nix/db to rebuild the merged one")
                db = MergedDb(open_db(self.merged_db))
                try:
                    changes = self.read_changes()
                except (SnapshotError, apsw.Error, OSError) as e:
                    # The merged database is whole: serve it as it is; following the
                    # lower keeps failing visibly (log, nixfs status) until it is readable.
                    log.error("cannot read the lower store's database (%s): mounting with the "
                              "merged database as it was", e)
                    changes = None
                try:
                    if changes is not None:
                        self.apply(db, changes)
                    self._hide_pending(db)
                    self._show_pending(db)
                finally:
                    db.close()
                return
            self.index.close()
            self.index = None
        self.build(version)

    def _open_index(self) -> LowerIndex | None:
        """The private index, or None (rebuilt from the lower) if it is damaged: it holds
        nothing that cannot be made again, and a rebuild adopts the upper's own rows."""
        index = None
        try:
            index = LowerIndex(self.index_path)
            index.get("state")
            return index
        except apsw.Error as e:
            if index is not None:
                index.close()
            log.warning("the lower index %s is damaged (%s): rebuilding it", self.index_path, e)
        for suffix in ("", "-wal", "-shm"):
            try:
                os.unlink(self.index_path + suffix)
            except FileNotFoundError:
                pass
        return None

    def build(self, version: int) -> None:
        """First mount: clone the lower database and index it.

        Only what a query needs is done before the mount goes live (about a second
        for a million paths).  The GC root's references, the index's id order and the
        fsyncs follow in ``finish()``, while the worker holds Nix's GC lock.
        """
        t0 = time.monotonic()
        os.makedirs(self.merged_dir, exist_ok=True)
        tmp_db = os.path.join(self.work, "merged.sqlite")
        tmp_index = os.path.join(self.work, "lower-index.sqlite")
        for path in (tmp_db, tmp_index, tmp_index + "-wal", tmp_index + "-shm"):
            if os.path.exists(path):
                os.unlink(path)
        for attempt in range(8):
            with Snapshot(self.lower_db) as snap:
                snap.clone_to(tmp_db, sync=False)
                if snap.validate():
                    break
        else:
            raise SnapshotError(f"{self.lower_db} kept changing while being copied")
        clone = apsw.Connection(tmp_db, flags=apsw.SQLITE_OPEN_READONLY)
        try:
            read_shape(clone)  # a shape nixfs could not follow live is refused now
        finally:
            clone.close()
        t_clone = time.monotonic()
        LowerIndex.create_from(tmp_index, tmp_db)  # every lower path, shown
        t_index = time.monotonic()
        db = MergedDb(open_db(tmp_db, bulk=True))
        try:
            with db.conn:
                max_id, count = db.conn.execute(
                    "select coalesce(max(id), 0), count(*) from ValidPaths").fetchone()
                hidden = self.upper_store.hidden_names()
                gone = db.remove([f"{STORE_DIR}/{os.fsdecode(n)}" for n in hidden]) if hidden else set()
                adopted = self._adopt(db, max_id)
                db.insert(gcroot.root_row(int(time.time())))
            db.conn.execute("pragma journal_mode=wal").fetchall()
        finally:
            db.close()
        index = LowerIndex(tmp_index)
        with index.transaction():
            index.set_state({basename(p) for p in gone}, BROKEN)
            for key, value in (("lower_max_id", max_id), ("lower_count", count),
                               ("schema", version), ("root", gcroot.root_path()),
                               ("root_refs_upto", 0), ("root_refs_target", max_id),
                               ("durable", 0), ("state", "complete")):
                index.put(key, value)
        index.close()
        for suffix in ("-wal", "-shm"):
            try:
                os.unlink(self.merged_db + suffix)
            except FileNotFoundError:
                pass
        os.rename(tmp_db, self.merged_db)
        with open(os.path.join(self.merged_dir, "schema"), "w") as f:
            f.write(str(version))
        gcroot.install_files(self.upper)
        for suffix in ("-wal", "-shm"):
            if os.path.exists(tmp_index + suffix):
                os.rename(tmp_index + suffix, self.index_path + suffix)
        os.rename(tmp_index, self.index_path)  # the commit point
        self.index = LowerIndex(self.index_path)
        log.info("built the merged database: %d lower paths, %d upper paths adopted in %.1f s "
                 "(clone %.1f s, index %.1f s)", count, adopted, time.monotonic() - t0,
                 t_clone - t0, t_index - t_clone)

    def _hide_pending(self, db: MergedDb) -> None:
        """Lower paths removed through the mount whose removal from the database a crash
        cut short: the whiteout is on disk, but the daemon queued the database change in
        memory.  Without this Nix would trust a path whose files are hidden."""
        pending = {n for n in self.upper_store.hidden_names()
                   if self.index.shown(n) and not self.upper_store.has(n)}
        if pending:
            log.warning("%d lower paths removed through the mount before a crash leave the "
                        "database now", len(pending))
            self.hide(db, pending)

    def _show_pending(self, db: MergedDb) -> None:
        """Lower paths an unhide made valid again, whose showing a crash cut short (the
        database commits first, then the index): show them, as the unhide would have."""
        pending = [n for n in self.index.not_shown_names()
                   if db.id_of(f"{STORE_DIR}/{os.fsdecode(n)}") is not None
                   and not self.upper_store.hidden(n) and not self.upper_store.has(n)]
        if pending:
            log.warning("%d lower paths made valid again before a crash are shown now",
                        len(pending))
            with self.index.transaction():
                self.index.set_state(pending, SHOWN)

    def unfinished(self) -> bool:
        return (self.index.get("durable", 1) == 0 or
                self.index.get("root_refs_upto", 0) < self.index.get("root_refs_target", 0))

    def finish(self, db_through_mount, batch: int = 20_000, batches: int | None = None) -> bool:
        """The rest of a first build, after the mount went live (the caller holds Nix's
        GC lock, so no collector runs before every lower path is referenced): the fsyncs
        that make the clone durable, then the GC root's references.

        Does at most *batches* batches of root references; True once all is done."""
        if self.index.get("durable", 1) == 0:
            self._make_durable()
        return self._reference_lower(db_through_mount, batch, batches)

    def _reference_lower(self, db_through_mount, batch: int, batches: int | None) -> bool:
        """Up to *batches* batches of the root's references, through the mount (the
        database is live); True once every lower path is referenced.  Through the mount
        SQLite's page reads and WAL writes are FUSE round trips: several times the cost
        of the same statements on the file (docs/performance.md)."""
        index = self.index
        upto = index.get("root_refs_upto", 0)
        target = index.get("root_refs_target", 0)
        if upto >= target:
            return True
        t0 = time.monotonic()
        db = db_through_mount()
        try:
            root_id = db.id_of(gcroot.root_path())
            while upto < target and batches != 0:
                batches = None if batches is None else batches - 1
                end = min(upto + batch, target)
                with db.begin():  # short transactions: Nix's writers wait briefly at most
                    db.conn.execute("insert or ignore into Refs (referrer, reference) select ?, id "
                                    "from ValidPaths where id > ? and id <= ? and id != ?",
                                    (root_id, upto, end, root_id))
                with index.transaction():
                    index.put("root_refs_upto", end)
                upto = end
        finally:
            db.close()
        self.stats["root_refs_s"] = self.stats.get("root_refs_s", 0.0) + time.monotonic() - t0
        if upto >= target:
            log.info("the GC root references every lower path (%.1f s)", self.stats["root_refs_s"])
        return upto >= target

    def _make_durable(self) -> None:
        t0 = time.monotonic()
        self.index.make_id_index()
        for path in (self.merged_db, self.index_path):
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fsync(fd)  # the file, whoever wrote it: our clone and Nix's writes
            finally:
                os.close(fd)
        with self.index.transaction():
            self.index.put("durable", 1)
        log.info("the first build is on disk (%.1f s)", time.monotonic() - t0)

    def _intact(self) -> bool:
        try:
            conn = open_db(self.merged_db)
            try:
                return conn.execute("pragma quick_check").fetchone()[0] == "ok"
            finally:
                conn.close()
        except (apsw.Error, SchemaError):
            return False

    def _adopt(self, db: MergedDb, lower_max: int) -> int:
        """Carry over rows of paths the upper holds from an earlier database there
        (a merged one whose index was lost, or one written by another overlay)."""
        if not os.path.exists(self.merged_db):
            return 0
        try:
            old = open_db(self.merged_db)
            try:
                old_shape = read_shape(old, where="the upper's earlier database", unknown_ok=True)
                rows = [(i, r) for i, r in _rows_from(old, "1", ())
                        if self.upper_store.has(basename(r.path)) and r.path != gcroot.root_path()
                        and db.id_of(r.path) is None]
                refs, outputs = _refs_and_outputs(old, [i for i, _ in rows])
            finally:
                old.close()
        except (apsw.Error, SchemaError) as e:
            log.error("the upper's earlier database is unreadable (%s): its paths stay "
                      "unregistered; Nix rebuilds or substitutes them when needed", e)
            return 0
        if rows:
            carry_shape(old_shape, db.conn)  # columns a Nix on the mount added come along
        self._insert_rows(db, rows, refs, outputs, root_id=None)
        return len(rows)

    # ------------------------------------------------------------------ following the lower

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

    def read_changes(self, index: LowerIndex | None = None) -> LowerChanges:
        index = index or self.index
        last_max = index.get("lower_max_id", 0)
        last_count = index.get("lower_count", 0)

        def read(conn, snap):
            max_id, count = conn.execute(
                "select coalesce(max(id), 0), count(*) from ValidPaths").fetchone()
            try:
                shape = read_shape(conn)
            except SchemaError:
                if not snap.validate():  # a torn read, not the lower's shape: read again
                    raise apsw.CorruptError("the lower database changed while being read")
                raise
            changes = LowerChanges(max_id, count, shape=shape)
            changes.ca = carows.read(conn, changes.shape, index)
            if max_id > last_max:
                changes.rows = _rows_from(conn, "id > ?", (last_max,))
                changes.refs, changes.outputs = _refs_and_outputs(conn, [i for i, _ in changes.rows])
            if count != last_count + len(changes.rows):
                changes.deleted = dict(_missing(
                    conn.execute("select id from ValidPaths where id <= ? order by id", (last_max,)),
                    index.ids_upto(last_max)))
            return changes

        return read_consistent(self.lower_db, read)

    def apply(self, db: MergedDb, changes: LowerChanges, index: LowerIndex | None = None) -> SyncResult:
        """Bring the merged database and the index up to *changes*."""
        index = index or self.index
        result = SyncResult()
        if not changes and changes.max_id == index.get("lower_max_id", 0):
            return result
        new_index_rows = []
        lower_broken: list[bytes] = []
        with db.begin():
            if changes.shape is not None:
                carry_shape(changes.shape, db.conn)  # before any row: all or nothing
            root_id = db.id_of(gcroot.root_path())
            if changes.deleted:
                leaving = [f"{STORE_DIR}/{os.fsdecode(n)}" for n in changes.deleted.values()
                           if not self.upper_store.has(n)]
                gone = db.remove(leaving, keep=[gcroot.root_path()])
                result.hidden.extend(changes.deleted.values())
                broken = {basename(p) for p in gone} - set(changes.deleted.values())
                lower_broken = [n for n in broken if index.state(n)]
                result.hidden.extend(lower_broken)
            rows = []
            for lower_id, row in changes.rows:
                name = basename(row.path)
                if self.upper_store.hidden(name):
                    new_index_rows.append((name, lower_id, BROKEN))
                    continue
                rows.append((lower_id, row))
            added, dups = self._insert_rows(db, rows, changes.refs, changes.outputs, root_id)
            for lower_id, row in rows:
                name = basename(row.path)
                state = SHOWN if lower_id in added or name in dups else BROKEN
                new_index_rows.append((name, lower_id, state))
                if state == SHOWN:
                    result.shown.append(name)
            result.duplicates.extend(dups)
            ca_done = carows.apply(db, changes.ca)
        with index.transaction():
            carows.record(index, ca_done)
            if changes.deleted:
                index.remove(changes.deleted.values())
                index.set_state(lower_broken, BROKEN)
            index.add(new_index_rows)
            index.put("lower_max_id", changes.max_id)
            index.put("lower_count", changes.count)
            index.put("last_sync_time", time.time())
        self.stats["syncs"] += 1
        self.stats["added"] += len(result.shown)
        self.stats["removed"] += len(changes.deleted)
        self.stats["last_sync"] = time.time()
        return result

    def _insert_rows(self, db: MergedDb, rows, refs, outputs, root_id) -> tuple[set, set]:
        """Insert rows (ascending lower id) whose closure is complete in the merged db.

        Returns (lower ids now valid, names already valid there with the same hash
        in an upper copy: duplicates the caller may drop).
        """
        added: set = set()
        dups: set = set()
        for lower_id, row in rows:
            existing = db.id_of(row.path)
            name = basename(row.path)
            if existing is not None:
                if self.upper_store.has(name):
                    # Built in the upper too: the lower copy wins (the view would show the
                    # upper one, and a GC of it would otherwise hide the lower path).
                    if db.hash_of(row.path) != row.hash:
                        log.warning("%s differs between the layers; the lower copy wins", row.path)
                        db.replace(existing, row)
                    dups.add(name)
                else:
                    added.add(lower_id)  # already there (an interrupted sync)
                if root_id is not None:
                    db.add_refs(root_id, [existing])
                continue
            ref_ids = []
            for ref in refs.get(lower_id, ()):
                if ref == row.path:
                    continue
                rid = db.id_of(ref)
                if rid is None:
                    break  # its closure is not complete here: leave it out
                ref_ids.append(rid)
            else:
                new_id = db.insert(row)
                if row.path in refs.get(lower_id, ()):
                    ref_ids.append(new_id)
                db.add_refs(new_id, ref_ids)
                db.add_outputs(new_id, outputs.get(lower_id, ()))
                if root_id is not None:
                    db.add_refs(root_id, [new_id])
                added.add(lower_id)
        return added, dups

    # ------------------------------------------------------------------ changes made through the mount

    def hide(self, db: MergedDb, names: set[bytes]) -> list[bytes]:
        """Lower paths removed through the mount leave the database, with everything that
        refers to them; returns the lower paths that went along (no longer shown either).

        The database commits first, then the index.  A crash in between (or a worker
        whose commit reached the disk while its daemon died) leaves the rows gone and
        the index still showing them: the merged database then no longer knows which
        lower paths referred to a name, so for a name without a row the lower database
        says (every lower path referring to it, transitively)."""
        missing = {n for n in names if db.id_of(f"{STORE_DIR}/{os.fsdecode(n)}") is None}
        along: set[bytes] = set()
        if missing:
            try:
                along = self._lower_referrers(missing) - set(names)
            except (SnapshotError, apsw.Error, OSError) as e:
                log.error("cannot read the lower store's database (%s): lower paths that "
                          "refer to %s may still show", e, b", ".join(sorted(missing)).decode())
        with db.begin():
            gone = db.remove([f"{STORE_DIR}/{os.fsdecode(n)}" for n in set(names) | along],
                             keep=[gcroot.root_path()])
        lower = sorted({n for n in (basename(p) for p in gone) if self.index.state(n)} | along)
        with self.index.transaction():
            self.index.set_state(set(lower) | set(names), BROKEN)
        log.info("%d lower paths hidden through the mount left the database (%d in all)",
                 len(names), len(gone))
        return [n for n in lower if n not in names]

    def _lower_referrers(self, names) -> set[bytes]:
        """Lower paths (in the index) that refer to one of *names* in the lower database,
        transitively."""
        index = self.index

        def read(conn, snap):
            ids = {st[0] for st in map(index.state, names) if st}
            todo, out = list(ids), set()
            while todo:
                i = todo.pop()
                for (r, path) in conn.execute(
                        "select r.referrer, v.path from Refs r join ValidPaths v "
                        "on v.id = r.referrer where r.reference = ?", (i,)):
                    name = basename(path)
                    if r not in ids and index.state(name):
                        ids.add(r)
                        out.add(name)
                        todo.append(r)
            return out

        return read_consistent(self.lower_db, read)

    def restore(self, db: MergedDb, names: list[bytes]) -> list[bytes]:
        """Make lower paths valid again (``nixfs unhide``), with the lower paths that
        were hidden because they referred to them; returns the names shown again."""
        index = self.index

        def read(conn, snap):
            ids = [st[0] for st in map(index.state, names) if st]
            todo, seen = list(ids), set(ids)
            while todo:
                i = todo.pop()
                for (r, path) in conn.execute(
                        "select r.referrer, v.path from Refs r join ValidPaths v "
                        "on v.id = r.referrer where r.reference = ?", (i,)):
                    st = index.state(basename(path))
                    if r not in seen and st and st[1] == BROKEN:
                        seen.add(r)
                        todo.append(r)
            rows = [x for i in sorted(seen) for x in _rows_from(conn, "id = ?", (i,))]
            refs, outputs = _refs_and_outputs(conn, [i for i, _ in rows])
            return rows, refs, outputs, read_shape(conn)

        rows, refs, outputs, shape = read_consistent(self.lower_db, read)
        rows = [(i, r) for i, r in rows if not self.upper_store.hidden(basename(r.path))]
        with db.begin():
            carry_shape(shape, db.conn)
            added, _ = self._insert_rows(db, rows, refs, outputs, db.id_of(gcroot.root_path()))
        shown = [basename(r.path) for i, r in rows if i in added]
        with index.transaction():
            index.set_state(shown, SHOWN)
        return shown

