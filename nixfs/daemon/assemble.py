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
from dataclasses import dataclass

import apsw

from .. import logs, pin
from ..config import MountConfig
from ..fuse import features
from ..fuse.notifier import KernelNotifier
from ..fuse.ops import FuseOps, ListingSnapshots
from ..fuse.stale_attrs import StaleAttributes
from ..nixdb import cowfiles, reserved
from ..nixdb.schema import SchemaError
from ..nixdb.snapshot import SnapshotError
from ..nixdb.storepolicy import NixStorePolicy
from ..nixdb.storeservice import StoreService
from ..nixdb.sync import StoreSync
from ..nixdb.worker import SyncWorker
from ..overlay import Overlay, upperformat
from ..overlay.liststore import ListingStore
from ..overlay.lowerrunner import LowerRunner
from ..overlay.state import StateError, UpperInUse, UpperState
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
    lower: pin.PinnedDir  # the lower as it was before the mount covered it
    overlay: Overlay  # the merged view
    ops: FuseOps  # the pyfuse3 adapter over it
    policy: NixStorePolicy | None  # what a Nix store shows of its lower
    service: StoreService | None  # a Nix store's database work
    stale_attrs: StaleAttributes | None  # refreshes attributes the kernel's reads made stale
    log_path: str | None  # the daemon's log file (None: stderr)
    root_daemon: bool  # run by real root: a mount for every user, owners kept
    closing: contextlib.ExitStack  # closes what was built, in reverse

    def close(self) -> None:
        self.closing.close()


def assemble(cfg: MountConfig) -> Daemon:
    """Build every part of the mount of *cfg* (not mounted yet); StartFailed if one
    cannot be built (what was built is closed again).

    The order is the parts' needs: the upper is taken (locked) before anything is
    written there; a Nix store's database is prepared before the overlay, whose policy
    reads its index; the adapter last, over the overlay."""
    owner = None if privileged() else (os.geteuid(), os.getegid())
    with contextlib.ExitStack() as closing:
        lower = _pin_lower(cfg)
        closing.callback(lower.close)
        with contextlib.ExitStack() as until_overlay:
            state = _take_upper(cfg)
            until_overlay.callback(state.close)
            log_path, log_file = _open_log(cfg, lower)
            recovered = state.recover()
            if recovered:
                log.warning("removed %d leftovers of an interrupted daemon from the work "
                            "folder", len(recovered))
            # Every blocking call that may touch the lower runs here: the overlay's lower
            # calls, and a Nix store policy's reads of an index whose pages lie there.
            runner = LowerRunner(timeout=cfg.lower_timeout or None)
            store = (_prepare_store(cfg, lower, log_file, runner) if is_nix_store(cfg)
                     else None)
            if store is not None:
                closing.callback(store.db_dir.close)
                # After the overlay let go of every file (it closes first), at a clean end.
                closing.callback(store.sync.keep_own_rows)
                until_overlay.callback(store.listings.close)
            snapshots = ListingSnapshots()
            overlay = _open_overlay(cfg, owner, state, store, KernelNotifier(snapshots),
                                    runner)
            until_overlay.pop_all()  # the overlay owns the state now
        closing.callback(overlay.close)
        service = store.service(overlay) if store is not None else None
        # The kernel holds no attribute stale on a read-only mount: nothing to refresh there.
        refresh = not cfg.readonly and cfg.refresh_attrs == "on"
        stale_attrs = (StaleAttributes(cfg.mountpoint, overlay.attributes_settled) if refresh
                       else None)
        # Nix removes every extended attribute from what it adds to a store (but SELinux
        # labels, which FUSE mounts get from the mount, not the file system): a Nix store
        # has none to show.
        xattrs = cfg.xattr == "on" or (cfg.xattr == "auto" and service is None)
        ops = FuseOps(overlay, snapshots, listings=cfg.listings, opens=cfg.opens, xattrs=xattrs,
                      stale_attrs=stale_attrs)
        return Daemon(cfg, lower, overlay, ops, store.policy if store else None, service,
                      stale_attrs, log_path, root_daemon=owner is None, closing=closing.pop_all())


def _pin_lower(cfg: MountConfig) -> pin.PinnedDir:
    try:
        # Before the mount, which may cover the lower: the database code reaches it by this.
        return pin.PinnedDir(cfg.lower)
    except OSError as e:
        raise StartFailed(f"cannot open the lower {cfg.lower}: {e.strerror}", 1) from None


def _take_upper(cfg: MountConfig):
    """The upper's state folder, locked for this daemon (UpperInUse if another has it)."""
    try:
        state = UpperState.open(cfg.upper)
    except StateError as e:
        raise StartFailed(str(e), 2) from None
    except OSError as e:
        raise StartFailed(f"cannot open the layers: {e}", 1) from None
    try:
        state.lock()
    except UpperInUse as e:
        state.close()
        raise StartFailed(str(e), 2) from None
    except OSError as e:
        state.close()
        raise StartFailed(f"cannot open the layers: {e}", 1) from None
    return state


