"""Lower paths hidden and shown again through the mount (``rm`` of a store path,
``nixfs unhide``), in the merged database and the index.

A hidden lower path leaves the database with everything that refers to it (Nix
must never trust a path whose closure is not all there); an unhide makes it
valid again with the lower paths that went along.  The database commits first,
then the index, so a crash in between is found at the next mount (``sync``).
"""

import logging
import os

import apsw

from . import gcroot
from .lowerindex import BROKEN, SHOWN, LowerIndex
from .merged import MergedDb, select_rows
from .rows import basename, insert_rows, refs_and_outputs
from .schema import STORE_DIR, carry_shape, read_shape
from .snapshot import SnapshotError, read_consistent
from .upperstore import UpperStore

log = logging.getLogger(__name__)

_REFERRERS = ("select r.referrer, v.path from Refs r join ValidPaths v "
              "on v.id = r.referrer where r.reference = ?")


class Hiding:
    def __init__(self, lower_db: str, upper_store: UpperStore):
        self.lower_db = lower_db
        self.upper_store = upper_store

    def hide(self, db: MergedDb, index: LowerIndex, names: set[bytes]) -> list[bytes]:
        """Lower paths removed through the mount leave the database, with everything that
        refers to them; returns the lower paths that went along (no longer shown either).

        A crash between the database's commit and the index's (or a worker whose
        commit reached the disk while its daemon died) leaves the rows gone and
        the index still showing them: the merged database then no longer knows which
        lower paths referred to a name, so for a name without a row the lower database
        says (every lower path referring to it, transitively)."""
        missing = {n for n in names if db.id_of(f"{STORE_DIR}/{os.fsdecode(n)}") is None}
        along: set[bytes] = set()
        if missing:
            try:
                along = self._lower_referrers(index, missing) - set(names)
            except (SnapshotError, apsw.Error, OSError) as e:
                log.error("cannot read the lower store's database (%s): lower paths that "
                          "refer to %s may still show", e, b", ".join(sorted(missing)).decode())
        with db.begin():
            gone = db.remove([f"{STORE_DIR}/{os.fsdecode(n)}" for n in set(names) | along],
                             keep=[gcroot.root_path()])
        lower = sorted({n for n in (basename(p) for p in gone) if index.state(n)} | along)
        with index.transaction():
            index.set_state(set(lower) | set(names), BROKEN)
        log.info("%d lower paths hidden through the mount left the database (%d in all)",
                 len(names), len(gone))
        return [n for n in lower if n not in names]

    def _lower_referrers(self, index: LowerIndex, names) -> set[bytes]:
        """Lower paths (in the index) that refer to one of *names* in the lower database,
        transitively."""
        def read(conn, snap):
            ids = {st[0] for st in map(index.state, names) if st}
            todo, out = list(ids), set()
            while todo:
                i = todo.pop()
                for (r, path) in conn.execute(_REFERRERS, (i,)):
                    name = basename(path)
                    if r not in ids and index.state(name):
                        ids.add(r)
                        out.add(name)
                        todo.append(r)
            return out

        return read_consistent(self.lower_db, read)

    def restore(self, db: MergedDb, index: LowerIndex, names: list[bytes]) -> list[bytes]:
        """Make lower paths valid again (``nixfs unhide``), with the lower paths that
        were hidden because they referred to them; returns the names shown again."""
        def read(conn, snap):
            ids = [st[0] for st in map(index.state, names) if st]
            todo, seen = list(ids), set(ids)
            while todo:
                i = todo.pop()
                for (r, path) in conn.execute(_REFERRERS, (i,)):
                    st = index.state(basename(path))
                    if r not in seen and st and st[1] == BROKEN:
                        seen.add(r)
                        todo.append(r)
            rows = [x for i in sorted(seen) for x in select_rows(conn, "id = ?", (i,))]
            refs, outputs = refs_and_outputs(conn, [i for i, _ in rows])
            return rows, refs, outputs, read_shape(conn)

        rows, refs, outputs, shape = read_consistent(self.lower_db, read)
        rows = [(i, r) for i, r in rows if not self.upper_store.hidden(basename(r.path))]
        with db.begin():
            carry_shape(shape, db.conn)
            added, _ = insert_rows(db, rows, refs, outputs, db.id_of(gcroot.root_path()),
                                   self.upper_store)
        shown = [basename(r.path) for i, r in rows if i in added]
        with index.transaction():
            index.set_state(shown, SHOWN)
        return shown
