"""`nixfs fsck`: every kind of damage is found, repaired, and a second run is clean."""

import json
import os
import shutil
import sqlite3
import stat
import subprocess

import pytest
from conftest import needs_root
from harness import NixfsMount, run_nixfs, snapshot
from nixstore import nix_build
from nixlower import Store, built_lower  # noqa: F401 (fixture)

WH = ".wh."
OPQ = ".wh..wh..opq"
REDIRECT = ".wh..wh..nixfs-redirect"


def fsck(lower, upper, *args):
    proc = run_nixfs("fsck", "--lower", lower, "--upper", upper, "--json", *args, timeout=120)
    assert "Traceback" not in proc.stderr, proc.stderr
    report = json.loads(proc.stdout) if proc.stdout.startswith("{") else None
    return proc.returncode, report, proc


def kinds(report, severity=None) -> dict:
    out: dict = {}
    for f in report["findings"]:
        if severity is None or f["severity"] == severity:
            out.setdefault(f["kind"], set()).add(f["path"])
    return out


def use(mnt):
    """Changes that write every part of the upper format."""
    os.chmod(mnt / "dir/file", 0o600)                     # copy-up
    (mnt / "top-file").unlink()                           # whiteout
    os.rename(mnt / "dir/sub", mnt / "dir/sub2")          # redirect
    shutil.rmtree(mnt / "store/aaa-pkg")                  # whiteouts below, then above
    (mnt / "store/aaa-pkg").mkdir()                       # whiteout + opaque
    (mnt / "new/deep").mkdir(parents=True)
    (mnt / "new/deep/f").write_text("new\n")
    os.rename(mnt / "dir/ro-file", mnt / "new/moved")


def test_healthy_upper_after_use_is_clean(lower, upper, mnt):
    with NixfsMount(lower, upper, mnt):
        use(mnt)
    code, report, proc = fsck(lower, upper)
    assert code == 0 and report["findings"] == [], proc.stdout
    assert report["checked"]["upper entries"] > 5
    text = run_nixfs("fsck", "--lower", lower, "--upper", upper)
    assert text.returncode == 0 and "nixfs fsck: clean" in text.stdout


def test_refuses_a_mounted_upper_and_bad_usage(lower, upper, mnt, tmp_path):
    with NixfsMount(lower, upper, mnt):
        proc = run_nixfs("fsck", "--lower", lower, "--upper", upper)
        assert proc.returncode == 2, proc
        assert proc.stderr.startswith("nixfs: the upper is in use by a nixfs mount (pid ")
        assert len(proc.stderr.strip().splitlines()) == 1
    proc = run_nixfs("fsck", "--lower", lower, "--upper", tmp_path / "nope")
    assert proc.returncode == 2 and "does not exist" in proc.stderr
    proc = run_nixfs("fsck", "--lower", lower, "--upper", lower / "dir")
    assert proc.returncode == 2 and "overlap" in proc.stderr
    helptext = run_nixfs("fsck", "--help").stdout
    assert "0 clean" in helptext and "1 damage found and all of it repaired" in helptext
    assert "4 damage left" in helptext


