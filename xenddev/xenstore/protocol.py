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
from collections.abc import Callable, Mapping
from typing import Any

from twisted.internet.defer import Deferred, fail
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from xenddev.xenstore.errors import (
    InvalidPayloadError,
    MalformedPacket,
    UnexpectedPacket,
    XenStoreConnectionLost,
    XenStoreError,
    errorFromReply,
)
from xenddev.xenstore.wire import (
    HEADER,
    PAYLOAD_MAX,
    UINT32_MAX,
    Op,
    PacketParser,
    RawPacket,
    decodeError,
    opName,
    splitStrings,
)

EventHandler = Callable[[bytes, bytes], None]

#: What L{XenStoreProtocol.send} does with a reply's payload before firing:
#: C{None} keeps the bytes, L{discard} fires with C{None}, any other callable
#: is applied to the payload.
Convert = Callable[[bytes], Any] | None

#: Error replies that answer a request rather than fail it: errno name ->
#: the result to fire with (e.g. C{{"ENOENT": None}} for "read or None").
Answers = Mapping[str, Any] | None

#: XenStore round trips of this process: operation number -> requests sent,
#: over every connection (the metrics endpoint exports it). One dict
#: increment per request; a protocol may be given a dict of its own.
ROUND_TRIPS: dict[int, int] = {}

_WATCH_EVENT = int(Op.WATCH_EVENT)
_ERROR = int(Op.ERROR)
_PACK_HEADER = HEADER.pack


def discard(payload: bytes) -> None:
    """The L{Convert} of requests whose reply says only "OK": fire with None."""
    return None


#: A request sent (or queued) and not yet answered: its Deferred, operation,
#: context (for messages), L{Convert} and L{Answers}. A tuple, not an
#: object: it is built once per request. A cancelled request keeps its entry
#: (so its id stays reserved) and is recognised by its Deferred having fired.
_Entry = tuple[Deferred[Any], int, "str | None", Convert, Answers]


def addConversion(d: Deferred[bytes], convert: Convert, answers: Answers) -> Deferred[Any]:
    """
    Add to C{d}, a Deferred from a C{request()}, the callbacks doing what
    L{XenStoreProtocol.send} does before firing (for requests that cannot
    go through it: a stand-in protocol).
    """
    if convert is not None:
        d.addCallback(convert)
    if answers is not None:
        d.addErrback(_answerError, answers)
    return d


