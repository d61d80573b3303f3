"""nixfs publish on synthetic schema-10 stores: what a generation holds, and its checks."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import apsw
import pytest

TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS))
from nixstore import generate_db, make_store  # noqa: E402

from nixfs.cli import main  # noqa: E402
from nixfs.nixdb import gcroot  # noqa: E402
from nixfs.nixdb.lowerindex import LowerIndex  # noqa: E402
from nixfs.nixdb.storepolicy import listing_key  # noqa: E402
from nixfs.overlay.liststore import ListingStore  # noqa: E402
from nixfs.overlay.layers import Layer  # noqa: E402
from nixfs.publish import manifest as manifest_file  # noqa: E402
from nixfs.publish import prune  # noqa: E402
from nixfs.publish.dbfile import ROOT_ID  # noqa: E402
from nixfs.publish.generations import Generations  # noqa: E402
from nixfs.publish.publisher import publish  # noqa: E402
from nixfs.publish.verify import GenerationError, find_usable, verify  # noqa: E402


def rows(db: str, sql: str) -> list:
    conn = apsw.Connection(db, flags=apsw.SQLITE_OPEN_READONLY)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def same(a, b) -> bool:
    """Listings alike but for access times (reading a directory may set its atime)."""
    def strip(listing):
        return ({n: st._replace(st_atime_ns=0) for n, st in listing.stats()}, listing.targets)
    return a is not None and b is not None and strip(a) == strip(b)


@pytest.fixture
def store(tmp_path):
    root = tmp_path / "S"
    make_store(root)
    return root


def test_a_generation_holds_every_lower_row_and_the_root_references_each(store):
    done = publish(str(store))
    assert done.new and done.number == 1
    gens = Generations(str(store))
    db = gens.file(1, "db.sqlite")
    lower = str(store / "var/nix/db/db.sqlite")
    assert rows(db, "pragma integrity_check") == [("ok",)]
    for table in ("ValidPaths where id < %d" % ROOT_ID, "Refs where referrer < %d" % ROOT_ID,
                  "DerivationOutputs"):
        assert rows(db, f"select * from {table} order by 1, 2") == \
            rows(lower, f"select * from {table.split(' where')[0]} order by 1, 2")
    root = rows(db, f"select path from ValidPaths where id = {ROOT_ID}")
    assert root == [(gcroot.root_path(),)]
    referenced = rows(db, f"select reference from Refs where referrer = {ROOT_ID} order by 1")
    assert referenced == rows(lower, "select id from ValidPaths order by 1")
    listed = set(os.listdir(gens.dir(1)))
    assert listed == {"db.sqlite", "lower-index.sqlite", "listings.sqlite", "manifest.json"}
    for name in ("db.sqlite", "lower-index.sqlite", "listings.sqlite"):
        header = open(gens.file(1, name), "rb").read(20)
        assert header[18:20] == b"\x01\x01"  # rollback mode: no -wal needed to read it


def test_the_index_is_a_finished_first_builds(store, tmp_path):
    publish(str(store))
    gens = Generations(str(store))
    expected = str(tmp_path / "expected.sqlite")
    LowerIndex.create_from(expected, str(store / "var/nix/db/db.sqlite"))
    index = LowerIndex(gens.file(1, "lower-index.sqlite"))
    try:
        assert index.conn.execute("select * from paths order by name").fetchall() == \
            rows(expected, "select * from paths order by name")
        max_id = rows(expected, "select max(lower_id) from paths")[0][0]
        assert {k: index.get(k) for k in ("lower_max_id", "lower_count", "root_refs_upto",
                                          "root_refs_target", "durable", "state", "schema")} \
            == {"lower_max_id": max_id, "lower_count": 300, "root_refs_upto": max_id,
                "root_refs_target": max_id, "durable": 1, "state": "complete", "schema": 10}
        assert index.conn.execute("select 1 from sqlite_master where name = 'paths_lower_id'"
                                  ).fetchone()
    finally:
        index.close()


def test_the_catalog_holds_what_read_listing_reads_under_the_policys_keys(store):
    publish(str(store))
    catalog = ListingStore(Generations(str(store)).file(1, "listings.sqlite"))
    layer = Layer(str(store), name="lower")
    store_fd = layer.open_dir_path(b"store")
    try:
        for name, lower_id, _ in LowerIndex(Generations(str(store)).file(
                1, "lower-index.sqlite")).conn.execute("select * from paths"):
            found, _ = layer.read_listing(store_fd, name, False, 1 << 30)
            for rel, listing in found.items():
                assert same(catalog.get(listing_key(name, lower_id, rel)), listing)
            own = catalog.get_xattrs(listing_key(name, lower_id, b"") + b"\0self")
            assert own == {b".": {}}
        tool_dir = [n for n in os.listdir(store / "store") if (store / "store" / n / "bin").exists()]
        name = tool_dir[0].encode()
        lower_id = LowerIndex(Generations(str(store)).file(1, "lower-index.sqlite")).state(name)[0]
        assert catalog.get_xattrs(listing_key(name, lower_id, b"bin")) == \
            {b"tool": {"user.nixfs-test": b"value"}}
        assert catalog.get(listing_key(name, lower_id, b"")).targets == {b"lib": b"bin"}
        count = catalog.conn.execute("select count(*) from listings").fetchone()[0]
        assert count == 2 * 300 + 3 + 3  # listings and own xattrs, 3 subdirs, 3 non-empty dirs
    finally:
        os.close(store_fd)
        catalog.close()


def test_verify_accepts_a_generation_and_names_its_files(store):
    publish(str(store))
    found = find_usable(str(store))
    gens = Generations(str(store))
    assert found.number == 1 and found.chain == (1,) and not found.rows_deleted
    assert found.db == gens.file(1, "db.sqlite") and found.maps["db.sqlite"] is None
    assert found.manifest_sha256 == manifest_file.load(gens.manifest(1))["sha256"]
    assert found.max_id == 300 and found.count == 300


@pytest.mark.parametrize("damage", ["manifest-byte", "manifest-truncated", "db-truncated",
                                    "catalog-grown", "index-missing"])
def test_verify_refuses_a_damaged_generation(store, damage):
    publish(str(store))
    gens = Generations(str(store))
    m = gens.manifest(1)
    if damage == "manifest-byte":
        text = open(m).read()
        open(m, "w").write(text.replace('"count":300', '"count":301'))
    elif damage == "manifest-truncated":
        os.truncate(m, os.path.getsize(m) // 2)
    elif damage == "db-truncated":
        os.truncate(gens.file(1, "db.sqlite"), 4096)
    elif damage == "catalog-grown":
        with open(gens.file(1, "listings.sqlite"), "ab") as f:
            f.write(b"\0" * 4096)
    else:
        os.unlink(gens.file(1, "lower-index.sqlite"))
    with pytest.raises(GenerationError):
        verify(str(store), 1)
    assert find_usable(str(store)) is None


def test_verify_refuses_another_store_and_accepts_deleted_rows(store):
    publish(str(store))
    lower = str(store / "var/nix/db/db.sqlite")
    conn = apsw.Connection(lower)
    conn.execute("pragma foreign_keys=0")
    with conn:  # rows deleted (a GC of the store): followed live, the generation stays
        conn.execute("delete from Refs where reference in (select id from ValidPaths where id = 1000"
                     " or id % 7 = 0)")
        conn.execute("delete from ValidPaths where id % 7 = 0")
    assert verify(str(store), 1).rows_deleted is False  # no sampled id (only 300 rows)
    with conn:
        conn.execute("update ValidPaths set path = '/nix/store/' || 'x' || substr(path, 12) "
                     "where id = 300")
    with pytest.raises(GenerationError, match="another store"):
        verify(str(store), 1)
    conn.close()


def test_a_sampled_row_deleted_is_fine_a_changed_one_is_not(tmp_path):
    root = tmp_path / "S"
    (root / "store").mkdir(parents=True)
    generate_db(root / "var/nix/db/db.sqlite", 2500, refs=0, store_dirs=root / "store")
    publish(str(root))
    conn = apsw.Connection(str(root / "var/nix/db/db.sqlite"))
    with conn:
        conn.execute("delete from DerivationOutputs where drv = 1000")
        conn.execute("delete from ValidPaths where id = 1000")
    assert verify(str(root), 1).rows_deleted is True
    with conn:
        conn.execute("update ValidPaths set path = path || 'x' where id = 2000")
    with pytest.raises(GenerationError, match="at id 2000: another store"):
        verify(str(root), 1)
    conn.close()


def test_an_unchanged_store_gets_no_new_generation_and_a_changed_one_does(store):
    assert publish(str(store)).number == 1
    again = publish(str(store))
    assert not again.new and again.number == 1
    conn = apsw.Connection(str(store / "var/nix/db/db.sqlite"))
    with conn:
        conn.execute("insert into ValidPaths (path, hash, registrationTime) values "
                     "('/nix/store/00000000000000000000000000000000-new', 'sha256:0', 1)")
    conn.close()
    (store / "store/00000000000000000000000000000000-new").mkdir()
    assert publish(str(store)).number == 2
    assert find_usable(str(store)).count == 301


def test_a_generation_number_is_never_given_twice(store):
    """An upper's copy-on-write files name their bases by generation number: after the
    newest generation was deleted by hand, the next one gets a new number, not its."""
    assert publish(str(store)).number == 1
    assert publish(str(store), force=True, full=True).number == 2
    shutil.rmtree(store / "var/nixfs/generations/2")
    assert publish(str(store), force=True, full=True).number == 3
    assert Generations(str(store)).complete() == [1, 3]


def _publish_process(store: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(TESTS.parent))
    return subprocess.Popen([sys.executable, "-m", "nixfs", "publish", "--force", "--full", str(store)],
                            env=env, stderr=subprocess.DEVNULL)


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return "gone"


def test_a_killed_publish_leaves_the_previous_generation_current(tmp_path):
    root = tmp_path / "S"
    (root / "store").mkdir(parents=True)
    generate_db(root / "var/nix/db/db.sqlite", 40_000, refs=1, store_dirs=root / "store")
    publish(str(root))
    gens = Generations(str(root))
    proc = _publish_process(root)
    try:
        while not os.path.exists(gens.file(2, "listings.sqlite")):  # half-way: the catalog
            assert proc.poll() is None, "the publish ended before it could be killed"
            time.sleep(0.01)
        workers = _children(proc.pid)
        assert workers, "the catalog is written by worker processes"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    for pid in workers:  # the workers die with it
        while os.path.exists(f"/proc/{pid}") and _state(pid) != "Z":
            time.sleep(0.01)
    assert not os.path.exists(gens.manifest(2))
    assert gens.complete() == [1] and find_usable(str(root)).number == 1
    assert publish(str(root), force=True).number == 3  # never reused; the dead one removed
    assert gens.numbers() == [1, 3]


def test_keep_and_list(store, capsys):
    for _ in range(4):
        assert main(["publish", "--force", "--full", str(store)]) == 0
    os.mkdir(Generations(str(store)).dir(9))  # a dead publisher's, newer than every complete one
    capsys.readouterr()
    assert main(["publish", "--list", "--json", str(store)]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(r["generation"], r["state"]) for r in listed] == \
        [(1, "complete"), (2, "complete"), (3, "complete"), (4, "complete"), (9, "incomplete")]
    assert all(r["paths"] == 300 and r["bytes"] > 0 for r in listed[:4])
    assert main(["publish", "--keep", "2", str(store)]) == 0  # nothing changed: just prune
    assert Generations(str(store)).numbers() == [3, 4, 9]
    assert main(["publish", "--list", str(store)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:3] == ["GEN", "CREATED", "(UTC)"] and len(out) == 4


def test_bad_arguments_are_one_line_and_exit_2(tmp_path, capsys):
    assert main(["publish", str(tmp_path)]) == 2
    assert "holds no Nix store" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["publish", "--keep", "0", str(tmp_path)])
    assert e.value.code == 2


# ---------------------------------------------------------------------- incremental

def _cow_rows(gen, path: str, sql: str) -> list:
    from nixfs.cow import vfs
    conn = vfs.connect(path, base_root=gen.store, flags=apsw.SQLITE_OPEN_READONLY)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def _add_and_delete(root: Path, paths: list[str], new: int, delete: list[str],
                    start: int = 1000) -> list[str]:
    from dbshapes import add_path
    db = root / "var/nix/db/db.sqlite"
    added = [add_path(db, "nix-2.8", start + i, refs=paths[:2]) for i in range(new)]
    conn = apsw.Connection(str(db))
    with conn:
        for p in delete:
            conn.execute("delete from DerivationOutputs where drv = (select id from ValidPaths "
                         "where path = ?)", (p,))
            conn.execute("delete from Refs where referrer = (select id from ValidPaths "
                         "where path = ?)", (p,))
            conn.execute("delete from ValidPaths where path = ?", (p,))
            os.rmdir(root / "store" / os.path.basename(p))
    conn.close()
    return added


def test_an_incremental_generation_is_the_whole_one_as_cow_files(tmp_path):
    root = tmp_path / "S"
    paths = make_store(root)
    publish(str(root))
    lower = str(root / "var/nix/db/db.sqlite")
    unreferenced = [p for p in paths if not rows(lower, f"select 1 from Refs r join ValidPaths v "
                                                        f"on v.id = r.reference where v.path = '{p}'")]
    gone = unreferenced[-3:]
    gone_ids = {p: rows(lower, f"select id from ValidPaths where path = '{p}'")[0][0] for p in gone}
    added = _add_and_delete(root, paths, 5, gone)
    done = publish(str(root))
    assert done.new and done.number == 2 and done.manifest["depth"] == 1
    gen = verify(str(root), 2, deep=True)
    assert gen.chain == (2, 1) and all(gen.maps.values()) and gen.count == 302
    assert _cow_rows(gen, gen.db, "pragma integrity_check") == [("ok",)]
    for table in ("ValidPaths where id < %d" % ROOT_ID, "Refs where referrer < %d" % ROOT_ID,
                  "DerivationOutputs"):
        assert _cow_rows(gen, gen.db, f"select * from {table} order by 1, 2") == \
            rows(lower, f"select * from {table.split(' where')[0]} order by 1, 2")
    assert _cow_rows(gen, gen.db, f"select reference from Refs where referrer = {ROOT_ID} "
                                  "order by 1") == rows(lower, "select id from ValidPaths order by 1")
    expected = str(tmp_path / "expected.sqlite")
    LowerIndex.create_from(expected, lower)
    assert _cow_rows(gen, gen.index, "select * from paths order by name") == \
        rows(expected, "select * from paths order by name")
    assert dict(_cow_rows(gen, gen.index, "select key, value from meta where key in "
                                          "('lower_max_id', 'root_refs_upto', 'lower_count')")) \
        == {"lower_max_id": gen.max_id, "root_refs_upto": gen.max_id, "lower_count": 302}
    keys = {k for (k,) in _cow_rows(gen, gen.catalog, "select key from listings")}
    for p in added:
        name = os.path.basename(p).encode()
        lower_id = rows(lower, f"select id from ValidPaths where path = '{p}'")[0][0]
        assert listing_key(name, lower_id, b"") in keys
    for p, lower_id in gone_ids.items():
        prefix = listing_key(os.path.basename(p).encode(), lower_id, b"")
        assert not any(k.startswith(prefix) for k in keys)
    assert len(keys) == 2 * 302 + 3 + 3


def test_a_cow_generation_changed_in_place_fails_the_deep_check_only(tmp_path):
    root = tmp_path / "S"
    paths = make_store(root)
    publish(str(root))
    _add_and_delete(root, paths, 2, [])
    publish(str(root))
    gens = Generations(str(root))
    delta = gens.file(2, "db.sqlite")
    os.chmod(delta, 0o644)
    with open(delta, "r+b") as f:  # the header page is in the delta: same size, same map
        f.seek(100)
        f.write(b"\xff")
    verify(str(root), 2)
    with pytest.raises(GenerationError, match="content does not match"):
        verify(str(root), 2, deep=True)


def test_a_deep_chain_is_compacted_and_keep_keeps_what_a_chain_needs(tmp_path):
    root = tmp_path / "S"
    paths = make_store(root)
    depths = []
    for i in range(11):
        if i:
            _add_and_delete(root, paths, 1, [], start=1000 + i)
        depths.append(publish(str(root)).manifest["depth"])
    assert depths == [0, 1, 2, 3, 4, 5, 6, 7, 8, 0, 1]
    gens = Generations(str(root))
    with gens.locked():
        assert prune.keep(str(root), 1) == list(range(1, 10))
    assert gens.numbers() == [10, 11] and find_usable(str(root)).chain == (11, 10)


def test_a_missing_base_makes_the_generation_unusable(tmp_path):
    root = tmp_path / "S"
    paths = make_store(root)
    publish(str(root))
    _add_and_delete(root, paths, 1, [])
    publish(str(root))
    os.unlink(Generations(str(root)).file(1, "listings.sqlite"))
    with pytest.raises(GenerationError):
        verify(str(root), 2)
    assert find_usable(str(root)) is None


def test_follow_publishes_each_change_and_stops_on_sigterm(tmp_path):
    root = tmp_path / "S"
    paths = make_store(root)
    env = dict(os.environ, PYTHONPATH=str(TESTS.parent))
    proc = subprocess.Popen([sys.executable, "-m", "nixfs", "publish", "--follow", "--interval",
                             "0.05", str(root)], env=env, stderr=subprocess.PIPE, text=True)
    gens = Generations(str(root))
    try:
        for want in (1, 2, 3):
            if want > 1:
                _add_and_delete(root, paths, 1, [], start=1000 + want)
            deadline = time.monotonic() + 60  # a hung follower fails, not hangs, the test
            while gens.newest() != want:
                assert proc.poll() is None and time.monotonic() < deadline
                time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert gens.numbers() == [1, 2, 3] and gens.complete() == [1, 2, 3]
    assert find_usable(str(root)).count == 302


@pytest.mark.skipif(os.geteuid() != 0, reason="runs the publish as another user")
def test_an_ordinary_user_publishes_with_write_access_to_var_nixfs_alone():
    import tempfile
    top = Path(tempfile.mkdtemp(dir="/var/tmp", prefix="nixfs-publish-user-"))
    try:
        os.chmod(top, 0o755)
        root = top / "S"
        make_store(root)
        subprocess.run(["chmod", "-R", "a+rX,go-w", str(top)], check=True)
        (root / "var/nixfs").mkdir()
        os.chown(root / "var/nixfs", 65534, 65534)
        db_dir = root / "var/nix/db"
        before = sorted((p.name, p.stat().st_mtime_ns) for p in db_dir.iterdir())
        env = dict(os.environ, PYTHONPATH=str(TESTS.parent))

        def as_nobody():
            os.setgid(65534)
            os.setuid(65534)

        proc = subprocess.run([sys.executable, "-m", "nixfs", "publish", str(root)], env=env,
                              preexec_fn=as_nobody, cwd="/", capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        assert sorted((p.name, p.stat().st_mtime_ns) for p in db_dir.iterdir()) == before
        assert find_usable(str(root)).number == 1
        assert os.stat(Generations(str(root)).manifest(1)).st_uid == 65534
    finally:
        subprocess.run(["rm", "-rf", str(top)])


def test_publish_json_says_where_the_time_went(store, capsys):
    assert main(["publish", "--json", str(store)]) == 0
    whole = json.loads(capsys.readouterr().out)["phases"]
    assert list(whole) == ["copy", "index", "catalog", "root", "hashes", "seal"]
    assert all(wall >= 0 and cpu >= 0 for wall, cpu in whole.values())
    conn = apsw.Connection(str(store / "var/nix/db/db.sqlite"))
    conn.execute("delete from ValidPaths where id = (select max(id) from ValidPaths)")
    conn.close()
    assert main(["publish", "--json", str(store)]) == 0
    over = json.loads(capsys.readouterr().out)
    assert over["depth"] == 1
    assert list(over["phases"]) == ["create", "changes", "db", "index", "catalog", "settle",
                                    "seal"]
