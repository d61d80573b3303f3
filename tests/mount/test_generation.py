"""A fresh upper over a lower with a published generation (``nixfs publish``): its
database, index and listings are copy-on-write files over the generation's, a stock
Nix 2.8 uses it as any store, and a later mount rebases onto a newer generation."""

import json
import os
import subprocess

import pytest
from harness import NIXFS, NixfsMount, exited, kill_daemon, run_nixfs, wait_until
from nixlower import Store, built_lower  # noqa: F401 (a fixture)
from nixstore import nix, nix_build, nix_env

COW_DB_MAP = "var/nix/db/.wh..wh..nixfs-cow.db.sqlite"
COW_FILES = ("var/nix/db/db.sqlite", ".nixfs/lower-index.sqlite", ".nixfs/listings.sqlite")


@pytest.fixture
def store(tmp_path, built_lower):
    return Store(tmp_path, built_lower)


def publish(store, *args) -> None:
    proc = run_nixfs("publish", *args, store.lower)
    assert proc.returncode == 0, proc.stderr


def generations(store) -> list[int]:
    top = store.lower / "var/nixfs/generations"
    return sorted(int(n) for n in os.listdir(top) if (top / n / "manifest.json").exists())


def recorded(upper) -> int | None:
    """The generation the upper's database is built over (None: a copied database)."""
    try:
        return json.loads((upper / ".nixfs/generation").read_text())["generation"]
    except FileNotFoundError:
        return None


def db_allocated(upper) -> int:
    """Bytes the merged database's files hold on disk (st_blocks: a COW delta is sparse;
    Nix's own 8 MiB ``reserved`` file beside them is left out)."""
    top = upper / "var/nix/db"
    return sum(os.lstat(top / n).st_blocks * 512 for n in os.listdir(top)
               if n.startswith("db.sqlite") or n == os.path.basename(COW_DB_MAP))


def own_build(store, name: str, deps=("libb",)) -> str:
    """Build *name* through the mount, rooted by an out link (kept by a GC)."""
    link = store.tmp / f"result-{name}"
    proc = subprocess.run(["nix-build", "--store", f"local?root={store.root}",
                           str(store.expr({name: list(deps)})), "-A", name, "-o", str(link)],
                          capture_output=True, text=True, env=nix_env())
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split()[0]


def lower_add(store, name: str) -> str:
    """A new path in the lower, built by the lower's own Nix."""
    return nix_build(store.lower_root, store.expr({name: ["liba"]}), name)[0]


def lower_paths_valid(store) -> None:
    for name, path in store.paths.items():
        assert store.valid(path), name


def test_a_fresh_upper_starts_from_the_generation(store, tmp_path):
    publish(store)
    assert generations(store) == [1]
    with store.mount() as m:
        # Printed (to a pipe) before nixfs mount's exit, which skips Python's shutdown.
        assert f"Nix uses it with --store 'local?root={store.root}'" in m.output
        app, libb, liba = store.paths["app"], store.paths["libb"], store.paths["liba"]
        assert set(store.q("-q", "--references", app).stdout.split()) == {liba, libb}
        assert store.q("-q", "--hash", app).stdout == nix(store.lower_root, "nix-store", "-q",
                                                         "--hash", app).stdout
        status = json.loads(run_nixfs("status", "--json", store.mnt).stdout)
        assert status["nix"]["generation"]["generation"] == 1
        assert "generation 1" in run_nixfs("status", store.mnt).stdout
        assert (store.mnt / app[len("/nix/"):] / "bin/app").read_text().startswith("app")
        # The lower's published files are for mounts to read, not to show (raw deltas).
        assert (store.lower / "var/nixfs").is_dir() and not (store.mnt / "var/nixfs").exists()
        assert "nixfs" not in os.listdir(store.mnt / "var")
    assert "generation 1" in m.log_text()
    assert recorded(store.upper) == 1
    for rel in COW_FILES:
        parent, name = os.path.split(rel)
        assert (store.upper / parent / f".wh..wh..nixfs-cow.{name}").exists(), rel
    # The same lower without its generation: the database copied whole.
    copied_upper = tmp_path / "copied-upper"
    copied_upper.mkdir()
    with NixfsMount(store.lower, copied_upper, store.mnt, "generation=off"):
        assert store.valid(store.paths["app"])
    assert recorded(copied_upper) is None
    assert not (copied_upper / COW_DB_MAP).exists()
    small, whole = db_allocated(store.upper), db_allocated(copied_upper)
    assert small * 4 < whole, (small, whole)


