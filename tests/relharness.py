"""What the reliability tests need besides a nixfs mount: a lower that can fail on
demand (scripts/slowfs), a small upper file system that fills up (tmpfs), and a
look at the daemon's descriptors and memory.

Every mount made here is unmounted when its ``with`` block ends, also when the
test fails.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from harness import REPO, NixfsMount, force_unmount, run_nixfs


class TolerantMount(NixfsMount):
    """A mount whose daemon is expected to log errors: the test checks them itself."""

    def __exit__(self, exc_type, exc, tb):
        try:
            self.stop()
        finally:
            force_unmount(self.mnt)


class SlowFs:
    """``scripts/slowfs SOURCE MNT`` as a context manager; ``mode()`` switches it to
    ``stall`` (every request waits: an outage), ``eio`` or back to ``normal``."""

    def __init__(self, source, mnt, latency_ms: float = 0.0, trace=None):
        """*trace*: a file slowfs writes each call's type and path to (``calls()``)."""
        self.source, self.mnt = Path(source), Path(mnt)
        self.control = self.mnt.parent / f"{self.mnt.name}.control"
        self.latency_ms = latency_ms
        self.trace = Path(trace) if trace else None
        self.proc = None

    def __enter__(self):
        self.mnt.mkdir(exist_ok=True)
        self.control.write_text("normal\n")
        self.proc = subprocess.Popen(
            [sys.executable, str(REPO / "scripts/slowfs"), str(self.source), str(self.mnt),
             "--latency", str(self.latency_ms), "--control", str(self.control)]
            + (["--trace", str(self.trace)] if self.trace else []),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not os.path.ismount(self.mnt):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.__exit__(None, None, None)
                raise RuntimeError("slowfs did not mount")
            time.sleep(0.05)
        return self

    def calls(self) -> list[tuple[str, str]]:
        """(type, path below the source) of every call since it started (needs *trace*)."""
        return [tuple(line.split("\t", 1)) for line in self.trace.read_text().splitlines()]

    def mode(self, mode: str) -> None:
        """Switch mode; slowfs reads its control file every 50 ms."""
        self.control.write_text(mode + "\n")
        time.sleep(0.2)

    def __exit__(self, *exc):
        try:
            self.control.write_text("normal\n")  # stalled requests finish first
            time.sleep(0.1)
            subprocess.run(["fusermount3", "-u", str(self.mnt)], capture_output=True)
            force_unmount(self.mnt)
            if self.proc is not None:
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
        finally:
            force_unmount(self.mnt)


class Tmpfs:
    """A small tmpfs at *path* (an upper that fills up)."""

    def __init__(self, path, size: str = "4m", nr_inodes: int | None = None):
        self.path, self.size, self.nr_inodes = Path(path), size, nr_inodes

    def __enter__(self):
        self.path.mkdir(exist_ok=True)
        opts = f"size={self.size}" + (f",nr_inodes={self.nr_inodes}" if self.nr_inodes else "")
        subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "nixfs-test", str(self.path)],
                       check=True, capture_output=True)
        return self

    def __exit__(self, *exc):
        subprocess.run(["umount", str(self.path)], capture_output=True)
        force_unmount(self.path)


def daemon_pid(mnt) -> int:
    sys.path.insert(0, str(REPO))
    from nixfs import runtime
    return runtime.read_record(str(mnt))["pid"]


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def status(mnt) -> dict:
    proc = run_nixfs("status", "--json", mnt, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def errno_of(fn, *args, **kw) -> int:
    """The errno *fn* fails with, 0 if it succeeds."""
    try:
        fn(*args, **kw)
    except OSError as e:
        return e.errno
    return 0


def timed(fn, *args):
    """``(errno or 0, seconds, result)`` of calling *fn*."""
    start = time.monotonic()
    try:
        result = fn(*args)
    except OSError as e:
        return e.errno, time.monotonic() - start, None
    return 0, time.monotonic() - start, result


def synthetic_store(nix_dir: Path, count: int = 12) -> list[str]:
    """A Nix state directory (``store/``, ``var/nix/db``) with *count* valid paths
    whose directories each hold ``bin/NAME``; returns the store path names."""
    from nixstore import generate_db
    paths = generate_db(nix_dir / "var/nix/db/db.sqlite", count, refs=1,
                        store_dirs=nix_dir / "store")
    names = [os.path.basename(p) for p in paths]
    for name in names:
        (nix_dir / "store" / name / "bin").mkdir(parents=True, exist_ok=True)
        (nix_dir / "store" / name / "bin" / name).write_bytes(name.encode() * 3)
    return names
