"""The few C library calls Python's os module lacks, loaded once.

mount, umount2, unshare, pivot_root and prctl (for ``nixfs run`` and the
daemon's unmount), renameat2 and syncfs (for the overlay model).  Each raises
OSError with the call's errno, like the os module's own calls.
"""

import ctypes
import ctypes.util
import os

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
MNT_DETACH = 2
PR_SET_PDEATHSIG = 1
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2


def _check(result: int) -> None:
    if result != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def mount(source: bytes | None, target: bytes, fstype: bytes | None, flags: int,
          data: bytes | None = None) -> None:
    _check(_libc.mount(source, target, fstype, ctypes.c_ulong(flags), data))


def umount2(target: bytes, flags: int) -> None:
    _check(_libc.umount2(target, flags))


def unshare(flags: int) -> None:
    _check(_libc.unshare(flags))


def pivot_root(new_root: bytes, put_old: bytes) -> None:
    _check(_libc.pivot_root(new_root, put_old))


def set_parent_death_signal(sig: int) -> None:
    """Get *sig* when the parent (thread) dies: prctl(PR_SET_PDEATHSIG)."""
    _check(_libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0))


def renameat2(olddirfd: int, oldname: bytes, newdirfd: int, newname: bytes, flags: int) -> None:
    _check(_libc.renameat2(olddirfd, oldname, newdirfd, newname, ctypes.c_uint(flags)))


def syncfs(fd: int) -> None:
    _check(_libc.syncfs(fd))
