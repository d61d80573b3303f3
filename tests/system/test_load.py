"""8 client processes of mixed operations (create, write, read, copy-up, rename,
unlink, nix-store --add) on a Nix store mount: every byte verified, no error, and
the daemon's descriptors and memory do not grow.  CI runs 12 s; the 60 s run is
marked slow (``pytest -m slow tests/system/test_load.py``, or scripts/loadtest)."""

import json

import pytest
from conftest import needs_root
from harness import NixfsMount
from load import make_lower, run_load
from relharness import daemon_pid, status

# Descriptors the daemon may keep more after the load: its caches (up to 128 files read
# or written by node when the kernel keeps opens, and directories and lower files).
FD_GROWTH = 64 + 128
RSS_GROWTH_MIB = 64


def _load(tmp_path, seconds: float, *options) -> dict:
    lower, upper, mnt = tmp_path / "L/nix", tmp_path / "upper", tmp_path / "M/nix"
    make_lower(lower, 8)
    upper.mkdir()
    mnt.mkdir(parents=True)
    with NixfsMount(lower, upper, mnt, *options):
        report = run_load(mnt.parent, daemon_pid(mnt), seconds=seconds, clients=8)
        report["status_errors"] = status(mnt)["errors"]
        report["poll_us"] = status(mnt)["poll_us"]
    print(json.dumps(report, indent=1))
    assert report["errors"] == []
    assert report["status_errors"] == 0
    assert set(report["ops"]) == {"create", "write", "read", "copyup", "rename", "unlink", "add"}
    assert report["nix_adds"] >= 8
    fds, rss = report["daemon_fds"], report["daemon_rss_mib"]
    assert fds["after"] <= fds["before"] + FD_GROWTH, fds  # caches fill, within bounds
    assert fds["uncached_after"] <= fds["uncached_before"] + 2, fds  # nothing else stays open
    assert rss["after"] <= rss["before"] + RSS_GROWTH_MIB, rss
    return report


@needs_root
def test_load_short(tmp_path):
    _load(tmp_path, 12)


@needs_root
def test_load_short_without_polling(tmp_path):
    """The daemon as on one CPU: it sleeps until each request (the default polls for the
    next one first, on a non-blocking /dev/fuse that several tasks read)."""
    assert _load(tmp_path, 6, "poll_us=0")["poll_us"] == 0


@needs_root
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_load_60s(tmp_path):
    _load(tmp_path, 60)
