"""Mounting the real thing in tests and scripts, and comparing trees.

Every mount made here is unmounted when its ``with`` block ends, also when the
test fails: first politely (``nixfs umount``), then by force.
"""

import errno
import hashlib
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
NIXFS = [sys.executable, "-m", "nixfs"]


def run_nixfs(*args, check=False, env=None, user=None, **kw) -> subprocess.CompletedProcess:
    cmd = NIXFS + [str(a) for a in args]
    full_env = dict(os.environ, PYTHONPATH=str(REPO))
    full_env.update(env or {})
    return subprocess.run(cmd, capture_output=True, text=True, check=check, env=full_env, **kw)


def _top_mount(path) -> str | None:
    """The file system type of what is mounted last at *path*, or None."""
    target = os.path.realpath(os.path.dirname(os.path.abspath(path)))
    target = os.path.join(target, os.path.basename(os.path.abspath(path)))
    found = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            if line.split()[4] == target:
                found = line.split(" - ")[1].split()[0]
    return found


def _mounted(path) -> bool:
    return _top_mount(path) is not None


def _nixfs_mounted(path) -> bool:
    """A nixfs is on top at *path* (a test may mount one over another file system)."""
    return _top_mount(path) == "fuse.nixfs"


def force_unmount(path) -> None:
    """Get rid of a mount by any means (a test's last resort)."""
    for cmd in (["fusermount3", "-u", "-z", str(path)], ["umount", "-l", str(path)]):
        if not _mounted(path):
            return
        subprocess.run(cmd, capture_output=True)


class NixfsMount:
    """``nixfs mount`` of *lower* and *upper* at *mnt*, as a context manager."""

    def __init__(self, lower, upper, mnt, *options, log=None, extra_args=()):
        self.lower, self.upper, self.mnt = Path(lower), Path(upper), Path(mnt)
        self.options = list(options)
        self.log = Path(log) if log else self.mnt.parent / f"{self.mnt.name}.log"
        self.extra_args = list(extra_args)

    def start(self) -> "NixfsMount":
        args = ["mount", "--lower", self.lower, "--upper", self.upper, "--log", self.log]
        for opt in self.options:
            args += ["-o", opt]
        proc = run_nixfs(*args, *self.extra_args, self.mnt)
        if proc.returncode != 0:
            raise RuntimeError(f"nixfs mount failed ({proc.returncode}): {proc.stderr}")
        assert os.path.ismount(self.mnt), "nixfs mount returned before the mount was live"
        self.output = proc.stdout  # what nixfs mount printed
        return self

    def stop(self) -> None:
        if not _nixfs_mounted(self.mnt):
            return
        proc = run_nixfs("umount", self.mnt, timeout=120)
        if proc.returncode != 0 or _nixfs_mounted(self.mnt):
            self.force_unmount()
            raise RuntimeError(f"nixfs umount failed: {proc.stderr}")

    def log_text(self) -> str:
        try:
            return self.log.read_text()
        except OSError:
            return ""

    def __enter__(self):
        return self.start()

    def force_unmount(self) -> None:
        """Lazily unmount the nixfs on top at the mountpoint, never what is below it."""
        for cmd in (["fusermount3", "-u", "-z", str(self.mnt)], ["umount", "-l", str(self.mnt)]):
            if _nixfs_mounted(self.mnt):
                subprocess.run(cmd, capture_output=True)

    def __exit__(self, exc_type, exc, tb):
        try:
            self.stop()
        finally:
            self.force_unmount()
        errors = [line for line in self.log_text().splitlines() if " ERROR " in line]
        if exc_type is None and errors:
            raise AssertionError("the daemon logged errors:\n" + "\n".join(errors))


class KernelOverlay:
    """Kernel overlayfs with redirect_dir=on (so lower directories can be renamed)."""

    def __init__(self, lower, upper, work, mnt):
        self.lower, self.upper, self.work, self.mnt = map(Path, (lower, upper, work, mnt))

    def __enter__(self):
        opts = (f"lowerdir={self.lower},upperdir={self.upper},workdir={self.work},"
                "redirect_dir=on,index=off,metacopy=off")
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, str(self.mnt)],
                       check=True, capture_output=True)
        return self

    def __exit__(self, *exc):
        subprocess.run(["umount", str(self.mnt)], capture_output=True)
        force_unmount(self.mnt)


