"""``nixfs promote``: move valid upper paths into a writable lower store.

The paths (with the part of their closure that is only in the upper) are copied
into the lower's ``store/`` under a temporary name, synced and renamed into
place, then registered in the lower's database in one transaction, references
first.  The lower's own locks are used: its Nix may be running.  Every mount of
that lower then sees them as lower paths; a mount of this upper finds its copies
identical to the lower's and drops them (at its next sync, or next mount).
"""

import logging
import os
import shutil
import stat

import apsw

from .merged import COLUMNS, open_db, select_rows, table_columns
from .schema import STORE_DIR, quote, read_schema_version
from .rows import basename
from .upperstore import UpperStore

log = logging.getLogger(__name__)


class PromoteError(Exception):
    pass


def _upper_rows(merged_db: str, upper_store: UpperStore, lower_nix: str):
    """Valid paths of the merged database whose files are in the upper (a database over
    a published generation has its base in the lower, *lower_nix*)."""
    conn = open_db(merged_db, cow_root=lower_nix)
    try:
        rows = {}
        refs = {}
        outputs = {}
        for row_id, row in select_rows(conn, "1"):
            if upper_store.has(basename(row.path)) and not row.path.endswith("-nixfs-lower-roots"):
                rows[row.path] = row
                refs[row.path] = [p for (p,) in conn.execute(
                    "select v.path from Refs r join ValidPaths v on v.id = r.reference "
                    "where r.referrer = ?", (row_id,))]
                outputs[row.path] = conn.execute(
                    "select id, path from DerivationOutputs where drv = ?", (row_id,)).fetchall()
        return rows, refs, outputs
    finally:
        conn.close()


def plan(upper: str, merged_db: str, wanted: list[str] | None, lower_nix: str):
    """The upper paths to move (references first) with their rows."""
    rows, refs, outputs = _upper_rows(merged_db, UpperStore(upper), lower_nix)
    if wanted is None:
        todo = set(rows)
    else:
        todo = set()
        stack = []
        for p in wanted:
            path = p if p.startswith(STORE_DIR + "/") else f"{STORE_DIR}/{p.rstrip('/').rsplit('/', 1)[-1]}"
            if path not in rows:
                raise PromoteError(f"{path} is not a valid path held by the upper")
            stack.append(path)
        while stack:  # the upper part of the closure comes along
            p = stack.pop()
            if p not in todo:
                todo.add(p)
                stack.extend(r for r in refs.get(p, ()) if r in rows)
    order, done = [], set()

    def visit(p, trail=()):
        if p in done:
            return
        if p in trail:
            raise PromoteError(f"reference cycle through {p}")
        for r in refs.get(p, ()):
            if r in todo and r != p:
                visit(r, trail + (p,))
        done.add(p)
        order.append(p)

    for p in sorted(todo):
        visit(p)
    return [(p, rows[p], refs[p], outputs[p]) for p in order]


def promote(upper: str, lower_nix: str, merged_db: str, wanted: list[str] | None = None) -> list[str]:
    """Move the planned paths into *lower_nix*; returns the paths moved."""
    lower_store = os.path.join(lower_nix, "store")
    lower_db_dir = os.path.join(lower_nix, "var/nix/db")
    read_schema_version(lower_db_dir)
    if not os.access(lower_store, os.W_OK) or not os.access(lower_db_dir, os.W_OK):
        raise PromoteError(f"{lower_nix} is not writable")
    steps = plan(upper, merged_db, wanted, lower_nix)
    db = apsw.Connection(os.path.join(lower_db_dir, "db.sqlite"))
    db.setbusytimeout(600_000)
    db.execute("pragma foreign_keys=1").fetchall()
    lower_columns = set(table_columns(db, "ValidPaths"))
    try:
        have = {p for p, *_ in steps if db.execute("select 1 from ValidPaths where path = ?",
                                                    (p,)).fetchone()}
        for path, row, refs, _ in steps:
            missing = [r for r in refs if r != path and r not in {p for p, *_ in steps}
                       and not db.execute("select 1 from ValidPaths where path = ?", (r,)).fetchone()]
            if missing:
                raise PromoteError(f"{path} refers to {missing[0]}, which the lower lacks")
        for path, *_ in steps:
            if path not in have:
                _copy_in(os.path.join(upper, "store", os.path.basename(path)),
                         os.path.join(lower_store, os.path.basename(path)))
        db.execute("begin immediate")
        try:
            for path, row, refs, outputs in steps:
                if path in have:
                    continue
                # Columns a Nix on the mount added travel where the lower has them too.
                extra = [(c, v) for c, v in row.extra if c in lower_columns]
                cols = COLUMNS + tuple(c for c, _ in extra)
                db.execute(f"insert into ValidPaths ({', '.join(map(quote, cols))}) values "
                           f"({', '.join('?' * len(cols))})", row.values() + tuple(v for _, v in extra))
                new_id = db.last_insert_rowid()
                for r in refs:
                    rid = db.execute("select id from ValidPaths where path = ?", (r,)).fetchone()[0]
                    db.execute("insert or ignore into Refs values (?, ?)", (new_id, rid))
                for name, out in outputs:
                    db.execute("insert or replace into DerivationOutputs values (?, ?, ?)",
                               (new_id, name, out))
            db.execute("commit")
        except BaseException:
            db.execute("rollback")
            raise
    finally:
        db.close()
    moved = [p for p, *_ in steps if p not in have]
    log.info("promoted %d paths into %s", len(moved), lower_nix)
    return moved


def _copy_in(src: str, dest: str) -> None:
    """Copy a store path tree under a temporary name, sync it, rename it into place."""
    if os.path.lexists(dest):
        raise PromoteError(f"{dest} exists in the lower but is not valid there; remove it first")
    tmp = os.path.join(os.path.dirname(dest), f".nixfs-promote-{os.path.basename(dest)}")
    if os.path.lexists(tmp):
        shutil.rmtree(tmp) if os.path.isdir(tmp) and not os.path.islink(tmp) else os.unlink(tmp)
    if os.path.isdir(src) and not os.path.islink(src):
        shutil.copytree(src, tmp, symlinks=True, copy_function=shutil.copy2)
    else:
        shutil.copy2(src, tmp, follow_symlinks=False)
    _sync_tree(tmp)
    os.rename(tmp, dest)
    fd = os.open(os.path.dirname(dest), os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_tree(top: str) -> None:
    for dirpath, dirnames, filenames in os.walk(top):
        for name in filenames:
            path = os.path.join(dirpath, name)
            if stat.S_ISREG(os.lstat(path).st_mode):
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        # Directories keep the store's read-only modes; copytree preserved them.
