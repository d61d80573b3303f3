"""A copy-on-write upper file (a delta and its map over a base in the lower) is served
through the mount as an ordinary file: its content, size and a stock SQLite's use of it
(WAL, checkpoint, VACUUM) through a real FUSE mount; rename, link and unlink of it; a
kill -9 of the daemon while it is written."""

import errno
import hashlib
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import force_unmount
from harness import REPO, NixfsMount, kill_daemon, run_nixfs
from nixlower import Store, built_lower  # noqa: F401 (a fixture)

sys.path.insert(0, str(REPO))
from nixfs.cow.bases import ReadOnlyFile  # noqa: E402
from nixfs.cow.cowfile import CowFile  # noqa: E402
from nixfs.cow import cowmap  # noqa: E402

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


def test_cow_file_reads_as_its_base(cow_layers):
    lower, upper, mnt = cow_layers
    base = lower / BASE_REL
    with NixfsMount(lower, upper, mnt):
        shown = mnt / DB_REL
        # A listing's entries (READDIRPLUS) carry the logical size too.
        assert [(e.name, e.stat(follow_symlinks=False).st_size)
                for e in os.scandir(mnt / "data")] == [("db.sqlite", base.stat().st_size)]
        assert shown.stat().st_size == base.stat().st_size
        assert shown.read_bytes() == base.read_bytes()
        # The map is never shown, found or made through the mount.
        assert os.listdir(mnt / "data") == ["db.sqlite"]
        with pytest.raises(FileNotFoundError):
            os.stat(map_path(shown))
        with pytest.raises(OSError) as e:
            map_path(mnt / "data/other").write_bytes(b"x")
        assert e.value.errno == errno.EINVAL
        assert sqlite(shown, "select count(*) from t;").strip() == str(ROWS)
        status = json.loads(run_nixfs("status", "--json", mnt).stdout)["cow_files"]
        assert status["opened"] == 1 and status["read"] > 0 and status["write"] == 0
        assert status["base"]["bytes"] >= base.stat().st_size  # (the kernel read it all)
        assert "copy-on-write files: 1 open" in run_nixfs("status", mnt).stdout
    assert (upper / DB_REL).stat().st_blocks == 0, "reading wrote to the delta"


@pytest.fixture(params=["kernel", "nixfs"])
def opens(request):
    """Who keeps opens: the kernel (reads and writes by inode) or nixfs (by handle)."""
    return f"opens={request.param}"


