"""Seeded random file system operations, for comparing nixfs with kernel overlayfs.

An operation is a plain tuple of relative paths and values, chosen by looking at
the reference mount; ``apply`` runs it on any mount and reports what happened
as data (a value or an errno name), so two mounts can be compared call by call.
Some operations are made by other uids (effective ids only, in a child process,
as pjdfstest makes them), so both mounts are open to every user; new objects are
made with umask 0 or a given one, so every mode bit the kernel passes on counts.
"""

import errno
import hashlib
import os
import random
import stat
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import as_caller  # noqa: E402
from nixfs.libc import RENAME_EXCHANGE, RENAME_NOREPLACE, renameat2  # noqa: E402

NAMES = ["a", "b", "c", "d", "new", "file", "sub", "x", "ro-dir", "empty", "deep"]
# Names at NAME_MAX and just past where ".wh." + the name fits (251 bytes): their
# whiteouts are kernel ones; the lower has entries of these lengths too.
LONG_NAMES = ["N" * 255, "M" * 252]
# Callers other than root (the mounts are made with allow_other): only the effective
# ids are switched, as pjdfstest does.
OTHER_CALLERS = [(65534, 65534), (1234, 5678)]
DATA = [b"", b"x", b"hello\n", b"0123456789" * 50, os.urandom(70000)]


def _tree(root: str) -> tuple[list[str], list[str]]:
    dirs, others = [""], []
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        rel = "" if rel == "." else rel
        for d in dirnames:
            p = os.path.join(rel, d)
            (dirs if not os.path.islink(os.path.join(root, p)) else others).append(p)
        others.extend(os.path.join(rel, f) for f in filenames)
    return sorted(dirs), sorted(others)


class Generator:
    def __init__(self, seed: int):
        self.rng = random.Random(seed)

    def _existing(self, dirs, others, kind=None):
        pool = {"dir": dirs[1:], "file": others}.get(kind, dirs[1:] + others)
        return self.rng.choice(pool) if pool else self.rng.choice(NAMES)

    def _new(self, dirs, others):
        r = self.rng.random()
        if r < 0.1 and others:  # below a non-directory: ENOTDIR
            return os.path.join(self.rng.choice(others), "x")
        if r < 0.15:
            return os.path.join("missing", self.rng.choice(NAMES))
        if r < 0.2:
            return os.path.join(self.rng.choice(dirs), self.rng.choice(LONG_NAMES))
        return os.path.join(self.rng.choice(dirs), self.rng.choice(NAMES))

    def _any(self, dirs, others):
        return self._existing(dirs, others) if self.rng.random() < 0.6 else self._new(dirs, others)

    def next(self, root: str) -> tuple:
        dirs, others = _tree(root)
        rng = self.rng
        kind = rng.choices(
            ["write", "pwrite", "read", "truncate", "mkdir", "rmdir", "unlink", "rename",
             "link", "symlink", "chmod", "utime", "setxattr", "removexattr", "mkfifo", "stat",
             "listdir", "readlink", "getxattr", "mknod", "chown", "unlink_open", "write_renamed",
             "create", "create_as", "rename_as"],
            weights=[8, 4, 4, 3, 6, 4, 5, 10, 3, 2, 3, 2, 2, 1, 1, 3, 3, 1, 1, 1, 2, 2, 2,
                     3, 2, 4])[0]
        # Kernel overlayfs copies a lower file up when it is opened for writing; nixfs, when
        # the kernel keeps opens, at the first write (or truncation): an open that writes
        # nothing differs only in a hard-linked lower file's link count, so writes of
        # nothing come with O_TRUNC (see docs/design.md, "Opens kept by the kernel").
        if kind == "write":
            data = rng.choice(DATA)
            return kind, self._any(dirs, others), data, rng.choice(
                [0, os.O_TRUNC, os.O_APPEND, os.O_EXCL]) if data else os.O_TRUNC
        if kind == "pwrite":
            return kind, self._existing(dirs, others, "file"), rng.randrange(0, 100000), rng.choice(DATA[1:])
        if kind == "truncate":
            return kind, self._any(dirs, others), rng.choice([0, 3, 5000, 100000])
        if kind == "mkdir":  # (umask 0: the kernel passes every bit on)
            return kind, self._new(dirs, others), rng.choice([0o755, 0o700, 0o555, 0o777, 0o1777])
        if kind == "create":  # a new file's mode, through the caller's umask
            return (kind, self._new(dirs, others), rng.choice([0o620, 0o642, 0o666, 0o2755]),
                    rng.choice([0, 0o022, 0o077]))
        if kind == "create_as":
            return kind, self._new(dirs, others), rng.choice([0o644, 0o666]), rng.choice(OTHER_CALLERS)
        if kind == "rename_as":
            return kind, self._existing(dirs, others), self._any(dirs, others), rng.choice(OTHER_CALLERS)
        if kind in ("rmdir", "listdir"):
            return kind, self._existing(dirs, others, "dir") if rng.random() < 0.8 else self._any(dirs, others)
        if kind == "rename":
            src = self._existing(dirs, others)
            dst = self._any(dirs, others)
            return kind, src, dst, rng.choice([0, 0, 0, RENAME_NOREPLACE, RENAME_EXCHANGE])
        if kind == "link":
            return kind, self._existing(dirs, others, "file"), self._new(dirs, others)
        if kind == "symlink":
            return kind, rng.choice(["a", "../x", "../dir/file"]), self._new(dirs, others)
        if kind == "chmod":
            return kind, self._existing(dirs, others), rng.choice(
                [0o644, 0o600, 0o755, 0o4755, 0o1777, 0o777])
        if kind == "utime":
            return kind, self._existing(dirs, others), rng.randrange(10**18, 2 * 10**18)
        if kind == "chown":
            return kind, self._existing(dirs, others), rng.choice([0, 1234]), rng.choice([0, 5678])
        if kind == "mknod":
            return kind, self._new(dirs, others)
        if kind in ("unlink_open", "write_renamed"):
            return kind, self._existing(dirs, others, "file"), self._any(dirs, others)
        if kind in ("setxattr", "removexattr", "getxattr"):
            return kind, self._existing(dirs, others), rng.choice(["user.a", "user.b", "user.test"]), rng.choice([b"1", b"22"])
        return kind, self._any(dirs, others)