@needs_root
def test_every_kind_of_damage_is_found_and_repaired(lower, upper, mnt, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / ".wh.keep").write_text("not ours")        # behind a symlink: never touched
    with NixfsMount(lower, upper, mnt):
        use(mnt)
        for d in ("r", "s", "t"):
            (mnt / d).mkdir()
            (mnt / d / "f").write_text(d)
        (mnt / "link").symlink_to(outside)
        before = snapshot(mnt)
    # A crash and hand edits leave: ...
    work = upper / ".nixfs/work"
    (work / "tmp.123.1").write_bytes(b"half a copy")                    # a copy-up
    (work / "trash.123.2/sub").mkdir(parents=True)                      # a removal
    (work / "trash.123.2/sub/x").write_text("x")
    os.chmod(work / "trash.123.2/sub", 0o500)
    (upper / "dir/sub2" / (REDIRECT + ".tmp")).write_text("/dir/sub")   # a redirect's temporary
    (upper / (WH + "top-file")).write_text("not empty")                  # a bad whiteout ...
    (upper / "dir" / (WH + "ro-file")).unlink()
    (upper / "dir" / (WH + "ro-file")).mkdir()                           # ... and another
    (upper / (WH + "never-was")).touch()                                 # hides nothing
    os.mknod(upper / "gone-too", stat.S_IFCHR | 0o600, 0)                # the same, kernel style
    (upper / "new" / OPQ).touch()                                        # nothing below it
    (upper / "r" / REDIRECT).write_bytes(b"/no/such/dir")                # points nowhere
    (upper / "s" / REDIRECT).symlink_to("/etc")                          # not a file
    (upper / "t" / REDIRECT).write_bytes(b"/../x")                       # no usable path
    (upper / ".nixfs/listings.sqlite").write_bytes(b"garbage" * 100)     # a damaged cache
    os.unlink(upper / ".nixfs/lock")
    (upper / ".nixfs/lock").mkdir()                                      # not a file
    outside_before = snapshot(outside)

    code, report, proc = fsck(lower, upper)
    assert code == 4, proc.stdout
    assert kinds(report, "damage") == {
        "stray-temporary": {"/.nixfs/work/tmp.123.1", "/.nixfs/work/trash.123.2",
                            f"/dir/sub2/{REDIRECT}.tmp"},
        "bad-whiteout": {f"/{WH}top-file", f"/dir/{WH}ro-file"},
        "bad-marker": {f"/s/{REDIRECT}"},
        "bad-redirect": {f"/t/{REDIRECT}"},
        "damaged-cache": {"/.nixfs/listings.sqlite"},
        "state-folder": {"/.nixfs/lock"},
    }, proc.stdout
    assert kinds(report, "harmless") == {
        "redundant-whiteout": {f"/{WH}never-was", "/gone-too"},
        "redundant-opaque": {f"/new/{OPQ}"},
        "dangling-redirect": {f"/r/{REDIRECT}"},
    }, proc.stdout
    assert not any(f["repaired"] for f in report["findings"])

    code, report, proc = fsck(lower, upper, "--repair")
    assert code == 1, proc.stdout
    assert all(f["repaired"] for f in report["findings"]), proc.stdout
    code, report, proc = fsck(lower, upper)
    assert code == 0 and report["findings"] == [], proc.stdout
    assert snapshot(outside) == outside_before
    with NixfsMount(lower, upper, mnt):
        assert snapshot(mnt) == before  # the repairs kept the merged view


def test_a_state_folder_that_is_no_folder_is_not_repaired(lower, upper):
    (upper / ".nixfs").write_text("someone's file")
    for args in ((), ("--repair",)):
        code, report, proc = fsck(lower, upper, *args)
        assert code == 4, proc.stdout
        assert kinds(report) == {"state-folder": {"/.nixfs"}}
    assert (upper / ".nixfs").read_text() == "someone's file"


# ------------------------------------------------------------------ the merged Nix database

@pytest.fixture
def store(tmp_path, built_lower):  # noqa: F811
    return Store(tmp_path, built_lower)


def test_nix_store_upper_after_real_use_is_clean(store):
    with store.mount():
        built = nix_build(store.root, store.expr({"extra": ["liba"]}), "extra")
        src = store.tmp / "added.txt"
        src.write_text("added\n")
        store.q("--add", src)
        shutil.rmtree(store.mnt / "store" / os.path.basename(store.paths["app"]))
        store.wait(lambda: not store.valid(store.paths["app"]), "app invalid")
    code, report, proc = fsck(store.lower, store.upper)
    assert code == 0 and report["findings"] == [], proc.stdout
    assert report["checked"]["database rows"] >= 7
    assert built


def _db(store):
    return sqlite3.connect(store.upper / "var/nix/db/db.sqlite", isolation_level=None)


