"""A generation's ``listings.sqlite``: what a first mount would learn of every lower path.

The same listings a mount keeps in ``UPPER/.nixfs/listings.sqlite`` (one per
directory, ``.`` the directory itself, symlink targets; a non-directory store
path a listing of just ``.``), read as the mount's code reads them (``catalogread``: the same records in fewer
calls, all of a path's directories in one go), encoded by the same code
(``ListingStore``) under the same keys (``storepolicy.listing_key``), with the
xattrs a mount keeps beside them: each directory's entries' (``put_xattrs``) and
each store path's own (its key plus ``\\0self``, as ``Listings.lower_xattrs``).
A client's walk of a path in the generation then asks the lower nothing.

A whole catalog is written by several processes at once (one a CPU), each a range
of names into a file of its own, appended in name order to the first one after (a walk of
a million paths is a million directory reads, mostly the interpreter's time), each with
reader threads a window ahead of its writer (a store not in the page cache is a disk
read a directory, which only overlap when several are asked at once).
The walk reads the store through descriptors, never following a symlink; a path
that vanished meanwhile (a GC on the store) is left out and counted: the client
learns it from the lower, as today.
"""

import collections
import itertools
import json
import logging
import os
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import apsw

from .. import libc
from ..nixdb.storepolicy import listing_key
from ..overlay.liststore import ListingStore
from ..overlay.layers import Layer
from . import catalogread

log = logging.getLogger(__name__)

READERS = 8   # reader threads of a catalog process (disk reads in flight)
BATCH = 64    # paths a reader reads in one go


class Catalog:
    """Writing listings of store paths into a ListingStore file (new or a copy)."""

    def __init__(self, store_root: str, path: str, *, cow: bool = False):
        """*cow*: the file at *path* is a COW file over another generation's."""
        self.layer = Layer(store_root, name="lower")
        self.store_fd = self.layer.open_dir_path(b"store")
        self.listings = ListingStore(path, cow_root=store_root if cow else None)
        # A file nobody reads yet: no journal (a publish that dies leaves it unused).
        self.listings.conn.execute("pragma journal_mode=off").fetchall()
        self.paths = self.directories = self.skipped = 0

    def close(self) -> None:
        self.listings.close()
        os.close(self.store_fd)
        self.layer.close()

    def read(self, name: bytes):
        """The records of the store path *name* (``catalogread.read_path``), or None if
        it is gone or unreadable (logged and counted: the client learns it from the lower).
        Safe to call from several threads at once."""
        try:
            return catalogread.read_path(self.layer, self.store_fd, name)
        except OSError as e:
            log.warning("store path %s left out of the catalog: %s", os.fsdecode(name), e)
            return None

    def put(self, name: bytes, lower_id: int, records) -> None:
        """Store what ``read`` returned for *name* under its keys at *lower_id*."""
        if records is None:
            self.skipped += 1
            return
        found, own, xmaps = records
        for rel, listing in found.items():
            key = listing_key(name, lower_id, rel)
            self.listings.put(key, listing)
            if rel in xmaps:  # an empty listing's entries' xattrs are never asked
                self.listings.put_xattrs(key, xmaps[rel])
        self.listings.put_xattrs(listing_key(name, lower_id, b"") + b"\0self", {b".": own})
        self.paths += 1
        self.directories += len(found)

    def add(self, name: bytes, lower_id: int) -> bool:
        """Every listing and xattr map of the store path *name*; False if it is gone."""
        records = self.read(name)
        self.put(name, lower_id, records)
        return records is not None

    def remove(self, name: bytes, lower_id: int) -> None:
        """Drop every record of the store path *name* at *lower_id* (it left the lower)."""
        self.listings.drop_prefix(listing_key(name, lower_id, b""))

    def stats(self) -> dict:
        return {"paths": self.paths, "directories": self.directories, "skipped": self.skipped}


def write(store: str, index_path: str, dest: str, *, workers: int | None = None) -> dict:
    """The catalog of every path the index at *index_path* shows, at *dest*; its counts."""
    workers = workers or max(2, os.cpu_count() or 1)
    bounds = _bounds(index_path, workers)
    parts = [dest] + [f"{dest}.part{i}" for i in range(1, len(bounds))]
    if len(bounds) == 1:
        results = [_write_range(store, index_path, dest, *bounds[0])]
    else:  # this process has the database to finish meanwhile (whole.py)
        procs = [_start_range(store, index_path, part, lo, hi)
                 for part, (lo, hi) in zip(parts, bounds)]
        outcomes = [proc.communicate()[0] for proc in procs]  # every one, failed or not
        failed = [proc.returncode for proc in procs if proc.returncode != 0]
        if failed:
            raise OSError(f"catalog workers failed (exit {', '.join(map(str, failed))})")
        results = [json.loads(out) for out in outcomes]
    _append(dest, parts[1:])
    return {key: sum(r[key] for r in results) for key in results[0]}


