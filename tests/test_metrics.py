"""
The metrics text (L{xenddev.metrics.renderMetrics}) and the XenStore
round-trip counter it exports (L{xenddev.xenstore.protocol.ROUND_TRIPS}).
The endpoint of a running daemon is tested in C{tests.test_daemon}.
"""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace

from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from xenddev.metrics import renderMetrics
from xenddev.xenstore.protocol import ROUND_TRIPS, XenStoreProtocol
from xenddev.xenstore.wire import Op


def connectedProtocol() -> XenStoreProtocol:
    """A protocol connected to a string transport."""
    proto = XenStoreProtocol()
    proto.makeConnection(StringTransport())
    return proto


class RoundTripCounterTests(SynchronousTestCase):
    """Every request sent is counted by operation."""

    def test_countedByOperation(self) -> None:
        """Two READs and a WRITE: counted per operation in the protocol's dict."""
        proto = connectedProtocol()
        proto.roundTrips = {}
        proto.request(Op.READ, b"/a\0")
        proto.request(Op.READ, b"/b\0")
        proto.request(Op.WRITE, b"/a\0x")
        self.assertEqual(proto.roundTrips, {Op.READ: 2, Op.WRITE: 1})

    def test_processWideByDefault(self) -> None:
        """Without a dict of its own a protocol counts into ROUND_TRIPS."""
        proto = connectedProtocol()
        self.assertIs(proto.roundTrips, ROUND_TRIPS)
        before = ROUND_TRIPS.get(Op.MKDIR, 0)
        proto.request(Op.MKDIR, b"/a\0")
        self.assertEqual(ROUND_TRIPS[Op.MKDIR], before + 1)

    def test_notCountedWhenNotSent(self) -> None:
        """A request refused because the connection is closed is no round trip."""
        proto = connectedProtocol()
        proto.roundTrips = {}
        proto.connectionLost()
        self.failureResultOf(proto.request(Op.READ, b"/a\0"))
        self.assertEqual(proto.roundTrips, {})


class RenderTests(SynchronousTestCase):
    """The Prometheus text format."""

    def test_roundTripsByName(self) -> None:
        """Round trips appear per operation name, sorted, with HELP and TYPE."""
        service = SimpleNamespace(manager=None, simulated=False)
        text = renderMetrics(service, {int(Op.WRITE): 3, Op.READ: 5, 99: 1})
        self.assertIn("# TYPE xenddev_xenstore_requests_total counter\n", text)
        lines = [line for line in text.splitlines() if line.startswith("xenddev_xenstore_")]
        self.assertEqual(
            lines,
            [
                'xenddev_xenstore_requests_total{operation="OP99"} 1',
                'xenddev_xenstore_requests_total{operation="READ"} 5',
                'xenddev_xenstore_requests_total{operation="WRITE"} 3',
            ],
        )

    def test_deviceOperations(self) -> None:
        """Operation counts, durations and the in-flight gauge of the manager."""
        manager = SimpleNamespace(
            counts=Counter({("create", "vbd", "ok"): 2}),
            durations=Counter({("create", "vbd"): 0.5}),
            operations={object()},
        )
        text = renderMetrics(SimpleNamespace(manager=manager, simulated=True), {})
        self.assertIn(
            'xenddev_device_operations_total{operation="create",class="vbd",outcome="ok"} 2', text
        )
        self.assertIn(
            'xenddev_device_operation_seconds_total{operation="create",class="vbd"} 0.500000', text
        )
        self.assertIn("xenddev_device_operations_in_flight 1\n", text)
        self.assertIn("xenddev_simulated 1\n", text)