def test_build_and_gc_through_a_generation_mount(store):
    publish(store)
    with store.mount():
        mine = own_build(store, "mine")
        assert store.q("--gc").returncode == 0
        lower_paths_valid(store)
        assert store.valid(mine)
        assert store.q("--verify", "--check-contents").returncode == 0
    with store.mount():
        assert store.valid(mine)
        lower_paths_valid(store)
        assert (store.mnt / mine[len("/nix/"):] / "bin/mine").read_text().startswith("mine")
    assert recorded(store.upper) == 1


def test_lower_changes_since_the_generation_are_followed(store):
    publish(store)
    added = lower_add(store, "since")
    nix(store.lower_root, "nix-store", "--delete", store.paths["app"])
    with store.mount():
        assert store.valid(added)
        assert not store.valid(store.paths["app"])  # never valid again through the generation
        assert not (store.mnt / store.paths["app"][len("/nix/"):]).exists()
        assert store.valid(store.paths["libb"])
        live = lower_add(store, "live")
        store.wait(lambda: store.valid(live), "a lower path added while mounted valid")
        nix(store.lower_root, "nix-store", "--delete", added)
        store.wait(lambda: not store.valid(added), "a lower path deleted while mounted invalid")
    assert recorded(store.upper) == 1


def test_rebase_onto_a_newer_generation_keeps_own_builds(store):
    publish(store)
    with store.mount():
        mine = own_build(store, "mine")
    newer = lower_add(store, "newer")
    publish(store)
    assert generations(store) == [1, 2]
    with store.mount() as m:
        assert store.valid(mine) and store.valid(newer)
        lower_paths_valid(store)
        assert set(store.q("-q", "--references", mine).stdout.split()) >= {store.paths["libb"]}
        assert store.q("--verify", "--check-contents").returncode == 0
    assert recorded(store.upper) == 2
    assert "rebas" in m.log_text()


def test_a_pruned_base_is_rebased_with_the_rows_of_the_last_unmount(store):
    publish(store)
    with store.mount():
        mine = own_build(store, "mine")
    assert (store.upper / ".nixfs/own-rows.sqlite").exists()
    newer = lower_add(store, "newer")
    publish(store, "--full", "--keep", "1")  # whole: generation 1 is no base of it
    assert generations(store) == [2]
    with store.mount():
        assert store.valid(mine) and store.valid(newer)
        lower_paths_valid(store)
    assert recorded(store.upper) == 2


def test_a_pruned_base_without_a_generation_falls_back_to_a_copy(store):
    publish(store)
    with store.mount():
        mine = own_build(store, "mine")
    subprocess.run(["rm", "-rf", str(store.lower / "var/nixfs/generations")], check=True)
    with store.mount() as m:
        assert store.valid(mine)
        lower_paths_valid(store)
    assert recorded(store.upper) is None
    assert not (store.upper / COW_DB_MAP).exists()
    assert "copy" in m.log_text()


def test_a_corrupt_manifest_falls_back_to_a_copy_with_a_warning(store):
    publish(store)
    manifest = store.lower / "var/nixfs/generations/1/manifest.json"
    data = json.loads(manifest.read_text())
    data["lower_db"]["max_id"] += 1  # tampered: the self-hash no longer holds
    manifest.write_text(json.dumps(data))
    with store.mount() as m:
        lower_paths_valid(store)
    warnings = [line for line in m.log_text().splitlines()
                if " WARNING " in line and "generation" in line]
    assert len(warnings) == 1, m.log_text()
    assert recorded(store.upper) is None and not (store.upper / COW_DB_MAP).exists()


def test_generation_off_copies_the_database(store):
    publish(store)
    with store.mount("generation=off"):
        lower_paths_valid(store)
    assert recorded(store.upper) is None and not (store.upper / COW_DB_MAP).exists()


def test_an_upper_from_before_generations_keeps_its_copy(store):
    """An upper whose database was copied whole (by this nixfs or an earlier one) is never
    converted when its lower gains a generation, and never refused."""
    with store.mount():
        mine = own_build(store, "mine")
    db = store.upper / "var/nix/db/db.sqlite"
    before = os.stat(db).st_ino
    publish(store)
    with store.mount():
        assert store.valid(mine)
        lower_paths_valid(store)
    assert recorded(store.upper) is None and not (store.upper / COW_DB_MAP).exists()
    assert os.stat(db).st_ino == before


