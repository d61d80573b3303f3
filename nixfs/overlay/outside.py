"""Changes made outside the mount, and the upper changed on a caller's behalf.

The lower gains or loses entries (a Nix store's paths come and go), or the policy
changes its mind about one: what nixfs and the kernel cached of it is forgotten.
The Nix side also removes an upper copy that duplicates a lower object, and
undoes a whiteout when the lower object comes back.
"""

import os

import trio

from . import upperformat as fmt
from .descriptors import Descriptors
from .inodes import InodeTable
from .upperlayer import UpperLayer
from .listings import Listings
from .names import Names
from .nodes import Nodes
from .policy import LowerPolicy
from .sharedfds import SharedFds
from .state import UpperState
from .types import Notifier


class Outside:
    def __init__(self, dirs: Descriptors, upper: UpperLayer, inodes: InodeTable, nodes: Nodes,
                 names: Names, listings: Listings, lower_files: SharedFds, policy: LowerPolicy,
                 notify: Notifier, lock: trio.Lock, state: UpperState):
        self.dirs, self.upper, self.inodes = dirs, upper, inodes
        self.nodes, self.names = nodes, names
        self.listings, self.lower_files = listings, lower_files
        self.policy, self.notify, self.lock, self.state = policy, notify, lock, state

    async def lower_entry_changed(self, dir_names: tuple[bytes, ...], name: bytes) -> None:
        """The lower gained or lost *name* (or the policy changed its mind about it):
        forget what nixfs and the kernel cached about that entry."""
        path = b"/".join(dir_names + (name,))
        self.policy.forget(path)
        self.listings.forget(path)
        self.lower_files.forget(path)
        parent = self.nodes.find(*dir_names)
        if parent is None:
            return  # nobody has looked below it: nothing is cached
        self.notify.listing_changed(parent.ino)
        child = self.inodes.child(parent, name)
        if child is not None:
            if child.upper:
                if child.is_dir and child.lower is not None:
                    self.dirs.forget_lower(child)
                    if not await self.names.lower_visible(parent, name):
                        child.lower = None
            else:
                # What is below it left the lower too (nodes the kernel still holds, e.g.
                # a working directory, answer from the lower from now on: "gone").
                for below in self.inodes.descendants(child):
                    self.notify.node_detached(below.ino)
                self.nodes.unlink(child, parent, name)
        self.notify.entry_changed(parent.ino, name)

    async def discard_upper(self, dir_names: tuple[bytes, ...], name: bytes) -> bool:
        """Remove the upper copy of ``dir/name`` so the lower one shows (a duplicate)."""
        async with self.lock:
            pfd = self.upper.open_dir_path(b"/".join(dir_names))
            try:
                try:
                    st = self.upper.lstat(pfd, name)
                except FileNotFoundError:
                    return False
                if fmt.is_kernel_whiteout(st):
                    return False
                with self.dirs.writable(pfd):
                    trash = self.dirs.discard_upper(pfd, name)
            finally:
                os.close(pfd)
            parent = self.nodes.find(*dir_names)
            child = self.inodes.child(parent, name) if parent else None
            if child is not None:
                self.nodes.unlink(child, parent, name)
            if parent is not None:
                self.notify.entry_changed(parent.ino, name)
                self.notify.listing_changed(parent.ino)
        await trio.to_thread.run_sync(self.state.discard, trash)
        return True

    async def unhide(self, dir_names: tuple[bytes, ...], name: bytes) -> bool:
        """Undo the whiteout of a lower ``dir/name``; False if there was none."""
        async with self.lock:
            pfd = self.upper.open_dir_path(b"/".join(dir_names))
            try:
                with self.dirs.writable(pfd):
                    removed = self._remove_whiteouts(pfd, name)
            finally:
                os.close(pfd)
            if removed:
                await self.lower_entry_changed(dir_names, name)
            return removed

    def _remove_whiteouts(self, pfd: int, name: bytes) -> bool:
        """Remove nixfs' and the kernel's whiteout of *name* in *pfd*; whether there was one."""
        removed = False
        if fmt.whiteout_fits(name):
            try:
                self.upper.unlink(pfd, fmt.whiteout_name(name))
                removed = True
            except FileNotFoundError:
                pass
        try:
            st = self.upper.lstat(pfd, name)
            if fmt.is_kernel_whiteout(st):
                self.upper.unlink(pfd, name)
                removed = True
        except FileNotFoundError:
            pass
        return removed
