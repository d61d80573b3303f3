"""The check of an unmounted upper's merged Nix database against its files, for ``nixfs fsck``.

What the merged database says must match what the merged view shows, or Nix
trusts paths that are not there (or misses ones that are):

- the database passes ``PRAGMA integrity_check`` and its foreign keys hold;
- every valid path has files: an upper entry, or a lower path the index shows
  and no whiteout hides.  A crash between a whiteout (``rm`` of a lower path)
  and its removal from the database leaves such rows; the repair does what the
  daemon would have: the path leaves with everything that refers to it;
- every lower path the index shows has a row (else the index stops showing it),
  and a lower path with a row is shown (an unhide cut short: it is shown);
- nixfs' GC root file and its ``gcroots`` link are there (reinstalled if not);
- an upper copy of a path the lower shows is redundant: the lower's wins (as a
  sync does), so the repair drops the upper copy;
- upper store entries with no row are only noted: they are what an interrupted
  build or ``nix-store --add`` leaves, and Nix's own GC deletes invalid entries
  of the store directory, as it does without nixfs.

The lower is only ever read (its database lock-free, as the daemon does).
"""

import os
import stat

import apsw

from ..cow.vfs import connect
from ..nixdb import gcroot, upperstore
from ..nixdb.files import StoreFiles
from ..nixdb.lowerindex import BROKEN, SHOWN, LowerIndex
from ..nixdb.merged import MergedDb, select_rows
from ..nixdb.rows import basename
from ..nixdb.schema import STORE_DIR, SchemaError, carry_shape, check_tables, read_shape
from ..nixdb.snapshot import read_consistent
from ..overlay import upperformat as fmt
from ..overlay.layers import O_DIR
from ..overlay.state import remove_tree
from .report import DAMAGE, HARMLESS, NOTE, Report
from .statedir import check_sqlite
from .upper import changing

LIST_MAX = 50  # findings of one kind listed one by one; the rest are counted


