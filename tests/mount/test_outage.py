"""A lower that stalls or fails (scripts/slowfs): EIO after ``lower_timeout``,
nothing else waits, nothing leaks, and the mount recovers when the lower does."""

import errno
import os
import time
from concurrent.futures import ThreadPoolExecutor

from conftest import needs_root
from harness import NixfsMount, exited, run_nixfs, wait_until
from relharness import SlowFs, daemon_pid, fd_count, status, synthetic_store, timed

TIMEOUT = 1.5  # the mount's lower_timeout in these tests
FAST = 0.5  # what an operation that needs no lower may take, even on a busy machine
STALLED = 10  # lookups stuck at once: more than the lower's 8 threads


def _read(path):
    with open(path, "rb") as f:
        return f.read()


def _answered_without_lower(mnt, warm, wfile):
    """Kept store metadata and upper-only files answer at once."""
    for fn, arg, want in ((os.listdir, mnt / "store" / warm / "bin", [warm]),
                          (_read, wfile, warm.encode() * 3),
                          (_upper_ops, mnt, b"old")):
        err, took, got = timed(fn, arg)
        assert (err, got) == (0, want), fn
        print(f"{fn.__name__} during the outage: {took:.3f} s")
        assert took < FAST, f"{fn.__name__} took {took:.2f} s while the lower stalls"


def _upper_ops(mnt):
    """Operations on upper-only files; returns what they read."""
    (mnt / "up/new").write_bytes(b"new")
    os.rename(mnt / "up/new", mnt / "up/new2")
    (mnt / "up/d").mkdir()
    os.unlink(mnt / "up/new2")
    os.rmdir(mnt / "up/d")
    return (mnt / "up/old").read_bytes()


@needs_root
def test_lower_stall_fails_with_eio_and_recovers(tmp_path):
    src = tmp_path / "src"
    names = [n for n in synthetic_store(src / "nix") if not n.endswith(".drv")]
    (src / "nix/data").mkdir()
    (src / "nix/data/file").write_bytes(b"lower data\n")
    for i in range(STALLED):
        (src / f"nix/data/d{i}").mkdir()
        (src / f"nix/data/d{i}/f").write_bytes(b"f\n")
    # nixfs reads store paths ahead in name order: the cold ones come before the warm one.
    names = sorted(names)
    warm, cold = names[-1], names[:5]
    slow, upper, mnt = tmp_path / "slow", tmp_path / "upper", tmp_path / "M/nix"
    upper.mkdir()
    mnt.mkdir(parents=True)
    with SlowFs(src, slow) as lower, \
            NixfsMount(slow / "nix", upper, mnt, f"lower_timeout={TIMEOUT}"):
        assert status(mnt)["lower_timeout_s"] == TIMEOUT
        wfile = mnt / "store" / warm / "bin" / warm
        assert _read(wfile) == warm.encode() * 3  # its listing is now kept by nixfs
        assert os.stat(mnt / "data/file").st_size == 11
        for i in range(STALLED):
            os.stat(mnt / f"data/d{i}")  # known directories; what they hold is not
        held = os.open(mnt / "data/file", os.O_RDONLY)  # a lower handle, for a copy-up
        try:
            _outage(mnt, upper, lower, names, warm, cold, wfile, held)
        finally:
            os.close(held)


