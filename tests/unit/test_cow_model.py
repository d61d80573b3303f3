"""Copy-on-write upper files in the overlay model, without FUSE: what a crash can leave
(a map with no delta, a damaged map), a chain of bases, an open file unlinked, and a
directory renamed under an open COW file."""

import errno
import os

import pytest

from nixfs.cow import cowmap
from nixfs.cow.bases import base_opener
from nixfs.cow.cowfile import CowFile
from nixfs.overlay import Caller, Overlay, SetAttr

ME = Caller(os.getuid(), os.getgid())
BASE = bytes(range(256)) * 64  # 16 KiB: four pages


@pytest.fixture
def layers(tmp_path):
    lower, upper = tmp_path / "lower", tmp_path / "upper"
    (lower / "gen").mkdir(parents=True)
    (lower / "gen/base").write_bytes(BASE)
    (upper / "d").mkdir(parents=True)
    return lower, upper


def make_cow(delta, lower, base_rel: str, *, writes=()) -> None:
    """A COW file at *delta* over the lower's *base_rel* (itself one, or a plain file)."""
    base = base_opener(lower)(base_rel)
    try:
        cow = CowFile.create(delta, cowmap.map_path(delta), base, base_path=base_rel)
        for offset, data in writes:
            cow.pwrite(data, offset)
        cow.close()
    finally:
        base.close()


@pytest.fixture
def fs(layers):
    lower, upper = layers
    make_cow(upper / "d/db", lower, "gen/base", writes=[(4096, b"new")])
    overlay = Overlay(str(lower), str(upper))
    yield overlay
    overlay.close()


async def walk(fs, path: str):
    node = fs.root
    for part in filter(None, path.split("/")):
        node, _ = await fs.lookup(node, part.encode())
    return node


LOGICAL = BASE[:4096] + b"new" + BASE[4099:]


async def test_size_content_and_stats(fs, layers):
    node = await walk(fs, "d/db")
    attr = await fs.getattr(node)
    assert attr.st.st_size == len(BASE)
    # Its attributes change with every write: never kept (pyfuse3) nor refreshed ahead.
    assert not attr.fixed and not fs.attributes_settled(node)
    assert await fs.read_node(node, 0, 1 << 20) == LOGICAL
    cows = fs.stats()["cow_files"]
    assert cows["open"] == 1 and cows["read"] == 1 and cows["base"]["reads"] >= 1


async def test_a_map_with_no_delta_is_dropped_when_the_name_is_made(fs, layers):
    _, upper = layers
    d = await walk(fs, "d")
    for make in ("create", "rename", "link"):
        stale = upper / "d" / f".wh..wh..nixfs-cow.{make}"
        stale.write_bytes(b"a map whose delta a crash removed")
        if make == "create":
            h, node, _ = await fs.create(d, b"create", 0o644, os.O_RDWR, ME)
            fs.release(h.fh)
        else:
            (upper / "d/src").write_bytes(b"plain")
            src = await walk(fs, "d/src")
            if make == "rename":
                await fs.rename(d, b"src", d, b"rename")
            else:
                await fs.link(src, d, b"link")
        assert not stale.exists(), make
        node = await walk(fs, f"d/{make}")
        await fs.write_node(node, 0, b"plain data")
        assert await fs.read_node(node, 0, 100) == b"plain data"


async def test_a_damaged_map_is_an_error_and_can_still_be_unlinked(fs, layers):
    _, upper = layers
    (upper / "d/.wh..wh..nixfs-cow.db").write_bytes(b"NIXFSCOW garbage")
    d = await walk(fs, "d")
    node = await walk(fs, "d/db")  # (found: it can be removed)
    for _ in range(2):
        with pytest.raises(OSError) as e:
            await fs.read_node(node, 0, 100)
        assert e.value.errno == errno.EIO
    await fs.unlink(d, b"db")
    assert sorted(os.listdir(upper / "d")) == []


async def test_a_base_that_is_itself_a_cow_delta(layers):
    lower, upper = layers
    # gen/2 is a delta over gen/base (an incremental generation), the upper's over gen/2.
    make_cow(lower / "gen/2", lower, "gen/base", writes=[(0, b"gen2")])
    make_cow(upper / "d/db", lower, "gen/2", writes=[(8192, b"upper")])
    before = {p.name: p.read_bytes() for p in (lower / "gen").iterdir()}
    fs = Overlay(str(lower), str(upper))
    try:
        node = await walk(fs, "d/db")
        expected = b"gen2" + BASE[4:8192] + b"upper" + BASE[8197:]
        assert await fs.read_node(node, 0, 1 << 20) == expected
        assert fs.stats()["cow_files"]["base"]["opened"] == 2
    finally:
        fs.close()
    assert {p.name: p.read_bytes() for p in (lower / "gen").iterdir()} == before


async def test_unlinked_while_held_it_is_served_until_forgotten(layers):
    lower, upper = layers
    make_cow(upper / "d/db", lower, "gen/base")
    fs = Overlay(str(lower), str(upper))
    d = await walk(fs, "d")
    node = await walk(fs, "d/db")
    await fs.unlink(d, b"db")
    assert os.listdir(upper / "d") == []
    work = upper / ".nixfs/work"
    (folder,) = os.listdir(work)
    assert sorted(os.listdir(work / folder)) == [".wh..wh..nixfs-cow.db", "db"]
    await fs.write_node(node, 0, b"after")
    await fs.fsync_node(node, False)
    assert await fs.read_node(node, 0, 8) == b"after" + BASE[5:8]
    assert (await fs.getattr(node)).st.st_size == len(BASE)
    fs.forget(node.ino, node.lookups)  # (its CowFile is closed in a task of its own...)
    fs.close()  # (...or at the end of the mount at the latest)
    assert os.listdir(work) == []


async def test_a_directory_renamed_under_an_open_cow_file(fs, layers):
    _, upper = layers
    node = await walk(fs, "d/db")
    await fs.write_node(node, 0, b"moved")
    await fs.rename(fs.root, b"d", fs.root, b"e")
    await fs.setattr(node, SetAttr(size=9000))
    await fs.fsync_node(node, False)
    assert sorted(os.listdir(upper / "e")) == [".wh..wh..nixfs-cow.db", "db"]
    assert not (upper / "d").exists()
    m = cowmap.read(upper / "e/.wh..wh..nixfs-cow.db")
    assert m.size == 9000
