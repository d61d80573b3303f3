"""A merged database built over a published generation, as the daemon prepares it before
mounting: through the nixfs-cow VFS, on synthetic stores (tests/mount/test_generation.py
runs a real Nix on such an upper through the mount)."""

import json
import logging
import os
import shutil

import apsw
import pytest
from harness import run_nixfs
from nixstore import fake_hash, generate_db

from nixfs.nixdb import cowfiles, rootfill
from nixfs.nixdb.gcroot import root_path
from nixfs.nixdb.lowerindex import LowerIndex
from nixfs.nixdb.merged import open_db
from nixfs.nixdb.sync import StoreSync
from nixfs.overlay.state import UpperState

COUNT = 300
COW_FILES = ("var/nix/db/db.sqlite", ".nixfs/lower-index.sqlite", ".nixfs/listings.sqlite")


@pytest.fixture
def lower(tmp_path):
    """A synthetic schema-10 store: COUNT paths, each with its directory."""
    lower = tmp_path / "lower"
    generate_db(lower / "var/nix/db/db.sqlite", COUNT, store_dirs=lower / "store")
    return lower


@pytest.fixture
def upper(tmp_path):
    upper = tmp_path / "upper"
    upper.mkdir()
    return upper


def lower_paths(lower) -> list[str]:
    conn = apsw.Connection(str(lower / "var/nix/db/db.sqlite"))
    try:
        return [p for (p,) in conn.execute("select path from ValidPaths order by id")]
    finally:
        conn.close()


def publish(lower, *args) -> None:
    proc = run_nixfs("publish", *args, lower)
    assert proc.returncode == 0, proc.stderr


def prepare(lower, upper, **kw) -> StoreSync:
    """What a mount does before it goes live (the state folder taken, the work folder
    emptied), without mounting."""
    state = UpperState.open(str(upper))
    try:
        state.lock()
        state.recover()
        sync = StoreSync(str(lower), str(upper), str(upper / ".nixfs"), **kw)
        sync.prepare()
        sync.index.close()
        return sync
    finally:
        state.close()


def db(lower, upper):
    return open_db(str(upper / "var/nix/db/db.sqlite"), cow_root=str(lower))


def valid(lower, upper) -> set[str]:
    conn = db(lower, upper)
    try:
        return {p for (p,) in conn.execute("select path from ValidPaths")}
    finally:
        conn.close()


def recorded(upper) -> int | None:
    try:
        return json.loads((upper / ".nixfs/generation").read_text())["generation"]
    except FileNotFoundError:
        return None


def is_cow(upper, rel: str) -> bool:
    return cowfiles.is_cow(str(upper / rel))


def allocated(top) -> int:
    total = 0
    for dirpath, dirnames, filenames in os.walk(top):
        for name in filenames + dirnames:
            total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
    return total


def add_lower_path(lower, i: int) -> str:
    """A new lower path (the next id), referring to the first path."""
    conn = apsw.Connection(str(lower / "var/nix/db/db.sqlite"))
    try:
        path = f"/nix/store/{fake_hash(i, 'new')}-added{i}"
        with conn:
            conn.execute("insert into ValidPaths (path, hash, registrationTime, narSize) "
                         "values (?, 'sha256:00', 1, 1)", (path,))
            new_id = conn.last_insert_rowid()
            conn.execute("insert into Refs values (?, 1)", (new_id,))
        (lower / "store" / os.path.basename(path)).mkdir()
        return path
    finally:
        conn.close()


def delete_lower_path(lower, path: str) -> None:
    conn = apsw.Connection(str(lower / "var/nix/db/db.sqlite"))
    try:
        with conn:
            (i,) = conn.execute("select id from ValidPaths where path = ?", (path,)).fetchone()
            assert not conn.execute("select 1 from Refs where reference = ? and referrer != ?",
                                    (i, i)).fetchall(), "a path something refers to"
            conn.execute("delete from Refs where referrer = ?", (i,))
            conn.execute("delete from ValidPaths where id = ?", (i,))
    finally:
        conn.close()


