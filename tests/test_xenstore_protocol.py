"""
Tests for L{xenddev.xenstore.protocol.XenStoreProtocol}: request/reply
multiplexing over a L{StringTransport}, req_id allocation, watch events,
errors and connection loss.
"""

from __future__ import annotations

from twisted.internet.defer import CancelledError
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.testing import StringTransport
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from xenddev.xenstore.errors import (
    AccessDeniedError,
    ConflictError,
    InvalidPayloadError,
    NoEntryError,
    UnexpectedPacket,
    XenStoreConnectionLost,
)
from xenddev.xenstore.protocol import XenStoreClientFactory, XenStoreProtocol, discard
from xenddev.xenstore.wire import HEADER, UINT32_MAX, Op, Packet, PacketParser


def makeProtocol(maxInFlight=None):
    """A connected protocol, its transport and a list collecting its log events."""
    proto = XenStoreProtocol(maxInFlight)
    events: list[dict] = []
    proto.log = Logger(observer=events.append)
    transport = StringTransport()
    proto.makeConnection(transport)
    return proto, transport, events


def sentPackets(transport):
    """Decode and clear what the protocol wrote to C{transport}."""
    data = transport.value()
    transport.clear()
    return PacketParser().feed(data)


def reply(proto, op, reqId, payload=b"", txId=0):
    """Deliver one packet from xenstored to C{proto}."""
    proto.dataReceived(Packet(op, reqId, txId, payload).encode())


class RequestTests(SynchronousTestCase):
    """Sending requests and matching their replies."""

    def test_requestBytes(self):
        """A request is written as one packet with a fresh req_id and the tx_id."""
        proto, transport, _ = makeProtocol()
        proto.request(Op.READ, b"/local/domain/0/name\0", txId=5, context="/x")
        [packet] = sentPackets(transport)
        self.assertEqual(packet, Packet(Op.READ, 1, 5, b"/local/domain/0/name\0"))
        self.assertEqual(proto.requestsSent, 1)
        self.assertEqual(proto.pendingCount, 1)

    def test_replyFiresDeferred(self):
        """The reply's payload is the Deferred's result."""
        proto, transport, _ = makeProtocol()
        d = proto.request(Op.READ, b"/a\0")
        [packet] = sentPackets(transport)
        self.assertNoResult(d)
        reply(proto, Op.READ, packet.reqId, b"value")
        self.assertEqual(self.successResultOf(d), b"value")
        self.assertEqual(proto.pendingCount, 0)

    def test_outOfOrderReplies(self):
        """Replies are matched by req_id in whatever order they arrive."""
        proto, transport, _ = makeProtocol()
        ds = [proto.request(Op.READ, b"/%d\0" % i) for i in range(3)]
        packets = sentPackets(transport)
        self.assertEqual(len({p.reqId for p in packets}), 3)
        for index in (2, 0, 1):
            reply(proto, Op.READ, packets[index].reqId, b"v%d" % index)
            self.assertEqual(self.successResultOf(ds[index]), b"v%d" % index)
        self.assertEqual(proto.pendingCount, 0)

    def test_repliesInOneChunkAndSplit(self):
        """Several replies in one chunk, or one reply in pieces, all dispatch."""
        proto, transport, _ = makeProtocol()
        d1 = proto.request(Op.READ, b"/1\0")
        d2 = proto.request(Op.READ, b"/2\0")
        p1, p2 = sentPackets(transport)
        data = Packet(Op.READ, p2.reqId, 0, b"two").encode()
        data += Packet(Op.READ, p1.reqId, 0, b"one").encode()
        for i in range(len(data)):
            proto.dataReceived(data[i : i + 1])
        self.assertEqual(self.successResultOf(d1), b"one")
        self.assertEqual(self.successResultOf(d2), b"two")

    def test_notConnected(self):
        """A request on a protocol never connected fails at once."""
        proto = XenStoreProtocol()
        f = self.failureResultOf(proto.request(Op.READ, b"/a\0"), XenStoreConnectionLost)
        self.assertIn("not connected", str(f.value))

    def test_factory(self):
        """The client factory builds protocols with its in-flight limit."""
        factory = XenStoreClientFactory(maxInFlight=3)
        proto = factory.buildProtocol(None)
        self.assertIsInstance(proto, XenStoreProtocol)
        self.assertEqual(proto.maxInFlight, 3)
        self.assertIs(proto.factory, factory)

    def test_factoryAttach(self):
        """The factory hands each protocol it builds to C{attach}."""
        attached = []
        factory = XenStoreClientFactory(attach=attached.append)
        proto = factory.buildProtocol(None)
        self.assertEqual(attached, [proto])
        self.assertIsNone(proto.maxInFlight)


