"""A mount's life in the daemon: mount, one trio nursery, signals, clean teardown.

The nursery runs the FUSE loop, the signal handler, the control channel, the attribute
refresher and (for a Nix store) the database service.  On SIGTERM/SIGINT/SIGHUP or an
unmount it stops the service (its I/O goes through the mount), ends the FUSE loop,
syncs the upper and closes every file, so ``nixfs umount`` can wait for its exit.
"""

import gc
import logging
import os
import signal

import trio

from .. import runtime
from ..fuse import features as fuse_features
from ..fuse import session
from ..config import OWN_FLAGS, MountConfig
from .assemble import Daemon, StartFailed, assemble
from .control import ControlApi

log = logging.getLogger("nixfs")

# How long the daemon polls for the next request after answering one (-o poll_us=): a
# cold tree walk's caller often takes more than 100 µs between requests (the kernel
# builds a listing's dentries, its worker threads want the CPU too).
DEFAULT_POLL_US = 250


def fuse_options(cfg: MountConfig, *, root_daemon: bool) -> set[str]:
    """What libfuse gets: the kernel always checks permissions against the shown owners."""
    options = {"fsname=nixfs", "subtype=nixfs", "default_permissions"} | cfg.options
    options -= {"rw"} | OWN_FLAGS
    if root_daemon:
        # A root mount behaves like kernel overlayfs (and any root-mounted file system)
        # unless asked: every user may use it (as fuse-overlayfs does as root), and suid and
        # device files work (libfuse defaults to nosuid,nodev; fusermount3 forces both for
        # users, whose mounts stay theirs alone unless they ask).
        if not options & {"allow_root"} and "owner_only" not in cfg.options:
            options.add("allow_other")
        options |= {"suid"} if "nosuid" not in options else set()
        options |= {"dev"} if "nodev" not in options else set()
    if cfg.debug:
        options.add("debug")
    return options


def main_args(cfg: MountConfig) -> dict:
    """pyfuse3.main's arguments: polling where the patched pyfuse3 offers it.

    Polling only pays where the process sending requests runs beside the daemon: with
    one CPU the daemon's polling would take the time that process needs.
    """
    if not fuse_features.FEATURES.poll_before_sleep:
        return {}
    poll_us = cfg.poll_us
    if poll_us < 0:
        poll_us = DEFAULT_POLL_US if len(os.sched_getaffinity(0)) > 1 else 0
    return {"poll_us": poll_us}


def tune_collector() -> None:
    """Fit Python's cycle collector to a daemon whose objects are long-lived and made
    by the ten thousand (nodes, listings).  By default it runs every 700 allocations
    and goes through all survivors again each time they grew by a quarter: about 15 %
    of the request handling of a cold walk here.  Start-up's objects (modules, the
    layers) are left out of every collection."""
    gc.freeze()
    # Allocations before a young collection; young collections before a middle one;
    # middle ones before a full one (which still waits for a quarter's growth).
    gc.set_threshold(50_000, 20, 10)


def detach_stdio() -> None:
    """The daemon lets go of the terminal it was started from (it logs to its file)."""
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)


def serve(cfg: MountConfig, report) -> int:
    """Mount and answer requests until unmounted or signalled; *report* (start.Report)
    tells whoever waits how the start went."""
    try:
        daemon = assemble(cfg)
    except StartFailed as e:
        return report(e.message, e.code)
    try:
        session.init(daemon.ops, cfg.mountpoint, fuse_options(cfg, root_daemon=daemon.root_daemon))
    except RuntimeError as e:
        daemon.close()
        return report(f"mounting at {cfg.mountpoint} failed ({e}); see the messages above", 1)
    args = main_args(cfg)
    control = ControlApi(daemon, poll_us=args.get("poll_us", 0))
    runtime.write_record(cfg.mountpoint, lower=cfg.lower, upper=cfg.upper,
                         control=control.server.path, nix=daemon.service is not None)
    return _Run(daemon, control, report, args).run()


class _Run:
    """A mounted daemon's run: its nursery's tasks until the FUSE loop ends, then the teardown."""

    def __init__(self, daemon: Daemon, control: ControlApi, report, args: dict):
        self.daemon, self.control, self.report, self.args = daemon, control, report, args
        self.unmount = False  # whether the teardown unmounts (a signal, a failure)

    def run(self) -> int:
        """Answer requests until the FUSE loop ends; then unmount (if a signal or a
        failure ended it), close every part and remove the daemon's record."""
        cfg = self.daemon.cfg
        try:
            tune_collector()
            trio.run(self.main)
        except BaseException:
            log.exception("the daemon failed")
            self.unmount = True
            raise
        finally:
            if self.daemon.service is not None:
                self.daemon.service.worker.stop()
            session.close(unmount=self.unmount)
            self.daemon.close()
            runtime.remove_record(cfg.mountpoint)
            log.info("unmounted %s", cfg.mountpoint)
        return 0

    async def main(self) -> None:
        daemon = self.daemon
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._on_signals)
            if daemon.stale_attrs is not None:
                nursery.start_soon(daemon.stale_attrs.run)
            await nursery.start(self.control.server.serve)
            nursery.start_soon(self._start, nursery)
            await session.main(**self.args)
            nursery.cancel_scope.cancel()
        await daemon.overlay.sync()

    async def _on_signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for signum in signals:
                log.info("signal %d: unmounting", signum)
                self.unmount = True
                if self.daemon.service is not None:
                    await self.daemon.service.stop()  # its I/O goes through the mount
                session.terminate()
                return

    async def _start(self, nursery) -> None:
        await self._announce()
        if self.daemon.service is not None:
            nursery.start_soon(self.daemon.service.run)

    async def _announce(self) -> None:
        """The mount is usable: tell the parent (and the user)."""
        daemon, cfg = self.daemon, self.daemon.cfg
        if daemon.service is not None:
            try:
                await daemon.service.start()
            except Exception as e:
                error = str(e).strip().splitlines()[-1] if str(e).strip() else repr(e)
                self.report(f"cannot start the store database service through the mount "
                            f"(its generation's bases, Nix's GC lock): {error}", 1)
                raise
        log.info("mounted %s (lower %s, upper %s)", cfg.mountpoint, cfg.lower, cfg.upper)
        self.report("ok")
        if self.report.to_parent and daemon.log_path is not None:
            detach_stdio()
