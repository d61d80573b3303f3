"""`nixfs run` as an ordinary user: a private /nix for one command, and its recipes.

Also the store-only mount that replaces the kernel overlay under `local-overlay://`.
"""

import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import make_lower
from harness import REPO, force_unmount
from nixstore import NIX_CONFIG, derivations_nix
from nixlower import LOWER_DRVS, built_lower  # noqa: F401 (a fixture)

NIXFS = f"{sys.executable} -m nixfs"


def left_behind(user) -> list[str]:
    """Processes still running that a test started as *user* (their environment names
    its home): none may outlive `nixfs run`, as its namespace and mount live in them."""
    marker = str(user.home).encode()
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if marker in f.read():
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
                    found.append(f"{pid}: {cmdline}")
        except OSError:
            continue
    return found


def wait_none_left(user, timeout=10.0):
    deadline = time.monotonic() + timeout
    while left_behind(user):
        if time.monotonic() > deadline:
            raise AssertionError(f"left behind: {left_behind(user)}")
        time.sleep(0.05)


def user_popen(user, *cmd, env=None) -> subprocess.Popen:
    full_env = dict(user.env(), **(env or {}))
    args = ["runuser", "-u", user.name, "--", "env", "-i"]
    args += [f"{k}={v}" for k, v in full_env.items()] + [str(c) for c in cmd]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def plain_layers(user):
    """A small lower (root's, as a shared store is) and an upper of the user's."""
    work = user.dir("work")
    lower = make_lower(work / "lower")
    os.chmod(lower / "dir/file", 0o644)
    upper = work / "upper"
    upper.mkdir()
    os.chown(upper, user.uid, user.gid)
    return lower, upper


def test_run_program_from_lower_and_nix_build(user, built_lower):  # noqa: F811
    base, paths = built_lower
    lower = user.home / "L"
    subprocess.run(["cp", "-a", str(base / "L/nix"), str(lower)], check=True)  # root's
    upper = user.dir("upper")
    bb = user.home / "busybox"
    shutil.copytree(base / "busybox", bb)
    os.chmod(bb, 0o755)
    expr = user.home / "more.nix"
    expr.write_text(derivations_nix(bb, {**LOWER_DRVS, "app2": ["libb"]}))
    os.chmod(expr, 0o644)
    busybox = next(lower.glob("store/*-busybox"))
    script = (f"set -e; /nix/store/{busybox.name}/busybox echo from the lower; "
              f"out=$(nix-build {expr} -A app -A app2 --no-out-link | tail -1); "
              "cat $out/bin/app2; nix-store -q --references $out; "
              f"test ! -e /nix/.nixfs; {NIXFS} status /nix >/dev/null; {NIXFS} sync /nix; "
              f"{NIXFS} gc --dry-run /nix 2>&1 >/dev/null | grep -q 'would delete'; exit 7")
    proc = user.nixfs("run", "--lower", lower, "--upper", upper, "--", "sh", "-c", script,
                      env={"NIX_CONFIG": NIX_CONFIG})
    assert proc.returncode == 7, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "from the lower"
    assert lines[1].startswith("app2 ") and lines[2:] == [paths["libb"]]
    built = [line for line in proc.stderr.splitlines() if line.startswith("building ")]
    assert len(built) == 1 and "app2" in built[0], proc.stderr  # lower paths are reused
    up = {n.split("-", 1)[1] for n in os.listdir(upper / "store") if not n.startswith(".")}
    assert {"app2", "app2.drv"} <= up and "app" not in up and "libb" not in up
    assert not any(n.endswith("-app2") for n in os.listdir(lower / "store"))
    assert os.stat(next((upper / "store").glob("*-app2"))).st_uid == user.uid
    wait_none_left(user, timeout=2.0)  # the namespace, its mount and the daemon are gone


