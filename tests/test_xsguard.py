"""
L{xenddev.xsguard.GuardedXenStore}: the daemon's toolstack connection
answers during a XenStore outage. On a L{Clock} and a stand-in endpoint: a
call made without a connection fails after the bound with fault 16 and is
never sent, even when the connection comes back; one that gets a
connection within the bound goes through. The daemon with its store
stopped and restarted is in C{tests.test_daemon}.
"""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from tests.test_xenstore_connection import FakeEndpoint, answer
from xenddev.interfaces import IXenStore
from xenddev.xenstore.wire import Op
from xenddev.xmlrpc import toFault
from xenddev.xsguard import GuardedXenStore, XenStoreUnreachableError

BOUND = 10.0


class GuardedXenStoreTests(SynchronousTestCase):
    """Requests wait at most the bound for a connection."""

    def setUp(self) -> None:
        """A guarded store on a Clock; the endpoint holds connections when told."""
        self.clock = Clock()
        self.endpoint = FakeEndpoint()
        self.store = GuardedXenStore(
            self.endpoint,  # type: ignore[arg-type]
            self.clock,
            bound=BOUND,
            address="unix:/xs",
        )
        self.addCleanup(self.store.stop)

    def outage(self) -> None:
        """Start with no xenstored answering."""
        self.endpoint.hold = True
        self.store.start()
        self.assertFalse(self.store.connected)

    def test_interface(self) -> None:
        """It provides L{IXenStore}."""
        self.store.start()
        self.assertTrue(verifyObject(IXenStore, self.store))

    def test_connectedGoesStraight(self) -> None:
        """With a connection, a request is sent at once; no timer is left."""
        self.store.start()
        d = self.store.read("/a")
        [packet] = answer(self.endpoint.protocols[0], self.endpoint.transports[0], b"v")
        self.assertEqual(packet.op, Op.READ)
        self.assertEqual(self.successResultOf(d), "v")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_unreachableAfterBound(self) -> None:
        """
        Without a connection a write waits the bound, then fails with fault
        16 naming the store and the key; when xenstored comes back, nothing
        of it is sent, and the next request goes through.
        """
        self.outage()
        d = self.store.write("/a", "1")
        self.clock.advance(BOUND - 0.1)
        self.assertNoResult(d)
        self.clock.advance(0.1)
        error = self.failureResultOf(d, XenStoreUnreachableError).value
        self.assertIn("unix:/xs", str(error))
        self.assertIn("timeouts.connect", str(error))
        fault = toFault(error, Logger(), "device.attach")
        self.assertEqual(fault.faultCode, 16)
        self.endpoint.release()
        self.assertTrue(self.store.connected)
        self.assertEqual(self.endpoint.transports[0].value(), b"")
        again = self.store.read("/a")
        [packet] = answer(self.endpoint.protocols[0], self.endpoint.transports[0], b"1")
        self.assertEqual(packet.op, Op.READ)
        self.assertEqual(self.successResultOf(again), "1")

    def test_connectionWithinBound(self) -> None:
        """A connection made within the bound takes the waiting request."""
        self.outage()
        d = self.store.transact(lambda tx: tx.read("/a"))
        self.clock.advance(BOUND / 2)
        self.endpoint.release()
        [start] = answer(self.endpoint.protocols[0], self.endpoint.transports[0], b"7\0")
        self.assertEqual(start.op, Op.TRANSACTION_START)
        self.clock.advance(BOUND)  # the bound is on the connection, not the request
        self.assertNoResult(d)
        [read] = answer(self.endpoint.protocols[0], self.endpoint.transports[0], b"v")
        [end] = answer(self.endpoint.protocols[0], self.endpoint.transports[0], b"OK\0")
        self.assertEqual((read.op, end.op), (Op.READ, Op.TRANSACTION_END))
        self.assertEqual(self.successResultOf(d), "v")

    def test_watchNotRegisteredLater(self) -> None:
        """A watch refused in an outage is not registered when xenstored comes back."""
        self.outage()
        d = self.store.watch("/a", lambda path: None)
        self.clock.advance(BOUND)
        self.failureResultOf(d, XenStoreUnreachableError)
        self.assertEqual(self.store.watchCount, 0)
        self.endpoint.release()
        self.assertEqual(self.endpoint.transports[0].value(), b"")

    def test_lostConnection(self) -> None:
        """After a connection is lost, requests wait the bound for the next one."""
        self.store.start()
        self.endpoint.hold = True
        self.endpoint.protocols[0].connectionLost(Failure(Exception("gone")))
        d = self.store.ls("/")
        self.clock.advance(BOUND)
        self.failureResultOf(d, XenStoreUnreachableError)
