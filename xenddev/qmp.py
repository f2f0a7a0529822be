# -*- test-case-name: tests.test_qmp -*-
"""
A Twisted-native QMP client (the QEMU Machine Protocol).

QMP is JSON over a stream socket, one object per line: the server greets
(C{{"QMP": {"version": ..., "capabilities": [...]}}}), the client
negotiates with C{qmp_capabilities}, then sends C{{"execute": cmd,
"arguments": {...}, "id": ...}}; the server answers C{{"return": ...,
"id": ...}} or C{{"error": {"class": ..., "desc": ...}, "id": ...}} and
sends asynchronous C{{"event": ..., "data": ..., "timestamp": ...}} at any
time.

L{connectQMP} connects over a UNIX socket (with the reactor it is given),
waits for the greeting, negotiates and fires with a L{QMPClient}:

  - L{QMPClient.execute} sends a command with a fresh id and fires with
    its C{return} value, or fails with L{QMPError} (the error's class and
    description); replies are matched by id, so several commands may be in
    flight;
  - L{QMPClient.subscribe} delivers every event to a callback;
    L{QMPClient.waitForEvent} fires on the first event that matches;
  - when the connection goes, every pending command (and event wait) fails
    with L{QMPConnectionLost}, and L{QMPClient.whenClosed} fires.

Nothing blocks: all I/O is the reactor's.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Mapping
from typing import Any

import attrs
from twisted.internet.defer import Deferred, fail
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols.basic import LineOnlyReceiver
from twisted.python.failure import Failure

from xenddev.errors import FaultCode, XenddevError

#: QMP lines can be long (query-qmp-schema is about 200 KiB).
MAX_LINE = 16 * 1024 * 1024

EventCallback = Callable[["QMPEvent"], None]


class QMPError(XenddevError):
    """
    The server answered a command with an error.

    @ivar errorClass: the QMP error class (C{GenericError},
        C{CommandNotFound}, C{DeviceNotFound}, ...).
    @ivar desc: the server's description.
    @ivar command: the command that failed.
    """

    faultCode = FaultCode.DATAPATH_FAILED

    def __init__(self, errorClass: str, desc: str, command: str = "") -> None:
        self.errorClass = errorClass
        self.desc = desc
        self.command = command
        super().__init__(f"{command + ': ' if command else ''}{errorClass}: {desc}")


class QMPConnectionLost(XenddevError):
    """The QMP connection closed before the answer (or event) arrived."""

    faultCode = FaultCode.DATAPATH_FAILED


class QMPProtocolError(XenddevError):
    """The server sent something that is not QMP."""

    faultCode = FaultCode.DATAPATH_FAILED


class QMPTimeout(XenddevError):
    """No answer (or event) within the time allowed."""

    faultCode = FaultCode.TIMEOUT


@attrs.frozen
class QMPGreeting:
    """The server's greeting: C{version} (the C{qemu} triple) and capabilities."""

    version: tuple[int, int, int]
    package: str
    capabilities: tuple[str, ...]


@attrs.frozen
class QMPEvent:
    """An asynchronous event: name, data, timestamp (seconds, float)."""

    name: str
    data: Mapping[str, Any]
    timestamp: float


class QMPProtocol(LineOnlyReceiver):
    """
    The wire side: parses lines, routes replies by id and events to the
    client. Created by L{connectQMP}; use L{QMPClient}.
    """

    delimiter = b"\n"
    MAX_LENGTH = MAX_LINE
    log = Logger()

    def __init__(self) -> None:
        self.greeting: Deferred[QMPGreeting] = Deferred()
        self.client: QMPClient | None = None
        self._greeted = False
        self.connected = False

    def connectionMade(self) -> None:
        self.connected = True

    def lineReceived(self, line: bytes) -> None:
        line = line.strip()
        if not line:
            return
        try:
            msg = json.loads(line)
        except ValueError:
            self._violation(f"not JSON: {line[:200]!r}")
            return
        if not isinstance(msg, dict):
            self._violation(f"not a JSON object: {line[:200]!r}")
            return
        if not self._greeted:
            self._greeted = True
            qmp = msg.get("QMP")
            if not isinstance(qmp, dict):
                self._violation(f"expected the QMP greeting, got {line[:200]!r}")
                return
            v = qmp.get("version", {}).get("qemu", {})
            self.greeting.callback(
                QMPGreeting(
                    (int(v.get("major", 0)), int(v.get("minor", 0)), int(v.get("micro", 0))),
                    str(qmp.get("version", {}).get("package", "")),
                    tuple(qmp.get("capabilities", ())),
                )
            )
            return
        if self.client is not None:
            self.client._received(msg)

    def lineLengthExceeded(self, line: bytes) -> None:
        self._violation(f"line longer than {self.MAX_LENGTH} bytes")

    def _violation(self, why: str) -> None:
        self.log.error("QMP protocol violation: {why}", why=why)
        self._lastViolation = QMPProtocolError(why)
        if self.transport is not None:
            self.transport.loseConnection()

    def sendMessage(self, msg: Mapping[str, Any]) -> None:
        self.sendLine(json.dumps(msg, separators=(",", ":")).encode("utf-8"))

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:  # noqa: B008
        self.connected = False
        violation = getattr(self, "_lastViolation", None)
        err: Exception = violation or QMPConnectionLost(reason.getErrorMessage())
        if not self.greeting.called:
            self.greeting.errback(Failure(err))
        if self.client is not None:
            self.client._lost(err)


