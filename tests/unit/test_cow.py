"""A COW file behaves as a plain file: the same random operations on both read the same,
over a plain base and over chains of COW bases; a damaged map is an error, never zeros."""

import hashlib
import os
import random
import struct
import threading

import pytest

from cowops import PAGE, apply_cow, apply_plain, ops
from nixfs.cow import cowmap
from nixfs.cow.bases import ReadOnlyFile, base_opener, content_sha256
from nixfs.cow.cowfile import CowFile, remove
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
    base_size = [0, 1, PAGE - 1, PAGE + 1, 7 * PAGE + 100, 20 * PAGE - 3][seed % 6]
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


def test_the_base_shows_nothing_past_a_truncation(tmp_path):
    """Cut to mid-page, grown again without writing: the base's bytes from the cut on are
    zeros, in one-page reads (the fast path) and longer ones."""
    base = _make_base(tmp_path, "base", 3 * PAGE, 6)
    _create(tmp_path, "f", "base").close()
    cut = PAGE + 10
    with _open(tmp_path, "f") as cow:
        cow.truncate(cut)
        cow.truncate(3 * PAGE)
        for n, off in ((1, cut), (1, cut - 1), (11, PAGE), (PAGE, PAGE), (2 * PAGE, 0)):
            want = (base[:cut] + bytes(3 * PAGE))[off:off + n]
            assert cow.pread(n, off) == want, (n, off)
        assert cow.blocks() == 0


def test_long_reads_across_whole_bitmap_bytes(tmp_path):
    """Reads over many pages take a short cut where whole bitmap bytes say all or none:
    the pages just past a full byte, and past the bitmap's end, still come from the base."""
    base = _make_base(tmp_path, "base", 40 * PAGE, 12)
    _create(tmp_path, "f", "base").close()
    want = bytearray(base)
    with _open(tmp_path, "f") as cow:
        cow.pwrite(b"d" * 8 * PAGE, 0)  # pages 0-7: bitmap byte 0 full, nothing after it
        want[:8 * PAGE] = b"d" * 8 * PAGE
        cow.pwrite(b"e" * 8 * PAGE, 16 * PAGE)  # pages 16-23: byte 2 full, byte 1 empty
        want[16 * PAGE:24 * PAGE] = b"e" * 8 * PAGE
        for first, last in ((6, 9), (7, 8), (0, 7), (8, 15), (15, 24), (0, 39), (23, 39)):
            off, n = first * PAGE + 3, (last - first) * PAGE
            assert cow.pread(n, off) == bytes(want[off:off + n]), (first, last)


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


def test_relative_to_a_directory_descriptor(tmp_path):
    """The overlay names the delta and map relative to its upper directory's descriptor
    (and opens bases itself); a symlink in their place is never followed."""
    base = _make_base(tmp_path, "base", 3 * PAGE, 4)
    (tmp_path / "d").mkdir()
    dfd = os.open(tmp_path / "d", os.O_RDONLY | os.O_DIRECTORY)
    try:
        opener = lambda rel: ReadOnlyFile.open(tmp_path / rel)  # noqa: E731
        with CowFile.create("f", cowmap.map_name("f"), opener("base"), base_path="base",
                            page_size=PAGE, dir_fd=dfd) as cow:
            cow.pwrite(b"q" * 3, PAGE - 1)
        with CowFile.open("f", cowmap.map_name("f"), opener, dir_fd=dfd) as cow:
            assert cow.pread(3 * PAGE, 0) == base[:PAGE - 1] + b"qqq" + base[PAGE + 2:]
        assert sorted(os.listdir(tmp_path / "d")) == [cowmap.map_name("f"), "f"]
        os.symlink(tmp_path / "d/f", tmp_path / "d/g")
        os.symlink(tmp_path / "d" / cowmap.map_name("f"), tmp_path / "d" / cowmap.map_name("g"))
        with pytest.raises(OSError):
            CowFile.open("g", cowmap.map_name("g"), opener, dir_fd=dfd)
        remove("f", cowmap.map_name("f"), dir_fd=dfd)
        assert sorted(os.listdir(tmp_path / "d")) == sorted(["g", cowmap.map_name("g")])
    finally:
        os.close(dfd)


