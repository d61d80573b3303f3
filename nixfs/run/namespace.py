"""The user and mount namespace ``nixfs run`` makes, and the new root with ``/nix`` in it.

Made by the runner itself (it keeps CAP_SYS_ADMIN there only until an exec), with
ctypes, not mount(8).  Where the kernel refuses, the error names the sysctl or the
seccomp profile to ask for, and what works without namespaces.
"""

import errno
import logging
import os
import stat

from .. import libc
from ..libc import CLONE_NEWNS, CLONE_NEWUSER, MNT_DETACH
from ..usage import UsageError

log = logging.getLogger(__name__)

MS_NOSUID, MS_NODEV, MS_BIND, MS_REC, MS_SLAVE = 0x2, 0x4, 0x1000, 0x4000, 0x80000


class RunError(UsageError):
    """The environment cannot give us a private /nix: exit code 2, with what to enable."""


def _call(what: str, call, *args) -> None:
    """*call*, its OSError naming *what* it was doing."""
    try:
        call(*args)
    except OSError as e:
        raise OSError(e.errno, f"{what}: {e.strerror}") from None


def mount(source: str | None, target: str, fstype: str | None, flags: int,
           data: str | None = None) -> None:
    enc = (lambda s: s.encode() if s is not None else None)
    _call(f"mount {target}", libc.mount, enc(source), enc(target), enc(fstype), flags, enc(data))


def umount_lazy(target: str) -> None:
    _call(f"umount {target}", libc.umount2, target.encode(), MNT_DETACH)



def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def fallback_hint(lower: str, upper: str) -> str:
    """What still works without user namespaces: a mount at a path the user owns."""
    return ("  without them, mount where you may and tell Nix where the store is:\n"
            f"    mkdir -p ~/nixroot/nix && nixfs mount --lower {lower} --upper {upper} "
            "~/nixroot/nix\n"
            "    nix-build --store \"local?root=$HOME/nixroot\" ...   "
            "# store paths still read /nix/store/...\n"
            "    nixfs umount ~/nixroot/nix")


def _userns_error(cfg, reason: str) -> RunError:
    return RunError(
        f"cannot make a user namespace ({reason}): user namespaces are off here. An admin "
        "turns them on with 'sysctl -w user.max_user_namespaces=15000' (and "
        "'sysctl -w kernel.unprivileged_userns_clone=1' where that exists; on Ubuntu also "
        "'kernel.apparmor_restrict_unprivileged_userns=0'); in a container the seccomp "
        "profile must allow unshare.\n" + fallback_hint(cfg.lower, cfg.upper))


def _refused_userns_error(cfg, reason: str) -> RunError:
    return RunError(
        f"cannot make a user namespace ({reason}), though the kernel's settings allow them: "
        "a seccomp profile refuses unshare (Docker's default does without CAP_SYS_ADMIN), or "
        "this process runs inside a chroot (where the kernel refuses them). In a container, "
        "ask for the runtime's default seccomp profile of containers-common or CRI-O "
        "(RuntimeDefault under OKD), which allows unshare, mount, umount2 and pivot_root "
        "with every capability dropped, or a custom profile adding them.\n"
        + fallback_hint(cfg.lower, cfg.upper))


def check_user_namespaces(cfg) -> None:
    """Fail early, naming the sysctl, where the kernel will refuse a user namespace."""
    if _read("/proc/sys/user/max_user_namespaces") == "0":
        raise _userns_error(cfg, "user.max_user_namespaces is 0")
    if os.geteuid() != 0 and _read("/proc/sys/kernel/unprivileged_userns_clone") == "0":
        raise _userns_error(cfg, "kernel.unprivileged_userns_clone is 0")


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def enter_namespace(cfg) -> None:
    """Unshare a user and mount namespace in which this process keeps the user's own uid
    and gid (mapped to themselves, not to root) and may mount."""
    uid, gid = os.geteuid(), os.getegid()
    try:
        libc.unshare(CLONE_NEWUSER | CLONE_NEWNS)
    except OSError as err:
        e = err.errno
        reason = f"unshare: {errno.errorcode.get(e, e)}, {os.strerror(e)}"
        if e in (errno.EPERM, errno.ENOSYS):  # the sysctls allow them (checked before)
            raise _refused_userns_error(cfg, reason) from None
        raise _userns_error(cfg, reason) from None
    try:
        _write("/proc/self/setgroups", "deny")  # an unprivileged gid_map needs this first
        try:
            _write("/proc/self/uid_map", f"{uid} {uid} 1")
        except PermissionError:
            if uid == 0:  # mapping uid 0 needs CAP_SETFCAP (Linux >= 5.12)
                raise RunError(
                    "cannot map uid 0 into a user namespace: that needs CAP_SETFCAP, which "
                    "this process lacks (a container's root with its capabilities dropped). "
                    "Run the container as a non-root user (runAsNonRoot, as OKD does), or "
                    "keep CAP_SETFCAP.") from None
            raise
        _write("/proc/self/gid_map", f"{gid} {gid} 1")
        # Nothing mounted here reaches the host; what the host mounts later (autofs,
        # NFS home directories) still shows here.
        mount(None, "/", None, MS_REC | MS_SLAVE)
    except OSError as e:
        raise _userns_error(cfg, f"the new namespace refuses to be set up: {e}") from None


def build_root(base: str) -> str:
    """A new root under *base*: every top-level entry of / bound (symlinks copied), and an
    empty ``nix``, whether or not the host has one.  Returns its path."""
    # A tmpfs of our own (private runtime records, nothing left on disk), and the root on
    # another one inside it.
    mount("tmpfs", base, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0700")
    root = os.path.join(base, "root")
    os.mkdir(root)
    mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755")
    for name in sorted(os.listdir("/")):
        if name == "nix":
            continue
        src, dst = "/" + name, os.path.join(root, name)
        st = os.lstat(src)
        if stat.S_ISLNK(st.st_mode):
            os.symlink(os.readlink(src), dst)
            continue
        if stat.S_ISDIR(st.st_mode):
            os.mkdir(dst)
        else:
            os.close(os.open(dst, os.O_CREAT | os.O_WRONLY, 0o600))
        try:
            mount(src, dst, None, MS_BIND | MS_REC)
        except OSError as e:
            raise RunError(f"cannot bind {src} into the new root: {e}") from None
    os.mkdir(os.path.join(root, "nix"), 0o755)
    # The bound copy of the folder holding the new root would show the root inside
    # itself (a loop for find and du): detach that copy.
    copy = os.path.join(root, base.lstrip("/"), "root")
    try:
        umount_lazy(copy)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOENT):
            log.warning("cannot hide %s: %s", copy, e)
    return root
