"""
Unit tests of the embedded xenstored's parts, without sockets: the tree
and its path rules, permissions, transactions, quotas and watch matching,
driven through L{XenStoreServer.handle} with in-memory connections.
"""

from __future__ import annotations

from twisted.trial.unittest import TestCase

from xenddev.xenstore.server.core import Connection, XenStoreServer
from xenddev.xenstore.server.persistence import dumpTree, loadTree
from xenddev.xenstore.server.quota import Quotas
from xenddev.xenstore.server.tree import PermSet, cAtoi, cStrtol, isValidNodename, parsePerms
from xenddev.xenstore.server.watches import Watch
from xenddev.xenstore.wire import Op, PacketParser


class Client:
    """An in-memory connection that decodes what the server sends it."""

    def __init__(self, server: XenStoreServer, domid: int = 0) -> None:
        self.server = server
        self.parser = PacketParser()
        self.packets: list = []
        self.conn: Connection = server.connect(domid, self._got)

    def _got(self, data: bytes) -> None:
        self.packets.extend(self.parser.feed(data))

    def req(
        self, op: int, *args: bytes, tx: int = 0, raw: bytes | None = None
    ) -> tuple[str, bytes]:
        """Send one request; return ("OK"|errno name, payload)."""
        payload = raw if raw is not None else b"".join(a + b"\0" for a in args)
        self.server.handle(self.conn, op, 7, tx, payload)
        self.conn.flush()
        replies = [p for p in self.packets if p.op != Op.WATCH_EVENT]
        self.packets = [p for p in self.packets if p.op == Op.WATCH_EVENT]
        assert len(replies) == 1, replies
        r = replies[0]
        if r.op == Op.ERROR:
            return r.payload.rstrip(b"\0").decode(), b""
        return "OK", r.payload

    def write(self, path: bytes, value: bytes, tx: int = 0) -> str:
        return self.req(Op.WRITE, raw=path + b"\0" + value, tx=tx)[0]

    def read(self, path: bytes, tx: int = 0) -> tuple[str, bytes]:
        return self.req(Op.READ, path, tx=tx)

    def events(self) -> list[bytes]:
        evs = [p.payload.split(b"\0")[0] for p in self.packets if p.op == Op.WATCH_EVENT]
        self.packets = []
        return evs


class PathRuleTests(TestCase):
    """C is_valid_nodename and the C string-to-number helpers."""

    def test_validNames(self) -> None:
        """Absolute, no trailing or double slash, limited characters."""
        self.assertTrue(isValidNodename(b"/", 2048))
        self.assertTrue(isValidNodename(b"/a/b-c_d@e", 2048))
        for bad in (b"a", b"/a/", b"//", b"/a//b", b"/a b", b"/\xff", b""):
            self.assertFalse(isValidNodename(bad, 2048), bad)

    def test_lengthLimit(self) -> None:
        """The limit counts from after /local/domain/<id>/ when present."""
        self.assertTrue(isValidNodename(b"/" + b"a" * 2047, 2048))
        self.assertFalse(isValidNodename(b"/" + b"a" * 2048, 2048))
        self.assertTrue(isValidNodename(b"/local/domain/5/" + b"a" * 2048, 2048))
        self.assertFalse(isValidNodename(b"/local/domain/5/" + b"a" * 2049, 2048))

    def test_strtol(self) -> None:
        """Permission ids parse like strtol(base 0); junk is refused."""
        self.assertEqual(cStrtol(b"10"), 10)
        self.assertEqual(cStrtol(b"0x10"), 16)
        self.assertEqual(cStrtol(b"010"), 8)
        self.assertEqual(cStrtol(b"-1"), 0xFFFFFFFF)
        self.assertIsNone(cStrtol(b"1x"))
        self.assertIsNone(cStrtol(b""))
        self.assertEqual(cAtoi(b"12abc"), 12)
        self.assertEqual(cAtoi(b"abc"), 0)

    def test_permsInterned(self) -> None:
        """Equal permission lists are one shared object."""
        a = parsePerms([b"b5", b"r7"])
        b = parsePerms([b"b5", b"r7"])
        self.assertIs(a, b)
        assert a is not None
        self.assertEqual(a.wire, b"b5\0r7\0")
        self.assertIsNone(parsePerms([b"x5"]))
        self.assertIs(a.withOwner(5), a)


