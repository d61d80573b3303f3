"""The runner of ``nixfs run``: it mounts nixfs at the new root's ``/nix``, starts the
command there, passes signals on, and unmounts when the command ends (see __init__.py
for who does what, and the exit codes).
"""

import errno
import logging
import os
import signal
import sys

from .. import holders, libc, runtime
from ..config import MountConfig, RunConfig
from ..daemon.preflight import check_fuse_device
from ..daemon.start import mount
from ..daemon.unmount import umount
from ..usage import UsageError
from .enter import ENTER_FAILED, EnterRootError, enter_root, enter_root_message
from .namespace import RunError, build_root, check_user_namespaces, enter_namespace, umount_lazy

log = logging.getLogger(__name__)

SI_KERNEL = 0x80  # si_code of signals the kernel sends, e.g. the terminal's ^C to its group

# Signals the runner passes on to the command (the rest keep their defaults).
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT,
             signal.SIGUSR1, signal.SIGUSR2)


def _start_command(root: str, cwd: str, argv: list[str], mask: set, info: dict | None) -> int:
    pid = os.fork()
    if pid != 0:
        return pid
    try:
        libc.set_parent_death_signal(signal.SIGKILL)
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
        umount_lazy(mnt)
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
