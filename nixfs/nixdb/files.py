"""Where one mount's Nix database files are: the lower's, the merged one, the index.

The parts that keep the merged database (first build, its finish, following the
lower, hiding) all work on the same few files; this names them once.
"""

import os
from dataclasses import dataclass

from .lowerindex import LowerIndex


@dataclass(frozen=True)
class StoreFiles:
    lower: str      # the lower Nix state directory's parent (holding store/ and var/nix)
    upper: str
    state_dir: str  # nixfs' own folder in the upper
    # A path that reaches the lower's var/nix/db without the walk down to it (a pinned
    # descriptor's, ``pin.PinnedDir``): the database is opened and polled all the time,
    # and a FUSE or NFS lower answers each walk with a lookup per level.  None: by name.
    db_dir: str | None = None

    @property
    def lower_db_dir(self) -> str:
        return self.db_dir or os.path.join(self.lower, "var/nix/db")

    @property
    def lower_db(self) -> str:
        return os.path.join(self.lower_db_dir, "db.sqlite")

    @property
    def merged_dir(self) -> str:
        return os.path.join(self.upper, "var/nix/db")

    @property
    def merged_db(self) -> str:
        return os.path.join(self.merged_dir, "db.sqlite")

    @property
    def index_path(self) -> str:
        return os.path.join(self.state_dir, LowerIndex.FILE)

    @property
    def work(self) -> str:
        return os.path.join(self.state_dir, "work")


def is_nix_store(lower: str) -> bool:
    """Whether *lower* holds a Nix store with its database (else it is a plain overlay)."""
    return os.path.isfile(os.path.join(lower, "var/nix/db/db.sqlite")) and \
        os.path.isdir(os.path.join(lower, "store"))
