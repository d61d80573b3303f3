"""``nixfs run``: one command with a private ``/nix``, for an ordinary user.

Users on clusters, CI runners and pods cannot mount at ``/nix``, and the host
may have no ``/nix`` at all.  So this process enters a new user and mount
namespace of its own (no setuid helper), builds a new root there out of bind
mounts of the host's top-level entries plus an empty ``/nix``, mounts nixfs on
it and runs the command in that root with the user's own uid, environment and
working directory.  Only this namespace ever sees the mounts: they go away with
its last process, also when something fails.

Who does what, all inside the namespace:

- this process (the *runner*) keeps the host's root, so the daemon's paths and
  ``nixfs umount`` work as for any mount; it forwards signals to the command,
  then unmounts and waits for the daemon, and exits with the command's code;
- the daemon, forked by ``mount.mount``, also keeps the host's root, where the
  lower is still the host's (even if that is the host's ``/nix``); it gets
  SIGTERM (and unmounts) if the runner dies;
- the command, forked; it gets SIGKILL if the runner dies.  It enters the new
  root with ``pivot_root(2)`` in a mount namespace of its own, nested in the
  runner's, so the old root is not just out of sight but gone from its
  namespace.  Not ``chroot(2)``: a pod with every capability dropped (OKD's
  restricted SCC) has no CAP_SYS_CHROOT, and the runtime's default seccomp
  profile (containers-common's, which CRI-O uses too) then refuses chroot,
  while it allows unshare, mount, umount2 and pivot_root to anyone.  chroot
  is only the fallback where pivot_root is refused (another seccomp profile,
  or a root that pivot_root cannot move).

Mounting needs CAP_SYS_ADMIN in the namespace, which only lasts until exec:
so every mount is made in this process or in forks of it (ctypes, not
mount(8)), and the command runs with no capabilities, as the user.

Exit codes: the command's (128 + N if signal N ended it); 127 if it is not
found and 126 if it cannot be run; 125 if nixfs could not start it in the new
root (every way of entering it was refused: the message names each refusal and
what to ask the cluster for); 2 if the machine lacks what nixfs run needs
before it starts (``/dev/fuse``, user namespaces), as for every nixfs command.
"""

import errno
import logging
import os
import signal
import stat
import sys
from dataclasses import dataclass, field

from . import holders, libc, runtime
from .libc import CLONE_NEWNS, CLONE_NEWUSER, MNT_DETACH
from .mount import MountConfig, check_fuse_device, mount, umount
from .usage import UsageError

log = logging.getLogger(__name__)

MS_NOSUID, MS_NODEV, MS_BIND, MS_REC, MS_SLAVE = 0x2, 0x4, 0x1000, 0x4000, 0x80000
SI_KERNEL = 0x80  # si_code of signals the kernel sends, e.g. the terminal's ^C to its group

# Signals the runner passes on to the command (the rest keep their defaults).
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT,
             signal.SIGUSR1, signal.SIGUSR2)

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


def _call(what: str, call, *args) -> None:
    """*call*, its OSError naming *what* it was doing."""
    try:
        call(*args)
    except OSError as e:
        raise OSError(e.errno, f"{what}: {e.strerror}") from None


def _mount(source: str | None, target: str, fstype: str | None, flags: int,
           data: str | None = None) -> None:
    enc = (lambda s: s.encode() if s is not None else None)
    _call(f"mount {target}", libc.mount, enc(source), enc(target), enc(fstype), flags, enc(data))


def _umount_lazy(target: str) -> None:
    _call(f"umount {target}", libc.umount2, target.encode(), MNT_DETACH)


def _die_with_parent(sig: int) -> None:
    libc.set_parent_death_signal(sig)


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


def _refused_userns_error(cfg: RunConfig, reason: str) -> RunError:
    return RunError(
        f"cannot make a user namespace ({reason}), though the kernel's settings allow them: "
        "a seccomp profile refuses unshare (Docker's default does without CAP_SYS_ADMIN), or "
        "this process runs inside a chroot (where the kernel refuses them). In a container, "
        "ask for the runtime's default seccomp profile of containers-common or CRI-O "
        "(RuntimeDefault under OKD), which allows unshare, mount, umount2 and pivot_root "
        "with every capability dropped, or a custom profile adding them.\n"
        + fallback_hint(cfg.lower, cfg.upper))


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

