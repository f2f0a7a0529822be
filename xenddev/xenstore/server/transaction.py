# -*- test-case-name: tests.test_xenstored_units -*-
"""
Transactions as C xenstored 4.17 does them: no snapshot of the tree, but a
private overlay of the nodes the transaction touched.

The first access to a node copies it (value, permissions, child names and
generation) into the overlay and records its generation (C{NO_GENERATION}
for a missing node); later accesses in the transaction see the copy. At
commit every recorded generation is compared with the global tree: any
difference is a conflict (EAGAIN). Otherwise the modified entries replace
the global nodes, and the watch events queued in the transaction fire.
"""

from __future__ import annotations

from xenddev.xenstore.server.tree import (
    NO_GENERATION,
    RECORD_HEADER,
    RECORD_PERM,
    PermSet,
    Tree,
    baseName,
    parentOf,
)


class TxNode:
    """
    A node as a transaction sees it: a private, mutable copy.

    @ivar dropped: the names L{removeChild} took out of C{children} (None
        for none), so that the commit can take them out of the global
        node without comparing every child.
    """

    __slots__ = ("children", "dropped", "generation", "perms", "value")

    def __init__(
        self, value: bytes, perms: PermSet, generation: int, children: list[bytes]
    ) -> None:
        self.value = value
        self.perms = perms
        self.generation = generation
        self.children = children
        self.dropped: list[bytes] | None = None

    def removeChild(self, name: bytes) -> None:
        """Take C{name} out of the children (it must be there)."""
        self.children.remove(name)
        if self.dropped is None:
            self.dropped = [name]
        else:
            self.dropped.append(name)

    def childNames(self) -> list[bytes]:
        """The children's names, in xenstored's order."""
        return list(self.children)

    def childBytes(self) -> bytes:
        """The DIRECTORY payload: each name NUL-terminated."""
        if not self.children:
            return b""
        return b"\0".join(self.children) + b"\0"

    def recordSize(self) -> int:
        """Size of the C daemon's record for this node (node-size quota)."""
        return (
            RECORD_HEADER
            + RECORD_PERM * len(self.perms.entries)
            + len(self.value)
            + sum(map(len, self.children))
            + len(self.children)
        )


class Accessed:
    """One node the transaction has touched (C C{struct accessed_node})."""

    __slots__ = (
        "checkGen",
        "fireWatch",
        "generation",
        "modified",
        "node",
        "oldPerms",
        "watchExact",
    )

    def __init__(self, node: TxNode | None, generation: int, checkGen: bool) -> None:
        self.node = node
        self.generation = generation
        self.checkGen = checkGen
        self.modified = False
        self.fireWatch = False
        self.watchExact = False
        self.oldPerms: PermSet | None = node.perms if node is not None else None


class TransactionQuotaExceeded(Exception):
    """An unprivileged transaction touched more nodes than its quota."""


class Transaction:
    """
    One open transaction of a connection.

    @ivar accessed: path -> L{Accessed}, in order of first access (commit
        writes and fires watches in this order, as C does).
    @ivar entryDeltas: change of the number of nodes owned per domain,
        applied at commit.
    @ivar failed: set when an error left the overlay inconsistent; commit
        then fails with ENOMEM, as in C.
    """

    def __init__(self, txId: int, tree: Tree, maxNodes: int | None) -> None:
        self.txId = txId
        self.tree = tree
        self.generation = tree.nextGeneration()
        self.accessed: dict[bytes, Accessed] = {}
        self.entryDeltas: dict[int, int] = {}
        self.maxNodes = maxNodes
        self.failed = False
        self.nodeCreated = False

    def _add(self, path: bytes, entry: Accessed) -> Accessed:
        if self.maxNodes is not None and len(self.accessed) >= self.maxNodes:
            self.failed = True
            raise TransactionQuotaExceeded(path)
        self.accessed[path] = entry
        return entry

    def read(self, path: bytes) -> TxNode | None:
        """Read C{path} as the transaction sees it, recording the access."""
        entry = self.accessed.get(path)
        if entry is not None:
            return entry.node
        g = self.tree.lookup(path)
        if g is None:
            self._add(path, Accessed(None, NO_GENERATION, True))
            return None
        gen = self.tree.observe(g)
        node = TxNode(g.value, g.perms, gen, list(g.children) if g.children else [])
        self._add(path, Accessed(node, gen, True))
        return node

    def _entry(self, path: bytes) -> Accessed:
        entry = self.accessed.get(path)
        if entry is None:
            entry = self._add(path, Accessed(None, NO_GENERATION, False))
        return entry

    def write(self, path: bytes, node: TxNode) -> None:
        """Store C{node} at C{path} in the overlay (a modifying access)."""
        entry = self._entry(path)
        node.generation = self.tree.nextGeneration()
        entry.node = node
        entry.modified = True

    def delete(self, path: bytes) -> None:
        """Mark C{path} deleted in the overlay."""
        entry = self._entry(path)
        self.tree.nextGeneration()
        entry.node = None
        entry.modified = True

    def countEntry(self, domid: int, delta: int) -> None:
        """Record a change of the nodes owned by C{domid}."""
        self.entryDeltas[domid] = self.entryDeltas.get(domid, 0) + delta

    def queueWatch(self, path: bytes, exact: bool) -> None:
        """
        Remember that C{path} changed; the event fires at commit. A
        non-exact event replaces an exact one, not the other way round.
        """
        entry = self.accessed.get(path)
        if entry is None:
            self.failed = True
            return
        if not entry.fireWatch:
            entry.fireWatch = True
            entry.watchExact = exact
        elif not exact:
            entry.watchExact = False

    def conflicts(self) -> bool:
        """Whether any node read has changed in the global tree since."""
        generationOf = self.tree.generationOf
        for path, entry in self.accessed.items():
            if entry.checkGen and generationOf(path) != entry.generation:
                return True
        return False

    def apply(self) -> list[tuple[bytes, bool, PermSet | None]]:
        """
        Write the modified nodes into the global tree (call after
        L{conflicts} said no). Return the queued watch events as
        C{(path, exact, oldPerms)} in access order.
        """
        tree = self.tree
        # Parents before children, so that a new node's parent exists (the
        # overlay is flat like the C daemon's TDB, our tree is not).
        present = sorted(
            (p for p, e in self.accessed.items() if e.modified and e.node is not None),
            key=lambda p: p.count(b"/") if p != b"/" else 0,
        )
        for path in present:
            tn = self.accessed[path].node
            assert tn is not None
            # A missing parent is prevented by the generation checks.
            tree.rewrite(path, tn.value, tn.perms, tn.children, tn.dropped or ())
        for path, entry in self.accessed.items():
            if entry.modified and entry.node is None and path != b"/":
                parent = tree.lookup(parentOf(path))
                if parent is not None and parent.children:
                    name = baseName(path)
                    if name in parent.children:
                        del parent.children[name]
                        if not parent.children:
                            parent.children = None
        for domid, delta in self.entryDeltas.items():
            if delta:
                tree.countEntry(domid, delta)
        return [
            (path, e.watchExact, e.oldPerms) for path, e in self.accessed.items() if e.fireWatch
        ]
