"""Which published generation the upper's database is built over: ``UPPER/.nixfs/generation``.

A merged database built over a generation (``fromgeneration``) records the generation's
number and its manifest's hash, so a later mount knows whether that generation is still
there unchanged, and whether a newer one is to rebase onto; ``nixfs status`` shows it.
A database copied from the lower (``firstbuild``) has no record: it forgets one there.
"""

import json
import logging
import os
import time

from ..overlay import upperformat as fmt
from ..overlay.liststore import ListingStore
from . import cowfiles
from .files import StoreFiles

log = logging.getLogger(__name__)


def listings_path(files: StoreFiles) -> str:
    """The upper's listings (a cache; over a generation, a COW file over its catalog)."""
    return os.path.join(files.state_dir, ListingStore.FILE)


def record_path(files: StoreFiles) -> str:
    return os.path.join(files.state_dir, os.fsdecode(fmt.GENERATION_FILE))


def recorded(files: StoreFiles) -> dict | None:
    """The generation the upper's database is built over, as recorded (None: a copy)."""
    try:
        with open(record_path(files)) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        log.warning("the upper's generation record is unreadable (%s): rebuilding over the "
                    "newest generation", e)
        return {"generation": 0, "manifest_sha256": ""}


def forget(files: StoreFiles) -> None:
    """The upper's database is a copy now: its generation record goes, and the listings
    if they are a COW file (their base may be the generation that is gone; they are a
    cache, learnt again)."""
    try:
        os.unlink(record_path(files))
    except FileNotFoundError:
        pass
    listings = listings_path(files)
    if cowfiles.is_cow(listings):
        cowfiles.remove(listings)


def write(files: StoreFiles, number: int, manifest_sha256: str) -> None:
    """Record that the upper's database is built over generation *number* (whose
    manifest hashes to *manifest_sha256*): written whole, synced, renamed into place."""
    tmp = os.path.join(files.work, "generation.record")
    with open(tmp, "w") as f:
        json.dump({"generation": number, "manifest_sha256": manifest_sha256,
                   "built": int(time.time())}, f)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, record_path(files))
