"""What nixfs knows of Nix's store database (``var/nix/db``).

nixfs reads the lower's ``schema`` file and refuses versions it does not know,
because it copies rows between databases table by table: a table it does not
know would be silently left behind.
"""

import errno
import os

# Schema 10 (Nix 2.4 to 2.19): the tables and columns whose rows nixfs carries over.
SUPPORTED_SCHEMAS = {10}
STORE_DIR = "/nix/store"
TABLES = {
    "ValidPaths": ("id", "path", "hash", "registrationTime", "deriver", "narSize", "ultimate",
                   "sigs", "ca"),
    "Refs": ("referrer", "reference"),
    "DerivationOutputs": ("drv", "id", "path"),
}

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
                          f"{known} (Nix 2.4 to 2.19)")
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
