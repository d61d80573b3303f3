"""A COW file's base read in large chunks and kept in memory (bounded).

SQLite reads a database one page at a time, and reads an overflow page (a record larger
than a page's share, as most of a catalog's listings are) straight from the file each
time, past its page cache.  Over a base on a slow lower (NFS), each of those reads is a
round trip, and on a lower whose client keeps no attributes (slowfs, NFS with
``actimeo=0``) a second one to revalidate; on a cold local disk each is a seek.  A base
never changes while it is used (a published generation's file is immutable, and a COW
file checks its size against its map), so its content can be kept: this reads it in
aligned chunks of ``chunk`` bytes and keeps the last ``limit`` bytes of them (LRU).  A walk
reads the catalog roughly in its key order, so a chunk serves many listings; a single
lookup reads one chunk where it needed a page or two.
"""

import threading
from collections import OrderedDict


class ReadCache:
    """A base (anything with pread/size/close) read through chunks kept in memory.
    ``pread`` may run in several threads at once; each chunk is read once at a time per
    thread that misses it (two threads may both read one, which is harmless)."""

    def __init__(self, base, *, chunk: int = 128 * 1024, limit: int = 16 * 1024 * 1024):
        if chunk <= 0 or limit < chunk:
            raise ValueError("a read cache needs a positive chunk and a limit of one or more")
        self._base, self._chunk, self._max = base, chunk, max(1, limit // chunk)
        self._size = base.size()  # a base never changes while it is used
        self._chunks: OrderedDict[int, bytes] = OrderedDict()
        self._lock = threading.Lock()
        self.base_reads = 0  # chunks read from the base (for tests and stats)

    def size(self) -> int:
        return self._size

    def pread(self, n: int, offset: int) -> bytes:
        end = min(offset + n, self._size)
        if offset >= end:
            return b""
        chunk = self._chunk
        first, last = offset // chunk, (end - 1) // chunk
        if first == last:
            return self._get(first)[offset - first * chunk:end - first * chunk]
        parts = [self._get(i) for i in range(first, last + 1)]
        return b"".join(parts)[offset - first * chunk:end - first * chunk]

    def _get(self, index: int) -> bytes:
        with self._lock:
            data = self._chunks.get(index)
            if data is not None:
                self._chunks.move_to_end(index)
                return data
        start = index * self._chunk
        want = min(self._chunk, self._size - start)
        data = self._base.pread(want, start)
        while len(data) < want:  # a short read (a base on NFS may give one): the rest
            more = self._base.pread(want - len(data), start + len(data))
            if not more:
                data += bytes(want - len(data))  # past the base's end: zeros, as CowFile's
                break
            data += more
        with self._lock:
            self.base_reads += 1
            self._chunks[index] = data
            self._chunks.move_to_end(index)
            while len(self._chunks) > self._max:
                self._chunks.popitem(last=False)
        return data

    def close(self) -> None:
        with self._lock:
            self._chunks.clear()
        self._base.close()
