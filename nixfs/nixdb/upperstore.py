"""Direct, read-only looks at the upper's ``store/``: which names a whiteout hides,
which the upper holds itself.

The database code asks these before the mount is live and from the worker while
it is, on the upper directly: they are single ``lstat`` calls and never change
anything.
"""

import os

from ..overlay import upperformat as fmt


class UpperStore:
    def __init__(self, upper: str):
        self.path = os.path.join(upper, "store")

    def hidden(self, name: bytes) -> bool:
        try:
            os.lstat(os.path.join(self.path, os.fsdecode(fmt.whiteout_name(name))))
            return True
        except (FileNotFoundError, OSError):
            pass
        try:
            st = os.lstat(os.path.join(self.path, os.fsdecode(name)))
        except OSError:
            return False
        return fmt.is_kernel_whiteout(st)

    def has(self, name: bytes) -> bool:
        try:
            st = os.lstat(os.path.join(self.path, os.fsdecode(name)))
        except OSError:
            return False
        return not fmt.is_kernel_whiteout(st)

    def hidden_names(self) -> set[bytes]:
        out = set()
        try:
            entries = os.scandir(self.path)
        except FileNotFoundError:
            return out
        with entries:
            for e in entries:
                name = os.fsencode(e.name)
                if name.startswith(fmt.WHITEOUT_PREFIX):
                    out.add(name[len(fmt.WHITEOUT_PREFIX):])
                elif not e.is_dir(follow_symlinks=False) and self.hidden(name):
                    out.add(name)
        return out
