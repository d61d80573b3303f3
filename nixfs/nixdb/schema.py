"""What nixfs knows of Nix's store database (``var/nix/db``), and of its shapes.

nixfs reads the lower's ``schema`` file and refuses versions it does not know,
because it copies rows between databases table by table: a table it does not
know would be silently left behind.

Within schema 10 the tables drift from one Nix to the next (a ``SchemaMigrations``
table from Nix 2.25, ``IndexReferrer`` dropped by 2.35, the ca-derivations tables
renamed, Determinate Nix's ``ValidPaths.provenance``).  ``Shape`` is what one
database has; ``carry_shape`` makes the merged database able to hold every row of
the lower's, or says in one line which table or column cannot be carried.
"""

import errno
import os
import re
from dataclasses import dataclass, field

# Schema 10 (Nix 2.4 and later): the tables and columns whose rows nixfs carries over.
SUPPORTED_SCHEMAS = {10}
STORE_DIR = "/nix/store"
TABLES = {
    "ValidPaths": ("id", "path", "hash", "registrationTime", "deriver", "narSize", "ultimate",
                   "sigs", "ca"),
    "Refs": ("referrer", "reference"),
    "DerivationOutputs": ("drv", "id", "path"),
}

# Tables whose rows nixfs follows besides those (the ca-derivations experiment's):
# Nix 2.4 to 2.34 keep realisations in Realisations (their output by ValidPaths id) and
# RealisationsRefs; Nix 2.35 in BuildTraceV3 (their output by store path).
CA_TABLES = {
    "Realisations": ("id", "drvPath", "outputName", "outputPath", "signatures"),
    "RealisationsRefs": ("referrer", "realisationReference"),
    "BuildTraceV3": ("id", "drvPath", "outputName", "outputPath", "signatures"),
}
# Tables nixfs knows to hold nothing it must follow: SQLite's own, and the record of
# the migrations a database had (nixfs copies the lower's entries along with the
# shape changes they stand for).
OTHER_TABLES = {"sqlite_sequence", "sqlite_stat1", "sqlite_stat4", "SchemaMigrations"}

# Nix 2.8's own DDL for schema 10, used to make a database where there is none.
DDL = """
create table if not exists ValidPaths (
    id               integer primary key autoincrement not null,
    path             text unique not null,
    hash             text not null,
    registrationTime integer not null,
    deriver          text,
    narSize          integer,
    ultimate         integer,
    sigs             text,
    ca               text
);
create table if not exists Refs (
    referrer  integer not null,
    reference integer not null,
    primary key (referrer, reference),
    foreign key (referrer) references ValidPaths(id) on delete cascade,
    foreign key (reference) references ValidPaths(id) on delete restrict
);
create index if not exists IndexReferrer on Refs(referrer);
create index if not exists IndexReference on Refs(reference);
create trigger if not exists DeleteSelfRefs before delete on ValidPaths
  begin
    delete from Refs where referrer = old.id and reference = old.id;
  end;
create table if not exists DerivationOutputs (
    drv  integer not null,
    id   text not null,
    path text not null,
    primary key (drv, id),
    foreign key (drv) references ValidPaths(id) on delete cascade
);
create index if not exists IndexDerivationOutputs on DerivationOutputs(path);
"""