def add_own_path(lower, upper, name: str, reference: str) -> str:
    """A path built in the upper (its directory there, its row in the merged database)."""
    path = f"/nix/store/{fake_hash(0, name)}-{name}"
    (upper / "store" / os.path.basename(path)).mkdir(parents=True)
    conn = db(lower, upper)
    try:
        with conn:
            conn.execute("insert into ValidPaths (path, hash, registrationTime, narSize) "
                         "values (?, 'sha256:11', 2, 2)", (path,))
            own = conn.last_insert_rowid()
            (ref,) = conn.execute("select id from ValidPaths where path = ?",
                                  (reference,)).fetchone()
            conn.execute("insert into Refs values (?, ?)", (own, ref))
    finally:
        conn.close()
    return path


def references(lower, upper, path: str) -> set[str]:
    conn = db(lower, upper)
    try:
        return {p for (p,) in conn.execute(
            "select v.path from Refs r join ValidPaths v on v.id = r.reference join ValidPaths "
            "o on o.id = r.referrer where o.path = ?", (path,))}
    finally:
        conn.close()


def test_a_fresh_upper_is_built_over_the_generation(lower, upper, tmp_path):
    publish(lower)
    sync = prepare(lower, upper)
    assert recorded(upper) == 1 and sync.generation["generation"] == 1
    assert all(is_cow(upper, rel) for rel in COW_FILES)
    paths = lower_paths(lower)
    assert valid(lower, upper) == set(paths) | {root_path()}
    assert references(lower, upper, root_path()) == set(paths)
    index = LowerIndex(str(upper / ".nixfs/lower-index.sqlite"), cow_root=str(lower))
    try:
        assert index.count() == COUNT and index.not_shown_count() == 0
        assert not rootfill.unfinished(index)  # nothing left to do once mounted
    finally:
        index.close()
    copied = tmp_path / "copied"
    copied.mkdir()
    prepare(lower, copied, generation="off")
    assert recorded(copied) is None and not any(is_cow(copied, rel) for rel in COW_FILES)
    assert allocated(upper / "var/nix/db") * 4 < allocated(copied / "var/nix/db")


def test_lower_changes_since_the_generation_are_caught_up(lower, upper):
    publish(lower)
    gone = lower_paths(lower)[-1]  # nothing refers to the newest path
    added = add_lower_path(lower, 1)
    delete_lower_path(lower, gone)
    prepare(lower, upper)
    now = valid(lower, upper)
    assert added in now and gone not in now
    assert added in references(lower, upper, root_path())


def test_what_the_upper_hides_leaves_and_its_own_rows_come_along(lower, upper):
    publish(lower)
    prepare(lower, upper)
    mine = add_own_path(lower, upper, "mine", lower_paths(lower)[3])
    hidden = lower_paths(lower)[-1]
    (upper / "store" / (".wh." + os.path.basename(hidden))).touch()
    for rel in COW_FILES[1:]:  # the index lost: the next mount builds anew, adopting
        cowfiles.remove(str(upper / rel))
    prepare(lower, upper)
    now = valid(lower, upper)
    assert mine in now and hidden not in now
    assert references(lower, upper, mine) == {lower_paths(lower)[3]}


def test_a_newer_generation_is_rebased_onto(lower, upper, caplog):
    publish(lower)
    prepare(lower, upper)
    mine = add_own_path(lower, upper, "mine", lower_paths(lower)[0])
    added = add_lower_path(lower, 1)
    publish(lower)
    caplog.set_level(logging.INFO)
    prepare(lower, upper)
    assert recorded(upper) == 2
    assert "rebasing the merged database from generation 1 onto generation 2" in caplog.text
    now = valid(lower, upper)
    assert {mine, added} <= now and set(lower_paths(lower)) <= now
    assert references(lower, upper, mine) == {lower_paths(lower)[0]}


def test_a_pruned_base_takes_the_rows_of_the_last_unmount(lower, upper, caplog):
    publish(lower)
    sync = prepare(lower, upper)
    mine = add_own_path(lower, upper, "mine", lower_paths(lower)[0])
    sync.keep_own_rows()  # what a clean unmount does
    assert (upper / ".nixfs/own-rows.sqlite").exists()
    publish(lower, "--force", "--full", "--keep", "1")  # whole: generation 1 is no base
    assert not (lower / "var/nixfs/generations/1").exists()
    prepare(lower, upper)
    assert recorded(upper) == 2
    assert mine in valid(lower, upper)
    assert references(lower, upper, mine) == {lower_paths(lower)[0]}
    assert "from their copy (own-rows.sqlite)" in caplog.text


