"""The name of a lower database's state (nixfs/nixdb/dbstate.py), and the catch-up that
skips the lower's row count where the live lower still has the name the generation (or
the last catch-up) recorded: it must skip it only then, and never miss a deletion."""

import json
import os

import apsw
import pytest
from nixstore import generate_db

from nixfs.nixdb import dbstate
from nixfs.nixdb.lowerindex import LowerIndex
from nixfs.nixdb.merged import open_db
from nixfs.nixdb.snapshot import Snapshot
from nixfs.nixdb.sync import StoreSync
from nixfs.overlay.state import UpperState
from nixfs.publish import manifest as manifest_file
from nixfs.publish.publisher import publish
from nixfs.publish.verify import find_usable

COUNT = 200
COUNTING = "count(*) from validpaths"


def name_of(path) -> dict | None:
    with Snapshot(str(path)) as snap:
        return dbstate.of(snap)


@pytest.fixture
def not_racy(monkeypatch):
    """Files written by the test a moment ago count as settled (the rule itself is
    tested on its own below)."""
    monkeypatch.setattr(dbstate, "RACY_NS", 0)


@pytest.fixture
def wal_db(tmp_path):
    """A WAL database whose writer keeps its connection (and so the WAL) open, as
    nix-daemon does, and never checkpoints."""
    path = tmp_path / "db.sqlite"
    w = apsw.Connection(str(path))
    w.execute("pragma journal_mode=wal").fetchall()
    w.execute("pragma wal_autocheckpoint=0").fetchall()
    w.execute("create table t (id integer primary key, v text)")
    with w:
        w.executemany("insert into t (v) values (?)", (("x",) for _ in range(50)))
    yield path, w
    w.close()


def test_a_writer_keeping_its_wal_open_changes_the_name_not_the_header(wal_db):
    path, w = wal_db
    before, header = name_of(path), path.read_bytes()[:100]
    assert before is not None and before["wal"] is not None  # committed frames: no racy rule
    assert name_of(path) == before  # nothing changed: the same name
    w.execute("delete from t where id = 7")
    assert path.read_bytes()[:100] == header  # the main file did not move...
    after = name_of(path)
    assert after != before and not dbstate.same(dbstate.encode(before), after)  # ...the WAL did
    w.execute("update t set v = 'y' where id = 8")
    assert name_of(path) != after


def test_a_checkpoint_renames_an_unchanged_state(wal_db):
    """Conservative: the rows are the same, but the main file changed (one count more)."""
    path, w = wal_db
    before = name_of(path)
    w.execute("pragma wal_checkpoint(truncate)").fetchall()
    assert name_of(path) != before


def test_a_rollback_mode_commit_changes_the_name(tmp_path, not_racy):
    path = tmp_path / "db.sqlite"
    conn = apsw.Connection(str(path))
    conn.execute("create table t (id integer primary key)")
    before = name_of(path)
    assert before is not None and before["wal"] is None
    assert dbstate.same(dbstate.encode(before), name_of(path))
    conn.execute("insert into t values (1)")
    assert not dbstate.same(dbstate.encode(before), name_of(path))
    conn.close()


def test_a_main_file_written_a_moment_ago_gets_no_name(tmp_path):
    """Without committed frames, a write in the same clock tick as the one before could
    leave everything the name holds as it was: no name, the count is done."""
    path = tmp_path / "db.sqlite"
    conn = apsw.Connection(str(path))
    conn.execute("create table t (id integer primary key)")
    conn.close()
    assert name_of(path) is None
    assert not dbstate.same(None, None) and not dbstate.same("not json", None)


# ---------------------------------------------------------------------- the catch-up


@pytest.fixture
def lower(tmp_path):
    """A synthetic store whose database a writer keeps open (its WAL holds the commits
    after the generation, as nix-daemon's does)."""
    lower = tmp_path / "lower"
    generate_db(lower / "var/nix/db/db.sqlite", COUNT, store_dirs=lower / "store")
    return lower


@pytest.fixture
def writer(lower):
    w = apsw.Connection(str(lower / "var/nix/db/db.sqlite"))
    w.execute("pragma wal_autocheckpoint=0").fetchall()
    yield w
    w.close()


@pytest.fixture
def statements(monkeypatch):
    """Every SQL statement any connection runs from now on, lowercased."""
    seen = []

    def hook(conn):
        conn.exec_trace = lambda cursor, sql, bindings: seen.append(sql.lower()) or True

    monkeypatch.setattr(apsw, "connection_hooks", [hook])
    return seen


