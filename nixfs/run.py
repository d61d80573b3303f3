"""``nixfs run``: one command with a private ``/nix``, for an ordinary user.

Users on clusters, CI runners and pods cannot mount at ``/nix``, and the host
may have no ``/nix`` at all.  So this process enters a new user and mount
namespace of its own (no setuid helper), builds a new root there out of bind
mounts of the host's top-level entries plus an empty ``/nix``, mounts nixfs on
it and runs the command chrooted into that root with the user's own uid,
environment and working directory.  Only this namespace ever sees the mounts:
they go away with its last process, also when something fails.

Who does what, all inside the namespace:

- this process (the *runner*) keeps the host's root, so the daemon's paths and
  ``nixfs umount`` work as for any mount; it forwards signals to the command,
  then unmounts and waits for the daemon, and exits with the command's code;
- the daemon, forked by ``mount.mount``, also keeps the host's root, where the
  lower is still the host's (even if that is the host's ``/nix``); it gets
  SIGTERM (and unmounts) if the runner dies;
- the command, forked and chrooted into the new root; it gets SIGKILL if the
  runner dies.

Mounting needs CAP_SYS_ADMIN in the namespace, which only lasts until exec:
so every mount is made in this process or in forks of it (ctypes, not
mount(8)), and the command runs with no capabilities, as the user.
"""

import ctypes
import ctypes.util
import errno
import logging
import os
import signal
import stat
import sys
from dataclasses import dataclass, field

from . import runtime
from .mount import MountConfig, UsageError, check_fuse_device, mount, umount

log = logging.getLogger(__name__)

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
MS_NOSUID, MS_NODEV, MS_BIND, MS_REC, MS_SLAVE = 0x2, 0x4, 0x1000, 0x4000, 0x80000
MNT_DETACH = 2
PR_SET_PDEATHSIG = 1
SI_KERNEL = 0x80  # si_code of signals the kernel sends, e.g. the terminal's ^C to its group

# Signals the runner passes on to the command (the rest keep their defaults).
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT,
             signal.SIGUSR1, signal.SIGUSR2)

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


class RunError(UsageError):
    """The environment cannot give us a private /nix: exit code 2, with what to enable."""


@dataclass
class RunConfig:
    lower: str
    upper: str
    command: list[str]
    options: set[str] = field(default_factory=set)
    values: dict = field(default_factory=dict)  # nixfs' own -o key=value options
    nix: bool = True
    debug: bool = False
    log_file: str | None = None


def _call(result: int, what: str) -> None:
    if result != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")


def _mount(source: str | None, target: str, fstype: str | None, flags: int,
           data: str | None = None) -> None:
    enc = (lambda s: s.encode() if s is not None else None)
    _call(_libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)),
          f"mount {target}")


def _umount_lazy(target: str) -> None:
    _call(_libc.umount2(target.encode(), MNT_DETACH), f"umount {target}")


def _die_with_parent(sig: int) -> None:
    _libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)


# ------------------------------------------------------------------ checks

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


def _userns_error(cfg: RunConfig, reason: str) -> RunError:
    return RunError(
        f"cannot make a user namespace ({reason}): user namespaces are off here. An admin "
        "turns them on with 'sysctl -w user.max_user_namespaces=15000' (and "
        "'sysctl -w kernel.unprivileged_userns_clone=1' where that exists; on Ubuntu also "
        "'kernel.apparmor_restrict_unprivileged_userns=0'); in a container the seccomp "
        "profile must allow unshare.\n" + fallback_hint(cfg.lower, cfg.upper))


def check_user_namespaces(cfg: RunConfig) -> None:
    """Fail early, naming the sysctl, where the kernel will refuse a user namespace."""
    if _read("/proc/sys/user/max_user_namespaces") == "0":
        raise _userns_error(cfg, "user.max_user_namespaces is 0")
    if os.geteuid() != 0 and _read("/proc/sys/kernel/unprivileged_userns_clone") == "0":
        raise _userns_error(cfg, "kernel.unprivileged_userns_clone is 0")


# ------------------------------------------------------------------ the namespace

def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def enter_namespace(cfg: RunConfig) -> None:
    """Unshare a user and mount namespace in which this process keeps the user's own uid
    and gid (mapped to themselves, not to root) and may mount."""
    uid, gid = os.geteuid(), os.getegid()
    if _libc.unshare(CLONE_NEWUSER | CLONE_NEWNS) != 0:
        e = ctypes.get_errno()
        raise _userns_error(cfg, f"unshare: {errno.errorcode.get(e, e)}, {os.strerror(e)}")
    try:
        _write("/proc/self/setgroups", "deny")  # an unprivileged gid_map needs this first
        _write("/proc/self/uid_map", f"{uid} {uid} 1")
        _write("/proc/self/gid_map", f"{gid} {gid} 1")
        # Nothing mounted here reaches the host; what the host mounts later (autofs,
        # NFS home directories) still shows here.
        _mount(None, "/", None, MS_REC | MS_SLAVE)
    except OSError as e:
        raise _userns_error(cfg, f"the new namespace refuses to be set up: {e}") from None


