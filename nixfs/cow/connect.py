"""Opening an SQLite file that may be a copy-on-write file: nixfs' own connections to
the merged database before mounting, the lower index and the listings.

A file with a map beside it is opened through the ``nixfs-cow`` VFS (vfs.py), its
base found below *cow_root*; any other file directly, so a plain file pays nothing
for the VFS (its every page read would be a Python call).
"""

import os

import apsw

from . import cowmap
from .cowmap import CowError

DEFAULT_FLAGS = apsw.SQLITE_OPEN_READWRITE | apsw.SQLITE_OPEN_CREATE


def connect(path: str, *, base_root: str | None = None,
            flags: int = DEFAULT_FLAGS) -> apsw.Connection:
    """A connection to the SQLite file *path*; CowError if it is a copy-on-write file and
    there is no *base_root* to find its base in."""
    if not os.path.lexists(cowmap.map_path(path)):
        return apsw.Connection(path, flags=flags)
    if base_root is None:
        raise CowError(f"{path} is a copy-on-write file, opened without the folder its "
                       "base is in")
    from . import vfs
    return vfs.connect(path, base_root=base_root, flags=flags)