def test_reads_in_threads_while_one_writes(tmp_path):
    """Concurrent preads see each page whole, old or new, while a thread writes pages (the
    readers watch the page being written: a bit set before its data would show holes)."""
    pages = 2048
    old_page, new_page = b"o" * PAGE, b"n" * PAGE
    (tmp_path / "base").write_bytes(old_page * pages)
    _create(tmp_path, "f", "base").close()
    cow = _open(tmp_path, "f")
    bad, stop, current = [], threading.Event(), [0]

    def read():
        while not stop.is_set():
            page = current[0]
            if cow.pread(PAGE, page * PAGE) not in (old_page, new_page):
                bad.append(page)
    readers = [threading.Thread(target=read) for _ in range(3)]
    for thread in readers:
        thread.start()
    try:
        for page in random.Random(5).sample(range(pages), pages):
            current[0] = page
            cow.pwrite(new_page, page * PAGE)
            if page % 64 == 0:
                cow.fsync()
    finally:
        stop.set()
        for thread in readers:
            thread.join()
        cow.close()
    assert not bad


def test_base_opener_follows_no_symlink_below_its_root(tmp_path):
    base = _make_base(tmp_path, "base", 2 * PAGE, 9)
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


def test_a_lone_map_is_replaced_by_the_next_create(tmp_path):
    """A crash in remove() (or in create, before the delta) leaves only the hidden map."""
    _make_base(tmp_path, "base", PAGE, 1)
    with _create(tmp_path, "f", "base") as cow:
        cow.pwrite(b"old", 0)
    os.unlink(tmp_path / "f")
    with _create(tmp_path, "f", "base") as cow:
        assert cow.pread(3, 0) == (tmp_path / "base").read_bytes()[:3]
    with pytest.raises(FileExistsError):
        _create(tmp_path, "f", "base")
    assert cowmap.read(tmp_path / cowmap.map_name("f")).bits == bytearray()


def test_content_sha256_is_the_logical_files(tmp_path):
    _make_base(tmp_path, "base", 5 * PAGE, 2)
    with _create(tmp_path, "f", "base") as cow:
        cow.pwrite(b"w" * 100, 2 * PAGE - 50)
        cow.truncate(4 * PAGE + 1)
        want = hashlib.sha256(cow.pread(1 << 20, 0)).hexdigest()
        assert content_sha256(cow, chunk=PAGE + 7) == want


def test_failed_chain_opens_leave_no_descriptor_behind(tmp_path):
    _make_base(tmp_path, "base", PAGE, 1)
    _create(tmp_path, "c1", "base").close()
    _create(tmp_path, "c2", "c1").close()
    (tmp_path / "base").unlink()
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(20):
        with pytest.raises(CowError, match="base missing"):
            base_opener(tmp_path)("c2")
    assert len(os.listdir("/proc/self/fd")) == before


def test_a_directory_descriptor_opened_with_o_path(tmp_path):
    """The layers open an unreadable directory with O_PATH: maps are still synced there."""
    _make_base(tmp_path, "base", PAGE, 1)
    dfd = os.open(tmp_path, os.O_PATH | os.O_DIRECTORY)
    try:
        opener = base_opener(tmp_path)
        with CowFile.create("f", cowmap.map_name("f"), opener("base"), base_path="base",
                            dir_fd=dfd) as cow:
            cow.pwrite(b"p", 0)
            cow.fsync()
        with CowFile.open("f", cowmap.map_name("f"), opener, dir_fd=dfd) as cow:
            assert cow.pread(1, 0) == b"p"
    finally:
        os.close(dfd)
