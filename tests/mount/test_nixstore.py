"""A stock Nix (Debian's nix-bin 2.8) on a nixfs mount of a Nix store."""

import os
import shutil
import sqlite3
import subprocess
import threading

import pytest
from harness import NixfsMount, run_nixfs
from nixlower import Store, built_lower  # noqa: F401 (a fixture)
from nixstore import nix, nix_build


@pytest.fixture
def store(tmp_path, built_lower):
    return Store(tmp_path, built_lower)


def upper_store(store) -> set[str]:
    return {n for n in os.listdir(store.upper / "store") if not n.startswith(".")
            and not n.endswith("nixfs-lower-roots")}


def test_mount_prints_store_uri_and_queries_see_lower(store):
    proc = run_nixfs("mount", "--lower", store.lower, "--upper", store.upper, store.mnt)
    try:
        assert proc.returncode == 0, proc.stderr
        assert f"--store 'local?root={store.root}'" in proc.stdout
        app, libb, liba = store.paths["app"], store.paths["libb"], store.paths["liba"]
        assert set(store.q("-q", "--references", app).stdout.split()) == {liba, libb}
        assert store.q("-q", "--hash", app).stdout == nix(store.lower_root, "nix-store", "-q",
                                                         "--hash", app).stdout
        assert store.q("-q", "--deriver", app).stdout.strip().endswith("-app.drv")
        drv = store.q("-q", "--deriver", app).stdout.strip()
        assert store.q("-q", "--outputs", drv).stdout.strip() == app
    finally:
        run_nixfs("umount", store.mnt)


def test_build_reuses_lower_and_lands_in_upper(store):
    with store.mount():
        expr = store.expr({"app2": ["libb"]})
        proc = subprocess.run(["nix-build", "--store", f"local?root={store.root}", str(expr),
                               "-A", "app", "-A", "app2", "--no-out-link"],
                              capture_output=True, text=True, env=__import__("nixstore").nix_env())
        assert proc.returncode == 0, proc.stderr
        built = [line for line in proc.stderr.splitlines() if line.startswith("building ")]
        assert len(built) == 1 and "app2" in built[0], proc.stderr  # nothing from the lower
        app2 = proc.stdout.split()[1]
        assert (store.mnt / app2[len("/nix/"):] / "bin/app2").read_text().startswith("app2")
        assert {n.split("-", 1)[1] for n in upper_store(store)} == {"app2", "app2.drv"}
        assert store.q("--verify", "--check-contents").returncode == 0


def test_gc_frees_upper_and_never_touches_lower(store):
    with store.mount():
        expr = store.expr({"junk": ["liba"]})
        nix_build(store.root, expr, "junk")
        assert any(n.endswith("-junk") for n in upper_store(store))
        out = store.q("--gc").stdout
        assert upper_store(store) == set()
        for name, path in store.paths.items():
            assert store.valid(path), name
            assert (store.mnt / path[len("/nix/"):]).exists()
        assert not any(n.startswith(".wh.") for n in os.listdir(store.upper / "store")), out
        proc = store.q("--delete", store.paths["liba"], check=False)
        assert proc.returncode != 0 and "still alive" in proc.stderr
        assert store.valid(store.paths["liba"])


