"""
The daemon's parts as child services (L{xenddev.lifecycle}): a L{Part}
starts when added to a running parent and says when it is ready; a stop
cancels a start still under way; L{stopInReverse} stops the children last
first, each once the one after it has stopped, and goes on past a failure.
The daemon's own children are checked in C{tests.test_daemon}.
"""

from __future__ import annotations

from twisted.application.service import MultiService, Service
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.logger import Logger
from twisted.trial.unittest import SynchronousTestCase

from xenddev.lifecycle import Part, stopInReverse


class PartTests(SynchronousTestCase):
    """A part's start, readiness and stop."""

    def test_startsWhenAdded(self) -> None:
        """Added to a running parent, a part starts; ready follows its start."""
        parent = MultiService()
        parent.startService()
        started: Deferred[None] = Deferred()
        part = Part("one", lambda: started)
        part.setServiceParent(parent)
        self.assertTrue(part.running)
        assert part.ready is not None
        self.assertNoResult(part.ready)
        started.callback(None)
        self.successResultOf(part.ready)
        self.assertIs(parent.getServiceNamed("one"), part)

    def test_coroutineSteps(self) -> None:
        """Start and stop may be coroutine functions."""
        log: list[str] = []

        async def start() -> None:
            log.append("start")

        async def stop() -> None:
            log.append("stop")

        part = Part("one", start, stop)
        part.startService()
        assert part.ready is not None
        self.successResultOf(part.ready)
        self.successResultOf(part.stopService())
        self.assertEqual(log, ["start", "stop"])

    def test_failedStart(self) -> None:
        """A start that raises fails ready; the part is still stopped."""
        stopped: list[bool] = []

        def start() -> None:
            raise ValueError("no")

        part = Part("one", start, lambda: stopped.append(True))
        part.startService()
        assert part.ready is not None
        self.failureResultOf(part.ready, ValueError)
        self.successResultOf(part.stopService())
        self.assertEqual(stopped, [True])

    def test_stopCancelsStart(self) -> None:
        """A stop while the start is under way cancels it, then stops."""
        cancelled: list[bool] = []
        started: Deferred[None] = Deferred(lambda d: cancelled.append(True))
        part = Part("one", lambda: started, lambda: succeed(None))
        part.startService()
        ready = part.ready
        assert ready is not None
        waiter = ready.addErrback(lambda f: f.trap(CancelledError) and "cancelled")
        self.successResultOf(part.stopService())
        self.assertEqual(cancelled, [True])
        self.assertEqual(self.successResultOf(waiter), "cancelled")
        self.assertFalse(part.running)


class StopInReverseTests(SynchronousTestCase):
    """Children stop last first, one at a time."""

    def test_oneAtATime(self) -> None:
        """Each child stops once the one added after it has stopped."""
        parent = MultiService()
        calls: list[str] = []
        pending: dict[str, Deferred[None]] = {}

        def stopper(name: str) -> Deferred[None]:
            calls.append(name)
            pending[name] = Deferred()
            return pending[name]

        for name in ("store", "connection", "listener"):
            Part(name, stop=lambda n=name: stopper(n)).setServiceParent(parent)  # type: ignore[misc]
        parent.startService()
        done = stopInReverse(parent, Logger())
        self.assertEqual(calls, ["listener"])
        pending["listener"].callback(None)
        self.assertEqual(calls, ["listener", "connection"])
        pending["connection"].callback(None)
        pending["store"].callback(None)
        self.assertEqual(calls, ["listener", "connection", "store"])
        self.successResultOf(done)
        self.assertFalse(any(child.running for child in parent))

    def test_failureLoggedAndPassed(self) -> None:
        """A child that fails to stop is logged; the ones before it still stop."""
        parent = MultiService()
        first = Part("first")
        first.setServiceParent(parent)

        def broken() -> None:
            raise RuntimeError("stuck")

        Part("second", stop=broken).setServiceParent(parent)
        parent.startService()
        self.successResultOf(stopInReverse(parent, Logger()))
        self.assertFalse(first.running)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_stoppedChildrenSkipped(self) -> None:
        """A child that is not running is not stopped again."""
        parent = MultiService()
        child = Service()
        child.setServiceParent(parent)
        calls: list[bool] = []
        child.stopService = lambda: calls.append(True)  # type: ignore[method-assign]
        self.successResultOf(stopInReverse(parent, Logger()))
        self.assertEqual(calls, [])
