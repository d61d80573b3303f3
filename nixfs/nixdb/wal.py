"""The committed frames of a SQLite WAL file, read without SQLite (and without its locks).

A snapshot of the lower database (``snapshot``) needs to know, for each page,
where its latest committed version is: in the main file, or in a frame of the
``-wal`` file.  This parses the WAL as SQLite's file format describes it (header,
salts, cumulative checksums, commit frames) and says which frames were appended
since, so a snapshot can tell whether a checkpoint could have torn what it read.
"""

import os
import struct

WAL_MAGIC = (0x377F0682, 0x377F0683)
WAL_HEADER = 32
FRAME_HEADER = 24


def _checksum(data: bytes, s0: int, s1: int, big_endian: bool) -> tuple[int, int]:
    words = struct.unpack((">" if big_endian else "<") + f"{len(data) // 4}I", data)
    mask = 0xFFFFFFFF
    it = iter(words)
    for a, b in zip(it, it):
        s0 = (s0 + a + s1) & mask
        s1 = (s1 + b + s0) & mask
    return s0, s1


class WalIndex:
    """The committed frames of a WAL file: page number -> file offset of its latest copy."""

    def __init__(self):
        self.salts = None
        self.generation = None  # (salt1, salt2, checkpoint sequence)
        self.page_size = 0
        self.big_endian = False
        self.pages: dict[int, int] = {}
        self.end = WAL_HEADER  # offset just past the last committed frame
        self.db_pages = 0  # database size in pages after the last commit (0: no commit)
        self._cksum = (0, 0)

    @classmethod
    def read(cls, fd: int) -> "WalIndex":
        wal = cls()
        header = os.pread(fd, WAL_HEADER, 0)
        if len(header) < WAL_HEADER:
            return wal
        magic, version, page_size, ckpt, salt1, salt2, c1, c2 = struct.unpack(">8I", header)
        if magic not in WAL_MAGIC or page_size < 512 or page_size & (page_size - 1):
            return wal
        big_endian = magic & 1 == 1
        if _checksum(header[:24], 0, 0, big_endian) != (c1, c2):
            return wal
        wal.salts, wal.generation = (salt1, salt2), (salt1, salt2, ckpt)
        wal.page_size, wal.big_endian, wal._cksum = page_size, big_endian, (c1, c2)
        wal._scan(fd, commit=True)
        return wal

    def _scan(self, fd: int, *, commit: bool) -> dict[int, list[int]]:
        """Walk valid frames after ``self.end``.  With *commit*, take those up to the last
        commit into the index; otherwise return page -> offsets of those frames' data."""
        frame_size = FRAME_HEADER + self.page_size
        offset, cksum = self.end, self._cksum
        pending: dict[int, int] = {}
        touched: dict[int, list[int]] = {}
        while True:
            frame = os.pread(fd, frame_size, offset)
            if len(frame) < frame_size:
                break
            pgno, db_pages, salt1, salt2, c1, c2 = struct.unpack(">6I", frame[:FRAME_HEADER])
            if (salt1, salt2) != self.salts:
                break
            cksum = _checksum(frame[:8], *cksum, self.big_endian)
            cksum = _checksum(frame[FRAME_HEADER:], *cksum, self.big_endian)
            if cksum != (c1, c2):
                break
            touched.setdefault(pgno, []).append(offset + FRAME_HEADER)
            pending[pgno] = offset + FRAME_HEADER
            offset += frame_size
            if db_pages and commit:
                self.pages.update(pending)
                pending.clear()
                self.end, self.db_pages, self._cksum = offset, db_pages, cksum
        return touched

    def committed(self) -> list | None:
        """What names the committed frames, or None (no commit): the WAL's salts and
        checkpoint sequence, the end of its last commit, the cumulative checksum there
        and the database's size then.  Within one salt pair committed frames are only
        ever appended, and a restart draws new salts, so an equal value means the same
        committed frames."""
        if not self.db_pages:
            return None
        return [*self.generation, self.end, *self._cksum, self.db_pages]

    def appended_pages(self, fd: int) -> dict[int, list[int]] | None:
        """Pages touched by frames appended since this index was read (with where their
        data is); None if the WAL was restarted since (another generation)."""
        header = os.pread(fd, WAL_HEADER, 0)
        if len(header) < WAL_HEADER:
            return None
        _, _, _, ckpt, salt1, salt2, _, _ = struct.unpack(">8I", header)
        if (salt1, salt2, ckpt) != self.generation:
            return None
        return self._scan(fd, commit=False)