class ReqIdTests(SynchronousTestCase):
    """req_id allocation."""

    def test_idsIncrease(self):
        """Consecutive requests get consecutive ids starting at 1."""
        proto, transport, _ = makeProtocol()
        for _ in range(3):
            proto.request(Op.READ, b"/a\0")
        self.assertEqual([p.reqId for p in sentPackets(transport)], [1, 2, 3])

    def test_wrapsSkippingZeroAndPending(self):
        """
        After 0xFFFFFFFF the allocator wraps to 1, never uses 0 (reserved
        for watch events) and skips ids whose requests are still pending.
        """
        proto, transport, _ = makeProtocol()
        pending1 = proto.request(Op.READ, b"/old\0")
        proto._nextReqId = UINT32_MAX - 1
        ds = [proto.request(Op.READ, b"/%d\0" % i) for i in range(4)]
        packets = sentPackets(transport)
        ids = [p.reqId for p in packets]
        self.assertEqual(ids, [1, UINT32_MAX - 1, UINT32_MAX, 2, 3])
        self.assertNotIn(0, ids)
        # Every reply still reaches the right request.
        for p in reversed(packets):
            reply(proto, Op.READ, p.reqId, p.payload)
        self.assertEqual(self.successResultOf(pending1), b"/old\0")
        self.assertEqual([self.successResultOf(d) for d in ds], [b"/%d\0" % i for i in range(4)])

    def test_answeredIdReused(self):
        """An id is free again once its reply has arrived."""
        proto, transport, _ = makeProtocol()
        proto.request(Op.READ, b"/a\0")
        reply(proto, Op.READ, 1, b"")
        proto._nextReqId = 1
        proto.request(Op.READ, b"/b\0")
        self.assertEqual([p.reqId for p in sentPackets(transport)], [1, 1])


class ErrorReplyTests(SynchronousTestCase):
    """ERROR replies and replies of the wrong type."""

    def test_errorReply(self):
        """An ERROR reply fails the request with the errno's class, op and path."""
        proto, transport, _ = makeProtocol()
        d = proto.request(Op.READ, b"/a/b\0", context="/a/b")
        [packet] = sentPackets(transport)
        reply(proto, Op.ERROR, packet.reqId, b"ENOENT\0")
        f = self.failureResultOf(d, NoEntryError)
        self.assertEqual(f.value.op, "READ")
        self.assertEqual(f.value.path, "/a/b")
        self.assertIn("READ /a/b", str(f.value))

    def test_errorClasses(self):
        """Different errno names give different classes."""
        proto, transport, _ = makeProtocol()
        d1 = proto.request(Op.TRANSACTION_END, b"T\0")
        d2 = proto.request(Op.WRITE, b"/x\0v")
        p1, p2 = sentPackets(transport)
        reply(proto, Op.ERROR, p1.reqId, b"EAGAIN\0")
        reply(proto, Op.ERROR, p2.reqId, b"EACCES\0")
        self.assertEqual(self.failureResultOf(d1, ConflictError).value.op, "TRANSACTION_END")
        self.assertEqual(self.failureResultOf(d2, AccessDeniedError).value.op, "WRITE")

    def test_wrongReplyType(self):
        """A reply of the wrong type fails only its own request."""
        proto, transport, _ = makeProtocol()
        d1 = proto.request(Op.READ, b"/a\0")
        d2 = proto.request(Op.READ, b"/b\0")
        p1, p2 = sentPackets(transport)
        reply(proto, Op.WRITE, p1.reqId, b"OK\0")
        f = self.failureResultOf(d1, UnexpectedPacket)
        self.assertIn("WRITE", str(f.value))
        self.assertIn("READ", str(f.value))
        self.assertNoResult(d2)
        reply(proto, Op.READ, p2.reqId, b"b")
        self.assertEqual(self.successResultOf(d2), b"b")


