"""A fresh upper over a published generation reads listings from the generation's
catalog, a file on the lower: a read of it stuck on the lower (scripts/slowfs stalled,
the stand-in for a hung NFS server) must stall only the request that needs it, like any
other lower call (EIO after ``lower_timeout``), never the daemon's other answers."""

import errno
import os
import sqlite3
import threading
from concurrent.futures import ThreadPoolExecutor

from conftest import needs_root
from harness import NixfsMount, run_nixfs
from relharness import SlowFs, timed
from test_generation_walk import CATALOG, bench_like_store

TIMEOUT = 3.0  # the mount's lower_timeout
RELEASE = 4 * TIMEOUT  # the stall ends by itself after this: a stalled daemon shows, not hangs


def _upper_ops(mnt) -> bytes:
    """Requests that need no lower: a new upper file written, renamed, read; the root's stat."""
    (mnt / "up/new").write_bytes(b"new")
    os.rename(mnt / "up/new", mnt / "up/new2")
    os.stat(mnt)
    return (mnt / "up/new2").read_bytes()


def _generation_calls(slow, since: int) -> set[str]:
    """The generation's files the lower was asked about since call *since* (the follower
    of the lower's database polls it meanwhile)."""
    return {p for _, p in slow.calls()[since:] if p.startswith(os.path.dirname(CATALOG))}


@needs_root
def test_a_catalog_read_stuck_on_the_lower_stalls_no_other_request(tmp_path):
    lower = tmp_path / "L/nix"
    bench_like_store(lower, 120)
    proc = run_nixfs("publish", lower)
    assert proc.returncode == 0, proc.stderr
    db = sqlite3.connect(f"file:{lower}/var/nix/db/db.sqlite?mode=ro", uri=True)
    names = sorted(os.path.basename(p) for (p,) in db.execute("select path from ValidPaths"))
    db.close()
    upper, mnt = tmp_path / "upper", tmp_path / "M/nix"
    upper.mkdir()
    mnt.mkdir(parents=True)
    with SlowFs(lower.parent, tmp_path / "slow", trace=tmp_path / "trace") as slow, \
            NixfsMount(slow.mnt / "nix", upper, mnt, f"lower_timeout={TIMEOUT}"):
        (mnt / "up").mkdir()
        # The store, the lower index and the catalog opened; the index's first page is
        # read, and the catalog's first chunk (a chunk holds about 10 store paths' listings).
        os.stat(mnt / "store" / names[0])
        # (and 16 store paths after it read ahead, so their chunks)
        target = mnt / "store" / names[40] / "lib"  # its index page read, its chunk not
        before = len(slow.calls())
        slow.mode("stall")
        release = threading.Timer(RELEASE, slow.mode, ("normal",))
        release.start()
        try:
            with ThreadPoolExecutor(1) as pool:
                listing = pool.submit(timed, os.listdir, target)
                while CATALOG not in _generation_calls(slow, before):
                    threading.Event().wait(0.05)  # until the listing waits on the catalog
                err, took, got = timed(_upper_ops, mnt)
                stuck = not listing.done()
                print(f"upper requests while a catalog read is stuck: {took:.3f} s")
                assert (err, got) == (0, b"new")
                assert stuck, "the daemon answered nothing while a catalog read was stuck"
                err, took, _ = listing.result()
                print(f"the stuck listing: errno {err} after {took:.2f} s")
                assert err == errno.EIO  # lower_timeout, before the stall ended
        finally:
            release.cancel()
            slow.mode("normal")
        assert sorted(os.listdir(target)) == sorted(os.listdir(lower / "store" / names[40] / "lib"))
