"""How the command enters the new root: ``pivot_root`` where it may, else ``chroot``.

When every way is refused, the message says which call was refused, the likely reason
(a seccomp filter, a security module, a dropped capability) and what to ask for.
"""

import errno
import logging
import os

from .. import libc
from ..libc import CLONE_NEWNS, MNT_DETACH
from .namespace import MS_REC, MS_SLAVE

log = logging.getLogger(__name__)

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
