"""COW files for the tests: a lower holding a real SQLite database as a base, an upper
with a copy-on-write file over it (made with nixfs/cow, as a generation client does before
it mounts), and the stock sqlite3 command to use it through a mount."""

import hashlib
import json
import random
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from harness import REPO, force_unmount, run_nixfs

sys.path.insert(0, str(REPO))
from nixfs.cow import cowmap  # noqa: E402
from nixfs.cow.bases import ReadOnlyFile  # noqa: E402
from nixfs.cow.cowfile import CowFile  # noqa: E402

BASE_REL = "gen/1/db.sqlite"  # the base, relative to the lower root
DB_REL = "data/db.sqlite"  # the COW file, in the upper and the merged view
ROWS = 3000


def sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def make_base(path: Path, rows: int = ROWS) -> None:
    """A real SQLite database in WAL mode, checkpointed: no -wal or -shm beside it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path)
    conn.execute("pragma journal_mode=wal")
    conn.execute("create table t (id integer primary key, v text)")
    rng = random.Random(1)
    conn.executemany("insert into t (v) values (?)",
                     [(f"row {i} " + "x" * rng.randrange(200),) for i in range(rows)])
    conn.commit()
    conn.execute("pragma wal_checkpoint(truncate)")
    conn.close()
    assert not path.with_name(path.name + "-wal").exists()


def make_cow(lower: Path, upper: Path, base_rel: str = BASE_REL, rel: str = DB_REL) -> Path:
    """The upper file *rel*: a new, empty COW delta over the lower's *base_rel*."""
    delta = upper / rel
    delta.parent.mkdir(parents=True, exist_ok=True)
    base = ReadOnlyFile.open(lower / base_rel)
    try:
        CowFile.create(delta, map_path(delta), base, base_path=base_rel).close()
    finally:
        base.close()
    return delta


@pytest.fixture
def cow_layers(tmp_path):
    lower, upper = tmp_path / "lower", tmp_path / "upper"
    make_base(lower / BASE_REL)
    upper.mkdir()
    make_cow(lower, upper)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    yield lower, upper, mnt
    force_unmount(mnt)


def map_path(delta: Path) -> Path:
    """The map beside the delta *delta*."""
    return Path(cowmap.map_path(delta))


def sqlite(db: Path, script: str) -> str:
    """The stock sqlite3 command (its own SQLite library, not nixfs' apsw) on *db*."""
    proc = subprocess.run(["sqlite3", "-batch", "-bail", str(db)], input=script,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def fsck_json(lower, upper, *args) -> dict:
    return json.loads(run_nixfs("fsck", "--lower", lower, "--upper", upper, "--json",
                                *args).stdout)
