"""The nodes the kernel holds: made, found, unlinked, trimmed and forgotten.

The inode table numbers nodes; this part decides what a new node carries (the
policy's tag), keeps the table within its budget by asking the kernel to forget
the oldest nodes, and answers which nodes are immutable lower objects.
"""

import errno
import stat

from .descriptors import Descriptors
from .inodes import DERIVED, InodeTable, Node
from .policy import LowerPolicy
from .types import Notifier, err


class Nodes:
    def __init__(self, inodes: InodeTable, dirs: Descriptors, policy: LowerPolicy,
                 notify: Notifier, *, max_nodes: int):
        self.inodes, self.dirs = inodes, dirs
        self.policy, self.notify = policy, notify
        self.root = inodes.root
        self.root.tag = LowerPolicy.ROOT
        self.max_nodes = max_nodes
        self._made_since_trim = 0
        self._trim_asked: set[int] = set()  # nodes the kernel was asked to forget
        self.trims = 0

    def node(self, ino: int) -> Node:
        node = self.inodes.get(ino)
        if node is None:
            raise err(errno.ESTALE)
        return node

    def find(self, *names: bytes) -> Node | None:
        """The node at a merged path if the kernel holds it (no I/O)."""
        node = self.root
        for name in names:
            node = self.inodes.child(node, name)
            if node is None:
                return None
        return node

    async def new_node(self, parent: Node, name: bytes, kind: int, upper: bool, lower) -> Node:
        """A node for the entry *name* of *parent*, numbered as the policy says; the node
        someone else made for it while the policy was asked, if one was."""
        number = ((await self.policy.entry_numbers(parent.tag, [name]))[0]
                  if parent.tag is not None and lower is not None else None)
        made = self.inodes.child(parent, name)
        if made is not None:
            return made
        node = self.inodes.add(parent, name, kind, upper, lower, number)
        if parent.tag is not None and kind == stat.S_IFDIR:
            node.tag = self.policy.tag(parent.tag, name)
        self._made_since_trim += 1
        if len(self.inodes) > self.max_nodes and self._made_since_trim > self.max_nodes // 20:
            self.trim()
        return node

    def trim(self) -> None:
        """Keep memory bounded: ask the kernel to forget the oldest nodes beyond the
        budget.  It drops those entries it does not use and sends FORGETs, which
        remove the nodes; what it still uses (open files, working directories) stays.
        The FORGETs come late (the kernel takes the asks one at a time), so nodes
        already asked count as going: asking again would only queue more asks."""
        excess = len(self.inodes) - self.max_nodes
        # Some room beyond the excess, so that this runs once per batch of new nodes.
        batch = excess + self.max_nodes // 10 - len(self._trim_asked)
        if batch > 0:
            victims = self.inodes.oldest_leaves(batch, scan=4 * batch, skip=self._trim_asked)
            for node in victims:
                self.notify.entry_changed(node.parent.ino, node.name)
            self.inodes.to_back(victims)
            self._trim_asked.update(node.ino for node in victims)
            self.trims += len(victims)
        self._made_since_trim = 0

    def forget(self, ino: int, count: int) -> None:
        self.inodes.forget(ino, count)
        self._trim_asked.discard(ino)  # answered: if the kernel still holds it, ask anew

    def entry_sent(self, node: Node) -> None:
        """A listing handed *node* (from readdir_entry) to the kernel: one reference more."""
        node.lookups += 1

    def entry_refused(self, node: Node) -> None:
        """A listing had no room for *node* (from readdir_entry): dropped if unreferenced."""
        self.inodes.release_unreferenced(node)

    def dropped(self, node: Node) -> None:
        """*node* left the table."""
        self._trim_asked.discard(node.ino)

    def unlink(self, node: Node, parent: Node, name: bytes) -> None:
        """*parent*'s *name* no longer leads to *node*."""
        self.notify.node_detached(node.ino)
        if node.is_dir:
            self.dirs.forget(node)
        self.inodes.detach(node, parent, name)

    def immutable(self, node: Node) -> bool:
        """A lower object the policy says never changes (and no upper copy of it)."""
        if node.upper or node.lower is not DERIVED or node.parent is None:
            return False
        return self.policy.immutable(node.parent.tag)

    def attributes_settled(self, node: Node) -> bool:
        """Whether the kernel may keep *node*'s attributes for good: an object that never
        changes, still in the table and not asked to be forgotten."""
        return (self.inodes.get(node.ino) is node and node.ino not in self._trim_asked
                and self.immutable(node))