def prepare(lower, upper) -> set[str]:
    """What a mount does before it goes live; the valid paths of the merged database."""
    upper.mkdir(exist_ok=True)
    state = UpperState.open(str(upper))
    try:
        state.lock()
        state.recover()
        sync = StoreSync(str(lower), str(upper), str(upper / ".nixfs"))
        sync.prepare()
        sync.index.close()
    finally:
        state.close()
    conn = open_db(str(upper / "var/nix/db/db.sqlite"), cow_root=str(lower))
    try:
        return {p for (p,) in conn.execute("select path from ValidPaths")}
    finally:
        conn.close()


def unreferenced_path(writer) -> str:
    """A path nothing refers to, not the newest (its deletion leaves the max id)."""
    return writer.execute(
        "select path from ValidPaths v where id < (select max(id) from ValidPaths) and not "
        "exists (select 1 from Refs where reference = v.id and referrer != v.id) "
        "order by id desc").fetchone()[0]


def delete(writer, path: str) -> None:
    with writer:
        (i,) = writer.execute("select id from ValidPaths where path = ?", (path,)).fetchone()
        writer.execute("delete from Refs where referrer = ?", (i,))
        writer.execute("delete from ValidPaths where id = ?", (i,))


def recorded_state(lower, upper):
    index = LowerIndex(str(upper / ".nixfs/lower-index.sqlite"), cow_root=str(lower))
    try:
        return index.get("lower_state")
    finally:
        index.close()


def test_a_fresh_upper_over_an_unchanged_lower_skips_the_count(lower, writer, tmp_path,
                                                               statements, not_racy):
    publish(str(lower))
    m = json.loads((lower / "var/nixfs/generations/1/manifest.json").read_text())
    assert m["lower_db"]["state"] == name_of(lower / "var/nix/db/db.sqlite")
    statements.clear()
    valid = prepare(lower, tmp_path / "fresh")
    assert len(valid) == COUNT + 1  # every lower path, and the GC root
    assert not [s for s in statements if COUNTING in s]


def test_a_deletion_after_the_generation_is_found(lower, writer, tmp_path, statements,
                                                  not_racy):
    publish(str(lower))
    gone = unreferenced_path(writer)
    delete(writer, gone)  # into the WAL the writer keeps open: the main file stays
    statements.clear()
    valid = prepare(lower, tmp_path / "fresh")
    assert gone not in valid and len(valid) == COUNT
    assert [s for s in statements if COUNTING in s]


def test_a_remount_of_an_unchanged_lower_skips_the_count(lower, writer, tmp_path, statements,
                                                         not_racy):
    """A lower whose name changed since the generation but not its paths is counted
    once; that catch-up keeps the new name, so the next mount does not count."""
    publish(str(lower))
    writer.execute("pragma user_version = 7").fetchall()  # a commit: page 1 into the WAL
    upper = tmp_path / "upper"
    statements.clear()
    prepare(lower, upper)
    assert [s for s in statements if COUNTING in s]
    assert dbstate.same(recorded_state(lower, upper), name_of(lower / "var/nix/db/db.sqlite"))
    statements.clear()
    assert len(prepare(lower, upper)) == COUNT + 1
    assert not [s for s in statements if COUNTING in s]
    gone = unreferenced_path(writer)
    delete(writer, gone)
    assert gone not in prepare(lower, upper)


def test_a_manifest_of_an_older_publish_is_counted(lower, writer, tmp_path, statements,
                                                   not_racy):
    """A generation published before the name existed: the catch-up counts, as it did."""
    publish(str(lower))
    gen_dir = lower / "var/nixfs/generations/1"
    m = json.loads((gen_dir / "manifest.json").read_text())
    del m["lower_db"]["state"], m["sha256"]
    manifest_file.write(str(gen_dir), m)
    gone = unreferenced_path(writer)
    delete(writer, gone)
    writer.execute("pragma wal_checkpoint(truncate)").fetchall()
    statements.clear()
    valid = prepare(lower, tmp_path / "fresh")
    assert gone not in valid and len(valid) == COUNT
    assert [s for s in statements if COUNTING in s]


def test_a_lower_changed_a_moment_before_the_publish_gets_no_name(lower, tmp_path):
    """The racy rule at the publisher: generate_db has just written the lower's main
    file (no WAL left), so the manifest has no name and every client counts."""
    publish(str(lower))
    m = json.loads((lower / "var/nixfs/generations/1/manifest.json").read_text())
    assert m["lower_db"]["state"] is None


def test_the_check_of_an_unchanged_lower_looks_nothing_up(lower, writer, statements, not_racy):
    """find_usable's id sample is the generation's own rows when the live lower is in
    the state it was read in; once the lower changed, the sample is looked up again."""
    publish(str(lower))
    looked_up = "select path from validpaths where id = ?"
    statements.clear()
    assert find_usable(str(lower)).number == 1
    assert not [s for s in statements if s == looked_up]
    delete(writer, unreferenced_path(writer))
    statements.clear()
    assert find_usable(str(lower)).number == 1
    assert [s for s in statements if s == looked_up]
