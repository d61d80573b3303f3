"""A generation's ``lower-index.sqlite``: the lower index as a finished first build leaves it.

Written by the same code a first mount uses (``LowerIndex.create_from`` on the
copied lower rows, before the GC root joins them), with the keys that say the
build is whole: every lower path referenced by the root (``root_refs_upto`` =
``root_refs_target`` = the lower's max id), on disk (``durable`` = 1, the id
order index made), ``state`` complete.  A client's COW copy of it then needs no
first-build work at all.
"""

from ..nixdb import gcroot
from ..nixdb.lowerindex import LowerIndex


def write(index_path: str, db_path: str, *, max_id: int, count: int, schema: int) -> None:
    """The index of every path in *db_path* (lower rows only), keys recorded."""
    LowerIndex.create_from(index_path, db_path)
    index = LowerIndex(index_path)
    try:
        index.make_id_index()
        record(index, max_id=max_id, count=count, schema=schema)
    finally:
        index.close()


def record(index: LowerIndex, *, max_id: int, count: int, schema: int) -> None:
    """The keys of a finished first build that has followed the lower up to *max_id*."""
    with index.transaction():
        for key, value in (("lower_max_id", max_id), ("lower_count", count),
                           ("schema", schema), ("root", gcroot.root_path()),
                           ("root_refs_upto", max_id), ("root_refs_target", max_id),
                           ("durable", 1), ("state", "complete")):
            index.put(key, value)

