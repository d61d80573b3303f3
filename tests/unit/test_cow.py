"""A COW file behaves as a plain file: the same random operations on both read the same,
over a plain base and over chains of COW bases; a damaged map is an error, never zeros."""

import hashlib
import os
import random
import struct

import pytest

from cowops import PAGE, apply_cow, apply_plain, ops
from nixfs.cow import cowmap
from nixfs.cow.bases import ReadOnlyFile, base_opener
from nixfs.cow.cowfile import CowFile
from nixfs.cow.cowmap import CowError


def _make_base(directory, name: str, size: int, seed: int) -> bytes:
    data = random.Random(seed).randbytes(size)
    (directory / name).write_bytes(data)
    return data


def _create(directory, name: str, base_name: str | None, page: int = PAGE) -> CowFile:
    base = base_opener(directory)(base_name) if base_name else None
    return CowFile.create(directory / name, directory / cowmap.map_name(name), base,
                          base_path=base_name, page_size=page)


def _open(directory, name: str, **kw) -> CowFile:
    return CowFile.open(directory / name, directory / cowmap.map_name(name),
                        base_opener(directory), **kw)


def _run(directory, name: str, ref_path, seed: int, base_size: int, count: int = 300):
    """Run the ops on the COW file *name* and on the plain *ref_path*, comparing every read
    and, at each fsync and reopen, the whole content and size."""
    cow = _open(directory, name)
    ref = os.open(ref_path, os.O_RDWR)
    try:
        for step, (op, args) in enumerate(ops(seed, base_size, count)):
            if op == "reopen":
                cow.close()
                cow = _open(directory, name)
            got, want = apply_cow(cow, op, args), apply_plain(ref, op, args)
            assert got == want, f"seed {seed} step {step}: {op} {args[:1]} reads differently"
            if op in ("fsync", "reopen"):
                _same(cow, ref, f"seed {seed} step {step} ({op})")
        _same(cow, ref, f"seed {seed} at the end")
    finally:
        cow.close()
        os.close(ref)


def _same(cow: CowFile, ref: int, where: str) -> None:
    size = os.fstat(ref).st_size
    assert cow.size() == size, where
    assert cow.pread(size + 10, 0) == os.pread(ref, size + 10, 0), where


@pytest.mark.parametrize("seed", range(12))
def test_random_operations_read_as_a_plain_file(tmp_path, seed):
    base_size = [0, 1, PAGE - 1, PAGE, PAGE + 1, 7 * PAGE + 100][seed % 6]
    base = _make_base(tmp_path, "base", base_size, seed)
    (tmp_path / "ref").write_bytes(base)
    _create(tmp_path, "f", "base").close()
    _run(tmp_path, "f", tmp_path / "ref", seed, base_size)


def test_a_chain_of_three_reads_as_its_plain_files(tmp_path):
    """base <- c1 <- c2 <- c3, each changed at random over the one below, each compared
    with a plain copy that had the same changes."""
    content = _make_base(tmp_path, "base", 9 * PAGE + 17, 99)
    below = "base"
    for level in (1, 2, 3):
        name = f"c{level}"
        (tmp_path / f"ref{level}").write_bytes(content)
        _create(tmp_path, name, below).close()
        _run(tmp_path, name, tmp_path / f"ref{level}", 1000 + level, len(content), count=150)
        content = (tmp_path / f"ref{level}").read_bytes()
        below = name
    with _open(tmp_path, "c3", readonly=True) as top:
        assert top.pread(len(content) + 1, 0) == content
    # The lower levels are unchanged by the ones above.
    with _open(tmp_path, "c1", readonly=True) as c1:
        assert c1.pread(1 << 20, 0) == (tmp_path / "ref1").read_bytes()


def test_sqlite_sized_pages_over_a_4k_map(tmp_path):
    """Writes of 1 KiB pages inside 4 KiB COW pages keep the base's other three."""
    base = _make_base(tmp_path, "base", 16384, 5)
    _create(tmp_path, "f", "base", page=4096).close()
    with _open(tmp_path, "f") as cow:
        cow.pwrite(b"\1" * 1024, 5120)
        want = bytearray(base)
        want[5120:6144] = b"\1" * 1024
        assert cow.pread(16384, 0) == bytes(want)
        assert cow.blocks() * 512 <= 2 * 4096


