"""How a listing of a lower directory is held and stored: packed stats, and the bytes
of a record in the listing store (the cache's own and a published catalog's)."""

import os
import struct
from typing import NamedTuple


class LStat(NamedTuple):
    """The fields of os.stat_result that nixfs uses, cheap to keep and to store."""
    st_mode: int
    st_ino: int
    st_dev: int
    st_nlink: int
    st_uid: int
    st_gid: int
    st_size: int
    st_atime_ns: int
    st_mtime_ns: int
    st_ctime_ns: int
    st_blksize: int
    st_blocks: int
    st_rdev: int


_HEAD = struct.Struct("<HI")  # name length, target length (0xFFFFFFFF: none)
_STAT = struct.Struct("<IQQQIIqqqqqqQ")  # LStat's fields in order
_NONE = 0xFFFFFFFF


def pack_stat(st) -> bytes:
    """A stat (os.stat_result or LStat) as a listing keeps it."""
    return _STAT.pack(st.st_mode, st.st_ino, st.st_dev, st.st_nlink, st.st_uid, st.st_gid,
                      st.st_size, st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns,
                      st.st_blksize, st.st_blocks, st.st_rdev)


class Listing(NamedTuple):
    """One directory's entries.  Stats are kept packed (about a quarter of the
    memory of stat tuples: a million-entry walk must stay in a bounded RSS) and
    unpacked when asked for."""
    entries: dict[bytes, bytes]     # name -> packed stat; b"." is the directory (or file) itself
    targets: dict[bytes, bytes]     # name -> symlink target

    def stat(self, name: bytes) -> LStat | None:
        packed = self.entries.get(name)
        return None if packed is None else LStat._make(_STAT.unpack(packed))

    def stats(self):
        """(name, stat) for every entry, ``.`` included."""
        for name, packed in self.entries.items():
            yield name, LStat._make(_STAT.unpack(packed))

    def __len__(self) -> int:
        return len(self.entries)


def encode(listing: Listing) -> bytes:
    out = bytearray()
    for name, packed in listing.entries.items():
        target = listing.targets.get(name)
        out += _HEAD.pack(len(name), _NONE if target is None else len(target))
        out += packed
        out += name
        if target is not None:
            out += target
    return bytes(out)


# What decoding a damaged record raises (a truncated or garbled listing or xattr map).
DECODE_ERRORS = (ValueError, struct.error, UnicodeError)


def decode(data: bytes) -> Listing:
    entries, targets = {}, {}
    pos = 0
    while pos < len(data):
        nlen, tlen = _HEAD.unpack_from(data, pos)
        pos += _HEAD.size
        st = data[pos:pos + _STAT.size]
        pos += _STAT.size
        name = data[pos:pos + nlen]
        pos += nlen
        if len(name) != nlen:
            raise ValueError("truncated listing")
        if tlen != _NONE:
            targets[name] = data[pos:pos + tlen]
            pos += tlen
        entries[name] = st
    return Listing(entries, targets)


_XHEAD = struct.Struct("<HH")  # entry name length, xattr count
_XATTR = struct.Struct("<HI")  # xattr name length, value length


def encode_xattrs(xmap: dict[bytes, dict[str, bytes]]) -> bytes:
    """A directory's entries' xattrs (only entries that have some)."""
    out = bytearray()
    for name, attrs in xmap.items():
        out += _XHEAD.pack(len(name), len(attrs)) + name
        for attr, value in attrs.items():
            raw = os.fsencode(attr)
            out += _XATTR.pack(len(raw), len(value)) + raw + value
    return bytes(out)


def decode_xattrs(data: bytes) -> dict[bytes, dict[str, bytes]]:
    xmap, pos = {}, 0
    while pos < len(data):
        nlen, count = _XHEAD.unpack_from(data, pos)
        pos += _XHEAD.size
        name, pos = data[pos:pos + nlen], pos + nlen
        attrs = {}
        for _ in range(count):
            alen, vlen = _XATTR.unpack_from(data, pos)
            pos += _XATTR.size
            attr, pos = os.fsdecode(data[pos:pos + alen]), pos + alen
            attrs[attr], pos = data[pos:pos + vlen], pos + vlen
        if pos > len(data):
            raise ValueError("truncated xattrs")
        xmap[name] = attrs
    return xmap