def test_nix_database_damage_is_found_and_repaired(store):
    with store.mount():
        nix_build(store.root, store.expr({"extra": ["liba"]}), "extra")
    liba, libb, app = (os.path.basename(store.paths[n]) for n in ("liba", "libb", "app"))
    extra = next(p for p in _valid(store) if p.endswith("-extra"))
    junk = f"/nix/store/{'0' * 32}-junk"
    ustore = store.upper / "store"
    # The daemon died between `rm -rf MNT/store/app` (its whiteout) and the database change.
    (ustore / (WH + app)).touch()
    # An upper copy of a lower path (built in both, and the sync that drops it cut short).
    subprocess_cp(store.lower / "store" / liba, ustore / liba)
    # A lower path shown without a row; a dangling reference; an unregistered upper entry.
    db = _db(store)
    db.execute("pragma foreign_keys=off")
    libb_id = db.execute("select id from ValidPaths where path = ?",
                         (store.paths["libb"],)).fetchone()[0]
    db.execute("delete from Refs where referrer = ? or reference = ?", (libb_id, libb_id))
    db.execute("delete from ValidPaths where id = ?", (libb_id,))
    extra_id = db.execute("select id from ValidPaths where path = ?", (extra,)).fetchone()[0]
    db.execute("insert into Refs values (?, 999999)", (extra_id,))
    db.close()
    (ustore / os.path.basename(junk)).mkdir()
    # nixfs' GC root file is gone.
    root = next(p for p in ustore.iterdir() if p.name.endswith("nixfs-lower-roots"))
    root.unlink()

    code, report, proc = fsck(store.lower, store.upper)
    assert code == 4, proc.stdout
    assert kinds(report) == {
        "row-without-files": {store.paths["app"]},
        "shown-without-row": {store.paths["libb"]},
        "db-foreign-keys": {extra},
        "upper-copy-of-lower": {f"/store/{liba}"},
        "gc-root": {f"/nix/store/{root.name}"},
        "unregistered": {junk},
    }, proc.stdout

    code, report, proc = fsck(store.lower, store.upper, "--repair")
    assert code == 1, proc.stdout
    code, report, proc = fsck(store.lower, store.upper)
    # What is left is Nix's GC's job: entries with no row (extra lost its row: a reference
    # of it pointed nowhere, so its closure was incomplete).
    assert code == 0 and kinds(report) == {"unregistered": {junk, extra}}, proc.stdout
    assert not (ustore / liba).exists() and root.exists()
    with store.mount():
        assert store.valid(store.paths["liba"])
        for name in ("libb", "app"):
            path = store.paths[name]
            assert not store.valid(path) and not (store.root / path.lstrip("/")).exists(), name
        assert store.q("--verify", "--check-contents").returncode == 0
        for name in ("libb", "app"):  # nixfs unhide brings them back, in order
            assert run_nixfs("unhide", "--mount", store.mnt, store.paths[name]).returncode == 0
            assert store.valid(store.paths[name])
        assert store.q("--gc").returncode == 0  # the root is back: the lower survives a GC
        assert all(store.valid(p) for p in store.paths.values())
    assert fsck(store.lower, store.upper)[0] == 0


def _valid(store) -> set:
    db = _db(store)
    try:
        return {p for (p,) in db.execute("select path from ValidPaths")}
    finally:
        db.close()


def subprocess_cp(src, dst):
    subprocess.run(["cp", "-a", str(src), str(dst)], check=True)


def test_damaged_index_is_rebuilt_and_a_corrupt_database_is_reported(store):
    with store.mount():
        pass
    index = store.upper / ".nixfs/lower-index.sqlite"
    index.write_bytes(b"\0" * 4096)
    code, report, proc = fsck(store.lower, store.upper, "--repair")
    assert code == 1 and kinds(report) == {"damaged-index": {"/.nixfs/lower-index.sqlite"}}, \
        proc.stdout
    assert fsck(store.lower, store.upper)[0] == 0
    with store.mount():  # rebuilt from the lower and the merged database
        assert store.valid(store.paths["app"])
    assert fsck(store.lower, store.upper)[0] == 0

    dbfile = store.upper / "var/nix/db/db.sqlite"
    db = _db(store)
    db.execute("pragma wal_checkpoint(truncate)")
    db.close()
    data = bytearray(dbfile.read_bytes())
    assert len(data) > 4 * 4096
    page = int.from_bytes(data[16:18], "big")
    for off in range(page, len(data), page):  # every page but the first (the schema)
        data[off:off + page] = os.urandom(page)
    dbfile.write_bytes(bytes(data))
    for args in ((), ("--repair",)):
        code, report, proc = fsck(store.lower, store.upper, *args)
        assert code == 4 and "db-integrity" in kinds(report), proc.stdout
