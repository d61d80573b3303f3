"""The one place that builds a mount's parts and wires them together.

Every part is built here, in the order their needs dictate, and given what it needs;
nothing else in nixfs makes or connects parts.  A reader who wants to know what a
running mount is made of reads ``assemble`` and the ``Daemon`` it returns.

What can fail here fails before the mount exists: ``StartFailed`` carries the one line
and the exit code the waiting ``nixfs mount`` reports (2: the user can fix it; 1: not).
"""

import contextlib
import logging
import os
from dataclasses import dataclass, field

from .. import logs, pin
from ..config import MountConfig
from .preflight import is_nix_store, privileged

log = logging.getLogger("nixfs")


class StartFailed(Exception):
    """The mount cannot start: *message* for the user, *code* to exit with."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.message, self.code = message, code


@dataclass
class Daemon:
    """A mount's parts, built by ``assemble`` (closed, in reverse, by ``close``)."""
    cfg: MountConfig
    lower: object  # pin.PinnedDir: the lower as it was before the mount covered it
    overlay: object  # overlay.Overlay: the merged view
    ops: object  # fuse_ops.FuseOps: the pyfuse3 adapter over it
    service: object | None  # nixdb.storeview.StoreService: a Nix store's database work
    stale_attrs: object | None  # stale_attrs.StaleAttributes: refreshes after reads
    log_path: str | None  # the daemon's log file (None: stderr)
    root_daemon: bool  # run by real root: a mount for every user, owners kept
    _closing: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)

    def close(self) -> None:
        self._closing.close()


def assemble(cfg: MountConfig) -> Daemon:
    """Build every part of the mount of *cfg* (not mounted yet); StartFailed if one
    cannot be built (what was built is closed again)."""
    owner = None if privileged() else (os.geteuid(), os.getegid())
    with contextlib.ExitStack() as closing:
        lower = _pin_lower(cfg)
        closing.callback(lower.close)
        overlay = _open_overlay(cfg, owner)
        closing.callback(overlay.close)
        log_path, log_file = _open_log(cfg, lower)
        recovered = overlay.state.recover()
        if recovered:
            log.warning("removed %d leftovers of an interrupted daemon from the work folder",
                        len(recovered))
        service = _store_service(cfg, lower, overlay, log_file) if is_nix_store(cfg) else None
        # Nix removes every extended attribute from what it adds to a store (but SELinux
        # labels, which FUSE mounts get from the mount, not the file system): a Nix store
        # has none to show.
        xattrs = cfg.xattr == "on" or (cfg.xattr == "auto" and service is None)
        from ..fuse_ops import FuseOps
        from ..stale_attrs import StaleAttributes
        ops = FuseOps(overlay, listings=cfg.listings, opens=cfg.opens, xattrs=xattrs)
        # The kernel holds no attribute stale on a read-only mount: nothing to refresh there.
        stale_attrs = None if cfg.readonly else StaleAttributes(cfg.mountpoint,
                                                                overlay.attributes_settled)
        ops.stale_attrs = stale_attrs
        daemon = Daemon(cfg, lower, overlay, ops, service, stale_attrs, log_path,
                        root_daemon=owner is None)
        daemon._closing.push(closing.pop_all())
        return daemon


def _pin_lower(cfg: MountConfig) -> pin.PinnedDir:
    try:
        # Before the mount, which may cover the lower: the database code reaches it by this.
        return pin.PinnedDir(cfg.lower)
    except OSError as e:
        raise StartFailed(f"cannot open the lower {cfg.lower}: {e.strerror}", 1) from None


def _open_overlay(cfg: MountConfig, owner):
    """The merged view, with the upper taken for this daemon."""
    from ..overlay import Overlay
    from ..overlay.state import StateError, UpperInUse
    try:
        overlay = Overlay(cfg.lower, cfg.upper, owner=owner, privileged=owner is None,
                          readonly=cfg.readonly, ttl=cfg.ttl, max_nodes=cfg.max_nodes,
                          lower_timeout=cfg.lower_timeout or None)
    except (UpperInUse, StateError) as e:
        raise StartFailed(str(e), 2) from None
    except OSError as e:
        raise StartFailed(f"cannot open the layers: {e}", 1) from None
    try:
        overlay.state.lock()
    except (UpperInUse, StateError) as e:
        overlay.close()
        raise StartFailed(str(e), 2) from None
    except OSError as e:
        overlay.close()
        raise StartFailed(f"cannot open the layers: {e}", 1) from None
    return overlay


def _open_log(cfg: MountConfig, lower: pin.PinnedDir):
    """The daemon's log (by default in the upper's state folder): its path and handler."""
    from ..overlay import upperformat
    state_dir = upperformat.state_dir(cfg.upper)
    log_path = cfg.log_file or (None if cfg.foreground else os.path.join(state_dir, "nixfs.log"))
    try:
        log_file = logs.setup_daemon(log_path, cfg.debug)
    except OSError as e:
        raise StartFailed(logs.refusal(log_path, e), 2) from None
    for handler in logging.getLogger().handlers:
        handler.addFilter(lower.log_filter)
    return log_path, log_file


def _store_service(cfg: MountConfig, lower: pin.PinnedDir, overlay, log_file):
    """A Nix store's merged database prepared, and the service that follows the lower."""
    import apsw

    from ..nixdb.schema import SchemaError
    from ..nixdb.snapshot import SnapshotError
    from ..nixdb.storeview import NixStorePolicy, StoreService
    from ..nixdb.sync import StoreSync
    from ..nixdb.worker import SyncWorker
    from ..overlay import upperformat
    from ..overlay.dircache import ListingStore
    state_dir = upperformat.state_dir(cfg.upper)
    sync = StoreSync(lower.via, cfg.upper, state_dir)
    try:
        sync.prepare()  # on the upper directly: nothing can use it before the mount
    except SchemaError as e:
        raise StartFailed(lower.shown(str(e)), 2) from None
    except (SnapshotError, OSError, apsw.Error) as e:
        log.exception("preparing the merged store database failed")
        raise StartFailed(lower.shown(f"cannot prepare the merged store database: {e}"),
                          1) from None
    overlay.policy = NixStorePolicy(sync.index)
    overlay.dircache.store = ListingStore(os.path.join(state_dir, ListingStore.FILE))
    worker = SyncWorker(lower.via, cfg.upper, state_dir,
                        cfg.mountpoint, log_file, cfg.debug, keep_fds=(lower.fd,))
    return StoreService(worker, overlay, finish_pending=sync.unfinished())
