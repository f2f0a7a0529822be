"""
The limits on the daemon's HTTP face (L{xenddev.httplimits}), through the
XML-RPC site (L{xenddev.xmlrpc.rpcSite}): a body over the size limit is
refused with 413 before it is read, a request trickling in is cut at its
deadline, a silent connection at the idle timeout, connections over the
cap are closed at once while the open ones are served, and a request
naming no method gets an XML-RPC fault. Time is a L{Clock}; the connection
cap and the refusal a real client reads are tested on real UNIX sockets.
"""

from __future__ import annotations

import os
import socket
import xmlrpc.client
from typing import Any

from twisted.internet import reactor
from twisted.internet.address import UNIXAddress
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import UNIXClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import StringTransport
from twisted.internet.threads import deferToThread
from twisted.logger import globalLogPublisher
from twisted.protocols.policies import WrappingFactory
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from tests.support.host import shortTempDir
from xenddev.httplimits import REPORT_INTERVAL, HttpLimits, LimitedSite
from xenddev.xmlrpc import rpcSite

STATUS = (
    b"<?xml version='1.0'?><methodCall><methodName>daemon.status</methodName>"
    b"<params></params></methodCall>"
)


class _Manager:
    """What C{daemon.status} reads of a device manager."""

    inFlight = 0
    controllerClasses = {"vbd": None, "vif": None}


def post(body: bytes, version: bytes = b"HTTP/1.1") -> bytes:
    """A POST of C{body} with its Content-Length."""
    return (
        b"POST /RPC2 " + version + b"\r\nHost: x\r\nContent-Type: text/xml\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body) + body
    )


def connect(site: Any) -> tuple[Any, StringTransport]:
    """A channel of C{site} on a string transport."""
    channel = site.buildProtocol(UNIXAddress("/x"))
    transport = StringTransport()
    channel.makeConnection(transport)
    return channel, transport


def captureLog(test: Any) -> list[dict[str, Any]]:
    """Log events until the end of the test."""
    events: list[dict[str, Any]] = []
    observer: Any = events.append
    globalLogPublisher.addObserver(observer)
    test.addCleanup(globalLogPublisher.removeObserver, observer)
    return events


