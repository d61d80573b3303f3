"""Realisations of lower paths (the ca-derivations tables), followed like ValidPaths.

With the ca-derivations experiment a Nix records which output each derivation
output got: Nix 2.4 to 2.34 in ``Realisations`` (the output by its ValidPaths id,
with ``RealisationsRefs`` between realisations), Nix 2.35 in ``BuildTraceV3`` (the
output by store path).  Both are keyed by (drvPath, outputName) and their ids only
grow, so they are followed as ValidPaths is: rows above the last id seen are new,
and a count that does not add up means deletions, found by a merge walk of the
ids nixfs recorded (the lower index's ``ca_rows``).

In the merged database a realisation gets the merged database's ids; where a Nix
on the mount registered the same key itself, the lower's row wins (as a lower
path wins over an upper copy).  A realisation whose output is not valid in the
merged database (its closure broken, hidden through the mount) is left out.
"""

from dataclasses import dataclass, field

from .lowerindex import CA_FOLLOWED as FOLLOWED
from .merged import MergedDb, table_columns
from .rows import missing
from .schema import quote


@dataclass
class CaChanges:
    """What one read of a lower ca table found since the last one."""
    table: str
    max_id: int
    count: int
    rows: list = field(default_factory=list)     # (lower id, {column: value}, [ref keys])
    deleted: list = field(default_factory=list)  # (lower id, drvPath, outputName)

    def __bool__(self):
        return bool(self.rows or self.deleted)


def read(conn, shape, index) -> dict:
    """The changes of every followed ca table the lower has (*conn*: a snapshot)."""
    out = {}
    for table in FOLLOWED:
        if not shape.has(table):
            continue
        last_max = index.get(f"ca_max:{table}", 0)
        last_count = index.get(f"ca_count:{table}", 0)
        max_id, count = conn.execute(
            f"select coalesce(max(id), 0), count(*) from {table}").fetchone()
        ch = CaChanges(table, max_id, count)
        if max_id > last_max:
            cols = [c for c in shape.columns[table] if c != "id"]
            select = ", ".join("t." + quote(c) for c in cols)
            if table == "Realisations":
                # The output by store path: ids differ between the databases.
                query = (f"select t.id, v.path, {select} from Realisations t "
                         "left join ValidPaths v on v.id = t.outputPath "
                         "where t.id > ? order by t.id")
            else:
                query = f"select t.id, null, {select} from {table} t where t.id > ? order by t.id"
            refs = shape.has("RealisationsRefs") and table == "Realisations"
            for r in conn.execute(query, (last_max,)).fetchall():
                row = dict(zip(cols, r[2:]))
                if table == "Realisations":
                    row["outputPath"] = r[1]
                keys = conn.execute(
                    "select t.drvPath, t.outputName from RealisationsRefs x join Realisations t "
                    "on t.id = x.realisationReference where x.referrer = ?",
                    (r[0],)).fetchall() if refs else []
                ch.rows.append((r[0], row, keys))
        if count != last_count + len(ch.rows):
            ch.deleted = list(missing(
                conn.execute(f"select id from {table} where id <= ? order by id", (last_max,)),
                index.ca_rows_upto(table, last_max)))
        out[table] = ch
    return out


def _key_id(db: MergedDb, table: str, drv: str, output: str):
    row = db.conn.execute(f"select id from {table} where drvPath = ? and outputName = ?",
                          (drv, output)).fetchone()
    return row[0] if row else None


def _delete(db: MergedDb, table: str, row_id: int) -> None:
    if table == "Realisations" and db.has_table("RealisationsRefs"):
        db.conn.execute("delete from RealisationsRefs where realisationReference = ? "
                        "or referrer = ?", (row_id, row_id))
    db.conn.execute(f"delete from {table} where id = ?", (row_id,))


def apply(db: MergedDb, changes: dict) -> list:
    """Bring the merged database's ca tables up to *changes* (inside the caller's
    transaction); returns what the index must record afterwards (``record``)."""
    done = []
    for table, ch in changes.items():
        for lower_id, drv, output in ch.deleted:
            row_id = _key_id(db, table, drv, output)
            if row_id is not None:
                _delete(db, table, row_id)
        added = []
        refs = []
        merged_cols = set(table_columns(db.conn, table))
        for lower_id, row, keys in ch.rows:
            values = {c: v for c, v in row.items() if c in merged_cols}
            if table == "Realisations":
                values["outputPath"] = db.id_of(row["outputPath"]) if row["outputPath"] else None
                if values["outputPath"] is None:
                    continue  # its output is not valid here
            row_id = _key_id(db, table, row["drvPath"], row["outputName"])
            if row_id is None:
                cols = list(values)
                db.conn.execute(f"insert into {table} ({', '.join(map(quote, cols))}) values "
                                f"({', '.join('?' * len(cols))})", list(values.values()))
                row_id = db.conn.last_insert_rowid()
            else:
                db.conn.execute(f"update {table} set {', '.join(quote(c) + ' = ?' for c in values)}"
                                " where id = ?", (*values.values(), row_id))
            added.append((table, lower_id, row["drvPath"], row["outputName"]))
            refs.extend((row_id, key) for key in keys)
        for row_id, key in refs:
            ref_id = _key_id(db, "Realisations", *key)
            if ref_id is not None and not db.conn.execute(
                    "select 1 from RealisationsRefs where referrer = ? and realisationReference = ?",
                    (row_id, ref_id)).fetchone():
                db.conn.execute("insert into RealisationsRefs (referrer, realisationReference) "
                                "values (?, ?)", (row_id, ref_id))
        done.append((ch, added))
    return done


def record(index, done) -> None:
    """Note in the lower index (inside its transaction) what ``apply`` carried."""
    for ch, added in done:
        index.record_ca(ch.table, (i for i, _, _ in ch.deleted), added)
        index.put(f"ca_max:{ch.table}", ch.max_id)
        index.put(f"ca_count:{ch.table}", ch.count)