def snapshot(root, *, times_before: int | None = None, xattrs: bool = True,
             dir_times: bool = True) -> dict:
    """Everything observable of a tree, without following symlinks.

    Times are kept only where older than *times_before* (ns): those must have
    been preserved; newer ones differ between runs by nature.  *dir_times*
    False leaves directories' times out.
    """
    root = os.fsencode(root)
    out = {}

    def visit(path: bytes, rel: bytes):
        st = os.lstat(path)
        kind = stat.S_IFMT(st.st_mode)
        item = {"type": kind, "mode": stat.S_IMODE(st.st_mode), "nlink": st.st_nlink,
                "uid": st.st_uid, "gid": st.st_gid}
        if times_before is not None and (kind != stat.S_IFDIR or dir_times):
            item["mtime"] = st.st_mtime_ns if st.st_mtime_ns < times_before else "new"
        if kind == stat.S_IFREG:
            item["size"] = st.st_size
            with open(path, "rb") as f:
                item["sha"] = hashlib.sha256(f.read()).hexdigest()[:16]
        elif kind == stat.S_IFLNK:
            item["target"] = os.readlink(path)
        elif kind in (stat.S_IFCHR, stat.S_IFBLK):
            item["rdev"] = st.st_rdev
        if xattrs and kind != stat.S_IFLNK:
            try:
                item["xattrs"] = sorted((n, os.getxattr(path, n, follow_symlinks=False))
                                        for n in os.listxattr(path, follow_symlinks=False)
                                        if n.startswith("user."))
            except OSError as e:
                item["xattrs"] = errno.errorcode.get(e.errno)
        out[rel or b"."] = item
        if kind == stat.S_IFDIR:
            for name in sorted(os.listdir(path)):
                visit(path + b"/" + name, rel + b"/" + name if rel else name)

    visit(root, b"")
    return out


def diff(a: dict, b: dict) -> list[str]:
    lines = []
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            lines.append(f"{key!r}: {a.get(key)} != {b.get(key)}")
    return lines


def kill_daemon(mnt) -> None:
    """SIGKILL the daemon serving *mnt* (crash tests)."""
    sys.path.insert(0, str(REPO))
    from nixfs import runtime
    info = runtime.read_record(str(mnt))
    if info:
        os.kill(info["pid"], signal.SIGKILL)
        while os.path.exists(f"/proc/{info['pid']}"):
            time.sleep(0.01)


def as_caller(cwd, uid: int, gid: int, fn, *, umask: int = 0):
    """``fn()`` in a child process with working directory *cwd* and effective ids
    *uid*/*gid* (supplementary groups: *gid* alone), as pjdfstest calls: only the
    effective ids are switched, after ``chdir`` (so paths relative to *cwd* need no
    search permission above it).  Returns ``("ok", value)`` or ``("err", ERRNO)``;
    *value* must be picklable.  The caller's *umask* is 0 unless said otherwise."""
    import pickle
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into the test
        code = 0
        try:
            os.close(rfd)
            os.chdir(cwd)
            os.setgroups([gid])
            os.setegid(gid)
            os.seteuid(uid)
            os.umask(umask)
            try:
                result = ("ok", fn())
            except OSError as e:
                result = ("err", errno.errorcode.get(e.errno, e.errno))
            os.write(wfd, pickle.dumps(result))
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    os.close(wfd)
    with os.fdopen(rfd, "rb") as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    if status != 0 or not data:
        raise RuntimeError(f"the call as uid {uid} failed in its child (status {status})")
    return pickle.loads(data)


def wait_until(cond, what: str, timeout: float = 2.0) -> float:
    """Poll *cond* for up to *timeout* seconds (an issue's bound), failing if it is not met;
    returns how long it took."""
    start = time.monotonic()
    while not cond():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.05)
    return time.monotonic() - start


def exited(pid: int) -> bool:
    """Gone, or a zombie nobody reaped yet."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True
