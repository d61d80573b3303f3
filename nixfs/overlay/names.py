"""Name resolution: what a name in a merged directory is, and its node and stat.

The upper is asked first (an object, a whiteout, an opaque or redirected
directory), then the lower (from a kept listing where the policy keeps one); the
answer makes or finds the node.  A node's stat comes from the layer it lives in,
its attributes add nixfs' overrides.  Names are checked here too.
"""

import errno
import os
import stat
from dataclasses import dataclass

import trio

from . import upperformat as fmt
from .cowfiles import CowFiles
from .descriptors import Descriptors
from .inodes import DERIVED, InodeTable, Node
from .lowerlayer import LowerLayer
from .upperlayer import UpperLayer
from .listings import Listings
from .nodes import Nodes
from .orphans import Orphans
from .policy import LowerPolicy
from .types import OUTAGE, Attr, NegativeEntry, err


@dataclass(slots=True)
class _Found:
    kind: int
    upper_st: os.stat_result | None
    lower: object
    lower_st: os.stat_result | None


@dataclass(slots=True)
class Shown:
    """How nodes are shown: the owner all show as (None: their own), attribute times."""
    owner: tuple[int, int] | None
    ttl: float
    immutable_ttl: float


class Names:
    def __init__(self, dirs: Descriptors, upper: UpperLayer, lower: LowerLayer, inodes: InodeTable,
                 nodes: Nodes, listings: Listings, orphans: Orphans, policy: LowerPolicy,
                 lock: trio.Lock, shown: Shown, cows: CowFiles, *, readonly: bool):
        self.dirs, self.upper, self.lower, self.inodes = dirs, upper, lower, inodes
        self.cows = cows
        self.nodes, self.listings, self.orphans = nodes, listings, orphans
        self.policy, self.lock, self.shown = policy, lock, shown
        self.readonly = readonly
        self.root = inodes.root
        # The last stat each lower directory's node got: during a lower outage a path walk
        # through directories already known still works (the kernel revalidates them).
        self._known_dirs: dict[int, os.stat_result] = {}
        self.stale_answers = 0

    def dropped(self, node: Node) -> None:
        self._known_dirs.pop(node.ino, None)

    def check_name(self, name: bytes) -> None:
        if len(name) > fmt.NAME_MAX:
            raise err(errno.ENAMETOOLONG)

    def check_new(self, parent: Node, name: bytes) -> None:
        """That *name* may be made in *parent* through the mount."""
        self.check_name(name)
        if self.readonly:
            raise err(errno.EROFS)
        if fmt.is_reserved(name):
            raise err(errno.EINVAL, "names starting with .wh. are reserved for whiteouts")
        if parent is self.root and name == fmt.STATE_DIR:
            raise err(errno.EPERM, "the name of nixfs' state folder is reserved")

    def hidden_name(self, parent: Node, name: bytes) -> bool:
        return fmt.is_reserved(name) or (parent is self.root and name == fmt.STATE_DIR)

    def _upper_probe(self, parent: Node, name: bytes):
        """What the upper says of *name*: (stat or None, lower hidden, opaque, redirect)."""
        if not parent.upper:
            return None, False, False, None
        with self.dirs.upper_fd(parent) as pfd:
            try:
                st = self.upper.lstat(pfd, name)
            except FileNotFoundError:
                st = None
            if st is not None and fmt.is_kernel_whiteout(st):
                return None, True, False, None
            hidden = parent.lower is not None and fmt.has_whiteout(pfd, name)
            opaque, redirect = False, None
            if st is not None and stat.S_ISDIR(st.st_mode):
                cfd = self.upper.open_dir(pfd, name)
                try:
                    opaque, redirect = fmt.read_dir_flags(cfd)
                finally:
                    os.close(cfd)
        return st, hidden, opaque, redirect

    def _redirect_target(self, parent: Node, redirect: bytes):
        if redirect.startswith(b"/"):
            return redirect.strip(b"/")
        if parent.lower is None:
            return None
        return self.dirs.child_lower_path(parent, redirect)

    async def lower_visible(self, parent: Node, name: bytes) -> bool:
        return parent.tag is None or await self.policy.lower_visible(parent.tag, name)

    async def lower_stat(self, parent: Node, name: bytes) -> os.stat_result | None:
        """The lower entry's stat; None if there is none, or it is a whiteout device
        (hidden, as kernel overlayfs hides whiteouts in any layer: shown, a copy-up
        would turn it into a whiteout of the upper and the name would vanish)."""
        st = await self._lower_entry_stat(parent, name)
        return None if st is None or fmt.is_kernel_whiteout(st) else st

    async def _lower_entry_stat(self, parent: Node, name: bytes) -> os.stat_result | None:
        if parent.lower is None or not await self.lower_visible(parent, name):
            return None
        listing = await self.listings.node_listing(parent)
        if listing is not None:
            return listing.stat(name) if name != b"." else None
        listing = await self.listings.listing_at(parent, name,
                                                 self.dirs.child_lower_path(parent, name))
        if listing is not None:
            return listing.stat(b".")
        try:
            async with self.dirs.lower_fd(parent) as pfd:
                return await self.lower.lstat(pfd, name)
        except (FileNotFoundError, NotADirectoryError):
            return None

    async def _resolve(self, parent: Node, name: bytes, lower_st=...) -> _Found:
        """Find *name* in *parent* across the layers; ENOENT if it is not there.

        *lower_st* may carry what a listing already learned of the lower entry.
        """
        up_st, hidden, opaque, redirect = self._upper_probe(parent, name)
        if up_st is not None and not stat.S_ISDIR(up_st.st_mode):
            return _Found(stat.S_IFMT(up_st.st_mode), up_st, None, None)
        if up_st is not None:
            if redirect is not None:
                return _Found(stat.S_IFDIR, up_st, self._redirect_target(parent, redirect), None)
            if opaque or hidden or parent.lower is None:
                return _Found(stat.S_IFDIR, up_st, None, None)
            if lower_st is ...:
                lower_st = await self.lower_stat(parent, name)
            merged = lower_st is not None and stat.S_ISDIR(lower_st.st_mode)
            return _Found(stat.S_IFDIR, up_st, DERIVED if merged else None, lower_st)
        if hidden or parent.lower is None:
            raise err(errno.ENOENT)
        if lower_st is ...:
            lower_st = await self.lower_stat(parent, name)
        if lower_st is None:
            raise err(errno.ENOENT)
        return _Found(stat.S_IFMT(lower_st.st_mode), None, DERIVED, lower_st)

    async def child(self, parent: Node, name: bytes, lower_st=...) -> tuple[Node, os.stat_result]:
        """The node for *name* in *parent* and its current stat; ENOENT if absent."""
        if not parent.is_dir:
            raise err(errno.ENOTDIR)
        if self.hidden_name(parent, name):
            raise err(errno.ENOENT)
        node = self.inodes.child(parent, name)
        if node is not None:
            if not node.upper and lower_st is not ... and lower_st is not None:
                return node, lower_st
            try:
                return node, await self.stat(node)
            except FileNotFoundError:
                # An upper object removed behind the mount's back (local-overlay:// deletes
                # upper copies in the upper layer itself) may uncover a lower one: forget
                # this name and look again.  Not while a change holds the lock: it may be
                # between moving the upper object and updating the table.
                if (not node.upper or self.lock.locked()
                        or self.inodes.child(parent, name) is not node):
                    raise
                self.nodes.unlink(node, parent, name)
        found = await self._resolve(parent, name, lower_st)
        node = self.inodes.child(parent, name)  # someone may have made it meanwhile
        if node is not None:
            return node, await self.stat(node)
        st = found.upper_st or found.lower_st
        if found.upper_st is not None and not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1:
            node = self.inodes.by_upper_ino(st.st_ino)
            if node is not None:
                self.inodes.attach(node, parent, name)
                return node, await self.shown_stat(node, st)
        node = await self.nodes.new_node(parent, name, found.kind, found.upper_st is not None,
                                         found.lower)
        if found.upper_st is not None and st.st_nlink > 1 and not node.is_dir:
            self.inodes.register_upper_ino(node, st.st_ino)
        if found.upper_st is not None:
            st = await self.shown_stat(node, st)
        return node, st

    async def live_child(self, parent: Node, name: bytes,
                         lower_st=...) -> tuple[Node, os.stat_result]:
        """``child`` for a node about to be handed to the kernel: never one dropped while
        it awaited (the kernel may forget a node while it looks the same name up again,
        e.g. after a revalidation found a new node)."""
        while True:
            node, st = await self.child(parent, name, lower_st)
            if self.inodes.get(node.ino) is node:
                return node, st

    async def exists(self, parent: Node, name: bytes) -> bool:
        try:
            await self.child(parent, name)
        except FileNotFoundError:
            return False
        return True

    async def lower_has(self, parent: Node, name: bytes) -> bool:
        """Whether removing the upper *name* would uncover a lower entry."""
        if parent.lower is None:
            return False
        if parent.upper:
            with self.dirs.upper_fd(parent) as pfd:
                try:
                    st = self.upper.lstat(pfd, name)
                    if fmt.is_kernel_whiteout(st):
                        return False
                except FileNotFoundError:
                    pass
                if fmt.has_whiteout(pfd, name):
                    return False
        return await self.lower_stat(parent, name) is not None

    async def stat(self, node: Node) -> os.stat_result:
        if node is self.root:
            return self.upper.fstat(self.upper.root_fd)
        if node.parent is None:
            return self.cows.stat(node, self.orphans.stat(node))
        if node.upper:
            with self.dirs.upper_fd(node.parent) as pfd:
                st = self.upper.lstat(pfd, node.name)
            return await self.shown_stat(node, st)
        # During a lower outage a directory already known answers with what the lower last
        # said of it, so path walks through it (the kernel revalidates every ttl) go on.
        known = self._known_dirs.get(node.ino)
        if known is not None and self.lower.out:
            self.stale_answers += 1
            return known
        try:
            st = await self.lower_stat(node.parent, node.name)
        except OSError as e:
            if e.errno not in OUTAGE or known is None:
                raise
            self.stale_answers += 1
            return known
        if st is None:
            raise err(errno.ENOENT, "gone from the lower")
        return st

    async def shown_stat(self, node: Node, st: os.stat_result) -> os.stat_result:
        """The stat an upper object shows, from its layer's *st*: a copy-on-write file's
        is its logical size (its delta's is not)."""
        return await self.cows.shown(node, st)

    def attr(self, node: Node, st: os.stat_result) -> Attr:
        if node.kind == stat.S_IFDIR and not node.upper:
            self._known_dirs[node.ino] = st
        nlink = 1 if node.merged else st.st_nlink
        if self.shown.owner is not None:
            uid, gid = self.shown.owner
        else:
            uid, gid = st.st_uid, st.st_gid
        fixed = self.nodes.immutable(node)
        ttl = self.shown.immutable_ttl if fixed else self.shown.ttl
        return Attr(node.ino, st, nlink, uid, gid, ttl, fixed)

    async def getattr(self, node: Node) -> Attr:
        return self.attr(node, await self.stat(node))

    async def lookup(self, parent: Node, name: bytes) -> tuple[Node, Attr]:
        """Find *name*; the kernel now holds one more reference to the node.

        A name missing from a lower directory that never changes raises NegativeEntry,
        which the kernel may keep."""
        self.check_name(name)
        try:
            node, st = await self.live_child(parent, name)
        except FileNotFoundError:
            if (not parent.upper and parent.lower is DERIVED and parent.is_dir
                    and self.policy.complete(parent.tag) and self.nodes.immutable(parent)):
                raise NegativeEntry(self.shown.immutable_ttl) from None
            raise
        node.lookups += 1
        return node, self.attr(node, st)
