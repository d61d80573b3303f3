"""The overlay model on its own, without FUSE."""

import errno
import os
import stat

import pytest

from nixfs.overlay import Caller, Overlay, SetAttr
from nixfs.overlay.types import Notifier
from nixfs.overlay.policy import LowerPolicy
from nixfs.libc import RENAME_EXCHANGE, RENAME_NOREPLACE

ME = Caller(os.getuid(), os.getgid())


@pytest.fixture
def fs(lower, upper):
    overlay = Overlay(str(lower), str(upper))
    yield overlay
    overlay.close()


async def walk(fs, path: str):
    node = fs.root
    for part in filter(None, path.split("/")):
        node, _ = await fs.lookup(node, part.encode())
    return node


async def names(fs, path: str) -> list[bytes]:
    dh = await fs.opendir(await walk(fs, path))
    try:
        return sorted(e.name for e in dh.entries)
    finally:
        fs.releasedir(dh.fh)


async def read_all(fs, node) -> bytes:
    h = await fs.open(node, os.O_RDONLY)
    try:
        return await fs.read(h, 0, 1 << 20)
    finally:
        fs.release(h.fh)


async def expect_errno(code, coro):
    with pytest.raises(OSError) as info:
        await coro
    assert info.value.errno == code, os.strerror(info.value.errno)


async def test_lookup_merges_layers(fs, upper):
    (upper / "dir").mkdir()
    (upper / "dir/only-upper").write_text("u")
    assert b"only-upper" in await names(fs, "dir")
    assert b"file" in await names(fs, "dir")
    node = await walk(fs, "dir")
    assert node.upper and node.lower is not None and node.merged
    attr = await fs.getattr(node)
    assert attr.nlink == 1 and attr.ino == node.ino


async def test_lookup_counts_and_forget(fs):
    node = await walk(fs, "dir/sub/nested")
    again = await walk(fs, "dir/sub/nested")
    assert node is again and node.lookups == 2
    parent = node.parent
    fs.forget(node.ino, 2)
    assert fs.inodes.get(node.ino) is None
    assert fs.inodes.child(parent, b"nested") is None
    fresh = await walk(fs, "dir/sub/nested")
    assert fresh.ino != node.ino  # numbers are never reused


class FrozenStore(LowerPolicy):
    """The lower's ``store/*`` never change (as valid Nix store paths)."""

    def tag(self, parent_tag, name):
        if parent_tag == self.ROOT:
            return "store" if name == b"store" else None
        return "path" if parent_tag in ("store", "path") else None

    def immutable(self, parent_tag):
        return parent_tag in ("store", "path")

    def complete(self, tag):
        return tag == "path"

    async def cache_key(self, lower_path):
        return lower_path if lower_path.startswith(b"store/") else None


async def test_listing_an_immutable_directory_gives_what_lookups_give(lower, upper):
    """A lower-only directory that never changes is listed from its kept listing
    alone; its entries are the nodes lookups give, with the same attributes, and an
    entry copied up after the listing was taken is described by its copy."""
    fs = Overlay(str(lower), str(upper), policy=FrozenStore())
    try:
        pkg = await walk(fs, "store/aaa-pkg")
        known, known_attr = await fs.lookup(pkg, b"bin")
        dh = await fs.opendir(pkg)
        assert dh.fixed and sorted(e.name for e in dh.entries) == [b"bin", b"share"]
        listed = {dh.entries[i].name: await fs.readdir_entry(dh, i)
                  for i in range(len(dh.entries))}
        node, attr = listed[b"bin"]
        assert node is known and attr == known_attr  # a known node, not a second one
        share, attr = listed[b"share"]
        assert share.lookups == 0 and not share.upper and attr.fixed
        assert (attr.ino, attr.st.st_mode, attr.st.st_mtime_ns) == (
            share.ino, (lower / "store/aaa-pkg/share").lstat().st_mode,
            (lower / "store/aaa-pkg/share").lstat().st_mtime_ns)
        fs.releasedir(dh.fh)

        dh = await fs.opendir(pkg)
        await fs.setattr(known, SetAttr(mode=stat.S_IFDIR | 0o700))  # copies it up
        node, attr = await fs.readdir_entry(dh, [e.name for e in dh.entries].index(b"bin"))
        assert node is known and node.upper and not attr.fixed
        assert stat.S_IMODE(attr.st.st_mode) == 0o700
        fs.releasedir(dh.fh)
    finally:
        fs.close()