class DbCheck:
    def __init__(self, lower: str, upper: str, upper_fd: int, state_fd: int | None,
                 report: Report):
        self.lower, self.upper, self.report = lower, upper, report
        self.upper_fd, self.state_fd = upper_fd, state_fd
        self.files = StoreFiles(lower, upper, fmt.state_dir(upper))
        self.index: LowerIndex | None = None
        self.conn: apsw.Connection | None = None
        self.upper_names: set[bytes] = set()   # store entries, markers left out
        self.hidden: set[bytes] = set()        # names a whiteout hides

    def run(self) -> None:
        if self.state_fd is not None and check_sqlite(
                self.state_fd, LowerIndex.FILE.encode(), self.report, "damaged-index",
                "the next mount rebuilds it from the lower and the merged database", self.lower):
            if os.path.exists(self.files.index_path):
                self.index = LowerIndex(self.files.index_path, cow_root=self.lower)
        try:
            if not os.path.exists(self.files.merged_db):
                if self.index is not None:
                    self.report.add("db-missing", "/var/nix/db/db.sqlite", "the merged database "
                                    "is gone; the next mount rebuilds it (upper paths become "
                                    "unregistered)", severity=NOTE)
                return
            self._scan_store()
            self.conn = connect(self.files.merged_db, base_root=self.lower)
            self.conn.setbusytimeout(10_000)
            if not self._integrity():
                return
            self.conn.execute("pragma foreign_keys=1").fetchall()
            self._foreign_keys()
            self._rows()
            self._gc_root()
            if self.index is not None:
                self._shown_rows()
                self._upper_copies()
            self._unregistered()
        finally:
            if self.conn is not None:
                self.conn.close()
            if self.index is not None:
                self.index.close()

    # ------------------------------------------------------------------ helpers

    def _scan_store(self) -> None:
        try:
            fd = os.open(b"store", O_DIR, dir_fd=self.upper_fd)
        except FileNotFoundError:
            return
        try:
            self.hidden, held = upperstore.scan(fd)
        finally:
            os.close(fd)
        self.upper_names = held - {b".links"}

    def _has_files(self, name: bytes) -> bool:
        if name in self.upper_names:
            return True
        if name in self.hidden:
            return False
        if self.index is not None:
            return self.index.shown(name)
        return os.path.lexists(os.path.join(self.lower, "store", os.fsdecode(name)))

    def _db(self) -> MergedDb:
        return MergedDb(self.conn)

    def _add_many(self, kind: str, items: list, detail: str, fix=None, severity=DAMAGE) -> None:
        """One finding per item (up to LIST_MAX), the repair done once for all of them."""
        done = False

        def fix_all():
            nonlocal done
            if not done:
                fix()
                done = True
        for item in items[:LIST_MAX]:
            self.report.add(kind, item, detail, severity=severity,
                            fix=None if fix is None else fix_all)
        if len(items) > LIST_MAX:
            self.report.add(kind, f"({len(items) - LIST_MAX} more)", detail, severity=severity,
                            fix=None if fix is None else fix_all)

    # ------------------------------------------------------------------ checks

    def _integrity(self) -> bool:
        try:
            rows = self.conn.execute("pragma integrity_check").fetchall()
            if rows == [("ok",)]:
                check_tables(self.conn)
                self.report.count("database checks")
                return True
            problem = "; ".join(str(r[0]) for r in rows[:3])
        except (apsw.Error, SchemaError) as e:
            problem = f"{type(e).__name__}: {e}"
        self.report.add("db-integrity", "/var/nix/db/db.sqlite", f"{problem} (not repairable "
                        "here: move var/nix/db and .nixfs/lower-index.sqlite away; the next mount "
                        "rebuilds the lower part, and upper paths become unregistered)")
        return False

    def _remove_paths(self, paths: list[str]) -> None:
        """Invalidate *paths* and their referrers (the GC root only loses its references),
        and stop showing lower paths that went, as the daemon does after an ``rm``."""
        db = self._db()
        with db.begin():
            gone = db.remove(paths, keep=[gcroot.root_path()])
        if self.index is not None:
            with self.index.transaction():
                self.index.set_state([basename(p) for p in gone], BROKEN)

    def _foreign_keys(self) -> None:
        bad = self.conn.execute("pragma foreign_key_check").fetchall()
        referrers = set()
        for table, rowid, parent, _ in bad:
            if table == "Refs":
                row = self.conn.execute("select referrer from Refs where rowid = ?",
                                        (rowid,)).fetchone()
                if row:
                    referrers.add(row[0])
        paths = sorted(p for (p,) in (self.conn.execute(
            "select path from ValidPaths where id = ?", (i,)).fetchone() or (None,)
            for i in referrers) if p)

        def fix():
            # Dangling references first (they point nowhere), then the referrers: their
            # closure is incomplete.
            with self._db().begin():
                self.conn.execute("delete from Refs where reference not in (select id from "
                                  "ValidPaths) or referrer not in (select id from ValidPaths)")
                self.conn.execute("delete from DerivationOutputs where drv not in "
                                  "(select id from ValidPaths)")
            self._remove_paths([p for p in paths if p != gcroot.root_path()])
        if bad:
            self._add_many("db-foreign-keys", paths or ["/var/nix/db/db.sqlite"],
                           f"{len(bad)} rows refer to paths that are not valid", fix)

    def _rows(self) -> None:
        missing, not_shown = [], []
        for (path,) in self.conn.execute("select path from ValidPaths"):
            self.report.count("database rows")
            if not path.startswith(STORE_DIR + "/") or path == gcroot.root_path():
                continue
            name = basename(path)
            if self._has_files(name):
                continue
            if self.index is not None and name not in self.hidden and self.index.state(name):
                not_shown.append(name)  # the lower has it; only the index does not show it
            else:
                missing.append(path)
        self._add_many("row-without-files", missing, "valid in the database, but neither layer "
                       "shows it (repair: it leaves the database with what refers to it)",
                       lambda: self._remove_paths(missing))

        self._state_finding("row-not-shown", not_shown, SHOWN,
                            "valid in the database and in the lower, but not shown (an unhide "
                            "cut short; repair: show it, as the next mount does)")

    def _state_finding(self, kind: str, names: list[bytes], state: int, text: str) -> None:
        """Lower paths whose index state disagrees with the database; the repair sets it."""
        def fix():
            with self.index.transaction():
                self.index.set_state(names, state)
        self._add_many(kind, [f"{STORE_DIR}/{os.fsdecode(n)}" for n in names], text, fix)

    def _gc_root(self) -> None:
        name = gcroot.root_basename().encode()
        link = os.path.join(self.upper, "var/nix/gcroots", gcroot.GCROOT_LINK)
        registered = self.conn.execute("select 1 from ValidPaths where path = ?",
                                       (gcroot.root_path(),)).fetchone()
        if not registered:
            if self.index is not None:
                self.report.add("gc-root", gcroot.root_path(), "nixfs' GC root is not registered: "
                                "the next mount cannot protect lower paths (move "
                                ".nixfs/lower-index.sqlite away to rebuild)")
            return
        if name not in self.upper_names or not (os.path.islink(link) and
                                               os.readlink(link) == gcroot.root_path()):
            self.report.add("gc-root", gcroot.root_path(), "nixfs' GC root file or its gcroots "
                            "link is missing (a GC could hide lower paths)",
                            fix=lambda: gcroot.install_files(self.upper))

    def _shown_rows(self) -> None:
        stray = []
        for name in self.index.shown_names():
            self.report.count("lower paths")
            if name in self.hidden or name in self.upper_names:
                continue
            path = f"{STORE_DIR}/{os.fsdecode(name)}"
            if not self.conn.execute("select 1 from ValidPaths where path = ?", (path,)).fetchone():
                stray.append(name)
        self._state_finding("shown-without-row", stray, BROKEN,
                            "a lower path the view shows but the database does not hold "
                            "(repair: the view stops showing it; nixfs unhide brings it back)")

    def _upper_copies(self) -> None:
        dups = sorted(n for n in self.upper_names
                      if n not in self.hidden and (self.index.state(n) or (0, BROKEN))[1] == SHOWN)
        for name in dups:
            self.report.add("upper-copy-of-lower", f"/store/{os.fsdecode(name)}",
                            "the lower has this valid path too; the mount shows the upper copy "
                            "(repair: drop it, the lower's wins as a sync would)",
                            severity=HARMLESS, fix=lambda n=name: self._drop_upper_copy(n))

    def _drop_upper_copy(self, name: bytes) -> None:
        path = f"{STORE_DIR}/{os.fsdecode(name)}"
        found = read_consistent(self.files.lower_db, lambda conn, snap: (
            select_rows(conn, "path = ?", (path,)), read_shape(conn)))
        if not found[0]:
            raise RuntimeError("the lower no longer holds it")
        row = found[0][0][1]
        db = self._db()
        with db.begin():
            row_id = db.id_of(path)
            if row_id is not None and db.hash_of(path) != row.hash:
                carry_shape(found[1], self.conn)
                db.replace(row_id, row)
        sfd = os.open(b"store", O_DIR, dir_fd=self.upper_fd)
        try:
            with changing(sfd):
                st = os.stat(name, dir_fd=sfd, follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode):
                    os.chmod(name, stat.S_IMODE(st.st_mode) | 0o700, dir_fd=sfd)
                remove_tree(sfd, name)
        finally:
            os.close(sfd)
        self.upper_names.discard(name)

    def _unregistered(self) -> None:
        names = []
        for name in sorted(self.upper_names):
            path = f"{STORE_DIR}/{os.fsdecode(name)}"
            if name.startswith(fmt.WHITEOUT_PREFIX) or name.endswith(fmt.TMP_SUFFIX):
                continue
            if not self.conn.execute("select 1 from ValidPaths where path = ?", (path,)).fetchone():
                names.append(path)
        self._add_many("unregistered", names, "in the upper's store but not valid (an interrupted "
                       "build or add; Nix's GC deletes it)", severity=NOTE)


def check_db(lower: str, upper: str, upper_fd: int, state_fd: int | None, report: Report) -> None:
    DbCheck(lower, upper, upper_fd, state_fd, report).run()
