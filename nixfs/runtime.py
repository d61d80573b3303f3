"""Where running daemons are recorded, and what the kernel says is mounted.

Each daemon writes a small JSON record named after its mount namespace and
mountpoint in a runtime folder, so ``nixfs umount`` and ``nixfs status`` find
the daemon of the caller's own ``/nix`` from the mountpoint alone: two
namespaces can each have a nixfs at the same path.  Nothing here stats the
mountpoint itself: a hung daemon must not hang the commands meant to get rid
of it.
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


def mount_ns(pid: int | str = "self") -> str:
    """The mount namespace of *pid* (``mnt:[4026531841]``), or "" if it cannot be read."""
    try:
        return os.readlink(f"/proc/{pid}/ns/mnt")
    except OSError:
        return ""


def record_key(mountpoint: str) -> str:
    """The record's name: this process's mount namespace and the mountpoint."""
    key = f"{mount_ns()}\0{canonical(mountpoint)}"
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def _old_key(mountpoint: str) -> str:
    """The name earlier versions gave a record: the mountpoint alone."""
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
    entry = find_mount(mountpoint)
    info.update(pid=os.getpid(), start=_start_time(os.getpid()), mountpoint=canonical(mountpoint),
                mnt_ns=mount_ns(), dev=entry.dev if entry else None)
    path = _record_path(mountpoint)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(info))
    tmp.replace(path)


def write_alias(mountpoint: str, info: dict) -> None:
    """Record the daemon of *info* under another name for its mount, in the calling
    process's mount namespace: inside ``nixfs run`` the mount that its daemon knows by a
    longer path is ``/nix``."""
    alias = dict(info, mountpoint=canonical(mountpoint))
    path = _record_path(mountpoint)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(alias))
    tmp.replace(path)


def _live_record(path: Path) -> dict | None:
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if _start_time(info.get("pid", 0)) != info.get("start"):
        return None  # that daemon is gone (and its pid may be someone else's now)
    return info


def read_record(mountpoint: str) -> dict | None:
    """The record of the live daemon serving *mountpoint* in this mount namespace, or None."""
    info = _live_record(_record_path(mountpoint))
    if info is None:
        info = _old_record(mountpoint)
    if info is None:
        info = _record_by_device(mountpoint)
    return info


def _old_record(mountpoint: str) -> dict | None:
    """A record an earlier nixfs wrote (its daemons outlive an upgrade): named by the
    path alone, so it counts only if its daemon is in this mount namespace, or if what
    is mounted here is a copy of its mount (the same device)."""
    info = _live_record(runtime_dir() / f"{_old_key(mountpoint)}.json")
    if info is None:
        return None
    theirs = mount_ns(info["pid"])
    if not theirs or theirs == mount_ns():
        return info
    ours = find_mount(mountpoint)
    try:
        served = find_mount(info["mountpoint"], pid=info["pid"])
    except OSError:
        return None
    if ours is not None and served is not None and ours.dev == served.dev:
        return dict(info, mountpoint=canonical(mountpoint))
    return None


def _record_by_device(mountpoint: str) -> dict | None:
    """The daemon of the mount seen at *mountpoint* when it was made in another mount
    namespace (this one is a copy: a service's private namespace, a shell in
    ``unshare -m``): the mount's device names its superblock, the same in every copy."""
    entry = find_mount(mountpoint)
    if entry is None or entry.fstype != FSTYPE:
        return None
    for path in runtime_dir().glob("*.json"):
        info = _live_record(path)
        if info is not None and info.get("dev") == entry.dev:
            return dict(info, mountpoint=canonical(mountpoint))
    return None


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
    mount_id: int = 0
    dev: str = ""  # MAJOR:MINOR of the file system: one per superblock, shared by every copy
    tags: tuple = ()  # propagation: shared:N, master:N, ...


def _unescape(field: str) -> str:
    return field.encode().decode("unicode_escape").encode("latin-1").decode(errors="surrogateescape")


def mounts(pid: int | str = "self") -> list[MountEntry]:
    """The mount table of *pid*'s mount namespace, as that process sees it."""
    out = []
    with open(f"/proc/{pid}/mountinfo") as f:
        for line in f:
            pre, _, post = line.partition(" - ")
            fields, tail = pre.split(), post.split()
            out.append(MountEntry(_unescape(fields[4]), tail[0], _unescape(tail[1]), tail[2],
                                  int(fields[0]), fields[2], tuple(fields[6:])))
    return out


def find_mount(mountpoint: str, pid: int | str = "self") -> MountEntry | None:
    """The topmost mount at *mountpoint* (as *pid* sees it: then give it canonical), if any."""
    target = canonical(mountpoint) if pid == "self" else mountpoint
    found = None
    for entry in mounts(pid):
        if entry.mountpoint == target:
            found = entry
    return found