class QMPClient:
    """
    A negotiated QMP connection. Obtain one with L{connectQMP}.

    @ivar greeting: the server's L{QMPGreeting}.
    """

    log = Logger()

    def __init__(self, protocol: QMPProtocol, greeting: QMPGreeting, reactor: Any) -> None:
        self.protocol = protocol
        self.greeting = greeting
        self.reactor = reactor
        protocol.client = self
        self._ids = itertools.count(1)
        self._pending: dict[str, tuple[str, Deferred[Any]]] = {}
        self._subscribers: list[EventCallback] = []
        self._lossWaiters: list[Callable[[Exception], None]] = []
        self._lostWith: Exception | None = None if protocol.connected else QMPConnectionLost()

    @property
    def connected(self) -> bool:
        """Whether the connection is still up."""
        return self._lostWith is None

    def execute(
        self,
        command: str,
        arguments: Mapping[str, Any] | None = None,
        timeout: float | None = None,
    ) -> Deferred[Any]:
        """
        Send C{command} and fire with its C{return} value; fail with
        L{QMPError} if the server refuses it, L{QMPConnectionLost} if the
        connection goes first, L{QMPTimeout} after C{timeout} seconds (the
        id then stays reserved, and a late reply is dropped).
        """
        if self._lostWith is not None:
            return fail(QMPConnectionLost(f"{command}: connection already closed"))
        ident = f"xdd-{next(self._ids)}"
        msg: dict[str, Any] = {"execute": command, "id": ident}
        if arguments:
            msg["arguments"] = dict(arguments)
        d: Deferred[Any] = Deferred()
        self._pending[ident] = (command, d)
        self.protocol.sendMessage(msg)
        if timeout is not None:
            self._timeout(d, timeout, f"{command}: no reply within {timeout} s")
        return d

    def _timeout(self, d: Deferred[Any], timeout: float, why: str) -> None:
        def expire() -> None:
            if not d.called:
                d.errback(QMPTimeout(why))

        call = IReactorTime(self.reactor).callLater(timeout, expire)

        def cancelTimer(result: object) -> object:
            if call.active():
                call.cancel()
            return result

        d.addBoth(cancelTimer)

    def subscribe(self, callback: EventCallback) -> Callable[[], None]:
        """Deliver every event to C{callback}; returns the unsubscribe function."""
        self._subscribers.append(callback)

        def unsubscribe() -> None:
            if callback in self._subscribers:
                self._subscribers.remove(callback)

        return unsubscribe

    def waitForEvent(
        self,
        name: str,
        match: Callable[[QMPEvent], bool] | None = None,
        timeout: float | None = None,
    ) -> Deferred[QMPEvent]:
        """
        Fire with the first event called C{name} (and satisfying C{match})
        that arrives from now on. Register it before sending the command
        that causes the event.
        """
        d: Deferred[QMPEvent] = Deferred()
        if self._lostWith is not None:
            return fail(QMPConnectionLost(f"waiting for {name}: connection closed"))

        def check(event: QMPEvent) -> None:
            if not d.called and event.name == name and (match is None or match(event)):
                d.callback(event)

        def lost(err: Exception) -> None:
            if not d.called:
                d.errback(QMPConnectionLost(f"waiting for {name}: {err}"))

        unsubscribe = self.subscribe(check)
        self._lossWaiters.append(lost)

        def cleanup(result: object) -> object:
            unsubscribe()
            if lost in self._lossWaiters:
                self._lossWaiters.remove(lost)
            return result

        d.addBoth(cleanup)
        if timeout is not None:
            self._timeout(d, timeout, f"no {name} event within {timeout} s")
        return d

    def whenClosed(self) -> Deferred[None]:
        """Fire (with None) once the connection has closed."""
        d: Deferred[None] = Deferred()
        if self._lostWith is not None:
            d.callback(None)
        else:
            self._lossWaiters.append(lambda _: d.callback(None))
        return d

    def close(self) -> Deferred[None]:
        """Close the connection; fires once it is closed."""
        d = self.whenClosed()
        if self._lostWith is None and self.protocol.transport is not None:
            self.protocol.transport.loseConnection()
        return d

    # From the protocol

    def _received(self, msg: dict[str, Any]) -> None:
        if "event" in msg:
            ts = msg.get("timestamp", {})
            event = QMPEvent(
                str(msg["event"]),
                msg.get("data", {}) or {},
                float(ts.get("seconds", 0)) + float(ts.get("microseconds", 0)) / 1e6,
            )
            for callback in list(self._subscribers):
                try:
                    callback(event)
                except Exception:
                    self.log.failure("QMP event subscriber failed on {event}", event=event.name)
            return
        ident = msg.get("id")
        entry = self._pending.pop(ident, None) if isinstance(ident, str) else None
        if entry is None:
            # A reply without our id: QEMU answers a line it cannot parse
            # with an id-less error; nothing of ours can be matched to it.
            self.log.warn("Unmatched QMP message {msg!r}", msg=msg)
            return
        command, d = entry
        if d.called:
            return  # timed out already
        if "error" in msg:
            err = msg["error"] or {}
            d.errback(QMPError(str(err.get("class", "")), str(err.get("desc", "")), command))
        elif "return" in msg:
            d.callback(msg["return"])
        else:
            d.errback(QMPProtocolError(f"{command}: reply with neither return nor error"))

    def _lost(self, err: Exception) -> None:
        self._lostWith = err
        pending, self._pending = self._pending, {}
        for command, d in pending.values():
            if not d.called:
                d.errback(QMPConnectionLost(f"{command}: {err}"))
        for waiter in list(self._lossWaiters):
            waiter(err)
        self._lossWaiters.clear()


