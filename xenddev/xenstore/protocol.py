# -*- test-case-name: tests.test_xenstore_protocol -*-
"""
The client side of the XenStore wire protocol as a Twisted L{Protocol}.

Requests are multiplexed by req_id: any number may be in flight, replies are
matched by id in whatever order they arrive, WATCH_EVENTs (req_id 0) go to
L{XenStoreProtocol.eventReceived}, and a packet nobody waits for is logged and
dropped — it never stops the protocol (pyxs's router thread died on one and
every waiter hung: pyxs issue #11). When the connection closes every pending
Deferred fails with L{XenStoreConnectionLost}.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from twisted.internet.defer import Deferred, fail
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from xenddev.xenstore.errors import (
    MalformedPacket,
    UnexpectedPacket,
    XenStoreConnectionLost,
    errorFromReply,
)
from xenddev.xenstore.wire import (
    UINT32_MAX,
    Op,
    Packet,
    PacketParser,
    decodeError,
    encodePacket,
    opName,
    splitStrings,
)

EventHandler = Callable[[bytes, bytes], None]

#: XenStore round trips of this process: operation number -> requests sent,
#: over every connection (the metrics endpoint exports it). One dict
#: increment per request; a protocol may be given a dict of its own.
ROUND_TRIPS: dict[int, int] = {}


class _Pending:
    """A request sent (or queued) and not yet answered."""

    __slots__ = ("context", "deferred", "op")

    def __init__(self, op: int, deferred: Deferred[bytes] | None, context: str | None) -> None:
        self.op = op
        self.deferred = deferred
        self.context = context

    def cancel(self, d: Deferred[bytes]) -> None:
        # Keep the id reserved until the reply comes, so a late reply cannot
        # be matched to a newer request reusing the id.
        self.deferred = None


class XenStoreProtocol(Protocol):
    """
    Multiplexes XenStore requests over one connection.

    @ivar eventReceived: called with C{(path, token)} (raw bytes) for each
        WATCH_EVENT. The client installs its router here.
    @ivar maxInFlight: if set, at most this many requests are on the wire at
        once and the rest wait in a local queue (xenstored's per-domain
        outstanding-request quota can then never be hit by this connection).
    """

    log = Logger()

    def __init__(self, maxInFlight: int | None = None) -> None:
        self._parser = PacketParser()
        self._pending: dict[int, _Pending] = {}
        self._queue: deque[bytes] = deque()
        self._onWire = 0
        self._nextReqId = 1
        self._closed: Failure | None = None
        self._lostWaiters: list[Deferred[None]] = []
        self.maxInFlight = maxInFlight
        self.eventReceived: EventHandler = self._dropEvent
        #: While replies are being dispatched, requests their callbacks make
        #: are collected here and written once afterwards.
        self._batch: list[bytes] | None = None
        #: Counters for benchmarks and metrics.
        self.requestsSent = 0
        #: Requests by operation number (default: the process-wide L{ROUND_TRIPS}).
        self.roundTrips = ROUND_TRIPS
        self.unexpectedPackets = 0

    # Connection lifecycle

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:  # noqa: B008
        """Fail every pending request: xenstored may or may not have run them."""
        # BaseProtocol.makeConnection set this; nothing resets it for us.
        self.connected = 0
        why = reason.getErrorMessage() if reason is not None else "closed"
        self._closed = Failure(XenStoreConnectionLost(f"connection to xenstored lost: {why}"))
        pending, self._pending = self._pending, {}
        self._queue.clear()
        for entry in pending.values():
            d, entry.deferred = entry.deferred, None
            if d is not None:
                d.errback(self._lostError(entry))
        waiters, self._lostWaiters = self._lostWaiters, []
        for w in waiters:
            w.callback(None)

    def whenConnectionLost(self) -> Deferred[None]:
        """A Deferred that fires (with None) once this connection has closed."""
        if self._closed is not None:
            d: Deferred[None] = Deferred()
            d.callback(None)
            return d
        d = Deferred()
        self._lostWaiters.append(d)
        return d

    def _lostError(self, entry: _Pending) -> XenStoreConnectionLost:
        assert self._closed is not None
        base = self._closed.getErrorMessage()
        what = opName(entry.op) + (f" {entry.context}" if entry.context else "")
        return XenStoreConnectionLost(f"{base} (pending {what})")

    # Requests

    def _allocateReqId(self) -> int:
        # Per-connection ids, wrapping inside uint32 (pyxs used one global
        # counter that overflowed struct packing at 2**32) and skipping 0,
        # which xenstored uses for WATCH_EVENTs, and ids still in flight.
        rid = self._nextReqId
        while True:
            nxt = rid + 1 if rid < UINT32_MAX else 1
            if rid not in self._pending:
                self._nextReqId = nxt
                return rid
            rid = nxt

    def request(
        self, op: int, payload: bytes, txId: int = 0, context: str | None = None
    ) -> Deferred[bytes]:
        """
        Send one request and return a Deferred firing with the reply payload.

        The Deferred fails with a L{XenStoreError} subclass for an ERROR reply,
        L{XenStoreConnectionLost} if the connection closes first, or
        L{UnexpectedPacket} if the reply has the wrong type. Cancelling it
        forgets the reply when it arrives (the request may still be executed).

        @param context: a path or other detail for error messages.
        """
        if self._closed is not None:
            return fail(XenStoreConnectionLost(self._closed.getErrorMessage()))
        if not self.connected:
            return fail(XenStoreConnectionLost("not connected to xenstored"))
        rid = self._allocateReqId()
        data = encodePacket(op, rid, txId, payload)
        entry = _Pending(op, None, context)
        d: Deferred[bytes] = Deferred(entry.cancel)
        entry.deferred = d
        self._pending[rid] = entry
        self.requestsSent += 1
        trips = self.roundTrips
        trips[op] = trips.get(op, 0) + 1
        if self.maxInFlight is not None and self._onWire >= self.maxInFlight:
            self._queue.append(data)
        else:
            self._onWire += 1
            self._write(data)
        return d

    def _write(self, data: bytes) -> None:
        if self._batch is not None:
            self._batch.append(data)
        else:
            assert self.transport is not None
            self.transport.write(data)

    # Replies

    def dataReceived(self, data: bytes) -> None:
        """Parse replies and events, dispatching each as it completes."""
        try:
            packets = self._parser.feed(data)
        except MalformedPacket as e:
            self.log.error("Dropping XenStore connection: {error}", error=e)
            self._closed = Failure(e)
            for packet in e.packets:  # complete replies before the bad header
                self._dispatch(packet)
            assert self.transport is not None
            self.transport.loseConnection()
            return
        # Requests made by the callbacks of these replies (the pipelined
        # case) go out in one write instead of one each.
        batch: list[bytes] = []
        self._batch = batch
        try:
            for packet in packets:
                self._dispatch(packet)
        finally:
            self._batch = None
            if batch and self.transport is not None:
                self.transport.write(b"".join(batch))

    def _dispatch(self, packet: Packet) -> None:
        if packet.op == Op.WATCH_EVENT:
            parts = splitStrings(packet.payload)
            if len(parts) < 2:
                self.unexpectedPackets += 1
                self.log.warn("Ignoring malformed WATCH_EVENT {payload!r}", payload=packet.payload)
                return
            try:
                self.eventReceived(parts[0], parts[1])
            except Exception:
                self.log.failure("Watch event handler failed for {path!r}", path=parts[0])
            return
        entry = self._pending.pop(packet.reqId, None)
        if entry is None and packet.reqId == 0 and packet.op in (Op.WATCH, Op.UNWATCH, Op.ERROR):
            # The Linux xenbus device answers WATCH/UNWATCH itself, with
            # req_id 0 (pyxs issue #18), errors included: match the oldest
            # pending request of that op (of either op, for an ERROR).
            wanted = (Op.WATCH, Op.UNWATCH) if packet.op == Op.ERROR else (packet.op,)
            for rid, candidate in self._pending.items():
                if candidate.op in wanted:
                    entry = self._pending.pop(rid)
                    break
        if entry is None:
            self.unexpectedPackets += 1
            self.log.warn(
                "Ignoring unexpected XenStore packet {op} req_id={reqId} ({size} bytes)",
                op=opName(packet.op),
                reqId=packet.reqId,
                size=len(packet.payload),
            )
            return
        self._onWire -= 1
        if self._queue:
            self._onWire += 1
            self._write(self._queue.popleft())
        d, entry.deferred = entry.deferred, None
        if d is None:
            return  # cancelled by its caller
        if packet.op == Op.ERROR:
            d.errback(errorFromReply(decodeError(packet.payload), opName(entry.op), entry.context))
        elif packet.op != entry.op:
            d.errback(
                UnexpectedPacket(
                    f"reply type {opName(packet.op)} to a {opName(entry.op)} request "
                    f"(req_id {packet.reqId})"
                )
            )
        else:
            d.callback(packet.payload)

    def _dropEvent(self, path: bytes, token: bytes) -> None:
        self.log.debug("Watch event {path!r} {token!r} with no handler", path=path, token=token)

    @property
    def pendingCount(self) -> int:
        """Requests sent or queued and not yet answered."""
        return len(self._pending)


class XenStoreClientFactory(Factory):
    """Builds L{XenStoreProtocol}s for client endpoints."""

    protocol = XenStoreProtocol

    def __init__(
        self,
        maxInFlight: int | None = None,
        attach: Callable[[XenStoreProtocol], object] | None = None,
    ) -> None:
        self.maxInFlight = maxInFlight
        self.attach = attach

    def buildProtocol(self, addr: object) -> XenStoreProtocol:
        """
        Create a protocol with this factory's in-flight limit, and give it to
        C{attach} (which binds a client to the protocol itself: wrappers such
        as L{ClientService} only ever hand out proxies of it).
        """
        p = XenStoreProtocol(self.maxInFlight)
        p.factory = self
        if self.attach is not None:
            self.attach(p)
        return p
