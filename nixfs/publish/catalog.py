"""A generation's ``listings.sqlite``: what a first mount would learn of every lower path.

The same listings a mount keeps in ``UPPER/.nixfs/listings.sqlite`` (one per
directory, ``.`` the directory itself, symlink targets; a non-directory store
path a listing of just ``.``), read by the same code (``Layer.read_listing``,
all of a path's directories in one go), encoded by the same code
(``ListingStore``) under the same keys (``storepolicy.listing_key``), with the
xattrs a mount keeps beside them: each directory's entries' (``put_xattrs``) and
each store path's own (its key plus ``\\0self``, as ``Listings.lower_xattrs``).
A client's walk of a path in the generation then asks the lower nothing.

A whole catalog is written by several processes at once (one a CPU), each a range
of names into a file of its own, appended in name order to the first one after (a walk of
a million paths is a million directory reads, mostly the interpreter's time).
The walk reads the store through descriptors, never following a symlink; a path
that vanished meanwhile (a GC on the store) is left out and counted: the client
learns it from the lower, as today.
"""

import json
import logging
import os
import signal
import subprocess
import sys

import apsw

from .. import libc
from ..nixdb.storepolicy import listing_key
from ..overlay.dircache import ListingStore
from ..overlay.layers import Layer

log = logging.getLogger(__name__)

ALL = 1 << 62  # read_listing's budget: every directory of a path


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

    def add(self, name: bytes, lower_id: int) -> bool:
        """Every listing and xattr map of the store path *name*; False if it is gone."""
        try:
            found, _ = self.layer.read_listing(self.store_fd, name, False, ALL)
            own = self.layer.read_xattrs(self.store_fd, name)
            xmaps = {rel: self._entry_xattrs(name, rel, listing)
                     for rel, listing in found.items()}
        except OSError as e:
            self.skipped += 1
            log.warning("store path %s left out of the catalog: %s", os.fsdecode(name), e)
            return False
        for rel, listing in found.items():
            key = listing_key(name, lower_id, rel)
            self.listings.put(key, listing)
            if len(listing.entries) > 1:  # an empty one's entries' xattrs are never asked
                self.listings.put_xattrs(key, xmaps[rel])
        self.listings.put_xattrs(listing_key(name, lower_id, b"") + b"\0self", {b".": own})
        self.paths += 1
        self.directories += len(found)
        return True

    def _entry_xattrs(self, name: bytes, rel: bytes, listing) -> dict:
        """The xattrs of a directory's entries, as ``read_dir_xattrs`` reads them."""
        names = [n for n in listing.entries if n != b"."]
        if not names:  # an empty directory, or a store path that is no directory
            return {}
        fd = self.layer.open_dir_path(b"store/" + name + (b"/" + rel if rel else b""))
        try:
            return self.layer.read_dir_xattrs(fd, names)
        finally:
            os.close(fd)

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
    """One process's share: the paths with names in [lo, hi)."""
    conn = apsw.Connection(index_path, flags=apsw.SQLITE_OPEN_READONLY)
    catalog = Catalog(store, part)
    try:
        for name, lower_id in conn.execute(
                "select name, lower_id from paths where state = 0 and name >= coalesce(?, x'') "
                "and (? is null or name < ?) order by name", (lo, hi, hi)):
            catalog.add(name, lower_id)
    finally:
        catalog.close()
        conn.close()
    return catalog.stats()


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