class NumberedStore(FrozenStore):
    """A store whose lower paths the policy names and numbers (as a Nix store's index
    does with the lower database's ids)."""

    def __init__(self, lower):
        self.ids = {n: 10 + i for i, n in enumerate(sorted(os.listdir(lower / "store")))}

    async def lower_names(self, parent_tag):
        return sorted(n.encode() for n in self.ids) if parent_tag == "store" else None

    async def entry_numbers(self, parent_tag, names):
        if parent_tag != "store":
            return [None] * len(names)
        return [self.ids.get(os.fsdecode(n)) for n in names]


async def test_a_long_listing_goes_without_nodes_numbered_as_lookups_number_them(tmp_path, upper):
    """Past half the node budget a listing makes no nodes where the policy numbers
    its entries: each says the inode number a lookup of it gives (then or later),
    and an entry the policy does not number (upper-only) still gets its node."""
    lower = tmp_path / "lower"
    for i in range(12):
        (lower / f"store/p{i:02}").mkdir(parents=True)
    (upper / "store").mkdir()
    (upper / "store/own").mkdir()
    policy = NumberedStore(lower)
    fs = Overlay(str(lower), str(upper), policy=policy, max_nodes=20, nodeless_listings=True)
    try:
        store = await walk(fs, "store")
        known = await walk(fs, "store/p03")
        nodes = len(fs.inodes)
        dh = await fs.opendir(store)
        assert dh.nodeless and len(dh.entries) == 13
        sent = {dh.entries[i].name: await fs.readdir_entry(dh, i) for i in range(13)}
        fs.releasedir(dh.fh)
        own_node, _ = sent.pop(b"own")
        assert own_node.upper and len(fs.inodes) == nodes + 1  # the one node made
        assert sent[b"p03"].ino == known.ino and stat.S_ISDIR(sent[b"p03"].mode)
        for name, dirent in sent.items():
            node = await walk(fs, "store/" + name.decode())
            assert node.ino == dirent.ino, name
        assert fs.stats()["entries_without_node"] == 12
    finally:
        fs.close()
    fs = Overlay(str(lower), str(upper), policy=policy, max_nodes=20)  # an adapter that cannot
    try:
        dh = await fs.opendir(await walk(fs, "store"))
        assert not dh.nodeless
        node, attr = await fs.readdir_entry(dh, 0)
        assert attr.ino == node.ino
        fs.releasedir(dh.fh)
    finally:
        fs.close()


class AskLog(Notifier):
    def __init__(self):
        self.asked = []

    def entry_changed(self, parent_ino, name):
        self.asked.append((parent_ino, name))


async def test_trimming_asks_the_kernel_to_forget_each_node_once(tmp_path, upper):
    """Beyond its budget the node table asks the kernel to forget its oldest nodes.
    The FORGETs come late, so a node already asked is not asked again while the
    table grows on: each ask would queue behind the others (a walk of a million
    entries once piled up millions of asks and gigabytes)."""
    lower = tmp_path / "many-lower"
    for d in range(13):
        (lower / f"many/d{d}").mkdir(parents=True)
        for f in range(100):
            (lower / f"many/d{d}/f{f}").write_text("x")
    log = AskLog()
    fs = Overlay(str(lower), str(upper), max_nodes=100, notify=log)

    async def look_up(dirs):
        for d in dirs:
            parent = await walk(fs, f"many/d{d}")
            for f in range(100):
                await fs.lookup(parent, f"f{f}".encode())

    try:
        await look_up(range(10))
        assert len(fs.inodes) > 1000  # the kernel forgot nothing yet
        first = log.asked[:]
        assert len(first) == len(set(first)) and 600 <= len(first) <= 1000
        for parent_ino, name in first[:500]:  # now it forgets half of them
            node = fs.inodes.child(fs.node(parent_ino), name)
            fs.forget(node.ino, node.lookups)
        del log.asked[:]
        await look_up(range(10, 13))
        assert log.asked and not set(log.asked) & set(first[500:])
    finally:
        fs.close()