def test_fsck_of_an_upper_over_a_generation_is_clean(store):
    """fsck reads the copy-on-write database, index and listings through the VFS, and
    takes the maps beside them for what they are."""
    publish(store)
    with store.mount():
        own_build(store, "mine")
    proc = run_nixfs("fsck", "--lower", store.lower, "--upper", store.upper, "--json",
                     timeout=120)
    report = json.loads(proc.stdout)
    assert proc.returncode == 0 and report["findings"] == [], proc.stdout + proc.stderr


def lower_calls(store) -> int:
    return sum(json.loads(run_nixfs("status", "--json", store.mnt).stdout)
               ["lower_calls"].values())


def walk_lower_calls(store, upper, *options) -> int:
    """Lower calls of a walk of the whole store (every entry's attributes and every
    symlink's target) on a fresh mount of *upper*: the walk's alone, not the mount's
    (over a generation it opens the database's base before it is announced, which any
    Nix command would at its first use)."""
    with NixfsMount(store.lower, upper, store.mnt, *options):
        before = lower_calls(store)
        for dirpath, dirnames, filenames in os.walk(store.mnt / "store"):
            for name in dirnames + filenames:
                path = os.path.join(dirpath, name)
                if os.path.islink(path):
                    os.readlink(path)
        return lower_calls(store) - before


def test_a_fresh_upper_walks_the_store_from_the_catalog(store, tmp_path):
    """The generation's catalog holds every valid path's listings: a fresh upper's walk
    of the store asks the lower about none of them, where one that copied the database
    asks about each."""
    publish(store)
    over, copied = tmp_path / "over", tmp_path / "copied"
    over.mkdir()
    copied.mkdir()
    asked = walk_lower_calls(store, over)
    learnt = walk_lower_calls(store, copied, "generation=off")
    assert asked * 10 < learnt, (asked, learnt)


def test_a_base_pruned_while_mounted_keeps_serving_and_rebases_after(store):
    """A running mount keeps its base open; its unmount copies the upper's rows aside
    through the mount, so the next mount rebases with them although the base is gone."""
    publish(store)
    with store.mount():
        mine = own_build(store, "mine")
        lower_add(store, "newer")
        publish(store, "--full", "--keep", "1")
        assert generations(store) == [2]
        lower_paths_valid(store)
        assert store.valid(mine)
        assert store.q("--verify", "--check-contents").returncode == 0
    with store.mount():
        assert store.valid(mine)
        lower_paths_valid(store)
    assert recorded(store.upper) == 2


def test_a_base_pruned_right_after_mounting_keeps_serving(store, tmp_path):
    """The mount's bases are held from before it is announced, not from their first use:
    a generation pruned before Nix or the sync touched the database leaves the mount
    serving it, and its unmount keeps the rows a build added for the next mount."""
    publish(store)
    lower_add(store, "newer")
    publish(store, "--full")  # generation 2, no base of it; completed once mounted:
    manifest, aside = store.lower / "var/nixfs/generations/2/manifest.json", tmp_path / "m"
    os.rename(manifest, aside)
    with store.mount():
        assert json.loads(run_nixfs("status", "--json", store.mnt).stdout)[
            "nix"]["generation"]["generation"] == 1
        os.rename(aside, manifest)
        publish(store, "--keep", "1")  # nothing new: only prunes generation 1
        assert generations(store) == [2]
        mine = own_build(store, "mine")
        lower_paths_valid(store)
        assert store.valid(mine)
    with store.mount():
        assert store.valid(mine)
        lower_paths_valid(store)
    assert recorded(store.upper) == 2


def end_uncleanly(store, how: str) -> None:
    """End the mount without ``nixfs umount``: its daemon killed, or ``fusermount -u``
    (the daemon then ends by itself, the mount gone: nothing can be read through it)."""
    if how == "kill -9":
        kill_daemon(store.mnt)
        subprocess.run(["fusermount3", "-u", "-z", str(store.mnt)], check=True)
        return
    pid = json.loads(run_nixfs("status", "--json", store.mnt).stdout)["pid"]
    subprocess.run(["fusermount3", "-u", str(store.mnt)], check=True)
    wait_until(lambda: exited(pid), "the daemon ended after fusermount -u", timeout=60)


