"""Names taken away or moved: unlink, rmdir and rename.

Each holds the change lock.  A name that would uncover a lower entry gets a
whiteout; a renamed directory with lower entries records where they are (a
redirect), or is made opaque where it lands on a lower entry of its own.  The
order of steps follows kernel overlayfs, so a change that fails leaves the same
(invisible) copy-ups; a node the kernel still holds is kept as an orphan.  A
copy-on-write file is never renamed (EXDEV) and leaves with its map (cowfiles).
"""

import errno
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
from .orphans import Orphans
from .policy import LowerPolicy
from .readdir import DirReader
from .state import UpperState
from .types import err
from ..libc import RENAME_EXCHANGE, RENAME_NOREPLACE


class Removing:
    def __init__(self, dirs: Descriptors, upper: UpperLayer, inodes: InodeTable, nodes: Nodes,
                 names: Names, reader: DirReader, copying: CopyUp, orphans: Orphans,
                 policy: LowerPolicy, lock: trio.Lock, state: UpperState, cows: CowFiles, *,
                 readonly: bool):
        self.dirs, self.upper, self.inodes = dirs, upper, inodes
        self.cows = cows
        self.nodes, self.names = nodes, names
        self.reader, self.copying, self.orphans = reader, copying, orphans
        self.policy, self.lock, self.state = policy, lock, state
        self.readonly = readonly

    def _kernel_whiteout(self, pfd: int, name: bytes) -> None:
        """Put a character-device whiteout at *name*, for names too long for ``.wh.``.

        Built in the work folder and renamed into place, so a non-directory that
        was there is replaced at once.
        """
        tmp = self.dirs.work_name("wh")
        work_fd = self.dirs.work_fd
        self.upper.mknod(work_fd, tmp, stat.S_IFCHR | 0o600, 0)
        try:
            self.upper.rename(work_fd, tmp, pfd, name)
        except BaseException:
            self.state.discard(tmp)
            raise

    def _discard_upper(self, pfd: int, name: bytes) -> None:
        """Remove an upper directory (holding only markers) at once, then its content."""
        self.state.discard(self.dirs.discard_upper(pfd, name))

    async def _not_empty(self, node: Node) -> bool:
        return bool(await self.reader.merged_entries(node, with_stats=False))

    async def unlink(self, parent: Node, name: bytes) -> None:
        self._check_remove(name)
        async with self.lock:
            node, _ = await self.names.child(parent, name)
            if node.is_dir:
                raise err(errno.EISDIR)
            await self._remove(parent, name, node)

    async def rmdir(self, parent: Node, name: bytes) -> None:
        self._check_remove(name)
        async with self.lock:
            node, _ = await self.names.child(parent, name)
            if not node.is_dir:
                raise err(errno.ENOTDIR)
            if await self._not_empty(node):
                raise err(errno.ENOTEMPTY)
            await self._remove(parent, name, node)

    def _check_remove(self, name: bytes) -> None:
        self.names.check_name(name)
        if self.readonly:
            raise err(errno.EROFS)

    async def _remove(self, parent: Node, name: bytes, node: Node) -> None:
        cow = not node.is_dir and self.cows.is_cow(node)
        entry = await self.cows.before_unlink(node) if cow else None
        try:
            cover = await self.names.lower_has(parent, name)
            await self.copying.copy_up(parent)
            await self.orphans.keep(node)
            hid_lower = cover
            with self.dirs.upper_fd(parent) as pfd, self.dirs.writable(pfd):
                if cover and fmt.whiteout_fits(name):
                    fmt.make_whiteout(pfd, name)
                    cover = False
                if node.upper and node.is_dir:
                    self._discard_upper(pfd, name)
                elif cow:  # (its name is short enough for a .wh. whiteout)
                    self.cows.remove(pfd, name, entry)
                elif node.upper and not cover:
                    self.upper.unlink(pfd, name)
                if cover:
                    self._kernel_whiteout(pfd, name)
        finally:
            self.cows.unlinked(entry)
        self.nodes.unlink(node, parent, name)
        if hid_lower and parent.tag is not None:
            await self.policy.whiteout_made(parent.tag, name)

    async def rename(self, old_parent: Node, old_name: bytes, new_parent: Node, new_name: bytes,
                     flags: int = 0) -> None:
        self.names.check_name(old_name)
        self.names.check_new(new_parent, new_name)
        if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE) or (
                flags & RENAME_NOREPLACE and flags & RENAME_EXCHANGE):
            raise err(errno.EINVAL)
        async with self.lock:
            src, _ = await self.names.child(old_parent, old_name)
            try:
                dst, _ = await self.names.child(new_parent, new_name)
            except FileNotFoundError:
                dst = None
            await self.cows.check_movable(src, dst)
            if flags & RENAME_EXCHANGE:
                if dst is None:
                    raise err(errno.ENOENT)
                await self._exchange(old_parent, old_name, src, new_parent, new_name, dst)
                return
            if dst is not None:
                if flags & RENAME_NOREPLACE:
                    raise err(errno.EEXIST)
                if dst is src:
                    return  # two links of one file: POSIX says do nothing
                if src.is_dir and not dst.is_dir:
                    raise err(errno.ENOTDIR)
                if dst.is_dir and not src.is_dir:
                    raise err(errno.EISDIR)
            if src.is_dir and _is_ancestor(src, new_parent):
                raise err(errno.EINVAL)
            # In kernel overlayfs' order, so that a rename that fails leaves the same
            # (invisible but for link counts) copy-ups: a target with lower entries is
            # checked first, the source copied up, then a pure upper target checked.
            target_dir = dst is not None and dst.is_dir
            if target_dir and dst.lower is not None and await self._not_empty(dst):
                raise err(errno.ENOTEMPTY)
            await self.copying.copy_up(src)
            if target_dir and dst.lower is None and await self._not_empty(dst):
                raise err(errno.ENOTEMPTY)
            await self._move(old_parent, old_name, src, new_parent, new_name, dst)

    async def _move(self, old_parent, old_name, src, new_parent, new_name, dst) -> None:
        same_place = old_parent is new_parent and old_name == new_name
        cover_old = await self.names.lower_has(old_parent, old_name)
        cover_new = src.is_dir and await self.names.lower_has(new_parent, new_name)
        await self.copying.copy_up(src)
        await self.copying.copy_up(new_parent)
        redirect = self.dirs.lower_path(src) if src.is_dir and src.lower is not None else None
        if dst is not None:
            await self.orphans.keep(dst)
        with self.dirs.upper_fd(old_parent) as ofd, self.dirs.upper_fd(new_parent) as nfd, \
                self.dirs.writable(ofd), self.dirs.writable(nfd):
            if src.is_dir and not same_place:
                self._mark_moved_dir(src, redirect, cover_new)
            if not src.is_dir:
                fmt.drop_stale_cow_map(nfd, new_name)
            short = fmt.whiteout_fits(old_name)
            if cover_old and short:
                fmt.make_whiteout(ofd, old_name)
            if dst is not None and dst.is_dir and dst.upper:
                try:
                    self.upper.rename(ofd, old_name, nfd, new_name)
                except OSError as e:
                    if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                        raise
                    self._discard_upper(nfd, new_name)  # it held only markers
                    self.upper.rename(ofd, old_name, nfd, new_name)
            else:
                self.upper.rename(ofd, old_name, nfd, new_name)
            if cover_old and not short:
                self._kernel_whiteout(ofd, old_name)
        if cover_old and old_parent.tag is not None:
            await self.policy.whiteout_made(old_parent.tag, old_name)
        if redirect is not None:
            src.lower = redirect
        if dst is not None:
            self.nodes.unlink(dst, new_parent, new_name)
        self.inodes.move(src, old_parent, old_name, new_parent, new_name)

    def _mark_moved_dir(self, node: Node, redirect: bytes | None, cover: bool) -> None:
        """Before an upper directory moves: where its lower entries are (*redirect*), or,
        if it brings none but lands on a lower entry (*cover*), that it hides it."""
        with self.dirs.upper_fd(node) as fd, self.dirs.keep_times(fd), self.dirs.writable(fd):
            if redirect is not None:
                fmt.write_redirect(fd, redirect, (self.dirs.work_fd, self.dirs.work_name()))
            elif cover:
                fmt.make_opaque(fd)

    async def _exchange(self, a_parent, a_name, a, b_parent, b_name, b) -> None:
        if a is b:
            return
        if (a.is_dir and _is_ancestor(a, b_parent)) or (b.is_dir and _is_ancestor(b, a_parent)):
            raise err(errno.EINVAL)
        # Each object lands where the other was: a directory there must not merge
        # with that name's lower entry unless it brings its own (a redirect).
        moves = []
        for node, to_parent, to_name in ((a, b_parent, b_name), (b, a_parent, a_name)):
            cover = node.is_dir and await self.names.lower_has(to_parent, to_name)
            moves.append((node, cover))
        for node in (a, b):
            await self.copying.copy_up(node)
        await self.copying.copy_up(a_parent)
        await self.copying.copy_up(b_parent)
        redirects = {}
        for node, cover in moves:
            if node.is_dir:
                if node.lower is not None:
                    redirects[node] = self.dirs.lower_path(node)
                self._mark_moved_dir(node, redirects.get(node), cover)
        with self.dirs.upper_fd(a_parent) as afd, self.dirs.upper_fd(b_parent) as bfd, \
                self.dirs.writable(afd), self.dirs.writable(bfd):
            self.upper.exchange(afd, a_name, bfd, b_name)
        for node, path in redirects.items():
            node.lower = path
        self.inodes.exchange(a, a_parent, a_name, b, b_parent, b_name)


def _is_ancestor(node: Node, other: Node | None) -> bool:
    while other is not None:
        if other is node:
            return True
        other = other.parent
    return False