class UnexpectedPacketTests(SynchronousTestCase):
    """Packets nobody waits for are logged and dropped."""

    def test_unknownReqId(self):
        """
        A reply with an unknown req_id is counted, logged and ignored; later
        replies still match.
        """
        proto, transport, events = makeProtocol()
        d = proto.request(Op.READ, b"/a\0")
        [packet] = sentPackets(transport)
        reply(proto, Op.READ, 12345, b"stray")
        self.assertEqual(proto.unexpectedPackets, 1)
        [event] = [e for e in events if e["log_level"] == LogLevel.warn]
        self.assertEqual(event["reqId"], 12345)
        self.assertEqual(event["op"], "READ")
        self.assertNoResult(d)
        reply(proto, Op.READ, packet.reqId, b"ok")
        self.assertEqual(self.successResultOf(d), b"ok")
        d2 = proto.request(Op.READ, b"/b\0")
        [packet2] = sentPackets(transport)
        reply(proto, Op.READ, packet2.reqId, b"ok2")
        self.assertEqual(self.successResultOf(d2), b"ok2")
        self.assertFalse(transport.disconnecting)

    def test_duplicateReply(self):
        """A second reply to the same request is unexpected, not a crash."""
        proto, transport, _ = makeProtocol()
        d = proto.request(Op.READ, b"/a\0")
        [packet] = sentPackets(transport)
        reply(proto, Op.READ, packet.reqId, b"one")
        reply(proto, Op.READ, packet.reqId, b"two")
        self.assertEqual(self.successResultOf(d), b"one")
        self.assertEqual(proto.unexpectedPackets, 1)


class WatchEventTests(SynchronousTestCase):
    """WATCH_EVENT delivery."""

    def test_eventDelivered(self):
        """A WATCH_EVENT calls eventReceived with the raw path and token."""
        proto, _, _ = makeProtocol()
        seen = []
        proto.eventReceived = lambda path, token: seen.append((path, token))
        reply(proto, Op.WATCH_EVENT, 0, b"/local/domain/3\0tok-1\0")
        self.assertEqual(seen, [(b"/local/domain/3", b"tok-1")])

    def test_eventBetweenReplies(self):
        """An event interleaved with replies does not disturb matching."""
        proto, transport, _ = makeProtocol()
        seen = []
        proto.eventReceived = lambda path, token: seen.append(path)
        d = proto.request(Op.READ, b"/a\0")
        [packet] = sentPackets(transport)
        data = Packet(Op.WATCH_EVENT, 0, 0, b"/w\0t\0").encode()
        data += Packet(Op.READ, packet.reqId, 0, b"v").encode()
        proto.dataReceived(data)
        self.assertEqual(seen, [b"/w"])
        self.assertEqual(self.successResultOf(d), b"v")

    def test_defaultHandlerDropsEvent(self):
        """Without a handler, events are logged at debug level and dropped."""
        proto, _, events = makeProtocol()
        reply(proto, Op.WATCH_EVENT, 0, b"/w\0t\0")
        [event] = events
        self.assertEqual(event["log_level"], LogLevel.debug)
        self.assertEqual(event["path"], b"/w")
        self.assertEqual(proto.unexpectedPackets, 0)

    def test_malformedEvent(self):
        """A WATCH_EVENT without a token is counted and ignored."""
        proto, _, events = makeProtocol()
        seen = []
        proto.eventReceived = lambda path, token: seen.append(path)
        reply(proto, Op.WATCH_EVENT, 0, b"/only-path\0")
        self.assertEqual(seen, [])
        self.assertEqual(proto.unexpectedPackets, 1)
        self.assertEqual(events[-1]["log_level"], LogLevel.warn)

    def test_raisingHandler(self):
        """
        A handler that raises is logged; the protocol keeps dispatching
        events and replies.
        """
        proto, transport, events = makeProtocol()
        seen = []

        def handler(path, token):
            seen.append(path)
            raise ZeroDivisionError("handler bug")

        proto.eventReceived = handler
        d = proto.request(Op.READ, b"/a\0")
        [packet] = sentPackets(transport)
        reply(proto, Op.WATCH_EVENT, 0, b"/w1\0t\0")
        reply(proto, Op.WATCH_EVENT, 0, b"/w2\0t\0")
        reply(proto, Op.READ, packet.reqId, b"v")
        self.assertEqual(seen, [b"/w1", b"/w2"])
        self.assertEqual(self.successResultOf(d), b"v")
        failures = [e["log_failure"] for e in events if "log_failure" in e]
        self.assertEqual(len(failures), 2)
        self.assertTrue(failures[0].check(ZeroDivisionError))
        self.assertFalse(transport.disconnecting)