def test_stock_sqlite_uses_a_cow_db_through_the_mount(cow_layers, opens):
    lower, upper, mnt = cow_layers
    base = lower / BASE_REL
    base_sha = sha256(base)
    with NixfsMount(lower, upper, mnt, opens):
        db = mnt / DB_REL
        out = sqlite(db, "pragma journal_mode=wal;\n"
                         "insert into t (v) values ('added');\n"
                         "pragma wal_checkpoint(truncate);\n"
                         "select count(*) from t;\n")
        assert out.split()[-1] == str(ROWS + 1)
        assert os.stat(db).st_size >= base.stat().st_size
        # A delete shrinks nothing until VACUUM, which rewrites (and truncates) the file.
        sqlite(db, "delete from t where id % 2 = 0;\nvacuum;\n")
        vacuumed = os.stat(db).st_size
        assert vacuumed < base.stat().st_size
        assert len((mnt / DB_REL).read_bytes()) == vacuumed
        assert sqlite(db, "pragma integrity_check;").strip() == "ok"
    with NixfsMount(lower, upper, mnt):
        db = mnt / DB_REL
        assert os.stat(db).st_size == vacuumed
        assert sqlite(db, "pragma integrity_check;").strip() == "ok"
        assert sqlite(db, "select v from t where v = 'added';").strip() == "added"
        assert sqlite(db, "select count(*) from t;").strip() == str(ROWS // 2 + 1)
    assert sha256(base) == base_sha, "the base in the lower changed"
    assert map_path(upper / DB_REL).exists()


def test_small_change_keeps_the_delta_small(cow_layers):
    lower, upper, mnt = cow_layers
    base = lower / BASE_REL
    with NixfsMount(lower, upper, mnt):
        db = mnt / DB_REL
        sqlite(db, "pragma journal_mode=wal;\nupdate t set v = 'changed' where id = 7;\n"
                   "pragma wal_checkpoint(truncate);\n")
        assert os.stat(db).st_size == base.stat().st_size
        assert sqlite(db, "select v from t where id = 7;").strip() == "changed"
        # What the kernel is told of the file: the logical size, the delta's blocks.
        assert os.stat(db).st_blocks == (upper / DB_REL).stat().st_blocks
    delta_bytes = (upper / DB_REL).stat().st_blocks * 512
    assert 0 < delta_bytes <= 64 * 1024 < base.stat().st_size // 4, delta_bytes


def test_writes_past_the_end_and_truncation_show_at_once(cow_layers, opens):
    lower, upper, mnt = cow_layers
    base_data = (lower / BASE_REL).read_bytes()
    with NixfsMount(lower, upper, mnt, opens):
        shown = mnt / DB_REL
        with open(shown, "r+b") as f:
            f.seek(len(base_data) + 10_000)
            f.write(b"tail")
            f.flush()
            assert os.fstat(f.fileno()).st_size == len(base_data) + 10_004
            assert os.stat(shown).st_size == len(base_data) + 10_004
            f.truncate(5000)
            assert os.stat(shown).st_size == 5000
            f.seek(0)
            assert f.read() == base_data[:5000]
            os.fsync(f.fileno())
        with open(shown, "r+b") as f:  # O_TRUNC-free reopen keeps it
            assert f.read() == base_data[:5000]
        with open(shown, "wb") as f:  # O_TRUNC
            f.write(b"new")
        assert shown.read_bytes() == b"new"
    with NixfsMount(lower, upper, mnt):
        assert (mnt / DB_REL).read_bytes() == b"new"
    assert (lower / BASE_REL).read_bytes() == base_data


def test_rename_and_link_of_a_cow_file_are_refused_mv_copies(cow_layers):
    lower, upper, mnt = cow_layers
    base_data = (lower / BASE_REL).read_bytes()
    with NixfsMount(lower, upper, mnt):
        shown = mnt / DB_REL
        (mnt / "data/plain").write_bytes(b"plain")
        for call in (lambda: os.rename(shown, mnt / "data/moved"),
                     lambda: os.rename(mnt / "data/plain", shown),
                     lambda: os.link(shown, mnt / "data/linked")):
            with pytest.raises(OSError) as e:
                call()
            assert e.value.errno == errno.EXDEV
        # mv copies across the "device" and unlinks the COW file: delta and map go.
        subprocess.run(["mv", str(shown), str(mnt / "data/moved")], check=True)
        assert (mnt / "data/moved").read_bytes() == base_data
        assert sorted(os.listdir(mnt / "data")) == ["moved", "plain"]
        assert not (upper / DB_REL).exists() and not map_path(upper / DB_REL).exists()
        # A new file of the old name is a plain file.
        shown.write_bytes(b"again")
        assert shown.read_bytes() == b"again"
    assert sorted(os.listdir(upper / "data")) == ["db.sqlite", "moved", "plain"]


def test_unlink_while_open_keeps_the_open_file(cow_layers, opens):
    lower, upper, mnt = cow_layers
    base_data = (lower / BASE_REL).read_bytes()
    with NixfsMount(lower, upper, mnt, opens):
        shown = mnt / DB_REL
        with open(shown, "r+b") as f:
            os.unlink(shown)
            assert not shown.exists()
            assert not (upper / DB_REL).exists() and not map_path(upper / DB_REL).exists()
            f.seek(100)
            f.write(b"written after the unlink")
            os.fsync(f.fileno())
            f.seek(0)
            data = f.read()
            assert data[:100] == base_data[:100] and data[100:124] == b"written after the unlink"
            assert os.fstat(f.fileno()).st_size == len(base_data)
            # Its delta and map went to a folder of their own in the work folder.
            assert [n.split(".")[0] for n in os.listdir(upper / ".nixfs/work")] == ["cow"]
            shown.write_bytes(b"a new file")  # the name is free for another file
            assert shown.read_bytes() == b"a new file"
        assert shown.read_bytes() == b"a new file"
    assert not map_path(upper / DB_REL).exists()
    assert os.listdir(upper / ".nixfs/work") == []


def test_unlink_of_a_cow_file_over_a_lower_name_whites_it_out(tmp_path):
    lower, upper, mnt = tmp_path / "lower", tmp_path / "upper", tmp_path / "mnt"
    make_base(lower / BASE_REL)
    (lower / "data").mkdir()
    (lower / DB_REL).write_bytes(b"the lower's own file of that name")
    upper.mkdir()
    mnt.mkdir()
    make_cow(lower, upper)
    with NixfsMount(lower, upper, mnt):
        assert (mnt / DB_REL).read_bytes() == (lower / BASE_REL).read_bytes()
        os.unlink(mnt / DB_REL)
        assert not (mnt / DB_REL).exists()
        assert os.listdir(mnt / "data") == []
    assert sorted(os.listdir(upper / "data")) == [".wh.db.sqlite"]


def fsck_json(lower, upper, *args) -> dict:
    return json.loads(run_nixfs("fsck", "--lower", lower, "--upper", upper, "--json",
                                *args).stdout)


def test_fsck_knows_cow_maps(cow_layers):
    lower, upper, mnt = cow_layers
    assert fsck_json(lower, upper)["findings"] == []  # a COW file and its map: all well
    stale = upper / "data" / ".wh..wh..nixfs-cow.gone"  # its delta's unlink was the last step
    stale.write_bytes(b"")
    found = [(f["kind"], f["severity"]) for f in fsck_json(lower, upper)["findings"]]
    assert found == [("stale-cow-map", "harmless")]
    fsck_json(lower, upper, "--repair")
    assert not stale.exists()
    map_path(upper / DB_REL).write_bytes(b"NIXFSCOW but no more")
    report = fsck_json(lower, upper)
    assert report["exit_code"] == 4
    assert [f["kind"] for f in report["findings"]] == ["cow-map-damaged"]


def test_nix_queries_and_registers_through_a_cow_db(tmp_path, built_lower):  # noqa: F811
    """Nix 2.8 on a COW db.sqlite over the lower's own (a plain overlay, --no-nix: what is
    tested is the file, as a generation client's mount will give it to Nix)."""
    store = Store(tmp_path, built_lower)
    base_rel = "var/nix/db/db.sqlite"
    base = store.lower / base_rel
    sqlite(base, "pragma wal_checkpoint(truncate);")  # (the built store was closed cleanly)
    assert not base.with_name("db.sqlite-wal").exists()
    base_sha = sha256(base)
    make_cow(store.lower, store.upper, base_rel, base_rel)
    added = tmp_path / "added.txt"
    added.write_text("registered through a COW db\n")
    with NixfsMount(store.lower, store.upper, store.mnt, extra_args=["--no-nix"]):
        for path in store.paths.values():
            assert store.valid(path)
        refs = store.q("-q", "--references", store.paths["app"]).stdout.split()
        assert store.paths["liba"] in refs and store.paths["libb"] in refs
        new = store.q("--add", added).stdout.strip()
        assert store.valid(new)
        assert store.q("--verify").returncode == 0
    with NixfsMount(store.lower, store.upper, store.mnt, extra_args=["--no-nix"]):
        assert store.valid(new) and all(store.valid(p) for p in store.paths.values())
        assert store.q("-q", "--referrers", store.paths["liba"]).stdout.split()
        integrity = sqlite(store.mnt / base_rel, "pragma integrity_check;")
        assert integrity.strip() == "ok"
    assert sha256(base) == base_sha, "the lower's db changed"
    assert not store.lower_valid(new)
    delta = store.upper / base_rel
    assert map_path(delta).exists() and delta.stat().st_blocks * 512 < base.stat().st_size


WRITER = r"""
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=30)
conn.execute("pragma journal_mode=wal")
conn.execute("pragma synchronous=full")
conn.execute("create table if not exists log (n integer primary key, pad blob)")
n = conn.execute("select coalesce(max(n), 0) from log").fetchone()[0]
while True:
    n += 1
    conn.execute("begin")
    conn.execute("insert into log values (?, randomblob(3000))", (n,))
    conn.execute("update t set v = ? where id = ?", (f"round {n}", 1 + n * 37 % 3000))
    conn.execute("commit")
    if n % 5 == 0:
        conn.execute("pragma wal_checkpoint(truncate)")
    if n % 23 == 0:
        conn.execute("delete from log where n % 3 = 0 and n < ?", (n - 10,))
    print(n, flush=True)
"""


def test_kill_9_of_the_daemon_while_a_cow_db_is_written(cow_layers):
    """Round after round, the daemon dies in the middle of commits and checkpoints (each
    checkpoint writes the COW file and fsyncs it, then truncates the WAL): the next mount
    shows a database that passes integrity_check and holds every committed row."""
    lower, upper, mnt = cow_layers
    base_sha = sha256(lower / BASE_REL)
    rng = random.Random(20)
    committed = 0
    for round_ in range(6):
        with NixfsMount(lower, upper, mnt) as m:
            db = mnt / DB_REL
            if committed:
                check = sqlite(db, "pragma integrity_check;\nselect max(n) from log;").split()
                assert check[0] == "ok", check
                assert int(check[1]) >= committed, (round_, check, committed)
            writer = subprocess.Popen(["python3", "-c", WRITER, str(db)], stdout=subprocess.PIPE,
                                      stderr=subprocess.DEVNULL, text=True)
            try:
                target, seen = rng.randrange(8, 60), 0  # commits before the kill
                for line in writer.stdout:
                    committed, seen = int(line), seen + 1  # (printed once committed)
                    if seen >= target:
                        break
                kill_daemon(mnt)
            finally:
                writer.kill()
                writer.wait()
            m.force_unmount()
        if round_ % 2:  # what a kill leaves, nixfs fsck finds nothing wrong with
            report = fsck_json(lower, upper)
            assert report["exit_code"] == 0, report
    with NixfsMount(lower, upper, mnt):
        check = sqlite(mnt / DB_REL, "pragma integrity_check;\nselect max(n) from log;").split()
        assert check[0] == "ok" and int(check[1]) >= committed, (check, committed)
        logical = os.stat(mnt / DB_REL).st_size
    assert sha256(lower / BASE_REL) == base_sha
    assert (upper / DB_REL).stat().st_blocks * 512 <= logical + 4096  # never more than it