def _open_overlay(cfg: MountConfig, owner, state, store, notify, runner: LowerRunner):
    """The merged view of the layers, over the taken upper *state*."""
    try:
        return Overlay(cfg.lower, cfg.upper, owner=owner, privileged=owner is None,
                       readonly=cfg.readonly, ttl=cfg.ttl, max_nodes=cfg.max_nodes,
                       lower_runner=runner, state=state, notify=notify,
                       policy=store.policy if store else None,
                       listings=store.listings if store else None,
                       nodeless_listings=features.FEATURES.readdir_without_node)
    except StateError as e:
        raise StartFailed(str(e), 2) from None
    except OSError as e:
        raise StartFailed(f"cannot open the layers: {e}", 1) from None


def _open_log(cfg: MountConfig, lower: pin.PinnedDir):
    """The daemon's log (by default in the upper's state folder): its path and handler."""
    state_dir = upperformat.state_dir(cfg.upper)
    log_path = cfg.log_file or (None if cfg.foreground else os.path.join(state_dir, "nixfs.log"))
    try:
        log_file = logs.setup_daemon(log_path, cfg.debug)
    except OSError as e:
        raise StartFailed(logs.refusal(log_path, e), 2) from None
    for handler in logging.getLogger().handlers:
        handler.addFilter(lower.log_filter)
    return log_path, log_file


class _Store:
    """A Nix store's parts, built before the overlay: its policy (over the prepared lower
    index), its listing store, and the worker of the service built after it."""

    def __init__(self, cfg: MountConfig, lower: pin.PinnedDir, db_dir: pin.PinnedDir, sync,
                 state_dir: str, log_file, runner: LowerRunner):
        self.sync = sync
        self.db_dir = db_dir  # the pinned var/nix/db the sync and its worker use
        self.finish_pending = sync.unfinished()
        self.policy = NixStorePolicy(sync.index,
                                     run=runner.run if sync.index.on_lower else None)
        self.listings = _listings(os.path.join(state_dir, ListingStore.FILE), lower.via)
        self.worker = SyncWorker(lower.via, cfg.upper, state_dir, cfg.mountpoint, log_file,
                                 cfg.debug, keep_fds=(lower.fd, db_dir.fd), db_dir=db_dir.via)

    def service(self, overlay):
        """The service that follows the lower store through *overlay*; it hides in the
        database what the policy hears was removed through the mount."""
        return StoreService(self.worker, overlay, self.policy.removed_paths(),
                            finish_pending=self.finish_pending, generation=self.sync.generation)


def _listings(path: str, lower: str) -> ListingStore:
    """The upper's cached listings; a copy-on-write one whose map or base cannot be read
    is a cache lost: made again, empty (one warning)."""
    try:
        return ListingStore(path, cow_root=lower)
    except OSError as e:
        log.warning("the cached listings %s cannot be read (%s): starting them afresh", path, e)
        cowfiles.remove(path)
        return ListingStore(path, cow_root=lower)


def _pin_db_dir(cfg: MountConfig, lower: pin.PinnedDir) -> pin.PinnedDir:
    """The lower's var/nix/db, pinned: the database code opens and polls its files all the
    time, each open then one lookup on the lower, not one per level of the path."""
    try:
        pinned = pin.PinnedDir(os.path.join(lower.via, "var/nix/db"),
                               shown_as=os.path.join(cfg.lower, "var/nix/db"))
    except OSError as e:
        raise StartFailed(f"cannot open {cfg.lower}/var/nix/db: {e.strerror}", 1) from None
    for handler in logging.getLogger().handlers:
        handler.addFilter(pinned.log_filter)
    return pinned


def _prepare_store(cfg: MountConfig, lower: pin.PinnedDir, log_file,
                   runner: LowerRunner) -> _Store:
    """A Nix store's merged database prepared (in the upper directly: nothing can use it
    before the mount), and the parts built on it."""
    state_dir = upperformat.state_dir(cfg.upper)
    db_dir = _pin_db_dir(cfg, lower)
    sync = StoreSync(lower.via, cfg.upper, state_dir, generation=cfg.generation,
                     db_dir=db_dir.via)
    try:
        sync.prepare()
    except SchemaError as e:
        db_dir.close()
        raise StartFailed(lower.shown(db_dir.shown(str(e))), 2) from None
    except (SnapshotError, OSError, apsw.Error) as e:
        log.exception("preparing the merged store database failed")
        db_dir.close()
        raise StartFailed(lower.shown(db_dir.shown(
            f"cannot prepare the merged store database: {e}")), 1) from None
    reserved.make(sync.files.merged_dir)  # else Nix's first command writes it through FUSE
    return _Store(cfg, lower, db_dir, sync, state_dir, log_file, runner)
