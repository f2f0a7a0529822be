"""
The embedded xenstored's compact tree (L{xenddev.xenstore.server.tree}):
plain leaves (a value in the parent's dict instead of a node object),
interned names, and what clients see staying the same around them. The
differential test compares the behaviour with the C daemon; these tests pin
the representation and the cases it does not generate (a root owned by a
guest, a tiny path limit, names coming and going).
"""

from __future__ import annotations

import gc
import tracemalloc

from twisted.trial.unittest import TestCase

from tests.test_xenstored_regressions import Client
from xenddev.xenstore.server.core import XenStoreServer
from xenddev.xenstore.server.persistence import dumpTree, loadTree
from xenddev.xenstore.server.quota import Quotas
from xenddev.xenstore.server.tree import DEFAULT_PERMS, UNSEEN, LeafView, Names, Node, Tree
from xenddev.xenstore.wire import Op


def entry(tree: Tree, path: bytes) -> object:
    """What the parent's dict holds for C{path} (a L{Node} or a plain value)."""
    parent, _, name = path.rpartition(b"/")
    node = tree.lookup(parent or b"/")
    assert node is not None and node.children is not None
    return node.children[name]


class PlainLeafTests(TestCase):
    """Which nodes are plain leaves, and that clients cannot tell."""

    def setUp(self) -> None:
        self.server = XenStoreServer()
        self.tree = self.server.tree
        self.dom0 = Client(self.server)

    def start(self) -> int:
        """Start a transaction as dom0; its id."""
        ((kind, payload),) = self.dom0.request(Op.TRANSACTION_START, raw=b"\0")
        self.assertEqual(kind, "reply")
        return int(payload.rstrip(b"\0"))

    def inTx(self, txId: int, op: int, payload: bytes) -> bytes:
        """Send one request as dom0 in transaction C{txId}; the reply's payload."""
        self.server.handle(self.dom0.conn, op, 1, txId, payload)
        self.dom0.conn.flush()
        reply = self.dom0.packets.pop()
        return bytes(reply.payload)

    def perms(self, path: bytes) -> bytes:
        ((kind, payload),) = self.dom0.request(Op.GET_PERMS, path)
        self.assertEqual(kind, "reply")
        return payload

    def test_leavesArePlain(self) -> None:
        """A new leaf with its parent's permissions is its value; a directory a node."""
        self.dom0.request(Op.WRITE, raw=b"/d/a\0one")
        self.dom0.request(Op.MKDIR, b"/d/b")
        self.assertEqual(entry(self.tree, b"/d/a"), b"one")
        self.assertEqual(entry(self.tree, b"/d/b"), b"")
        self.assertIsInstance(entry(self.tree, b"/d"), Node)
        view = self.tree.lookup(b"/d/a")
        assert view is not None
        self.assertIsInstance(view, LeafView)
        self.assertEqual((view.value, view.perms, view.children), (b"one", DEFAULT_PERMS, None))
        self.assertIsNone(self.tree.lookup(b"/d/a/below"))
        # A child makes a plain leaf a node, keeping its value.
        self.dom0.request(Op.WRITE, raw=b"/d/a/x\0two")
        self.assertIsInstance(entry(self.tree, b"/d/a"), Node)
        self.assertEqual(self.dom0.request(Op.READ, b"/d/a"), [("reply", b"one")])

    def test_guestLeafUnderForeignParent(self) -> None:
        """A guest's node below dom0's directory has other permissions: a node."""
        self.dom0.request(Op.MKDIR, b"/shared")
        self.dom0.request(Op.SET_PERMS, b"/shared", b"n0", b"w5")
        guest = Client(self.server, 5)
        self.assertEqual(guest.request(Op.WRITE, raw=b"/shared/g\0v"), [("reply", b"OK\0")])
        self.assertIsInstance(entry(self.tree, b"/shared/g"), Node)
        self.assertEqual(self.perms(b"/shared/g"), b"n5\0w5\0")
        # Its own children inherit its permissions: plain again.
        guest.request(Op.WRITE, raw=b"/shared/g/h\0v")
        self.assertEqual(entry(self.tree, b"/shared/g/h"), b"v")
        self.assertEqual(self.perms(b"/shared/g/h"), b"n5\0w5\0")

    def test_parentPermissionsChange(self) -> None:
        """A parent's new permissions are not its plain children's."""
        self.dom0.request(Op.WRITE, raw=b"/p/a\0x")
        self.dom0.request(Op.SET_PERMS, b"/p", b"n5")
        self.assertEqual(self.perms(b"/p/a"), b"n0\0")
        self.assertEqual(self.perms(b"/p"), b"n5\0")
        self.assertIsInstance(entry(self.tree, b"/p/a"), Node)
        # The five initial nodes, /p/a; /p.
        self.assertEqual(self.tree.entries, {0: 6, 5: 1})

    def test_parentPermissionsChangeInTransaction(self) -> None:
        """The same through a transaction's commit."""
        self.dom0.request(Op.WRITE, raw=b"/p/a\0x")
        txId = self.start()
        self.assertEqual(self.inTx(txId, Op.SET_PERMS, b"/p\0n5\0"), b"OK\0")
        self.assertEqual(self.inTx(txId, Op.WRITE, b"/p/b\0new"), b"OK\0")
        self.assertEqual(self.inTx(txId, Op.TRANSACTION_END, b"T\0"), b"OK\0")
        self.assertEqual(self.perms(b"/p/a"), b"n0\0")
        self.assertEqual(self.perms(b"/p/b"), b"n5\0")
        self.assertEqual(entry(self.tree, b"/p/b"), b"new")
        self.assertIsInstance(entry(self.tree, b"/p/a"), Node)

    def test_generations(self) -> None:
        """
        A transaction's read gives a plain leaf a node for its generation;
        the node stays (a commit updates it in place), unseen again.
        """
        self.dom0.request(Op.WRITE, raw=b"/c\0" + b"0")
        txId = self.start()
        self.assertEqual(self.inTx(txId, Op.READ, b"/c\0"), b"0")
        node = entry(self.tree, b"/c")
        assert isinstance(node, Node)
        self.assertNotEqual(node.generation, UNSEEN)
        self.assertEqual(self.inTx(txId, Op.WRITE, b"/c\0" + b"1"), b"OK\0")
        self.assertEqual(self.inTx(txId, Op.TRANSACTION_END, b"T\0"), b"OK\0")
        self.assertIs(entry(self.tree, b"/c"), node)
        self.assertEqual((node.value, node.generation), (b"1", UNSEEN))
        # A new leaf committed by a transaction is plain.
        txId = self.start()
        self.assertEqual(self.inTx(txId, Op.WRITE, b"/n\0" + b"2"), b"OK\0")
        self.assertEqual(self.inTx(txId, Op.TRANSACTION_END, b"T\0"), b"OK\0")
        self.assertEqual(entry(self.tree, b"/n"), b"2")

    def test_releaseDomainOwningRoot(self) -> None:
        """Plain leaves below a root a released domain owns go with the domain."""
        self.dom0.request(Op.SET_PERMS, b"/", b"b5")
        self.dom0.request(Op.WRITE, raw=b"/y\0v")
        self.dom0.request(Op.WRITE, raw=b"/local/z\0v")
        self.assertEqual(entry(self.tree, b"/y"), b"v")
        self.server.introduceDomain(5)
        self.server.releaseDomain(5)
        self.assertIsNone(self.tree.lookup(b"/y"))
        self.assertIsNotNone(self.tree.lookup(b"/local/z"))
        # The root stays, still counted for its owner.
        self.assertEqual(self.tree.entries, {0: 5, 5: 1})

    def test_counts(self) -> None:
        """The node counts kept along the way are those a recount finds."""
        guest = Client(self.server, 5)
        self.dom0.request(Op.MKDIR, b"/local/domain/5")
        self.dom0.request(Op.SET_PERMS, b"/local/domain/5", b"n5")
        for i in range(20):
            guest.request(Op.WRITE, raw=b"d%d/k\0v" % (i % 4))
            self.dom0.request(Op.WRITE, raw=b"/t/%d/x\0v" % (i % 3))
        guest.request(Op.RM, b"d1")
        self.dom0.request(Op.SET_PERMS, b"/t/1", b"n5")
        kept = dict(self.tree.entries)
        self.tree.recount()
        self.assertEqual(self.tree.entries, kept)

    def test_pathLimitOfImplicitAncestor(self) -> None:
        """
        An existing node is not validated again, except that its path may be
        longer than the limit: C made the ancestor of a node in a domain's
        home without checking it.
        """
        server = XenStoreServer(quotas=Quotas(maxPathLength=5))
        dom0 = Client(server)
        self.assertEqual(dom0.request(Op.WRITE, raw=b"/local/domain/5/a\0v"), [("reply", b"OK\0")])
        self.assertEqual(dom0.request(Op.READ, b"/local/domain/5/a"), [("reply", b"v")])
        self.assertEqual(dom0.request(Op.READ, b"/local/domain/5"), [("error", b"EINVAL\0")])

    def test_savedAndLoaded(self) -> None:
        """A loaded tree is as compact, with the same permissions everywhere."""
        self.dom0.request(Op.WRITE, raw=b"/p/a\0x")
        self.dom0.request(Op.WRITE, raw=b"/p/b\0y")
        self.dom0.request(Op.SET_PERMS, b"/p", b"n5")
        self.dom0.request(Op.WRITE, raw=b"/p/c\0z")
        loaded = XenStoreServer(tree=loadTree(dumpTree(self.tree)))
        self.assertEqual(dumpTree(loaded.tree), dumpTree(self.tree))
        self.assertEqual(loaded.tree.entries, self.tree.entries)
        self.assertIsInstance(entry(loaded.tree, b"/p/a"), Node)
        self.assertEqual(entry(loaded.tree, b"/p/c"), b"z")
        self.assertEqual(entry(loaded.tree, b"/tool/xenstored"), b"")
        self.server = loaded
        self.dom0 = Client(loaded)
        self.assertEqual(self.perms(b"/p/b"), b"n0\0")
        self.assertEqual(self.perms(b"/p/c"), b"n5\0")