class WatchMatchTests(TestCase):
    """Watch matching and event paths."""

    def test_matching(self) -> None:
        """Non-exact: the node or a descendant; exact: the node only."""
        w = Watch(b"/a/b", b"t", None)
        self.assertTrue(w.matches(b"/a/b", False))
        self.assertTrue(w.matches(b"/a/b/c", False))
        self.assertFalse(w.matches(b"/a/bc", False))
        self.assertFalse(w.matches(b"/a", False))
        self.assertFalse(w.matches(b"/a/b/c", True))
        self.assertTrue(Watch(b"/", b"t", None).matches(b"/x", False))

    def test_relative(self) -> None:
        """A relative watch reports paths relative to the home directory."""
        w = Watch(b"/local/domain/3/x", b"t", b"/local/domain/3")
        self.assertEqual(w.eventPath(b"/local/domain/3/x/y"), b"x/y")


class OperationTests(TestCase):
    """Operations, errnos and permissions as the C daemon has them."""

    def setUp(self) -> None:
        self.server = XenStoreServer()
        self.dom0 = Client(self.server)

    def test_initialTree(self) -> None:
        """/, /local/domain and /tool exist at start."""
        self.assertEqual(self.dom0.req(Op.DIRECTORY, b"/")[1], b"tool\0local\0")
        self.assertEqual(self.dom0.req(Op.DIRECTORY, b"/local")[1], b"domain\0")

    def test_argumentErrors(self) -> None:
        """Missing NULs, extra strings and bad ops give EINVAL/ENOSYS."""
        self.assertEqual(self.dom0.req(Op.READ, raw=b"/tool")[0], "EINVAL")
        self.assertEqual(self.dom0.req(Op.READ, raw=b"/tool\0x\0")[0], "EINVAL")
        self.assertEqual(self.dom0.req(Op.READ, raw=b"")[0], "EINVAL")
        self.assertEqual(self.dom0.req(Op.WRITE, raw=b"/x")[0], "EINVAL")
        self.assertEqual(self.dom0.req(Op.WATCH_EVENT, b"/")[0], "ENOSYS")
        self.assertEqual(self.dom0.req(20, b"/")[0], "ENOSYS")
        self.assertEqual(self.dom0.req(Op.RM, b"/")[0], "EINVAL")

    def test_directoryPart(self) -> None:
        """DIRECTORY_PART: generation, names, and an extra NUL at the end."""
        for n in (b"a", b"bb"):
            self.dom0.write(b"/d/" + n, b"")
        _err, payload = self.dom0.req(Op.DIRECTORY_PART, b"/d", b"0")
        gen, rest = payload.split(b"\0", 1)
        self.assertTrue(gen.isdigit())
        self.assertEqual(rest, b"a\0bb\0\0")
        self.assertEqual(self.dom0.req(Op.DIRECTORY_PART, b"/d", b"2")[1], gen + b"\0bb\0\0")
        self.assertEqual(self.dom0.req(Op.DIRECTORY_PART, b"/d", b"99")[1], gen + b"\0\0")

    def test_guestPermissions(self) -> None:
        """A guest owns what it creates, cannot see or write dom0's nodes."""
        guest = Client(self.server, 5)
        self.dom0.write(b"/local/domain/5", b"")
        self.dom0.req(Op.SET_PERMS, b"/local/domain/5", b"n5")
        self.assertEqual(guest.write(b"data", b"x"), "OK")
        self.assertEqual(self.dom0.req(Op.GET_PERMS, b"/local/domain/5/data")[1], b"n5\0")
        self.assertEqual(guest.write(b"/backend/vbd", b"x"), "EACCES")
        self.dom0.write(b"/secret/a", b"x")
        self.assertEqual(guest.read(b"/secret/a")[0], "EACCES")
        # Existence is hidden: a missing node under an unreadable one.
        self.assertEqual(guest.read(b"/secret/nope")[0], "EACCES")
        self.assertEqual(guest.read(b"/local/domain/5/nope")[0], "ENOENT")
        self.assertEqual(guest.req(Op.INTRODUCE, b"1", b"2", b"3")[0], "EACCES")
        # Unprivileged domains may not give nodes away (C's EPERM).
        self.assertEqual(guest.req(Op.SET_PERMS, b"data", b"n7")[0], "EPERM")

    def test_setTarget(self) -> None:
        """A domain with SET_TARGET over another has its rights."""
        self.dom0.write(b"/local/domain/9/x", b"v")
        self.dom0.req(Op.SET_PERMS, b"/local/domain/9/x", b"n9")
        stub = Client(self.server, 8)
        self.assertEqual(stub.read(b"/local/domain/9/x")[0], "EACCES")
        self.assertEqual(self.dom0.req(Op.SET_TARGET, b"8", b"9")[0], "ENOENT")
        for d in (b"8", b"9"):
            self.dom0.req(Op.INTRODUCE, d, b"1", b"1")
        self.assertEqual(self.dom0.req(Op.SET_TARGET, b"8", b"9")[0], "OK")
        self.assertEqual(stub.read(b"/local/domain/9/x"), ("OK", b"v"))

    def test_transactionOverlay(self) -> None:
        """A transaction's first read is kept; a later outside write conflicts."""
        self.dom0.write(b"/t/a", b"1")
        tx = int(self.dom0.req(Op.TRANSACTION_START, b"")[1].rstrip(b"\0"))
        self.assertEqual(self.dom0.read(b"/t/a", tx=tx), ("OK", b"1"))
        self.dom0.write(b"/t/a", b"2")
        self.assertEqual(self.dom0.read(b"/t/a", tx=tx), ("OK", b"1"))
        self.assertEqual(self.dom0.req(Op.TRANSACTION_END, b"T", tx=tx)[0], "EAGAIN")
        self.assertEqual(self.dom0.req(Op.TRANSACTION_END, b"T", tx=tx)[0], "ENOENT")

    def test_transactionCommit(self) -> None:
        """Creations and removals in a transaction land at commit, with events."""
        self.dom0.write(b"/t/old/x", b"1")
        self.dom0.req(Op.WATCH, b"/t", b"tok")
        self.assertEqual(self.dom0.events(), [b"/t"])
        tx = int(self.dom0.req(Op.TRANSACTION_START, b"")[1].rstrip(b"\0"))
        self.assertEqual(self.dom0.write(b"/t/new/deep", b"v", tx=tx), "OK")
        self.assertEqual(self.dom0.req(Op.RM, b"/t/old", tx=tx)[0], "OK")
        self.assertEqual(self.dom0.events(), [])
        self.assertEqual(self.dom0.read(b"/t/new/deep")[0], "ENOENT")
        self.assertEqual(self.dom0.req(Op.TRANSACTION_END, b"T", tx=tx)[0], "OK")
        self.assertEqual(self.dom0.read(b"/t/new/deep"), ("OK", b"v"))
        self.assertEqual(self.dom0.read(b"/t/old")[0], "ENOENT")
        self.assertEqual(sorted(self.dom0.events()), [b"/t/new/deep", b"/t/old"])
        self.assertEqual(self.dom0.req(Op.DIRECTORY, b"/t")[1], b"new\0")

    def test_rmFiresWatchesBelow(self) -> None:
        """Removing an ancestor fires exact watches on removed descendants."""
        self.dom0.write(b"/r/a/b", b"1")
        other = Client(self.server)
        other.req(Op.WATCH, b"/r/a/b", b"t1")
        other.req(Op.WATCH, b"/r/a/b/c", b"t2")
        other.events()
        self.dom0.req(Op.RM, b"/r")
        self.assertEqual(other.events(), [b"/r/a/b"])

    def test_watchNeedsReadAccess(self) -> None:
        """A guest's watch does not fire for nodes it cannot read."""
        guest = Client(self.server, 5)
        self.assertEqual(guest.req(Op.WATCH, b"/hidden", b"t")[0], "OK")
        self.assertEqual(guest.events(), [b"/hidden"])
        self.dom0.write(b"/hidden/x", b"1")
        self.assertEqual(guest.events(), [])

    def test_specialWatches(self) -> None:
        """@introduceDomain and @releaseDomain fire for dom0 watchers."""
        self.dom0.req(Op.WATCH, b"@introduceDomain", b"i")
        self.dom0.req(Op.WATCH, b"@releaseDomain", b"r")
        self.dom0.events()
        self.dom0.req(Op.INTRODUCE, b"3", b"0", b"1")
        self.assertEqual(self.dom0.events(), [b"@introduceDomain"])
        self.assertEqual(self.dom0.req(Op.IS_DOMAIN_INTRODUCED, b"3")[1], b"T\0")
        self.assertEqual(self.dom0.req(Op.RELEASE, b"3")[0], "OK")
        self.assertEqual(self.dom0.events(), [b"@releaseDomain"])
        self.assertEqual(self.dom0.req(Op.RELEASE, b"3")[0], "ENOENT")
        self.assertEqual(self.dom0.req(Op.RELEASE, b"0")[0], "EINVAL")