def _outage(mnt, upper, lower, names, warm, cold, wfile, held):
    if True:
        (mnt / "up").mkdir()
        (mnt / "up/old").write_bytes(b"old")
        pid = daemon_pid(mnt)
        fds_before = fd_count(pid)

        lower.mode("stall")
        try:
            # Lookups that need the lower, each in its own directory (the kernel queues
            # lookups in one directory behind each other: see docs/reliability.md).
            stalled = [mnt / f"data/d{i}/f" for i in range(STALLED)]
            with ThreadPoolExecutor(len(stalled)) as pool:
                waiting = [pool.submit(timed, os.stat, p) for p in stalled]
                time.sleep(0.2)
                _answered_without_lower(mnt, warm, wfile)  # meanwhile
                assert not any(f.done() for f in waiting)
                results = [f.result() for f in waiting]
            print("stalled lookups (errno, s):", [(e, round(t, 2)) for e, t, _ in results])
            for err, took, _ in results:
                assert err == errno.EIO
                # (a revalidation of data/dN, if the kernel's 1 s ttl ran out, may wait
                # for the lower once before nixfs knows it is out)
                assert TIMEOUT - 0.1 < took < 2 * TIMEOUT + 1.0, took
            # Long after the kernel's ttl: what nixfs keeps still answers at once, and a
            # directory it knows answers with what the lower last said of it.
            _answered_without_lower(mnt, warm, wfile)
            err, took, _ = timed(os.stat, mnt / "data/d0")
            assert err == 0 and took < FAST, (err, took)
            err, took, _ = timed(os.listdir, mnt / "store" / cold[0])  # never looked at
            assert err == errno.EIO and took < TIMEOUT + 1.0
            # A copy-up that cannot read the lower: EIO, nothing shown in the upper.
            err, took, _ = timed(os.fchmod, held, 0o600)
            assert err == errno.EIO and took < TIMEOUT + 2.0
            # An error from the lower (rather than silence) is passed on at once.
            lower.mode("eio")
            err, took, _ = timed(os.stat, mnt / "store" / names[5])  # never looked at
            print(f"lookup with an eio lower: {took:.3f} s")
            assert err == errno.EIO and took < FAST + 0.5
            # Following the lower store fails meanwhile, and status says so (a round's
            # poll that was waiting on the stalled lower, or the next one, at most 0.5 s on).
            wait_until(lambda: status(mnt)["nix"]["sync_errors"] > 0,
                       "a failed sync round while the lower answers EIO", timeout=10)
        finally:
            lower.mode("normal")

        # Back: the calls given up on finish now; what they opened is closed, the copy
        # they built is removed, and every path works again.
        deadline = time.monotonic() + 5
        while (fd_count(pid) > fds_before or os.listdir(upper / ".nixfs/work")) \
                and time.monotonic() < deadline:
            time.sleep(0.1)
        assert fd_count(pid) <= fds_before, "descriptors of abandoned lower calls leaked"
        assert os.listdir(upper / ".nixfs/work") == []
        assert not (upper / "data/file").exists()
        for n in cold:
            assert _read(mnt / "store" / n / "bin" / n) == n.encode() * 3
        for p in stalled:
            assert p.read_bytes() == b"f\n"
        assert os.read(held, 100) == b"lower data\n"
        os.fchmod(held, 0o600)
        with open(mnt / "data/file", "ab") as f:
            f.write(b"more\n")
        assert (upper / "data/file").read_bytes() == b"lower data\nmore\n"
        s = status(mnt)
        assert s["lower_calls"]["timeout"] >= len(stalled) + 2
        assert s["stale_answers"] > 0
        # Following the lower store failed meanwhile (status said so) and goes on now.
        assert s["nix"]["sync_errors"] > 0
        run_nixfs("sync", mnt, check=True, timeout=60)
        assert status(mnt)["nix"]["last_sync_age_s"] < 2
        assert s["errors"] == 0


def test_lower_timeout_option_is_checked(tmp_path):
    for d in ("l", "u", "m"):
        (tmp_path / d).mkdir()
    for bad in ("abc", "-1", "nan"):
        proc = run_nixfs("mount", "--lower", tmp_path / "l", "--upper", tmp_path / "u", "-o",
                         f"lower_timeout={bad}", tmp_path / "m")
        assert proc.returncode == 2
        assert "lower_timeout must be a number of seconds" in proc.stderr, proc.stderr


@needs_root
def test_unmount_while_the_lower_stalls(tmp_path):
    """An unmount does not wait for the store database worker stuck on a lower that
    does not answer.  (A daemon thread stuck in a request a FUSE lower already took
    cannot be interrupted, so the daemon's own calls are not stalled here: see
    docs/reliability.md.)"""
    src = tmp_path / "src"
    names = [n for n in synthetic_store(src / "nix") if not n.endswith(".drv")]
    slow, upper, mnt = tmp_path / "slow", tmp_path / "upper", tmp_path / "M/nix"
    upper.mkdir()
    mnt.mkdir(parents=True)
    with SlowFs(src, slow) as lower:
        m = NixfsMount(slow / "nix", upper, mnt, f"lower_timeout={TIMEOUT}").start()
        try:
            (mnt / "mine").write_bytes(b"upper data\n")
            pid = daemon_pid(mnt)
            lower.mode("stall")
            time.sleep(1.0)  # the store database worker polls the lower: now it is stuck
            assert (mnt / "mine").read_bytes() == b"upper data\n"
            start = time.monotonic()
            proc = run_nixfs("umount", mnt, timeout=120)
            took = time.monotonic() - start
            assert proc.returncode == 0, proc.stderr
            assert not os.path.ismount(mnt) and exited(pid)
            print(f"umount while the lower stalls: {took:.1f} s")
            assert took < 45, took  # pausing the worker, asking it to quit, killing it
        finally:
            lower.mode("normal")
            m.stop()
    assert (upper / "mine").read_bytes() == b"upper data\n"


@needs_root
def test_a_store_listing_longer_than_the_timeout_is_not_an_outage(tmp_path):
    """The store's listing stats its names a chunk at a time as the kernel reads them:
    a store whose every lstat together takes longer than ``lower_timeout`` (a million
    paths on a loaded machine, a big store on NFS) lists whole, instead of failing
    with EIO (which Nix 2.8's collector takes for the end of the store, silently)."""
    src = tmp_path / "src"
    names = synthetic_store(src / "nix", count=3000)
    slow, upper, mnt = tmp_path / "slow", tmp_path / "upper", tmp_path / "M/nix"
    upper.mkdir()
    mnt.mkdir(parents=True)
    with SlowFs(src, slow, latency_ms=1.5), NixfsMount(slow / "nix", upper, mnt, "lower_timeout=3"):
        listed = {e.name: e.is_dir(follow_symlinks=False) for e in os.scandir(mnt / "store")}
        assert set(names) <= set(listed), "entries missing from the store's listing"
        assert all(listed[n] for n in names if not n.endswith(".drv"))
        assert status(mnt)["lower_calls"].get("timeout", 0) == 0