@pytest.mark.parametrize("host_nix", [True, False], ids=["host-nix-is-lower", "no-host-nix"])
def test_run_with_and_without_a_host_nix(user, built_lower, host_nix):  # noqa: F811
    """The cluster case: the shared store is the host's /nix (read-only) and nixfs run puts
    its merged /nix in the same place; and a host with no /nix at all.  Simulated with a
    root of bind mounts, entered with pivot_root (a user namespace cannot be made in a
    chroot)."""
    base, paths = built_lower
    lower = user.home / "L"
    subprocess.run(["cp", "-a", str(base / "L/nix"), str(lower)], check=True)  # root's
    upper = user.dir("upper")
    app = paths["app"]
    inner = user.home / "inner.sh"
    inner.write_text(f"set -e; cat {app}/bin/app; nix-store -q --references {app} | wc -l\n"
                     "touch /nix/store/mine; test -w /nix/var/nix/db/db.sqlite\n")
    as_user = user.home / "as-user.sh"
    root = user.dir("root")
    as_user.write_text(shlex.join([
        "setpriv", f"--reuid={user.uid}", f"--regid={user.gid}", "--clear-groups", "env", "-i",
        *(f"{k}={v}" for k, v in user.env().items()), f"NIX_CONFIG={NIX_CONFIG}",
        *NIXFS.split(), "run", "--lower", "/nix" if host_nix else str(lower),
        "--upper", str(upper), "--", "sh", str(inner)]))
    host_store = (f"mkdir {root}/nix && mount --bind {lower} {root}/nix && "
                  f"mount -o remount,bind,ro {root}/nix" if host_nix else "true")
    has_nix = "test -d /nix/store" if host_nix else "test ! -e /nix"
    script = f"""set -e
mount -t tmpfs none {root}
for e in /*; do
    n=${{e#/}}
    if [ "$n" = nix ]; then continue
    elif [ -L "$e" ]; then ln -s "$(readlink "$e")" "{root}/$n"
    elif [ -d "$e" ]; then mkdir "{root}/$n"; mount --rbind "$e" "{root}/$n"; fi
done
{host_store}
mkdir {root}/old
cd {root}
pivot_root . old
exec chroot . sh -c 'umount -l /old && rmdir /old && {has_nix} && exec sh {as_user}'
"""
    proc = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[0] == "app" and proc.stdout.split()[-1] == "2", proc.stdout
    assert (upper / "store/mine").exists()
    assert not (lower / "store/mine").exists()
    wait_none_left(user, timeout=2.0)


def test_run_exit_codes_signals_and_a_killed_runner(user):
    lower, upper = plain_layers(user)
    run = ["run", "--lower", lower, "--upper", upper, "--no-nix", "--"]
    # A program from the lower at /nix/..., in the caller's working directory.
    proc = user.nixfs(*run, "sh", "-c", "/nix/store/aaa-pkg/bin/pkg; pwd; exit 3",
                      cwd=str(user.home))
    assert (proc.returncode, proc.stdout) == (3, f"pkg\n{user.home}\n"), proc.stderr
    proc = user.nixfs(*run, "sh", "-c", "kill -KILL $$")
    assert proc.returncode == 128 + signal.SIGKILL
    proc = user.nixfs(*run, "no-such-program")
    assert proc.returncode == 127 and "no-such-program" in proc.stderr
    wait_none_left(user, timeout=2.0)

    # SIGTERM to nixfs run reaches the command, whose code comes back.
    pidfile = user.home / "work/pid"
    loop = f"echo $PPID > {pidfile}; trap 'exit 9' TERM; while :; do sleep 0.05; done"
    p = user_popen(user, *NIXFS.split(), *run, "sh", "-c", loop)
    try:
        runner = wait_for_pid(pidfile)
        os.kill(runner, signal.SIGTERM)
        assert p.wait(timeout=20) == 9, p.stderr.read()
    finally:
        p.kill()
    wait_none_left(user, timeout=2.0)

    # nixfs run killed outright: the command and the daemon follow, and with them the mount.
    pidfile.unlink()
    p = user_popen(user, *NIXFS.split(), *run, "sh", "-c", loop)
    try:
        runner = wait_for_pid(pidfile)
        os.kill(runner, signal.SIGKILL)
        p.wait(timeout=20)
    finally:
        p.kill()
    wait_none_left(user, timeout=10.0)


def wait_for_pid(path: Path, timeout=20.0) -> int:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return int(path.read_text())
        except (OSError, ValueError):
            if time.monotonic() > deadline:
                raise AssertionError("the command never started") from None
            time.sleep(0.05)


def test_run_without_usable_dev_fuse(user):
    """A container started without the device: a clear error, exit code 2."""
    lower, upper = plain_layers(user)
    env = " ".join(f"{k}={v}" for k, v in user.env().items())
    nixfs_run = (f"runuser -u {user.name} -- env -i {env} {NIXFS} run --lower {lower} "
                 f"--upper {upper} -- true")
    cases = {
        # /dev without fuse (only a null device, which runuser needs)
        "mount -t tmpfs none \"$T\" && touch \"$T/null\" && mount --bind /dev/null \"$T/null\""
        " && mount --move \"$T\" /dev": ("/dev/fuse does not exist", "--device /dev/fuse"),
        # something else where the device should be
        "mount --bind /dev/null /dev/fuse": ("/dev/fuse is not the FUSE device", "--device"),
        # the device, but not for this user
        "mount -t tmpfs none \"$T\" && mknod -m 600 \"$T/fuse\" c 10 229 && "
        "mount --bind \"$T/fuse\" /dev/fuse": ("/dev/fuse is not accessible", "chmod 666"),
    }
    tmp = user.dir("devtmp")
    for setup, words in cases.items():
        script = f"T={tmp} && {setup} && exec {nixfs_run}"
        proc = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2, (setup, proc)
        assert proc.stderr.startswith("nixfs: ") and "Traceback" not in proc.stderr, proc.stderr
        for word in words:
            assert word in proc.stderr, (word, proc.stderr)