class ConnectionLostTests(SynchronousTestCase):
    """Behaviour when the connection closes."""

    def test_failsAllPending(self):
        """
        Every pending request fails with L{XenStoreConnectionLost}, naming
        the operation and its context.
        """
        proto, _, _ = makeProtocol()
        d1 = proto.request(Op.READ, b"/a\0", context="/a")
        d2 = proto.request(Op.WRITE, b"/b\0v", context="/b")
        d3 = proto.request(Op.TRANSACTION_START, b"\0")
        proto.connectionLost(Failure(ConnectionLost("peer went away")))
        f1 = self.failureResultOf(d1, XenStoreConnectionLost)
        f2 = self.failureResultOf(d2, XenStoreConnectionLost)
        f3 = self.failureResultOf(d3, XenStoreConnectionLost)
        self.assertIn("pending READ /a", str(f1.value))
        self.assertIn("pending WRITE /b", str(f2.value))
        self.assertIn("pending TRANSACTION_START", str(f3.value))
        self.assertIn("peer went away", str(f1.value))
        self.assertEqual(proto.pendingCount, 0)
        self.assertFalse(proto.connected)

    def test_requestsAfterLossFail(self):
        """A request after the loss fails immediately and sends nothing."""
        proto, transport, _ = makeProtocol()
        proto.connectionLost(Failure(ConnectionDone()))
        transport.clear()
        f = self.failureResultOf(proto.request(Op.READ, b"/a\0"), XenStoreConnectionLost)
        self.assertIn("connection to xenstored lost", str(f.value))
        self.assertEqual(transport.value(), b"")
        self.assertEqual(proto.requestsSent, 0)

    def test_defaultReason(self):
        """connectionLost without a reason still fails pending requests."""
        proto, _, _ = makeProtocol()
        d = proto.request(Op.READ, b"/a\0")
        proto.connectionLost()
        self.failureResultOf(d, XenStoreConnectionLost)

    def test_whenConnectionLost(self):
        """whenConnectionLost fires on loss, and at once afterwards."""
        proto, _, _ = makeProtocol()
        d = proto.whenConnectionLost()
        self.assertNoResult(d)
        proto.connectionLost(Failure(ConnectionDone()))
        self.assertIsNone(self.successResultOf(d))
        self.assertIsNone(self.successResultOf(proto.whenConnectionLost()))

    def test_oversizedHeaderDropsConnection(self):
        """
        A header announcing more than 4096 bytes makes the protocol drop the
        connection; pending requests fail and new ones fail at once.
        """
        proto, transport, events = makeProtocol()
        d = proto.request(Op.READ, b"/a\0", context="/a")
        sentPackets(transport)
        proto.dataReceived(HEADER.pack(Op.READ, 1, 0, 5000))
        self.assertTrue(transport.disconnecting)
        self.assertTrue(any(e["log_level"] == LogLevel.error for e in events))
        f = self.failureResultOf(proto.request(Op.READ, b"/b\0"), XenStoreConnectionLost)
        self.assertIn("5000", str(f.value))
        self.assertEqual(transport.value(), b"")
        # The transport reports the loss once it has closed.
        proto.connectionLost(Failure(ConnectionDone()))
        f = self.failureResultOf(d, XenStoreConnectionLost)
        self.assertIn("pending READ /a", str(f.value))

    def test_repliesBeforeMalformedHeaderDelivered(self):
        """
        Replies that arrived complete before a malformed header, in the same
        chunk, are still delivered: xenstored did answer them.
        """
        proto, transport, _ = makeProtocol()
        d = proto.request(Op.READ, b"/a\0")
        [packet] = sentPackets(transport)
        proto.dataReceived(
            Packet(Op.READ, packet.reqId, 0, b"v").encode() + HEADER.pack(Op.READ, 9, 0, 5000)
        )
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.successResultOf(d), b"v")


