"""scripts/floorfs: the two floors scripts/bench measures nixfs against serve their copy
of a tree as the tree is (a floor that answered wrong would make a walk through it
cheap for the wrong reason)."""

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import OLD_NS, make_lower, needs_root
from harness import _mounted, force_unmount, snapshot
from nixfs.fuse import features

FLOORFS = Path(__file__).resolve().parents[2] / "scripts/floorfs"


def _c_floor(tmp_path: Path) -> list:
    if not shutil.which("cc") or not shutil.which("pkg-config"):
        pytest.skip("needs cc and pkg-config (scripts/setup installs them)")
    binary = tmp_path / "floorfs"
    subprocess.run([FLOORFS / "build", binary], check=True)
    return [binary]


def _pyfuse3_floor(tmp_path: Path) -> list:
    if not (features.FEATURES.readdir_end and features.FEATURES.poll_before_sleep):
        pytest.skip("needs pyfuse3 built with scripts/pyfuse3/")
    return [sys.executable, FLOORFS / "floorfs.py"]


@needs_root
@pytest.mark.parametrize("floor", [_c_floor, _pyfuse3_floor], ids=["C", "pyfuse3"])
def test_a_floor_shows_its_tree_as_it_is(tmp_path, floor):
    src = make_lower(tmp_path / "src")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = subprocess.Popen([*floor(tmp_path), "--poll-us", "250", src, mnt])
    try:
        deadline = time.monotonic() + 30
        while not _mounted(mnt):
            assert proc.poll() is None, f"the floor ended ({proc.returncode}) before mounting"
            assert time.monotonic() < deadline, "the floor did not mount"
            time.sleep(0.05)
        # Every object's type, mode, owner, size, content, target and time (xattrs are
        # none of a floor's business: nor of a Nix store's).
        assert snapshot(mnt, times_before=OLD_NS + 1, xattrs=False) == \
            snapshot(src, times_before=OLD_NS + 1, xattrs=False)
        assert not (mnt / "dir/missing").exists()
        subprocess.run(["umount", mnt], check=True)
        assert proc.wait(timeout=30) == 0
    finally:
        force_unmount(mnt)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