NO_NESTED_USERNS = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
r, w = os.pipe()
r2, w2 = os.pipe()
pid = os.fork()
if pid == 0:  # a user namespace of root's (identity map) that allows no nested ones
    assert libc.unshare(0x10000000) == 0
    os.write(w2, b"x")
    os.read(r, 1)
    with open("/proc/sys/user/max_user_namespaces", "w") as f:
        f.write("0")
    os.execvp(sys.argv[1], sys.argv[1:])
os.read(r2, 1)
for name in ("uid_map", "gid_map"):
    with open(f"/proc/{pid}/{name}", "w") as f:
        f.write("0 0 4294967295")
os.write(w, b"x")
sys.exit(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
"""


def test_run_without_user_namespaces(user):
    """Where user namespaces are off: the sysctl to change and the fallback that works.
    Simulated in a user namespace of root's whose own limit for nested ones is 0."""
    lower, upper = plain_layers(user)
    cmd = [sys.executable, "-c", NO_NESTED_USERNS, "setpriv", f"--reuid={user.uid}",
           f"--regid={user.gid}", "--clear-groups", "env", "-i",
           *(f"{k}={v}" for k, v in user.env().items()),
           *NIXFS.split(), "run", "--lower", lower, "--upper", upper, "--", "true"]
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc
    first = proc.stderr.splitlines()[0]
    assert "user.max_user_namespaces" in first and "Traceback" not in proc.stderr, proc.stderr
    assert f"nixfs mount --lower {lower} --upper {upper}" in proc.stderr
    assert "--store \"local?root=$HOME/nixroot\"" in proc.stderr


def nix_setting(user, entry, env, name: str) -> str:
    """A Nix setting as Nix sees it under the entrypoint."""
    proc = user.run(entry, "nix", "--extra-experimental-features", "nix-command", "show-config",
                    env=env)
    assert proc.returncode == 0, proc.stderr
    values = [line.partition(" = ")[2] for line in proc.stdout.splitlines()
              if line.startswith(f"{name} = ")]
    assert len(values) == 1, proc.stdout
    return values[0]


def test_entrypoint_recipe(user):
    """recipes/entrypoint.sh as a pod would run it (the image's nixfs replaced by ours)."""
    lower, upper = plain_layers(user)
    entry = user.home / "entrypoint.sh"
    shutil.copy(REPO / "recipes/entrypoint.sh", entry)
    os.chmod(entry, 0o755)
    env = {"NIXFS_LOWER": str(lower), "NIXFS_UPPER": str(upper / "u"), "NIXFS": NIXFS}
    proc = user.run(entry, "sh", "-c", "cat /nix/store/aaa-pkg/bin/pkg; "
                    "echo built > /nix/store/new; echo \"$NIX_CONFIG\"", env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ("#!/bin/sh\necho pkg\nsandbox = false\nbuild-users-group =\n"
                           "substituters = \n")
    assert (upper / "u/store/new").read_text() == "built\n"
    assert nix_setting(user, entry, env, "substituters") == ""  # offline pods: no retries
    cache = {"NIXFS_SUBSTITUTERS": "https://cache.example.org",
             "NIXFS_TRUSTED_PUBLIC_KEYS": "cache.example.org-1:AAAA"}
    assert nix_setting(user, entry, dict(env, **cache), "substituters") == cache[
        "NIXFS_SUBSTITUTERS"]
    assert nix_setting(user, entry, dict(env, **cache), "trusted-public-keys") == cache[
        "NIXFS_TRUSTED_PUBLIC_KEYS"]
    # A user's own NIX_CONFIG comes last (it wins) and keeps the image's other settings.
    own = dict(env, NIX_CONFIG="substituters = https://mine.example.org\ncores = 3")
    assert nix_setting(user, entry, own, "substituters") == "https://mine.example.org"
    assert nix_setting(user, entry, own, "cores") == "3"
    assert nix_setting(user, entry, own, "build-users-group") == ""
    proc = user.run(entry, "true", env=dict(env, NIXFS_LOWER=str(user.home)))
    assert proc.returncode == 2 and "holds no store/" in proc.stderr
    # `kubectl exec` into the pod: nsenter joins the command's namespaces and root.
    pidfile = user.dir("run") / "pid"
    p = user_popen(user, entry, "sh", "-c", f"echo $$ > {pidfile}; exec sleep 30", env=env)
    try:
        pid = wait_for_pid(pidfile)
        proc = user.run("nsenter", "-t", pid, "-U", "-m", "-r", "-w", "--preserve-credentials",
                        "sh", "-c", "cat /nix/store/new; id -u")
        assert proc.stdout == f"built\n{user.uid}\n", proc.stderr
        os.kill(pid, signal.SIGTERM)
        assert p.wait(timeout=20) == 128 + signal.SIGTERM
    finally:
        p.kill()
    wait_none_left(user, timeout=2.0)


def test_store_only_mount_follows_deletions_in_the_upper(user):
    """nixfs in place of the kernel overlay under `local-overlay://`: Nix deletes upper
    copies in the upper layer itself, and the merged view follows without a remount."""
    work = user.dir("work")
    lower, upper, mnt = work / "L/nix/store", work / "U/store", work / "M/nix/store"
    for name, data in (("aaa-both", "lower\n"), ("ccc-lower", "c\n")):
        (lower / name).mkdir(parents=True)
        (lower / name / "f").write_text(data)
    subprocess.run(["chown", "-R", f"{user.uid}:{user.gid}", str(work)], check=True)
    script = (f"set -e; mkdir -p {upper}/aaa-both {upper}/bbb-upper {mnt}; "
              f"echo upper > {upper}/aaa-both/f; echo b > {upper}/bbb-upper/f")
    assert user.run("sh", "-c", script).returncode == 0
    proc = user.nixfs("mount", "--no-nix", "--lower", lower, "--upper", upper, mnt)
    assert proc.returncode == 0, proc.stderr
    try:
        show = f"cat {mnt}/aaa-both/f; ls {mnt}; cat {mnt}/bbb-upper/f 2>&1 || true"
        assert user.run("sh", "-c", show).stdout.split() == [
            "upper", "aaa-both", "bbb-upper", "ccc-lower", "b"]
        # Deleted in the upper directory itself, not through the mount.
        assert user.run("rm", "-rf", upper / "aaa-both", upper / "bbb-upper").returncode == 0
        deadline = time.monotonic() + 3.0  # the mount's TTL for upper objects is 1 s
        while True:
            out = user.run("sh", "-c", show).stdout.split()
            if out[:4] == ["lower", "aaa-both", "ccc-lower", "cat:"] or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert out[:4] == ["lower", "aaa-both", "ccc-lower", "cat:"], out
        assert "No such file" in " ".join(out)
        # and writing there works again, into a fresh copy-up
        assert user.run("sh", "-c", f"echo new > {mnt}/aaa-both/g").returncode == 0
        assert (upper / "aaa-both/g").read_text() == "new\n"
    finally:
        proc = user.nixfs("umount", mnt)
        force_unmount(mnt)
    assert proc.returncode == 0, proc.stderr


def test_run_in_a_terminal_ctrl_c(user):
    """^C in a terminal reaches the command once (the terminal signals the whole process
    group; nixfs run passes on only signals sent to it alone) and ends the run with 130."""
    import pty
    import termios
    lower, upper = plain_layers(user)
    codes = user.dir("ints") / "codes"
    # The command records the origin (si_code) of every SIGINT it gets for a second, then
    # ends as if killed by it.
    catcher = (
        "import os, signal, time\n"
        "signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})\n"
        "print('ready', flush=True)\n"
        "got = [signal.sigwaitinfo({signal.SIGINT}).si_code]\n"
        "end = time.monotonic() + 1\n"
        "while (left := end - time.monotonic()) > 0:\n"
        "    info = signal.sigtimedwait({signal.SIGINT}, left)\n"
        "    got += [info.si_code] if info else []\n"
        f"open('{codes}', 'w').write(repr(got))\n"
        "signal.signal(signal.SIGINT, signal.SIG_DFL)\n"
        "signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})\n"
        "os.kill(os.getpid(), signal.SIGINT)\n")
    cmd = ["setpriv", f"--reuid={user.uid}", f"--regid={user.gid}", "--clear-groups", "env", "-i",
           *(f"{k}={v}" for k, v in user.env().items()), *NIXFS.split(), "run", "--lower",
           str(lower), "--upper", str(upper), "--no-nix", "--", "/usr/bin/python3", "-c", catcher]
    master, slave = pty.openpty()

    def controlling_tty():
        os.setsid()
        import fcntl
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    p = subprocess.Popen(cmd, stdin=slave, stdout=slave, stderr=slave, preexec_fn=controlling_tty)
    os.close(slave)
    try:
        out = b""
        deadline = time.monotonic() + 20
        while b"ready" not in out and time.monotonic() < deadline:
            out += os.read(master, 1024)
        assert b"ready" in out, out
        os.write(master, b"\x03")  # ^C: the terminal sends SIGINT to its foreground group
        assert p.wait(timeout=20) == 128 + signal.SIGINT
    finally:
        p.kill()
        os.close(master)
    assert codes.read_text() == "[128]", codes.read_text()  # SI_KERNEL only: not passed on
    wait_none_left(user, timeout=2.0)