class CancelTests(SynchronousTestCase):
    """Cancelling a request."""

    def test_cancelKeepsIdReserved(self):
        """
        A cancelled request fails with CancelledError, but its req_id stays
        reserved until the reply arrives; the late reply is swallowed and a
        new request never gets that id meanwhile.
        """
        proto, transport, _ = makeProtocol()
        d = proto.request(Op.READ, b"/a\0")
        [packet] = sentPackets(transport)
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertEqual(proto.pendingCount, 1)
        proto._nextReqId = packet.reqId
        d2 = proto.request(Op.READ, b"/b\0")
        [packet2] = sentPackets(transport)
        self.assertNotEqual(packet2.reqId, packet.reqId)
        reply(proto, Op.READ, packet.reqId, b"late")
        self.assertEqual(proto.unexpectedPackets, 0)
        self.assertNoResult(d2)
        self.assertEqual(proto.pendingCount, 1)
        reply(proto, Op.READ, packet2.reqId, b"fresh")
        self.assertEqual(self.successResultOf(d2), b"fresh")

    def test_cancelledThenConnectionLost(self):
        """Connection loss after a cancel does not fire the Deferred again."""
        proto, _, _ = makeProtocol()
        d = proto.request(Op.READ, b"/a\0")
        d.cancel()
        self.failureResultOf(d, CancelledError)
        proto.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(proto.pendingCount, 0)


class XenbusQuirkTests(SynchronousTestCase):
    """The Linux xenbus device acks WATCH/UNWATCH with req_id 0."""

    def test_watchAckWithReqIdZero(self):
        """A WATCH ack with req_id 0 completes the oldest pending WATCH."""
        proto, transport, _ = makeProtocol()
        read = proto.request(Op.READ, b"/r\0")
        w1 = proto.request(Op.WATCH, b"/a\0t1\0")
        w2 = proto.request(Op.WATCH, b"/b\0t2\0")
        sentPackets(transport)
        reply(proto, Op.WATCH, 0, b"OK\0")
        self.assertEqual(self.successResultOf(w1), b"OK\0")
        self.assertNoResult(w2)
        self.assertNoResult(read)
        reply(proto, Op.WATCH, 0, b"OK\0")
        self.assertEqual(self.successResultOf(w2), b"OK\0")
        self.assertEqual(proto.unexpectedPackets, 0)

    def test_unwatchAckWithReqIdZero(self):
        """The same holds for UNWATCH, which does not steal a WATCH's ack."""
        proto, transport, _ = makeProtocol()
        w = proto.request(Op.WATCH, b"/a\0t1\0")
        u = proto.request(Op.UNWATCH, b"/b\0t2\0")
        sentPackets(transport)
        reply(proto, Op.UNWATCH, 0, b"OK\0")
        self.assertEqual(self.successResultOf(u), b"OK\0")
        self.assertNoResult(w)

    def test_zeroReqIdOtherOps(self):
        """A req_id 0 reply of another type matches nothing."""
        proto, transport, _ = makeProtocol()
        d = proto.request(Op.READ, b"/a\0")
        sentPackets(transport)
        reply(proto, Op.READ, 0, b"x")
        self.assertNoResult(d)
        self.assertEqual(proto.unexpectedPackets, 1)

    def test_zeroReqIdWatchAckWithoutWatch(self):
        """A req_id 0 WATCH ack with no WATCH pending is unexpected."""
        proto, transport, _ = makeProtocol()
        d = proto.request(Op.UNWATCH, b"/a\0t\0")
        sentPackets(transport)
        reply(proto, Op.WATCH, 0, b"OK\0")
        self.assertNoResult(d)
        self.assertEqual(proto.unexpectedPackets, 1)