class _Held(Resource):
    """Answers a POST only when the test says so."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[Any] = []

    def render_POST(self, request: Any) -> Any:
        """Keep the request unanswered."""
        self.requests.append(request)
        return NOT_DONE_YET


class RequestLimitTests(SynchronousTestCase):
    """Body size, request deadline and idle timeout, on a Clock."""

    def site(self, **limits: Any) -> LimitedSite:
        """The XML-RPC site with these limits, timed by C{self.clock}."""
        self.clock = Clock()
        return rpcSite(_Manager(), limits=HttpLimits(**limits), reactor=self.clock)  # type: ignore[arg-type]

    def test_declaredBodyOverLimit(self) -> None:
        """
        A Content-Length over the limit is answered 413 as soon as the
        headers are in, before any of the body; what follows is dropped,
        never parsed.
        """
        events = captureLog(self)
        channel, transport = connect(self.site(bodySize=1024))
        channel.dataReceived(b"POST /RPC2 HTTP/1.1\r\nHost: x\r\nContent-Length: 52428800\r\n\r\n")
        answer = transport.value()
        self.assertTrue(answer.startswith(b"HTTP/1.1 413 "), answer)
        self.assertIn(b"limits.body_size", answer)
        self.assertTrue(transport.disconnecting)
        channel.dataReceived(b"<methodCall>" + b"x" * 100_000)
        self.assertEqual(transport.value(), answer)
        self.assertEqual(len([e for e in events if "52428800 bytes" in str(e)]), 1)

    def test_chunkedBodyOverLimit(self) -> None:
        """A chunked body (no length) is counted as it arrives and refused past the limit."""
        channel, transport = connect(self.site(bodySize=1024))
        channel.dataReceived(
            b"POST /RPC2 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        channel.dataReceived(b"200\r\n" + b"x" * 0x200 + b"\r\n")
        self.assertEqual(transport.value(), b"")
        channel.dataReceived(b"400\r\n" + b"x" * 0x400 + b"\r\n0\r\n\r\n")
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 413 "))
        self.assertEqual(transport.value().count(b"HTTP/1.1"), 1)
        self.assertTrue(transport.disconnecting)

    def test_bodyWithinLimitServed(self) -> None:
        """A request within the limit is answered as before."""
        channel, transport = connect(self.site(bodySize=len(STATUS)))
        channel.dataReceived(post(STATUS))
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 200 "))
        self.assertIn(b"<name>classes</name>", transport.value())
        self.assertFalse(transport.disconnecting)

    def test_noMethodName(self) -> None:
        """
        A call naming no method is XML-RPC fault 8002 (malformed request),
        not HTTP 500 with an HTML page.
        """
        channel, transport = connect(self.site())
        channel.dataReceived(post(b"<?xml version='1.0'?><methodCall><params/></methodCall>"))
        head, _, body = transport.value().partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 200 "), head)
        self.assertIn(b"text/xml", head)
        with self.assertRaises(xmlrpc.client.Fault) as cm:
            xmlrpc.client.loads(body)
        self.assertEqual(cm.exception.faultCode, 8002)
        self.assertIn("methodName", cm.exception.faultString)

    def test_tricklingRequestCut(self) -> None:
        """
        A client sending one byte every 29 s (inside the idle timeout) is
        cut with 408 once the request is not in within the request
        timeout of its first byte.
        """
        events = captureLog(self)
        channel, transport = connect(self.site(idleTimeout=60, requestTimeout=30))
        request = post(STATUS)
        channel.dataReceived(request[:1])
        channel.dataReceived(request[1:2])
        self.clock.advance(29)
        channel.dataReceived(request[2:3])
        self.assertFalse(transport.disconnecting)
        self.clock.advance(1)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 408 "), transport.value())
        self.assertTrue(transport.disconnecting)
        self.assertEqual(len([e for e in events if "limits.request_timeout" in str(e)]), 1)
        channel.dataReceived(request[3:])
        self.assertEqual(transport.value().count(b"HTTP/1.1"), 1)
        self.clock.advance(channel.abortTimeout)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_idleConnectionClosed(self) -> None:
        """A connection sending nothing is closed after the idle timeout."""
        _, transport = connect(self.site(idleTimeout=60, requestTimeout=30))
        self.clock.advance(59)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(1)
        self.assertTrue(transport.disconnecting)

    def test_capBehindAWrapper(self) -> None:
        """
        Over the cap, a site wrapped by another factory (as TLS wraps it)
        still closes the new connection at once, and counts only channels.
        """
        site = self.site(connections=1)
        wrapper = WrappingFactory(site)
        first, firstTransport = connect(wrapper)
        _, secondTransport = connect(wrapper)
        self.assertTrue(secondTransport.disconnected)
        self.assertFalse(firstTransport.disconnecting)
        self.assertEqual((site.open, site.refused), (1, 1))
        first.dataReceived(post(STATUS))
        self.assertTrue(firstTransport.value().startswith(b"HTTP/1.1 200 "))

    def test_answeringIsNotTimed(self) -> None:
        """
        The deadline covers receiving a request, not answering it: a slow
        answer outlives both timeouts, and on the same (kept-alive)
        connection the next request's deadline starts at its first byte.
        """
        self.clock = Clock()
        held = _Held()
        site = LimitedSite(held, HttpLimits(idleTimeout=60, requestTimeout=30), self.clock)
        channel, transport = connect(site)
        channel.dataReceived(post(b"one"))
        self.clock.advance(300)
        self.assertFalse(transport.disconnecting)
        held.requests[0].write(b"done")
        held.requests[0].finish()
        self.assertIn(b"done", transport.value())
        self.clock.advance(50)
        channel.dataReceived(post(b"two")[:5])
        self.clock.advance(29)
        self.assertFalse(transport.disconnecting)
        channel.dataReceived(post(b"two")[5:])
        self.assertEqual(len(held.requests), 2)
        self.clock.advance(300)
        self.assertFalse(transport.disconnecting)


class _Client(Protocol):
    """A client connection that records when it is closed."""

    def __init__(self) -> None:
        self.closed: Deferred[None] = Deferred()
        self.received = b""

    def dataReceived(self, data: bytes) -> None:
        """Keep what the server sends."""
        self.received += data

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        """Fire L{closed}."""
        self.closed.callback(None)


def exchange(path: str, request: bytes) -> bytes:
    """Send a whole request over a UNIX socket and read the answer until closed (in a thread)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(30)
        s.connect(path)
        s.sendall(request)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data


