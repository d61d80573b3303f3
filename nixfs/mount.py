"""A mount's lifecycle: checks, the daemon, signals, clean unmount.

``mount()`` checks everything a user can get wrong before anything is started,
then forks the daemon and returns once the file system answers (or keeps it in
the foreground).  The daemon runs one trio nursery: the FUSE loop and the
signal handler.  On SIGTERM/SIGINT or an unmount it closes every file, syncs
the upper and exits, so ``nixfs umount`` can wait for that.
"""

import errno
import gc
import logging
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from dataclasses import dataclass, field

from . import libc, logs, pin, runtime
from .usage import UsageError, check_dir, is_within

log = logging.getLogger("nixfs")

# Mount options nixfs hands to FUSE / the kernel.
FUSE_OPTIONS = {
    "allow_other", "allow_root", "auto_unmount", "ro", "rw", "suid", "nosuid", "dev", "nodev",
    "exec", "noexec", "atime", "noatime", "diratime", "nodiratime", "relatime", "norelatime",
    "strictatime", "nostrictatime", "lazytime", "nolazytime", "sync", "async", "dirsync",
}
# nixfs' own flags: owner_only keeps a root mount to root (a root mount is for everyone).
OWN_FLAGS = {"owner_only"}
# How long the daemon polls for the next request after answering one (-o poll_us=): a
# cold tree walk's caller often takes more than 100 µs between requests (the kernel
# builds a listing's dentries, its worker threads want the CPU too).
DEFAULT_POLL_US = 250
# nixfs' own -o key=value options that set the MountConfig field of the same name.
VALUE_FIELDS = ("ttl", "max_nodes", "listings", "opens", "lower_timeout", "poll_us", "xattr")
# What mount(8) and fstab add that is not for the file system.
IGNORED_OPTIONS = {"defaults", "auto", "noauto", "user", "users", "nouser", "owner", "group",
                   "nofail", "_netdev", "default_permissions"}


@dataclass
class MountConfig:
    lower: str
    upper: str
    mountpoint: str
    options: set[str] = field(default_factory=set)
    foreground: bool = False
    debug: bool = False
    log_file: str | None = None
    ttl: float = 1.0
    nix: bool = True  # treat a lower holding store/ and var/nix/db as a Nix store
    max_nodes: int = 100_000  # inodes kept before asking the kernel to forget old ones
    listings: str = "best"  # which directory listings the kernel keeps: kernel/fixed/none
    opens: str = "best"  # who keeps opens of files: kernel (no OPEN/RELEASE) or nixfs
    quiet: bool = False  # no announcement on stdout (nixfs run: stdout is the command's)
    exit_with_parent: bool = False  # the daemon unmounts when the process that mounted dies
    # Seconds a lower call may take before it fails with EIO (a hung NFS server must not
    # hang the mount); 0 waits forever.
    lower_timeout: float = 30.0
    # Microseconds the daemon polls /dev/fuse for the next request before sleeping (a
    # round trip without a wake-up is several times faster); -1: decide by the CPUs.
    poll_us: int = -1
    # Extended attributes through the mount: "on", "off" (the kernel is told once that there
    # are none and never asks again), or "auto": off for a Nix store, on otherwise.
    xattr: str = "auto"

    @property
    def readonly(self) -> bool:
        return "ro" in self.options

    @classmethod
    def from_values(cls, values: dict, **fields) -> "MountConfig":
        """A config with the -o key=value options in *values* (as given: checked when mounting)."""
        given = {k: values[k] for k in VALUE_FIELDS if k in values}
        return cls(**given, **fields)


def parse_options(text: str, cfg_values: dict) -> set[str]:
    """Split ``-o a,b=c`` into FUSE options; nixfs' own ``key=value`` go to *cfg_values*."""
    out = set()
    for opt in filter(None, (o.strip() for o in text.split(","))):
        key, _, value = opt.partition("=")
        if key in ("lowerdir", "upperdir", "nix", *VALUE_FIELDS):
            cfg_values[key] = value
        elif opt in FUSE_OPTIONS or opt in OWN_FLAGS:
            out.add(opt)
        elif opt in IGNORED_OPTIONS or key in ("comment", "fsname", "subtype") or key.startswith("x-"):
            continue
        else:
            raise UsageError(f"unknown mount option: {opt}")
    return out


