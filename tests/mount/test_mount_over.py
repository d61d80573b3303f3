"""Mounting over what is mounted already, and over the mount's own lower.

A node's /nix may be its own partition, a bind mount or the NFS mount of the
shared store; nixfs goes on top of it as kernel overlayfs does, even when that
very /nix is the lower, and unmounting brings back what was below.
"""

import json
import os
import subprocess

import pytest
from conftest import needs_root, run
from harness import NixfsMount, run_nixfs, snapshot
from nixstore import derivations_nix, nix, nix_env
from nixlower import LOWER_DRVS, built_lower  # noqa: F401 (a fixture)


@needs_root
def test_mount_over_a_mount_point_and_back(lower, upper, mnt):
    assert run("mount", "-t", "tmpfs", "-o", "size=1m", "below", mnt).returncode == 0
    try:
        (mnt / "below-file").write_text("from the tmpfs\n")
        with NixfsMount(lower, upper, mnt):
            assert sorted(os.listdir(mnt)) == ["dir", "store", "top-file"]
            (mnt / "new").write_text("into the upper\n")
        assert os.listdir(mnt) == ["below-file"]  # the tmpfs again, untouched
        assert (upper / "new").read_text() == "into the upper\n"
    finally:
        run("umount", mnt)


@needs_root
def test_mount_over_a_bind_mount_of_the_lower(lower, upper, mnt):
    """The NFS case: the mountpoint is a mount of the shared store that is also the lower."""
    assert run("mount", "--bind", lower, mnt).returncode == 0
    try:
        with NixfsMount(mnt, upper, mnt):
            os.unlink(mnt / "dir/file")
            assert (upper / "dir/.wh.file").is_file()
        assert (mnt / "dir/file").read_text() == "content\n"  # the lower, still whole
    finally:
        run("umount", mnt)


def _store_copy(tmp_path, built_lower):
    base, paths = built_lower
    root = tmp_path / "R"
    subprocess.run(["cp", "-a", str(base / "L"), str(root)], check=True)
    return root, paths, base / "busybox"


def test_mount_over_its_own_lower(tmp_path, built_lower):
    root, paths, busybox = _store_copy(tmp_path, built_lower)
    store, upper = root / "nix", tmp_path / "upper"
    upper.mkdir()
    before = snapshot(store, times_before=2**63)
    with NixfsMount(store, upper, store) as m:
        refs = nix(root, "nix-store", "-q", "--references", paths["app"]).stdout.split()
        assert set(refs) == {paths["liba"], paths["libb"]}
        expr = tmp_path / "e.nix"
        expr.write_text(derivations_nix(busybox, {**LOWER_DRVS, "app2": ["libb"]}))
        proc = subprocess.run(["nix-build", "--store", f"local?root={root}", str(expr),
                               "-A", "app2", "--no-out-link"], capture_output=True, text=True,
                              env=nix_env())
        assert proc.returncode == 0, proc.stderr
        app2 = proc.stdout.strip()
        # The database work follows the real lower, not the mount over it: a round of it
        # must not take the new build for a lower path (and drop its upper copy).
        assert run_nixfs("sync", store).returncode == 0
        assert (upper / app2[len("/nix/"):] / "bin/app2").is_file()
        assert nix(root, "nix-store", "--check-validity", app2).returncode == 0
        status = json.loads(run_nixfs("status", "--json", store).stdout)
        assert status["lower"] == str(store)  # its name, not the /proc path nixfs uses
        assert status["nix"]["lower_paths"] == len(before_paths(before))
        assert status["nix"]["sync_errors"] == 0, status["nix"]["last_sync_error"]
        assert "/proc/self/fd" not in m.log_text()
    assert snapshot(store, times_before=2**63) == before  # the lower again, unchanged


def before_paths(snap) -> list:
    return [k for k in snap if k.count(b"/") == 1 and k.startswith(b"store/")
            and not k.startswith(b"store/.")]
