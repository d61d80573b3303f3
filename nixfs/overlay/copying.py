"""Copy-up: giving a lower object its upper copy before it is changed.

The copy is built in the work folder by ``copyup`` (in a worker thread: it reads
the lower) and renamed into place, parents first, so a reader sees the lower
object or the finished copy, never a partial one.  The caller holds the change lock.
"""

import errno
import os

from . import copyup
from .descriptors import Descriptors
from .inodes import Node
from .lowerlayer import LowerLayer
from .upperlayer import UpperLayer
from .state import UpperState
from .types import Notifier, err


class CopyUp:
    def __init__(self, dirs: Descriptors, upper: UpperLayer, lower: LowerLayer, state: UpperState,
                 notify: Notifier, *, privileged: bool):
        self.dirs, self.upper, self.lower, self.state = dirs, upper, lower, state
        self.notify = notify
        self.privileged = privileged
        self.copy_ups = 0

    async def copy_up(self, node: Node, *, truncate: bool = False) -> None:
        """Give *node* an upper object (lock held).  Directories get metadata only."""
        if node.upper:
            return
        if node.parent is None:
            raise err(errno.ENOENT, "removed")
        await self.copy_up(node.parent)
        tmp = self.dirs.work_name()
        work_fd = self.dirs.work_fd
        async with self.dirs.lower_fd(node.parent) as lpfd:
            # (copy_to_work removes its partial copy when it fails; one given up on is
            # removed when its thread finishes, so a full disk gets its space back.)
            st = await self.lower.run_on_layer(
                copyup.copy_to_work, lpfd, node.name, work_fd, tmp, truncate=truncate,
                privileged=self.privileged,
                late=lambda _: self.state.discard(tmp))
        try:
            with self.dirs.upper_fd(node.parent) as upfd, self.dirs.keep_times(upfd), \
                    self.dirs.writable(upfd):
                self.upper.rename(work_fd, tmp, upfd, node.name)
                if node.is_dir:
                    # Renaming a directory may touch its times on some file systems.
                    self.upper.utime(upfd, node.name, (st.st_atime_ns, st.st_mtime_ns))
        except BaseException:
            self.state.discard(tmp)
            raise
        node.upper = True
        if not node.is_dir:
            node.lower = None
        self.copy_ups += 1
        self.notify.attr_changed(node.ino)  # e.g. a merged directory's link count is 1

    async def copy_open_file(self, fd: int) -> int:
        """A private, writable copy of the open lower file *fd* (closed here once copied)."""
        new = await self.lower.run_on_layer(copyup.copy_open_file, fd, self.dirs.work_fd,
                                            privileged=self.privileged, late=os.close)
        os.close(fd)
        return new
