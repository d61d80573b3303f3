"""The one place that asks which patch features the installed pyfuse3 has, and that every
use of one takes the stock path when it is absent (no mount: the adapter, the refresher of
stale attributes and the main loop's arguments, with the answers faked both ways).

Run with a stock pyfuse3 too (`pip install pyfuse3==3.5.0` in a throwaway venv): there the
probe must report every feature absent."""

import dataclasses
import os
import re
import stat
import types
from pathlib import Path

import pyfuse3
import pytest

from nixfs import config
from nixfs.daemon import serve
from nixfs.fuse import features, notifier, ops as fuse_ops
from nixfs.fuse.features import Features
from nixfs.overlay import Attr, Overlay
from nixfs.fuse.stale_attrs import StaleAttributes

SERIES = Path(__file__).resolve().parents[2] / "scripts" / "pyfuse3"
NAMES = [f.name.upper() for f in dataclasses.fields(Features)]
# What a patch feature offers beyond its marker: none of it may be called when it is absent.
PATCH_FUNCTIONS = ("keep_attributes", "drop_attributes", "kept_attributes_stats",
                   "forget_readdir_end", "readdir_ends_stats", "refresh_attributes")


def test_one_flag_per_patch_of_the_series_in_its_order():
    patches = sorted(SERIES.glob("[0-9][0-9]-*.patch"))
    assert [p.name[:2] for p in patches] == [f"{n:02d}" for n in range(1, len(patches) + 1)]
    markers = [re.findall(r"^\+([A-Z][A-Z_]*) = True$", p.read_text(), re.M) for p in patches]
    assert all(len(m) == 1 for m in markers), markers
    assert [m[0] for m in markers] == NAMES


def test_features_are_read_from_the_module_object():
    assert Features.of(types.SimpleNamespace()) == Features()
    assert Features().absent() == NAMES
    everything = Features.of(types.SimpleNamespace(**{n: True for n in NAMES}))
    assert everything.absent() == [] and all(dataclasses.astuple(everything))
    part = Features.of(types.SimpleNamespace(CACHE_READDIR=True, READDIR_BY_INODE=True,
                                             READDIR_END=True))
    assert (part.cache_readdir, part.readdir_by_inode, part.readdir_end) == (True, True, True)
    assert part.absent() == [n for n in NAMES if n not in ("CACHE_READDIR", "READDIR_BY_INODE",
                                                           "READDIR_END")]


def test_the_installed_pyfuse3_is_asked_once_at_import():
    assert features.FEATURES == Features.of(pyfuse3)
    for name in NAMES:
        assert getattr(features.FEATURES, name.lower()) == hasattr(pyfuse3, name)


@pytest.fixture
def overlay(tmp_path):
    (tmp_path / "lower").mkdir()
    (tmp_path / "upper").mkdir()
    fs = Overlay(str(tmp_path / "lower"), str(tmp_path / "upper"))
    yield fs
    fs.close()


def _fixed_dir_attr(path) -> Attr:
    return Attr(ino=5, st=os.lstat(path), nlink=2, uid=0, gid=0, ttl=1.0, fixed=True)


def _ops(overlay, **kw) -> fuse_ops.FuseOps:
    return fuse_ops.FuseOps(overlay, notifier.ListingSnapshots(), **kw)


def _cfg(tmp_path, **kw) -> config.MountConfig:
    return config.MountConfig(str(tmp_path / "lower"), str(tmp_path / "upper"),
                             str(tmp_path / "mnt"), **kw)


def test_without_the_features_every_use_takes_the_stock_path(monkeypatch, overlay, tmp_path):
    monkeypatch.setattr(features, "FEATURES", Features())

    def refused(*args):
        raise AssertionError("a patch function was called although its feature is absent")
    for name in PATCH_FUNCTIONS:
        monkeypatch.setattr(pyfuse3, name, refused, raising=False)

    ops = _ops(overlay)
    assert (ops.listings, ops.readdir_by_inode) == ("none", False)
    assert (ops.opens, ops.files_by_inode) == ("nixfs", False)
    for asked in ("kernel", "fixed"):
        assert _ops(overlay, listings=asked).listings == "none"
    assert _ops(overlay, opens="kernel").opens == "nixfs"
    assert ops.kept_attributes() == {"inodes": 0, "getattr_answered": 0, "available": False,
                                     "readdir_ends_answered": 0}
    entry = ops._reply(_fixed_dir_attr(tmp_path))
    assert entry.st_ino == 5 and stat.S_ISDIR(entry.st_mode)
    notifier.drop_kept(5)
    notifier.ListingSnapshots().drop(5)
    assert serve.main_args(_cfg(tmp_path, poll_us=100)) == {}  # main() takes no poll_us
    (tmp_path / "f").write_text("x")
    refresher = StaleAttributes(str(tmp_path), lambda obj: True)
    paths = [os.fsencode(tmp_path / "f"), os.fsencode(tmp_path / "gone")]
    assert refresher._stat_all(paths) == (1, 2)  # by os.lstat


def test_with_the_features_their_uses_are_chosen(monkeypatch, overlay, tmp_path):
    monkeypatch.setattr(features, "FEATURES", Features.of(
        types.SimpleNamespace(**{n: True for n in NAMES})))
    ops = _ops(overlay)
    assert (ops.listings, ops.readdir_by_inode) == ("kernel", True)
    assert (ops.opens, ops.files_by_inode) == ("kernel", True)
    assert _ops(overlay, listings="fixed").listings == "fixed"
    assert serve.main_args(_cfg(tmp_path, poll_us=100)) == {"poll_us": 100}
    only_fixed = Features(cache_readdir=True)
    monkeypatch.setattr(features, "FEATURES", only_fixed)
    assert _ops(overlay).listings == "fixed"
    assert _ops(overlay, listings="kernel").listings == "none"