class FlowControlTests(SynchronousTestCase):
    """maxInFlight and pipelining."""

    def test_maxInFlightQueues(self):
        """With maxInFlight=2, the third request waits for a reply."""
        proto, transport, _ = makeProtocol(maxInFlight=2)
        ds = [proto.request(Op.READ, b"/%d\0" % i) for i in range(3)]
        first = sentPackets(transport)
        self.assertEqual([p.payload for p in first], [b"/0\0", b"/1\0"])
        self.assertEqual(proto.pendingCount, 3)
        reply(proto, Op.READ, first[1].reqId, b"one")
        [third] = sentPackets(transport)
        self.assertEqual(third.payload, b"/2\0")
        reply(proto, Op.READ, third.reqId, b"two")
        reply(proto, Op.READ, first[0].reqId, b"zero")
        self.assertEqual([self.successResultOf(d) for d in ds], [b"zero", b"one", b"two"])
        self.assertEqual(transport.value(), b"")

    def test_queuedRequestsFailOnLoss(self):
        """Requests still queued locally fail when the connection closes."""
        proto, transport, _ = makeProtocol(maxInFlight=1)
        d1 = proto.request(Op.READ, b"/1\0")
        d2 = proto.request(Op.READ, b"/2\0", context="/2")
        self.assertEqual(len(sentPackets(transport)), 1)
        proto.connectionLost(Failure(ConnectionDone()))
        self.failureResultOf(d1, XenStoreConnectionLost)
        f = self.failureResultOf(d2, XenStoreConnectionLost)
        self.assertIn("pending READ /2", str(f.value))

    def test_tenThousandPipelined(self):
        """10 000 requests answered in reverse order all get their own reply."""
        proto, transport, _ = makeProtocol()
        count = 10000
        ds = [proto.request(Op.READ, b"/n/%d\0" % i) for i in range(count)]
        packets = sentPackets(transport)
        self.assertEqual(len(packets), count)
        self.assertEqual(len({p.reqId for p in packets}), count)
        proto.dataReceived(
            b"".join(
                Packet(Op.READ, p.reqId, 0, p.payload[3:-1]).encode() for p in reversed(packets)
            )
        )
        results = [self.successResultOf(d) for d in ds]
        self.assertEqual(results, [b"%d" % i for i in range(count)])
        self.assertEqual(proto.pendingCount, 0)


