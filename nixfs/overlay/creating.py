"""New names: mkdir, mknod, symlink, create and link.

Each holds the change lock, copies up the parent, turns a kernel whiteout in the
way into nixfs' own, makes the object in the upper, and gives it the caller as
owner and exactly the mode asked for.  A directory made where a lower entry is
hidden is marked opaque, so that every reader of the upper sees it replace it.
"""

import errno
import os
import stat

import trio

from . import upperformat as fmt
from .copying import CopyUp
from .cowfiles import CowFiles
from .descriptors import Descriptors
from .inodes import InodeTable, Node
from .upperlayer import UpperLayer
from .names import Names
from .nodes import Nodes
from .policy import LowerPolicy
from .types import PASS_FLAGS, Attr, Caller, err

class Creating:
    def __init__(self, dirs: Descriptors, upper: UpperLayer, inodes: InodeTable, nodes: Nodes,
                 names: Names, copying: CopyUp, policy: LowerPolicy, lock: trio.Lock,
                 cows: CowFiles, *, privileged: bool):
        self.dirs, self.upper, self.inodes = dirs, upper, inodes
        self.cows = cows
        self.nodes, self.names = nodes, names
        self.copying, self.policy, self.lock = copying, policy, lock
        self.privileged = privileged

    async def _create(self, parent: Node, name: bytes, caller: Caller, mode: int, make):
        """Create *name* with ``make(dirfd, name)``; return (node, attr, make's result)."""
        self.names.check_new(parent, name)
        async with self.lock:
            if await self.names.exists(parent, name):
                raise err(errno.EEXIST)
            await self.copying.copy_up(parent)
            with self.dirs.upper_fd(parent) as pfd, self.dirs.writable(pfd):
                # A directory made where a lower entry is whited out is marked opaque too,
                # so that every reader of the upper (not only nixfs) sees it replace that entry.
                hides_lower = self.clear_kernel_whiteout(pfd, name) or (
                    parent.lower is not None and fmt.has_whiteout(pfd, name))
                opaque = hides_lower and stat.S_ISDIR(mode)
                if not stat.S_ISDIR(mode):  # (a file made by create may come without S_IFREG)
                    fmt.drop_stale_cow_map(pfd, name)
                result = make(pfd, name)
                try:
                    self._set_owner(pfd, name, caller)
                    if opaque:
                        cfd = self.upper.open_dir(pfd, name)
                        try:
                            fmt.make_opaque(cfd)
                        finally:
                            os.close(cfd)
                    st = self._give_mode(pfd, name, mode, self.upper.lstat(pfd, name))
                except BaseException:
                    if isinstance(result, int):
                        os.close(result)
                    self._undo_create(pfd, name)
                    raise
            node = await self.nodes.new_node(parent, name, stat.S_IFMT(st.st_mode), True, None)
            node.lookups += 1
            return node, self.names.attr(node, st), result

    def _undo_create(self, pfd: int, name: bytes) -> None:
        try:
            self.upper.rmdir(pfd, name)
        except NotADirectoryError:
            self.upper.unlink(pfd, name)
        except OSError:
            pass

    def clear_kernel_whiteout(self, pfd: int, name: bytes) -> bool:
        """Turn a kernel whiteout at *name* into ours, so *name* can be created.

        Returns whether there was one.
        """
        try:
            st = self.upper.lstat(pfd, name)
        except FileNotFoundError:
            return False
        if not fmt.is_kernel_whiteout(st):
            return False
        if fmt.whiteout_fits(name):
            fmt.make_whiteout(pfd, name)
        self.upper.unlink(pfd, name)
        return True

    def _set_owner(self, pfd: int, name: bytes, caller: Caller) -> None:
        if not self.privileged:
            return
        parent_st = self.upper.fstat(pfd)
        gid = -1 if parent_st.st_mode & stat.S_ISGID else caller.gid
        self.upper.chown(pfd, name, caller.uid, gid)

    def _give_mode(self, pfd: int, name: bytes, mode: int, st) -> os.stat_result:
        """Make the new upper object's permissions exactly those the kernel asked for; its
        stat after.

        The kernel has applied the caller's umask to *mode* already; the daemon's own
        umask (applied again by mkdir/open/mknod) must not take more bits away, nor may
        the chown to the caller (which clears set-id bits).  A directory keeps the
        set-group-ID bit it inherited from its parent.  Costs a call only where the
        mode came out different."""
        if stat.S_ISLNK(st.st_mode):
            return st
        wanted = stat.S_IMODE(mode)
        if stat.S_ISDIR(st.st_mode):
            wanted |= st.st_mode & stat.S_ISGID
        if stat.S_IMODE(st.st_mode) == wanted:
            return st
        self.upper.chmod(pfd, name, wanted)
        return self.upper.lstat(pfd, name)

    async def mkdir(self, parent: Node, name: bytes, mode: int, caller: Caller):
        def make(pfd, name):
            self.upper.mkdir(pfd, name, stat.S_IMODE(mode))
        node, attr, _ = await self._create(parent, name, caller, mode | stat.S_IFDIR, make)
        return node, attr

    async def mknod(self, parent: Node, name: bytes, mode: int, rdev: int, caller: Caller):
        def make(pfd, name):
            self.upper.mknod(pfd, name, mode, rdev)
        node, attr, _ = await self._create(parent, name, caller, mode, make)
        return node, attr

    async def symlink(self, parent: Node, name: bytes, target: bytes, caller: Caller):
        def make(pfd, name):
            self.upper.symlink(target, pfd, name)
        node, attr, _ = await self._create(parent, name, caller, stat.S_IFLNK | 0o777, make)
        return node, attr

    async def create(self, parent: Node, name: bytes, mode: int, flags: int, caller: Caller):
        """A new regular file: (node, attr, its descriptor open with *flags*)."""
        def make(pfd, name):
            return self.upper.open(pfd, name, (flags & PASS_FLAGS) | os.O_CREAT | os.O_EXCL,
                                   stat.S_IMODE(mode))
        return await self._create(parent, name, caller, mode, make)

    async def link(self, node: Node, new_parent: Node, new_name: bytes) -> Attr:
        self.names.check_new(new_parent, new_name)
        if node.is_dir:
            raise err(errno.EPERM)
        async with self.lock:
            if await self.names.exists(new_parent, new_name):
                raise err(errno.EEXIST)
            await self.cows.check_movable(node)
            if not node.upper:
                refused = self.policy.link_lower_errno(new_parent.tag)
                if refused:
                    raise err(refused, "linking this lower file would copy it up")
            await self.copying.copy_up(node)
            await self.copying.copy_up(new_parent)
            if node.parent is None:
                raise err(errno.ENOENT)
            with self.dirs.upper_fd(node.parent) as sfd, self.dirs.upper_fd(new_parent) as dfd, \
                    self.dirs.writable(dfd):
                self.clear_kernel_whiteout(dfd, new_name)
                fmt.drop_stale_cow_map(dfd, new_name)
                self.upper.link(sfd, node.name, dfd, new_name)
                st = self.upper.lstat(dfd, new_name)
            self.inodes.attach(node, new_parent, new_name)
            self.inodes.register_upper_ino(node, st.st_ino)
            node.lookups += 1
            return self.names.attr(node, st)