ENTER_FAILED = 125  # nixfs could not start the command in the new root (as chroot(8), env(1))


class EnterRootError(Exception):
    """Every way into the new root was refused; *refused* holds (step, errno) of each."""

    def __init__(self, refused: list[tuple[str, int]]):
        super().__init__(refused)
        self.refused = refused


class _Refused(Exception):
    def __init__(self, step: str, err: int):
        super().__init__(step, err)
        self.step, self.err = step, err


def _step(step: str, call, *args) -> None:
    try:
        call(*args)
    except OSError as e:
        raise _Refused(step, e.errno) from None


def _pivot_into(root: str) -> None:
    """Make *root* the root of a mount namespace of this process's own.

    This process is a fork of the runner, so it still holds CAP_SYS_ADMIN in the runner's
    user namespace: it may unshare a mount namespace (nested in the runner's) and pivot
    there.  pivot_root's rules hold: *root* is a mount point (its tmpfs) whose parent (the
    runtime folder's tmpfs) is not shared, and after the MS_SLAVE below no mount is; so
    neither the pivot nor the unmount of the old root reaches the runner's namespace.  Where
    this process's own root is not a mount point, or the mount beneath it is shared (neither
    of which we can change from here), pivot_root says EINVAL and the caller falls back to
    chroot."""
    _step("unshare(CLONE_NEWNS)", libc.unshare, CLONE_NEWNS)
    _step("mount(MS_REC|MS_SLAVE)", libc.mount, None, b"/", None, MS_REC | MS_SLAVE)
    os.chdir(root)
    # pivot_root(".", "."): the old root ends up mounted on top of the new one, at the
    # same place; detaching it there leaves the new root.  No directory to make in the
    # new root for the old one, none to remove after.
    _step("pivot_root", libc.pivot_root, b".", b".")
    try:
        _step("umount2 of the old root", libc.umount2, b".", MNT_DETACH)
    except _Refused as e:
        # The old root still covers the new one: nothing to fall back to from here.
        raise EnterRootError([(e.step, e.err)]) from None
    os.chdir("/")


def enter_root(root: str) -> str:
    """Make *root* this process's root: pivot_root where it is allowed, else chroot.
    Returns the way that worked; raises EnterRootError naming each refusal."""
    refused = []
    try:
        _pivot_into(root)
        return "pivot_root"
    except _Refused as e:
        refused.append((e.step, e.err))
        log.debug("cannot pivot into the new root (%s: %s); trying chroot",
                  e.step, os.strerror(e.err))
    try:
        os.chroot(root)
        return "chroot"
    except OSError as e:
        refused.append(("chroot", e.errno))
    raise EnterRootError(refused)


SECCOMP_ADVICE = (
    "ask the cluster for a seccomp profile that allows unshare, mount, umount2 and "
    "pivot_root: the runtime's default profile of containers-common and CRI-O "
    "(RuntimeDefault, as OKD's restricted-v2 SCC asks for) does, with every capability "
    "dropped; Docker's default profile refuses them without CAP_SYS_ADMIN, so there use a "
    "custom profile that adds them")


def _cause(step: str, err: int) -> tuple[str, str]:
    """The likely reason the kernel said *err* to *step*, and what to do about it.  This
    process holds every capability in its own user namespace (the runner's), so an EPERM
    is a filter's, not a missing capability's, except for chroot."""
    if step == "chroot" and err == errno.EPERM:
        return ("CAP_SYS_CHROOT was dropped, and the seccomp profile allows chroot only with it",
                "grant CAP_SYS_CHROOT (OKD's restricted SCCs do not), so that chroot can "
                "stand in for pivot_root")
    if err in (errno.EPERM, errno.ENOSYS):
        return ("a seccomp filter refuses it (nixfs holds CAP_SYS_ADMIN in its own user "
                "namespace)", SECCOMP_ADVICE)
    if err == errno.EACCES:
        return ("a security module (AppArmor, SELinux) refuses it",
                "ask for an AppArmor profile (or SELinux type) that allows mount and pivot_root "
                "in the container's own namespaces (Docker's docker-default refuses mount)")
    if step == "pivot_root" and err == errno.EINVAL:
        # (Not a chroot: the kernel refuses the runner's user namespace there already.)
        return ("this process's root is not a mount point, or the mount beneath it is "
                "shared, which pivot_root does not allow", "")
    return ("unexpected", "")