def _answerError(f: Failure, answers: Mapping[str, Any]) -> Any:
    if isinstance(f.value, XenStoreError) and f.value.errname in answers:
        return answers[f.value.errname]
    return f


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
        # Requests sent or queued, by req_id. Those on the wire number
        # len(_pending) - len(_queue).
        self._pending: dict[int, _Entry] = {}
        self._queue: deque[bytes] = deque()
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
        self.eventsReceived = 0
        #: Called by the request that finds nothing outstanding while a
        #: stall watch (L{xenddev.xenstore.stall}) is idle; None otherwise.
        self.armStallWatch: Callable[[], object] | None = None
        #: Why L{abort} closed the connection: what pending requests fail with.
        self._abortedWith: XenStoreConnectionLost | None = None

    # Connection lifecycle

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:  # noqa: B008
        """Fail every pending request: xenstored may or may not have run them."""
        # BaseProtocol.makeConnection set this; nothing resets it for us.
        self.connected = 0
        self.armStallWatch = None
        if self._abortedWith is not None:
            self._closed = Failure(self._abortedWith)
        else:
            why = reason.getErrorMessage() if reason is not None else "closed"
            self._closed = Failure(XenStoreConnectionLost(f"connection to xenstored lost: {why}"))
        pending, self._pending = self._pending, {}
        self._queue.clear()
        for d, op, context, _, _ in pending.values():
            if not d.called:  # else cancelled by its caller
                d.errback(self._lostError(op, context))
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

    def abort(self, error: XenStoreConnectionLost) -> None:
        """
        Close the connection at once (nothing more is written or read), and
        fail every pending request with C{error}'s class and message, each
        naming its request: what a stall watch does to a store that stopped
        answering.
        """
        if self._closed is not None or not self.connected or self.transport is None:
            return
        self._abortedWith = error
        abort = getattr(self.transport, "abortConnection", None)
        if abort is not None:
            abort()
        else:  # the xenbus device's transport closes at once anyway
            self.transport.loseConnection()

    def _lostClass(self) -> type[XenStoreConnectionLost]:
        lost = self._closed.value if self._closed is not None else None
        return type(lost) if isinstance(lost, XenStoreConnectionLost) else XenStoreConnectionLost

    def _lostError(self, op: int, context: str | None) -> XenStoreConnectionLost:
        assert self._closed is not None
        base = self._closed.getErrorMessage()
        what = opName(op) + (f" {context}" if context else "")
        return self._lostClass()(f"{base} (pending {what})")

    # Requests

    def _allocateReqId(self) -> int:
        # Per-connection ids, wrapping inside uint32 (pyxs used one global
        # counter that overflowed struct packing at 2**32) and skipping 0,
        # which xenstored uses for WATCH_EVENTs, and ids still in flight.
        # _send() inlines the common case (the next id is free).
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

        The Deferred fails with a L{XenStoreError} subclass for an ERROR
        reply, L{XenStoreConnectionLost} if the connection closes first, or
        L{UnexpectedPacket} if the reply has the wrong type. Cancelling it
        forgets the reply when it arrives (the request may still be
        executed). C{context} is a path or other detail for error messages.
        Raises L{InvalidPayloadError} if C{payload} exceeds L{PAYLOAD_MAX}.
        (No seam: benchmarks watch the transport, C{bench/_wiretap.py}.)
        """
        return self._send(op, payload, txId, context, None, None)

    def _send(
        self,
        op: int,
        payload: bytes,
        txId: int,
        context: str | None,
        convert: Convert,
        answers: Answers,
    ) -> Deferred[Any]:
        """
        L{request}, with the reply's conversion done before the Deferred
        fires instead of by callbacks added to it (each costs about as much
        as the rest of the request).

        @param convert: C{None} (fire with the payload), L{discard} (fire
            with C{None}) or a function of the payload; if it raises, the
            Deferred fails with its exception.
        @param answers: error replies that are results: errno name -> value.
        """
        if self._closed is not None or not self.connected:
            return self._refuse()
        size = len(payload)
        if size > PAYLOAD_MAX:
            raise InvalidPayloadError(
                f"payload of {size} bytes exceeds XENSTORE_PAYLOAD_MAX ({PAYLOAD_MAX})"
            )
        pending = self._pending
        rid = self._nextReqId
        if rid in pending:
            rid = self._allocateReqId()
        else:
            self._nextReqId = rid + 1 if rid < UINT32_MAX else 1
        # No canceller: a cancelled Deferred has fired (CancelledError),
        # which is how a late reply is recognised and dropped, while the
        # entry keeps the id reserved until that reply comes.
        d: Deferred[Any] = Deferred()
        pending[rid] = (d, op, context, convert, answers)
        self.requestsSent += 1
        trips = self.roundTrips
        trips[op] = trips.get(op, 0) + 1
        data = _PACK_HEADER(op, rid, txId, size) + payload
        limit = self.maxInFlight
        if limit is not None and len(pending) - len(self._queue) > limit:
            self._queue.append(data)
        else:
            batch = self._batch
            if batch is not None:
                batch.append(data)
            else:
                transport = self.transport
                assert transport is not None
                transport.write(data)
        # One attribute read per request: the stall watch's timer runs only
        # while requests are outstanding, and this starts it again.
        arm = self.armStallWatch
        if arm is not None:
            arm()
        return d

    #: The request path: the client calls C{send} (no check per request;
    #: replacing L{request} reroutes it, see L{_ReplaceableRequest}).
    send = _send

    def _refuse(self) -> Deferred[Any]:
        if self._closed is not None:
            return fail(self._lostClass()(self._closed.getErrorMessage()))
        return fail(XenStoreConnectionLost("not connected to xenstored"))

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
            packets = self._parser.feedRaw(data)
        except MalformedPacket as e:
            self.log.error("Dropping XenStore connection: {error}", error=e)
            self._closed = Failure(e)
            for op, reqId, _, payload in e.packets:  # complete replies before the bad header
                self._dispatch(op, reqId, payload, None)
            assert self.transport is not None
            self.transport.loseConnection()
            return
        if not packets:
            return
        # Requests made by the callbacks of these replies (the pipelined
        # case) go out in one write instead of one each. A nested call (a
        # callback feeding this protocol synchronously) adds to the outer
        # batch, so requests still go out in the order they were made.
        outer = self._batch
        batch: list[bytes] = [] if outer is None else outer
        self._batch = batch
        try:
            self._dispatchAll(packets, batch)
        finally:
            if outer is None:
                self._batch = None
                if batch and self.transport is not None:
                    self.transport.write(b"".join(batch))

    def _dispatchAll(self, packets: list[RawPacket], batch: list[bytes]) -> None:
        # The common reply (the expected type, not an error, to a request
        # not cancelled) completes here; everything else goes to _dispatch.
        pending = self._pending
        queue = self._queue
        for op, reqId, _, payload in packets:
            entry = pending.pop(reqId, None) if op != _WATCH_EVENT else None
            if entry is None or entry[1] != op:
                self._dispatch(op, reqId, payload, entry)
                continue
            if queue:
                batch.append(queue.popleft())
            d, _, _, convert, _ = entry
            if d.called:
                continue  # cancelled by its caller
            if convert is None:
                d.callback(payload)
            elif convert is discard:
                d.callback(None)
            else:
                try:
                    result = convert(payload)
                except Exception:
                    d.errback()
                else:
                    d.callback(result)

    def _dispatch(self, op: int, reqId: int, payload: bytes, entry: _Entry | None) -> None:
        """
        Dispatch one packet: a watch event, an ERROR or unexpected reply, or
        (from a malformed chunk) any reply. C{entry} is the pending request
        already taken for C{reqId}, if any.
        """
        if op == _WATCH_EVENT:
            parts = splitStrings(payload)
            if len(parts) < 2:
                self.unexpectedPackets += 1
                self.log.warn("Ignoring malformed WATCH_EVENT {payload!r}", payload=payload)
                return
            self.eventsReceived += 1
            try:
                self.eventReceived(parts[0], parts[1])
            except Exception:
                self.log.failure("Watch event handler failed for {path!r}", path=parts[0])
            return
        if entry is None:
            entry = self._pending.pop(reqId, None)
        if entry is None and reqId == 0 and op in (Op.WATCH, Op.UNWATCH, Op.ERROR):
            # The Linux xenbus device answers WATCH/UNWATCH itself, with
            # req_id 0 (pyxs issue #18), errors included: match the oldest
            # pending request of that op (of either op, for an ERROR).
            wanted = (Op.WATCH, Op.UNWATCH) if op == Op.ERROR else (op,)
            for rid, candidate in self._pending.items():
                if candidate[1] in wanted:
                    entry = self._pending.pop(rid)
                    break
        if entry is None:
            self.unexpectedPackets += 1
            self.log.warn(
                "Ignoring unexpected XenStore packet {op} req_id={reqId} ({size} bytes)",
                op=opName(op),
                reqId=reqId,
                size=len(payload),
            )
            return
        if self._queue:
            self._write(self._queue.popleft())
        d, requestOp, context, convert, answers = entry
        if d.called:
            return  # cancelled by its caller
        if op == _ERROR:
            errname = decodeError(payload)
            if answers is not None and errname in answers:
                d.callback(answers[errname])
            else:
                d.errback(errorFromReply(errname, opName(requestOp), context))
        elif op != requestOp:
            d.errback(
                UnexpectedPacket(
                    f"reply type {opName(op)} to a {opName(requestOp)} request (req_id {reqId})"
                )
            )
        elif convert is None:
            d.callback(payload)
        else:
            try:
                result = convert(payload)
            except Exception:
                d.errback()
            else:
                d.callback(result)

    def _dropEvent(self, path: bytes, token: bytes) -> None:
        self.log.debug("Watch event {path!r} {token!r} with no handler", path=path, token=token)

    @property
    def pendingCount(self) -> int:
        """Requests sent or queued and not yet answered."""
        return len(self._pending)

    @property
    def packetsReceived(self) -> int:
        """
        Replies, watch events and stray packets received so far: a count
        that grows whenever xenstored shows life (kept from counters the
        request path keeps anyway, so it costs nothing per packet).
        """
        answered = self.requestsSent - len(self._pending)
        return answered + self.eventsReceived + self.unexpectedPackets


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
