"""A damaged, truncated, missing or newer map, a changed or missing base or delta are clear
errors (CowError, EIO), never zeros; bases are opened below their root, never through a
symlink, and a failed open leaves nothing behind."""

import hashlib
import os
import struct

import pytest

from cowops import PAGE, create, make_base, open_cow
from nixfs.cow import cowmap
from nixfs.cow.bases import ReadOnlyFile, base_opener
from nixfs.cow.cowmap import CowError


def _damaged(tmp_path, change) -> CowError:
    tmp_path.mkdir(exist_ok=True)
    make_base(tmp_path, "base", 3 * PAGE, 3)
    with create(tmp_path, "f", "base") as cow:
        cow.pwrite(b"z" * 10, PAGE)
    map_file = tmp_path / cowmap.map_name("f")
    change(map_file)
    with pytest.raises(CowError) as caught:
        open_cow(tmp_path, "f")
    return caught.value


def _flip(path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 1
    path.write_bytes(bytes(data))


def test_a_flipped_bit_in_the_map_is_an_error(tmp_path):
    error = _damaged(tmp_path, lambda p: _flip(p, 30))
    assert "checksum" in str(error)


def test_a_truncated_map_is_an_error(tmp_path):
    error = _damaged(tmp_path / "a", lambda p: p.write_bytes(p.read_bytes()[:-5]))
    assert "damaged" in str(error)
    error = _damaged(tmp_path / "b", lambda p: p.write_bytes(p.read_bytes()[:20]))
    assert "truncated" in str(error)


def test_a_missing_map_is_an_error_not_zeros(tmp_path):
    error = _damaged(tmp_path, lambda p: p.unlink())
    assert "missing" in str(error)


def test_a_newer_format_is_refused(tmp_path):
    def bump(path):
        body = bytearray(path.read_bytes()[:-32])
        struct.pack_into("<H", body, 8, 2)
        path.write_bytes(bytes(body) + hashlib.sha256(body).digest())
    assert "format 2 not supported" in str(_damaged(tmp_path, bump))


def test_a_changed_base_is_an_error(tmp_path):
    make_base(tmp_path, "base", 3 * PAGE, 3)
    create(tmp_path, "f", "base").close()
    with open(tmp_path / "base", "ab") as grown:
        grown.write(b"more")
    with pytest.raises(CowError, match="the base changed"):
        open_cow(tmp_path, "f")


def test_missing_delta_and_base_are_errors(tmp_path):
    make_base(tmp_path, "base", 3 * PAGE, 3)
    create(tmp_path, "f", "base").close()
    (tmp_path / "base").rename(tmp_path / "gone")
    with pytest.raises(CowError, match="base missing"):
        open_cow(tmp_path, "f")
    (tmp_path / "gone").rename(tmp_path / "base")
    (tmp_path / "f").unlink()
    with pytest.raises(CowError, match="delta missing"):
        open_cow(tmp_path, "f")


def test_a_base_outside_the_root_is_refused(tmp_path):
    with pytest.raises(CowError, match="inside"):
        base_opener(tmp_path)("../etc/passwd")


def test_map_round_trip_keeps_every_field():
    m = cowmap.CowMap(4096, 10 * 4096 + 5, 3 * 4096, cowmap.BaseRef("g/1/db.sqlite", 9 * 4096,
                      "ab" * 32), bytearray(b"\x05\x04"))
    assert cowmap.decode(cowmap.encode(m)) == m


def test_a_read_only_base_file(tmp_path):
    (tmp_path / "b").write_bytes(b"abc")
    base = ReadOnlyFile.open(tmp_path / "b")
    assert (base.size(), base.pread(10, 1)) == (3, b"bc")
    base.close()


def test_base_opener_follows_no_symlink_below_its_root(tmp_path):
    base = make_base(tmp_path, "base", 2 * PAGE, 9)
    (tmp_path / "g").mkdir()
    (tmp_path / "g/base").write_bytes(base)
    os.symlink("g", tmp_path / "link")
    os.symlink("base", tmp_path / "g/alias")
    for rel in ("link/base", "g/alias"):
        with pytest.raises(CowError, match="symlink"):
            base_opener(tmp_path)(rel)
    root_fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        opened = base_opener(root_fd)("g/base")
        assert opened.pread(10, PAGE) == base[PAGE:PAGE + 10]
        opened.close()
        os.fstat(root_fd)  # still the caller's
    finally:
        os.close(root_fd)


def test_a_lone_map_is_replaced_by_the_nextcreate(tmp_path):
    """A crash in remove() (or in create, before the delta) leaves only the hidden map."""
    make_base(tmp_path, "base", PAGE, 1)
    with create(tmp_path, "f", "base") as cow:
        cow.pwrite(b"old", 0)
    os.unlink(tmp_path / "f")
    with create(tmp_path, "f", "base") as cow:
        assert cow.pread(3, 0) == (tmp_path / "base").read_bytes()[:3]
    with pytest.raises(FileExistsError):
        create(tmp_path, "f", "base")
    assert cowmap.read(tmp_path / cowmap.map_name("f")).bits == bytearray()


def test_failed_chain_opens_leave_no_descriptor_behind(tmp_path):
    make_base(tmp_path, "base", PAGE, 1)
    create(tmp_path, "c1", "base").close()
    create(tmp_path, "c2", "c1").close()
    (tmp_path / "base").unlink()
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(20):
        with pytest.raises(CowError, match="base missing"):
            base_opener(tmp_path)("c2")
    assert len(os.listdir("/proc/self/fd")) == before
