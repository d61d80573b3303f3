"""The catalog's reading of a store path holds exactly what a mount's layer code reads."""

import os
import stat
from pathlib import Path

import pytest

from nixfs.overlay.layers import Layer
from nixfs.publish import catalogread


def strip_atimes(found: dict) -> dict:
    """Listings alike but for access times (reading a directory may set its atime)."""
    return {rel: ({n: st._replace(st_atime_ns=0) for n, st in listing.stats()},
                  listing.targets) for rel, listing in found.items()}


@pytest.fixture
def store(tmp_path) -> Path:
    s = tmp_path / "store"
    s.mkdir()
    (s / "aaa-empty").mkdir()
    tree = s / "bbb-tree"
    (tree / "bin").mkdir(parents=True)
    (tree / "bin/tool").write_text("#!/bin/sh\n")
    os.setxattr(tree / "bin/tool", "user.nixfs-test", b"value")
    os.setxattr(tree / "bin", "user.dir", b"d")
    os.setxattr(tree, "user.self", b"s")
    (tree / "lib").symlink_to("bin")
    (tree / "share/doc/deep").mkdir(parents=True)
    (tree / "share/doc/deep/file").write_bytes(b"x" * 5000)
    (s / "ccc-file").write_text("a file as a store path\n")
    (s / "ddd-link").symlink_to("bbb-tree")
    odd = s / "eee-unreadable-subdir"
    (odd / "locked").mkdir(parents=True)
    (odd / "locked/inside").write_text("")
    return s


def both(root: Path, name: bytes):
    layer = Layer(str(root), name="lower")
    store_fd = layer.open_dir_path(b"store")
    try:
        fast = catalogread.read_path(layer, store_fd, name)
        general = catalogread.read_general(layer, store_fd, name)
    finally:
        os.close(store_fd)
        layer.close()
    return fast, general


@pytest.mark.parametrize("name", [b"aaa-empty", b"bbb-tree", b"ccc-file", b"ddd-link"])
def test_the_fast_reading_equals_the_layers(store, name):
    (found, own, xmaps), (gfound, gown, gxmaps) = both(store.parent, name)
    assert strip_atimes(found) == strip_atimes(gfound)
    assert (own, xmaps) == (gown, gxmaps)
    if name == b"bbb-tree":
        assert set(found) == {b"", b"bin", b"share", b"share/doc", b"share/doc/deep"}
        assert found[b""].targets == {b"lib": b"bin"}
        assert own == {"user.self": b"s"}
        assert xmaps[b"bin"] == {b"tool": {"user.nixfs-test": b"value"}}
        assert xmaps[b""] == {b"bin": {"user.dir": b"d"}}
        assert b"deep" not in xmaps[b"share/doc"] and b"share/doc/deep" in xmaps


def test_a_path_the_fast_reading_cannot_take_is_read_by_the_layer(store, monkeypatch):
    """A directory it may not open (root may open anything: the fast reading is made to
    meet a refusal) goes to the layer's code, with its result."""
    real_open = os.open

    def refusing(path, flags, *a, dir_fd=None, **kw):
        if path == b"locked" and not flags & os.O_PATH:
            raise PermissionError(13, "refused")
        return real_open(path, flags, *a, dir_fd=dir_fd, **kw)

    monkeypatch.setattr(os, "open", refusing)
    calls = []
    general = catalogread.read_general
    monkeypatch.setattr(catalogread, "read_general", lambda *a: calls.append(a) or general(*a))
    with pytest.raises(OSError):  # the layer opens it O_PATH and cannot list it
        both(store.parent, b"eee-unreadable-subdir")
    assert calls


def test_a_vanished_path_is_an_oserror(store):
    layer = Layer(str(store.parent), name="lower")
    store_fd = layer.open_dir_path(b"store")
    try:
        with pytest.raises(FileNotFoundError):
            catalogread.read_path(layer, store_fd, b"zzz-gone")
    finally:
        os.close(store_fd)
        layer.close()
    assert stat.S_ISDIR(os.stat(store).st_mode)
