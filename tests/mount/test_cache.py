"""Caching of immutable lower store paths, checked by counting lower calls."""

import errno
import json
import os
import stat
import subprocess
import time

import pytest
from harness import run_nixfs
from nixfs.fuse import features
from nixstore import nix, nix_build
from nixlower import LOWER_DRVS, Store, built_lower  # noqa: F401 (fixture)


def status(store) -> dict:
    out = run_nixfs("status", "--json", store.mnt)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def fuse_requests(store) -> dict:
    return status(store)["fuse_requests"]


def lower_calls(store) -> dict:
    calls = status(store)["lower_calls"]
    calls.pop("timeout", None)
    return calls


def total(calls: dict) -> int:
    return sum(calls.values())


def walk(root) -> list:
    """Everything a `find -ls` sees: names, attributes, symlink targets."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            out.append((p, st.st_mode, st.st_size, st.st_mtime_ns,
                        os.readlink(p) if stat.S_ISLNK(st.st_mode) else None))
    return sorted(out)


def drop_kernel_caches():
    subprocess.run(["sync"])
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("2")  # dentries and inodes: the kernel forgets nixfs' nodes


@pytest.fixture
def store(tmp_path, built_lower):
    s = Store(tmp_path, built_lower)
    # Some depth and breadth inside a store path: the busybox path gets a tree.
    bb = next((s.lower / "store").glob("*-busybox"))
    os.chmod(bb, 0o755)
    for d in range(5):
        (bb / f"d{d}/sub").mkdir(parents=True)
        for f in range(10):
            (bb / f"d{d}/sub/f{f}").write_text(f"{d}-{f}")
        os.symlink(f"sub/f0", bb / f"d{d}/link")
    os.chmod(bb, 0o555)
    s.tree = s.mnt / "store" / bb.name
    return s


@pytest.mark.skipif(os.geteuid() != 0, reason="drops the kernel's caches")
def test_second_walk_makes_no_lower_calls(store):
    with store.mount():
        first = walk(store.tree)
        # The store directory itself is mutable (paths come and go): looking it up again
        # may ask the lower.  Keep it open, so the kernel keeps it; the tree is the test.
        pin = os.open(store.mnt / "store", os.O_RDONLY | os.O_DIRECTORY)
        try:
            before = total(lower_calls(store))
            drop_kernel_caches()
            assert walk(store.tree) == first
            assert total(lower_calls(store)) == before, "the second walk asked the lower"
        finally:
            os.close(pin)


def test_second_mount_and_walk_make_almost_no_lower_calls(store):
    with store.mount():
        first = walk(store.tree)
        cold = total(lower_calls(store))
    with store.mount():
        base = total(lower_calls(store))
        assert walk(store.tree) == first
        again = total(lower_calls(store)) - base
    assert again * 10 <= cold, (again, cold)


def test_looking_up_a_small_store_path_reads_all_of_it_at_once(store):
    """The first lookup of a store path reads the directories below it in the same
    trip, so walking it afterwards asks the lower nothing."""
    with store.mount():
        os.lstat(store.tree)
        before = total(lower_calls(store))
        walk(store.tree)
        assert total(lower_calls(store)) == before


def test_a_nix_store_mount_has_no_xattrs_and_the_kernel_stops_asking(store):
    """Nix strips extended attributes from store paths, so a Nix store mount says it has
    none (ENOSYS): the kernel answers EOPNOTSUPP itself from then on, and an exec or an
    `ls -l` costs no xattr round trip."""
    f = store.tree / "d0/sub/f1"
    with store.mount():
        for _ in range(3):
            with pytest.raises(OSError) as e:
                os.getxattr(f, "security.capability")
            assert e.value.errno == errno.EOPNOTSUPP
            with pytest.raises(OSError) as e:
                os.listxattr(f)
            assert e.value.errno == errno.EOPNOTSUPP
        subprocess.run(["ls", "-lR", store.tree], check=True, capture_output=True)
        requests = fuse_requests(store)
        assert requests.get("getxattr", 0) == 1 and requests.get("listxattr", 0) == 1, requests
        assert lower_calls(store).get("listxattr", 0) == 0
        assert status(store)["xattrs"] is False
        with pytest.raises(OSError) as e:
            os.setxattr(store.mnt / "var", "user.x", b"1")
        assert e.value.errno == errno.EOPNOTSUPP
    with store.mount("xattr=on"):  # asked for: shown, as on any other mount
        assert status(store)["xattrs"] is True
        assert os.listxattr(f) == []
        os.setxattr(store.mnt / "var/nix", "user.x", b"1")
        assert os.getxattr(store.mnt / "var/nix", "user.x") == b"1"
    assert os.getxattr(store.upper / "var/nix", "user.x") == b"1"


def test_xattrs_of_a_store_path_are_read_once_a_directory_and_kept(store):
    """With xattr=on, `ls -l` asks for xattrs of every entry: a kept directory's are read
    in one trip, and a second mount asks the lower nothing."""
    def xattr_calls():
        calls = lower_calls(store)
        return calls.get("listxattr", 0)

    with store.mount("xattr=on"):
        first = walk(store.tree)
        dirs = 1 + sum(1 for _, mode, *_ in first if stat.S_ISDIR(mode))
        entries = len(first)
        for _ in range(2):
            subprocess.run(["ls", "-lR", store.tree], check=True, capture_output=True)
        # One listxattr per entry, each read once (the walk's directories in one trip each).
        assert xattr_calls() <= entries + 1
        assert xattr_calls() > 0
    with store.mount("xattr=on"):
        subprocess.run(["ls", "-lR", store.tree], check=True, capture_output=True)
        assert xattr_calls() == 0, "a second mount asked the lower for kept xattrs"


def test_reopening_a_store_file_costs_no_lower_call(store):
    f = store.tree / "d0/sub/f1"
    with store.mount():
        assert f.read_text() == "0-1"
        opens = lower_calls(store).get("open", 0)
        for _ in range(20):
            assert f.read_text() == "0-1"
        assert lower_calls(store).get("open", 0) == opens


def test_missing_names_in_a_store_path_are_answered_from_the_listing(store):
    with store.mount():
        walk(store.tree)
        before = total(lower_calls(store))
        for i in range(50):
            assert not (store.tree / f"d0/sub/nope{i}").exists()
        assert total(lower_calls(store)) == before


def test_copy_up_is_never_hidden_by_a_cached_attribute(store):
    f = store.tree / "d1/sub/f2"
    with store.mount():
        st = os.stat(f)  # cached, with a long timeout
        os.chmod(store.tree, 0o755)
        os.chmod(store.tree / "d1", 0o755)
        os.chmod(store.tree / "d1/sub", 0o755)
        os.chmod(f, 0o600)
        with open(f, "a") as fh:
            fh.write("+")
        st2 = os.stat(f)
        assert stat.S_IMODE(st2.st_mode) == 0o600 and st2.st_size == st.st_size + 1
        assert f.read_text() == "1-2+"
        assert os.stat(store.tree / "d1").st_nlink == 1  # now merged


def test_lower_change_is_seen_after_invalidation(store):
    expr = store.expr({"changing": ["liba"]})
    with store.mount() as m:
        path = nix_build(store.lower_root, expr, "changing")[0]
        assert run_nixfs("sync", m.mnt).returncode == 0
        mpath = store.mnt / path[len("/nix/"):]
        assert (mpath / "bin/changing").read_text().startswith("changing")
        walk(mpath)
        nix(store.lower_root, "nix-store", "--delete", path)
        assert run_nixfs("sync", m.mnt).returncode == 0
        assert not mpath.exists()
        # The path comes back (a new id in the lower): served afresh, never from stale entries.
        (store.lower / "store" / os.path.basename(path)).mkdir()
        nix_build(store.lower_root, expr, "changing")
        assert run_nixfs("sync", m.mnt).returncode == 0
        assert (mpath / "bin/changing").read_text().startswith("changing")
        assert walk(mpath)[0][0] == str(mpath / "bin")


def refreshed_settles(store, at_least: int) -> dict:
    """The daemon's status once its refreshing of stale attributes is done."""
    deadline = time.monotonic() + 10
    while True:
        now = status(store)
        if now["attributes_refreshed"]["done"] >= at_least or time.monotonic() > deadline:
            return now
        time.sleep(0.05)


