"""
Tests for L{xenddev.xenstore.connection.ReconnectingXenStore}'s delegation:
calls go straight to the current connection's client, and wait for the
next connection when there is none.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from xenddev.xenstore.connection import ReconnectingXenStore
from xenddev.xenstore.errors import InvalidArgumentError, InvalidPathError
from xenddev.xenstore.interfaces import IXenStore
from xenddev.xenstore.wire import Op, Packet, PacketParser


class FakeEndpoint:
    """Connects at once (or, when C{hold}, when L{release} is called)."""

    def __init__(self) -> None:
        self.protocols: list = []
        self.transports: list[StringTransport] = []
        self.hold = False
        self.waiting: list[tuple[Deferred, object]] = []

    def connect(self, factory):
        if self.hold:
            d: Deferred = Deferred()
            self.waiting.append((d, factory))
            return d
        return succeed(self._build(factory))

    def _build(self, factory):
        proto = factory.buildProtocol(None)
        transport = StringTransport()
        proto.makeConnection(transport)
        self.protocols.append(proto)
        self.transports.append(transport)
        return proto

    def release(self) -> None:
        waiting, self.waiting = self.waiting, []
        for d, factory in waiting:
            d.callback(self._build(factory))


def answer(proto, transport, payload: bytes) -> list[Packet]:
    """Answer every request written so far with C{payload}; return them."""
    packets = PacketParser().feed(transport.value())
    transport.clear()
    for p in packets:
        proto.dataReceived(Packet(p.op, p.reqId, p.txId, payload).encode())
    return packets


class DelegationTests(SynchronousTestCase):
    """Calls on a connected store are the client's own calls."""

    def setUp(self) -> None:
        self.endpoint = FakeEndpoint()
        self.store = ReconnectingXenStore(self.endpoint, Clock())
        self.store.start()
        self.addCleanup(self.store.stop)

    def test_interfaces(self) -> None:
        """The store provides L{IXenStore}, the attributes callers read included."""
        self.assertTrue(verifyObject(IXenStore, self.store))
        self.assertEqual(self.store.connections, 1)

    def test_connectedCallSentAtOnce(self) -> None:
        """A call on a connected store sends its request at once and gets the reply."""
        self.assertTrue(self.store.connected)
        d = self.store.read("/a")
        [packet] = answer(self.endpoint.protocols[0], self.endpoint.transports[0], b"v")
        self.assertEqual(packet.op, Op.READ)
        self.assertEqual(self.successResultOf(d), "v")

    def test_connectedCallCancellable(self) -> None:
        """Cancelling the call cancels the request (its id stays reserved)."""
        d = self.store.read("/a")
        d.cancel()
        self.failureResultOf(d)
        self.assertEqual(self.endpoint.protocols[0].pendingCount, 1)

    def test_errorsBecomeFailures(self) -> None:
        """What the client's method raises comes back as a failed Deferred."""
        self.failureResultOf(self.store.write("/a", 5), InvalidArgumentError)
        self.failureResultOf(self.store.introduceDomain(1, "x", 2), InvalidArgumentError)
        self.assertEqual(self.endpoint.transports[0].value(), b"")

    def test_badPathRaises(self) -> None:
        """A bad path raises at the call, connected or not."""
        self.assertRaises(InvalidPathError, self.store.read, "/a b")
        self.endpoint.protocols[0].connectionLost(Failure(Exception("gone")))
        self.assertRaises(InvalidPathError, self.store.read, "/a b")

    def test_waitsForNextConnection(self) -> None:
        """With the connection gone, a call waits for the next one and goes there."""
        self.endpoint.hold = True
        self.endpoint.protocols[0].connectionLost(Failure(Exception("gone")))
        self.assertFalse(self.store.connected)
        d = self.store.read("/a")
        self.assertNoResult(d)
        self.store.reactor.advance(10)  # the service retries on its clock
        self.endpoint.release()
        self.assertEqual(len(self.endpoint.protocols), 2)
        self.assertEqual(self.endpoint.transports[0].value(), b"")
        answer(self.endpoint.protocols[1], self.endpoint.transports[1], b"new")
        self.assertEqual(self.successResultOf(d), "new")
