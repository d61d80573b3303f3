"""A fresh upper over a published generation reads listings from the generation's
catalog and which store paths there are from its lower index, files on the lower: a
read of either stuck on the lower (scripts/slowfs stalled, the stand-in for a hung NFS
server) must stall only the request that needs it, like any other lower call (EIO
after ``lower_timeout``), never the daemon's other answers."""

import errno
import os
import sqlite3
import threading
from concurrent.futures import ThreadPoolExecutor

from conftest import needs_root
from harness import NixfsMount, run_nixfs
from relharness import SlowFs, timed
from nixstore import generate_db
from test_generation_walk import CATALOG, bench_like_store, published

INDEX = CATALOG.replace("listings.sqlite", "lower-index.sqlite")
TIMEOUT = 3.0  # the mount's lower_timeout
RELEASE = 4 * TIMEOUT  # the stall ends by itself after this: a stalled daemon shows, not hangs


def _upper_ops(mnt) -> bytes:
    """Requests that need no lower: a new upper file written, renamed, read; the root's stat."""
    (mnt / "up/new").write_bytes(b"new")
    os.rename(mnt / "up/new", mnt / "up/new2")
    os.stat(mnt)
    return (mnt / "up/new2").read_bytes()


def _stuck_while(slow, mnt, wanted: str, request, *args) -> float:
    """Stall the lower, start *request* in a thread, wait until it waits on the lower
    file *wanted*, then check that upper requests are answered meanwhile and that
    *request* fails with EIO after the timeout, before the stall ends.  Returns how
    long the upper requests took."""
    before = len(slow.calls())
    slow.mode("stall")
    release = threading.Timer(RELEASE, slow.mode, ("normal",))
    release.start()
    try:
        with ThreadPoolExecutor(1) as pool:
            stuck_one = pool.submit(timed, request, *args)
            waited = 0.0
            while wanted not in _generation_calls(slow, before):
                assert waited < TIMEOUT and not stuck_one.done(), f"{wanted} was not read"
                threading.Event().wait(0.05)  # until it waits on that file
                waited += 0.05
            err, took, got = timed(_upper_ops, mnt)
            stuck = not stuck_one.done()
            assert (err, got) == (0, b"new")
            assert stuck, f"the daemon answered nothing while a read of {wanted} was stuck"
            err, took_stuck, _ = stuck_one.result()
            print(f"the stuck request: errno {err} after {took_stuck:.2f} s")
            assert err == errno.EIO  # lower_timeout, before the stall ended
            return took
    finally:
        release.cancel()
        slow.mode("normal")


def _generation_calls(slow, since: int) -> set[str]:
    """The generation's files the lower was asked about since call *since* (the follower
    of the lower's database polls it meanwhile)."""
    return {p for _, p in slow.calls()[since:] if p.startswith(os.path.dirname(CATALOG))}


@needs_root
def test_a_catalog_read_stuck_on_the_lower_stalls_no_other_request(tmp_path):
    lower = tmp_path / "L/nix"
    bench_like_store(lower, 120)
    upper, mnt = published(tmp_path, lower)
    db = sqlite3.connect(f"file:{lower}/var/nix/db/db.sqlite?mode=ro", uri=True)
    names = sorted(os.path.basename(p) for (p,) in db.execute("select path from ValidPaths"))
    db.close()
    with SlowFs(lower.parent, tmp_path / "slow", trace=tmp_path / "trace") as slow, \
            NixfsMount(slow.mnt / "nix", upper, mnt, f"lower_timeout={TIMEOUT}"):
        (mnt / "up").mkdir()
        # The store, the lower index and the catalog opened; the index's first page is
        # read, and the catalog's first chunk (a chunk holds about 10 store paths' listings).
        os.stat(mnt / "store" / names[0])
        # (and the 64 store paths after it read ahead, so their chunks: Listings'
        # catalog_ahead_paths)
        far = names[100]
        target = mnt / "store" / far / "lib"  # its index page read, its chunk not
        took = _stuck_while(slow, mnt, CATALOG, os.listdir, target)
        print(f"upper requests while a catalog read is stuck: {took:.3f} s")
        assert sorted(os.listdir(target)) == sorted(os.listdir(lower / "store" / far / "lib"))


@needs_root
def test_an_index_read_stuck_on_the_lower_stalls_no_other_request(tmp_path):
    """The store paths a lookup may show come from the generation's lower index (a
    copy-on-write file over it): a page of it not read yet, stuck on the lower, fails
    that lookup with EIO after the timeout; upper requests are answered meanwhile."""
    lower = tmp_path / "L/nix"
    # Enough paths that the index spans many pages: the last path's is not read by
    # mounting, nor read ahead by the kernel with the first ones.
    paths = generate_db(lower / "var/nix/db/db.sqlite", 30_000, refs=1, store_dirs=lower / "store")
    upper, mnt = published(tmp_path, lower)
    names = sorted(os.path.basename(p) for p in paths)
    with SlowFs(lower.parent, tmp_path / "slow", trace=tmp_path / "trace") as slow, \
            NixfsMount(slow.mnt / "nix", upper, mnt, f"lower_timeout={TIMEOUT}"):
        (mnt / "up").mkdir()
        os.stat(mnt / "store" / names[0])  # the index opened, its first pages read
        took = _stuck_while(slow, mnt, INDEX, os.stat, mnt / "store" / names[-1])
        print(f"upper requests while an index read is stuck: {took:.3f} s")
        assert os.stat(mnt / "store" / names[-1]).st_ino  # shown once the lower answers
