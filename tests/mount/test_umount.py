"""``nixfs umount`` of a busy mount: refused at once, naming each holder, nothing
detached or lost; ``--lazy`` detaches; a stock nix-daemon serving from the mount
(in the mount namespace of its own that Nix takes as root) holds it too."""

import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from conftest import needs_root
from harness import NixfsMount, exited, run_nixfs
from nixstore import nix_env
from test_cli import expect_usage_error
from nixlower import built_lower  # noqa: F401 (a fixture)


def _hold(*python: str, cwd=None) -> subprocess.Popen:
    """A process that runs *python* and then waits (holding whatever it opened)."""
    code = "; ".join(python + ("print('ready', flush=True)", "import time; time.sleep(600)"))
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=cwd, stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline() == "ready\n"
    return proc


def _stop(*procs):
    for p in procs:
        p.kill()
        p.wait()


def test_umount_names_every_holder_and_detaches_nothing(lower, upper, mnt):
    with NixfsMount(lower, upper, mnt):
        in_dir = _hold(cwd=mnt / "dir")
        with_file = _hold(f"f = open({str(mnt / 'new')!r}, 'w')")
        with_socket = _hold("import socket", "s = socket.socket(socket.AF_UNIX)",
                            f"s.bind({str(mnt / 'sock')!r})", "s.listen()")
        mapped = _hold("import mmap", f"f = open({str(mnt / 'dir/file')!r}, 'rb')",
                       "m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)")  # (mmap keeps a dup)
        try:
            proc = run_nixfs("umount", mnt, timeout=60)
            expect_usage_error(proc, "busy", f"(pid {in_dir.pid}: working directory)",
                               f"(pid {with_file.pid}: open file {mnt / 'new'})",
                               f"(pid {with_socket.pid}: a socket bound on it)",
                               f"(pid {mapped.pid}: ", f"mapped file {mnt / 'dir/file'})",
                               "--lazy")
            assert os.path.ismount(mnt)
            client = socket.socket(socket.AF_UNIX)
            client.connect(str(mnt / "sock"))  # still there for its clients
            client.close()
        finally:
            _stop(in_dir, with_file, with_socket, mapped)
        # Nothing holds it now: a plain unmount (the fixture's) goes through.


def test_lazy_umount_detaches_and_the_daemon_ends_with_the_last_holder(lower, upper, mnt):
    m = NixfsMount(lower, upper, mnt).start()
    try:
        from nixfs import runtime
        daemon = runtime.read_record(str(mnt))["pid"]
        entry = runtime.find_mount(str(mnt))
        holder = _hold(f"f = open({str(mnt / 'dir/file')!r}, 'a')", "f.write('late\\n')", "f.flush()")
        proc = run_nixfs("umount", "--lazy", mnt, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert "detached" in proc.stderr and f"pid {holder.pid}" in proc.stderr
        assert not os.path.ismount(mnt) and not exited(daemon)
        _stop(holder)
        from nixfs import holders
        deadline = time.monotonic() + 60
        while not exited(daemon) and time.monotonic() < deadline:
            # (A namespace made meanwhile, say by another test, may hold a copy: it counts
            # as a holder only while it is there.)
            found = holders.find(entry, spare={daemon})
            if found and all(h.only_a_copy for h in found):
                break
            time.sleep(0.05)
        left = [h for h in holders.find(entry, spare={daemon}) if not h.only_a_copy]
        assert exited(daemon) or not left, left
        assert (upper / "dir/file").read_text() == "content\nlate\n"
    finally:
        m.force_unmount()


@needs_root
def test_umount_refused_while_a_stock_nix_daemon_serves_from_it(tmp_path, built_lower):
    base, paths = built_lower
    root, upper = tmp_path / "R", tmp_path / "upper"
    subprocess.run(["cp", "-a", str(base / "L"), str(root)], check=True)
    (root / "M/nix").mkdir(parents=True)
    upper.mkdir()
    mnt = root / "M/nix"
    socket_path = mnt / "var/nix/daemon-socket/socket"
    env = nix_env(NIX_STATE_DIR=str(mnt / "var/nix"))
    env["NIX_CONFIG"] += f"\nstore = local?root={root / 'M'}"
    query = ["nix-store", "--store", f"unix://{socket_path}", "-q", "--references", paths["app"]]
    with NixfsMount(root / "nix", upper, mnt):
        daemon = subprocess.Popen(["nix-daemon"], env=env, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        try:
            while not socket_path.exists():
                assert daemon.poll() is None, "nix-daemon did not start"
                time.sleep(0.05)
            assert subprocess.run(query, capture_output=True, env=env).returncode == 0
            proc = run_nixfs("umount", mnt, timeout=60)
            expect_usage_error(proc, "busy", f"nix-daemon (pid {daemon.pid}:", "--lazy")
            assert os.path.ismount(mnt)
            # Its clients still reach it: nothing was detached under it.
            done = subprocess.run(query, capture_output=True, text=True, env=env)
            assert done.returncode == 0, done.stderr
            assert paths["libb"] in done.stdout
        finally:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait()
        # Stopped first, as the docs say: the mount's own unmount (the fixture) goes through.


def test_an_ordinary_users_umount_names_its_holder_too(user):
    from conftest import make_lower
    lower = make_lower(user.home / "lower")
    up, mnt = user.dir("upper"), user.dir("mnt")
    proc = user.nixfs("mount", "--lower", lower, "--upper", up, mnt)
    assert proc.returncode == 0, proc.stderr
    try:
        holder = subprocess.Popen(["sh", "-c", f"cd {mnt}/dir && echo ready && exec sleep 600"],
                                  stdout=subprocess.PIPE, text=True, user=user.uid,
                                  group=user.gid, extra_groups=[])
        assert holder.stdout.readline() == "ready\n"
        try:
            proc = user.nixfs("umount", mnt)
            expect_usage_error(proc, "busy", "sleep (pid", "working directory")
            from nixfs import runtime  # (root may not stat a user's mount: read the table)
            assert runtime.find_mount(str(mnt)).fstype == runtime.FSTYPE
        finally:
            _stop(holder)
        proc = user.nixfs("umount", mnt)
        assert proc.returncode == 0, proc.stderr
    finally:
        user.nixfs("umount", "--lazy", mnt)
