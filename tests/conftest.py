import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import NixfsMount, force_unmount, snapshot  # noqa: E402

OLD_NS = 1_577_836_800 * 10**9  # 2020-01-01: lower objects carry this mtime
SPARSE_SIZE = 2**20  # a sparse file with data at both ends


def is_root() -> bool:
    return os.geteuid() == 0


needs_root = pytest.mark.skipif(not is_root(), reason="needs root")


def make_lower(root: Path, abs_target: str = "/etc/passwd") -> Path:
    """A small lower tree with every kind of object an overlay must handle."""
    root.mkdir(parents=True, exist_ok=True)
    files = {
        "store/aaa-pkg/bin/pkg": b"#!/bin/sh\necho pkg\n",
        "store/aaa-pkg/share/doc/README": b"aaa readme\n",
        "store/bbb-lib/lib/libb.so": b"\x7fELF fake\n",
        "dir/file": b"content\n",
        "dir/ro-file": b"read only\n",
        "dir/sub/nested/deep/f": b"deep\n",
        "dir/ro-dir/x": b"x\n",
        "dir/hard1": b"hard link\n",
        "dir/xattr-file": b"has xattrs\n",
        "top-file": b"top\n",
    }
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    (root / "store/aaa-pkg/bin/pkg").chmod(0o755)
    (root / "dir/ro-file").chmod(0o444)
    (root / "dir/empty").mkdir()
    os.link(root / "dir/hard1", root / "dir/hard2")
    os.symlink(abs_target, root / "dir/link-abs")
    os.symlink("file", root / "dir/link-rel")
    os.symlink("libb.so", root / "store/bbb-lib/lib/libb.so.1")
    os.mkfifo(root / "dir/fifo")
    os.setxattr(root / "dir/xattr-file", "user.test", b"value")
    os.setxattr(root / "dir/sub", "user.dir", b"yes")
    with open(root / "dir/sparse", "wb") as f:
        f.write(b"head")
        f.seek(SPARSE_SIZE - 4)
        f.write(b"tail")
    (root / "dir/ro-dir").chmod(0o555)
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames + dirnames:
            os.utime(os.path.join(dirpath, name), ns=(OLD_NS, OLD_NS), follow_symlinks=False)
    os.utime(root, ns=(OLD_NS, OLD_NS))
    return root


def lower_fingerprint(root: Path) -> dict:
    """What must never change in a lower: contents, modes, owners, times, xattrs."""
    snap = snapshot(root, times_before=2**63)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            key = os.fsencode(os.path.relpath(path, root))
            snap[key]["ctime"] = st.st_ctime_ns
            snap[key]["ino"] = st.st_ino
            if not stat.S_ISLNK(st.st_mode):
                snap[key]["all_xattrs"] = sorted(os.listxattr(path))
    return snap


@pytest.fixture
def lower(tmp_path):
    """The standard lower; the test fails if anything in it changed."""
    root = make_lower(tmp_path / "lower")
    before = lower_fingerprint(root)
    yield root
    assert lower_fingerprint(root) == before, "the lower layer was modified"


@pytest.fixture
def upper(tmp_path):
    path = tmp_path / "upper"
    path.mkdir()
    return path


@pytest.fixture
def mnt(tmp_path):
    path = tmp_path / "mnt"
    path.mkdir()
    yield path
    force_unmount(path)


@pytest.fixture
def mounted(lower, upper, mnt):
    with NixfsMount(lower, upper, mnt) as m:
        yield m


def run(*cmd, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)


TEST_USER = "nixfstest"


class OrdinaryUser:
    """An unprivileged user that runs nixfs from a copy of the package it can read."""

    def __init__(self, home: Path):
        import pwd
        self.name = TEST_USER
        pw = pwd.getpwnam(TEST_USER)
        self.uid, self.gid = pw.pw_uid, pw.pw_gid
        self.home = home
        self.pythonpath = home / "src"
        import shutil
        shutil.copytree(Path(__file__).resolve().parent.parent / "nixfs", self.pythonpath / "nixfs",
                        ignore=shutil.ignore_patterns("__pycache__"))
        for dirpath, dirnames, filenames in os.walk(home):
            os.chmod(dirpath, 0o755)
            for name in filenames:
                os.chmod(os.path.join(dirpath, name), 0o644)

    def dir(self, name: str) -> Path:
        path = self.home / name
        path.mkdir()
        os.chown(path, self.uid, self.gid)
        return path

    def env(self) -> dict:
        return {"PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin", "HOME": str(self.home),
                "PYTHONPATH": str(self.pythonpath), "LANG": "C.UTF-8"}

    def run(self, *cmd, env=None, **kw) -> subprocess.CompletedProcess:
        full_env = self.env()
        full_env.update(env or {})
        args = ["runuser", "-u", self.name, "--", "env", "-i"]
        args += [f"{k}={v}" for k, v in full_env.items()] + [str(c) for c in cmd]
        return subprocess.run(args, capture_output=True, text=True, timeout=120, **kw)

    def nixfs(self, *args, **kw) -> subprocess.CompletedProcess:
        return self.run(sys.executable, "-m", "nixfs", *args, **kw)


@pytest.fixture(scope="session")
def _test_user():
    if run("id", TEST_USER).returncode != 0:
        subprocess.run(["useradd", "--create-home", TEST_USER], check=True)


@pytest.fixture
def fuse_for_all():
    """/dev/fuse usable by ordinary users, as these machines need (restored after)."""
    mode = stat.S_IMODE(os.stat("/dev/fuse").st_mode)
    os.chmod("/dev/fuse", 0o666)
    yield
    os.chmod("/dev/fuse", mode)


@pytest.fixture
def user(_test_user, fuse_for_all):
    if not is_root():
        pytest.skip("needs root to act as an ordinary user")
    import shutil
    import tempfile
    home = Path(tempfile.mkdtemp(prefix="nixfs-user-"))  # pytest's own tmp is root-only
    try:
        yield OrdinaryUser(home)
    finally:
        for path in home.iterdir():
            force_unmount(path)
        shutil.rmtree(home, ignore_errors=True)