def test_a_store_listed_without_nodes_is_collected_right(tmp_path):
    """A store listing past half the node budget sends its lower paths without nodes
    (pyfuse3's patch 09): each entry's inode number is the one a stat of it gives,
    the listing makes no nodes, and Nix's collector, which lists the store, frees the
    upper's garbage and keeps every lower path."""
    from nixfs.fuse import features
    from relharness import status, synthetic_store
    if not features.FEATURES.readdir_without_node:
        pytest.skip("pyfuse3 without nixfs' patch 09 (scripts/build-pyfuse3)")
    names = synthetic_store(tmp_path / "L/nix", count=150)
    upper, root = tmp_path / "upper", tmp_path / "M"
    upper.mkdir()
    (root / "nix").mkdir(parents=True)
    with NixfsMount(tmp_path / "L/nix", upper, root / "nix", "max_nodes=100"):
        junk = tmp_path / "junk.txt"
        junk.write_text("garbage")
        added = nix(root, "nix-store", "--add", str(junk)).stdout.strip()
        before = status(root / "nix")
        listed = {e.name: e.inode() for e in os.scandir(root / "nix/store")}
        after = status(root / "nix")
        assert set(names) | {os.path.basename(added)} <= set(listed)
        assert after["entries_without_node"] - before["entries_without_node"] >= len(names)
        assert after["nodes"] < before["nodes"] + 10
        for name in names[::7] + [os.path.basename(added)]:
            assert os.lstat(root / "nix/store" / name).st_ino == listed[name], name
        nix(root, "nix-store", "--gc")
        assert not (root / "nix/store" / os.path.basename(added)).exists()
        valid = nix(root, "nix-store", "-q", "--hash", *[f"/nix/store/{n}" for n in names])
        assert len(valid.stdout.split()) == len(names)


def test_store_view_hides_invalid_lower_entries(store):
    junk = ["aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-half-copied", ".nfs000000001", "x.lock",
            os.path.basename(store.paths["app"]) + ".lock"]
    (store.lower / "store/.links").mkdir(exist_ok=True)
    (store.lower / "store/.links/0abc").write_text("linked")
    for name in junk:
        (store.lower / "store" / name).mkdir()
    with store.mount():
        listing = set(os.listdir(store.mnt / "store"))
        assert listing >= {os.path.basename(p) for p in store.paths.values()}
        assert not listing & set(junk) and ".links" not in listing
        for name in junk + [".links"]:
            assert not (store.mnt / "store" / name).exists()
        # Nix's own .links in the upper is shown; Nix's GC leaves the lower's junk alone.
        store.q("--gc")
        for name in junk:
            assert (store.lower / "store" / name).exists()
        assert not any(n.startswith(".wh.") for n in os.listdir(store.upper / "store"))


def test_live_add_and_delete_in_lower(store):
    with store.mount():
        expr = store.expr({"live": ["liba"]})
        new = nix_build(store.lower_root, expr, "live")[0]  # the lower's own Nix
        took = store.wait(lambda: store.valid(new), "a new lower path valid through the mount")
        assert (store.mnt / new[len("/nix/"):] / "bin/live").read_text().startswith("live")
        assert took < 2
        nix(store.lower_root, "nix-store", "--delete", new)
        store.wait(lambda: not store.valid(new), "a deleted lower path invalid through the mount")
        assert not (store.mnt / new[len("/nix/"):]).exists()
        again = nix_build(store.root, expr, "live")[0]  # recreated in the upper, no remount
        assert again == new and store.valid(new)
        assert os.path.basename(new) in upper_store(store)
        assert store.q("--verify", "--check-contents").returncode == 0


def test_upper_copy_of_a_new_lower_path_is_dropped(store):
    with store.mount():
        expr = store.expr({"dup": ["libb"]})
        path = nix_build(store.root, expr, "dup")[0]
        assert os.path.basename(path) in upper_store(store)
        nix_build(store.lower_root, expr, "dup")  # the same path lands in the lower
        store.wait(lambda: os.path.basename(path) not in upper_store(store),
                   "the upper copy dropped")
        assert store.valid(path)
        assert (store.mnt / path[len("/nix/"):] / "bin/dup").exists()
        assert store.q("--verify", "--check-contents").returncode == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for a read-only bind mount")
def test_read_only_lower(store):
    ro = store.tmp / "ro"
    ro.mkdir()
    subprocess.run(["mount", "--bind", "-o", "ro", str(store.lower), str(ro)], check=True)
    try:
        before = sorted(os.listdir(store.lower / "var/nix/db"))
        with NixfsMount(ro, store.upper, store.mnt):
            assert store.valid(store.paths["app"])
            nix_build(store.root, store.expr({"ro": ["app"]}), "ro")
        assert sorted(os.listdir(store.lower / "var/nix/db")) == before  # no -wal, no -shm
    finally:
        subprocess.run(["umount", str(ro)], check=True)