# ------------------------------------------------------------------ checks

def privileged() -> bool:
    """Real root: may keep and show every owner.  Root in a user namespace that
    maps only one user is treated like that user."""
    if os.geteuid() != 0:
        return False
    try:
        with open("/proc/self/uid_map") as f:
            return f.read().split() == ["0", "0", "4294967295"]
    except OSError:
        return True


def may_mount() -> bool:
    """Whether this process may call mount(2) itself: root, or the owner of its user and
    mount namespaces (``nixfs run``), whose effective set has CAP_SYS_ADMIN."""
    if os.geteuid() == 0:
        return True
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> 21 & 1)  # CAP_SYS_ADMIN
    except (OSError, ValueError):
        pass
    return False


def check_fuse_device(path: str = "/dev/fuse") -> None:
    """Raise UsageError, saying what to enable, unless *path* is a usable FUSE device."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise UsageError(f"{path} does not exist: load the fuse module (modprobe fuse), or in a "
                         "container pass the device in (docker/podman --device /dev/fuse; in "
                         "Kubernetes a device plugin, or on CRI-O the pod annotation "
                         "io.kubernetes.cri-o.Devices: /dev/fuse)") from None
    if not stat.S_ISCHR(st.st_mode) or (os.major(st.st_rdev), os.minor(st.st_rdev)) != (10, 229):
        raise UsageError(f"{path} is not the FUSE device (character device 10:229): pass the "
                         "host's /dev/fuse in (docker/podman --device /dev/fuse)")
    if not os.access(path, os.R_OK | os.W_OK):
        raise UsageError(f"{path} is not accessible to this user: as root run "
                         "'chmod 666 /dev/fuse' (or add the user to the group that owns it)")


def check(cfg: MountConfig) -> None:
    """Raise UsageError for anything that would stop the mount."""
    lower = check_dir(cfg.lower, "lower", writable=False)
    upper = check_dir(cfg.upper, "upper", writable=True)
    if lower == upper:
        raise UsageError("lower and upper are the same directory")
    if is_within(upper, lower):
        raise UsageError(f"the upper {upper} is inside the lower {lower}")
    if is_within(lower, upper):
        raise UsageError(f"the lower {lower} is inside the upper {upper}")
    mnt = runtime.canonical(cfg.mountpoint)
    _check_no_nixfs_at(mnt, cfg.mountpoint)
    if not os.path.lexists(mnt):
        raise UsageError(f"mountpoint {cfg.mountpoint} does not exist")
    if os.path.islink(mnt) or not os.path.isdir(mnt):
        raise UsageError(f"mountpoint {cfg.mountpoint} is not a directory")
    _check_layers_against(os.path.realpath(mnt), cfg.mountpoint, lower, upper)
    check_fuse_device()
    shared = cfg.options & {"allow_other", "allow_root"}
    if "owner_only" in cfg.options and shared:
        raise UsageError(f"owner_only and {' and '.join(sorted(shared))} contradict each other")
    if not may_mount():
        if shutil.which("fusermount3") is None:
            raise UsageError("fusermount3 not found: install the fuse3 package "
                             "(apt-get install fuse3); ordinary users mount through it")
        if ("allow_other" in cfg.options or "allow_root" in cfg.options) and not _user_allow_other():
            raise UsageError("allow_other needs 'user_allow_other' in /etc/fuse.conf "
                             "for an ordinary user")
    try:
        cfg.ttl = float(cfg.ttl)
    except ValueError:
        raise UsageError(f"ttl must be a number of seconds, not {cfg.ttl!r}") from None
    try:
        cfg.lower_timeout = float(cfg.lower_timeout)
        if not cfg.lower_timeout >= 0 or cfg.lower_timeout == float("inf"):
            raise ValueError
    except ValueError:
        raise UsageError(f"lower_timeout must be a number of seconds (0: wait forever), not "
                         f"{cfg.lower_timeout!r}") from None
    if cfg.listings not in ("best", "kernel", "fixed", "none"):
        raise UsageError(f"listings must be kernel, fixed or none, not {cfg.listings!r}")
    if cfg.opens not in ("best", "kernel", "nixfs"):
        raise UsageError(f"opens must be kernel or nixfs, not {cfg.opens!r}")
    try:
        cfg.max_nodes = int(cfg.max_nodes)
        if cfg.max_nodes < 100:
            raise ValueError
    except ValueError:
        raise UsageError(f"max_nodes must be a whole number of at least 100, not "
                         f"{cfg.max_nodes!r}") from None
    if cfg.xattr not in ("auto", "on", "off"):
        raise UsageError(f"xattr must be on or off, not {cfg.xattr!r}")
    try:
        cfg.poll_us = int(cfg.poll_us)
        if not -1 <= cfg.poll_us <= 10_000:
            raise ValueError
    except ValueError:
        raise UsageError(f"poll_us must be a whole number of microseconds from 0 to 10000, "
                         f"not {cfg.poll_us!r}") from None
    cfg.lower, cfg.upper, cfg.mountpoint = lower, upper, mnt
    if cfg.readonly and is_nix_store(cfg):
        raise UsageError("a Nix store mount cannot be read-only: Nix takes its GC lock and "
                         "writes its database through it (--no-nix mounts the files read-only)")


def _check_no_nixfs_at(mnt: str, given: str) -> None:
    """Any mount may be covered (a partition, a bind mount, NFS), as the kernel allows, but
    not a nixfs: its daemon would go on serving a mount nobody can reach by its path, and
    ``nixfs status/umount`` would find only the new one."""
    entry = runtime.find_mount(mnt)
    if entry is None or entry.fstype != runtime.FSTYPE:
        return
    info = runtime.read_record(mnt)
    who = (f"its daemon is pid {info['pid']}, lower {info['lower']}" if info else
           "its daemon is gone or another user's")
    raise UsageError(f"mountpoint {given} is a nixfs mount already ({who}): unmount it first")


def _check_layers_against(real_mnt: str, given: str, lower: str, upper: str) -> None:
    """The mount may cover its lower (opened before it covers it), never its upper,
    which nixfs goes on writing by name, nor sit inside either layer."""
    for layer, what in ((lower, "lower"), (upper, "upper")):
        if real_mnt != layer and is_within(real_mnt, layer):
            raise UsageError(f"mountpoint {given} is inside the {what} {layer}")
    if is_within(upper, real_mnt):
        where = "is the mountpoint" if upper == real_mnt else f"is inside the mountpoint {given}"
        raise UsageError(f"the upper {upper} {where}: the mount would hide it from nixfs")
    if is_within(lower, real_mnt) and not pin.proc_available():
        raise UsageError(f"the mount would cover the lower {lower}: nixfs then reaches it "
                         "through /proc/self/fd, and /proc is not mounted here")


def _fuse_options(cfg: MountConfig, *, root_daemon: bool) -> set[str]:
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


def _main_args(cfg: MountConfig) -> dict:
    """pyfuse3.main's arguments: polling where the patched pyfuse3 offers it.

    Polling only pays where the process sending requests runs beside the daemon: with
    one CPU the daemon's polling would take the time that process needs.
    """
    from .fuse import features as fuse_features
    if not fuse_features.FEATURES.poll_before_sleep:
        return {}
    poll_us = cfg.poll_us
    if poll_us < 0:
        poll_us = DEFAULT_POLL_US if len(os.sched_getaffinity(0)) > 1 else 0
    return {"poll_us": poll_us}


def _user_allow_other() -> bool:
    try:
        with open("/etc/fuse.conf") as f:
            return any(line.split("#")[0].strip() == "user_allow_other" for line in f)
    except OSError:
        return False


# ------------------------------------------------------------------ mounting

def is_nix_store(cfg: MountConfig) -> bool:
    from .nixdb.files import is_nix_store as holds_nix_store
    return cfg.nix and holds_nix_store(cfg.lower)


def store_uri(mountpoint: str) -> str:
    """How a stock Nix reaches the store mounted at *mountpoint* (``.../nix``)."""
    from .nixdb.gc import nix_store_args
    args = nix_store_args(mountpoint)
    return f"--store '{args[1]}'" if args else "/nix (the default store)"


def mount(cfg: MountConfig) -> int:
    """Check, then serve *cfg* in the foreground or from a daemon; return the exit code."""
    check(cfg)
    nix = is_nix_store(cfg)

    def announce():
        if nix and not cfg.quiet:
            print(f"nixfs: {cfg.mountpoint} merges the Nix store {cfg.lower}; Nix uses it with "
                  f"{store_uri(cfg.mountpoint)}", flush=True)

    if cfg.foreground:
        return serve(cfg, ready_fd=None, on_ready=announce)
    r, w = os.pipe()
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:  # the daemon
        os.close(r)
        os.setsid()
        code = 1
        try:
            if cfg.exit_with_parent:
                _exit_with(parent)
            code = serve(cfg, ready_fd=w)
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as pipe:
        answer = pipe.read().decode(errors="replace").strip()
    if answer == "ok":
        announce()
        return 0
    code, _, message = answer.partition(":")
    if not message:
        _, status = os.waitpid(pid, 0)
        code, message = "1", f"the daemon exited with status {os.waitstatus_to_exitcode(status)}"
    print(f"nixfs: {message}", file=sys.stderr)
    return int(code)


def _exit_with(parent: int) -> None:
    """Get SIGTERM (and so unmount) when *parent* dies: nothing else would end a mount in
    a namespace whose other processes are gone."""
    libc.set_parent_death_signal(signal.SIGTERM)
    if os.getppid() != parent:
        raise SystemExit(1)


def _detach_stdio() -> None:
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)


def _tune_collector() -> None:
    """Fit Python's cycle collector to a daemon whose objects are long-lived and made
    by the ten thousand (nodes, listings).  By default it runs every 700 allocations
    and goes through all survivors again each time they grew by a quarter: about 15 %
    of the request handling of a cold walk here.  Start-up's objects (modules, the
    layers) are left out of every collection."""
    gc.freeze()
    # Allocations before a young collection; young collections before a middle one;
    # middle ones before a full one (which still waits for a quarter's growth).
    gc.set_threshold(50_000, 20, 10)


def serve(cfg: MountConfig, ready_fd: int | None, on_ready=None) -> int:
    """Mount and answer requests until unmounted or signalled."""
    import apsw
    import trio

    from .fuse import session
    from .fuse.ops import FuseOps
    from .nixdb.schema import SchemaError
    from .nixdb.snapshot import SnapshotError
    from .nixdb.storepolicy import NixStorePolicy
    from .nixdb.storeservice import StoreService
    from .nixdb.sync import StoreSync
    from .nixdb.worker import SyncWorker
    from .overlay import Overlay
    from .overlay.dircache import ListingStore
    from .overlay import upperformat
    from .overlay.state import StateError, UpperInUse
    from .fuse.stale_attrs import StaleAttributes

    def report(message: str, code: int = 0) -> int:
        """Tell the waiting parent how the start went; return *code*."""
        if ready_fd is not None:
            os.write(ready_fd, (f"{code}:{message}" if code else "ok").encode())
            os.close(ready_fd)
        elif code:
            print(f"nixfs: {message}", file=sys.stderr)
        elif on_ready is not None:
            on_ready()
        return code

    owner = None if privileged() else (os.geteuid(), os.getegid())
    try:
        # Before the mount, which may cover the lower: the database code reaches it by this.
        lower = pin.PinnedDir(cfg.lower)
    except OSError as e:
        return report(f"cannot open the lower {cfg.lower}: {e.strerror}", 1)
    try:
        overlay = Overlay(cfg.lower, cfg.upper, owner=owner, privileged=owner is None,
                          readonly=cfg.readonly, ttl=cfg.ttl, max_nodes=cfg.max_nodes,
                          lower_timeout=cfg.lower_timeout or None)
        overlay.state.lock()
    except (UpperInUse, StateError) as e:
        lower.close()
        return report(str(e), 2)
    except OSError as e:
        lower.close()
        return report(f"cannot open the layers: {e}", 1)
    state_dir = upperformat.state_dir(cfg.upper)
    log_path = cfg.log_file or (None if cfg.foreground else os.path.join(state_dir, "nixfs.log"))
    try:
        log_file = logs.setup_daemon(log_path, cfg.debug)
    except OSError as e:
        overlay.close()
        lower.close()
        return report(logs.refusal(log_path, e), 2)
    for handler in logging.getLogger().handlers:
        handler.addFilter(lower.log_filter)
    recovered = overlay.state.recover()
    if recovered:
        log.warning("removed %d leftovers of an interrupted daemon from the work folder",
                    len(recovered))
    service = None
    if is_nix_store(cfg):
        sync = StoreSync(lower.via, cfg.upper, state_dir)
        try:
            sync.prepare()  # on the upper directly: nothing can use it before the mount
        except SchemaError as e:
            overlay.close()
            lower.close()
            return report(lower.shown(str(e)), 2)
        except (SnapshotError, OSError, apsw.Error) as e:
            overlay.close()
            lower.close()
            log.exception("preparing the merged store database failed")
            return report(lower.shown(f"cannot prepare the merged store database: {e}"), 1)
        policy = overlay.policy = NixStorePolicy(sync.index)
        overlay.dircache.store = ListingStore(os.path.join(state_dir, ListingStore.FILE))
        worker = SyncWorker(lower.via, cfg.upper, state_dir,
                            cfg.mountpoint, log_file, cfg.debug, keep_fds=(lower.fd,))
        service = StoreService(worker, overlay, policy.removed_paths(), finish_pending=sync.unfinished())
    # Nix removes every extended attribute from what it adds to a store (but SELinux labels,
    # which FUSE mounts get from the mount, not the file system): a Nix store has none to show.
    xattrs = cfg.xattr == "on" or (cfg.xattr == "auto" and service is None)
    ops = FuseOps(overlay, listings=cfg.listings, opens=cfg.opens, xattrs=xattrs)
    options = _fuse_options(cfg, root_daemon=owner is None)
    try:
        session.init(ops, cfg.mountpoint, options)
    except RuntimeError as e:
        overlay.close()
        lower.close()
        return report(f"mounting at {cfg.mountpoint} failed ({e}); see the messages above", 1)
    from . import control, status
    started = time.time()
    # The kernel holds no attribute stale on a read-only mount: nothing to refresh there.
    stale_attrs = None if cfg.readonly else StaleAttributes(cfg.mountpoint,
                                                            overlay.attributes_settled)
    ops.stale_attrs = stale_attrs

    main_args = _main_args(cfg)

    async def op_status():
        return await trio.to_thread.run_sync(lambda: status.collect(
            cfg=cfg, ops=ops, overlay=overlay, service=service, started=started,
            poll_us=main_args.get("poll_us", 0)))

    async def op_unhide(names):
        if service is None:
            raise ValueError("this mount is not a Nix store")
        return [n.decode() for n in await service.unhide([n.encode() for n in names])]

    async def op_sync():
        if service is not None:
            await service.step(force=True)
        return True

    async def op_pause(seconds=10.0):
        if stale_attrs is not None:
            await stale_attrs.pause(seconds)
        if service is not None:
            await service.pause(seconds)
        return True

    control_server = control.ControlServer(control.socket_path(cfg.mountpoint), {
        "status": op_status, "unhide": op_unhide, "sync": op_sync, "pause": op_pause})
    runtime.write_record(cfg.mountpoint, lower=cfg.lower, upper=cfg.upper,
                         control=control_server.path, nix=service is not None)

    async def announce():
        """The mount is usable: tell the parent (and the user)."""
        if service is not None:
            try:
                await service.start()
            except Exception as e:
                report(f"cannot take Nix's GC lock through the mount: {e}", 1)
                raise
        log.info("mounted %s (lower %s, upper %s)", cfg.mountpoint, cfg.lower, cfg.upper)
        report("ok")
        if ready_fd is not None and log_path is not None:
            _detach_stdio()

    unmount = False
    try:
        async def main():
            nonlocal unmount
            async with trio.open_nursery() as nursery:
                async def on_signals():
                    nonlocal unmount
                    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT,
                                                   signal.SIGHUP) as signals:
                        async for signum in signals:
                            log.info("signal %d: unmounting", signum)
                            unmount = True
                            if service is not None:
                                await service.stop()  # its I/O goes through the mount
                            session.terminate()
                            return
                nursery.start_soon(on_signals)
                if stale_attrs is not None:
                    nursery.start_soon(stale_attrs.run)
                await nursery.start(control_server.serve)

                async def start():
                    await announce()
                    if service is not None:
                        nursery.start_soon(service.run)
                nursery.start_soon(start)
                await session.main(**main_args)
                nursery.cancel_scope.cancel()
            await overlay.sync()
        _tune_collector()
        trio.run(main)
    except BaseException:
        log.exception("the daemon failed")
        unmount = True
        raise
    finally:
        if service is not None:
            service.worker.stop()
        session.close(unmount=unmount)
        overlay.close()
        lower.close()
        runtime.remove_record(cfg.mountpoint)
        log.info("unmounted %s", cfg.mountpoint)
    return 0


# ------------------------------------------------------------------ unmounting

def _umount2(path: str, flags: int) -> int:
    try:
        libc.umount2(path.encode(), flags)
    except OSError as e:
        return e.errno
    return 0


def umount(mountpoint: str, *, lazy: bool = False, timeout: float = 600.0) -> int:
    """Unmount a nixfs mount and wait until its daemon has written everything out;
    refuse at once, naming them, while processes use it (unless *lazy*)."""
    from . import holders
    mnt = runtime.canonical(mountpoint)
    entry = runtime.find_mount(mnt)
    if entry is None:
        raise UsageError(f"{mountpoint} is not mounted")
    if entry.fstype != runtime.FSTYPE:
        raise UsageError(f"{mountpoint} is not a nixfs mount (it is {entry.fstype})")
    info = runtime.read_record(mnt)
    daemon = {info["pid"]} if info else set()
    users = [h for h in holders.find(entry, spare=daemon) if not h.only_a_copy]
    if users and not lazy:
        raise UsageError(f"{mountpoint} is busy: {holders.describe(users)} (stop them, or "
                         "detach it now with --lazy)")
    _pause(mnt, info)
    code = _detach(mountpoint, mnt) if lazy else _unmount(mountpoint, mnt, entry, daemon)
    if code or info is None:
        return code
    # Gone here; copies of it in other mount namespaces keep its daemon serving them.
    left = holders.lasting(entry, spare=daemon)
    if left:
        done = "detached" if lazy else "unmounted here"
        print(f"nixfs: {mountpoint} is {done}; its daemon (pid {info['pid']}) writes "
              f"everything out and exits once {holders.describe(left)} let go", file=sys.stderr)
        return 0
    _wait_for_exit(info["pid"], timeout)
    return 0


def _pause(mnt: str, info: dict | None) -> None:
    """Make the daemon's own database work and stats (stale_attrs) let go of the mount."""
    from . import control
    if info is not None:
        try:
            control.request(mnt, "pause")
        except control.ControlError:
            pass


