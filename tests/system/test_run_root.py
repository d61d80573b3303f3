"""How `nixfs run` puts its command into the new root: pivot_root in a mount namespace of
the command's own, so that it works where a restricted pod refuses chroot(2).

The pod's conditions are made here by hand, as an ordinary user: no capabilities, the
no_new_privs flag, and a seccomp filter (a small classic-BPF program) that refuses chosen
system calls with EPERM, as the runtime's default profile refuses chroot without
CAP_SYS_CHROOT.
"""

import os
import platform
import signal
import subprocess
import sys

import pytest
from conftest import make_lower
from harness import REPO
from test_run import NIXFS, left_behind, plain_layers, wait_for_pid, wait_none_left

# Installs a seccomp filter refusing the system calls named in argv[1] (comma-separated)
# with EPERM, sets no_new_privs (which an unprivileged filter needs, and a pod has), then
# execs the rest of argv.  x86_64 numbers; any other ABI (i386, x32) is killed.
SECCOMP_LAUNCHER = r"""
import ctypes, os, sys
NUMBERS = {"chroot": 161, "pivot_root": 155, "unshare": 272}
refused = [NUMBERS[name] for name in sys.argv[1].split(",") if name]
LD_W_ABS, JEQ_K, JGE_K, RET_K = 0x20, 0x15, 0x35, 0x06
AUDIT_ARCH_X86_64, X32_BIT = 0xC000003E, 0x40000000
KILL, ERRNO_EPERM, ALLOW = 0x80000000, 0x00050000 | 1, 0x7FFF0000
n = len(refused)
prog = [(LD_W_ABS, 0, 0, 4),                       # seccomp_data.arch
        (JEQ_K, 1, 0, AUDIT_ARCH_X86_64),
        (RET_K, 0, 0, KILL),
        (LD_W_ABS, 0, 0, 0),                       # seccomp_data.nr
        (JGE_K, 0, 1, X32_BIT),
        (RET_K, 0, 0, KILL)]
prog += [(JEQ_K, n - j, 0, nr) for j, nr in enumerate(refused)]
prog += [(RET_K, 0, 0, ALLOW), (RET_K, 0, 0, ERRNO_EPERM)]

class SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8),
                ("k", ctypes.c_uint32)]

class SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(SockFilter))]

filters = (SockFilter * len(prog))(*[SockFilter(*ins) for ins in prog])
fprog = SockFprog(len(prog), filters)
libc = ctypes.CDLL(None, use_errno=True)
PR_SET_SECCOMP, PR_SET_NO_NEW_PRIVS, SECCOMP_MODE_FILTER = 22, 38, 2
if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
    sys.exit(f"no_new_privs: {os.strerror(ctypes.get_errno())}")
if libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0) != 0:
    sys.exit(f"seccomp: {os.strerror(ctypes.get_errno())}")
os.execvp(sys.argv[2], sys.argv[2:])
"""

x86_64_only = pytest.mark.skipif(platform.machine() != "x86_64",
                                 reason="the test's seccomp filter knows x86_64 numbers only")


def under_filter(user, refused: str, *cmd, **kw) -> subprocess.CompletedProcess:
    """*cmd* run by *user* under a filter refusing *refused* ("chroot,pivot_root")."""
    return user.run(sys.executable, "-c", SECCOMP_LAUNCHER, refused, *cmd, **kw)


def nixfs_run(lower, upper) -> list:
    return [*NIXFS.split(), "run", "--lower", lower, "--upper", upper, "--"]


def mountinfo(text: str) -> dict[str, str]:
    """Mount point -> file system type (the topmost mount at each)."""
    out = {}
    for line in text.splitlines():
        pre, _, post = line.partition(" - ")
        out[pre.split()[4]] = post.split()[0]
    return out


def test_the_command_is_pivoted_into_the_new_root(user):
    """The command's mount namespace is its own, its root the new root's tmpfs with nixfs
    at /nix, and the host's root is gone from it (not just out of sight, as with chroot);
    the working directory, the exit code and `nixfs status /nix` inside still work."""
    lower, upper = plain_layers(user)
    pidfile = user.dir("run") / "pid"
    script = (f"set -e; echo $$ > {pidfile}; pwd; /nix/store/aaa-pkg/bin/pkg; "
              "test \"$(readlink /proc/self/ns/mnt)\" != \"$(readlink /proc/$PPID/ns/mnt)\"; "
              f"{NIXFS} status /nix >/dev/null; cat /proc/self/mountinfo; "
              "read line; exit 6")  # waits for the test to look at the namespace from outside
    p = subprocess.Popen(
        ["runuser", "-u", user.name, "--", "env", "-i",
         *(f"{k}={v}" for k, v in user.env().items()),
         *map(str, nixfs_run(lower, upper)), "sh", "-c", script],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        cwd=str(user.home))
    try:
        pid = wait_for_pid(pidfile)
        # From outside, as a debugger or `kubectl exec` would: entering the command's mount
        # namespace lands in its root, which is the new root.
        seen = subprocess.run(["nsenter", "-t", str(pid), "-m", "cat", "/proc/self/mountinfo"],
                              capture_output=True, text=True, check=True).stdout
        out, err = p.communicate("go\n", timeout=60)
    finally:
        p.kill()
    assert p.returncode == 6, err
    lines = out.splitlines()
    assert lines[:2] == [str(user.home), "pkg"], out
    for view in (mountinfo("\n".join(lines[2:])), mountinfo(seen)):
        assert view["/"] == "tmpfs" and view["/nix"] == "fuse.nixfs", view
        # nothing of the runner's namespace: not its root, not the new root's own path
        # there (under the runtime folder, /tmp/nixfs-UID without XDG_RUNTIME_DIR)
        assert not any(m.startswith(f"/tmp/nixfs-{user.uid}/root") for m in view), view
    wait_none_left(user, timeout=2.0)