def build_root(base: str) -> str:
    """A new root under *base*: every top-level entry of / bound (symlinks copied), and an
    empty ``nix``, whether or not the host has one.  Returns its path."""
    # A tmpfs of our own (private runtime records, nothing left on disk), and the root on
    # another one inside it.
    _mount("tmpfs", base, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0700")
    root = os.path.join(base, "root")
    os.mkdir(root)
    _mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755")
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
            _mount(src, dst, None, MS_BIND | MS_REC)
        except OSError as e:
            raise RunError(f"cannot bind {src} into the new root: {e}") from None
    os.mkdir(os.path.join(root, "nix"), 0o755)
    # The bound copy of the folder holding the new root would show the root inside
    # itself (a loop for find and du): detach that copy.
    copy = os.path.join(root, base.lstrip("/"), "root")
    try:
        _umount_lazy(copy)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOENT):
            log.warning("cannot hide %s: %s", copy, e)
    return root


# ------------------------------------------------------------------ the command

def _start_command(root: str, cwd: str, argv: list[str], mask: set) -> int:
    pid = os.fork()
    if pid != 0:
        return pid
    try:
        _die_with_parent(signal.SIGKILL)
        os.chroot(root)
        try:
            os.chdir(cwd)
        except OSError:
            print(f"nixfs: {cwd} is not there inside; starting in /", file=sys.stderr)
            os.chdir("/")
        for sig in FORWARDED:
            signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        os.execvp(argv[0], argv)
    except OSError as e:
        print(f"nixfs: cannot run {argv[0]}: {e.strerror}", file=sys.stderr)
        os._exit(127 if e.errno == errno.ENOENT else 126)
    except BaseException:
        os._exit(126)
    os._exit(126)


def _reap_children(pid: int) -> int | None:
    """Collect every exited child (as a container's process 1 we also inherit orphans);
    the wait status of *pid* if it is one of them."""
    found = None
    while True:
        try:
            done, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return found
        if done == 0:
            return found
        if done == pid:
            found = status


def _wait_forwarding(pid: int) -> int:
    """Wait for the command, passing on signals sent to us; its exit code (128 + signal
    if a signal ended it)."""
    while True:
        info = signal.sigwaitinfo(set(FORWARDED) | {signal.SIGCHLD})
        if info.si_signo == signal.SIGCHLD:
            status = _reap_children(pid)
            if status is not None:
                code = os.waitstatus_to_exitcode(status)
                return 128 - code if code < 0 else code
            continue
        # A terminal's ^C, ^\ or hangup reached the command's process group already.
        if info.si_code != SI_KERNEL:
            log.debug("passing signal %d on to %d", info.si_signo, pid)
            try:
                os.kill(pid, info.si_signo)
            except ProcessLookupError:
                pass


def _reap(pid: int) -> None:
    """The daemon is our child: collect its exit status once it has exited."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def _unmount(mnt: str) -> None:
    """Unmount and wait for the daemon; if the command left processes using /nix behind,
    detach the mount from the namespace instead (the daemon ends when we do)."""
    info = runtime.read_record(mnt)
    try:
        umount(mnt)
        if info is not None:
            _reap(info["pid"])
        return
    except UsageError as e:
        log.debug("unmounting %s: %s", mnt, e)
    try:
        _umount_lazy(mnt)
        print("nixfs: processes the command left behind still use /nix; it is detached",
              file=sys.stderr)
    except OSError as e:
        if e.errno != errno.EINVAL:  # EINVAL: not mounted any more
            print(f"nixfs: {e}", file=sys.stderr)


def run(cfg: RunConfig) -> int:
    """Run cfg.command with nixfs mounted at /nix; return its exit code."""
    if not cfg.command:
        raise UsageError("no command given (nixfs run --lower L --upper U -- COMMAND ...)")
    check_fuse_device()
    check_user_namespaces(cfg)
    cwd = os.getcwd()
    lower, upper = os.path.abspath(cfg.lower), os.path.abspath(cfg.upper)
    base = str(runtime.runtime_dir())  # before unsharing: the user's own folder
    enter_namespace(cfg)
    try:
        root = build_root(base)
    except OSError as e:
        raise RunError(f"cannot build a root with /nix in the new namespace: {e}") from None
    mnt = os.path.join(root, "nix")
    mcfg = MountConfig.from_values(cfg.values, lower=lower, upper=upper, mountpoint=mnt,
                                   options=cfg.options, debug=cfg.debug, log_file=cfg.log_file,
                                   nix=cfg.nix, quiet=True, exit_with_parent=True)
    code = mount(mcfg)
    if code != 0:
        return code
    info = runtime.read_record(mnt)
    if info is not None:
        # Inside, the mount is /nix: `nixfs status /nix`, `nixfs gc /nix` find it by that.
        runtime.write_alias("/nix", info)
    blocked = set(FORWARDED) | {signal.SIGCHLD}
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
    try:
        pid = _start_command(root, cwd, cfg.command, mask)
        return _wait_forwarding(pid)
    finally:
        _unmount(mnt)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
