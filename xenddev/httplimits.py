# -*- test-case-name: tests.test_httplimits -*-
"""
Limits on the daemon's HTTP face: what one client may cost the others.

A L{LimitedSite} is a C{twisted.web} L{Site} whose connections are held
to L{HttpLimits}:

  - C{bodySize}: a request declaring a larger body (C{Content-Length}) is
    answered C{413} as soon as its headers are in, before any of the body
    is read; a chunked body is counted as it arrives and refused the same
    way once it passes the limit. Nothing of a refused body is kept or
    parsed: the rest is discarded for at most L{LINGER} seconds (so the
    client can read the answer instead of a reset) and the connection is
    closed;
  - C{idleTimeout}: a connection silent that long between requests is
    closed (Twisted's idle timeout, suspended while a request is being
    answered: a long attach is not cut);
  - C{requestTimeout}: one request (line, headers and body) must arrive
    within that many seconds of its first byte, however it trickles in;
    else the client gets C{408} and the connection is closed;
  - C{connections}: a connection accepted while that many are open is
    closed at once (one log line, then at most one every
    L{REPORT_INTERVAL} seconds with the count); the open ones keep
    working. It gets a protocol that aborts it as soon as it is made, not
    C{None}: a factory wrapping the site (TLS's) cannot take C{None}.

Time is the injected reactor's (C{reactor=} of the site): tests drive it
with a L{twisted.internet.task.Clock}.
"""

from __future__ import annotations

from typing import Any, cast

import attrs
from twisted.internet.interfaces import IAddress, IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel
from twisted.web.resource import IResource
from twisted.web.server import Request, Site

__all__ = [
    "LINGER",
    "REPORT_INTERVAL",
    "HttpLimits",
    "LimitedChannel",
    "LimitedRequest",
    "LimitedSite",
]

#: Seconds a refused request's remaining bytes are read and discarded
#: before the connection is aborted.
LINGER = 2.0
#: Seconds between two log lines about refused connections.
REPORT_INTERVAL = 10.0

_log = Logger()


@attrs.frozen
class HttpLimits:
    """
    What one HTTP client may hold (the daemon's C{limits:} keys).

    @ivar bodySize: bytes of one request body (C{limits.body_size}).
    @ivar connections: connections open at once on one listener
        (C{limits.connections}).
    @ivar idleTimeout: seconds a connection may stay silent between
        requests (C{limits.idle_timeout}).
    @ivar requestTimeout: seconds to receive one whole request from its
        first byte (C{limits.request_timeout}).
    """

    bodySize: int = 1 << 20
    connections: int = 128
    idleTimeout: float = 60.0
    requestTimeout: float = 30.0


