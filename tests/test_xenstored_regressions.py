"""
Regression tests for differences from the C xenstored 4.17 that the
differential test (L{tests.test_xenstored_differential}) found in the
embedded server, and for the memory optimisation made after the benchmark
(generations handed out on demand). Each runs without sockets, through
L{XenStoreServer.handle} with in-memory connections.
"""

from __future__ import annotations

from twisted.trial.unittest import TestCase

from xenddev.xenstore.server.core import XenStoreServer
from xenddev.xenstore.server.tree import UNSEEN
from xenddev.xenstore.wire import Op, Packet, PacketParser


class Client:
    """An in-memory connection recording every packet it is sent."""

    def __init__(self, server: XenStoreServer, domid: int = 0) -> None:
        self.server = server
        self.parser = PacketParser()
        self.packets: list[Packet] = []
        self.conn = server.connect(domid, lambda data: self.packets.extend(self.parser.feed(data)))
        self.reqId = 0

    def request(self, op: int, *args: bytes, raw: bytes | None = None) -> list[tuple[str, bytes]]:
        """
        Send one request; return what arrived since the previous one, as
        C{(kind, payload)}: C{"event"}, C{"reply"} or C{"error"}.
        """
        self.reqId += 1
        payload = raw if raw is not None else b"".join(a + b"\0" for a in args)
        self.server.handle(self.conn, op, self.reqId, 0, payload)
        self.conn.flush()
        out = []
        for p in self.packets:
            kind = {Op.WATCH_EVENT: "event", Op.ERROR: "error"}.get(p.op, "reply")
            out.append((kind, p.payload))
        self.packets = []
        return out


class OwnerChangeTests(TestCase):
    """An unprivileged domain may not give its node away: EPERM, as in C."""

    def test_eperm(self) -> None:
        """C sends the errno name EPERM (the last entry of xsd_errors)."""
        server = XenStoreServer()
        dom0 = Client(server)
        dom0.request(Op.MKDIR, b"/local/domain/5")
        dom0.request(Op.SET_PERMS, b"/local/domain/5", b"n5")
        guest = Client(server, 5)
        self.assertEqual(guest.request(Op.WRITE, raw=b"x\0v"), [("reply", b"OK\0")])
        self.assertEqual(guest.request(Op.SET_PERMS, b"x", b"n0"), [("error", b"EPERM\0")])
        self.assertEqual(guest.request(Op.SET_PERMS, b"x", b"n5", b"r0"), [("reply", b"OK\0")])


class SpecialPermsTests(TestCase):
    """
    SET_PERMS on an @-name: C 4.17 computes EINVAL (unknown name) or EACCES
    but answers with the stale global errno (and with no reply at all, then
    an assertion failure, when that is 0). We answer what C computes.
    """

    def test_unknownName(self) -> None:
        server = XenStoreServer()
        dom0 = Client(server)
        self.assertEqual(dom0.request(Op.SET_PERMS, b"@other", b"n0"), [("error", b"EINVAL\0")])

    def test_refused(self) -> None:
        server = XenStoreServer()
        guest = Client(server, 5)
        self.assertEqual(
            guest.request(Op.SET_PERMS, b"@releaseDomain", b"n5"), [("error", b"EACCES\0")]
        )


class StaleParentInTransactionTests(TestCase):
    """
    A transaction that read a parent before another connection created a
    child under it sees the child (read lazily) but not the child entry:
    C's RM then fails with EIO and keeps the deletion; the commit fails.
    """

    def test_rmChildUnknownToParent(self) -> None:
        server = XenStoreServer()
        dom0 = Client(server)
        dom0.request(Op.WRITE, raw=b"/t\0")
        tx = dom0.request(Op.TRANSACTION_START, raw=b"\0")[0][1].rstrip(b"\0")
        txId = int(tx)

        def inTx(op: int, payload: bytes) -> list[tuple[str, bytes]]:
            dom0.reqId += 1
            server.handle(dom0.conn, op, dom0.reqId, txId, payload)
            dom0.conn.flush()
            out = [("error" if p.op == Op.ERROR else "reply", p.payload) for p in dom0.packets]
            dom0.packets = []
            return out

        self.assertEqual(inTx(Op.DIRECTORY, b"/t\0"), [("reply", b"")])
        dom0.request(Op.WRITE, raw=b"/t/a\0v")
        self.assertEqual(inTx(Op.RM, b"/t/a\0"), [("error", b"EIO\0")])
        self.assertEqual(inTx(Op.READ, b"/t/a\0"), [("error", b"ENOENT\0")])
        self.assertEqual(inTx(Op.TRANSACTION_END, b"T\0"), [("error", b"EAGAIN\0")])
        self.assertEqual(dom0.request(Op.READ, b"/t/a"), [("reply", b"v")])

    def test_rmMissingChild(self) -> None:
        """
        The reverse: the transaction's copy lists a child deleted since.
        C's walk deletes (and unlists) what it met before, then stops: EIO.
        """
        server = XenStoreServer()
        dom0 = Client(server)
        for path in (b"/t/a", b"/t/b/a", b"/t/c"):
            dom0.request(Op.WRITE, raw=path + b"\0v")
        txId = int(dom0.request(Op.TRANSACTION_START, raw=b"\0")[0][1].rstrip(b"\0"))

        def inTx(op: int, payload: bytes) -> tuple[int, bytes]:
            dom0.reqId += 1
            server.handle(dom0.conn, op, dom0.reqId, txId, payload)
            dom0.conn.flush()
            (p,) = dom0.packets
            dom0.packets = []
            return p.op, p.payload

        inTx(Op.READ, b"/t/b\0")
        dom0.request(Op.RM, b"/t/b/a")
        self.assertEqual(inTx(Op.RM, b"/t\0"), (Op.ERROR, b"EIO\0"))
        self.assertEqual(inTx(Op.DIRECTORY, b"/t\0"), (Op.DIRECTORY, b"b\0c\0"))
        self.assertEqual(inTx(Op.READ, b"/t/a\0"), (Op.ERROR, b"ENOENT\0"))
        self.assertEqual(inTx(Op.DIRECTORY, b"/t/b\0"), (Op.DIRECTORY, b"a\0"))
        self.assertEqual(inTx(Op.TRANSACTION_END, b"T\0"), (Op.ERROR, b"EAGAIN\0"))


