"""Reading directories and symlinks of the merged tree.

A directory's listing merges the upper's entries (minus whiteouts and markers)
with the lower's (from a kept listing, the policy's names, or the lower itself);
reading it hands out nodes made from what the listing saw, without asking the
layers again where that is safe.  A symlink's target comes from the layer, or
from a kept listing.
"""

import errno
import os
import stat

from . import upperformat as fmt
from .descriptors import Descriptors
from .dircache import Listing
from .inodes import DERIVED, InodeTable, Node
from .lowerlayer import LowerLayer
from .upperlayer import UpperLayer
from .listings import Listings
from .names import Names
from .nodes import Nodes
from .policy import LowerPolicy
from .types import Attr, DirHandle, Dirent, Entry, OpenTable, err


# A lower entry whose stat a listing has not learnt yet (see DirReader._stat_unstated).
UNSTATED = os.stat_result((0,) * 10)
# Names stated per lower call when a listing's entries are read: a store listing may
# hold a million names, which one call would take longer than ``lower_timeout`` for.
STAT_CHUNK = 256


def _shown_lower(listing: Listing) -> list[Entry]:
    """What a directory shows of its kept lower listing: every entry but ``.``,
    reserved names and kernel whiteouts (all of it when the directory is lower-only;
    ``merged_entries`` merges it with the upper)."""
    shown = []
    for name, st in listing.stats():
        if name != b"." and not fmt.is_reserved(name) and not fmt.is_kernel_whiteout(st):
            shown.append(Entry(name, None, st))
    return shown


