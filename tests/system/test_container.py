"""The image, its entrypoint and the pod spec under a real container engine (podman):
scripts/container-test, one case at a time. Slow (the first run debootstraps a base and
builds the image, many minutes; later ones reuse the cached layers), so marked slow and
run by `scripts/test --slow`."""

import os
import shutil
import subprocess

import pytest

from harness import REPO

CASES = {"a": "only --device /dev/fuse",
         "b": "every capability dropped, no-new-privileges, default seccomp, random uid",
         "c": "rootless podman",
         "d": "podman kube play of the pod spec"}


@pytest.mark.slow
@pytest.mark.timeout(3600)
@pytest.mark.parametrize("case", CASES, ids=list(CASES.values()))
def test_container(case):
    if os.geteuid() != 0:
        pytest.skip("needs root (podman builds, a test user for the rootless case)")
    missing = [t for t in ("podman", "runc", "debootstrap", "nix-build", "busybox")
               if shutil.which(t) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed")
    proc = subprocess.run([str(REPO / "scripts/container-test"), "--cases", case],
                          capture_output=True, text=True, timeout=3500)
    summary = proc.stdout[proc.stdout.rfind("\nnixfs from "):]
    if proc.returncode == 0 and f"\n{case}    SKIP" in summary:
        reasons = [line.strip() for line in proc.stdout.splitlines() if line.startswith("  ")]
        pytest.skip("; ".join(reasons) or "skipped by scripts/container-test")
    assert proc.returncode == 0 and f"\n{case}    PASS" in summary, \
        proc.stdout[-4000:] + proc.stderr[-2000:]