@pytest.mark.skipif(not features.FEATURES.refresh_attributes,
                    reason="needs pyfuse3 built with scripts/pyfuse3/ (08-refresh-attributes)")
def test_warm_walk_of_a_store_path_is_answered_by_the_kernel(store):
    """Listings, attributes and symlink targets of a store path stay in the kernel,
    so walking it again sends nixfs no request at all.  (After reading a listing or
    a symlink target itself the kernel holds the object's atime stale, and the next
    stat would wait for a GETATTR: nixfs stats those objects through the mount just
    after, and pyfuse3 answers from the attributes nixfs kept there.)"""
    with store.mount():
        first = walk(store.tree)
        dirs = 1 + sum(1 for p, mode, *_ in first if stat.S_ISDIR(mode))
        links = sum(1 for p, mode, *_ in first if stat.S_ISLNK(mode))
        before = refreshed_settles(store, dirs + links)
        refreshed = before["attributes_refreshed"]
        assert refreshed["done"] >= dirs + links and refreshed["failed"] == 0, refreshed
        assert walk(store.tree) == first
        after = status(store)
    # `nixfs status` itself goes through the control socket, not FUSE.
    old = before["fuse_requests"]
    new = {op: n - old.get(op, 0) for op, n in after["fuse_requests"].items() if n != old.get(op, 0)}
    assert new == {}, new
    assert after["kept_attributes"] == before["kept_attributes"]  # not a GETATTR