def test_a_read_only_store_mount_is_refused_with_a_clear_error(store):
    """Nix writes through a store mount (its GC lock, its database): `-o ro` is refused
    before anything is mounted, with what to do instead."""
    proc = run_nixfs("mount", "--lower", store.lower, "--upper", store.upper, "-o", "ro",
                     store.mnt)
    assert proc.returncode == 2, proc.stderr
    assert "cannot be read-only" in proc.stderr and "--no-nix" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not os.path.ismount(store.mnt)


def test_remount_keeps_upper_and_catches_up(store):
    expr = store.expr({"persist": ["liba"], "later": ["libb"]})
    with store.mount():
        mine = nix_build(store.root, expr, "persist")[0]
    later = nix_build(store.lower_root, expr, "later")[0]  # while unmounted
    with store.mount():
        assert store.valid(mine) and store.valid(later)  # at once: caught up before mounting
        assert (store.mnt / mine[len("/nix/"):]).exists()


def test_rm_hides_lower_path_and_unhide_restores(store):
    libb, app = store.paths["libb"], store.paths["app"]
    with store.mount() as m:
        shutil.rmtree(store.mnt / libb[len("/nix/"):])
        store.wait(lambda: not store.valid(libb), "a removed lower path invalid")
        assert not store.valid(app)  # its referrer went with it: files and database agree
        assert os.path.basename(app) not in os.listdir(store.mnt / "store")
        proc = run_nixfs("unhide", "--mount", m.mnt, libb)
        assert proc.returncode == 0, proc.stderr
        assert set(proc.stdout.split()) == {libb, app}
        assert store.valid(libb) and store.valid(app)
        assert (store.mnt / app[len("/nix/"):] / "bin/app").exists()
        assert store.q("--verify", "--check-contents").returncode == 0


def test_unknown_schema_is_refused(store):
    (store.lower / "var/nix/db/schema").write_text("42")
    proc = run_nixfs("mount", "--lower", store.lower, "--upper", store.upper, store.mnt)
    assert proc.returncode == 2
    assert "schema version 42" in proc.stderr and "Traceback" not in proc.stderr
    assert not os.path.ismount(store.mnt)


def test_promote_into_lower(store):
    expr = store.expr({"p1": ["liba"], "p2": ["p1"]})
    with store.mount():
        p2 = nix_build(store.root, expr, "p2")[0]
        proc = run_nixfs("promote", "--upper", store.upper, "--into", store.lower, p2)
        assert proc.returncode == 0, proc.stderr
        moved = proc.stdout.split()
        assert p2 in moved and any(p.endswith("-p1") for p in moved)
        assert store.lower_valid(p2)
        store.wait(lambda: os.path.basename(p2) not in upper_store(store), "upper copies dropped")
        assert store.valid(p2)
    assert nix(store.lower_root, "nix-store", "--verify", "--check-contents").returncode == 0


def test_nixfs_gc_frees_only_dead_upper_paths(store):
    expr = store.expr({"keep": ["liba"], "drop": ["libb"]})
    with store.mount() as m:
        keep = nix_build(store.root, expr, "keep")[0]
        subprocess.run(["nix-build", "--store", f"local?root={store.root}", str(expr), "-A",
                        "keep", "-o", str(store.tmp / "keep-root")], check=True,
                       capture_output=True, env=__import__("nixstore").nix_env())
        drop = nix_build(store.root, expr, "drop")[0]
        proc = run_nixfs("gc", m.mnt)
        assert proc.returncode == 0, proc.stderr
        assert drop in proc.stdout.split() and keep not in proc.stdout.split()
        assert not store.valid(drop) and store.valid(keep)
        for path in store.paths.values():
            assert store.valid(path)


