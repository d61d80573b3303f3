"""Where running daemons are recorded, and what the kernel says is mounted.

Each daemon writes a small JSON record named after its mountpoint in a runtime
folder, so ``nixfs umount`` and ``nixfs status`` can find it from the
mountpoint alone.  Nothing here stats the mountpoint itself: a hung daemon
must not hang the commands meant to get rid of it.
"""

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

FSTYPE = "fuse.nixfs"


def canonical(mountpoint: str) -> str:
    """An absolute spelling of *mountpoint* without touching the mountpoint itself."""
    path = os.path.abspath(mountpoint)
    parent, base = os.path.split(path)
    return os.path.join(os.path.realpath(parent), base) if base else path


def host_uid() -> int:
    """This process's uid outside any user namespace (root in ``unshare -Ur`` is a user)."""
    uid = os.geteuid()
    try:
        with open("/proc/self/uid_map") as f:
            for line in f:
                inside, outside, count = map(int, line.split())
                if inside <= uid < inside + count:
                    return outside + uid - inside
    except (OSError, ValueError):
        pass
    return uid


def runtime_dir() -> Path:
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and os.access(xdg, os.W_OK):
        base = Path(xdg) / "nixfs"
    elif host_uid() == 0 and os.access("/run", os.W_OK):
        base = Path("/run/nixfs")
    else:
        base = Path(f"/tmp/nixfs-{host_uid()}")
    base.mkdir(mode=0o700, exist_ok=True)
    st = base.stat()
    if st.st_uid != os.geteuid():
        raise PermissionError(f"{base} belongs to another user")
    return base


def record_key(mountpoint: str) -> str:
    return hashlib.sha256(canonical(mountpoint).encode()).hexdigest()[:32]


def _record_path(mountpoint: str) -> Path:
    return runtime_dir() / f"{record_key(mountpoint)}.json"


def _start_time(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return fields[19].decode()
    except (OSError, IndexError):
        return None


def write_record(mountpoint: str, **info) -> None:
    info.update(pid=os.getpid(), start=_start_time(os.getpid()), mountpoint=canonical(mountpoint))
    path = _record_path(mountpoint)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(info))
    tmp.replace(path)


def write_alias(mountpoint: str, info: dict) -> None:
    """Record the daemon of *info* under another name for its mount: inside ``nixfs run``
    the mount that its daemon knows by a longer path is ``/nix``."""
    alias = dict(info, mountpoint=canonical(mountpoint))
    path = _record_path(mountpoint)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(alias))
    tmp.replace(path)


def read_record(mountpoint: str) -> dict | None:
    """The record of the live daemon serving *mountpoint*, or None."""
    path = _record_path(mountpoint)
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if _start_time(info.get("pid", 0)) != info.get("start"):
        return None  # that daemon is gone (and its pid may be someone else's now)
    return info


def remove_record(mountpoint: str) -> None:
    try:
        info = json.loads(_record_path(mountpoint).read_text())
        if info.get("pid") == os.getpid():
            _record_path(mountpoint).unlink()
    except (OSError, ValueError):
        pass


@dataclass
class MountEntry:
    mountpoint: str
    fstype: str
    source: str
    options: str


def _unescape(field: str) -> str:
    return field.encode().decode("unicode_escape").encode("latin-1").decode(errors="surrogateescape")


def mounts() -> list[MountEntry]:
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            pre, _, post = line.partition(" - ")
            fields, tail = pre.split(), post.split()
            out.append(MountEntry(_unescape(fields[4]), tail[0], _unescape(tail[1]), tail[2]))
    return out


def find_mount(mountpoint: str) -> MountEntry | None:
    """The topmost mount at *mountpoint*, if any."""
    target = canonical(mountpoint)
    found = None
    for entry in mounts():
        if entry.mountpoint == target:
            found = entry
    return found