class SendTests(SynchronousTestCase):
    """
    L{XenStoreProtocol.send}: the reply converted before the Deferred fires,
    and error replies that are answers.
    """

    def test_convertNone(self):
        """Without a conversion the Deferred fires with the payload."""
        proto, transport, _ = makeProtocol()
        d = proto.send(Op.READ, b"/a\0", 3, "/a", None, None)
        [packet] = sentPackets(transport)
        self.assertEqual(packet, Packet(Op.READ, 1, 3, b"/a\0"))
        reply(proto, Op.READ, packet.reqId, b"v")
        self.assertEqual(self.successResultOf(d), b"v")

    def test_discard(self):
        """L{discard} fires with None."""
        proto, transport, _ = makeProtocol()
        d = proto.send(Op.WRITE, b"/a\0v", 0, "/a", discard, None)
        [packet] = sentPackets(transport)
        reply(proto, Op.WRITE, packet.reqId, b"OK\0")
        self.assertIsNone(self.successResultOf(d))

    def test_convertFunction(self):
        """A conversion function's result is the Deferred's result."""
        proto, transport, _ = makeProtocol()
        d = proto.send(Op.READ, b"/a\0", 0, "/a", bytes.upper, None)
        [packet] = sentPackets(transport)
        reply(proto, Op.READ, packet.reqId, b"abc")
        self.assertEqual(self.successResultOf(d), b"ABC")

    def test_convertRaises(self):
        """
        A conversion that raises fails that request only; the replies after
        it in the same chunk are still dispatched.
        """
        proto, transport, _ = makeProtocol()
        d1 = proto.send(Op.TRANSACTION_START, b"\0", 0, None, lambda raw: int(raw), None)
        d2 = proto.send(Op.READ, b"/b\0", 0, "/b", None, None)
        p1, p2 = sentPackets(transport)
        proto.dataReceived(
            Packet(Op.TRANSACTION_START, p1.reqId, 0, b"junk\0").encode()
            + Packet(Op.READ, p2.reqId, 0, b"b").encode()
        )
        self.failureResultOf(d1, ValueError)
        self.assertEqual(self.successResultOf(d2), b"b")

    def test_answers(self):
        """An ERROR reply named in C{answers} is a result; any other still fails."""
        proto, transport, _ = makeProtocol()
        d1 = proto.send(Op.READ, b"/a\0", 0, "/a", None, {"ENOENT": None})
        d2 = proto.send(Op.READ, b"/b\0", 0, "/b", None, {"ENOENT": None})
        d3 = proto.send(Op.READ, b"/c\0", 0, "/c", bytes.upper, {"ENOENT": False, "EACCES": True})
        p1, p2, p3 = sentPackets(transport)
        reply(proto, Op.ERROR, p1.reqId, b"ENOENT\0")
        reply(proto, Op.ERROR, p2.reqId, b"EACCES\0")
        reply(proto, Op.ERROR, p3.reqId, b"EACCES\0")
        self.assertIsNone(self.successResultOf(d1))
        f = self.failureResultOf(d2, AccessDeniedError)
        self.assertEqual((f.value.op, f.value.path), ("READ", "/b"))
        self.assertIs(self.successResultOf(d3), True)

    def test_wrongReplyTypeNotConverted(self):
        """A reply of the wrong type fails, whatever the conversion."""
        proto, transport, _ = makeProtocol()
        d = proto.send(Op.READ, b"/a\0", 0, "/a", discard, {"ENOENT": None})
        [packet] = sentPackets(transport)
        reply(proto, Op.WRITE, packet.reqId, b"OK\0")
        self.failureResultOf(d, UnexpectedPacket)

    def test_cancelledNotConverted(self):
        """A cancelled request's late reply is neither converted nor delivered."""
        proto, transport, _ = makeProtocol()
        calls = []
        d = proto.send(Op.READ, b"/a\0", 0, "/a", calls.append, None)
        [packet] = sentPackets(transport)
        d.cancel()
        self.failureResultOf(d, CancelledError)
        reply(proto, Op.READ, packet.reqId, b"late")
        reply(proto, Op.ERROR, packet.reqId, b"ENOENT\0")  # and nothing more is pending
        self.assertEqual(calls, [])
        self.assertEqual(proto.pendingCount, 0)
        self.assertEqual(proto.unexpectedPackets, 1)

    def test_cancelledErrorReplySwallowed(self):
        """A cancelled request's late ERROR reply is swallowed too."""
        proto, transport, _ = makeProtocol()
        d = proto.send(Op.READ, b"/a\0", 0, "/a", None, None)
        [packet] = sentPackets(transport)
        d.cancel()
        self.failureResultOf(d, CancelledError)
        reply(proto, Op.ERROR, packet.reqId, b"ENOENT\0")
        self.assertEqual(proto.unexpectedPackets, 0)
        self.assertEqual(proto.pendingCount, 0)

    def test_xenbusQuirkConverted(self):
        """A WATCH ack with req_id 0 (xenbus) goes through the conversion too."""
        proto, transport, _ = makeProtocol()
        d = proto.send(Op.WATCH, b"/a\0t\0", 0, "/a", discard, None)
        sentPackets(transport)
        reply(proto, Op.WATCH, 0, b"OK\0")
        self.assertIsNone(self.successResultOf(d))

    def test_counted(self):
        """send counts requests like request does."""
        proto, _, _ = makeProtocol()
        proto.roundTrips = {}
        proto.send(Op.READ, b"/a\0", 0, "/a", None, None)
        proto.request(Op.READ, b"/b\0")
        self.assertEqual(proto.requestsSent, 2)
        self.assertEqual(proto.roundTrips, {Op.READ: 2})

    def test_tooLarge(self):
        """A payload over 4096 bytes raises and sends nothing."""
        proto, transport, _ = makeProtocol()
        self.assertRaises(
            InvalidPayloadError, proto.send, Op.WRITE, b"x" * 4097, 0, None, None, None
        )
        self.assertEqual(transport.value(), b"")
        self.assertEqual(proto.pendingCount, 0)

    def test_notConnected(self):
        """send on a closed or never connected protocol fails at once."""
        proto = XenStoreProtocol()
        d = proto.send(Op.READ, b"/a\0", 0, "/a", discard, None)
        self.failureResultOf(d, XenStoreConnectionLost)