def test_concurrent_nix_and_changing_lower(store):
    """Nix builds and adds through the mount while the lower gains and loses paths."""
    stop = threading.Event()
    errors = []

    def lower_churn():
        i = 0
        while not stop.is_set():
            expr = store.expr({f"churn{i}": ["liba"]})
            try:
                p = nix_build(store.lower_root, expr, f"churn{i}")[0]
                if i % 2:
                    nix(store.lower_root, "nix-store", "--delete", p)
            except Exception as e:  # reported below
                errors.append(e)
            i += 1

    with store.mount():
        t = threading.Thread(target=lower_churn)
        t.start()
        try:
            for i in range(6):
                nix_build(store.root, store.expr({f"mine{i}": ["libb"]}), f"mine{i}")
                f = store.tmp / f"added{i}"
                f.write_text(f"added {i}")
                store.q("--add", f)
        finally:
            stop.set()
            t.join()
        assert not errors, errors
        assert run_nixfs("sync", store.mnt).returncode == 0  # follow the last lower change now
        assert store.q("--verify", "--check-contents").returncode == 0
    db = sqlite3.connect(store.upper / "var/nix/db/db.sqlite")
    assert db.execute("pragma integrity_check").fetchone()[0] == "ok"
    assert db.execute("pragma foreign_key_check").fetchall() == []


def _root_refs(store) -> int:
    db = sqlite3.connect(f"file:{store.mnt}/var/nix/db/db.sqlite?mode=ro", uri=True)
    try:
        return db.execute("select count(*) from Refs r join ValidPaths v on v.id = r.referrer "
                          "where v.path like '%-nixfs-lower-roots'").fetchone()[0]
    finally:
        db.close()


def test_gc_root_survives_hiding_and_lower_deletions(store):
    with store.mount() as m:
        before = 2 * len(store.paths) + 1  # with the .drv files and busybox
        # A copied upper's root gets its references once the mount is live (rootfill).
        store.wait(lambda: _root_refs(store) == before, "the GC root's references")
        shutil.rmtree(store.mnt / store.paths["libb"][len("/nix/"):])
        assert run_nixfs("sync", m.mnt).returncode == 0
        assert _root_refs(store) == before - 2  # libb and app left; the root stays
        run_nixfs("unhide", "--mount", m.mnt, store.paths["libb"])
        assert _root_refs(store) == before
        store.q("--gc")
        for path in store.paths.values():
            assert store.valid(path)


def test_gc_right_after_first_mount_waits_for_the_root(tmp_path):
    """The GC root of a large lower is completed after the mount goes live; a collector
    started at once must wait for it, never delete a lower path."""
    from nixstore import generate_db
    lower = tmp_path / "L/nix"
    (lower / "store").mkdir(parents=True)
    paths = generate_db(lower / "var/nix/db/db.sqlite", 60_000, store_dirs=lower / "store")
    upper, root = tmp_path / "upper", tmp_path / "M"
    upper.mkdir()
    (root / "nix").mkdir(parents=True)
    with NixfsMount(lower, upper, root / "nix"):
        proc = nix(root, "nix-store", "--gc")
        assert "0 store paths deleted" in proc.stdout + proc.stderr, proc.stderr[-2000:]
        assert not [n for n in os.listdir(upper / "store") if n.startswith(".wh.")]
        for p in paths[::997]:
            assert nix(root, "nix-store", "--check-validity", p, check=False).returncode == 0


def test_optimise_never_copies_lower_files_up(store):
    with store.mount():
        nix_build(store.root, store.expr({"opt": ["liba"]}), "opt")
        proc = store.q("--optimise")
        assert proc.returncode == 0, proc.stderr
        lower_names = {os.path.basename(p) for p in store.paths.values()}
        assert not lower_names & set(os.listdir(store.upper / "store"))
        assert store.q("--verify", "--check-contents").returncode == 0
