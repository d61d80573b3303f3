"""Nodes of the merged tree and the table that numbers them.

A node is what the kernel knows as an inode.  Its number is ours, handed out
once and never reused, so it stays the same across a copy-up and never aliases
a host inode.  A node records where its object lives:

- ``upper``: the object exists in the upper at the node's merged path;
- ``lower``: ``None`` (nothing from the lower), ``DERIVED`` (the lower object at
  the parent's lower path plus the name), or an explicit lower path (a renamed
  directory that keeps merging with where it came from).

Nodes are kept while the kernel holds a lookup reference or a child needs them;
``forget`` drops them.  Everything a node says can be read again from disk.
"""

import stat
from collections.abc import Iterator

ROOT_INO = 1
DERIVED = True
# Nodes the policy numbers (entry_numbers: a store path, after its lower id) get this
# plus their number; all others count up from the root, far below it.
NUMBERED_BASE = 1 << 48


class Node:
    __slots__ = ("ino", "parent", "name", "kind", "upper", "lower", "lookups",
                 "children", "aliases", "tag")

    def __init__(self, ino: int, parent: "Node | None", name: bytes, kind: int,
                 upper: bool, lower):
        self.ino = ino
        self.parent = parent
        self.name = name
        self.kind = kind
        self.upper = upper
        self.lower = lower
        self.lookups = 0
        self.children: dict[bytes, Node] | None = None
        # Other (parent, name) pairs of an upper object with several hard links.
        self.aliases: set[tuple[Node, bytes]] | None = None
        self.tag: str | None = None  # set by the model's policy for directories it watches

    @property
    def is_dir(self) -> bool:
        return self.kind == stat.S_IFDIR

    @property
    def merged(self) -> bool:
        """A directory with entries from both layers."""
        return self.upper and self.lower is not None and self.is_dir

    def path(self) -> bytes:
        """The merged path (which is also the upper path) relative to the root."""
        parts = []
        node = self
        while node.parent is not None:
            parts.append(node.name)
            node = node.parent
        return b"/".join(reversed(parts))

    def __repr__(self) -> str:
        return f"<Node {self.ino} {self.path()!r} upper={self.upper} lower={self.lower!r}>"


