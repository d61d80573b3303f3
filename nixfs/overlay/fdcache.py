"""A bounded cache of open directory descriptors.

Directories are opened one component at a time with ``O_NOFOLLOW`` and kept
open, so an operation on a file costs one ``*at`` call on its parent's
descriptor.  Entries are keyed by (layer, node number): a descriptor follows its
directory through renames exactly as the node does.

An entry in use (pinned) is never closed, even when evicted or dropped, because
a worker thread may be calling into it; it is closed when the last user lets go.
"""

import os
from collections import OrderedDict


class FdEntry:
    __slots__ = ("fd", "pins", "live")

    def __init__(self, fd: int):
        self.fd = fd
        self.pins = 1
        self.live = True


class FdCache:
    def __init__(self, capacity: int = 1024):
        self.capacity = capacity
        self._entries: OrderedDict[tuple, FdEntry] = OrderedDict()
        self.opened = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key) -> bool:
        return key in self._entries

    def acquire(self, key) -> FdEntry | None:
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
            entry.pins += 1
        return entry

    def insert(self, key, fd: int) -> FdEntry:
        """Cache *fd* under *key*, returned pinned once."""
        old = self._entries.pop(key, None)
        if old is not None:
            self._retire(old)
        entry = FdEntry(fd)
        self._entries[key] = entry
        self.opened += 1
        while len(self._entries) > self.capacity:
            _, victim = self._entries.popitem(last=False)
            self._retire(victim)
        return entry

    def release(self, entry: FdEntry) -> None:
        entry.pins -= 1
        if entry.pins == 0 and not entry.live:
            os.close(entry.fd)

    def drop(self, key) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._retire(entry)

    def clear(self) -> None:
        while self._entries:
            _, entry = self._entries.popitem()
            self._retire(entry)

    @staticmethod
    def _retire(entry: FdEntry) -> None:
        entry.live = False
        if entry.pins == 0:
            os.close(entry.fd)
