"""Which processes hold a mount, found through /proc alone.

``nixfs umount`` refuses a busy mount at once and says who holds it; the
kernel's own answer is not enough for that:
- it names nobody ("target is busy");
- it sees only the caller's copy of the mount.  Nix run as root moves every
  command, nix-daemon too, into a mount namespace of its own; where mounts do
  not propagate (containers, ``unshare -m``, hosts without systemd) its socket
  and files hold *its* copy.  Unmounting ours then succeeds, the file system
  lives on in nix-daemon's namespace, its clients lose the socket, and the
  nixfs daemon can never finish.
So the scan looks for the mount's device (its superblock: the same in every
copy) in every process it may inspect: working directory, root and program
(opened O_PATH, which sends the file system no request: a hung daemon cannot
hang the scan), open files, mappings and unix sockets bound on it.  Mount
namespaces that merely hold a copy our unmount does not take along are found
too: they do not make the unmount fail (umount(8) would not), but the daemon
serves them until they are gone, so the user is told rather than kept waiting.
"""

import os
import socket
import struct
import time
from dataclasses import dataclass, field

from . import runtime

SHOWN = 5  # holders named in a message; the rest are counted
COPY = "its own mount namespace has it mounted"
# How long holders that only have a copy may take to go: every Nix command run as root
# has one for its lifetime.  A copy nobody uses does not make an unmount fail (umount(8)
# would not either), but the daemon serves it until it is gone.
COPY_GRACE_S = 1.0


@dataclass
class Holder:
    pid: int
    command: str
    uses: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return f"{self.command} (pid {self.pid}: {', '.join(self.uses)})"

    @property
    def only_a_copy(self) -> bool:
        """It uses nothing on the mount; its namespace just has a copy."""
        return self.uses == [COPY]


def describe(holders: list[Holder]) -> str:
    """One line naming the first holders."""
    text = ", ".join(map(str, holders[:SHOWN]))
    more = len(holders) - SHOWN
    return text + (f" and {more} more" if more > 0 else "")


def _dev(text: str, base: int) -> tuple[int, int]:
    major, minor = text.split(":")
    return int(major, base), int(minor, base)


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except (OSError, UnicodeDecodeError):
        return None


def _processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command name) of every process in sight."""
    out = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            stat = _read(f"/proc/{name}/stat")
            if stat:
                command = stat[stat.index("(") + 1:stat.rindex(")")]
                out[int(name)] = (int(stat[stat.rindex(")") + 2:].split()[1]), command)
    return out


def _descendants(roots: set[int], procs: dict) -> set[int]:
    found = set(roots)
    grew = True
    while grew:
        grew = False
        for pid, (ppid, _) in procs.items():
            if ppid in found and pid not in found:
                found.add(pid)
                grew = True
    return found


class _Namespaces:
    """Each mount namespace's copies of the mount (read once per namespace)."""

    def __init__(self, mount: runtime.MountEntry):
        self.dev = _dev(mount.dev, 10)
        self.own = runtime.mount_ns()
        self.groups = {t.split(":")[1] for t in mount.tags if t.startswith("shared:")}
        self.ours = mount.mount_id
        self.ids: set[int] = {mount.mount_id}
        self._copies: dict[str, list] = {}

    def copies(self, pid: int) -> list[runtime.MountEntry]:
        ns = runtime.mount_ns(pid)
        if ns not in self._copies or not ns:
            try:
                table = runtime.mounts(pid)
            except (OSError, ValueError, IndexError):
                table = []
            self._copies[ns] = [m for m in table if m.dev and _dev(m.dev, 10) == self.dev]
            self.ids.update(m.mount_id for m in self._copies[ns])
        return self._copies[ns]

    def keeps_a_copy(self, pid: int) -> bool:
        """Its namespace has the mount where our unmount does not reach (not a peer or
        slave of ours, which the kernel unmounts along and checks itself)."""
        if runtime.mount_ns(pid) == self.own:
            return False
        for m in self.copies(pid):
            linked = {t.split(":")[1] for t in m.tags if t.startswith(("shared:", "master:"))}
            # (Our own mount id: this namespace after all, where it cannot be named.)
            if m.mount_id != self.ours and not linked & self.groups:
                return True
        return False


def _mount_id_of(path: str) -> int | None:
    """The mount id of what *path* (a /proc magic link) points at, without a request to it."""
    try:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return _fdinfo_mount_id(f"/proc/self/fdinfo/{fd}")
    finally:
        os.close(fd)


def _fdinfo_mount_id(path: str) -> int | None:
    for line in (_read(path) or "").splitlines():
        if line.startswith("mnt_id:"):
            return int(line.split()[1])
    return None


