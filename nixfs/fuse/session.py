"""The FUSE session's life: mounting, the request loop, ending it and unmounting.

pyfuse3 keeps one session per process in module state; the daemon drives it through
these four calls so that nothing outside nixfs/fuse/ imports pyfuse3 (the names and
arguments are pyfuse3's own).
"""

import pyfuse3


def init(ops: pyfuse3.Operations, mountpoint: str, options: set[str]) -> None:
    """Mount *mountpoint* answered by *ops* (RuntimeError when the kernel refuses)."""
    pyfuse3.init(ops, mountpoint, options)


async def main(**main_args) -> None:
    """Answer requests until terminate() or the unmount (*main_args*: see features'
    poll_before_sleep)."""
    await pyfuse3.main(**main_args)


def terminate() -> None:
    """Make main() return after the requests under way (from a signal handler's task)."""
    pyfuse3.terminate()


def close(unmount: bool) -> None:
    """End the session; *unmount* also takes the mount away (else the kernel's stays)."""
    pyfuse3.close(unmount=unmount)
