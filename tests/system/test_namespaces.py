"""Mount records tell mount namespaces apart: each namespace's ``nixfs status /nix``
finds the daemon of its own mount, and records of an earlier nixfs still count
for the namespace (or the copy of the mount) they belong to."""

import json
import os
import signal
import subprocess
import time

import pytest
from conftest import make_lower, needs_root
from harness import NIXFS, REPO, run_nixfs

pytestmark = needs_root

ENV = dict(os.environ, PYTHONPATH=str(REPO))


def in_ns(ns_pid, *args) -> subprocess.CompletedProcess:
    """``nixfs ARGS`` in the mount namespace of *ns_pid* (None: a new private one)."""
    enter = ["unshare", "-m", "--propagation", "private"] if ns_pid is None else \
        ["nsenter", "-t", str(ns_pid), "-m"]
    return subprocess.run(enter + NIXFS + [str(a) for a in args], capture_output=True,
                          text=True, env=ENV, cwd=str(REPO), timeout=120)


def status_in(ns_pid, mnt) -> dict:
    proc = in_ns(ns_pid, "status", "--json", mnt)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.fixture
def two_layers(tmp_path):
    layers = []
    for name in ("a", "b"):
        lower = make_lower(tmp_path / f"lower-{name}")
        (lower / "which").write_text(name)
        (tmp_path / f"upper-{name}").mkdir()
        layers.append((lower, tmp_path / f"upper-{name}"))
    mnt = tmp_path / "nix"
    mnt.mkdir()
    return layers, mnt


def _mount_in_new_ns(lower, upper, mnt) -> int:
    """Mount in a fresh private namespace (kept alive by its daemon); the daemon's pid."""
    script = (f"{' '.join(NIXFS)} mount --lower {lower} --upper {upper} {mnt} && "
              f"{' '.join(NIXFS)} status --json {mnt}")
    proc = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                          capture_output=True, text=True, env=ENV, cwd=str(REPO), timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)["pid"]


def _exited(pid) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"  # not yet reaped by init
    except FileNotFoundError:
        return True


def _stop(pids):
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)  # the daemon unmounts and exits
        except ProcessLookupError:
            pass
    for pid in pids:
        while not _exited(pid):
            time.sleep(0.05)


def test_two_namespaces_each_with_a_nixfs_at_the_same_path(two_layers):
    ((lower_a, upper_a), (lower_b, upper_b)), mnt = two_layers
    daemons = []
    try:
        daemons.append(_mount_in_new_ns(lower_a, upper_a, mnt))
        daemons.append(_mount_in_new_ns(lower_b, upper_b, mnt))
        a, b = (status_in(pid, mnt) for pid in daemons)
        assert (a["pid"], a["lower"]) == (daemons[0], str(lower_a))
        assert (b["pid"], b["lower"]) == (daemons[1], str(lower_b))
        # The host has no nixfs there: neither namespace's daemon answers for it.
        proc = run_nixfs("status", mnt)
        assert proc.returncode == 1 and "no nixfs daemon serves" in proc.stderr
        assert run_nixfs("umount", mnt).returncode == 2
        # A copy of namespace a's mount (a namespace made from it) finds a's daemon.
        proc = subprocess.run(["nsenter", "-t", str(daemons[0]), "-m", "unshare", "-m",
                               "--propagation", "private"] + NIXFS + ["status", "--json", mnt],
                              capture_output=True, text=True, env=ENV, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["pid"] == daemons[0]
        for pid in daemons:
            assert in_ns(pid, "umount", mnt).returncode == 0
    finally:
        _stop(daemons)


def _as_an_earlier_version_wrote_it(mnt) -> None:
    """Rename the daemon's record to the path-only name earlier versions used."""
    from nixfs import runtime
    new = runtime.runtime_dir() / f"{runtime.record_key(str(mnt))}.json"
    info = json.loads(new.read_text())
    for key in ("mnt_ns", "dev"):
        info.pop(key)
    (runtime.runtime_dir() / f"{runtime._old_key(str(mnt))}.json").write_text(json.dumps(info))
    new.unlink()


def test_a_record_of_an_earlier_version_counts_for_its_namespace(two_layers):
    ((lower_a, upper_a), _), mnt = two_layers
    proc = run_nixfs("mount", "--lower", lower_a, "--upper", upper_a, mnt)
    assert proc.returncode == 0, proc.stderr
    try:
        _as_an_earlier_version_wrote_it(mnt)
        pid = status_in(os.getpid(), mnt)["pid"]  # this namespace: found
        # A namespace made from this one holds a copy of the mount: still its daemon.
        assert status_in(None, mnt)["pid"] == pid
        # A namespace where that mount is gone: the old record is not for it.
        gone = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c",
                               f"umount -l {mnt} && exec {' '.join(NIXFS)} status {mnt}"],
                              capture_output=True, text=True, env=ENV, cwd=str(REPO))
        assert gone.returncode == 1 and "no nixfs daemon serves" in gone.stderr, gone.stderr
        done = run_nixfs("umount", mnt)
        assert done.returncode == 0, done.stderr
        # nixfs umount waited for it (unless another namespace made while it was mounted,
        # say another test's, still holds a copy: then it says so)
        assert _exited(pid) or "exits once" in done.stderr, done.stderr
    finally:
        run_nixfs("umount", "--lazy", mnt)
