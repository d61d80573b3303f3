"""The map of a copy-on-write file: which pages its delta holds, its size, its base.

A COW file is a delta (a sparse file at the logical file's offsets) plus this map, over a
read-only base.  The map is explicit rather than read from the delta's holes (SEEK_DATA),
because NFS v3 and compressing file systems report holes wrongly.  It is a small binary
file, replaced whole (temporary name, fsync, rename, directory fsync), so a crash leaves
either the old map or the new one; a sha256 at its end makes a damaged one an error, never
"all zero".

Layout (little-endian), format version 1::

    magic "NIXFSCOW", version u16, flags u16 (1: has a base, 2: the base's sha256 is stated),
    page size u32, logical size u64, base_limit u64, base size u64, base sha256 32 bytes,
    base path length u32, bitmap length u32, base path, bitmap (bit p%8 of byte p//8 set:
    page p is in the delta), sha256 over everything before it.

``base_limit``: offsets at or past it never come from the base (a truncation cut them).
The base path is relative to a root the opener supplies (the store, the lower).
"""

import errno
import hashlib
import os
import struct
from dataclasses import dataclass, field

MAGIC = b"NIXFSCOW"
VERSION = 1
DEFAULT_PAGE_SIZE = 4096
MAP_PREFIX = b".wh..wh..nixfs-cow."  # the map of DIR/NAME is DIR/.wh..wh..nixfs-cow.NAME
TMP_PREFIX = b".wh..wh..nixfs-cowtmp."  # + PID. + NAME: a map being written (not a map)
_HEADER = struct.Struct("<8sHHIQQQ32sII")
_HAS_BASE, _HAS_SHA = 1, 2
_DIGEST = 32


class CowError(OSError):
    """A COW file or its map is damaged, missing or does not match its base (EIO)."""

    def __init__(self, message: str):
        super().__init__(errno.EIO, message)


@dataclass(frozen=True)
class BaseRef:
    """The base's identity as the map records it: where, how long, what its owner says."""
    path: str  # relative to the opener's root
    size: int
    sha256: str | None = None  # hex, as the base's owner states it (manifest), or None