# The ca-derivations tables in the shape nixfs makes them in a merged database that
# lacks them while the lower has them (the shapes of Nix 2.18 to 2.34 and of 2.35).
CA_DDL = {
    "Realisations": """
create table if not exists Realisations (
    id          integer primary key autoincrement not null,
    drvPath     text not null,
    outputName  text not null,
    outputPath  integer not null,
    signatures  text,
    foreign key (outputPath) references ValidPaths(id) on delete cascade
);
create index if not exists IndexRealisations on Realisations(drvPath, outputName);
create index if not exists IndexRealisationsRefsOnOutputPath on Realisations(outputPath);
""",
    "RealisationsRefs": """
create table if not exists RealisationsRefs (
    referrer             integer not null,
    realisationReference integer,
    foreign key (referrer) references Realisations(id) on delete cascade,
    foreign key (realisationReference) references Realisations(id) on delete restrict
);
create index if not exists IndexRealisationsRefsRealisationReference
    on RealisationsRefs(realisationReference);
create index if not exists IndexRealisationsRefs on RealisationsRefs(referrer);
create trigger if not exists DeleteSelfRefsViaRealisations before delete on ValidPaths
  begin
    delete from RealisationsRefs where realisationReference in (
      select id from Realisations where outputPath = old.id);
  end;
""",
    "BuildTraceV3": """
create table if not exists BuildTraceV3 (
    id          integer primary key autoincrement not null,
    drvPath     text not null,
    outputName  text not null,
    outputPath  text not null,
    signatures  text
);
create index if not exists IndexBuildTraceV3 on BuildTraceV3(drvPath, outputName);
""",
}


class SchemaError(Exception):
    """The store database is of a version or shape nixfs does not handle."""


def read_schema_version(db_dir: str) -> int:
    """The version in ``db_dir/schema``; SchemaError if missing, unreadable or unknown."""
    path = os.path.join(db_dir, "schema")
    try:
        with open(path, "rb") as f:
            text = f.read(64).decode("ascii", "replace").strip()
    except FileNotFoundError:
        raise SchemaError(f"{path} is missing: not a Nix state directory") from None
    except OSError as e:
        raise SchemaError(f"cannot read {path}: {os.strerror(e.errno or errno.EIO)}") from None
    try:
        version = int(text)
    except ValueError:
        raise SchemaError(f"{path} does not hold a schema version ({text!r})") from None
    if version not in SUPPORTED_SCHEMAS:
        known = ", ".join(map(str, sorted(SUPPORTED_SCHEMAS)))
        raise SchemaError(f"the store database has schema version {version}; nixfs supports "
                          f"{known} (Nix 2.4 and later, Lix, Determinate Nix)")
    return version


def check_tables(conn) -> None:
    """SchemaError unless *conn* has every table and column nixfs copies."""
    for table, columns in TABLES.items():
        have = {row[1] for row in conn.execute(f"pragma table_info({table})")}
        missing = [c for c in columns if c not in have]
        if not have:
            raise SchemaError(f"the store database has no {table} table")
        if missing:
            raise SchemaError(f"the store database's {table} lacks {', '.join(missing)}")


# ---------------------------------------------------------------------- shapes

_TYPE = re.compile(r"[A-Za-z0-9_ (),]*")
_LITERAL = re.compile(r"(?:-?[0-9]+(?:\.[0-9]+)?|'(?:[^']|'')*'|NULL|null)")


def quote(name: str) -> str:
    """*name* as an SQL identifier."""
    return '"' + name.replace('"', '""') + '"'


@dataclass(frozen=True)
class Column:
    name: str
    type: str
    notnull: bool
    default: str | None  # SQL text of the default, as SQLite keeps it

    def addable(self) -> bool:
        """Whether ``alter table add column`` can make it (existing rows need a value)."""
        return not self.notnull or self.default not in (None, "NULL", "null")

    def ddl(self) -> str:
        if not _TYPE.fullmatch(self.type) or (
                self.default is not None and not _LITERAL.fullmatch(self.default)):
            raise ValueError(self.name)
        out = f"{quote(self.name)} {self.type}".rstrip()
        if self.notnull:
            out += " not null"
        if self.default is not None:
            out += f" default {self.default}"
        return out


@dataclass
class Shape:
    """The tables and columns of one store database, and the migrations it records."""
    columns: dict = field(default_factory=dict)  # table -> {column name: Column}
    migrations: set = field(default_factory=set)

    def has(self, table: str) -> bool:
        return table in self.columns

    def extra(self, table: str, known) -> list[str]:
        """Columns of *table* beyond *known*, in table order."""
        return [c for c in self.columns.get(table, {}) if c not in known]


