"""scripts/fuse-requests over a real mount: a walk's requests, as the kernel's tracepoints
saw them, are those nixfs counted (a summary that missed or invented requests would put
a walk's time on the wrong side)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import needs_root
from harness import run_nixfs

SCRIPT = Path(__file__).resolve().parents[2] / "scripts/fuse-requests"


def _tracepoints() -> bool:
    return any(os.path.isdir(f"{root}/events/fuse")
               for root in ("/sys/kernel/tracing", "/sys/kernel/debug/tracing"))


@needs_root
@pytest.mark.skipif(not shutil.which("perf") or not _tracepoints(),
                    reason="needs perf and a kernel with FUSE tracepoints")
def test_a_walk_is_split_into_its_requests_and_the_time_between(mounted, mnt):
    before = json.loads(run_nixfs("status", "--json", mnt, check=True).stdout)["fuse_requests"]
    # (find's own output away from the summary's: the shell execs find, named find)
    out = subprocess.run([sys.executable, SCRIPT, "--json", "--comm", "find", "--", "sh", "-c",
                          'exec find "$0" -ls >/dev/null', mnt],
                         check=True, capture_output=True, text=True)
    summary = json.loads(out.stdout)
    after = json.loads(run_nixfs("status", "--json", mnt, check=True).stdout)["fuse_requests"]
    # A fresh mount's walk reads every directory and symlink through nixfs' handlers.
    traced = summary["ops"]
    assert traced["FUSE_READLINK"]["count"] == after.get("readlink", 0) - before.get("readlink", 0)
    assert traced["FUSE_READDIRPLUS"]["count"] >= after["readdir"] - before.get("readdir", 0) > 0
    assert summary["unanswered"] == 0
    assert 0 < summary["in_requests_s"] < summary["span_s"]
    assert 0 < summary["between_requests_s"] < summary["span_s"]