@dataclass
class CowMap:
    page_size: int
    size: int
    base_limit: int
    base: BaseRef | None
    bits: bytearray = field(default_factory=bytearray)

    def pages(self) -> int:
        return -(-self.size // self.page_size)


def map_name(name):
    """The map's file name for the delta *name* (bytes or str, as given)."""
    if isinstance(name, str):
        return MAP_PREFIX.decode() + name
    return MAP_PREFIX + name


def map_path(delta_path):
    """The map's path beside the delta *delta_path*."""
    head, tail = os.path.split(delta_path)
    return os.path.join(head, map_name(tail))


def encode(m: CowMap) -> bytes:
    flags = (_HAS_BASE if m.base else 0) | (_HAS_SHA if m.base and m.base.sha256 else 0)
    path = m.base.path.encode() if m.base else b""
    sha = bytes.fromhex(m.base.sha256) if flags & _HAS_SHA else bytes(_DIGEST)
    used = -(-m.pages() // 8)
    bits = bytes(m.bits[:used])
    head = _HEADER.pack(MAGIC, VERSION, flags, m.page_size, m.size, m.base_limit,
                        m.base.size if m.base else 0, sha, len(path), len(bits))
    body = head + path + bits
    return body + hashlib.sha256(body).digest()


def decode(data: bytes, where: str = "COW map") -> CowMap:
    """The map in *data*; CowError (naming *where*) if it is damaged or not a map."""
    if len(data) < _HEADER.size + _DIGEST or data[:8] != MAGIC:
        raise CowError(f"{where}: not a nixfs COW map (truncated or wrong magic)")
    body, digest = data[:-_DIGEST], data[-_DIGEST:]
    if hashlib.sha256(body).digest() != digest:
        raise CowError(f"{where}: COW map damaged (checksum mismatch)")
    (_, version, flags, page_size, size, base_limit, base_size, sha, path_len,
     bits_len) = _HEADER.unpack_from(body)
    if version != VERSION:
        raise CowError(f"{where}: COW map format {version} not supported (this nixfs reads {VERSION})")
    if len(body) != _HEADER.size + path_len + bits_len:
        raise CowError(f"{where}: COW map damaged (lengths do not match)")
    path = body[_HEADER.size:_HEADER.size + path_len]
    bits = bytearray(body[_HEADER.size + path_len:])
    base = None
    if flags & _HAS_BASE:
        base = BaseRef(path.decode(), base_size, sha.hex() if flags & _HAS_SHA else None)
    m = CowMap(page_size, size, base_limit, base, bits)
    check(m, where)
    return m


def check(m: CowMap, where: str) -> None:
    if m.page_size < 512 or m.page_size & (m.page_size - 1):
        raise CowError(f"{where}: COW map damaged (page size {m.page_size})")
    limit = m.base.size if m.base else 0
    if m.base_limit > min(m.size, limit):
        raise CowError(f"{where}: COW map damaged (base_limit {m.base_limit} past the size)")
    pages = m.pages()
    whole, spare = divmod(pages, 8)
    past = len(m.bits) > whole + (spare > 0) or (
        spare and len(m.bits) == whole + 1 and m.bits[-1] >> spare)
    if past:
        raise CowError(f"{where}: COW map damaged (pages marked past the size)")


def open_map(path, dir_fd: int | None = None) -> int:
    """A read-only descriptor on the map at *path* (never through a symlink)."""
    try:
        return os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except FileNotFoundError:
        raise CowError(f"{os.fsdecode(path)}: COW map missing") from None


def read_fd(fd: int, where: str) -> CowMap:
    chunks, offset = [], 0
    while chunk := os.pread(fd, 1 << 20, offset):
        chunks.append(chunk)
        offset += len(chunk)
    return decode(b"".join(chunks), where)


def read(path, dir_fd: int | None = None) -> CowMap:
    """The map at *path* (relative to *dir_fd* if given)."""
    fd = open_map(path, dir_fd)
    try:
        return read_fd(fd, os.fsdecode(path))
    finally:
        os.close(fd)


def write(path, m: CowMap, dir_fd: int | None = None, durable: bool = True,
          keep_open: bool = False) -> int | None:
    """Replace the map at *path* whole.  *durable*: fsync the file and its directory, so
    the new map survives a power loss (without it, a killed process still leaves one of
    the two maps, since the rename is atomic).  *keep_open*: return a descriptor on the
    new map (its inode number then tells a newer map from it: see ``path_id``)."""
    head, tail = os.path.split(os.fsencode(path))
    if not tail.startswith(MAP_PREFIX):
        raise ValueError(f"{os.fsdecode(path)}: not a COW map name")
    # Per process: a map written unlocked (at a close) never meets another's temporary.
    tmp = os.path.join(head, TMP_PREFIX + b"%d." % os.getpid() + tail[len(MAP_PREFIX):])
    data = encode(m)
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o644, dir_fd=dir_fd)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        if durable:
            os.fsync(fd)
        os.rename(tmp, os.fsencode(path), src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        os.close(fd)
        raise
    if durable:
        sync_dir(head, dir_fd)
    if keep_open:
        return fd
    os.close(fd)
    return None


def sync_dir(head: bytes, dir_fd: int | None) -> None:
    """fsync the directory *head* (relative to *dir_fd*; b"": *dir_fd* itself, which may be
    an O_PATH descriptor, as the layers open an unreadable directory: then it is opened)."""
    if dir_fd is not None and not head:
        try:
            os.fsync(dir_fd)
            return
        except OSError as e:
            if e.errno != errno.EBADF:
                raise
    fd = os.open(head or b".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_path(path) -> None:
    """fsync a file or a directory by name."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_id(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def path_id(path, dir_fd: int | None = None) -> tuple[int, int] | None:
    """Which map is at *path* now (None: none).  A new map is a new inode, and while the
    old one is held open its number cannot be reused, so comparing this with ``file_id``
    of the map one holds cannot miss a change (mtimes can: they are coarse)."""
    try:
        st = os.stat(path, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


# -- the bitmap (bit p%8 of byte p//8: page p is in the delta) ---------------------------

def has_page(bits: bytearray, page: int) -> bool:
    i = page >> 3
    return i < len(bits) and bool(bits[i] >> (page & 7) & 1)


def mark_pages(bits: bytearray, first: int, last: int) -> bool:
    """Set pages first..last; whether any was not set."""
    need = (last >> 3) + 1
    if len(bits) < need:
        bits.extend(bytes(need - len(bits)))
    changed = False
    for page in range(first, last + 1):
        i, bit = page >> 3, 1 << (page & 7)
        if not bits[i] & bit:
            bits[i] |= bit
            changed = True
    return changed


def clear_from(bits: bytearray, page: int) -> None:
    """Clear every page from *page* on (the bitmap shrinks to what is left)."""
    whole, spare = divmod(page, 8)
    keep = whole + (spare > 0)
    del bits[keep:]
    if spare and len(bits) == keep:
        bits[-1] &= (1 << spare) - 1
