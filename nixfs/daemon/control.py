"""What a running daemon answers ``nixfs`` commands on its control channel.

``status``, ``sync``, ``unhide`` and ``pause`` (before an unmount), each a call on the
daemon's parts; the channel itself (a Unix socket, one JSON line each way) is
nixfs/control.py, shared with the commands' side.
"""

import time

import trio

from .. import control
from . import status


class ControlApi:
    """The daemon's answers to commands, served on its control socket (``server``)."""

    def __init__(self, daemon, *, poll_us: int):
        self.daemon = daemon
        self.poll_us = poll_us  # as pyfuse3.main got it: status shows it
        self.started = time.time()
        self.server = control.ControlServer(control.socket_path(daemon.cfg.mountpoint), {
            "status": self.status, "unhide": self.unhide, "sync": self.sync,
            "pause": self.pause})

    async def status(self):
        # The parts' counters here, on the trio thread they live on; the upper's walk in a
        # worker thread.  The lower index's figures are read first (maybe from the lower).
        if self.daemon.policy is not None:
            await self.daemon.policy.refresh_stats()
        out = status.collect(self.daemon, started=self.started, poll_us=self.poll_us)
        return await trio.to_thread.run_sync(status.add_sizes, out, self.daemon.cfg.upper)

    async def unhide(self, names):
        service = self.daemon.service
        if service is None:
            raise ValueError("this mount is not a Nix store")
        return [n.decode() for n in await service.unhide([n.encode() for n in names])]

    async def sync(self):
        service = self.daemon.service
        if service is not None:
            await service.sync_now()
        return True

    async def pause(self, seconds=10.0):
        if self.daemon.stale_attrs is not None:
            await self.daemon.stale_attrs.pause(seconds)
        if self.daemon.service is not None:
            await self.daemon.service.pause(seconds)
        return True
