"""
Watching a XenStore connection's traffic at its transport, for benchmarks.

A L{WireTap} sees the bytes a L{XenStoreProtocol} writes (its requests) and
the bytes it receives (the replies), parses both, and reports each request
and each reply to its subclass. Nothing in the protocol's request path
changes: the benchmarks count and trace round trips here instead of
wrapping C{XenStoreProtocol.request}.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Self

import attrs

from xenddev.xenstore.protocol import XenStoreProtocol
from xenddev.xenstore.wire import Op, PacketParser, decodeError, opName

_WATCH_EVENT = int(Op.WATCH_EVENT)
_ERROR = int(Op.ERROR)
_TRANSACTION_END = int(Op.TRANSACTION_END)


class _TapTransport:
    """A transport proxy that shows the tap every write."""

    def __init__(self, transport: Any, tap: WireTap) -> None:
        self._transport = transport
        self._tap = tap

    def write(self, data: bytes) -> None:
        self._tap._written(data)
        self._transport.write(data)

    def writeSequence(self, data: list[bytes]) -> None:
        self._tap._written(b"".join(data))
        self._transport.writeSequence(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class WireTap:
    """
    Parse one connection's requests and replies; subclasses override
    L{sent} and L{answered}. Attach with L{tap} once the protocol is
    connected; L{untap} puts the transport back.
    """

    def __init__(self) -> None:
        self._out = PacketParser()
        self._in = PacketParser()
        #: req_id -> the operation of a request awaiting its reply.
        self._ops: dict[int, int] = {}
        self._protocol: XenStoreProtocol | None = None

    def tap(self, protocol: XenStoreProtocol) -> Self:
        """Watch C{protocol}'s traffic from now on; returns self."""
        self._protocol = protocol
        protocol.transport = _TapTransport(protocol.transport, self)  # type: ignore[assignment]
        received = protocol.dataReceived

        def dataReceived(data: bytes) -> None:
            self._received(data)
            received(data)

        protocol.dataReceived = dataReceived  # type: ignore[method-assign]
        return self

    def untap(self) -> None:
        """Stop watching: the protocol's own transport and dataReceived again."""
        protocol, self._protocol = self._protocol, None
        if protocol is not None:
            protocol.transport = protocol.transport._transport  # type: ignore[union-attr]
            del protocol.dataReceived

    def _written(self, data: bytes) -> None:
        for op, reqId, _, payload in self._out.feedRaw(data):
            self._ops[reqId] = op
            self.sent(reqId, op, payload)

    def _received(self, data: bytes) -> None:
        for op, reqId, _, payload in self._in.feedRaw(data):
            if op == _WATCH_EVENT:
                continue
            requestOp = self._ops.pop(reqId, None)
            if requestOp is not None:
                self.answered(reqId, requestOp, op, payload)

    def sent(self, reqId: int, op: int, payload: bytes) -> None:
        """A request went out on the wire."""

    def answered(self, reqId: int, requestOp: int, op: int, payload: bytes) -> None:
        """The reply (C{op}: the request's own, or ERROR) to a C{requestOp} request arrived."""


def isConflict(requestOp: int, op: int, payload: bytes) -> bool:
    """Whether a reply says a transaction's commit conflicted (EAGAIN)."""
    return requestOp == _TRANSACTION_END and op == _ERROR and decodeError(payload) == "EAGAIN"


@attrs.define
class Counts:
    """Requests sent, and transaction commits refused with EAGAIN (conflicts)."""

    requests: int = 0
    conflicts: int = 0


class RequestCounter(WireTap):
    """
    Count a connection's requests into C{counts} (those C{ignore(op,
    payload)} accepts excepted) and its commits refused with EAGAIN
    (conflicts, which the client retries). Several counters may share one
    L{Counts}.
    """

    def __init__(self, counts: Counts, ignore: Callable[[int, bytes], bool] | None = None) -> None:
        super().__init__()
        self.counts = counts
        self._ignore = ignore

    def sent(self, reqId: int, op: int, payload: bytes) -> None:
        """Count the request unless ignored."""
        if self._ignore is None or not self._ignore(op, payload):
            self.counts.requests += 1

    def answered(self, reqId: int, requestOp: int, op: int, payload: bytes) -> None:
        """Count a conflict."""
        if isConflict(requestOp, op, payload):
            self.counts.conflicts += 1


class RoundCounter(WireTap):
    """
    Count sequential rounds: a round starts with a request written when no
    earlier one is awaiting its reply.
    """

    def __init__(self) -> None:
        super().__init__()
        self.rounds = 0
        self._outstanding = 0

    def sent(self, reqId: int, op: int, payload: bytes) -> None:
        """A new round if nothing was in flight."""
        if self._outstanding == 0:
            self.rounds += 1
        self._outstanding += 1

    def answered(self, reqId: int, requestOp: int, op: int, payload: bytes) -> None:
        """One request fewer in flight."""
        self._outstanding -= 1


#: Operations whose payload starts with the path they act on.
_PATH_OPS = frozenset(
    int(o)
    for o in (
        Op.READ,
        Op.WRITE,
        Op.MKDIR,
        Op.RM,
        Op.DIRECTORY,
        Op.DIRECTORY_PART,
        Op.GET_PERMS,
        Op.SET_PERMS,
        Op.WATCH,
        Op.UNWATCH,
    )
)


@attrs.frozen
class Traced:
    """One request: its operation's name, its path ("" if none), when sent and answered."""

    op: str
    path: str
    sent: float
    answered: float


class Tracer(WireTap):
    """Record every request with the times it was written and answered (C{perf_counter})."""

    def __init__(self, record: Callable[[Traced], None]) -> None:
        super().__init__()
        self._record = record
        self._sentAt: dict[int, tuple[str, float]] = {}

    def sent(self, reqId: int, op: int, payload: bytes) -> None:
        """Note the request's path and the time."""
        path = ""
        if op in _PATH_OPS:
            path = payload.split(b"\0", 1)[0].decode("utf-8", "replace")
        self._sentAt[reqId] = (path, time.perf_counter())

    def answered(self, reqId: int, requestOp: int, op: int, payload: bytes) -> None:
        """Record the request."""
        path, at = self._sentAt.pop(reqId)
        self._record(Traced(opName(requestOp), path, at, time.perf_counter()))


def tapEveryConnection(makeTap: Callable[[], WireTap]) -> list[WireTap]:
    """
    Tap every L{XenStoreProtocol} this process connects from now on (for a
    helper process whose connections the benchmark does not make itself);
    returns the list the taps are added to.
    """
    taps: list[WireTap] = []
    made = XenStoreProtocol.connectionMade

    def connectionMade(self: XenStoreProtocol) -> None:
        made(self)
        taps.append(makeTap().tap(self))

    XenStoreProtocol.connectionMade = connectionMade  # type: ignore[method-assign,assignment]
    return taps
