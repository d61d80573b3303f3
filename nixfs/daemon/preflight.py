"""Everything a user can get wrong about a mount, checked before anything is started.

A mount refused here costs nothing: no daemon forked, no upper touched.  Each refusal is
one line saying what to do (a UsageError, exit code 2).
"""

import os
import shutil
import stat

from .. import pin, runtime
from ..config import MountConfig, check_values
from ..usage import UsageError, check_dir, is_within


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


def is_nix_store(cfg: MountConfig) -> bool:
    from ..nixdb.files import is_nix_store as holds_nix_store
    return cfg.nix and holds_nix_store(cfg.lower)


def check(cfg: MountConfig) -> None:
    """Raise UsageError for anything that would stop the mount; make the config's paths
    canonical and its values their types."""
    lower, upper = _check_layers(cfg)
    mnt = runtime.canonical(cfg.mountpoint)
    _check_no_nixfs_at(mnt, cfg.mountpoint)
    if not os.path.lexists(mnt):
        raise UsageError(f"mountpoint {cfg.mountpoint} does not exist")
    if os.path.islink(mnt) or not os.path.isdir(mnt):
        raise UsageError(f"mountpoint {cfg.mountpoint} is not a directory")
    _check_layers_against(os.path.realpath(mnt), cfg.mountpoint, lower, upper)
    check_fuse_device()
    _check_sharing(cfg)
    check_values(cfg)
    cfg.lower, cfg.upper, cfg.mountpoint = lower, upper, mnt
    if cfg.readonly and is_nix_store(cfg):
        raise UsageError("a Nix store mount cannot be read-only: Nix takes its GC lock and "
                         "writes its database through it (--no-nix mounts the files read-only)")


def _check_layers(cfg: MountConfig) -> tuple[str, str]:
    """The canonical lower and upper: directories this process may use, apart."""
    lower = check_dir(cfg.lower, "lower", writable=False)
    upper = check_dir(cfg.upper, "upper", writable=True)
    if lower == upper:
        raise UsageError("lower and upper are the same directory")
    if is_within(upper, lower):
        raise UsageError(f"the upper {upper} is inside the lower {lower}")
    if is_within(lower, upper):
        raise UsageError(f"the lower {lower} is inside the upper {upper}")
    return lower, upper


def _check_sharing(cfg: MountConfig) -> None:
    """Who may use the mount, and whether this user may mount at all."""
    shared = cfg.options & {"allow_other", "allow_root"}
    if "owner_only" in cfg.options and shared:
        raise UsageError(f"owner_only and {' and '.join(sorted(shared))} contradict each other")
    if not may_mount():
        if shutil.which("fusermount3") is None:
            raise UsageError("fusermount3 not found: install the fuse3 package "
                             "(apt-get install fuse3); ordinary users mount through it")
        if shared and not _user_allow_other():
            raise UsageError("allow_other needs 'user_allow_other' in /etc/fuse.conf "
                             "for an ordinary user")


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


def _user_allow_other() -> bool:
    try:
        with open("/etc/fuse.conf") as f:
            return any(line.split("#")[0].strip() == "user_allow_other" for line in f)
    except OSError:
        return False
