"""Open lower files of immutable objects, shared by every reader.

Opening the same store file again (every start of a program) then costs no lower
call; a few unused descriptors are kept, the least recently used closed first.
"""

import os
from collections import OrderedDict


class SharedFds:
    """Open lower files of immutable objects, shared by every handle on them: opening
    the same store file again (every start of a program) costs no lower call."""

    def __init__(self, idle: int):
        self.idle = idle  # how many unused descriptors to keep
        self._fds: dict[bytes, list] = {}  # key -> [fd, users]
        self._unused: OrderedDict = OrderedDict()

    def acquire(self, key: bytes) -> int | None:
        item = self._fds.get(key)
        if item is None:
            return None
        item[1] += 1
        self._unused.pop(key, None)
        return item[0]

    def add(self, key: bytes, fd: int) -> int:
        item = self._fds.get(key)
        if item is not None:  # opened twice at once: keep one
            os.close(fd)
            item[1] += 1
            self._unused.pop(key, None)
            return item[0]
        self._fds[key] = [fd, 1]
        return fd

    def release(self, key: bytes) -> None:
        item = self._fds[key]
        item[1] -= 1
        if item[1] == 0:
            self._unused[key] = True
            while len(self._unused) > self.idle:
                old, _ = self._unused.popitem(last=False)
                os.close(self._fds.pop(old)[0])

    def forget(self, prefix: bytes) -> None:
        """Close unused descriptors at or below *prefix* (the object left the lower)."""
        for key in [k for k in self._unused if k == prefix or k.startswith(prefix + b"/")]:
            del self._unused[key]
            os.close(self._fds.pop(key)[0])

    def close(self) -> None:
        for fd, _ in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._unused.clear()

    def __len__(self) -> int:
        return len(self._fds)
