"""Nix's reserved-space file (``var/nix/db/reserved``), made in the upper before mounting.

Nix keeps that file so a garbage collection can free its space on a full disk.  Its
first command on a store where the file is missing (a fresh upper) makes it with
``posix_fallocate``; a FUSE file system without a fallocate operation (pyfuse3 has
none) makes glibc emulate that with a one-byte write every 4 KiB: 2,048 FUSE writes
for the 8 MiB, most of a fresh upper's first query over a published generation.
The daemon makes the file in the upper instead, allocated as Nix's own call would on
a local disk, before the mount exists.  A Nix configured for another size
(``gc-reserved-space``) finds the size wrong and makes its own, as it would anyway;
a file already there is left alone.
"""

import logging
import os

log = logging.getLogger(__name__)

NIX_DEFAULT_SIZE = 8 * 1024 * 1024  # Nix's gc-reserved-space default
NAME = "reserved"


def make(db_dir: str, size: int = NIX_DEFAULT_SIZE) -> bool:
    """Make *db_dir*/reserved of *size* bytes, allocated, unless something is there;
    True if made.  A file system that cannot allocate it is left to Nix."""
    path = os.path.join(db_dir, NAME)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
    except FileExistsError:
        return False
    except OSError as e:
        log.info("cannot make Nix's reserved space %s (%s): Nix makes it", path, e)
        return False
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as e:
        log.info("cannot allocate Nix's reserved space %s (%s): Nix makes it", path, e)
        os.close(fd)
        os.unlink(path)
        return False
    os.close(fd)
    return True