def _result(fn):
    try:
        return ("ok", fn())
    except OSError as e:
        return ("err", errno.errorcode.get(e.errno, e.errno))


def apply(root: str, op: tuple):
    """Run *op* below *root*; never follows a symlink (a lower one may point anywhere)."""
    kind, path = op[0], os.path.join(root, op[1])
    nofollow = os.O_NOFOLLOW | os.O_NONBLOCK  # and a FIFO must not block

    def write():
        _, _, data, flags = op
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | nofollow | flags, 0o644)
        try:
            return os.write(fd, data) if data else 0
        finally:
            os.close(fd)

    def pwrite():
        fd = os.open(path, os.O_WRONLY | nofollow)
        try:
            return os.pwrite(fd, op[3], op[2])
        finally:
            os.close(fd)

    def read():
        fd = os.open(path, os.O_RDONLY | nofollow)
        try:
            data = b"".join(iter(lambda: os.read(fd, 1 << 20), b""))
        finally:
            os.close(fd)
        return hashlib.sha256(data).hexdigest()[:12]

    def st():
        s = os.lstat(path)
        return stat.S_IFMT(s.st_mode), stat.S_IMODE(s.st_mode), s.st_nlink, (
            s.st_size if not stat.S_ISDIR(s.st_mode) else None)

    def rename():
        renameat2(-100, os.fsencode(path), -100, os.fsencode(os.path.join(root, op[2])), op[3])

    def truncate():
        fd = os.open(path, os.O_WRONLY | nofollow)
        try:
            os.ftruncate(fd, op[2])
        finally:
            os.close(fd)

    def chmod():
        if stat.S_ISLNK(os.lstat(path).st_mode):
            return "symlink"  # chmod would follow it
        os.chmod(path, op[2])

    def unlink_open():
        # An open file outlives its name: read and stat it through the descriptor.
        fd = os.open(path, os.O_RDWR | nofollow)
        try:
            os.unlink(path)
            os.pwrite(fd, b"after unlink", 3)
            data = os.pread(fd, 100, 0)
            st = os.fstat(fd)
            return data, st.st_nlink, st.st_size
        finally:
            os.close(fd)

    def write_renamed():
        # A descriptor follows its file through a rename.
        # The write is made also when the rename fails: a hard-linked lower file opened
        # for writing and never written differs in its link count (docs/design.md).
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | nofollow)
        try:
            renameat2(-100, os.fsencode(path), -100, os.fsencode(os.path.join(root, op[2])), 0)
        finally:
            try:
                os.write(fd, b"+renamed")
            finally:
                os.close(fd)
        with open(os.path.join(root, op[2]), "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()[:12]

    def utime():
        os.utime(path, ns=(op[2], op[2]), follow_symlinks=False)
        return os.lstat(path).st_mtime_ns

    def new_file(rel: str, mode: int):
        def call():
            os.close(os.open(rel, os.O_CREAT | os.O_EXCL | os.O_WRONLY | nofollow, mode))
            return stat.S_IMODE(os.lstat(rel).st_mode)
        return call

    def as_root(fn, umask: int = 0):
        old = os.umask(umask)
        try:
            return fn()
        finally:
            os.umask(old)

    def create():
        return as_root(new_file(path, op[2]), op[3])

    def create_as():
        uid, gid = op[3]
        return as_caller(root, uid, gid, new_file(op[1], op[2]))

    def rename_as():
        uid, gid = op[3]
        return as_caller(root, uid, gid, lambda: os.rename(op[1], op[2]))

    actions = {
        "write": write,
        "pwrite": pwrite,
        "read": read,
        "truncate": truncate,
        "mkdir": lambda: as_root(lambda: os.mkdir(path, op[2])),
        "rmdir": lambda: os.rmdir(path),
        "unlink": lambda: os.unlink(path),
        "rename": rename,
        "link": lambda: os.link(path, os.path.join(root, op[2]), follow_symlinks=False),
        "symlink": lambda: os.symlink(op[1], os.path.join(root, op[2])),
        "chmod": chmod,
        "utime": utime,
        "setxattr": lambda: os.setxattr(path, op[2], op[3], follow_symlinks=False),
        "removexattr": lambda: os.removexattr(path, op[2], follow_symlinks=False),
        "getxattr": lambda: os.getxattr(path, op[2], follow_symlinks=False),
        "mkfifo": lambda: os.mkfifo(path),
        "mknod": lambda: os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(1, 3)),
        "chown": lambda: os.chown(path, op[2], op[3], follow_symlinks=False),
        "unlink_open": unlink_open,
        "write_renamed": write_renamed,
        "stat": st,
        "listdir": lambda: sorted(os.listdir(path)),
        "readlink": lambda: os.readlink(path),
        "create": create,
    }
    if kind == "symlink":
        path = os.path.join(root, op[2])
    if kind == "create_as":
        return create_as()
    if kind == "rename_as":
        return rename_as()
    return _result(actions[kind])


