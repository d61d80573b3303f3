"""Synthetic store databases in the shapes each Nix writes (all schema 10).

Written from what each release's sources create, in this project's words:

  nix-2.8      ValidPaths, Refs (IndexReferrer, IndexReference), DerivationOutputs
  lix          the same, with the ca-derivations tables of Nix 2.18 (Realisations,
               RealisationsRefs); no SchemaMigrations
  nix-2.26     nix-2.8 plus an empty SchemaMigrations table (Nix >= 2.25)
  nix-2.34-ca  nix-2.26 after `20220326-ca-derivations`: Realisations, RealisationsRefs
  nix-2.35     no IndexReferrer (`20260309-drop-redundant-indexreferrer`, run on every
               writable open); with ca-derivations BuildTraceV3 (`20251017-ca-derivations`,
               its output by store path, no foreign key)
  determinate  nix-2.26 plus ValidPaths.provenance (`20241024-provenance`)
"""

import json
import os
from pathlib import Path

import apsw

from nixstore import fake_hash, generate_db

SHAPES = ("nix-2.8", "lix", "nix-2.26", "nix-2.34-ca", "nix-2.35", "nix-2.35-ca", "determinate")

REALISATIONS = """
create table if not exists Realisations (
    id integer primary key autoincrement not null,
    drvPath text not null,
    outputName text not null,
    outputPath integer not null,
    signatures text,
    foreign key (outputPath) references ValidPaths(id) on delete cascade
);
create index if not exists IndexRealisations on Realisations(drvPath, outputName);
create trigger if not exists DeleteSelfRefsViaRealisations before delete on ValidPaths
  begin
    delete from RealisationsRefs where realisationReference in (
      select id from Realisations where outputPath = old.id);
  end;
create table if not exists RealisationsRefs (
    referrer integer not null,
    realisationReference integer,
    foreign key (referrer) references Realisations(id) on delete cascade,
    foreign key (realisationReference) references Realisations(id) on delete restrict
);
create index if not exists IndexRealisationsRefs on RealisationsRefs(referrer);
"""
BUILD_TRACE = """
create table if not exists BuildTraceV3 (
    id integer primary key autoincrement not null,
    drvPath text not null,
    outputName text not null,
    outputPath text not null,
    signatures text
);
create index if not exists IndexBuildTraceV3 on BuildTraceV3(drvPath, outputName);
"""
MIGRATIONS = "create table if not exists SchemaMigrations (migration text primary key not null)"


def migrate(conn, shape: str) -> None:
    """Turn a nix-2.8-shaped database into *shape*, as that Nix's migrations would."""
    def record(name):
        conn.execute(MIGRATIONS)
        conn.execute("insert or ignore into SchemaMigrations values (?)", (name,))

    if shape == "lix":
        conn.execute(REALISATIONS)
    if shape in ("nix-2.26", "nix-2.34-ca", "nix-2.35", "nix-2.35-ca", "determinate"):
        conn.execute(MIGRATIONS)
    if shape == "nix-2.34-ca":
        conn.execute(REALISATIONS)
        record("20220326-ca-derivations")
    if shape in ("nix-2.35", "nix-2.35-ca"):
        conn.execute("drop index if exists IndexReferrer")
        record("20260309-drop-redundant-indexreferrer")
    if shape == "nix-2.35-ca":
        conn.execute(BUILD_TRACE)
        record("20251017-ca-derivations")
    if shape == "determinate":
        conn.execute("alter table ValidPaths add column provenance text")
        record("20241024-provenance")


def provenance(path: str) -> str:
    return json.dumps({"type": "build", "drv": path.rsplit("/", 1)[1], "flake": "test"})


def realise(conn, shape: str, drv: str, out: str, sigs: str = "test-1:abc") -> None:
    """Record that output `out` of derivation *drv* is the store path *out*."""
    if shape in ("lix", "nix-2.34-ca"):
        conn.execute("insert into Realisations (drvPath, outputName, outputPath, signatures) "
                     "values (?, 'out', (select id from ValidPaths where path = ?), ?)",
                     (drv, out, sigs))
    elif shape == "nix-2.35-ca":
        conn.execute("insert into BuildTraceV3 (drvPath, outputName, outputPath, signatures) "
                     "values (?, 'out', ?, ?)", (drv, out, sigs))


def has_ca(shape: str) -> bool:
    return shape in ("lix", "nix-2.34-ca", "nix-2.35-ca")


def make_store(root: Path, shape: str, count: int = 40) -> list[str]:
    """A lower Nix state directory at *root* (``store/`` and ``var/nix/db``) of *shape*,
    with *count* paths (their directories too), every fourth one realised."""
    (root / "store").mkdir(parents=True)
    db = root / "var/nix/db/db.sqlite"
    paths = generate_db(db, count, refs=3, store_dirs=root / "store")
    conn = apsw.Connection(str(db))
    with conn:
        migrate(conn, shape)
        if shape == "determinate":
            conn.executemany("update ValidPaths set provenance = ? where path = ?",
                             ((provenance(p), p) for p in paths[::2]))
        for i in range(1, count, 4):
            realise(conn, shape, f"sha256:{fake_hash(i, 'drv')}", paths[i])
    conn.close()
    return paths


def add_path(db: Path, shape: str, i: int, refs=(), *, realised: bool = False,
             writer=None) -> str:
    """Register a new path in the lower database (as its Nix would, in one transaction)."""
    path = f"/nix/store/{fake_hash(i, 'new')}-new{i}"
    os.makedirs(db.parent.parent.parent.parent / "store" / os.path.basename(path),
                exist_ok=True)
    conn = writer or apsw.Connection(str(db))
    cols = [r[1] for r in conn.execute("pragma table_info(ValidPaths)")]
    with conn:
        values = {"path": path, "hash": "sha256:" + "0" * 64, "registrationTime": 1800000000,
                  "narSize": 100}
        if "provenance" in cols:
            values["provenance"] = provenance(path)
        conn.execute(f"insert into ValidPaths ({', '.join(values)}) values "
                     f"({', '.join('?' * len(values))})", list(values.values()))
        for ref in refs:
            conn.execute("insert into Refs values ((select id from ValidPaths where path = ?), "
                         "(select id from ValidPaths where path = ?))", (path, ref))
        if realised:
            realise(conn, shape, f"sha256:{fake_hash(i, 'newdrv')}", path)
    if writer is None:
        conn.close()
    return path
