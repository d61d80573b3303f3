"""The one GC root that keeps every lower path alive for a Nix on the mount.

Nix's garbage collector must never delete a lower path through the mount.  A
GC root per path makes Nix 2.8's collector quadratic; one root whose store path
references every lower path keeps it linear (each lower path finds the root
among its direct referrers).  That store path is a small real file in the
upper's store, registered in the merged database with a correct NAR hash (so
``nix-store --verify --check-contents`` is clean) and rooted by
``var/nix/gcroots/nixfs-lower``.
"""

import hashlib
import os
import struct

from ..overlay import upperformat as fmt
from .merged import PathRow
from .schema import STORE_DIR

BASE32 = "0123456789abcdfghijklmnpqrsvwxyz"
ROOT_NAME = "nixfs-lower-roots"
GCROOT_LINK = "nixfs-lower"
CONTENT = (b"This store path is nixfs' garbage collector root for the lower store.\n"
           b"It references every valid path of the lower store, so that Nix on the\n"
           b"mount never collects them. nixfs keeps it up to date; do not delete it.\n")


def _nix_base32(digest: bytes) -> str:
    """Nix's base-32 rendering of a hash (least significant bits first)."""
    n = len(digest) * 8
    chars = []
    for i in range((n + 4) // 5 - 1, -1, -1):
        b = i * 5
        j, k = divmod(b, 8)
        c = digest[j] >> k
        if j + 1 < len(digest):
            c |= digest[j + 1] << (8 - k)
        chars.append(BASE32[c & 0x1F])
    return "".join(chars)


def root_basename() -> str:
    digest = hashlib.sha256(b"nixfs lower roots v1").digest()[:20]
    return f"{_nix_base32(digest)}-{ROOT_NAME}"


def root_path() -> str:
    return f"{STORE_DIR}/{root_basename()}"


def _nar_string(data: bytes) -> bytes:
    return struct.pack("<Q", len(data)) + data + b"\0" * (-len(data) % 8)


def nar_of_regular_file(contents: bytes) -> bytes:
    parts = [b"nix-archive-1", b"(", b"type", b"regular", b"contents", contents, b")"]
    return b"".join(_nar_string(p) for p in parts)


def root_row(registration_time: int) -> PathRow:
    nar = nar_of_regular_file(CONTENT)
    return PathRow(path=root_path(), hash="sha256:" + hashlib.sha256(nar).hexdigest(),
                   registrationTime=registration_time, deriver=None, narSize=len(nar),
                   ultimate=None, sigs=None, ca=None)


def install_files(upper: str) -> None:
    """Put the root's store file and its gcroots link into the upper (before mounting)."""
    store = os.path.join(upper, "store")
    os.makedirs(store, exist_ok=True)
    target = os.path.join(store, root_basename())
    if not os.path.exists(target):
        tmp = target + os.fsdecode(fmt.TMP_SUFFIX)
        with open(tmp, "wb") as f:
            f.write(CONTENT)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o444)
        os.utime(tmp, (1, 1))  # as Nix canonicalises store paths
        os.rename(tmp, target)
    gcroots = os.path.join(upper, "var/nix/gcroots")
    os.makedirs(gcroots, exist_ok=True)
    link = os.path.join(gcroots, GCROOT_LINK)
    if os.path.lexists(link) and os.readlink(link) != root_path():
        os.unlink(link)
    if not os.path.lexists(link):
        os.symlink(root_path(), link)