def test_a_write_past_the_end_leaves_zeros_not_old_delta_bytes(tmp_path):
    """Shrink (the delta keeps its bytes until fsync), then grow over them: zeros."""
    _make_base(tmp_path, "base", 0, 0)
    _create(tmp_path, "f", "base").close()
    with _open(tmp_path, "f") as cow:
        cow.pwrite(b"x" * 3 * PAGE, 0)
        cow.truncate(10)
        cow.pwrite(b"y", 2 * PAGE + 5)
        assert cow.pread(3 * PAGE, 0) == b"x" * 10 + bytes(2 * PAGE - 5) + b"y"
        cow.truncate(PAGE + 1)
        cow.truncate(3 * PAGE)
        assert cow.pread(3 * PAGE, 0) == b"x" * 10 + bytes(3 * PAGE - 10)


def test_truncation_cuts_the_delta_at_fsync(tmp_path):
    _make_base(tmp_path, "base", 0, 0)
    _create(tmp_path, "f", "base").close()
    with _open(tmp_path, "f") as cow:
        cow.pwrite(b"x" * 64 * PAGE, 0)
        cow.fsync()
        cow.truncate(PAGE)
        assert os.stat(tmp_path / "f").st_size == 64 * PAGE  # the old map still needs it
        cow.fsync()
        assert os.stat(tmp_path / "f").st_size == PAGE


def test_a_cow_file_without_a_base(tmp_path):
    with _create(tmp_path, "f", None) as cow:
        cow.pwrite(b"hello", 3)
        assert cow.pread(100, 0) == b"\0\0\0hello"
    with _open(tmp_path, "f") as cow:
        assert cow.size() == 8


def test_reads_never_touch_the_delta_for_base_pages(tmp_path):
    """A fresh COW over a big base holds nothing: the upper stays small."""
    _make_base(tmp_path, "base", 1 << 20, 1)
    with _create(tmp_path, "f", "base", page=4096) as cow:
        assert cow.pread(1 << 20, 0) == (tmp_path / "base").read_bytes()
        assert cow.blocks() == 0


# -- damage ------------------------------------------------------------------------------

def _damaged(tmp_path, change) -> CowError:
    tmp_path.mkdir(exist_ok=True)
    _make_base(tmp_path, "base", 3 * PAGE, 3)
    with _create(tmp_path, "f", "base") as cow:
        cow.pwrite(b"z" * 10, PAGE)
    map_file = tmp_path / cowmap.map_name("f")
    change(map_file)
    with pytest.raises(CowError) as caught:
        _open(tmp_path, "f")
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
    _make_base(tmp_path, "base", 3 * PAGE, 3)
    _create(tmp_path, "f", "base").close()
    with open(tmp_path / "base", "ab") as grown:
        grown.write(b"more")
    with pytest.raises(CowError, match="the base changed"):
        _open(tmp_path, "f")


def test_missing_delta_and_base_are_errors(tmp_path):
    _make_base(tmp_path, "base", 3 * PAGE, 3)
    _create(tmp_path, "f", "base").close()
    (tmp_path / "base").rename(tmp_path / "gone")
    with pytest.raises(CowError, match="base missing"):
        _open(tmp_path, "f")
    (tmp_path / "gone").rename(tmp_path / "base")
    (tmp_path / "f").unlink()
    with pytest.raises(CowError, match="delta missing"):
        _open(tmp_path, "f")


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


def test_a_stale_writer_closing_never_undoes_a_newer_map(tmp_path):
    """Two openers of one delta (two processes, as SQLite's locks order them): the first
    publishes a change; the second takes it, grows the file and syncs; the first, closing
    with its older map, neither cuts the delta to its size nor puts its map back."""
    base = _make_base(tmp_path, "base", 2 * PAGE, 8)
    _create(tmp_path, "f", "base").close()
    first, second = _open(tmp_path, "f"), _open(tmp_path, "f")
    first.pwrite(b"y", 0)
    first.publish()
    assert second.refresh()
    second.pwrite(b"z" * 4 * PAGE, 2 * PAGE)
    second.fsync()
    first.close()
    second.close()
    with _open(tmp_path, "f") as cow:
        assert cow.pread(7 * PAGE, 0) == b"y" + base[1:] + b"z" * 4 * PAGE


def test_refresh_refuses_to_drop_unwritten_changes(tmp_path):
    _make_base(tmp_path, "base", 2 * PAGE, 8)
    _create(tmp_path, "f", "base").close()
    first, second = _open(tmp_path, "f"), _open(tmp_path, "f")
    first.pwrite(b"a", 0)
    second.pwrite(b"b", PAGE)
    first.fsync()
    with pytest.raises(CowError, match="unwritten changes"):
        second.refresh()
    first.close()