class GenerationOnDemandTests(TestCase):
    """
    Nodes hold the shared L{UNSEEN} generation until a transaction or
    DIRECTORY_PART needs a number (a memory saving): what clients can
    observe must not change.
    """

    def dirPartGen(self, client: Client, path: bytes) -> bytes:
        ((kind, payload),) = client.request(Op.DIRECTORY_PART, path, b"0")
        self.assertEqual(kind, "reply")
        return payload.split(b"\0")[0]

    def test_directoryPart(self) -> None:
        """The same number while unchanged, a new one after each change."""
        server = XenStoreServer()
        dom0 = Client(server)
        dom0.request(Op.WRITE, raw=b"/d/a\0v")
        node = server.tree.lookup(b"/d")
        assert node is not None
        self.assertEqual(node.generation, UNSEEN)
        first = self.dirPartGen(dom0, b"/d")
        self.assertEqual(self.dirPartGen(dom0, b"/d"), first)
        dom0.request(Op.WRITE, raw=b"/d/b\0v")
        second = self.dirPartGen(dom0, b"/d")
        self.assertNotEqual(second, first)
        dom0.request(Op.WRITE, raw=b"/d\0value")
        self.assertNotIn(self.dirPartGen(dom0, b"/d"), (first, second))

    def test_transactionConflicts(self) -> None:
        """A read of an unseen node still conflicts with a later write, only then."""
        server = XenStoreServer()
        dom0 = Client(server)
        other = Client(server)
        dom0.request(Op.WRITE, raw=b"/x\0v")
        dom0.request(Op.WRITE, raw=b"/y\0v")
        for path, conflict in ((b"/x", True), (b"/y", False)):
            txId = int(dom0.request(Op.TRANSACTION_START, raw=b"\0")[0][1].rstrip(b"\0"))
            server.handle(dom0.conn, Op.READ, 1, txId, b"/x\0")
            other.request(Op.WRITE, raw=path + b"\0w")
            server.handle(dom0.conn, Op.TRANSACTION_END, 2, txId, b"T\0")
            dom0.conn.flush()
            replies = [(p.op, p.payload) for p in dom0.packets]
            dom0.packets = []
            self.assertEqual(replies[0], (Op.READ, b"v" if conflict else b"w"))
            expected = (Op.ERROR, b"EAGAIN\0") if conflict else (Op.TRANSACTION_END, b"OK\0")
            self.assertEqual(replies[1], expected)


class ReleasedDomainEntriesTests(TestCase):
    """
    After RELEASE, permission entries naming the released domain are
    ignored, so that a new domain reusing the id (introduced again) does
    not inherit them; GET_PERMS still lists them, SET_PERMS replaces them.
    """

    def test_newDomainInheritsNothing(self) -> None:
        server = XenStoreServer()
        dom0 = Client(server)
        dom0.request(Op.WRITE, raw=b"/t/p\0v")
        dom0.request(Op.SET_PERMS, b"/t/p", b"n0", b"b7")
        dom0.request(Op.INTRODUCE, b"7", b"4096", b"3")
        self.assertEqual(Client(server, 7).request(Op.READ, b"/t/p"), [("reply", b"v")])
        dom0.request(Op.RELEASE, b"7")
        dom0.request(Op.INTRODUCE, b"7", b"4096", b"3")
        guest = Client(server, 7)
        self.assertEqual(guest.request(Op.READ, b"/t/p"), [("error", b"EACCES\0")])
        dom0.request(Op.WRITE, raw=b"/t/p\0w")
        self.assertEqual(guest.request(Op.READ, b"/t/p"), [("error", b"EACCES\0")])
        self.assertEqual(dom0.request(Op.GET_PERMS, b"/t/p"), [("reply", b"n0\0b7\0")])
        dom0.request(Op.SET_PERMS, b"/t/p", b"n0", b"b7")
        self.assertEqual(guest.request(Op.READ, b"/t/p"), [("reply", b"w")])

    def test_otherDomainsKeepTheirs(self) -> None:
        server = XenStoreServer()
        dom0 = Client(server)
        dom0.request(Op.WRITE, raw=b"/t/p\0v")
        dom0.request(Op.SET_PERMS, b"/t/p", b"n0", b"r7", b"r5")
        dom0.request(Op.INTRODUCE, b"7", b"4096", b"3")
        dom0.request(Op.RELEASE, b"7")
        self.assertEqual(Client(server, 5).request(Op.READ, b"/t/p"), [("reply", b"v")])
        self.assertEqual(Client(server, 7).request(Op.READ, b"/t/p"), [("error", b"EACCES\0")])
