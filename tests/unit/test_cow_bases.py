"""Bases found by path below a root: the directories they were found in are kept open
(a lower that caches no names answers each walk with a lookup per level), which must
never open a base other than the one the path names now."""

import os
import shutil

from nixfs.cow.bases import base_opener

REL = "var/nixfs/generations/1/listings.sqlite"


def _make(root, content: bytes) -> None:
    path = root / REL
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)


def _read(root) -> bytes:
    base = base_opener(root)(REL)
    try:
        return base.pread(base.size(), 0)
    finally:
        base.close()


def test_a_base_whose_directory_was_made_again_is_found_anew(tmp_path):
    root = str(tmp_path / "store")
    _make(tmp_path / "store", b"first")
    assert _read(root) == b"first"
    shutil.rmtree(tmp_path / "store/var/nixfs/generations/1")  # pruned, then published again
    _make(tmp_path / "store", b"second")
    assert _read(root) == b"second"


def test_a_reused_descriptor_number_reaches_its_own_directory(tmp_path):
    _make(tmp_path / "a", b"in a")
    _make(tmp_path / "b", b"in b")
    fd = os.open(tmp_path / "a", os.O_PATH | os.O_DIRECTORY)
    via = f"/proc/self/fd/{fd}"
    assert _read(via) == b"in a"
    os.close(fd)
    again = os.open(tmp_path / "b", os.O_PATH | os.O_DIRECTORY)
    try:
        assert again == fd  # the same /proc/self/fd path, another directory
        assert _read(via) == b"in b"
    finally:
        os.close(again)