def _bounds(index_path: str, workers: int) -> list[tuple]:
    """Name ranges [lo, hi) of about equal size (None: open-ended)."""
    conn = apsw.Connection(index_path, flags=apsw.SQLITE_OPEN_READONLY)
    try:
        count = conn.execute("select count(*) from paths").fetchone()[0]
        parts = max(1, min(workers, count // 10_000))
        cuts = [conn.execute("select name from paths order by name limit 1 offset ?",
                             (count * i // parts,)).fetchone()[0] for i in range(1, parts)]
    finally:
        conn.close()
    edges = [None] + cuts + [None]
    return list(zip(edges[:-1], edges[1:]))


def _start_range(store: str, index_path: str, part: str, lo, hi) -> subprocess.Popen:
    """Another process writing the range [lo, hi) into *part* (a plain interpreter
    running this module: nothing of this process, its threads or locks, is copied)."""
    package_parent = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [package_parent] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    args = json.dumps([os.getpid(), store, index_path, part, _hex(lo), _hex(hi)])
    return subprocess.Popen([sys.executable, "-m", __name__, args], env=env,
                            stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)


def _hex(name: bytes | None):
    return None if name is None else name.hex()


def _worker_main(argv: list[str]) -> int:
    parent, store, index_path, part, lo, hi = json.loads(argv[0])
    libc.set_parent_death_signal(signal.SIGKILL)  # a killed publish takes its workers along
    if os.getppid() != parent:
        return 1
    stats = _write_range(store, index_path, part, *(None if x is None else bytes.fromhex(x)
                                                    for x in (lo, hi)))
    sys.stdout.write(json.dumps(stats))
    return 0


def _write_range(store: str, index_path: str, part: str, lo, hi) -> dict:
    """One process's share: the paths with names in [lo, hi).  Reader threads read
    batches of paths ahead of the one thread that stores them: a store that is not in
    the page cache costs a disk read a directory, and several in flight overlap."""
    conn = apsw.Connection(index_path, flags=apsw.SQLITE_OPEN_READONLY)
    catalog = Catalog(store, part)
    try:
        rows = conn.execute(
            "select name, lower_id from paths where state = 0 and name >= coalesce(?, x'') "
            "and (? is null or name < ?) order by name", (lo, hi, hi))
        with ThreadPoolExecutor(READERS) as pool:
            for batch, records in _read_ahead(pool, catalog, rows):
                for (name, lower_id), found in zip(batch, records):
                    catalog.put(name, lower_id, found)
    finally:
        catalog.close()
        conn.close()
    return catalog.stats()


def _read_ahead(pool: ThreadPoolExecutor, catalog: Catalog, rows):
    """``(batch, its records)`` in the order of *rows*, read by *pool* a window ahead."""
    pending = collections.deque()

    def read(batch):
        return [catalog.read(name) for name, _ in batch]

    while True:
        batch = list(itertools.islice(rows, BATCH))
        if batch:
            pending.append((batch, pool.submit(read, batch)))
        if pending and (not batch or len(pending) >= 2 * READERS):
            done, future = pending.popleft()
            yield done, future.result()
        if not batch and not pending:
            return


def _append(dest: str, parts: list[str]) -> None:
    """Append the part files (later names, in order) to *dest*, and remove them."""
    if not parts:
        return
    conn = apsw.Connection(dest)
    try:
        for pragma in ("journal_mode=off", "synchronous=off"):
            conn.execute(f"pragma {pragma}").fetchall()
        for part in parts:
            conn.execute("attach ? as part", (part,))
            with conn:
                conn.execute("insert into main.listings select key, data from part.listings "
                             "order by key")
            conn.execute("detach part")
    finally:
        conn.close()
    for part in parts:
        for suffix in ("", "-wal", "-shm", "-journal"):
            if os.path.exists(part + suffix):
                os.unlink(part + suffix)


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1:]))
