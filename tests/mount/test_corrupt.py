"""A damaged nixfs state folder, merged database, lower index or lower database:
the mount is refused with a one-line reason, or mounts and says what is wrong
(log, ``nixfs status``); the daemon never dies mid-run and no upper data is lost."""

import os
import time

import pytest
from conftest import needs_root
from harness import NixfsMount, run_nixfs
from relharness import TolerantMount, status, synthetic_store


def _mount(lower, upper, mnt, *args):
    return run_nixfs("mount", "--lower", lower, "--upper", upper, "--log", mnt.parent / "log",
                     *args, mnt, timeout=120)


def _plain(tmp_path):
    lower, upper, mnt = tmp_path / "lower", tmp_path / "upper", tmp_path / "mnt"
    for d in (lower, upper, mnt):
        d.mkdir()
    (lower / "f").write_bytes(b"lower\n")
    (upper / "mine").write_bytes(b"upper data\n")
    (tmp_path / "decoy").write_bytes(b"host file\n")
    return lower, upper, mnt


def _damage(kind, upper, decoy):
    state = upper / ".nixfs"
    if kind == "state-is-a-file":
        state.write_bytes(b"junk")
        return
    (state / "work").mkdir(parents=True)
    if kind == "work-is-a-symlink":
        (state / "work").rmdir()
        os.symlink(decoy.parent, state / "work")
    elif kind in ("lock", "nixfs.log", "format"):
        os.symlink(decoy, state / kind)
    elif kind == "unknown-format":
        (state / "format").write_bytes(b"99\n")


@needs_root
@pytest.mark.parametrize("kind", ["state-is-a-file", "work-is-a-symlink", "lock", "nixfs.log",
                                  "format", "unknown-format"])
def test_damaged_state_folder_is_refused(tmp_path, kind):
    lower, upper, mnt = _plain(tmp_path)
    decoy = tmp_path / "decoy"
    _damage(kind, upper, decoy)
    proc = _mount(lower, upper, mnt, "--no-nix")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("nixfs: ") and len(proc.stderr.strip().splitlines()) == 1
    assert ".nixfs" in proc.stderr or "format" in proc.stderr, proc.stderr
    assert not os.path.ismount(mnt)
    assert (upper / "mine").read_bytes() == b"upper data\n"
    assert decoy.read_bytes() == b"host file\n"


def test_leftovers_in_the_work_folder_are_removed(tmp_path):
    lower, upper, mnt = _plain(tmp_path)
    (upper / ".nixfs/work/tmp.1.1/d").mkdir(parents=True)
    (upper / ".nixfs/work/tmp.1.2").write_bytes(b"half a copy")
    with NixfsMount(lower, upper, mnt, extra_args=["--no-nix"]) as m:
        assert os.listdir(upper / ".nixfs/work") == []
        assert (mnt / "mine").read_bytes() == b"upper data\n"
    assert "removed 2 leftovers" in m.log_text()


@pytest.fixture
def store(tmp_path):
    """A synthetic Nix store lower, mounted once (so the merged database exists) with
    an upper file written through the mount."""
    lower = tmp_path / "L/nix"
    names = synthetic_store(lower, 6)
    upper, mnt = tmp_path / "upper", tmp_path / "M/nix"
    upper.mkdir()
    mnt.mkdir(parents=True)
    with NixfsMount(lower, upper, mnt):
        (mnt / "mine").write_bytes(b"upper data\n")
    return lower, upper, mnt, names


def _clobber(db, data: bytes) -> None:
    """Replace an SQLite file (and drop its WAL) with *data*."""
    for suffix in ("-wal", "-shm"):
        if os.path.exists(str(db) + suffix):
            os.unlink(str(db) + suffix)
    db.write_bytes(data)


def _store_works(mnt, names):
    assert (mnt / "store" / names[1] / "bin" / names[1]).read_bytes() == names[1].encode() * 3
    assert (mnt / "mine").read_bytes() == b"upper data\n"


@needs_root
def test_damaged_merged_database_is_refused_and_kept(store):
    lower, upper, mnt, names = store
    db = upper / "var/nix/db/db.sqlite"
    _clobber(db, b"not a database" * 1000)
    proc = _mount(lower, upper, mnt)
    assert proc.returncode == 1 and "merged store database" in proc.stderr, proc.stderr
    assert not os.path.ismount(mnt)
    assert db.read_bytes() == b"not a database" * 1000  # nothing overwritten: Nix's own rows
    assert (upper / "mine").read_bytes() == b"upper data\n"


@needs_root
def test_damaged_lower_index_is_rebuilt(store):
    lower, upper, mnt, names = store
    index = upper / ".nixfs/lower-index.sqlite"
    _clobber(index, b"\0garbage" * 4096)
    with NixfsMount(lower, upper, mnt) as m:
        _store_works(mnt, names)
    assert "damaged" in m.log_text()


@needs_root
@pytest.mark.parametrize("damage", ["garbage", "schema"])
def test_bad_lower_database_on_a_first_mount_is_refused(tmp_path, damage):
    lower = tmp_path / "L/nix"
    synthetic_store(lower, 4)
    if damage == "garbage":
        (lower / "var/nix/db/db.sqlite").write_bytes(b"garbage" * 1000)
    else:
        (lower / "var/nix/db/schema").write_text("99")
    upper, mnt = tmp_path / "upper", tmp_path / "M/nix"
    upper.mkdir()
    mnt.mkdir(parents=True)
    (upper / "mine").write_bytes(b"upper data\n")
    proc = _mount(lower, upper, mnt)
    assert proc.returncode == (2 if damage == "schema" else 1), proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert ("schema version 99" if damage == "schema" else "store database") in proc.stderr
    assert not os.path.ismount(mnt)
    assert (upper / "mine").read_bytes() == b"upper data\n"


@needs_root
def test_lower_database_damaged_later_degrades_visibly(store):
    lower, upper, mnt, names = store
    db = lower / "var/nix/db/db.sqlite"
    good = db.read_bytes()
    db.write_bytes(b"garbage" * 1000)
    with TolerantMount(lower, upper, mnt) as m:  # a remount: the merged database is served
        _store_works(mnt, names)
        assert "cannot read the lower store's database" in m.log_text()
        deadline = time.monotonic() + 5
        while status(mnt)["nix"]["sync_errors"] == 0 and time.monotonic() < deadline:
            time.sleep(0.2)
        s = status(mnt)["nix"]
        assert s["sync_errors"] > 0 and s["last_sync_error"]
        (mnt / "more").write_bytes(b"still writable\n")
        db.write_bytes(good)  # repaired: following the lower resumes
        run_nixfs("sync", mnt, check=True, timeout=60)
        assert status(mnt)["nix"]["last_sync_age_s"] < 2
        _store_works(mnt, names)
    errors = [line for line in m.log_text().splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "cannot read the lower store's database" in errors[0]
    assert (upper / "more").read_bytes() == b"still writable\n"
