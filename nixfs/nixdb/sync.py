"""Keeping the merged store database in step with the lower store's: the parts together.

Before the mount goes live ``prepare`` makes the merged database current, on the
upper directly: where there is none, a build over the lower's newest published
generation (``fromgeneration``) or else a first build (``firstbuild``); where one
is built over an older generation than the newest, a rebase onto that; then a
catch-up with the lower (``follow``) and the repair of what a crash cut short.
Once mounted, the worker asks this object to follow the lower (``follow``), to
finish a first build (``rootfill``) and to hide or show lower paths removed or
brought back through the mount (``hiding``).  Which files all of them use:
``files``; the one index of lower paths they share: ``lowerindex``.
"""

import logging
import os

import apsw

from . import cowfiles, firstbuild, fromgeneration, genrecord, ownrows, rootfill
from .files import StoreFiles
from .follow import LowerChanges, LowerFollower, SyncResult
from .hiding import Hiding
from .lowerindex import SHOWN, LowerIndex
from .merged import MergedDb, open_db
from .schema import STORE_DIR, SchemaError, read_schema_version
from .snapshot import SnapshotError
from .upperstore import UpperStore

log = logging.getLogger(__name__)


class StoreSync:
    """The merged database of one mount and how it follows the lower.

    The worker opens the index at its first need (``ensure_index``): it runs once
    ``prepare`` made it.  *generation* is the mount's ``-o generation=`` (auto or off)."""

    def __init__(self, lower: str, upper: str, state_dir: str, *, generation: str = "auto",
                 db_dir: str | None = None):
        self.files = StoreFiles(lower, upper, state_dir, db_dir)
        self.generation_setting = generation
        self.generation = None  # the generation the database is built over (its record)
        self.upper_store = UpperStore(upper)
        self.stats = {"syncs": 0, "added": 0, "removed": 0, "duplicates": 0, "last_sync": 0.0,
                      "lower_polls": 0}
        self.follower = LowerFollower(self.files, self.upper_store, self.stats)
        self.hiding = Hiding(self.files.lower_db, self.upper_store)
        self.index = None

    # ------------------------------------------------------------------ before mounting

    def prepare(self) -> None:
        """Make the merged database current, working on the upper directly.

        Runs before the mount is live, when nothing else can have the files open.
        """
        version = read_schema_version(self.files.lower_db_dir)
        current = genrecord.recorded(self.files)
        if current is not None and not fromgeneration.present(self.files, current):
            # Everything over it is unreadable: built anew, the upper's rows from its copy.
            self._build(version, fromgeneration.replacing(self.files, self.generation_setting,
                                                          current))
            return
        if os.path.exists(self.files.index_path):
            self.index = self._open_index()
        if self.index is not None:
            if self.index.get("durable", 1) == 0 and not self._intact():
                log.error("the merged database of an interrupted first mount is damaged: rebuilding")
                with self.index.transaction():
                    self.index.put("state", "damaged")
            if self.index.get("state") == "complete" and os.path.exists(self.files.merged_db):
                target = fromgeneration.newer(self.files, self.generation_setting, current)
                if target is None:
                    self.generation = current
                    self._catch_up(version)
                    return
                self.index.close()
                self.index = None
                self._build(version, target)
                return
            self.index.close()
            self.index = None
        self._build(version, fromgeneration.newest(self.files, self.generation_setting))

    def _build(self, version: int, generation) -> None:
        """A new merged database: over *generation* (then caught up with the live lower),
        or copied from the lower where there is none to use."""
        if generation is None:
            self.index = firstbuild.build(self.files, self.upper_store, version)
            return
        self.index = fromgeneration.build(self.files, self.upper_store, version, generation)
        self.generation = genrecord.recorded(self.files)
        self._catch_up(version)

    def keep_own_rows(self, through_mount: str | None = None) -> None:
        """At the end of a mount of an upper over a generation: copy the upper's own rows
        aside (``ownrows``), for a next mount that finds that generation pruned.  The
        worker reads them *through_mount* before the mount ends (its bases are open there,
        pruned or not); the daemon, once it ended, from the upper (if the base is there)."""
        current = genrecord.recorded(self.files)
        if current is None or (through_mount is None and
                               not fromgeneration.present(self.files, current)):
            return
        try:
            count = ownrows.write(self.files, self.upper_store, through_mount)
        except ownrows.READ_ERRORS as e:
            log.warning("cannot copy the upper's own database rows aside (%s): should its "
                        "generation be pruned, they come from the database as long as it "
                        "can be read", e)
            return
        log.info("copied the rows of %d upper paths aside (%s)", count,
                 ownrows.own_rows_path(self.files))

    def _catch_up(self, version: int) -> None:
        """A remount: follow what the lower did meanwhile, and finish what a crash cut short."""
        if self.index.get("schema") != version:
            raise SchemaError(f"the lower store's database changed from schema "
                              f"{self.index.get('schema')} to {version}; "
                              "remove the upper's var/nix/db to rebuild the merged one")
        db = MergedDb(open_db(self.files.merged_db, cow_root=self.files.lower))
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

    def ensure_index(self) -> LowerIndex:
        """The index, opened if it is not (the worker opens it at its first need)."""
        if self.index is None:
            self.index = self._index()
        return self.index

    def _index(self) -> LowerIndex:
        return LowerIndex(self.files.index_path, cow_root=self.files.lower)

    def _open_index(self) -> LowerIndex | None:
        """The private index, or None (rebuilt from the lower) if it is damaged: it holds
        nothing that cannot be made again, and a rebuild adopts the upper's own rows."""
        index = None
        path = self.files.index_path
        try:
            index = self._index()
            index.get("state")
            return index
        except (apsw.Error, OSError) as e:  # OSError: a copy-on-write index's map or base
            if index is not None:
                index.close()
            log.warning("the lower index %s is damaged (%s): rebuilding it", path, e)
        cowfiles.remove(path)
        return None

    def _intact(self) -> bool:
        try:
            conn = open_db(self.files.merged_db, cow_root=self.files.lower)
            try:
                return conn.execute("pragma quick_check").fetchone()[0] == "ok"
            finally:
                conn.close()
        except (apsw.Error, SchemaError):
            return False

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

    # ------------------------------------------------------------------ the first build's rest

    def unfinished(self) -> bool:
        return rootfill.unfinished(self.index)

    def finish(self, db_through_mount, batch: int = 20_000, batches: int | None = None) -> bool:
        """The rest of a first build, after the mount went live (``rootfill``)."""
        return rootfill.finish(self.files, self.index, db_through_mount, self.stats,
                               batch, batches)

    # ------------------------------------------------------------------ following the lower

    def changed(self) -> bool:
        return self.follower.changed()

    def forget_signature(self) -> None:
        self.follower.forget_signature()

    def read_changes(self) -> LowerChanges:
        return self.follower.read_changes(self.index)

    def apply(self, db: MergedDb, changes: LowerChanges) -> SyncResult:
        return self.follower.apply(db, changes, self.index)

    def settled(self, changes: LowerChanges) -> bool:
        """Whether *changes* hold nothing to follow (their state noted if so): then the
        merged database need not even be opened."""
        return self.follower.settled(self.index, changes)

    # ------------------------------------------------------------------ changes made through the mount

    def hide(self, db: MergedDb, names: set[bytes]) -> list[bytes]:
        return self.hiding.hide(db, self.index, names)

    def restore(self, db: MergedDb, names: list[bytes]) -> list[bytes]:
        return self.hiding.restore(db, self.index, names)