@x86_64_only
def test_run_where_chroot_is_refused(user):
    """The restricted pod: no capabilities, no_new_privs, chroot refused with EPERM (as the
    runtime's default seccomp profile does without CAP_SYS_CHROOT): nixfs run works."""
    lower, upper = plain_layers(user)
    # The filter does refuse chroot, also where the capability is there (a user namespace).
    assert user.run("unshare", "-Ur", "chroot", "/", "true").returncode == 0
    proc = under_filter(user, "chroot", "unshare", "-Ur", "chroot", "/", "true")
    assert proc.returncode != 0 and "Operation not permitted" in proc.stderr, proc
    script = ("/nix/store/aaa-pkg/bin/pkg; grep -E '^(NoNewPrivs|Seccomp|CapEff):' "
              "/proc/self/status; echo built > /nix/store/new; exit 3")
    proc = under_filter(user, "chroot", *nixfs_run(lower, upper), "sh", "-c", script)
    assert proc.returncode == 3, proc.stderr
    lines = proc.stdout.splitlines()
    status = dict(line.split(":\t") for line in lines[1:])
    assert lines[0] == "pkg" and status == {"NoNewPrivs": "1", "Seccomp": "2",
                                            "CapEff": "0000000000000000"}, proc.stdout
    assert (upper / "store/new").read_text() == "built\n"
    wait_none_left(user, timeout=2.0)


@x86_64_only
def test_run_falls_back_to_chroot_where_pivot_root_is_refused(user):
    lower, upper = plain_layers(user)
    proc = under_filter(user, "pivot_root", *nixfs_run(lower, upper), "sh", "-c",
                        "/nix/store/aaa-pkg/bin/pkg; exit 4")
    assert (proc.returncode, proc.stdout, proc.stderr) == (4, "pkg\n", ""), proc
    wait_none_left(user, timeout=2.0)


@x86_64_only
@pytest.mark.parametrize("refused", ["pivot_root,chroot", "unshare,chroot"])
def test_run_where_every_way_into_the_root_is_refused(user, refused):
    """A clear error naming each refused step, its likely cause and what to ask for, not
    the "cannot run COMMAND" of a command that cannot be run; nothing left behind.  With
    pivot_root and chroot refused the command cannot be started (exit code 125); with
    unshare refused (Docker's default profile without CAP_SYS_ADMIN) nixfs run cannot
    even make its namespace, and says it before it starts (exit code 2)."""
    lower, upper = plain_layers(user)
    proc = under_filter(user, refused, *nixfs_run(lower, upper), "sh", "-c", "exit 0")
    assert "Traceback" not in proc.stderr and "cannot run" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith("nixfs: "), proc.stderr
    if refused.startswith("unshare"):
        assert proc.returncode == 2, proc
        first = proc.stderr.splitlines()[0]
        assert "cannot make a user namespace" in first and "seccomp" in first, first
        assert "user namespaces are off" not in proc.stderr, proc.stderr
    else:
        assert proc.returncode == 125, proc
        first = proc.stderr.splitlines()[0]
        assert "pivot_root" in first and "chroot" in first, first
        assert "seccomp" in proc.stderr and "CAP_SYS_CHROOT" in proc.stderr, proc.stderr
        assert "CRI-O" in proc.stderr, proc.stderr
    wait_none_left(user, timeout=2.0)


def test_processes_left_behind_do_not_hold_up_the_end(user):
    """A command that leaves a process running: it has a copy of /nix in the command's
    namespace, so unmounting the runner's copy alone would never end the daemon.  nixfs
    run says so, unmounts it under them, waits for the daemon and returns the code."""
    lower, upper = plain_layers(user)
    pidfile = user.dir("bg") / "pid"
    script = f"sleep 300 >/dev/null 2>&1 & echo $! > {pidfile}; exit 5"
    proc = user.nixfs("run", "--lower", lower, "--upper", upper, "--no-nix", "--",
                      "sh", "-c", script)
    bg = int(pidfile.read_text())
    try:
        assert proc.returncode == 5, proc.stderr
        # (named by name and pid: sh, if it had not exec'ed sleep yet)
        assert "left behind" in proc.stderr and f"(pid {bg}: " in proc.stderr, proc.stderr
        # Only the process left behind runs on: the daemon has written out and exited.
        assert [p.split(":")[0] for p in left_behind(user)] == [str(bg)], left_behind(user)
    finally:
        os.kill(bg, signal.SIGKILL)
    wait_none_left(user, timeout=2.0)


def test_root_without_cap_setfcap(tmp_path):
    """A container's root with its capabilities dropped cannot map uid 0 into a user
    namespace (that needs CAP_SETFCAP): the error says so and what to change, not that
    user namespaces are off."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    lower, upper = make_lower(tmp_path / "lower"), tmp_path / "upper"
    upper.mkdir()
    proc = subprocess.run(
        ["setpriv", "--bounding-set=-setfcap", "--inh-caps=-setfcap", *NIXFS.split(), "run",
         "--lower", str(lower), "--upper", str(upper), "--", "true"],
        capture_output=True, text=True, timeout=60, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.returncode == 2, proc
    assert proc.stderr.startswith("nixfs: cannot map uid 0") and "CAP_SETFCAP" in proc.stderr
    assert "non-root" in proc.stderr and "user namespaces are off" not in proc.stderr