def read_shape(conn, *, where: str = "the lower store's database",
               unknown_ok: bool = False) -> Shape:
    """The shape of the database on *conn*; SchemaError if nixfs cannot follow it (a
    table or column it needs missing; unless *unknown_ok*, a table it does not know:
    in the lower, its rows would be left behind; in the merged database it is a Nix's
    on the mount, which nixfs leaves alone)."""
    shape = Shape()
    tables = [r[0] for r in conn.execute(
        "select name from sqlite_master where type = 'table' order by name")]
    for table in tables:
        if table not in TABLES and table not in CA_TABLES and table not in OTHER_TABLES:
            if unknown_ok:
                continue
            raise SchemaError(f"{where} has a table {table} that nixfs does not know "
                              "(its rows would not reach the merged database)")
        shape.columns[table] = {
            r[1]: Column(r[1], r[2] or "", bool(r[3]), r[4])
            for r in conn.execute(f"pragma table_info({quote(table)})")}
    for table, needed in {**TABLES, **CA_TABLES}.items():
        if table not in shape.columns:
            if table in TABLES:
                raise SchemaError(f"{where} has no {table} table")
            continue
        missing = [c for c in needed if c not in shape.columns[table]]
        if missing:
            raise SchemaError(f"{where}'s {table} lacks {', '.join(missing)}")
    for table in ("Refs", "RealisationsRefs"):
        extra = shape.extra(table, TABLES.get(table) or CA_TABLES[table])
        if extra and not unknown_ok:
            raise SchemaError(f"{where}'s {table} has a column {extra[0]} that nixfs cannot "
                              "carry (its rows are mapped to the merged database's ids)")
    if "SchemaMigrations" in shape.columns:
        shape.migrations = {r[0] for r in conn.execute("select migration from SchemaMigrations")}
    return shape


def carry_shape(lower: Shape, conn) -> Shape:
    """Make the merged database on *conn* able to hold every lower row: add the lower's
    columns and ca-derivations tables it lacks, and record the lower's migrations (so a
    Nix on the mount does not run them again over what nixfs added).  Runs inside the
    caller's transaction; SchemaError (before anything is written) if a column cannot be
    carried either way.  Returns the merged shape."""
    merged = read_shape(conn, where="the merged database", unknown_ok=True)
    adds = []
    for table, columns in lower.columns.items():
        if table not in TABLES and table not in CA_TABLES:
            continue
        have = merged.columns.get(table)
        if have is None:
            continue  # a ca table: made from CA_DDL below
        for col in columns.values():
            if col.name in have:
                continue
            try:
                ddl = col.ddl()
            except ValueError:
                ddl = None
            if ddl is None or not col.addable():
                raise SchemaError(f"the lower store's database has a column {table}.{col.name} "
                                  "that nixfs cannot add to the merged database "
                                  f"({'not null without a default' if ddl else 'its type or default'})")
            adds.append(f"alter table {quote(table)} add column {ddl}")
    for table, columns in merged.columns.items():
        if table not in lower.columns:
            continue
        for col in columns.values():
            if col.name not in lower.columns[table] and not col.addable():
                raise SchemaError(f"the merged database's {table}.{col.name} must be set (not "
                                  "null, no default) but the lower store's database has no "
                                  "such column")
    made = [t for t in CA_TABLES if lower.has(t) and not merged.has(t)]
    if not (adds or made or lower.migrations - merged.migrations):
        return merged
    for statement in adds:
        conn.execute(statement)
    for table in made:
        if table == "RealisationsRefs" and not merged.has("Realisations") and \
                "Realisations" not in made:
            continue
        conn.execute(CA_DDL[table])
    if lower.migrations - merged.migrations:
        conn.execute("create table if not exists SchemaMigrations "
                     "(migration text primary key not null)")
        conn.executemany("insert or ignore into SchemaMigrations values (?)",
                         ((m,) for m in sorted(lower.migrations - merged.migrations)))
    return read_shape(conn, where="the merged database", unknown_ok=True)
