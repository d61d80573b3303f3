"""Carrying ValidPaths rows from one store database into the merged one.

The first build's adoption of upper rows, following the lower and ``nixfs
unhide`` all do the same: read rows with their references and derivation
outputs, then insert those whose closure is complete in the merged database,
with the merged database's own ids (references mapped by path).
"""

import logging

from .merged import MergedDb, select_outputs

log = logging.getLogger(__name__)


def basename(path: str) -> bytes:
    """The name in ``store/`` of the store path *path*."""
    return path.rsplit("/", 1)[1].encode()


def refs_and_outputs(conn, ids) -> tuple[dict, dict]:
    """The references (by path) and DerivationOutputs rows of the rows *ids* of *conn*."""
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


def missing(present, known):
    """The rows of *known* (ascending id first) whose id is not among the ids of
    *present* (rows, ascending id first): a merge walk in constant memory."""
    present = iter(present)
    current = next(present, None)
    for row in known:
        while current is not None and current[0] < row[0]:
            current = next(present, None)
        if current is None or current[0] != row[0]:
            yield row


def insert_rows(db: MergedDb, rows, refs, outputs, root_id, upper_store) -> tuple[set, set]:
    """Insert rows (ascending lower id) whose closure is complete in the merged db,
    each referenced by the GC root *root_id* (if not None).

    Returns (lower ids now valid, names already valid there with the same hash
    in an upper copy: duplicates the caller may drop).
    """
    added: set = set()
    dups: set = set()
    for lower_id, row in rows:
        existing = db.id_of(row.path)
        if existing is not None:
            if upper_store.has(basename(row.path)):
                # Built in the upper too: the lower copy wins (the view would show the
                # upper one, and a GC of it would otherwise hide the lower path).
                if db.hash_of(row.path) != row.hash:
                    log.warning("%s differs between the layers; the lower copy wins", row.path)
                    db.replace(existing, row)
                dups.add(basename(row.path))
            else:
                added.add(lower_id)  # already there (an interrupted sync)
            if root_id is not None:
                db.add_refs(root_id, [existing])
            continue
        ref_ids = _reference_ids(db, row.path, refs.get(lower_id, ()))
        if ref_ids is None:
            continue  # its closure is not complete here: leave it out
        new_id = db.insert(row)
        if row.path in refs.get(lower_id, ()):
            ref_ids.append(new_id)
        db.add_refs(new_id, ref_ids)
        db.add_outputs(new_id, outputs.get(lower_id, ()))
        if root_id is not None:
            db.add_refs(root_id, [new_id])
        added.add(lower_id)
    return added, dups


def _reference_ids(db: MergedDb, path: str, references) -> list[int] | None:
    """The merged ids of *references* (but *path* itself), or None if one is not valid."""
    ids = []
    for ref in references:
        if ref == path:
            continue
        rid = db.id_of(ref)
        if rid is None:
            return None
        ids.append(rid)
    return ids