async def test_reserved_names(fs):
    await expect_errno(errno.ENOENT, fs.lookup(fs.root, b".nixfs"))
    await expect_errno(errno.ENOENT, fs.lookup(fs.root, b".wh.dir"))
    await expect_errno(errno.EINVAL, fs.mkdir(fs.root, b".wh.x", 0o755, ME))
    await expect_errno(errno.EPERM, fs.mkdir(fs.root, b".nixfs", 0o755, ME))
    await expect_errno(errno.ENAMETOOLONG, fs.lookup(fs.root, b"x" * 256))


async def test_unlink_lower_writes_whiteout(fs, upper):
    d = await walk(fs, "dir")
    await fs.unlink(d, b"file")
    assert (upper / "dir/.wh.file").exists()
    await expect_errno(errno.ENOENT, fs.lookup(d, b"file"))
    assert b"file" not in await names(fs, "dir")


async def test_copy_up_is_atomic_and_leaves_no_temporaries(fs, upper):
    node = await walk(fs, "dir/file")
    h = await fs.open(node, os.O_WRONLY | os.O_APPEND)
    await fs.write(h, 0, b"more\n")
    fs.release(h.fh)
    assert (upper / "dir/file").read_bytes() == b"content\nmore\n"
    assert os.listdir(upper / ".nixfs/work") == []
    assert fs.copy_ups == 2  # dir and dir/file


async def test_open_trunc_skips_copying_data(fs, upper):
    node = await walk(fs, "dir/file")
    before = fs.lower.calls["read"]
    h = await fs.open(node, os.O_WRONLY | os.O_TRUNC)
    fs.release(h.fh)
    assert fs.lower.calls["read"] == before
    assert (upper / "dir/file").read_bytes() == b""


async def test_rmdir_merged_dir_with_whiteouts(fs, upper):
    empty = await walk(fs, "dir/ro-dir")
    await fs.setattr(empty, SetAttr(mode=0o755))
    await fs.unlink(empty, b"x")
    await fs.rmdir(await walk(fs, "dir"), b"ro-dir")
    assert not (upper / "dir/ro-dir").exists()
    assert (upper / "dir/.wh.ro-dir").exists()
    assert os.listdir(upper / ".nixfs/work") == []


async def test_rename_errors(fs):
    d = await walk(fs, "dir")
    await expect_errno(errno.ENOTEMPTY, fs.rename(fs.root, b"store", fs.root, b"dir"))
    await expect_errno(errno.EISDIR, fs.rename(fs.root, b"top-file", fs.root, b"dir"))
    await expect_errno(errno.ENOTDIR, fs.rename(fs.root, b"dir", fs.root, b"top-file"))
    await expect_errno(errno.EINVAL, fs.rename(fs.root, b"dir", d, b"inside"))
    await expect_errno(errno.EEXIST, fs.rename(d, b"file", fs.root, b"top-file", RENAME_NOREPLACE))
    await expect_errno(errno.ENOENT, fs.rename(d, b"missing", fs.root, b"x"))


async def test_rename_exchange(fs):
    d = await walk(fs, "dir")
    await fs.rename(d, b"file", fs.root, b"top-file", RENAME_EXCHANGE)
    assert await read_all(fs, await walk(fs, "dir/file")) == b"top\n"
    assert await read_all(fs, await walk(fs, "top-file")) == b"content\n"


