"""kill -9 of the daemon mid-work: nothing torn or lost, fsck clean (see crashloop.py)."""

import json
import os
import sqlite3

import pytest
from crashloop import CrashLoop
from harness import run_nixfs
from nixlower import Store, built_lower  # noqa: F401 (fixture)


def _loop(tmp_path, built_lower, rounds, seed, generation=False):  # noqa: F811
    base, paths = built_lower
    stats = CrashLoop(tmp_path, base / "L", paths, seed=seed, rounds=rounds,
                      generation=generation).run(rounds)
    print(stats)
    assert stats["rounds"] == rounds
    # The workload really ran into every kind of operation before the kills.
    for op in ("copy-up", "append", "replace", "pwrite", "rename", "nix-add", "hide"):
        assert stats["ops"].get(op, 0) > 0, (op, stats)
    assert stats["worker_left"] == 0, "the database worker outlived its daemon"
    return stats


@pytest.mark.timeout(600)
def test_crash_loop(tmp_path, built_lower):  # noqa: F811
    _loop(tmp_path, built_lower, rounds=50, seed=1)


@pytest.mark.timeout(600)
def test_crash_loop_over_a_generation(tmp_path, built_lower):  # noqa: F811
    """The same loop with the merged database a copy-on-write file over the lower's
    published generation, served through the mount (its map stays beside it)."""
    pytest.importorskip("nixfs.publish", reason="nixfs publish (the publish lane) is needed")
    _loop(tmp_path, built_lower, rounds=12, seed=7, generation=True)
    db = tmp_path / "upper/var/nix/db"
    assert (db / ".wh..wh..nixfs-cow.db.sqlite").exists(), "the loop did not run over a COW db"
    assert (db / "db.sqlite").stat().st_blocks * 512 < 1 << 20


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_crash_loop_long(tmp_path, built_lower):  # noqa: F811
    _loop(tmp_path, built_lower, rounds=400, seed=2)


def test_lower_path_removed_just_before_a_crash_leaves_the_db(tmp_path, built_lower):  # noqa: F811
    """The whiteout of `rm -rf MNT/store/P` is on disk, its database change was queued in
    the daemon's memory when it died: the next mount makes P (and what refers to it)
    invalid, so Nix never trusts a path whose files are hidden."""
    store = Store(tmp_path, built_lower)
    with store.mount():
        pass
    liba = os.path.basename(store.paths["liba"])
    (store.upper / "store" / f".wh.{liba}").touch()  # what the crash left
    with store.mount():
        for path in store.paths.values():  # libb and app refer to liba
            assert not store.valid(path)
            assert not (store.root / path.lstrip("/")).exists()
        assert run_nixfs("unhide", "--mount", store.mnt, liba).returncode == 0
        assert all(store.valid(p) for p in store.paths.values())
    proc = run_nixfs("fsck", "--lower", store.lower, "--upper", store.upper)
    assert proc.returncode == 0, proc.stdout


def test_lower_path_unhidden_just_before_a_crash_is_shown(tmp_path, built_lower):  # noqa: F811
    """An unhide commits the database, then the index: a crash in between left a path
    Nix trusts but the view did not show.  The next mount shows it; fsck finds it before."""
    store = Store(tmp_path, built_lower)
    with store.mount():
        pass
    index = sqlite3.connect(store.upper / ".nixfs/lower-index.sqlite", isolation_level=None)
    index.execute("update paths set state = 1 where name = ?",
                  (os.path.basename(store.paths["liba"]).encode(),))
    index.close()
    proc = run_nixfs("fsck", "--lower", store.lower, "--upper", store.upper, "--json")
    found = [(f["kind"], f["path"]) for f in json.loads(proc.stdout)["findings"]]
    assert proc.returncode == 4 and found == [("row-not-shown", store.paths["liba"])], found
    with store.mount():
        for path in store.paths.values():
            assert store.valid(path) and (store.root / path.lstrip("/")).exists()
    assert run_nixfs("fsck", "--lower", store.lower, "--upper", store.upper).returncode == 0


def test_lower_path_hidden_db_committed_index_not(tmp_path, built_lower):  # noqa: F811
    """A hide commits the database (the path and what refers to it leave), then the
    index: a crash in between left the whiteout and the rows gone, but the index still
    showing all of them.  The next mount must hide what went along too (libb, app refer
    to liba), found from the lower database since the merged one no longer has them."""
    store = Store(tmp_path, built_lower)
    with store.mount():
        pass
    liba = os.path.basename(store.paths["liba"])
    (store.upper / "store" / f".wh.{liba}").touch()  # the whiteout of the hide
    db = sqlite3.connect(store.upper / "var/nix/db/db.sqlite", isolation_level=None)
    ids = [db.execute("select id from ValidPaths where path = ?", (p,)).fetchone()[0]
           for p in store.paths.values()]
    for i in ids:  # what the hide's transaction did (Refs first: on delete restrict)
        db.execute("delete from Refs where reference = ?", (i,))
    for i in ids:
        db.execute("delete from ValidPaths where id = ?", (i,))
    db.close()
    with store.mount():
        for path in store.paths.values():
            assert not store.valid(path)
            assert not (store.root / path.lstrip("/")).exists(), path
        assert run_nixfs("unhide", "--mount", store.mnt, liba).returncode == 0
        for path in store.paths.values():
            assert store.valid(path) and (store.root / path.lstrip("/")).exists(), path
    proc = run_nixfs("fsck", "--lower", store.lower, "--upper", store.upper)
    assert proc.returncode == 0, proc.stdout