class QuotaTests(TestCase):
    """Quotas for unprivileged domains, with C's errno names."""

    def setUp(self) -> None:
        self.server = XenStoreServer(
            quotas=Quotas(nodesPerDomain=5, watchesPerDomain=2, transactionsPerConnection=1)
        )
        self.dom0 = Client(self.server)
        self.dom0.write(b"/local/domain/5", b"")
        self.dom0.req(Op.SET_PERMS, b"/local/domain/5", b"n5")
        self.guest = Client(self.server, 5)

    def test_nodes(self) -> None:
        """The node quota gives ENOSPC; dom0 is exempt."""
        for i in range(4):
            self.assertEqual(self.guest.write(b"n%d" % i, b""), "OK")
        self.assertEqual(self.guest.write(b"n9", b""), "ENOSPC")
        self.assertEqual(self.dom0.write(b"/local/domain/5/n9", b""), "OK")

    def test_nodeSize(self) -> None:
        """A node record of 2048 bytes or more gives ENOSPC."""
        self.assertEqual(self.guest.write(b"big", b"x" * 2016), "ENOSPC")
        self.assertEqual(self.guest.write(b"big", b"x" * 2015), "OK")

    def test_watches(self) -> None:
        """The watch quota gives E2BIG (C allows one more than the limit)."""
        for i in range(3):
            self.assertEqual(self.guest.req(Op.WATCH, b"/w%d" % i, b"t")[0], "OK")
        self.assertEqual(self.guest.req(Op.WATCH, b"/w9", b"t")[0], "E2BIG")

    def test_transactions(self) -> None:
        """The transaction quota gives ENOSPC (also one more than the limit)."""
        self.assertEqual(self.guest.req(Op.TRANSACTION_START, b"")[0], "OK")
        self.assertEqual(self.guest.req(Op.TRANSACTION_START, b"")[0], "OK")
        self.assertEqual(self.guest.req(Op.TRANSACTION_START, b"")[0], "ENOSPC")

    def test_perms(self) -> None:
        """More than five permission entries give ENOSPC."""
        self.guest.write(b"p", b"")
        args = [b"n5"] + [b"r%d" % i for i in range(1, 6)]
        self.assertEqual(self.guest.req(Op.SET_PERMS, b"p", *args)[0], "ENOSPC")


class PersistenceTests(TestCase):
    """The state file format round-trips the tree."""

    def test_roundTrip(self) -> None:
        """Values (binary too), permissions and child order survive."""
        server = XenStoreServer()
        c = Client(server)
        c.write(b"/a/z", b"\0\xff")
        c.write(b"/a/b", b"v")
        c.req(Op.SET_PERMS, b"/a/b", b"b5", b"r6")
        tree = loadTree(dumpTree(server.tree))
        server2 = XenStoreServer(tree=tree)
        c2 = Client(server2)
        self.assertEqual(c2.read(b"/a/z"), ("OK", b"\0\xff"))
        self.assertEqual(c2.req(Op.DIRECTORY, b"/a")[1], b"z\0b\0")
        self.assertEqual(c2.req(Op.GET_PERMS, b"/a/b")[1], b"b5\0r6\0")
        self.assertEqual(server2.tree.entries, server.tree.entries)
        self.assertIsInstance(server2.tree.root.perms, PermSet)