def test_refresh_attrs_off_leaves_stale_attributes_to_the_kernel(store):
    """``-o refresh_attrs=off`` (a job that walks the store once): the daemon stats
    nothing through the mount after the first walk, and says so; the second walk then
    asks for the attributes of every directory the first one listed."""
    with store.mount("refresh_attrs=off") as m:
        first = walk(store.tree)
        dirs = 1 + sum(1 for p, mode, *_ in first if stat.S_ISDIR(mode))
        time.sleep(0.5)  # past the refresher's delay and interval, were it running
        before = status(store)
        assert before["attributes_refreshed"] == {"done": 0, "failed": 0,
                                                  "off": "refresh_attrs=off"}
        assert walk(store.tree) == first
        after = status(store)
        shown = run_nixfs("status", m.mnt)
    assert "not refreshed (-o refresh_attrs=off)" in shown.stdout, shown.stdout
    # A GETATTR reaches the handler, or pyfuse3 answers it from the attributes it keeps.
    asked = (after["fuse_requests"].get("getattr", 0) - before["fuse_requests"].get("getattr", 0)
             + after["kept_attributes"]["getattr_answered"]
             - before["kept_attributes"]["getattr_answered"])
    assert asked >= dirs, (asked, dirs)


@pytest.mark.skipif(not features.FEATURES.readdir_end,
                    reason="needs pyfuse3 built with scripts/pyfuse3/ (07-readdir-end)")