def _response(code: int, reason: str, text: str) -> bytes:
    body = text.encode() + b"\n"
    return (
        f"HTTP/1.1 {code} {reason}\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode() + body


class LimitedRequest(Request):
    """A request that counts its body as it arrives (chunked bodies have no length)."""

    _received = 0

    def handleContentChunk(self, data: bytes) -> None:
        """Keep a chunk of the body, unless the body is now over the limit."""
        self._received += len(data)
        channel = cast(LimitedChannel, self.channel)
        limit = channel.site.limits.bodySize
        if self._received > limit:
            channel.refuseBody(f"more than {limit} bytes")
            return
        super().handleContentChunk(data)


class LimitedChannel(HTTPChannel):
    """
    An HTTP/1.1 channel held to its site's L{HttpLimits}: body size and
    the deadline of each request (the idle timeout is Twisted's own).
    """

    site: LimitedSite
    _refused = False
    _deadline: IDelayedCall | None = None
    _linger: IDelayedCall | None = None

    def connectionMade(self) -> None:
        """Count the connection on the site."""
        self.site.opened()
        super().connectionMade()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """Uncount it; cancel its timers."""
        self.site.closed()
        for call in (self._deadline, self._linger):
            if call is not None and call.active():
                call.cancel()
        self._deadline = self._linger = None
        super().connectionLost(reason)

    def dataReceived(self, data: bytes) -> None:
        """Start the request's deadline at its first byte; drop what follows a refusal."""
        if self._refused:
            return
        if self._deadline is None and not self._handlingRequest:
            self._deadline = self.callLater(self.site.limits.requestTimeout, self._tooSlow)
        super().dataReceived(data)

    def lineReceived(self, line: bytes) -> None:
        """A line of a request, unless it was refused."""
        if not self._refused:
            super().lineReceived(line)

    def rawDataReceived(self, data: bytes) -> None:
        """Body bytes, unless the request was refused."""
        if not self._refused:
            super().rawDataReceived(data)

    def allHeadersReceived(self) -> None:
        """Refuse a declared body over the limit before reading any of it."""
        limit = self.site.limits.bodySize
        if self.length is not None and self.length > limit:
            self.refuseBody(f"{self.length} bytes")
            return
        super().allHeadersReceived()

    def allContentReceived(self) -> None:
        """The whole request is in: stop its deadline and answer it."""
        if self._refused:
            return
        if self._deadline is not None:
            if self._deadline.active():
                self._deadline.cancel()
            self._deadline = None
        super().allContentReceived()

    def refuseBody(self, size: str) -> None:
        """Answer C{413}, discard the rest for at most L{LINGER} seconds, then close."""
        if self._refused:
            return
        limit = self.site.limits.bodySize
        _log.warn(
            "{site}: refused a request body of {size} from {peer} (limits.body_size = {limit})",
            site=self.site.label,
            size=size,
            peer=_peer(self.transport),
            limit=limit,
        )
        self._refuse(
            _response(
                413,
                "Request Entity Too Large",
                f"request body of {size}: the limit is {limit} bytes (limits.body_size)",
            )
        )
        transport: Any = self.transport
        closeWrite = getattr(transport, "loseWriteConnection", None)
        if closeWrite is None:
            transport.loseConnection()
            return
        # Keep reading (and dropping) so the client sees the answer, not a reset.
        closeWrite()
        self._linger = self.callLater(LINGER, transport.abortConnection)

    def _tooSlow(self) -> None:
        self._deadline = None
        timeout = self.site.limits.requestTimeout
        _log.warn(
            "{site}: a request from {peer} did not arrive within {timeout:g}s "
            "(limits.request_timeout); closing",
            site=self.site.label,
            peer=_peer(self.transport),
            timeout=timeout,
        )
        self._refuse(
            _response(
                408,
                "Request Timeout",
                f"the request did not arrive within {timeout:g}s (limits.request_timeout)",
            )
        )
        transport: Any = self.transport
        transport.loseConnection()
        self._linger = self.callLater(self.abortTimeout, transport.abortConnection)

    def _refuse(self, response: bytes) -> None:
        self._refused = True
        self.setTimeout(None)
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None
        transport: Any = self.transport
        transport.write(response)
        # Nothing more to produce: let the transport close after the answer.
        transport.unregisterProducer()


class _TurnedAway(Protocol):
    """A connection over the cap: aborted as soon as it is made."""

    def connectionMade(self) -> None:
        """Close it at once, without reading anything."""
        transport: Any = self.transport
        transport.abortConnection()


def _peer(transport: Any) -> str:
    try:
        return str(transport.getPeer())
    except Exception:
        return "?"


class LimitedSite(Site):
    """
    A L{Site} held to L{HttpLimits} (see the module docstring).

    @param resource: the root resource.
    @param limits: the limits.
    @param reactor: time and timeouts (default: the global reactor).
    @param label: names the listener in log lines (e.g. its socket).
    @ivar open: connections open now.
    @ivar refused: connections refused for the cap since the start.
    """

    protocol = LimitedChannel  # type: ignore[assignment]
    requestFactory = LimitedRequest
    displayTracebacks = False

    def __init__(
        self,
        resource: IResource,
        limits: HttpLimits | None = None,
        reactor: IReactorTime | None = None,
        label: str = "XML-RPC",
    ) -> None:
        self.limits = limits if limits is not None else HttpLimits()
        super().__init__(resource, timeout=self.limits.idleTimeout, reactor=reactor)
        self.label = label
        self.open = 0
        self.refused = 0
        self._unreported = 0
        self._lastReport: float | None = None
        self._report: IDelayedCall | None = None

    def buildProtocol(self, addr: IAddress | None) -> Any:
        """A channel; over the cap, a protocol that closes the connection at once."""
        if self.open >= self.limits.connections:
            self._turnAway()
            return _TurnedAway()
        return super().buildProtocol(addr)

    def opened(self) -> None:
        """A channel of this site connected."""
        self.open += 1

    def closed(self) -> None:
        """A channel of this site lost its connection."""
        self.open -= 1

    def _turnAway(self) -> None:
        self.refused += 1
        self._unreported += 1
        now = self.reactor.seconds()
        if self._lastReport is None or now - self._lastReport >= REPORT_INTERVAL:
            self._reportRefusals()
        elif self._report is None:
            self._report = self.reactor.callLater(
                self._lastReport + REPORT_INTERVAL - now, self._reportRefusals
            )

    def _reportRefusals(self) -> None:
        self._report = None
        if not self._unreported:
            return
        _log.warn(
            "{site}: closed {n} new connection(s) at once: {open} are open "
            "(limits.connections = {limit}); the open ones are served",
            site=self.label,
            n=self._unreported,
            open=self.open,
            limit=self.limits.connections,
        )
        self._unreported = 0
        self._lastReport = self.reactor.seconds()

    def stopFactory(self) -> None:
        """Report the last refusals now."""
        if self._report is not None and self._report.active():
            self._report.cancel()
            self._reportRefusals()
        super().stopFactory()
