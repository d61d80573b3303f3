"""The lower layer's calls as awaitables that run in worker threads.

The lower may be NFS or any slow or failing file system: its calls go through the
lower's runner (``lowerrunner``: a thread limit and a timeout), so a stalled lower
never stalls the event loop; each names what to do with a descriptor it returns
late (close it), so an outage leaks nothing.
"""

import functools
import os

from .layers import Layer
from .lowerrunner import LowerRunner


class LowerLayer:
    """The lower layer's primitives as awaitables, each run by *runner* (worker threads
    behind the lower's limit and timeout, ``lowerrunner``) and counted by the layer."""

    def __init__(self, layer: Layer, runner: LowerRunner):
        self.layer = layer
        self.root_fd = layer.root_fd
        self.calls = layer.calls
        self.runner = runner
        self.run = runner.run

    @property
    def timeout(self) -> float | None:
        return self.runner.timeout

    @property
    def out(self) -> bool:
        """A call was given up on and no call has answered since: the lower is out."""
        return self.runner.out

    def counts(self) -> dict:
        """Lower calls by kind, with those given up on (by anyone on the runner) as
        ``timeout``."""
        calls = dict(self.calls)
        if self.runner.timeouts:
            calls["timeout"] = self.runner.timeouts
        return calls

    async def run_on_layer(self, fn, *args, late=None, **kwargs):
        """``fn(layer, *args, **kwargs)`` in a worker thread: a blocking helper (a
        copy-up) that makes several lower calls through the layer, each counted."""
        return await self.run(functools.partial(fn, self.layer, *args, **kwargs), late=late)

    def close(self) -> None:
        self.layer.close()

    async def lstat(self, dirfd, name):
        return await self.run(self.layer.lstat, dirfd, name)

    async def fstat(self, fd):
        return await self.run(self.layer.fstat, fd)

    async def open_dir(self, dirfd, name):
        return await self.run(self.layer.open_dir, dirfd, name, late=os.close)

    async def open_dir_path(self, path):
        return await self.run(self.layer.open_dir_path, path, late=os.close)

    async def scandir(self, fd):
        return await self.run(self.layer.scandir, fd)

    async def readlink(self, dirfd, name):
        return await self.run(self.layer.readlink, dirfd, name)

    async def open(self, dirfd, name, flags):
        return await self.run(self.layer.open, dirfd, name, flags, late=os.close)

    async def listxattr(self, dirfd, name):
        return await self.run(self.layer.listxattr, dirfd, name)

    async def getxattr(self, dirfd, name, attr):
        return await self.run(self.layer.getxattr, dirfd, name, attr)


    async def read_listing(self, dirfd, name, keep_fd, depth_budget):
        return await self.run(self.layer.read_listing, dirfd, name, keep_fd, depth_budget,
                              late=_close_kept_fd)

    async def read_listings(self, dirfd, names, depth_budget):
        return await self.run(self.layer.read_listings, dirfd, names, depth_budget)

    async def scan_stats(self, fd):
        return await self.run(self.layer.scan_stats, fd)

    async def stat_names(self, fd, names):
        return await self.run(self.layer.stat_names, fd, names)

    async def read_xattrs(self, dirfd, name):
        return await self.run(self.layer.read_xattrs, dirfd, name)

    async def read_dir_xattrs(self, dirfd, names):
        return await self.run(self.layer.read_dir_xattrs, dirfd, names)

    async def read_at(self, dirfd, name, size, offset):
        return await self.run(self.layer.read_at, dirfd, name, size, offset)

    async def pread(self, fd, size, offset):
        self.calls["read"] += 1
        return await self.run(os.pread, fd, size, offset)


def _close_kept_fd(result) -> None:
    """A late ``read_listing`` result: close the directory it kept open."""
    if result[1] >= 0:
        os.close(result[1])