def test_a_listing_costs_nixfs_one_readdir(store):
    """The kernel reads a listing until a reply comes back empty; nixfs says when its
    reply held the last entry and pyfuse3 answers that closing request itself, so a
    first walk sends nixfs one READDIRPLUS per directory.  A listing that changes
    is still read whole: before and after a file comes and goes, and when a reader
    stopped after the first reply."""
    with store.mount():
        before = status(store)
        first = walk(store.tree)
        after = status(store)
        dirs = 1 + sum(1 for p, mode, *_ in first if stat.S_ISDIR(mode))
        readdirs = after["fuse_requests"]["readdir"] - before["fuse_requests"].get("readdir", 0)
        ends = (after["kept_attributes"]["readdir_ends_answered"]
                - before["kept_attributes"]["readdir_ends_answered"])
        assert (readdirs, ends) == (dirs, dirs)

        sub = store.tree / "d3/sub"
        for d in (store.tree, store.tree / "d3", sub):
            os.chmod(d, 0o755)
        names = sorted(os.listdir(sub))
        (sub / "new").write_text("x")
        assert sorted(os.listdir(sub)) == sorted(names + ["new"])
        (sub / "new2").write_text("y")
        with os.scandir(sub) as it:
            next(it)  # one reply read, the closing request never sent
        assert sorted(os.listdir(sub)) == sorted(names + ["new", "new2"])
        (sub / "new").unlink()
        (sub / "new2").unlink()
        assert sorted(os.listdir(sub)) == names


@pytest.mark.skipif(os.geteuid() != 0, reason="drops the kernel's caches")
def test_a_store_directory_longer_than_one_reply_lists_every_entry_once(store):
    """A listing that takes several READDIRPLUS replies goes on where the last one
    stopped, with nothing missed or twice: read whole, read by two readers at once,
    and by one that stopped after its first reply."""
    lower_tree = store.lower / "store" / store.tree.name
    os.chmod(lower_tree, 0o755)
    (lower_tree / "big").mkdir()
    names = sorted(f"entry-{i:04d}-{'x' * 40}" for i in range(600))
    for name in names:
        (lower_tree / "big" / name).write_text(name)
    os.chmod(lower_tree, 0o555)
    big = store.tree / "big"
    with store.mount():
        before = fuse_requests(store).get("readdir", 0)
        assert sorted(os.listdir(big)) == names
        assert fuse_requests(store)["readdir"] - before > 2  # it took several replies
        drop_kernel_caches()
        with os.scandir(big) as first, os.scandir(big) as second:
            seen = [next(first).name, next(second).name]
            assert sorted(seen[:1] + [e.name for e in first]) == names
            assert sorted(seen[1:] + [e.name for e in second]) == names
        assert sorted(os.listdir(big)) == names


needs_kept_attributes = pytest.mark.skipif(
    not features.FEATURES.keep_attributes,
    reason="needs pyfuse3 built with scripts/pyfuse3/ (05-keep-attributes)")


@needs_kept_attributes
def test_kept_attributes_give_way_to_a_copy_up(store):
    """A directory whose attributes pyfuse3 answers for is copied up when a file is
    created in it: the kernel asks again and sees the copy's, not the lower's."""
    sub = store.tree / "d2/sub"
    with store.mount():
        walk(store.tree)
        walk(store.tree)  # the GETATTRs of the directories are answered from kept ones
        lower_st = os.stat(sub)
        for d in (store.tree, store.tree / "d2", sub):
            os.chmod(d, 0o755)
        os.chmod(sub, 0o700)
        (sub / "new").write_text("x")
        assert "new" in os.listdir(sub)
        st = os.stat(sub)
        assert stat.S_IMODE(st.st_mode) == 0o700
        assert st.st_mtime_ns != lower_st.st_mtime_ns


