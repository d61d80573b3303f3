"""SQLite through the nixfs-cow VFS: a COW database over a base database is an ordinary
database (journals, WAL, VACUUM, checkpoints, reopening), two processes share it under
real locks, a killed writer loses nothing committed, and the base is never written."""

import hashlib
import os
import random

import apsw
import pytest

from cowsql import Remote
from nixfs.cow import cowmap, shared, vfs
from nixfs.cow.bases import base_opener
from nixfs.cow.cowfile import CowFile
from nixfs.cow.cowmap import CowError

ROWS = 3000


def _fill(conn, start: int, count: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with conn:
        conn.executemany("insert into t values (?, ?)",
                         ((i, rng.randbytes(rng.randrange(50, 400))) for i in range(start, start + count)))


@pytest.fixture
def base_db(tmp_path):
    """gen/base.db (a checkpointed rollback-journal db of ~1 MB) and up/ for the COW."""
    (tmp_path / "gen").mkdir()
    (tmp_path / "up").mkdir()
    conn = apsw.Connection(str(tmp_path / "gen/base.db"))
    conn.execute("create table t (k integer primary key, v blob); create index tv on t(v)")
    _fill(conn, 0, ROWS)
    conn.close()
    return tmp_path


def _cow(root, name="up/db", base="gen/base.db"):
    CowFile.create(root / name, cowmap.map_path(root / name), base_opener(root)(base),
                   base_path=base).close()
    return root / name


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _rows(conn):
    return conn.execute("select count(*), total(k), sum(length(v)) from t").fetchall()


def _workload(conn, journal: str) -> None:
    conn.execute(f"pragma journal_mode={journal}").fetchall()
    _fill(conn, ROWS, 500, seed=1)
    with conn:
        conn.execute("delete from t where k % 3 = 0")
        conn.execute("update t set v = zeroblob(700) where k % 7 = 1")
    conn.execute("vacuum")
    _fill(conn, 10 * ROWS, 200, seed=2)
    if journal == "wal":
        conn.execute("pragma wal_checkpoint(truncate)").fetchall()
    assert conn.execute("pragma integrity_check").fetchall() == [("ok",)]


@pytest.mark.parametrize("journal", ["delete", "truncate", "persist", "wal"])
def test_a_cow_database_matches_a_plain_copy(base_db, journal):
    before = _digest(base_db / "gen/base.db")
    plain = base_db / "plain.db"
    plain.write_bytes((base_db / "gen/base.db").read_bytes())
    path = _cow(base_db)
    for target, connect in ((plain, apsw.Connection),
                            (path, lambda p: vfs.connect(p, base_root=base_db))):
        conn = connect(str(target))
        _workload(conn, journal)
        conn.close()
    want = _rows(apsw.Connection(str(plain)))
    conn = vfs.connect(path, base_root=base_db)
    assert _rows(conn) == want
    assert conn.execute("pragma integrity_check").fetchall() == [("ok",)]
    conn.close()
    assert _digest(base_db / "gen/base.db") == before
    assert shared.open_count() == 0


def test_a_fresh_cow_database_holds_only_what_changed(base_db):
    path = _cow(base_db)
    conn = vfs.connect(path, base_root=base_db)
    with conn:
        conn.execute("insert into t values (-1, x'00')")
    assert conn.execute("select count(*) from t").fetchall() == [(ROWS + 1,)]
    conn.close()
    assert path.stat().st_blocks * 512 <= 8 * 4096  # a few pages, of a ~1 MB base
    assert (base_db / "gen/base.db").stat().st_size > 50 * 4096


def test_mmap_is_never_used(base_db):
    conn = vfs.connect(_cow(base_db), base_root=base_db)
    assert conn.execute("pragma mmap_size=268435456").fetchall() == [(0,)]
    assert _rows(conn)[0][0] == ROWS
    conn.close()


def test_a_plain_file_through_the_vfs_is_unchanged(base_db):
    vfs.register()
    vfs.register()  # idempotent
    path = str(base_db / "gen/base.db")
    conn = apsw.Connection(path, vfs=vfs.VFS_NAME)
    conn.execute("pragma journal_mode=wal").fetchall()
    _fill(conn, ROWS, 10)
    conn.close()
    assert _rows(apsw.Connection(path))[0][0] == ROWS + 10
    assert not vfs.is_cow(path)


def test_a_chain_of_cow_databases(base_db):
    first = _cow(base_db, "gen/g2.db")
    conn = vfs.connect(first, base_root=base_db)
    _fill(conn, ROWS, 300, seed=3)
    conn.close()
    top = _cow(base_db, "up/db", "gen/g2.db")
    conn = vfs.connect(top, base_root=base_db)
    with conn:
        conn.execute("delete from t where k < 100")
    assert _rows(conn)[0][0] == ROWS + 200
    assert conn.execute("pragma integrity_check").fetchall() == [("ok",)]
    conn.close()
    assert _rows(vfs.connect(first, base_root=base_db))[0][0] == ROWS + 300


def test_a_damaged_map_is_a_clear_error(base_db):
    path = _cow(base_db)
    map_file = type(path)(cowmap.map_path(path))
    data = bytearray(map_file.read_bytes())
    data[40] ^= 0xFF
    map_file.write_bytes(bytes(data))
    with pytest.raises(CowError, match="checksum"):
        vfs.connect(path, base_root=base_db)
    with pytest.raises(CowError, match="root"):
        vfs.connect(path)


# -- two processes -----------------------------------------------------------------------

@pytest.fixture
def remote(base_db):
    children = []

    def start(path):
        child = Remote(path, base_db)
        children.append(child)
        return child
    yield start
    for child in children:
        child.close()


def test_two_processes_rollback_journal(base_db, remote):
    path = _cow(base_db)
    writer = remote(path)
    reader = vfs.connect(path, base_root=base_db)
    reader.setbusytimeout(0)
    writer.sql("pragma cache_size=-50000")  # no spill to the file (that locks readers out)
    writer.sql("begin immediate")
    writer.sql("insert into t select k + 100000, v from t where k < 2000")
    assert _rows(reader)[0][0] == ROWS  # a reader sees the old content meanwhile
    with pytest.raises(apsw.BusyError):
        reader.execute("insert into t values (-5, x'01')")
    writer.sql("commit")
    assert _rows(reader)[0][0] == ROWS + 2000
    assert writer.sql("select count(*) from t") == [(ROWS + 2000,)]
    with reader:  # and the other way round
        reader.execute("delete from t where k >= 100000 and k % 2 = 0")
    assert writer.sql("select count(*) from t") == [(ROWS + 1000,)]
    assert writer.sql("pragma integrity_check") == [("ok",)]
    reader.close()


def test_two_processes_wal(base_db, remote):
    """A WAL reader in another process reads pages a checkpoint moved into the delta: it
    takes the new map although it holds its file lock throughout."""
    path = _cow(base_db)
    conn = vfs.connect(path, base_root=base_db)
    conn.execute("pragma journal_mode=wal").fetchall()
    conn.setbusytimeout(0)
    other = remote(path)
    assert other.sql("select count(*) from t") == [(ROWS,)]
    for round_ in range(3):
        other.sql(f"insert into t select k + {(round_ + 1) * 100000}, randomblob(300) "
                  "from t where k < 1500")
        assert _rows(conn) == other.sql("select count(*), total(k), sum(length(v)) from t")
        other.sql("pragma wal_checkpoint(truncate)")
        want = other.sql("select count(*), total(k), sum(length(v)) from t")
        assert _rows(conn) == want
        with conn:
            conn.execute(f"delete from t where k > {(round_ + 1) * 100000} and k % 5 = 0")
        conn.execute("pragma wal_checkpoint(truncate)").fetchall()
        assert other.sql("select count(*), total(k), sum(length(v)) from t") == _rows(conn)
    assert other.sql("pragma integrity_check") == [("ok",)]
    assert conn.execute("pragma integrity_check").fetchall() == [("ok",)]
    conn.close()


@pytest.mark.parametrize("journal", ["delete", "wal"])
def test_a_killed_writer_loses_nothing_committed(base_db, remote, journal):
    path = _cow(base_db)
    writer = remote(path)
    writer.sql(f"pragma journal_mode={journal}")
    writer.sql("pragma synchronous=full")
    writer.sql("insert into t select k + 100000, v from t where k < 1000")
    if journal == "wal":
        writer.sql("pragma wal_checkpoint(passive)")
    writer.sql("begin")
    writer.sql("delete from t where k < 2000")
    writer.sql("insert into t select k + 200000, randomblob(500) from t")
    writer.kill()
    conn = vfs.connect(path, base_root=base_db)
    assert conn.execute("pragma integrity_check").fetchall() == [("ok",)]
    assert conn.execute("select count(*) from t").fetchall() == [(ROWS + 1000,)]
    conn.close()


def test_a_partial_checkpoint_in_another_process_is_not_lost(base_db, remote):
    """A checkpoint that stops at a reader's snapshot syncs nothing; the next checkpointer,
    in another process, must still build on the pages it moved into the delta."""
    path = _cow(base_db)
    conn = vfs.connect(path, base_root=base_db)
    conn.execute("pragma journal_mode=wal").fetchall()
    conn.execute("pragma wal_autocheckpoint=0").fetchall()
    writer, checkpointer = remote(path), remote(path)
    writer.sql("pragma wal_autocheckpoint=0")
    writer.sql("update t set v = randomblob(200) where k % 2 = 0")
    conn.execute("begin")
    assert _rows(conn)[0][0] == ROWS  # holds a snapshot: checkpoints stop there
    writer.sql("update t set v = randomblob(300) where k % 3 = 0")
    busy, log, done = checkpointer.sql("pragma wal_checkpoint(passive)")[0]
    assert 0 < done < log
    conn.execute("commit")
    assert conn.execute("pragma wal_checkpoint(truncate)").fetchall()[0][0] == 0
    want = writer.sql("select count(*), total(k), sum(length(v)) from t")
    checkpointer.close()
    assert _rows(conn) == want
    assert conn.execute("pragma integrity_check").fetchall() == [("ok",)]
    conn.close()
    writer.close()
    conn = vfs.connect(path, base_root=base_db)
    assert _rows(conn) == want and conn.execute("pragma integrity_check").fetchall() == [("ok",)]


@pytest.mark.parametrize("synchronous", ["full", "off"])
def test_a_commit_syncs_the_delta_and_the_map_as_asked(base_db, monkeypatch, synchronous):
    """synchronous=full: the commit's xSync makes delta and map durable (fdatasync, then
    fsync of the map and its directory); off: no sync at all, but the map is replaced, so
    another process sees the commit."""
    path = _cow(base_db)
    conn = vfs.connect(path, base_root=base_db)
    conn.execute(f"pragma synchronous={synchronous}").fetchall()
    conn.execute("select count(*) from t").fetchall()
    calls = []
    for name in ("fsync", "fdatasync"):
        real = getattr(__import__("os"), name)
        monkeypatch.setattr(f"os.{name}", lambda fd, real=real, name=name: (calls.append(name), real(fd))[1])
    map_before = cowmap.read(cowmap.map_path(path))
    with conn:
        conn.execute("update t set v = x'05' where k < 50")
    assert cowmap.read(cowmap.map_path(path)).bits != map_before.bits
    if synchronous == "full":
        assert calls.count("fdatasync") >= 1 and calls.count("fsync") >= 2
        assert calls.index("fdatasync") < calls.index("fsync")
    else:
        assert calls == []
    conn.close()


def test_a_shrinking_checkpoint_without_sync_is_seen_by_the_next_checkpointer(base_db, remote):
    """WAL with synchronous=off (the listings): a checkpoint that shrinks the file syncs
    nothing; the next checkpoint, in another process, builds on the shrunk map."""
    path = _cow(base_db)
    conn = vfs.connect(path, base_root=base_db)
    conn.execute("pragma journal_mode=wal").fetchall()
    conn.execute("pragma synchronous=off").fetchall()
    with conn:
        conn.execute("delete from t where k > 100")
    conn.execute("vacuum")
    conn.execute("pragma wal_checkpoint(truncate)").fetchall()
    assert path.stat().st_size > 0
    other = remote(path)
    other.sql("pragma synchronous=off")
    other.sql("insert into t select k + 1000, randomblob(100) from t")
    other.sql("pragma wal_checkpoint(truncate)")
    assert _rows(conn) == other.sql("select count(*), total(k), sum(length(v)) from t")
    assert conn.execute("pragma integrity_check").fetchall() == [("ok",)]
    conn.close()


def test_an_immutable_cow_database_needs_no_shm(base_db):
    """A published generation's file is opened immutable: no -wal, -shm or journal beside it
    (a read-only share), even over a WAL-mode base."""
    conn = apsw.Connection(str(base_db / "gen/base.db"))
    conn.execute("pragma journal_mode=wal").fetchall()
    conn.close()
    path = _cow(base_db, "gen/g2.db")
    conn = vfs.connect(path, base_root=base_db, flags=apsw.SQLITE_OPEN_READONLY, immutable=True)
    assert _rows(conn)[0][0] == ROWS
    conn.close()
    assert sorted(p.name for p in (base_db / "gen").iterdir()) == [
        ".wh..wh..nixfs-cow.g2.db", "base.db", "g2.db"]


def test_a_cow_database_below_a_symlinked_folder(base_db):
    """SQLite's unix VFS reports a resolved symlink as SQLITE_OK_SYMLINK, which apsw takes
    for an error: the VFS resolves the path itself (fsck opens /proc/self/fd/N/NAME)."""
    path = _cow(base_db)
    (base_db / "alias").symlink_to("up")
    conn = vfs.connect(base_db / "alias/db", base_root=base_db)
    assert _rows(conn)[0][0] == ROWS
    conn.close()
    fd = os.open(base_db / "up", os.O_RDONLY | os.O_DIRECTORY)
    try:
        conn = vfs.connect(f"/proc/self/fd/{fd}/db", base_root=base_db)
        with conn:
            conn.execute("insert into t values (-9, x'09')")
        conn.close()
    finally:
        os.close(fd)
    assert _rows(vfs.connect(path, base_root=base_db))[0][0] == ROWS + 1


def test_a_forked_child_starts_with_no_shared_files(base_db):
    path = _cow(base_db)
    conn = vfs.connect(path, base_root=base_db)
    assert _rows(conn)[0][0] == ROWS and shared.open_count() == 1
    pid = os.fork()
    if pid == 0:  # the child: its own connection, its own CowFile
        try:
            child = vfs.connect(path, base_root=base_db)
            ok = shared.open_count() == 1 and _rows(child)[0][0] == ROWS
            child.close()
            os._exit(0 if ok and shared.open_count() == 0 else 1)
        finally:
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert shared.open_count() == 1
    conn.close()
    assert shared.open_count() == 0


def _catalog_like(root, rows: int = 600):
    """gen/cat.db: a table as a catalog's (without rowid, records of 2-3 KiB: past what
    SQLite keeps of a record in its page), and a fresh COW file over it."""
    conn = apsw.Connection(str(root / "gen/cat.db"))
    conn.execute("create table listings (key blob primary key, data blob not null) without rowid")
    rng = random.Random(5)
    with conn:
        conn.executemany("insert into listings values (?, ?)",
                         ((b"%06d" % i, rng.randbytes(rng.randrange(2000, 3000))) for i in range(rows)))
    conn.close()
    return _cow(root, "up/cat.db", "gen/cat.db")


def _base_preads(monkeypatch, root) -> list:
    """Every pread on gen/cat.db's descriptors from now on (the base: what reaches the lower)."""
    reads, real = [], os.pread

    def pread(fd, n, offset):
        if os.readlink(f"/proc/self/fd/{fd}").endswith("gen/cat.db"):
            reads.append(n)
        return real(fd, n, offset)
    monkeypatch.setattr(os, "pread", pread)
    return reads


@pytest.mark.parametrize("cached", [False, True])
def test_a_base_cache_reads_the_base_in_chunks(base_db, monkeypatch, cached):
    """Records larger than a page are read past SQLite's page cache, one pread (a lower
    round trip) each; with a base cache the base is read in chunks, once."""
    path = _catalog_like(base_db)
    expected = apsw.Connection(str(base_db / "gen/cat.db")).execute(
        "select key, data from listings order by key").fetchall()
    reads = _base_preads(monkeypatch, base_db)
    from nixfs.cow.readcache import ReadCache
    wrap = (lambda base: ReadCache(base, limit=4 << 20)) if cached else None
    conn = vfs.connect(path, base_root=base_db, wrap_base=wrap)
    got = [conn.execute("select key, data from listings where key = ?", (key,)).fetchone()
           for key, _ in expected]
    conn.close()
    assert got == expected
    chunks = -(-(base_db / "gen/cat.db").stat().st_size // (128 * 1024))
    if cached:
        assert len(reads) <= chunks  # each chunk once
    else:
        assert len(reads) > len(expected)  # what the cache is for


def test_a_read_cache_reads_what_its_base_holds(tmp_path):
    from nixfs.cow.bases import ReadOnlyFile
    from nixfs.cow.readcache import ReadCache
    data = random.Random(7).randbytes(300_000)
    (tmp_path / "f").write_bytes(data)

    class Short(ReadOnlyFile):  # a base that answers at most 1000 bytes a read, as NFS may
        def pread(self, n, offset):
            return super().pread(min(n, 1000), offset)

    for base in (ReadOnlyFile.open(tmp_path / "f"), Short(os.open(tmp_path / "f", os.O_RDONLY))):
        cache = ReadCache(base, chunk=4096, limit=3 * 4096)
        rng = random.Random(8)
        for _ in range(500):
            offset, n = rng.randrange(0, 310_000), rng.randrange(1, 20_000)
            assert cache.pread(n, offset) == data[offset:offset + n]
        assert cache.size() == len(data)
        assert len(cache._chunks) <= 3
        cache.close()