class NameTests(TestCase):
    """Interned node names."""

    def test_shared(self) -> None:
        """Children of the same name share one object."""
        server = XenStoreServer()
        dom0 = Client(server)
        dom0.request(Op.WRITE, raw=b"/a/state\0" + b"1")
        dom0.request(Op.WRITE, raw=b"/b/state\0" + b"2")
        ((_, txId),) = dom0.request(Op.TRANSACTION_START, raw=b"\0")
        server.handle(dom0.conn, Op.WRITE, 1, int(txId.rstrip(b"\0")), b"/c/state\0" + b"3")
        server.handle(dom0.conn, Op.TRANSACTION_END, 2, int(txId.rstrip(b"\0")), b"T\0")
        keys = []
        for parent in (b"/a", b"/b", b"/c"):
            node = server.tree.lookup(parent)
            assert node is not None and node.children is not None
            keys.extend(node.children)
        self.assertEqual(keys, [b"state"] * 3)
        self.assertIs(keys[0], keys[1])
        self.assertIs(keys[0], keys[2])

    def test_pruned(self) -> None:
        """Names nothing uses any more are dropped; names in use are kept."""
        names = Names()
        kept = [names.intern(b"kept-%d" % i) for i in range(10)]
        for i in range(10_000):
            names.intern(b"gone-%d" % i)
        self.assertLess(len(names), 5000)
        names.prune()
        self.assertEqual(len(names), 10)
        for i, name in enumerate(kept):
            self.assertIs(names.intern(b"kept-%d" % i), name)


class FootprintTests(TestCase):
    """What the tree costs per node, with the values and names of the bench."""

    def test_bytesPerNode(self) -> None:
        """
        10 000 leaves of 32 bytes in 10 directories cost less than 120
        bytes each (109 now, of which the value object is 65; a node object
        each would add 64 more, names not shared 37: 203 before).
        """
        server = XenStoreServer()
        conn = server.connect(0, lambda data: None)
        value = b"v" * 32
        payloads = [b"/load/d%d/n%d\0" % (i // 1000, i % 1000) + value for i in range(10_000)]
        gc.collect()
        tracemalloc.start()
        self.addCleanup(tracemalloc.stop)
        before = tracemalloc.get_traced_memory()[0]
        for i, payload in enumerate(payloads):
            server.handle(conn, Op.WRITE, i + 1, 0, payload)
            conn._out.clear()
        del payload
        payloads.clear()
        gc.collect()
        perNode = (tracemalloc.get_traced_memory()[0] - before) / 10_000
        self.assertLess(perNode, 120)