class DirReader:
    """*nodeless_over*: a listing of more entries than this is sent without nodes
    where it can (None: never; the adapter says whether it can send such entries).
    Nodes past the budget are trimmed again anyway, at the cost of a round trip each,
    and a million-path store is listed whole by Nix's garbage collector."""

    def __init__(self, dirs: Descriptors, upper: UpperLayer, lower: LowerLayer, inodes: InodeTable,
                 nodes: Nodes, names: Names, listings: Listings, policy: LowerPolicy,
                 handles: OpenTable, nodeless_over: int | None = None):
        self.dirs, self.upper, self.lower, self.inodes = dirs, upper, lower, inodes
        self.nodes, self.names, self.listings = nodes, names, listings
        self.policy, self.handles = policy, handles
        self.root = inodes.root
        self.nodeless_over = nodeless_over
        self.nodeless_sent = 0

    async def merged_entries(self, node: Node, *, with_stats: bool) -> list[Entry]:
        """The merged entries of a directory, upper first."""
        entries, hidden = self._upper_entries(node, with_stats)
        kept = await self.listings.node_listing(node) if node.lower is not None else None
        if kept is not None:
            for entry in _shown_lower(kept):
                if entry.name in hidden or self.names.hidden_name(node, entry.name):
                    continue
                if entry.name in entries:
                    entries[entry.name].lower_st = entry.lower_st
                else:
                    entries[entry.name] = entry
        elif node.lower is not None:
            names = await self.policy.lower_names(node.tag) if node.tag is not None else None
            try:
                async with self.dirs.lower_fd(node) as fd:
                    if names is not None:
                        # Stated by readdir_entry as the kernel reads them, a chunk at a
                        # time: the first reply comes at once, no call outlasts the timeout.
                        names = [n for n in names if n not in entries and n not in hidden]
                        lower = [(n, UNSTATED if with_stats else None) for n in names]
                    elif with_stats:
                        lower = await self.lower.scan_stats(fd)
                    else:
                        listed = await self.lower.scandir(fd)
                        # Whiteout devices are hidden: stat what is not plainly a file,
                        # a directory or a symlink (rare: devices, FIFOs, sockets).
                        odd = [n for n, kind in listed if kind == 0]
                        odd_st = dict(await self.lower.stat_names(fd, odd) if odd else [])
                        lower = [(n, odd_st.get(n)) for n, kind in listed if kind or n in odd_st]
            except (FileNotFoundError, NotADirectoryError):
                lower = []  # a redirect whose lower directory is gone
            for name, st in lower:
                if name in hidden or self.names.hidden_name(node, name) or (
                        st is not None and st is not UNSTATED and fmt.is_kernel_whiteout(st)):
                    continue
                if names is None and not await self.names.lower_visible(node, name):
                    continue  # (names from the policy are visible by definition)
                if name in entries:
                    entries[name].lower_st = st
                else:
                    entries[name] = Entry(name, None, st)
        return list(entries.values())

    def _upper_entries(self, node: Node, with_stats: bool) -> tuple[dict[bytes, Entry], set]:
        """A directory's upper entries by name, and the names its whiteouts hide."""
        entries: dict[bytes, Entry] = {}
        hidden: set[bytes] = set()
        if not node.upper:
            return entries, hidden
        with self.dirs.upper_fd(node) as fd:
            for name, kind in self.upper.scandir(fd):
                if fmt.is_reserved(name):
                    hidden.add(name[len(fmt.WHITEOUT_PREFIX):])
                    continue
                if node is self.root and name == fmt.STATE_DIR:
                    continue
                st = None
                if with_stats or kind == 0:
                    try:
                        st = self.upper.lstat(fd, name)
                    except FileNotFoundError:
                        continue
                    if fmt.is_kernel_whiteout(st):
                        hidden.add(name)
                        continue
                entries[name] = Entry(name, st, None)
        return entries, hidden

    async def list_dir(self, node: Node) -> DirHandle:
        """A snapshot of a directory's merged entries (not registered as open)."""
        if not node.is_dir:
            raise err(errno.ENOTDIR)
        fixed = (not node.upper and self.policy.complete(node.tag)
                 and self.nodes.immutable(node))
        if fixed:
            # An immutable lower-only directory (most of a store walk): its kept listing
            # is all there is to show, with nothing to merge.
            kept = await self.listings.node_listing(node)
            if kept is not None:
                return DirHandle(self.handles.number(), node, _shown_lower(kept), True)
        entries = await self.merged_entries(node, with_stats=True)
        nodeless = self.nodeless_over is not None and len(entries) > self.nodeless_over
        return DirHandle(self.handles.number(), node, entries, fixed, nodeless)

    async def opendir(self, node: Node) -> DirHandle:
        dh = await self.list_dir(node)
        self.handles.add(dh)
        return dh

    async def readdir_entry(self, dh: DirHandle, index: int) -> tuple[Node, Attr] | Dirent | None:
        """The node of entry *index* (not yet referenced), or None if it is gone; in a
        listing sent without nodes, a Dirent where the entry's number is known."""
        entry = dh.entries[index]
        if entry.lower_st is UNSTATED:
            await self._stat_unstated(dh, index)
        parent = dh.node
        if dh.nodeless:
            dirent = self._dirent(parent, entry)
            if dirent is not None:
                self.nodeless_sent += 1
                return dirent
        child = self.inodes.child(parent, entry.name)
        if dh.fixed and entry.upper_st is None and self.policy.immutable(parent.tag):
            # In an immutable lower-only directory the listing's stat is the object's:
            # no layer to ask, whether the node is new or still known.
            st = entry.lower_st
            if child is None:
                child = await self.nodes.new_node(parent, entry.name, stat.S_IFMT(st.st_mode),
                                                  False, DERIVED)
            elif child.upper or child.lower is not DERIVED:
                child = None  # copied up meanwhile: ask the layers below
            if child is not None:
                return child, self.names.attr(child, st)
        elif child is None:
            # The listing already looked at both layers: what it saw makes the node,
            # unless it is an upper directory (whose markers decide how it merges).
            st = entry.upper_st or entry.lower_st
            if entry.upper_st is None and entry.lower_st is not None:
                node = await self.nodes.new_node(parent, entry.name, stat.S_IFMT(st.st_mode),
                                                 False, DERIVED)
                return node, self.names.attr(node, st)
            if st is not None and not stat.S_ISDIR(st.st_mode) and st.st_nlink == 1:
                node = await self.nodes.new_node(parent, entry.name, stat.S_IFMT(st.st_mode),
                                                 True, None)
                return node, self.names.attr(node, await self.names.shown_stat(node, st))
        try:
            node, st = await self.names.live_child(parent, entry.name, entry.lower_st)
        except FileNotFoundError:
            return None
        return node, self.names.attr(node, st)

    def _dirent(self, parent: Node, entry: Entry) -> Dirent | None:
        """The entry as a Dirent, with the number its node has or will have; None
        where that is not known (an upper-only entry, or the number taken)."""
        child = self.inodes.child(parent, entry.name)
        if child is not None:
            return Dirent(child.ino, child.kind)
        st = entry.upper_st or entry.lower_st
        ino = self.inodes.numbered(entry.number)
        if st is None or ino is None or self.inodes.get(ino) is not None:
            return None
        return Dirent(ino, stat.S_IFMT(st.st_mode))

    async def _stat_unstated(self, dh: DirHandle, index: int) -> None:
        """Learn the lower stats of the unstated entries among the next STAT_CHUNK from
        *index*: from kept listings where they are known, else in one lower call.  An
        entry gone meanwhile (or a kernel whiteout) is left with none."""
        chunk = [e for e in dh.entries[index:index + STAT_CHUNK] if e.lower_st is UNSTATED]
        known, unknown = await self.listings.kept_stats(dh.node, [e.name for e in chunk])
        found = dict(known)
        if unknown:
            try:
                async with self.dirs.lower_fd(dh.node) as fd:
                    found.update(await self.lower.stat_names(fd, unknown))
            except (FileNotFoundError, NotADirectoryError):
                pass  # the lower directory is gone: so are its entries
        numbers = (await self.policy.entry_numbers(dh.node.tag, [e.name for e in chunk])
                   if dh.nodeless else [None] * len(chunk))
        for e, number in zip(chunk, numbers):
            st = found.get(e.name)
            e.lower_st = None if st is None or fmt.is_kernel_whiteout(st) else st
            e.number = number

    def releasedir(self, fh: int) -> None:
        self.handles.pop(fh)

    def dirhandle(self, fh: int) -> DirHandle:
        return self.handles.dir(fh)

    async def readlink(self, node: Node) -> bytes:
        if node.kind != stat.S_IFLNK:
            raise err(errno.EINVAL)
        if node.upper:
            with self.dirs.upper_fd(node.parent) as pfd:
                return self.upper.readlink(pfd, node.name)
        listing = await self.listings.node_listing(node.parent)
        if listing is None:
            listing = await self.listings.node_listing(node)
            name = b"."
        else:
            name = node.name
        if listing is not None and name in listing.targets:
            return listing.targets[name]
        async with self.dirs.lower_fd(node.parent) as pfd:
            return await self.lower.readlink(pfd, node.name)