def _unmount(mountpoint: str, mnt: str, entry, daemon: set[int]) -> int:
    """A plain unmount; the daemon itself may hold a file there for a moment."""
    from . import holders
    err = errno.EPERM
    if may_mount():
        for _ in range(20):
            err = _umount2(mnt, 0)
            if err != errno.EBUSY:
                break
            time.sleep(0.1)
    if err == errno.EBUSY:
        held = holders.find(entry, spare=daemon)
        who = holders.describe(held) if held else "processes this user cannot inspect"
        raise UsageError(f"{mountpoint} is busy: {who} (stop them, or detach it now with --lazy)")
    return _fusermount(mountpoint, mnt, lazy=False) if err else 0


def _detach(mountpoint: str, mnt: str) -> int:
    err = _umount2(mnt, libc.MNT_DETACH) if may_mount() else errno.EPERM
    return _fusermount(mountpoint, mnt, lazy=True) if err else 0


def _fusermount(mountpoint: str, mnt: str, *, lazy: bool) -> int:
    """An ordinary user unmounts through the setuid helper."""
    cmd = ["fusermount3", "-u"] + (["-z"] if lazy else []) + [mnt]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        message = proc.stderr.strip() or f"fusermount3 exited with {proc.returncode}"
        if "busy" in message.lower():
            raise UsageError(f"{mountpoint} is busy: {message} (or use --lazy)")
        print(f"nixfs: {message}", file=sys.stderr)
        return 1
    return 0


def _wait_for_exit(pid: int, timeout: float) -> None:
    import select
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        deadline = time.monotonic() + timeout
        warned = False
        while not poller.poll(1000):
            if not warned and time.monotonic() > deadline - timeout + 5:
                print(f"nixfs: waiting for the daemon (pid {pid}) to write everything out...",
                      file=sys.stderr)
                warned = True
            if time.monotonic() > deadline:
                raise UsageError(f"the daemon (pid {pid}) did not exit within {timeout:.0f} s")
    finally:
        os.close(pidfd)
