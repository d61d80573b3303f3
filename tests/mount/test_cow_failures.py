"""A copy-on-write upper file under failure: kill -9 of the daemon while a stock SQLite
commits and checkpoints through the mount, a base whose lower stops answering, and what
nixfs fsck says of COW maps."""

import errno
import os
import random
import subprocess

from cowlayers import (BASE_REL, DB_REL, cow_layers, fsck_json, make_cow,  # noqa: F401
                       map_path, sha256, sqlite)
from harness import NixfsMount, kill_daemon


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


def _direct_read(path, offset: int) -> bytes:
    """One 4 KiB read that reaches nixfs (O_DIRECT: not from the kernel's page cache)."""
    import mmap
    buf = mmap.mmap(-1, 4096)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        n = os.preadv(fd, [buf], offset)
        return bytes(buf[:n])
    finally:
        os.close(fd)


def test_a_stalled_base_fails_its_reads_with_eio_and_recovers(tmp_path):
    """The base on a lower that stops answering (scripts/slowfs): a read that needs it
    fails with EIO after lower_timeout, one from the delta answers meanwhile, and all is
    read again once the lower is back."""
    from relharness import SlowFs, timed
    src, slow, upper, mnt = (tmp_path / n for n in ("src", "slow", "upper", "mnt"))
    base_data = random.Random(3).randbytes(16 * 4096)
    (src / "gen/1").mkdir(parents=True)
    (src / BASE_REL).write_bytes(base_data)
    upper.mkdir()
    mnt.mkdir()
    make_cow(src, upper)
    with SlowFs(src, slow) as lower, NixfsMount(slow, upper, mnt, "lower_timeout=1.5"):
        shown = mnt / DB_REL
        with open(shown, "r+b") as f:  # page 0 into the delta (this opens the base too)
            f.write(b"delta page")
            os.fsync(f.fileno())
        lower.mode("stall")
        try:
            err, took, _ = timed(_direct_read, shown, 5 * 4096)
            print("base read during the stall:", err, round(took, 2))
            assert err == errno.EIO, err
            err, took, data = timed(_direct_read, shown, 0)
            print("delta read during the stall:", err, round(took, 2))
            assert err == 0 and data[:10] == b"delta page", (err, took)
        finally:
            lower.mode("normal")
        assert _direct_read(shown, 5 * 4096) == base_data[5 * 4096:6 * 4096]
        assert shown.read_bytes() == b"delta page" + base_data[10:]