class InodeTable:
    def __init__(self, root_kind: int = stat.S_IFDIR, on_drop=None):
        self.root = Node(ROOT_INO, None, b"", root_kind, True, b"")
        self.root.lookups = 1
        self._nodes: dict[int, Node] = {ROOT_INO: self.root}
        self._next = ROOT_INO + 1
        # Upper inode number -> node, for upper objects with several hard links.
        self._by_upper_ino: dict[int, Node] = {}
        self.on_drop = on_drop  # callback(node) when a node leaves the table

    def __len__(self) -> int:
        return len(self._nodes)

    def __iter__(self) -> Iterator[Node]:
        return iter(self._nodes.values())

    @staticmethod
    def numbered(number: int | None) -> int | None:
        """The inode number of a node the policy numbers *number*."""
        return None if number is None else NUMBERED_BASE + number

    def get(self, ino: int) -> Node | None:
        return self._nodes.get(ino)

    def child(self, parent: Node, name: bytes) -> Node | None:
        return parent.children.get(name) if parent.children else None

    def add(self, parent: Node, name: bytes, kind: int, upper: bool, lower,
            number: int | None = None) -> Node:
        """A new node: numbered after *number* if given (and no other node has that
        number now), else with the next number of our own."""
        ino = self.numbered(number)
        if ino is None or ino in self._nodes:
            ino = self._next
            self._next += 1
        node = Node(ino, parent, name, kind, upper, lower)
        self._nodes[node.ino] = node
        self.attach(node, parent, name)
        return node

    def attach(self, node: Node, parent: Node, name: bytes) -> None:
        """Make *node* the entry *name* of *parent* (its first or another link)."""
        self._set_child(parent, name, node)
        if node.parent is None:
            node.parent, node.name = parent, name
        elif (node.parent, node.name) != (parent, name):
            if node.aliases is None:
                node.aliases = set()
            node.aliases.add((parent, name))

    def detach(self, node: Node, parent: Node, name: bytes) -> None:
        """Remove the entry *name* of *parent*, which names *node*."""
        self._del_child(parent, name, node)
        if (node.parent, node.name) == (parent, name):
            node.parent = None  # unlinked unless another link takes over
            if node.aliases:
                node.parent, node.name = node.aliases.pop()
        elif node.aliases:
            node.aliases.discard((parent, name))
        if not node.aliases:
            node.aliases = None
        self._maybe_drop(node)
        self._maybe_drop(parent)

    def move(self, node: Node, old_parent: Node, old_name: bytes,
             new_parent: Node, new_name: bytes) -> None:
        """Rename one link of *node*; whatever *new_name* named is detached."""
        self._del_child(old_parent, old_name, node)
        self._set_child(new_parent, new_name, node)
        self._relink(node, (old_parent, old_name), (new_parent, new_name))
        self._maybe_drop(old_parent)

    def exchange(self, a: Node, a_parent: Node, a_name: bytes,
                 b: Node, b_parent: Node, b_name: bytes) -> None:
        """Swap the entries ``a_parent/a_name`` (naming *a*) and ``b_parent/b_name``."""
        self._del_child(a_parent, a_name, a)
        self._del_child(b_parent, b_name, b)
        self._set_child(a_parent, a_name, b)
        self._set_child(b_parent, b_name, a)
        self._relink(a, (a_parent, a_name), (b_parent, b_name))
        self._relink(b, (b_parent, b_name), (a_parent, a_name))

    @staticmethod
    def _relink(node: Node, old: tuple, new: tuple) -> None:
        if (node.parent, node.name) == old:
            node.parent, node.name = new
        else:
            node.aliases.discard(old)
            node.aliases.add(new)

    def _set_child(self, parent: Node, name: bytes, node: Node) -> None:
        if parent.children is None:
            parent.children = {}
        old = parent.children.get(name)
        if old is not None and old is not node:
            self.detach(old, parent, name)
            if parent.children is None:
                parent.children = {}
        parent.children[name] = node

    @staticmethod
    def _del_child(parent: Node, name: bytes, node: Node) -> None:
        if parent.children and parent.children.get(name) is node:
            del parent.children[name]
            if not parent.children:
                parent.children = None

    def register_upper_ino(self, node: Node, upper_ino: int) -> None:
        self._by_upper_ino[upper_ino] = node

    def by_upper_ino(self, upper_ino: int) -> Node | None:
        node = self._by_upper_ino.get(upper_ino)
        if node is not None and node.ino not in self._nodes:
            del self._by_upper_ino[upper_ino]
            return None
        return node

    def oldest_leaves(self, count: int, scan: int, skip: set[int] = frozenset()) -> list[Node]:
        """Up to *count* of the oldest nodes the kernel could forget (no children), but
        those in *skip*, looking at no more than *scan* nodes: candidates for trimming."""
        out = []
        for i, node in enumerate(self._nodes.values()):
            if len(out) >= count or i >= scan:
                break
            if (node is not self.root and node.parent is not None and not node.children
                    and node.ino not in skip):
                out.append(node)
        return out

    def to_back(self, nodes: list[Node]) -> None:
        """Count *nodes* as the newest: the kernel was asked to forget them, so the next
        candidates are others (asking again before its FORGETs come would only pile
        up requests behind the first)."""
        for node in nodes:
            if self._nodes.get(node.ino) is node:
                self._nodes[node.ino] = self._nodes.pop(node.ino)

    def forget(self, ino: int, count: int) -> None:
        node = self._nodes.get(ino)
        if node is None or node is self.root:
            return
        node.lookups = max(0, node.lookups - count)
        self._maybe_drop(node)

    @staticmethod
    def descendants(node: Node):
        """Every node below *node* (depth first)."""
        stack = list((node.children or {}).values())
        while stack:
            below = stack.pop()
            yield below
            if below.children:
                stack.extend(below.children.values())

    def release_unreferenced(self, node: Node) -> None:
        """Drop a node that was created but never handed to the kernel."""
        self._maybe_drop(node)

    def _maybe_drop(self, node: Node) -> None:
        while (node is not self.root and node.lookups == 0 and not node.children
               and node.ino in self._nodes):
            del self._nodes[node.ino]
            parent = node.parent
            links = [(parent, node.name)] if parent is not None else []
            links.extend(node.aliases or ())
            for p, n in links:
                self._del_child(p, n, node)
            if self.on_drop:
                self.on_drop(node)
            if parent is None:
                return
            node = parent