class SocketLimitTests(TestCase):
    """The connection cap and the 413 a real client reads, on real UNIX sockets."""

    def listen(self, site: LimitedSite) -> str:
        """Serve C{site} on a fresh socket; stopped at cleanup."""
        path = os.path.join(shortTempDir(self, "lim-"), "sock")
        port = reactor.listenUNIX(path, site)  # type: ignore[attr-defined]
        self.addCleanup(port.stopListening)
        return path

    async def open(self, path: str) -> _Client:
        """A client connection; closed at cleanup."""
        client = _Client()
        await connectProtocol(UNIXClientEndpoint(reactor, path), client)
        self.addCleanup(self.close, client)
        return client

    async def close(self, client: _Client) -> None:
        """Close a client connection and wait until it is."""
        if not client.closed.called:
            client.transport.loseConnection()  # type: ignore[union-attr]
            await client.closed

    async def test_connectionCap(self) -> None:
        """
        With C{connections} open, a new one is closed at once and logged;
        the open ones are still served; more refusals within the report
        interval make one summary line; a closed slot is usable again.
        """
        events = captureLog(self)
        clock = Clock()
        site = rpcSite(_Manager(), limits=HttpLimits(connections=3), reactor=clock)  # type: ignore[arg-type]
        path = self.listen(site)
        held = [await self.open(path) for _ in range(3)]
        while site.open < 3:
            await deferLater(reactor, 0.01, lambda: None)
        extra = await self.open(path)
        await extra.closed
        lines = [e for e in events if "limits.connections" in str(e.get("log_format"))]
        self.assertEqual([e["n"] for e in lines], [1])
        held[0].transport.write(post(STATUS))  # type: ignore[union-attr]
        while b"</methodResponse>" not in held[0].received:
            await deferLater(reactor, 0.01, lambda: None)
        self.assertTrue(held[0].received.startswith(b"HTTP/1.1 200 "))
        for _ in range(2):
            await (await self.open(path)).closed
        self.assertEqual(len(lines), 1)
        clock.advance(REPORT_INTERVAL)
        lines = [e for e in events if "limits.connections" in str(e.get("log_format"))]
        self.assertEqual([e["n"] for e in lines], [1, 2])
        self.assertEqual(site.refused, 3)
        await self.close(held[1])
        while site.open > 2:
            await deferLater(reactor, 0.01, lambda: None)
        again = await self.open(path)
        again.transport.write(post(STATUS, b"HTTP/1.0"))  # type: ignore[union-attr]
        await again.closed
        self.assertTrue(again.received.startswith(b"HTTP/1.0 200 "), again.received[:100])

    async def test_clientReadsTheRefusal(self) -> None:
        """
        A client that sends a whole 8 MB body over the 1 MB limit reads the
        413 (its bytes are discarded, not parsed), not a reset.
        """
        site = rpcSite(_Manager(), limits=HttpLimits(bodySize=1 << 20))  # type: ignore[arg-type]
        path = self.listen(site)
        body = b"<methodCall>" + b"x" * (8 << 20)
        answer = await deferToThread(exchange, path, post(body))
        self.assertTrue(answer.startswith(b"HTTP/1.1 413 "), answer[:100])
        self.assertIn(b"8388620 bytes", answer)
        while site.open:
            await deferLater(reactor, 0.01, lambda: None)