def _bound_sockets(mount: runtime.MountEntry) -> set[int]:
    """Inodes of unix sockets bound to a name on the mount's device (this network
    namespace), as sock_diag says; by their path where it cannot be asked."""
    try:
        return _sock_diag_bound(_dev(mount.dev, 10))
    except OSError:
        pass
    found = set()
    for line in (_read("/proc/net/unix") or "").splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 8 and fields[7].startswith(mount.mountpoint.rstrip("/") + "/"):
            found.add(int(fields[6]))
    return found


def _sock_diag_bound(dev: tuple[int, int]) -> set[int]:
    NETLINK_SOCK_DIAG, SOCK_DIAG_BY_FAMILY, UDIAG_SHOW_VFS, UNIX_DIAG_VFS = 4, 20, 2, 1
    NLMSG_ERROR, NLMSG_DONE, NLM_F_REQUEST, NLM_F_DUMP = 2, 3, 1, 0x300
    want = dev[0] << 20 | dev[1]  # the kernel's own dev_t, as sock_diag reports it
    req = struct.pack("=BBHIIIII", socket.AF_UNIX, 0, 0, 0xFFFFFFFF, 0, UDIAG_SHOW_VFS,
                      0xFFFFFFFF, 0xFFFFFFFF)
    msg = struct.pack("=IHHII", 16 + len(req), SOCK_DIAG_BY_FAMILY,
                      NLM_F_REQUEST | NLM_F_DUMP, 1, 0) + req
    found = set()
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG) as nl:
        nl.sendall(msg)
        while True:
            data = nl.recv(1 << 16)
            pos = 0
            while pos + 16 <= len(data):
                length, kind = struct.unpack_from("=IH", data, pos)
                if kind in (NLMSG_DONE, NLMSG_ERROR) or length < 16:
                    return found
                ino = struct.unpack_from("=I", data, pos + 20)[0]
                attr = pos + 32  # after the header (16) and unix_diag_msg (16)
                while attr + 4 <= pos + length:
                    alen, atype = struct.unpack_from("=HH", data, attr)
                    if alen < 4:
                        break
                    if atype == UNIX_DIAG_VFS and struct.unpack_from("=II", data, attr + 4)[1] == want:
                        found.add(ino)
                    attr += (alen + 3) & ~3
                pos += (length + 3) & ~3


def _uses(pid: int, spaces: _Namespaces, sockets: set[int]) -> list[str]:
    uses = []
    for link, what in (("cwd", "working directory"), ("root", "root directory"),
                       ("exe", "program")):
        if _mount_id_of(f"/proc/{pid}/{link}") in spaces.ids:
            uses.append(what)
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        fds = []
    files, bound = [], 0
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:[") and int(target[8:-1]) in sockets:
            bound += 1
        elif _fdinfo_mount_id(f"/proc/{pid}/fdinfo/{fd}") in spaces.ids:
            files.append(target)
    if bound:
        uses.append("a socket bound on it" if bound == 1 else f"{bound} sockets bound on it")
    if files:
        uses.append(f"open file {files[0]}" + (f" and {len(files) - 1} more" if files[1:] else ""))
    for line in (_read(f"/proc/{pid}/maps") or "").splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[4] != "0" and _dev(fields[3], 16) == spaces.dev:
            uses.append(f"mapped file {fields[5]}")
            break
    if spaces.keeps_a_copy(pid):
        uses.append(COPY)
    return uses


def find(mount: runtime.MountEntry, spare: set[int] = frozenset()) -> list[Holder]:
    """Processes (but *spare*, their descendants and this one) that keep *mount* in use,
    those that use it themselves first."""
    procs = _processes()
    skip = _descendants(set(spare), procs) | {os.getpid()}
    spaces = _Namespaces(mount)
    for pid in procs:
        if pid not in skip:
            spaces.copies(pid)  # every copy's mount id, before looking at anyone's files
    sockets = _bound_sockets(mount)
    holders = []
    for pid, (_, command) in sorted(procs.items()):
        if pid not in skip:
            uses = _uses(pid, spaces, sockets)
            if uses:
                holders.append(Holder(pid, command, uses))
    holders.sort(key=lambda h: h.only_a_copy)
    return holders


def lasting(mount: runtime.MountEntry, spare: set[int] = frozenset()) -> list[Holder]:
    """The holders of *mount* that stay: at once if one uses it; copies in other
    namespaces (a short Nix command run as root) get COPY_GRACE_S to go."""
    deadline = time.monotonic() + COPY_GRACE_S
    while True:
        holders = find(mount, spare)
        if not holders or not all(h.only_a_copy for h in holders) or \
                time.monotonic() > deadline:
            return holders
        time.sleep(0.1)