def enter_root_message(e: EnterRootError) -> str:
    """What went wrong, why it likely did, and what to ask the cluster for."""
    names = " and ".join(step for step, _ in e.refused)
    lines = [f"cannot start the command: entering the new root with /nix failed "
             f"({names} refused)"]
    advice = []
    for step, err in e.refused:
        why, what = _cause(step, err)
        lines.append(f"  {step}: {errno.errorcode.get(err, err)} ({os.strerror(err)}): {why}")
        if what and what not in advice:
            advice.append(what)
    lines += [f"  {'or ' if i else ''}{what}" for i, what in enumerate(advice)]
    return "\n".join(lines)


def _start_command(root: str, cwd: str, argv: list[str], mask: set, info: dict | None) -> int:
    pid = os.fork()
    if pid != 0:
        return pid
    try:
        _die_with_parent(signal.SIGKILL)
        try:
            way = enter_root(root)
        except EnterRootError as e:
            print(f"nixfs: {enter_root_message(e)}", file=sys.stderr)
            os._exit(ENTER_FAILED)
        log.debug("entered the new root with %s", way)
        if info is not None:
            # Inside, the mount is /nix: `nixfs status /nix`, `nixfs gc /nix` find it by
            # that, in this (the command's own) mount namespace.
            try:
                runtime.write_alias("/nix", info)
            except OSError as e:
                print(f"nixfs: warning: nixfs status /nix will not find the mount: {e}",
                      file=sys.stderr)
        try:
            os.chdir(cwd)
        except OSError:
            print(f"nixfs: {cwd} is not there inside; starting in /", file=sys.stderr)
            os.chdir("/")
        for sig in FORWARDED:
            signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    except BaseException as e:  # noqa: BLE001 (a fork must never return into the runner)
        print(f"nixfs: cannot start the command in the new root: {e}", file=sys.stderr)
        os._exit(ENTER_FAILED)
    try:
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
    """Unmount and wait for the daemon.  If the command left processes behind that still
    have /nix (in its own mount namespace, which holds a copy of the mount: while they
    live the file system stays mounted there, so unmounting it here would not end the
    daemon), unmount it under them: detach it, and end the daemon ourselves (it writes
    everything out), so that nothing of the run outlives nixfs run."""
    info = runtime.read_record(mnt)
    entry = runtime.find_mount(mnt)
    # The daemon and its database worker use the mount themselves: they are not left behind.
    left = holders.find(entry, spare={info["pid"]} if info else set()) if entry else []
    if not left:
        try:
            umount(mnt)
            if info is not None:
                _reap(info["pid"])
            return
        except UsageError as e:
            log.debug("unmounting %s: %s", mnt, e)
    try:
        _umount_lazy(mnt)
        detached = True
    except OSError as e:
        detached = False
        if e.errno != errno.EINVAL:  # EINVAL: not mounted any more
            print(f"nixfs: {e}", file=sys.stderr)
    if left or detached:
        which = f": {holders.describe(left)}" if left else ""
        print(f"nixfs: processes the command left behind still use /nix{which}; it is "
              "unmounted under them", file=sys.stderr)
    if info is not None:
        try:
            os.kill(info["pid"], signal.SIGTERM)
            os.waitpid(info["pid"], 0)
        except (ProcessLookupError, ChildProcessError):
            pass


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
    blocked = set(FORWARDED) | {signal.SIGCHLD}
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
    try:
        pid = _start_command(root, cwd, cfg.command, mask, info)
        return _wait_forwarding(pid)
    finally:
        _unmount(mnt)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