@needs_kept_attributes
def test_kept_attributes_go_with_the_node(store):
    """Removed or forgotten nodes leave nothing kept: a removed directory is not
    described by its old attributes, and the kernel forgetting nodes frees theirs."""
    lower_tree = store.lower / "store" / store.tree.name
    os.chmod(lower_tree, 0o755)
    (lower_tree / "empty").mkdir()
    os.chmod(lower_tree, 0o555)
    with store.mount():
        walk(store.tree)
        walk(store.tree)
        kept = status(store)["kept_attributes"]["inodes"]
        assert kept >= 11  # d0..d4, their sub, empty
        fd = os.open(store.tree / "empty", os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.chmod(store.tree, 0o755)
            os.rmdir(store.tree / "empty")
            # The kernel asks again (the link count and ctime changed): nixfs answers,
            # not the lower's attributes pyfuse3 kept until the directory was removed.
            before = status(store)
            os.fstat(fd)
            after = status(store)
        finally:
            os.close(fd)
        assert after["fuse_requests"]["getattr"] == before["fuse_requests"].get("getattr", 0) + 1
        assert after["kept_attributes"] == before["kept_attributes"]
        assert after["kept_attributes"]["inodes"] < kept
        if os.geteuid() == 0:
            drop_kernel_caches()
            assert status(store)["kept_attributes"]["inodes"] < kept


def test_closing_files_costs_no_flush_round_trip(store):
    """The first FLUSH is answered ENOSYS, after which the kernel sends none."""
    f = store.tree / "d0/sub/f1"
    with store.mount():
        for _ in range(3):
            assert f.read_text() == "0-1"
        before = fuse_requests(store)
        for _ in range(20):
            assert f.read_text() == "0-1"
        (store.mnt / "new-file").write_text("x")
        after = fuse_requests(store)
    assert before.get("flush", 0) <= 1
    assert after.get("flush", 0) == before.get("flush", 0)


def test_a_walk_into_the_store_reads_the_next_store_paths_ahead(store):
    """Fetching a store path's listing also fetches the next ones in listing order in
    the background, so walking into them asks the lower nothing."""
    with store.mount():
        names = sorted(os.listdir(store.mnt / "store"))
        first = next(i for i, n in enumerate(names) if (store.mnt / "store" / n).is_dir())
        names = names[first:]
        assert len(names) >= 3, names
        walk(store.mnt / "store" / names[0])
        last, settled = None, 0
        for _ in range(100):  # until the background fetches are done
            now = total(lower_calls(store))
            settled = settled + 1 if now == last else 0
            if settled >= 3:
                break
            last = now
            time.sleep(0.05)
        before = total(lower_calls(store))
        for name in names[1:]:
            walk(store.mnt / "store" / name)
        assert total(lower_calls(store)) == before


async def test_read_ahead_names_come_from_few_index_queries(tmp_path):
    """A walk asks for the store paths after each one it enters: the policy answers
    from one query per many asks, skips paths not shown, and sees the index change."""
    from nixfs.nixdb.lowerindex import LowerIndex
    from nixfs.nixdb.storepolicy import NixStorePolicy
    index = LowerIndex(str(tmp_path / "index.sqlite"))
    names = [b"%03d-p" % i for i in range(100)]
    with index.conn:
        index.add((n, i, 1 if i % 10 == 5 else 0) for i, n in enumerate(names))
    policy = NixStorePolicy(index)
    queries = []
    real = index.shown_after
    index.shown_after = lambda name, count: queries.append(name) or real(name, count)
    shown = [n for i, n in enumerate(names) if i % 10 != 5]
    for i, n in enumerate(shown):
        assert await policy.read_ahead(b"store/" + n, 8) == [b"store/" + m for m in shown[i + 1:i + 9]]
    assert len(queries) <= 100 // (8 * 8 - 8) + 8 + 1  # (the last few ask each time)
    assert await policy.read_ahead(b"store/005-p/bin", 8) == []
    other = LowerIndex(str(tmp_path / "index.sqlite"))  # the sync worker's connection
    with other.conn:
        other.set_state([b"001-p"], 1)
    assert await policy.read_ahead(b"store/000-p", 2) == [b"store/002-p", b"store/003-p"]
    with index.conn:  # a change through the policy's own connection is seen too
        index.set_state([b"002-p"], 1)
    assert await policy.read_ahead(b"store/000-p", 2) == [b"store/003-p", b"store/004-p"]
    other.close()
    index.close()