def connectQMPProtocol(
    reactor: Any, protocol: QMPProtocol, timeout: float = 10.0
) -> Deferred[QMPClient]:
    """
    Negotiate on an already-connected L{QMPProtocol} (for tests that wire
    the protocol to a transport themselves): greeting, C{qmp_capabilities}.
    """

    async def negotiate() -> QMPClient:
        greetingD = protocol.greeting

        def expire() -> None:
            if not greetingD.called:
                greetingD.errback(QMPTimeout(f"no QMP greeting within {timeout} s"))

        call = IReactorTime(reactor).callLater(timeout, expire)
        try:
            greeting = await greetingD
        finally:
            if call.active():
                call.cancel()
        client = QMPClient(protocol, greeting, reactor)
        try:
            await client.execute("qmp_capabilities", timeout=timeout)
        except BaseException:
            await client.close()
            raise
        return client

    return Deferred.fromCoroutine(negotiate())


def connectQMP(reactor: Any, path: str, timeout: float = 10.0) -> Deferred[QMPClient]:
    """
    Connect to the QMP server on the UNIX socket C{path}, wait for its
    greeting and negotiate capabilities; fire with a L{QMPClient}.

    Fails with C{ConnectError} if nothing listens, L{QMPTimeout} if the
    greeting does not come (a QEMU chardev server talks to one client at a
    time: a second client waits in the backlog), L{QMPError} if
    negotiation is refused.
    """

    async def connect() -> QMPClient:
        endpoint = UNIXClientEndpoint(reactor, path, timeout=int(max(1, timeout)))
        protocol = await endpoint.connect(Factory.forProtocol(QMPProtocol))
        assert isinstance(protocol, QMPProtocol)
        try:
            return await connectQMPProtocol(reactor, protocol, timeout)
        except BaseException:
            if protocol.transport is not None:
                protocol.transport.abortConnection()  # type: ignore[attr-defined]
            raise

    return Deferred.fromCoroutine(connect())
