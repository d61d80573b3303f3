"""Reading a SQLite database that another process writes, without any lock."""

import os
import threading
import time

import apsw
import pytest

from nixfs.nixdb.snapshot import Snapshot, SnapshotError, read_consistent


@pytest.fixture
def busy_db(tmp_path):
    """A WAL database with a writer committing batches (a busier nix-daemon than most)."""
    path = str(tmp_path / "db.sqlite")
    w = apsw.Connection(path)
    w.execute("pragma journal_mode=wal").fetchall()
    w.execute("pragma wal_autocheckpoint=100").fetchall()
    w.execute("create table t (id integer primary key, v text)")
    stop = threading.Event()

    def write():
        while not stop.is_set():
            with w:
                for _ in range(10):
                    w.execute("insert into t (v) values (?)", ("x" * 500,))
            time.sleep(0.002)

    thread = threading.Thread(target=write)
    thread.start()
    time.sleep(0.1)
    yield path
    stop.set()
    thread.join()
    w.close()


def test_reads_are_consistent_under_a_checkpointing_writer(busy_db):
    last = 0
    for _ in range(60):
        count, top, check = read_consistent(busy_db, lambda c, s: (
            *c.execute("select count(*), max(id) from t").fetchone(),
            c.execute("pragma quick_check").fetchone()[0]))
        assert check == "ok" and count == top and count % 10 == 0  # whole transactions only
        assert count >= last
        last = count


def test_uncheckpointed_wal_is_seen_and_no_lock_or_shm_is_made(tmp_path):
    path = str(tmp_path / "db.sqlite")
    w = apsw.Connection(path)
    w.execute("pragma journal_mode=wal").fetchall()
    w.execute("pragma wal_autocheckpoint=0").fetchall()  # everything stays in the WAL
    w.execute("create table t (v)")
    with w:
        w.execute("insert into t values ('in the wal')")
    os.chmod(tmp_path, 0o555)  # a read-only lower: nothing can be created next to it
    try:
        before = sorted(os.listdir(tmp_path))
        assert read_consistent(path, lambda c, s: c.execute("select v from t").fetchall()) == [
            ("in the wal",)]
        assert sorted(os.listdir(tmp_path)) == before
        # The writer holds its lock meanwhile: a reader that needed one would block.
        w.execute("begin exclusive")
        assert read_consistent(path, lambda c, s: c.execute("select count(*) from t").fetchone()) == (1,)
        w.execute("rollback")
    finally:
        os.chmod(tmp_path, 0o755)
        w.close()


def test_clone_is_a_whole_database(busy_db, tmp_path):
    dest = str(tmp_path / "clone.sqlite")
    for _ in range(200):  # a clone that does not validate is discarded, as build() does
        with Snapshot(busy_db) as snap:
            snap.clone_to(dest, sync=False)
            if snap.validate():
                break
    else:
        pytest.fail("no clone validated in 200 tries")
    c = apsw.Connection(dest)
    assert c.execute("pragma integrity_check").fetchone()[0] == "ok"
    count, top = c.execute("select count(*), max(id) from t").fetchone()
    assert count == top and count % 10 == 0


def test_not_a_database(tmp_path):
    path = tmp_path / "db.sqlite"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(SnapshotError):
        read_consistent(str(path), lambda c, s: c.execute("select 1 from t").fetchall())
