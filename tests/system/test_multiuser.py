"""A node's /nix for every user (issue 17): root mounts nixfs at /nix, a stock nix-daemon
(Debian's nix-bin 2.8) with real build users runs on top, and ordinary users build through it.

Everything happens in a private mount namespace of the test's own (``unshare -m
--propagation private``), so the host's /nix is never mounted over: the host only gets an
empty /nix directory for the test's time if it has none.  Commands enter the namespace
with ``nsenter``; files in it are read through ``/proc/HOLDER/root``.
"""

import json
import os
import pwd
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import is_root
from harness import REPO
from nixstore import nix_build

pytestmark = pytest.mark.skipif(not is_root(), reason="needs root (useradd, mount namespaces)")

NIXFS = [sys.executable, "-m", "nixfs"]
SOCKET = "/nix/var/nix/daemon-socket/socket"
# "Within a few seconds" (issue 17) for a path added to the lower while mounted; the mount
# follows the lower's database within a second or two.
LOWER_ADDITION_BOUND_S = 10

# The builder records who ran it and where: the sandbox runs it as uid 1000 with host name
# "localhost", no sandbox as the build user itself.
EXPR = """let
  bb = builtins.path {{ path = {busybox}; name = "busybox"; }};
  mk = name: deps: derivation {{
    inherit name; system = builtins.currentSystem;
    builder = "${{bb}}/busybox";
    args = [ "sh" "-c" "${{bb}}/busybox mkdir -p $out && ${{bb}}/busybox id -u > $out/uid && ${{bb}}/busybox hostname > $out/host && echo ${{name}} ${{toString deps}} > $out/name" ];
  }};
  liba = mk "liba" [ ];
  libb = mk "libb" [ liba ];
in {{
  inherit liba libb;
{extra}
}}
"""
LOWER_ATTRS = ("liba", "libb")


def recipe_options(lower: Path, upper: Path) -> str:
    """recipes/systemd/nix.mount's Options= with this test's layers in place of its paths."""
    text = (REPO / "recipes/systemd/nix.mount").read_text()
    line = next(x for x in text.splitlines() if x.startswith("Options="))
    options = []
    for opt in line[len("Options="):].split(","):
        key = opt.split("=", 1)[0]
        options.append({"lowerdir": f"lowerdir={lower}",
                        "upperdir": f"upperdir={upper}"}.get(key, opt))
    return ",".join(options)


def expression(base: Path, extra: dict[str, str]) -> Path:
    """A world-readable expression with the lower's derivations and *extra* (name: deps)."""
    lines = "\n".join(f'  {name} = mk "{name}" [ {deps} ];' for name, deps in extra.items())
    path = base / f"expr-{'-'.join(extra) or 'lower'}.nix"
    path.write_text(EXPR.format(busybox=base / "busybox", extra=lines))
    path.chmod(0o644)
    return path


def world_readable_tmp(prefix: str) -> Path:
    """A temporary directory every user can traverse (pytest's own is root's alone)."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o755)
    return path


@pytest.fixture(scope="module")
def built_lower():
    """A small store built once by Debian's Nix in a chroot store: liba <- libb."""
    base = world_readable_tmp("nixfs-mu-lower-")
    try:
        (base / "busybox").mkdir()
        shutil.copy(shutil.which("busybox") or "/bin/busybox", base / "busybox/busybox")
        outs = nix_build(base / "L", expression(base, {}), *LOWER_ATTRS)
        yield base, dict(zip(LOWER_ATTRS, outs))
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _mnt_ns(pid) -> int | None:
    try:
        return os.stat(f"/proc/{pid}/ns/mnt").st_ino
    except OSError:
        return None