class BatchTests(SynchronousTestCase):
    """Requests made while replies are dispatched go out in one write, in order."""

    def test_oneWrite(self):
        """Requests made by reply callbacks are written once, after the chunk."""
        proto, transport, _ = makeProtocol()
        writes = []
        transport.write = writes.append
        ds = [proto.request(Op.READ, b"/%d\0" % i) for i in range(3)]
        first = PacketParser().feed(b"".join(writes))
        writes.clear()
        for i, d in enumerate(ds):
            d.addCallback(lambda _, i=i: proto.request(Op.READ, b"/next%d\0" % i))
        proto.dataReceived(b"".join(Packet(Op.READ, p.reqId, 0, b"v").encode() for p in first))
        self.assertEqual(len(writes), 1)
        self.assertEqual(
            [p.payload for p in PacketParser().feed(writes[0])],
            [b"/next0\0", b"/next1\0", b"/next2\0"],
        )

    def test_nestedDataReceivedKeepsOrder(self):
        """
        A callback that feeds the protocol synchronously (a loopback
        transport) does not reorder requests: the outer call writes them all.
        """
        proto, transport, _ = makeProtocol()
        writes = []
        transport.write = writes.append
        a = proto.request(Op.READ, b"/a\0")
        b = proto.request(Op.READ, b"/b\0")
        pa, pb = PacketParser().feed(b"".join(writes))
        writes.clear()

        def first(_):
            proto.request(Op.WRITE, b"/first\0x")
            proto.dataReceived(Packet(Op.READ, pb.reqId, 0, b"b").encode())

        a.addCallback(first)
        b.addCallback(lambda _: proto.request(Op.WRITE, b"/second\0y"))
        proto.dataReceived(Packet(Op.READ, pa.reqId, 0, b"a").encode())
        self.assertEqual(len(writes), 1)
        self.assertEqual(
            [p.payload for p in PacketParser().feed(writes[0])], [b"/first\0x", b"/second\0y"]
        )

    def test_queueDrainedIntoBatch(self):
        """With maxInFlight, a reply's freed slot sends a queued request in the same write."""
        proto, transport, _ = makeProtocol(maxInFlight=1)
        writes = []
        transport.write = writes.append
        d1 = proto.request(Op.READ, b"/1\0")
        d2 = proto.request(Op.READ, b"/2\0")
        [p1] = PacketParser().feed(b"".join(writes))
        writes.clear()
        d1.addCallback(lambda _: proto.request(Op.READ, b"/3\0"))
        proto.dataReceived(Packet(Op.READ, p1.reqId, 0, b"one").encode())
        self.assertEqual(len(writes), 1)
        [p2] = PacketParser().feed(writes[0])
        self.assertEqual(p2.payload, b"/2\0")
        self.assertEqual(proto.pendingCount, 2)
        self.assertNoResult(d2)