def compare_with_kernel(tmp_path, seed: int, steps: int) -> None:
    from conftest import make_lower
    from harness import KernelOverlay, NixfsMount, diff, snapshot

    decoy = tmp_path / "decoy"  # what the lower's absolute symlink points to
    decoy.write_bytes(b"decoy\n")
    lower = make_lower(tmp_path / "lower", abs_target=str(decoy))
    _add_callers_entries(lower)
    dirs = {name: tmp_path / name for name in ("k-upper", "k-work", "k-mnt", "n-upper", "n-mnt")}
    for path in dirs.values():
        path.mkdir()
    start = time.time_ns() - 10**9
    with KernelOverlay(lower, dirs["k-upper"], dirs["k-work"], dirs["k-mnt"]) as k, \
            NixfsMount(lower, dirs["n-upper"], dirs["n-mnt"], "allow_other") as n:
        gen = Generator(seed)
        for step in range(steps):
            op = gen.next(str(k.mnt))
            expected = apply(str(k.mnt), op)
            got = apply(str(n.mnt), op)
            shown = tuple(x if not isinstance(x, bytes) else f"<{len(x)} bytes>" for x in op)
            assert got == expected, f"seed {seed} step {step} {shown}: kernel {expected}, nixfs {got}"
            if step % 25 == 24 or step == steps - 1:
                # Directory times are left out: kernel overlayfs touches a parent's
                # mtime even on some failed calls (a rename that fails with ENOTEMPTY).
                problems = diff(snapshot(k.mnt, times_before=start, dir_times=False),
                                snapshot(n.mnt, times_before=start, dir_times=False))
                assert not problems, f"seed {seed} after step {step} {op[:2]}:\n" + "\n".join(problems)
    assert decoy.read_bytes() == b"decoy\n" and os.stat(decoy).st_mode & 0o7777 == 0o644
    assert os.listxattr(decoy) == []


def _add_callers_entries(lower: Path) -> None:
    """What the operations of other callers and long names need in the lower: a
    directory everyone may write (``shared``, 0777) and a sticky one (``tmp``) with
    entries of several owners, and entries with names at NAME_MAX."""
    from conftest import OLD_NS
    shared, tmp = lower / "shared", lower / "tmp"
    for d in (shared, tmp, shared / "sub"):
        d.mkdir()
    for (uid, gid), name in zip([(0, 0)] + OTHER_CALLERS, ["root", "nobody", "other"]):
        for d in (shared, tmp):
            (d / name).write_bytes(name.encode())
            os.chown(d / name, uid, gid)
    (shared / LONG_NAMES[0]).write_bytes(b"long\n")
    # (A file: kernel overlayfs refuses with EXDEV to move a lower directory whose
    # redirect, "/" and its path, would be longer than redirect_max, 256 bytes.)
    (lower / "dir" / LONG_NAMES[1]).write_bytes(b"long\n")
    os.chmod(shared, 0o777)
    os.chmod(tmp, 0o1777)
    for path in (shared, tmp, lower / "dir"):
        for entry in path.rglob("*"):
            os.utime(entry, ns=(OLD_NS, OLD_NS), follow_symlinks=False)
        os.utime(path, ns=(OLD_NS, OLD_NS))
    os.utime(lower, ns=(OLD_NS, OLD_NS))