class Namespace:
    """A private mount namespace held open by a sleeping process, entered with nsenter.

    Private towards the host (nothing mounted in it shows outside), shared inside by
    default as a systemd host's mounts are: nix-daemon 2.8 unshares a mount namespace of
    its own when it starts, whose copy of /nix is then a peer of the namespace's, as on a
    node.  ``propagation="private"`` keeps it private inside too, as on a host whose root
    is private (this machine's is): the daemon's copy of /nix is then a separate mount.
    """

    def __init__(self, propagation: str = "shared"):
        self.holder = subprocess.Popen(["unshare", "-m", "--propagation", "private",
                                        "sleep", "infinity"])
        mine = _mnt_ns("self")
        while _mnt_ns(self.holder.pid) == mine:  # unshare has not exec'd sleep yet
            if self.holder.poll() is not None:
                raise RuntimeError("unshare -m failed")
            time.sleep(0.01)
        self.ns = _mnt_ns(self.holder.pid)
        # The namespace got a copy of every host mount: a copy of another FUSE mount would
        # keep that file system (and its daemon) alive after the host unmounts it.
        for target in self.mounts(types=("fuse",)):
            self.run("umount", "-l", target)
        if propagation == "shared":  # new peer groups, the namespace's alone
            subprocess.run(self.argv("mount", "--make-rshared", "/"), check=True)
        self.others: set[int] = set()  # namespaces unshared by processes started in it

    def mounts(self, types=None) -> list[str]:
        """Mount points in the namespace (of FUSE types starting with one of *types*)."""
        out = []
        with open(f"/proc/{self.holder.pid}/mountinfo") as f:
            for line in f:
                pre, _, post = line.partition(" - ")
                fstype = post.split()[0]
                if types is None or fstype.startswith(types):
                    out.append(pre.split()[4].encode().decode("unicode_escape"))
        return out

    def top_mount(self, target: str) -> str | None:
        """The file system type of the topmost mount at *target*, or None."""
        found = None
        with open(f"/proc/{self.holder.pid}/mountinfo") as f:
            for line in f:
                pre, _, post = line.partition(" - ")
                if pre.split()[4] == target:
                    found = post.split()[0]
        return found

    def path(self, path: str) -> Path:
        """*path* as seen inside the namespace, reachable from outside it."""
        return Path(f"/proc/{self.holder.pid}/root") / path.lstrip("/")

    def argv(self, *cmd, user=None, env=None) -> list[str]:
        full_env = {"PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin", "LANG": "C.UTF-8"}
        if user is not None:
            full_env["HOME"] = pwd.getpwnam(user).pw_dir
        full_env.update(env or {})
        args = ["nsenter", "-t", str(self.holder.pid), "-m", "--"]
        if user is not None:
            args += ["runuser", "-u", user, "--"]
        return args + ["env", "-i"] + [f"{k}={v}" for k, v in full_env.items()] + list(map(str, cmd))

    def run(self, *cmd, user=None, env=None, timeout=120) -> subprocess.CompletedProcess:
        return subprocess.run(self.argv(*cmd, user=user, env=env), capture_output=True,
                              text=True, timeout=timeout)

    def nixfs(self, *args, timeout=120) -> subprocess.CompletedProcess:
        return self.run(*NIXFS, *args, env={"PYTHONPATH": str(REPO)}, timeout=timeout)

    def adopt(self, pid: int) -> None:
        """Count *pid*'s mount namespace as part of this one (nix-daemon unshares its own)."""
        ns = _mnt_ns(pid)
        if ns is not None and ns != self.ns:
            self.others.add(ns)

    def processes(self) -> list[int]:
        """Processes in the namespace (or one it adopted) besides its holder: all of them
        started by the test."""
        spaces = {self.ns} | self.others
        pids = []
        for name in os.listdir("/proc"):
            if name.isdigit() and int(name) != self.holder.pid and _mnt_ns(name) in spaces:
                pids.append(int(name))
        return pids

    def close(self) -> None:
        """End every process in the namespace and the namespace with them, whatever state
        a failed test left: the daemons first, then the mounts, then the holder."""
        if self.holder.returncode is not None:
            return
        try:
            for pid in self.processes():
                if _comm(pid) == "nix-daemon":
                    _end(pid)
            for target in reversed(self.mounts(types=("fuse.nixfs",))):
                if self.nixfs("umount", target, timeout=60).returncode != 0:
                    self.run("umount", "-l", target)
            for pid in self.processes():
                _end(pid)
        finally:
            self.holder.kill()
            self.holder.wait()


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _end(pid: int, timeout: float = 30) -> None:
    """SIGTERM *pid*, then SIGKILL if it has not gone within *timeout* seconds."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        os.kill(pid, signal.SIGTERM)
        import select
        if not select.select([pidfd], [], [], timeout)[0]:
            os.kill(pid, signal.SIGKILL)
            select.select([pidfd], [], [], timeout)
    except ProcessLookupError:
        pass
    finally:
        os.close(pidfd)


@pytest.fixture
def host_nix():
    """/nix on the host as a mountpoint for the namespaces (made for the test if missing)."""
    made = not os.path.lexists("/nix")
    if made:
        os.mkdir("/nix", 0o755)
    try:
        yield Path("/nix")
    finally:
        for _ in range(50) if made else ():  # a namespace's mounts go just after it
            try:
                os.rmdir("/nix")
                break
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(0.1)


@pytest.fixture
def namespace(host_nix, request):
    ns = Namespace(getattr(request, "param", "shared"))
    try:
        yield ns
    finally:
        ns.close()


class Accounts:
    """A build-users group with two build users, and two ordinary users, all made for the
    test (unique names, removed after)."""

    def __init__(self, homes: Path):
        tag = os.getpid()
        self.group = f"nixfsbld{tag}"
        self.builders = [f"nixfsbld{tag}-{i}" for i in (1, 2)]
        self.users = [f"nixfsu{tag}{c}" for c in "ab"]
        self.made: list[tuple[str, str]] = []
        subprocess.run(["groupadd", "--system", self.group], check=True)
        self.made.append(("groupdel", self.group))
        for name in self.builders:  # as Debian's nix-setup-systemd makes them
            subprocess.run(["useradd", "--system", "--home-dir", "/var/empty", "--gid",
                            self.group, "--groups", self.group, "--no-user-group",
                            "--shell", "/usr/sbin/nologin", name], check=True)
            self.made.append(("userdel", name))
        for name in self.users:
            subprocess.run(["useradd", "--create-home", "--home-dir", str(homes / name), name],
                           check=True)
            self.made.append(("userdel", name))
        self.builder_uids = {pwd.getpwnam(n).pw_uid for n in self.builders}

    def home(self, user: str) -> Path:
        return Path(pwd.getpwnam(user).pw_dir)

    def remove(self) -> None:
        for cmd, name in reversed(self.made):
            subprocess.run([cmd, name], capture_output=True)


@pytest.fixture
def accounts():
    homes = world_readable_tmp("nixfs-mu-homes-")
    made = Accounts(homes)
    try:
        yield made
    finally:
        made.remove()
        shutil.rmtree(homes, ignore_errors=True)


class Node:
    """One node's /nix in a namespace: the lower (a copy of the built store), an upper,
    nixfs mounted by root, nix-daemon on top, and the accounts that use it."""

    def __init__(self, ns: Namespace, accounts: Accounts, built_lower, base: Path):
        lower_base, self.lower_paths = built_lower
        self.ns, self.accounts, self.base = ns, accounts, base
        self.lower_root = base / "L"
        subprocess.run(["cp", "-a", str(lower_base / "L"), str(self.lower_root)], check=True)
        shutil.copytree(lower_base / "busybox", base / "busybox")
        self.lower = self.lower_root / "nix"
        self.upper = base / "upper"
        self.upper.mkdir()
        self.conf_dir = base / "etc-nix"
        self.conf_dir.mkdir()
        self.daemon: subprocess.Popen | None = None

    # ---------------------------------------------------------------- the mount
    def mount(self, *, lower: Path | None = None, helper_form=False):
        """Root's mount of /nix with allow_other (the root default on branch mount-over;
        given anyway so the test holds either way)."""
        lower = lower or self.lower
        if helper_form:  # as mount(8) runs it for recipes/systemd/nix.mount
            proc = self.ns.nixfs("nixfs", "/nix", "-o", recipe_options(lower, self.upper))
        else:
            proc = self.ns.nixfs("mount", "--lower", lower, "--upper", self.upper,
                                 "-o", "allow_other", "/nix")
        assert proc.returncode == 0, proc.stderr
        assert self.ns.top_mount("/nix") == "fuse.nixfs"

    def umount(self):
        proc = self.ns.nixfs("umount", "/nix", timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert self.ns.top_mount("/nix") != "fuse.nixfs"

    # ---------------------------------------------------------------- the daemon
    def start_daemon(self, *, sandbox: bool):
        conf = self.conf_dir / "nix.conf"
        conf.write_text("\n".join([
            f"build-users-group = {self.accounts.group}",
            f"sandbox = {'true' if sandbox else 'false'}",
            "sandbox-fallback = false",
            "substituters =",
            "trusted-users = root",
            "experimental-features = nix-command",
        ]) + "\n")
        conf.chmod(0o644)
        self.conf_dir.chmod(0o755)
        log = open(self.base / "nix-daemon.log", "a")
        self.daemon = subprocess.Popen(
            self.ns.argv("nix-daemon", env={"NIX_CONF_DIR": str(self.conf_dir)}),
            stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + 30
        while self.root_nix("nix-store", "--check-validity", self.lower_paths["liba"],
                            daemon=True).returncode != 0:  # a stale socket is in the upper
            assert self.daemon.poll() is None, self.daemon_log()
            assert time.monotonic() < deadline, "nix-daemon did not answer\n" + self.daemon_log()
            time.sleep(0.1)
        self.ns.adopt(self.daemon.pid)  # it answered: past its start-up, and its unshare

    def stop_daemon(self):
        """SIGTERM the daemon, and wait until no nix-daemon (nor a connection's child)
        is left in the namespace."""
        self.daemon.terminate()
        self.daemon.wait(timeout=30)
        for pid in self.ns.processes():
            if _comm(pid) == "nix-daemon":
                _end(pid)
        self.daemon = None

    def daemon_log(self) -> str:
        return (self.base / "nix-daemon.log").read_text(errors="replace")[-3000:]

    # ---------------------------------------------------------------- Nix
    def env(self, daemon: bool) -> dict:
        env = {"NIX_CONF_DIR": str(self.conf_dir)}
        if daemon:
            env["NIX_REMOTE"] = "daemon"
        return env

    def root_nix(self, *cmd, daemon=True) -> subprocess.CompletedProcess:
        return self.ns.run(*cmd, env=self.env(daemon))

    def user_nix(self, user: str, *cmd) -> subprocess.CompletedProcess:
        return self.ns.run(*cmd, user=user, env=self.env(True))

    def build(self, user: str, expr: Path, attr: str, *, link: str | None = None):
        """*user* builds *attr* through the daemon; returns (out path, derivations built)."""
        out = ["-o", str(self.accounts.home(user) / link)] if link else ["--no-out-link"]
        proc = self.user_nix(user, "nix-build", expr, "-A", attr, *out)
        assert proc.returncode == 0, proc.stderr + self.daemon_log()
        built = [line for line in proc.stderr.splitlines() if line.startswith("building ")]
        return proc.stdout.strip(), built

    def valid(self, path: str, user: str | None = None) -> bool:
        cmd = ("nix-store", "--check-validity", path)
        proc = self.user_nix(user, *cmd) if user else self.root_nix(*cmd)
        return proc.returncode == 0

    def read(self, user: str, path: str) -> str:
        proc = self.ns.run("cat", path, user=user)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.strip()

    def upper_names(self) -> set[str]:
        return {n for n in os.listdir(self.upper / "store") if not n.startswith(".")}

    def all_lower_paths(self) -> list[str]:
        db = sqlite3.connect(f"file:{self.lower}/var/nix/db/db.sqlite?immutable=1", uri=True)
        try:
            return [row[0] for row in db.execute("select path from ValidPaths")]
        finally:
            db.close()


@pytest.fixture
def node(namespace, accounts, built_lower):
    base = world_readable_tmp("nixfs-mu-node-")
    try:
        yield Node(namespace, accounts, built_lower, base)
    finally:
        namespace.close()  # the daemons and the mount go before the files under them
        shutil.rmtree(base, ignore_errors=True)


def _users_build_and_share(node: Node, *, sandbox: bool) -> dict[str, str]:
    """Both users build one derivation each through the daemon (with a GC root in their
    home) and read each other's; returns user -> out path."""
    mode = "sandbox" if sandbox else "nosandbox"
    a, b = node.accounts.users
    names = {a: f"a-{mode}", b: f"b-{mode}"}
    expr = expression(node.base, {names[a]: "liba", names[b]: "libb"})
    outs = {}
    for user, name in names.items():
        out, built = node.build(user, expr, name, link=f"result-{name}")
        assert len(built) == 1 and name in built[0], built  # nothing the lower has
        outs[user] = out
        ran_as = node.read(user, f"{out}/uid")
        if sandbox:
            assert ran_as == "1000" and node.read(user, f"{out}/host") == "localhost"
        else:
            assert int(ran_as) in node.accounts.builder_uids, ran_as  # a build user
        # Built by the daemon: root's in the upper, as in any multi-user store.
        st = os.stat(node.upper / "store" / os.path.basename(out))
        assert (st.st_uid, st.st_gid) == (0, 0)
    for user, other in ((a, b), (b, a)):
        assert node.read(user, f"{outs[other]}/name").startswith(names[other])
        refs = node.user_nix(user, "nix-store", "-q", "--references", outs[other]).stdout.split()
        lib = node.lower_paths["liba" if other == a else "libb"]
        assert lib in refs
        again, built = node.build(user, expr, names[other])  # valid already: no build
        assert again == outs[other] and not built
    assert not [n for n in node.upper_names() if n.endswith(".chroot")]  # sandbox cleaned up
    return outs


def test_a_node_nix_for_every_user(node):
    """Root's nixfs at /nix, nix-daemon with build users (sandbox off, then on), two users
    sharing builds, root's GC, the lower growing while mounted, a clean stop and a remount."""
    a, b = node.accounts.users
    node.mount(helper_form=True)
    assert "allow_other" in recipe_options(node.lower, node.upper)
    assert node.ns.run("nix-store", "--check-validity", *node.lower_paths.values()).returncode == 0

    # A fresh upper has no socket directory: Debian's units' condition fails until the
    # recipes' tmpfiles.d rule has made it through the mount.
    condition = ("systemd-analyze", "condition", "ConditionPathIsReadWrite=/nix/var/nix/daemon-socket")
    assert node.ns.run(*condition).returncode != 0
    tmpfiles = node.ns.run("systemd-tmpfiles", "--create", "--prefix=/nix/var/nix",
                           REPO / "recipes/systemd/nixfs-nix.conf")
    assert tmpfiles.returncode == 0, tmpfiles.stderr
    assert node.ns.run(*condition).returncode == 0
    assert (node.upper / "var/nix/daemon-socket").is_dir()
    outs = {}
    for sandbox in (False, True):
        node.start_daemon(sandbox=sandbox)
        assert node.ns.path(SOCKET).is_socket()
        assert (node.upper / SOCKET[len("/nix/"):]).is_socket()  # the socket is on the mount
        outs[sandbox] = _users_build_and_share(node, sandbox=sandbox)
        if not sandbox:
            node.stop_daemon()

    # Root's GC through the daemon: upper garbage goes, the lower and rooted builds stay.
    expr = expression(node.base, {"junk": "libb"})
    junk, _ = node.build(a, expr, "junk")
    assert os.path.basename(junk) in node.upper_names()
    proc = node.root_nix("nix-store", "--gc")
    assert proc.returncode == 0, proc.stderr
    assert not node.valid(junk) and os.path.basename(junk) not in node.upper_names()
    lower_paths = node.all_lower_paths()
    assert len(lower_paths) >= 5  # liba, libb, their .drv files, busybox
    for path in lower_paths:
        assert node.valid(path), path
        assert node.ns.path(path).exists(), path
    assert not [n for n in os.listdir(node.upper / "store") if n.startswith(".wh.")]
    for user_outs in outs.values():
        for out in user_outs.values():
            assert node.valid(out, user=b), out
    # nixfs' own collector at /nix, beside the running daemon, does the same.
    junk2, _ = node.build(b, expression(node.base, {"junk2": "liba"}), "junk2")
    proc = node.ns.nixfs("gc", "/nix")
    assert proc.returncode == 0, proc.stderr
    freed = proc.stdout.split()
    assert junk2 in freed and all(p.endswith(("-junk2", "-junk2.drv")) for p in freed), freed
    assert not node.valid(junk2)
    for user_outs in outs.values():
        assert all(node.valid(out) for out in user_outs.values())

    # A path the lower gains while mounted is valid through the daemon within seconds.
    late_expr = expression(node.base, {"late": "libb"})
    late = nix_build(node.lower_root, late_expr, "late")[0]
    deadline = time.monotonic() + LOWER_ADDITION_BOUND_S
    while not node.valid(late, user=a):
        assert time.monotonic() < deadline, f"{late} not valid through the mount"
        time.sleep(0.2)
    assert node.read(b, f"{late}/name").startswith("late")
    late_again, built = node.build(b, late_expr, "late")
    assert late_again == late and not built
    assert os.path.basename(late) not in node.upper_names()

    status = node.ns.nixfs("status", "/nix")
    assert status.returncode == 0 and str(node.upper) in status.stdout, status.stderr

    # A clean stop: the daemon first, then nixfs; the upper is consistent.
    node.stop_daemon()
    node.umount()
    fsck = subprocess.run([*NIXFS, "fsck", "--lower", node.lower, "--upper", node.upper],
                          capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr

    # The remount kept everything: the users' builds are valid and readable.
    node.mount()
    node.start_daemon(sandbox=True)
    for user_outs in outs.values():
        for user, out in user_outs.items():
            other = b if user == a else a
            assert node.valid(out, user=other), out
            assert node.read(other, f"{out}/uid")
    assert node.valid(late)
    node.stop_daemon()
    node.umount()


@pytest.mark.parametrize("namespace", ["shared", "private"], indirect=True)
def test_umount_is_refused_while_nix_daemon_runs(node):
    """nix-daemon holds /nix (its socket, and a copy of the mount in the namespace it
    unshares): ``nixfs umount`` refuses at once, names it, and leaves everything working."""
    node.mount()
    node.start_daemon(sandbox=False)
    a, _ = node.accounts.users
    out, _ = node.build(a, expression(node.base, {"held": "liba"}), "held", link="result-held")
    try:
        proc = node.ns.nixfs("umount", "/nix", timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail("nixfs umount /nix did not return within 30 s while nix-daemon ran")
    assert proc.returncode == 2, proc.stderr
    assert str(node.daemon.pid) in proc.stderr and "nix-daemon" in proc.stderr, proc.stderr
    assert node.ns.top_mount("/nix") == "fuse.nixfs"  # nothing was detached
    assert node.valid(out, user=a)  # and the daemon still serves
    node.stop_daemon()
    node.umount()


def test_nixfs_over_the_nodes_own_nix(node):
    """A node whose /nix is the shared store (here a bind mount of the lower) gets nixfs
    over it, with that same /nix as the lower, as nix.mount in recipes/ does."""
    a, b = node.accounts.users
    assert node.ns.run("mount", "--bind", "-o", "ro", node.lower, "/nix").returncode == 0
    lower_listing = sorted(os.listdir(node.lower / "store"))
    node.mount(lower=Path("/nix"), helper_form=True)
    node.start_daemon(sandbox=True)
    out, built = node.build(a, expression(node.base, {"mine": "libb"}), "mine", link="result-mine")
    assert len(built) == 1
    assert node.read(b, f"{out}/name").startswith("mine")
    node.stop_daemon()
    node.umount()
    assert node.ns.top_mount("/nix") != "fuse.nixfs"  # the lower's bind mount is back
    assert sorted(os.listdir(node.ns.path("/nix/store"))) == lower_listing
    assert sorted(os.listdir(node.lower / "store")) == lower_listing  # never written
    node.mount(lower=Path("/nix"), helper_form=True)
    assert node.ns.run("nix-store", "--check-validity", out,
                       env={"NIX_CONF_DIR": str(node.conf_dir)}).returncode == 0
    node.umount()


def test_mounts_at_nix_in_two_namespaces_are_told_apart(node):
    node.mount()
    other_upper = node.base / "upper2"
    other_upper.mkdir()
    second = Namespace()
    try:
        proc = second.nixfs("mount", "--lower", node.lower, "--upper", other_upper,
                            "-o", "allow_other", "/nix")
        assert proc.returncode == 0, proc.stderr
        for ns, upper in ((node.ns, node.upper), (second, other_upper)):
            status = ns.nixfs("status", "/nix", "--json")
            assert status.returncode == 0, status.stderr
            assert json.loads(status.stdout)["upper"] == str(upper)
        host = subprocess.run([*NIXFS, "status", "/nix"], capture_output=True, text=True,
                              env=dict(os.environ, PYTHONPATH=str(REPO)))
        assert host.returncode != 0 and str(node.upper) not in host.stdout, host.stdout
        assert "/nix" in host.stderr and "Traceback" not in host.stderr, host.stderr
    finally:
        second.close()
    node.umount()