def test_a_pruned_base_with_no_generation_left_is_copied(lower, upper, caplog):
    publish(lower)
    sync = prepare(lower, upper)
    mine = add_own_path(lower, upper, "mine", lower_paths(lower)[0])
    sync.keep_own_rows()
    shutil.rmtree(lower / "var/nixfs/generations")
    prepare(lower, upper)
    assert recorded(upper) is None and not any(is_cow(upper, rel) for rel in COW_FILES)
    assert mine in valid(lower, upper) and set(lower_paths(lower)) <= valid(lower, upper)
    assert not (upper / ".nixfs/own-rows.sqlite").exists()
    assert "copying the lower's database" in caplog.text


def test_a_tampered_manifest_is_not_used(lower, upper, caplog):
    publish(lower)
    manifest = lower / "var/nixfs/generations/1/manifest.json"
    data = json.loads(manifest.read_text())
    data["lower_db"]["max_id"] -= 1
    manifest.write_text(json.dumps(data))
    prepare(lower, upper)
    assert recorded(upper) is None and not any(is_cow(upper, rel) for rel in COW_FILES)
    assert set(lower_paths(lower)) <= valid(lower, upper)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "generation" in warnings[0].getMessage()


def test_generation_off_copies(lower, upper):
    publish(lower)
    prepare(lower, upper, generation="off")
    assert recorded(upper) is None and not any(is_cow(upper, rel) for rel in COW_FILES)


def test_a_copied_upper_is_never_converted(lower, upper):
    prepare(lower, upper)  # no generation yet: copied
    inode = os.stat(upper / "var/nix/db/db.sqlite").st_ino
    mine = add_own_path(lower, upper, "mine", lower_paths(lower)[0])
    publish(lower)
    prepare(lower, upper)
    assert recorded(upper) is None and os.stat(upper / "var/nix/db/db.sqlite").st_ino == inode
    assert mine in valid(lower, upper)


def test_a_build_cut_short_before_its_commit_starts_over(lower, upper, monkeypatch):
    """A crash between the old index's removal and the new one's rename (the commit
    point): the next mount has no index, builds anew and adopts from the database in place."""
    publish(lower)
    prepare(lower, upper)
    mine = add_own_path(lower, upper, "mine", lower_paths(lower)[0])
    add_lower_path(lower, 1)
    publish(lower)
    real_install = cowfiles.install

    def crash_at_commit(tmp, final):
        if final.endswith("lower-index.sqlite"):
            raise OSError("crash")
        real_install(tmp, final)

    monkeypatch.setattr(cowfiles, "install", crash_at_commit)
    with pytest.raises(OSError):
        prepare(lower, upper)
    monkeypatch.setattr(cowfiles, "install", real_install)
    assert not (upper / ".nixfs/lower-index.sqlite").exists()
    prepare(lower, upper)
    assert recorded(upper) == 2 and mine in valid(lower, upper)


def test_an_upper_reached_through_a_symlink(lower, upper, tmp_path):
    """SQLite resolves symlinks in a database's path (an upper below a symlinked folder,
    fsck's /proc/self/fd/N/NAME): the VFS does too."""
    publish(lower)
    link = tmp_path / "link"
    link.symlink_to(tmp_path)
    prepare(lower, link / "upper")
    assert recorded(upper) == 1 and set(lower_paths(lower)) <= valid(lower, link / "upper")


def test_a_damaged_index_map_is_rebuilt_over_the_generation(lower, upper, caplog):
    publish(lower)
    prepare(lower, upper)
    mine = add_own_path(lower, upper, "mine", lower_paths(lower)[0])
    (upper / ".nixfs/.wh..wh..nixfs-cow.lower-index.sqlite").write_bytes(b"garbage")
    prepare(lower, upper)
    assert "damaged" in caplog.text
    assert recorded(upper) == 1 and mine in valid(lower, upper)
