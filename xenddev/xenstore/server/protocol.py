# -*- test-case-name: tests.test_xenstored_embedded -*-
"""
The server side of the XenStore wire protocol as a Twisted L{Protocol}.

Each complete packet is handed to L{XenStoreServer.handle}; the replies of
one read from the socket are written together. A header announcing more
than C{XENSTORE_PAYLOAD_MAX} bytes makes the stream unusable, and the C
daemon drops such a client: so do we (after sending the replies to the
requests before it). Nothing here blocks: when the transport's send buffer
fills, the connection stops reading until it drains.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from xenddev.xenstore.server.core import Connection, XenStoreServer
from xenddev.xenstore.wire import HEADER, HEADER_SIZE, PAYLOAD_MAX


@implementer(IPushProducer)
class XenStoreServerProtocol(Protocol):
    """
    One client connection, acting as domain C{domid}.

    It is also the push producer of its own replies: the transport pauses
    it when the peer does not read, and it then stops reading requests.
    """

    log = Logger()

    def __init__(self, server: XenStoreServer, domid: int = 0) -> None:
        self.server = server
        self.domid = domid
        self.conn: Connection | None = None
        self._buffer = b""
        self._paused = False
        self._quotaPaused = False
        self._closing = False
        self._sock: Any = None

    def connectionMade(self) -> None:
        """Register with the server and with the transport as a producer."""
        assert self.transport is not None
        self.conn = self.server.connect(self.domid, self._send)
        self.transport.registerProducer(self, True)  # type: ignore[attr-defined]
        handle = getattr(self.transport, "getHandle", None)
        sock = handle() if handle is not None else None
        self._sock = sock if hasattr(sock, "send") else None

    def connectionLost(self, reason: Failure | None = None) -> None:
        """Forget the client's watches and transactions."""
        if self.conn is not None:
            self.server.disconnect(self.conn)
            self.conn = None

    def dataReceived(self, data: bytes) -> None:
        """Run every complete request; queue the rest."""
        self._buffer = self._buffer + data if self._buffer else data
        self._process()

    def _process(self) -> None:
        conn = self.conn
        if conn is None or self._closing:
            return
        buf = self._buffer
        offset = 0
        end = len(buf)
        handle = self.server.handle
        unpack = HEADER.unpack_from
        limit = None if conn.privileged else self.server.quotas.requestsOutstanding
        while end - offset >= HEADER_SIZE and not self._paused:
            op, reqId, txId, length = unpack(buf, offset)
            if length > PAYLOAD_MAX:
                self._dropClient(length)
                return
            stop = offset + HEADER_SIZE + length
            if stop > end:
                break
            handle(conn, op, reqId, txId, buf[offset + HEADER_SIZE : stop])
            offset = stop
            if limit is not None and conn.outstanding >= limit:
                # C stops reading a domain's ring while this many replies
                # are unsent; we send them and read on at the next turn.
                self._pauseForQuota()
                break
        self._buffer = buf[offset:] if offset else buf
        conn.flush()

    def _send(self, data: bytes) -> None:
        # Twisted's transport.write only buffers: the bytes go out at the
        # next reactor iteration, a second epoll round per request that
        # costs more than running the request. When nothing is queued in
        # the transport, send at once and hand it only what did not fit.
        t = self.transport
        sock = self._sock
        if (
            sock is not None
            and not getattr(t, "dataBuffer", b"x")
            and not getattr(t, "_tempDataBuffer", b"x")
        ):
            try:
                sent = sock.send(data)
            except BlockingIOError:
                sent = 0
            except OSError:
                return  # the connection is gone; connectionLost follows
            if sent == len(data):
                return
            data = data[sent:]
        assert t is not None
        t.write(data)

    def _pauseForQuota(self) -> None:
        if self._quotaPaused or self.transport is None:
            return
        self._quotaPaused = True
        self.transport.pauseProducing()  # type: ignore[attr-defined]
        reactor = self.server.reactor
        if reactor is None:
            from twisted.internet import reactor as _reactor

            reactor = _reactor
        reactor.callLater(0, self._unpauseForQuota)

    def _unpauseForQuota(self) -> None:
        self._quotaPaused = False
        if self.conn is None:
            return
        if not self._paused and self.transport is not None:
            self.transport.resumeProducing()  # type: ignore[attr-defined]
        self._process()

    def _dropClient(self, length: int) -> None:
        self.log.warn(
            "Client of domain {domid} tried to feed us {length} bytes; dropping it",
            domid=self.domid,
            length=length,
        )
        self._closing = True
        self._buffer = b""
        assert self.conn is not None and self.transport is not None
        self.conn.flush()
        self.server.disconnect(self.conn)
        self.transport.loseConnection()

    # IPushProducer: the transport's send buffer is full / drained.

    def pauseProducing(self) -> None:
        """The peer is not reading our replies: stop reading its requests."""
        if not self._paused:
            self._paused = True
            if self.transport is not None:
                self.transport.pauseProducing()  # type: ignore[attr-defined]

    def resumeProducing(self) -> None:
        """The replies drained: read and run requests again."""
        if self._paused:
            self._paused = False
            if self.transport is not None and not self._quotaPaused:
                self.transport.resumeProducing()  # type: ignore[attr-defined]
            self._process()

    def stopProducing(self) -> None:
        """The connection is going away."""
        self._closing = True


class XenStoreServerFactory(Factory):
    """
    Builds server protocols whose clients act as C{domid}: 0 (the default)
    is the privileged socket, any other domid an unprivileged one (a
    capability the C daemon only offers over shared rings).
    """

    def __init__(self, server: XenStoreServer, domid: int = 0) -> None:
        self.server = server
        self.domid = domid
        self.protocols: set[XenStoreServerProtocol] = set()

    def buildProtocol(self, addr: Any) -> XenStoreServerProtocol:
        """A protocol bound to this factory's server and domid."""
        p = _TrackedProtocol(self.server, self.domid)
        p.factory = self
        return p

    def abortAll(self) -> None:
        """Close every connection abruptly (what a crash looks like)."""
        for p in list(self.protocols):
            if p.transport is not None:
                p.transport.abortConnection()  # type: ignore[attr-defined]


class _TrackedProtocol(XenStoreServerProtocol):
    factory: XenStoreServerFactory

    def connectionMade(self) -> None:
        self.factory.protocols.add(self)
        super().connectionMade()

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.factory.protocols.discard(self)
        super().connectionLost(reason)