async def test_rename_dir_over_empty_lower_dir(fs, upper):
    d = await walk(fs, "dir")
    await fs.mkdir(d, b"fresh", 0o755, ME)
    await fs.rename(d, b"fresh", d, b"empty")
    assert await names(fs, "dir/empty") == []
    # Renamed over a lower directory: that directory's lower entries stay hidden.
    await fs.rename(fs.root, b"store", d, b"empty")
    assert await names(fs, "dir/empty") == [b"aaa-pkg", b"bbb-lib"]


async def test_hard_link_shares_node(fs, upper):
    d = await walk(fs, "dir")
    node = await walk(fs, "dir/file")
    attr = await fs.link(node, d, b"again")
    assert attr.ino == node.ino and attr.nlink == 2
    other, _ = await fs.lookup(d, b"again")
    assert other is node
    await fs.unlink(d, b"file")
    assert (await fs.getattr(node)).nlink == 1
    assert node.name == b"again"


async def test_owner_is_squashed_for_unprivileged(lower, upper):
    fs = Overlay(str(lower), str(upper), owner=(1234, 5678), privileged=False)
    try:
        attr = await fs.getattr(await walk(fs, "dir/file"))
        assert (attr.uid, attr.gid) == (1234, 5678)
    finally:
        fs.close()


async def test_readonly(lower, upper):
    fs = Overlay(str(lower), str(upper), readonly=True)
    try:
        node = await walk(fs, "dir/file")
        await expect_errno(errno.EROFS, fs.open(node, os.O_WRONLY))
        await expect_errno(errno.EROFS, fs.mkdir(fs.root, b"x", 0o755, ME))
        assert await read_all(fs, node) == b"content\n"
    finally:
        fs.close()


async def test_symlink_never_followed(fs):
    node = await walk(fs, "dir/link-abs")
    assert node.kind == stat.S_IFLNK
    assert await fs.readlink(node) == b"/etc/passwd"
    await expect_errno(errno.ELOOP, fs.open(node, os.O_RDONLY))
    await expect_errno(errno.ENOTDIR, fs.lookup(node, b"x"))


async def test_recover_removes_leftovers(fs, upper):
    (upper / ".nixfs/work/tmp.1.1").write_text("half a copy")
    (upper / ".nixfs/work/trash.1.2").mkdir()
    (upper / ".nixfs/work/trash.1.2/.wh.x").write_text("")
    assert sorted(fs.state.recover()) == [b"tmp.1.1", b"trash.1.2"]
    assert os.listdir(upper / ".nixfs/work") == []


async def test_upper_changes_are_counted(fs):
    """Every change of the upper goes through its layer object, counted as its reads are."""
    await fs.mkdir(fs.root, b"d", 0o755, ME)
    await fs.rename(fs.root, b"d", fs.root, b"e")
    await fs.rmdir(fs.root, b"e")  # moved into the work folder, emptied there
    node = await walk(fs, "dir/file")
    await fs.setattr(node, SetAttr(mode=0o600))  # a copy-up of dir and file, then chmod
    calls = fs.upper.calls
    assert (calls["mkdir"], calls["rename"]) == (1, 4)
    assert calls["setattr"] >= 1


async def test_stats_name_what_status_shows(fs):
    node = await walk(fs, "dir/file")
    await fs.setattr(node, SetAttr(mode=0o600))
    stats = fs.stats()
    assert stats["copy_ups"] == 2 and stats["nodes"] == 3  # the root, dir, dir/file
    assert stats["upper_calls"]["setattr"] >= 1 and stats["lower_calls"]["lstat"] >= 2
    assert stats["cache"] == {"hits": 0, "misses": 0, "loaded_from_disk": 0, "listings": 0,
                              "bytes_on_disk": 0, "hit_ratio": None, "catalog_reads": 0,
                              "store_queries": 0}
