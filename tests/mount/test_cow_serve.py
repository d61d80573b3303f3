"""A copy-on-write upper file (a delta and its map over a base in the lower) is served
through the mount as an ordinary file: its content and size, a stock SQLite's use of it
(WAL, checkpoint, VACUUM), Nix 2.8 on a COW db, and rename, link and unlink of it."""

import errno
import json
import os
import subprocess

import pytest
from cowlayers import (BASE_REL, DB_REL, ROWS, cow_layers, make_base, make_cow,  # noqa: F401
                       map_path, sha256, sqlite)
from harness import NixfsMount, run_nixfs
from nixlower import Store, built_lower  # noqa: F401 (fixtures)


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
