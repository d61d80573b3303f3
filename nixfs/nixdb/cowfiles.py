"""The upper's database files as copy-on-write files over a generation's: made, synced,
moved into place and removed with their maps.

A merged database, lower index or listings file built over a published generation
(``fromgeneration``) is a delta with a map beside it (nixfs/cow/); whatever moves or
removes such a file must move or remove both, in an order a crash cannot turn into a
delta read with the wrong map.  SQLite's own files beside it (``-wal``, ``-shm``,
``-journal``) are plain files and go with it.
"""

import os

from ..cow import cowmap
from ..cow.bases import base_opener
from ..cow.cowfile import CowFile
from ..publish.generations import Generations

SQLITE_SIDE_FILES = ("-wal", "-shm", "-journal")


def map_path(path: str) -> str:
    return cowmap.map_path(path)


def is_cow(path: str) -> bool:
    """Whether *path* is a COW delta (it has a map beside it)."""
    return os.path.lexists(map_path(path))


def create_over(lower: str, generation, name: str, delta_path: str) -> None:
    """A new, empty COW file at *delta_path* over the file *name* of the published
    *generation* (publish.verify.Generation): its map names the base by its path in the
    lower, its size and the sha256 the manifest states."""
    rel = Generations.rel(generation.number, name)
    base = base_opener(lower)(rel)
    try:
        CowFile.create(delta_path, map_path(delta_path), base, base_path=rel,
                       base_sha256=generation.manifest["files"][name]["sha256"]).close()
    finally:
        base.close()


def sync(path: str) -> None:
    """fsync *path* (a file or a directory) and, for a COW delta, its map."""
    for p in (path, map_path(path)) if is_cow(path) else (path,):
        cowmap.fsync_path(p)


def remove(path: str) -> None:
    """Remove the SQLite file *path*: SQLite's side files first, then the map (a delta
    without one is a plain file to every reader, and garbage as one, but nothing reads
    a file being removed), then the file."""
    for p in [path + s for s in SQLITE_SIDE_FILES] + [map_path(path), path]:
        try:
            os.unlink(p)
        except FileNotFoundError:
            pass


def install(tmp: str, final: str) -> None:
    """Move the closed SQLite file *tmp* (a COW delta or a plain file) to *final*,
    replacing what is there: the old side files and map go first, then the new map,
    then the file (a rename over the old one)."""
    for suffix in SQLITE_SIDE_FILES:
        try:
            os.unlink(final + suffix)
        except FileNotFoundError:
            pass
    if is_cow(tmp):
        os.rename(map_path(tmp), map_path(final))
    else:
        try:
            os.unlink(map_path(final))
        except FileNotFoundError:
            pass
    os.rename(tmp, final)
