"""
A xenstored that keeps its connection open but stops answering
(L{xenddev.xenstore.stall}), on a L{Clock} with stand-in transports: the
watch aborts a connection whose requests get nothing back for C{stall}
seconds, never one that is merely busy or idle; L{ReconnectingXenStore}
reports the stall once, fails what was outstanding as a lost connection
does, and uses a new connection only once the store has answered on it,
each attempt bounded by the same rule. The daemon against a stopped store
is in C{tests.test_xenstore_stalled}.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.error import ConnectionAborted, ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from xenddev.errors import FaultCode
from xenddev.xenstore.client import XenStoreClient
from xenddev.xenstore.connection import ReconnectingXenStore
from xenddev.xenstore.errors import XenStoreConnectionLost, XenStoreStalled
from xenddev.xenstore.protocol import XenStoreProtocol
from xenddev.xenstore.stall import StallWatch
from xenddev.xenstore.wire import Op, Packet, PacketParser
from xenddev.xmlrpc import toFault
from xenddev.xsguard import GuardedXenStore, XenStoreUnreachableError

STALL = 10.0


class AbortableTransport(StringTransport):
    """
    A L{StringTransport} whose abort closes the connection as Twisted's
    do: the protocol hears of it on the next turn of the reactor.
    """

    def __init__(self, clock: Clock, protocol: XenStoreProtocol) -> None:
        super().__init__()
        self.clock = clock
        self.aborted = False
        self.protocol = protocol
        protocol.makeConnection(self)

    def abortConnection(self) -> None:
        """Close at the next turn; remember it was an abort."""
        if self.aborted:
            return
        self.aborted = True
        self.clock.callLater(0, self.protocol.connectionLost, Failure(ConnectionAborted()))

    def drop(self) -> None:
        """The peer closed the connection (xenstored killed)."""
        self.protocol.connectionLost(Failure(ConnectionAborted("peer gone")))


def elapse(clock: Clock, seconds: float, step: float = 0.1) -> None:
    """
    Let C{seconds} pass in steps, as a reactor would: L{Clock.advance}
    runs every call due with the time already at the end of the jump.
    """
    end = clock.seconds() + seconds
    while clock.seconds() + step < end:
        clock.advance(step)
    clock.advance(max(0.0, end - clock.seconds()))


def requests(transport: StringTransport) -> list[Packet]:
    """The requests written since the last call (and forget them)."""
    packets = PacketParser().feed(transport.value())
    transport.clear()
    return packets


def reply(protocol: XenStoreProtocol, request: Packet, payload: bytes = b"OK\0") -> None:
    """Answer C{request} with C{payload}."""
    protocol.dataReceived(Packet(request.op, request.reqId, request.txId, payload).encode())


def event(protocol: XenStoreProtocol, path: bytes, token: bytes) -> None:
    """A watch event from the store."""
    protocol.dataReceived(Packet(Op.WATCH_EVENT, 0, 0, path + b"\0" + token + b"\0").encode())


class StallWatchTests(SynchronousTestCase):
    """The rule on one connection: outstanding requests and nothing received."""

    def setUp(self) -> None:
        """A connected protocol on a Clock, watched with a 10 s stall."""
        self.clock = Clock()
        self.protocol = XenStoreProtocol()
        self.transport = AbortableTransport(self.clock, self.protocol)
        self.client = XenStoreClient(self.protocol, self.clock)
        self.reports: list[tuple[int, float]] = []
        self.watch = StallWatch(
            self.protocol,
            self.clock,
            STALL,
            "unix:/xs",
            lambda n, s: self.reports.append((n, s)),
        )

    def test_idleHasNoTimer(self) -> None:
        """A connection with nothing outstanding keeps no timer, however long."""
        self.assertEqual(self.clock.getDelayedCalls(), [])
        elapse(self.clock, 1000)
        self.assertFalse(self.transport.aborted)

    def test_silentStoreAborted(self) -> None:
        """
        Requests unanswered for C{stall} seconds with nothing received: the
        stall is reported once, the connection aborted, and every request
        fails as on a lost connection (L{XenStoreStalled}, naming the store
        and its request), which XML-RPC answers with fault 16.
        """
        read = self.client.read("/a")
        write = self.client.write("/b", "1")
        elapse(self.clock, STALL - 0.01)
        self.assertNoResult(read)
        self.assertFalse(self.transport.aborted)
        elapse(self.clock, 0.01)
        self.assertTrue(self.transport.aborted)
        self.assertEqual(self.reports, [(2, STALL)])
        self.assertTrue(self.watch.stalled)
        self.clock.advance(0)  # the abort closes on the next turn
        error = self.failureResultOf(read, XenStoreStalled).value
        self.assertIsInstance(error, XenStoreConnectionLost)
        self.assertIn("XenStore at unix:/xs stopped answering", str(error))
        self.assertIn("pending READ /a", str(error))
        self.failureResultOf(write, XenStoreStalled)
        self.failureResultOf(self.client.read("/c"), XenStoreStalled)
        fault = toFault(error, Logger(), "device.attach")
        self.assertEqual(fault.faultCode, FaultCode.UNAVAILABLE)
        self.assertIn("not answering", fault.faultString)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_busyStoreNeverStalls(self) -> None:
        """
        A thousand requests in flight, answered one every 4 s: the last
        waits over an hour, yet the store shows progress all along and is
        never declared stalled. Once all are answered the timer stops.
        """
        reads = [self.client.read(f"/n{i}") for i in range(1000)]
        sent = requests(self.transport)
        for request in sent:
            elapse(self.clock, 4.0, 1.0)
            reply(self.protocol, request, b"v")
        self.assertFalse(self.transport.aborted)
        self.assertEqual(self.reports, [])
        self.assertEqual([self.successResultOf(d) for d in reads[-2:]], ["v", "v"])
        elapse(self.clock, STALL)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_eventsAreProgress(self) -> None:
        """Watch events show the store alive, even while a reply is slow."""
        self.client._watches["t"] = ("/w", lambda path: None)
        d = self.client.read("/slow")
        for _ in range(10):
            elapse(self.clock, STALL / 2)
            event(self.protocol, b"/w", b"t")
        self.assertFalse(self.transport.aborted)
        self.assertNoResult(d)
        elapse(self.clock, STALL + STALL / 4)
        self.assertTrue(self.transport.aborted)
        self.failureResultOf(d, XenStoreStalled)

    def test_silenceCountedFromLastProgress(self) -> None:
        """
        After a reply the silence starts again: a store that answered, then
        stopped, is declared stalled between C{stall} and C{stall} plus a
        quarter of it after its last reply.
        """
        first = self.client.read("/a")
        self.client.read("/b").addErrback(lambda f: None)
        [a, _] = requests(self.transport)
        elapse(self.clock, 3.0)
        reply(self.protocol, a, b"1")
        self.successResultOf(first)
        elapse(self.clock, STALL - 0.01)
        self.assertFalse(self.transport.aborted)
        elapse(self.clock, STALL / 4)
        self.assertTrue(self.transport.aborted)

    def test_rearmedAfterIdle(self) -> None:
        """A request after an idle spell starts the timer again; the stall counts from it."""
        d = self.client.read("/a")
        [a] = requests(self.transport)
        reply(self.protocol, a, b"1")
        self.successResultOf(d)
        elapse(self.clock, STALL)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        elapse(self.clock, 500)
        late = self.client.read("/b")
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        elapse(self.clock, STALL)
        self.assertTrue(self.transport.aborted)
        self.clock.advance(0)
        self.failureResultOf(late, XenStoreStalled)

    def test_blockedReactorNotBlamed(self) -> None:
        """
        A check that runs far later than due (this process was not running:
        its reactor blocked) restarts the count instead of blaming the
        store, whose replies may be waiting unread; the store is declared
        stalled only after C{stall} seconds this process could watch.
        """
        d = self.client.read("/a")
        self.clock.advance(10 * STALL)  # one jump: the check is 97.5 s late
        self.assertFalse(self.transport.aborted)
        elapse(self.clock, STALL - 0.1)
        self.assertFalse(self.transport.aborted)
        elapse(self.clock, 0.1)
        self.assertTrue(self.transport.aborted)
        self.failureResultOf(d, XenStoreStalled)

    def test_cancelledRequestStillOutstanding(self) -> None:
        """
        A request its caller cancelled still waits for its reply (its id is
        reserved): unanswered, it counts as outstanding.
        """
        d = self.client.read("/a")
        d.cancel()
        self.failureResultOf(d, CancelledError)
        elapse(self.clock, STALL)
        self.assertTrue(self.transport.aborted)

    def test_lostConnectionStopsTimer(self) -> None:
        """A connection lost otherwise leaves no timer behind."""
        self.client.read("/a").addErrback(lambda f: None)
        self.transport.drop()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertFalse(self.watch.stalled)

    def test_defaultReportLogs(self) -> None:
        """Without a report the watch logs the stall as an error, naming the store."""
        protocol = XenStoreProtocol()
        AbortableTransport(self.clock, protocol)
        events: list[dict[str, Any]] = []
        watch = StallWatch(protocol, self.clock, 1.0, "unix:/other")
        watch.log = Logger(observer=events.append)
        XenStoreClient(protocol, self.clock).read("/a").addErrback(lambda f: None)
        elapse(self.clock, 1.0)
        [logged] = events
        self.assertEqual(logged["log_level"].name, "error")
        self.assertEqual(logged["address"], "unix:/other")

    def test_badSeconds(self) -> None:
        """A stall of no time is refused."""
        self.assertRaises(ValueError, StallWatch, self.protocol, self.clock, 0)

    def test_abortWithoutAbortConnection(self) -> None:
        """
        A transport without C{abortConnection} (the xenbus device's) is
        closed with C{loseConnection}, which closes it at once.
        """
        closed: list[bool] = []

        class DeviceTransport:
            def write(self, data: bytes) -> None:
                pass

            def loseConnection(self) -> None:
                closed.append(True)

        protocol = XenStoreProtocol()
        protocol.makeConnection(DeviceTransport())  # type: ignore[arg-type]
        protocol.abort(XenStoreStalled("gone quiet"))
        self.assertEqual(closed, [True])
        protocol.connectionLost(Failure(ConnectionAborted()))
        self.failureResultOf(protocol.request(Op.READ, b"/a\0"), XenStoreStalled)


class FakeEndpoint:
    """
    Connects at once (each connection an L{AbortableTransport}), refuses
    while C{refuse} is set, or holds attempts while C{hold} is set.
    """

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.protocols: list[XenStoreProtocol] = []
        self.transports: list[AbortableTransport] = []
        self.refuse = False
        self.hold = False
        self.held: list[tuple[Deferred[Any], Any]] = []

    def connect(self, factory: Any) -> Deferred[Any]:
        """A new connection (or a refusal)."""
        if self.refuse:
            return fail(ConnectionRefusedError("no xenstored"))
        if self.hold:
            d: Deferred[Any] = Deferred()
            self.held.append((d, factory))
            return d
        return succeed(self._build(factory))

    def release(self) -> None:
        """Complete the held attempts."""
        held, self.held = self.held, []
        for d, factory in held:
            d.callback(self._build(factory))

    def _build(self, factory: Any) -> XenStoreProtocol:
        protocol = factory.buildProtocol(None)
        transport = AbortableTransport(self.clock, protocol)
        self.protocols.append(protocol)
        self.transports.append(transport)
        return protocol

    @property
    def last(self) -> tuple[XenStoreProtocol, AbortableTransport]:
        """The newest connection."""
        return self.protocols[-1], self.transports[-1]


class ReconnectingStallTests(SynchronousTestCase):
    """A reconnecting store with a stall: what happens across connections."""

    def setUp(self) -> None:
        """A store on a Clock with a 10 s stall and a 1 s retry; its log collected."""
        self.clock = Clock()
        self.endpoint = FakeEndpoint(self.clock)
        self.events: list[dict[str, Any]] = []
        self.store = self.makeStore(ReconnectingXenStore)
        self.addCleanup(self.store.stop)

    def makeStore(self, kind: Any, **kwargs: Any) -> Any:
        """A store of class C{kind} on the fake endpoint, logging into C{events}."""
        store = kind(
            self.endpoint,
            self.clock,
            retryPolicy=lambda attempt: 1.0,
            stall=STALL,
            address="unix:/xs",
            **kwargs,
        )
        store.log = Logger(observer=self.events.append)
        return store

    def logged(self, level: str) -> list[str]:
        """The formats of the events logged at C{level}."""
        return [e["log_format"] for e in self.events if e["log_level"].name == level]

    def connectAnswered(self) -> tuple[XenStoreProtocol, AbortableTransport]:
        """Start (or let reconnect) and answer the probe of the new connection."""
        protocol, transport = self.endpoint.last
        [probe] = requests(transport)
        self.assertEqual((probe.op, probe.payload), (Op.GET_DOMAIN_PATH, b"0\0"))
        reply(protocol, probe, b"/local/domain/0\0")
        return protocol, transport

    def test_probedBeforeUse(self) -> None:
        """
        A new connection is used once the store answered its probe: a call
        made before waits, and is written after the answer.
        """
        self.store.start()
        d = self.store.read("/a")
        self.assertFalse(self.store.connected)
        protocol, transport = self.endpoint.last
        [probe] = requests(transport)
        self.assertEqual(probe.op, Op.GET_DOMAIN_PATH)
        self.assertNoResult(d)
        reply(protocol, probe, b"/local/domain/0\0")
        self.assertTrue(self.store.connected)
        [read] = requests(transport)
        self.assertEqual(read.op, Op.READ)
        reply(protocol, read, b"v")
        self.assertEqual(self.successResultOf(d), "v")

    def test_errorReplyIsAnAnswer(self) -> None:
        """An error reply to the probe shows the store answers as well as any other."""
        self.store.start()
        protocol, transport = self.endpoint.last
        [probe] = requests(transport)
        protocol.dataReceived(Packet(Op.ERROR, probe.reqId, 0, b"EACCES\0").encode())
        self.assertTrue(self.store.connected)

    def test_stallThenReconnect(self) -> None:
        """
        The store stops answering: after C{stall} the connection is
        aborted, its requests fail (L{XenStoreStalled}), the stall is
        logged as an error once; each new attempt is bounded by the same
        rule and logs no second error; calls made meanwhile are not written
        to the silent connections; once the store answers, they go through
        and its return is logged.
        """
        self.store.start()
        protocol, transport = self.connectAnswered()
        stalled = self.store.write("/a", "1")
        # The probe's answer, seen at the first check, restarts the count.
        elapse(self.clock, STALL + STALL / 4)
        self.assertTrue(transport.aborted)
        self.failureResultOf(stalled, XenStoreStalled)
        self.assertEqual(self.store.stalledSince, STALL / 4)
        self.assertEqual(len(self.logged("error")), 1)
        waiting = self.store.read("/b")
        for attempt in range(2, 5):
            elapse(self.clock, 1.0)  # the retry
            self.assertEqual(len(self.endpoint.protocols), attempt)
            _, silent = self.endpoint.last
            [probe] = requests(silent)
            self.assertEqual(probe.op, Op.GET_DOMAIN_PATH)  # never the caller's read
            elapse(self.clock, STALL)
            self.clock.advance(0)
            self.assertTrue(silent.aborted)
            self.assertNoResult(waiting)
        self.assertEqual(len(self.logged("error")), 1)
        elapse(self.clock, 1.0)
        protocol, transport = self.connectAnswered()
        [read] = requests(transport)
        self.assertEqual(read.op, Op.READ)
        reply(protocol, read, b"v")
        self.assertEqual(self.successResultOf(waiting), "v")
        self.assertIsNone(self.store.stalledSince)
        [back] = [f for f in self.logged("info") if "answers again" in f]
        self.assertEqual(len(self.logged("error")), 1)
        self.assertTrue(back)

    def test_watchesAreTheProbe(self) -> None:
        """
        With watches to re-register, their registrations are what the store
        must answer (no probe); a watch never answered bounds the attempt too.
        """
        self.store.start()
        protocol, transport = self.connectAnswered()
        fired: list[str] = []
        self.store.watch("/w", fired.append)
        [watch] = requests(transport)
        reply(protocol, watch)
        transport.drop()
        elapse(self.clock, 1.0)
        _, silent = self.endpoint.last
        [again] = requests(silent)
        self.assertEqual(again.op, Op.WATCH)
        self.assertFalse(self.store.connected)
        elapse(self.clock, STALL)
        self.clock.advance(0)
        self.assertTrue(silent.aborted)
        elapse(self.clock, 1.0)
        protocol, transport = self.endpoint.last
        [again] = requests(transport)
        reply(protocol, again)
        self.assertTrue(self.store.connected)
        event(protocol, b"/w", again.payload.split(b"\0")[1])
        self.assertEqual(fired, ["/w"])

    def test_lostWhilePreparing(self) -> None:
        """
        A connection that drops while being prepared is simply retried
        (Twisted's ClientService raised NoTransition here and kept a dead
        connection as its current one).
        """
        self.store.start()
        _, transport = self.endpoint.last
        transport.drop()
        self.assertFalse(self.store.connected)
        elapse(self.clock, 1.0)
        self.assertEqual(len(self.endpoint.protocols), 2)
        self.connectAnswered()
        self.assertTrue(self.store.connected)

    def test_lostConnectionRetried(self) -> None:
        """A connection in use that drops is made again after the retry delay."""
        self.store.start()
        self.connectAnswered()
        self.endpoint.last[1].drop()
        self.assertFalse(self.store.connected)
        elapse(self.clock, 1.0)
        self.connectAnswered()
        self.assertTrue(self.store.connected)
        self.assertEqual(self.store.connections, 2)

    def test_failAfterFailures(self) -> None:
        """C{whenConnected(failAfterFailures=2)} fails with the second refusal."""
        self.endpoint.refuse = True
        d = self.store.whenConnected(failAfterFailures=2)
        self.store.start()
        self.assertNoResult(d)
        elapse(self.clock, 1.0)
        self.failureResultOf(d, ConnectionRefusedError)

    def test_stopWhilePreparing(self) -> None:
        """Stopping while a connection waits for its probe closes it; waiters are cancelled."""
        self.store.start()
        d = self.store.whenConnected()
        _, transport = self.endpoint.last
        self.store.stop()
        self.assertTrue(transport.disconnecting)
        self.failureResultOf(d, CancelledError)
        self.failureResultOf(self.store.whenConnected(), CancelledError)
        elapse(self.clock, 100)
        self.assertEqual(len(self.endpoint.protocols), 1)

    def test_stopWhileConnecting(self) -> None:
        """Stopping while an attempt is held cancels it; nothing is retried."""
        self.endpoint.hold = True
        self.store.start()
        [(attempt, _)] = self.endpoint.held
        self.store.stop()
        self.assertTrue(attempt.called)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.endpoint.hold = False
        elapse(self.clock, 100)
        self.assertEqual(self.endpoint.protocols, [])

    def test_guardedDuringStall(self) -> None:
        """
        The daemon's guarded store during a stall: a call waits its bound
        for an answering connection, then fails with fault 16 saying how
        long the store has been silent; nothing of it is ever written.
        """
        store = self.makeStore(GuardedXenStore, bound=STALL)
        store.start()
        self.addCleanup(store.stop)
        self.connectAnswered()
        store.read("/a").addErrback(lambda f: None)
        elapse(self.clock, STALL + STALL / 4)
        self.assertIsNotNone(store.stalledSince)
        d = store.write("/b", "1")
        elapse(self.clock, STALL)
        error = self.failureResultOf(d, XenStoreUnreachableError).value
        self.assertIn("unix:/xs has not answered for 20s", str(error))
        self.assertEqual(toFault(error, Logger(), "x").faultCode, FaultCode.UNAVAILABLE)
        written = [p.op for t in self.endpoint.transports[1:] for p in requests(t)]
        self.assertNotIn(Op.WRITE, written)
        elapse(self.clock, 100)
        for protocol, transport in zip(
            self.endpoint.protocols, self.endpoint.transports, strict=True
        ):
            if protocol.connected:
                [probe] = requests(transport)
                reply(protocol, probe, b"/local/domain/0\0")
        self.assertTrue(store.connected)
        self.assertEqual([p.op for p in requests(self.endpoint.last[1])], [])