@pytest.mark.parametrize("end", ["kill -9", "fusermount -u"])
def test_own_rows_are_kept_aside_as_nix_commits_them(store, end):
    """The upper's own rows are copied aside in the sync round after Nix committed them,
    not only at ``nixfs umount``: a mount that ends uncleanly after its base was pruned
    leaves the next mount's rebase every own path."""
    publish(store)
    mount = store.mount().start()
    try:
        mine = own_build(store, "mine")
        assert run_nixfs("sync", store.mnt).returncode == 0  # a round after the build
        copy = store.upper / ".nixfs/own-rows.sqlite"
        written = os.stat(copy).st_ino
        assert run_nixfs("sync", store.mnt).returncode == 0
        assert os.stat(copy).st_ino == written  # nothing new: not written again
        second = own_build(store, "second", deps=("liba",))  # added to the copy
        assert run_nixfs("sync", store.mnt).returncode == 0
        lower_add(store, "newer")
        publish(store, "--full", "--keep", "1")
        assert generations(store) == [2]
        end_uncleanly(store, end)
    finally:
        mount.force_unmount()
    with store.mount() as again:
        assert store.valid(mine) and store.valid(second)
        assert set(store.q("-q", "--references", mine).stdout.split()) >= {store.paths["libb"]}
        assert set(store.q("-q", "--references", second).stdout.split()) >= {
            store.paths["liba"]}
        drv = store.q("-q", "--deriver", second).stdout.strip()
        assert store.valid(drv) and store.q("-q", "--outputs", drv).stdout.split() == [second]
        lower_paths_valid(store)
        assert store.q("--verify", "--check-contents").returncode == 0
    assert recorded(store.upper) == 2
    assert "4 upper paths adopted" in again.log_text()


def test_nixfs_run_over_a_generation(store):
    """``nixfs run`` of a lower with a generation mounts over it as ``nixfs mount`` does:
    its status shows the generation, a lower path is valid, a small build works and
    reuses the lower's paths."""
    publish(store)
    app, libb = store.paths["app"], store.paths["libb"]
    nixfs = " ".join(NIXFS)
    script = (f"set -e; {nixfs} status --json /nix; nix-store --check-validity {app}; "
              f"nix-build {store.expr({'mine': ['libb']})} -A mine --no-out-link | tail -1")
    proc = run_nixfs("run", "--lower", store.lower, "--upper", store.upper, "--",
                     "sh", "-c", script, env={"NIX_CONFIG": nix_env()["NIX_CONFIG"]},
                     timeout=300)
    assert proc.returncode == 0, proc.stderr
    status, _, built = proc.stdout.rpartition("}\n")
    assert json.loads(status + "}")["nix"]["generation"]["generation"] == 1
    mine = built.strip()
    assert mine.startswith("/nix/store/") and mine.endswith("-mine"), proc.stdout
    building = [line for line in proc.stderr.splitlines() if line.startswith("building ")]
    assert len(building) == 1 and "mine" in building[0], proc.stderr  # the lower's reused
    assert recorded(store.upper) == 1
    with store.mount():  # the run's build stays the upper's
        assert store.valid(mine) and store.valid(app)
        assert set(store.q("-q", "--references", mine).stdout.split()) >= {libb}


def test_nix_finds_its_reserved_space_made(store):
    """Nix's first command makes var/nix/db/reserved (8 MiB) unless it is there; through
    FUSE its posix_fallocate is 2,048 one-byte writes.  The daemon makes it in the upper
    before mounting, allocated; Nix then leaves it as it is (no write: its mtime stays)."""
    publish(store)
    reserved = store.upper / "var/nix/db/reserved"
    with store.mount():
        st = os.stat(reserved)
        assert st.st_size == 8 * 1024 * 1024 and st.st_blocks * 512 >= st.st_size
        assert os.stat(store.mnt / "var/nix/db/reserved").st_size == st.st_size
        assert store.valid(store.paths["app"])
        after = os.stat(reserved)
        assert (after.st_ino, after.st_mtime_ns) == (st.st_ino, st.st_mtime_ns)
    reserved.write_bytes(b"mine")  # what is there is left alone
    with store.mount():
        assert store.valid(store.paths["app"])
    assert os.stat(reserved).st_size == 8 * 1024 * 1024  # Nix made its own again
