"""
Tests for L{xenddev.xenstore.dispatch.WatchDispatch}: many waits on one
standing watch, over the C xenstored and the embedded one.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from tests.support.fixtures import EmbeddedXenstoredFixture, RealXenstoredFixture
from xenddev.xenstore.dispatch import WatchDispatch
from xenddev.xenstore.errors import XenStoreTimeout

ROOT = "/local/domain/0/backendctrl"


class _ClockedStore:
    """A connection whose waits are timed by a L{Clock} (everything else real)."""

    def __init__(self, xs: Any, clock: Clock) -> None:
        self.xs = xs
        self.reactor = clock

    def watch(self, path: str, callback: Any) -> Deferred[Any]:
        return self.xs.watch(path, callback)

    def readOrNone(self, path: str) -> Deferred[str | None]:
        return self.xs.readOrNone(path)


class DispatchSuite:
    """Mixed with a server fixture and TestCase."""

    startServer: Any
    connect: Any
    assertEqual: Any
    assertFalse: Any
    assertTrue: Any
    assertRaises: Any
    assertFailure: Any
    addCleanup: Any

    async def setUp(self) -> None:
        self.startServer()
        self.xs = await self.connect()
        self.other = await self.connect()
        await self.xs.mkdir(ROOT)
        self.dispatch = WatchDispatch(self.xs, ROOT)
        self.addCleanup(self.dispatch.stop)

    async def test_manyWaitsOneWatch(self) -> None:
        """Waits on many nodes share one watch, each fires with its own value."""
        await self.dispatch.ready()
        watches = self.xs.watchCount
        waits = [self.dispatch.until(f"{ROOT}/n{i}/v", lambda v: v == "go") for i in range(20)]
        self.assertEqual(self.xs.watchCount, watches)
        for i in range(20):
            await self.other.write(f"{ROOT}/n{i}/v", "go")
        self.assertEqual([await w for w in waits], ["go"] * 20)
        self.assertEqual(self.dispatch.pending, 0)

    async def test_checkedAtOnce(self) -> None:
        """until (and waitFor) see a value already there without an event."""
        await self.xs.write(f"{ROOT}/here", "1")
        self.assertEqual(await self.dispatch.waitFor(f"{ROOT}/here", lambda v: v == "1"), "1")

    async def test_unarmedIgnoresEarlierReads(self) -> None:
        """
        An unarmed wait for a node to be gone is not satisfied by the node
        not yet being there: it counts only once armed, after the change.
        """
        await self.dispatch.ready()
        node = f"{ROOT}/obj/request"
        wait = self.dispatch.expect(node, lambda v: v is None)
        await self.xs.mkdir(f"{ROOT}/obj")  # an event above the node
        await self.xs.write(node, "prepare")
        await self.xs.read(node)  # events for the writes have been delivered
        self.assertFalse(wait.result.called)
        wait.arm()
        await self.xs.read(node)
        self.assertFalse(wait.result.called)
        await self.other.rm(node)
        self.assertEqual(await wait.result, None)

    async def test_removalOfAnAncestor(self) -> None:
        """Removing a directory above a waited node satisfies a wait for it to go."""
        await self.xs.write(f"{ROOT}/dir/sub/leaf", "x")
        await self.dispatch.ready()
        d = self.dispatch.until(f"{ROOT}/dir/sub/leaf", lambda v: v is None)
        await self.xs.read(f"{ROOT}/dir/sub/leaf")
        self.assertFalse(d.called)
        await self.other.rm(f"{ROOT}/dir")
        self.assertEqual(await d, None)
        self.assertEqual(self.dispatch.pending, 0)

    async def test_cancelForgets(self) -> None:
        """A cancelled wait fails with CancelledError and is forgotten."""
        await self.dispatch.ready()
        d = self.dispatch.until(f"{ROOT}/never", lambda v: v == "1")
        d.cancel()
        await self.assertFailure(d, CancelledError)
        self.assertEqual(self.dispatch.pending, 0)

    async def test_timeout(self) -> None:
        """A wait times out on the injected clock with the last value seen."""
        clock = Clock()
        dispatch = WatchDispatch(_ClockedStore(self.xs, clock), ROOT)  # type: ignore[arg-type]
        self.addCleanup(dispatch.stop)
        await self.xs.write(f"{ROOT}/slow", "0")
        await dispatch.ready()
        d = dispatch.until(f"{ROOT}/slow", lambda v: v == "1", timeout=5.0)
        await self.xs.read(f"{ROOT}/slow")
        clock.advance(5.0)
        e = await self.assertFailure(d, XenStoreTimeout)
        self.assertEqual((e.path, e.last), (f"{ROOT}/slow", "0"))
        self.assertEqual(dispatch.pending, 0)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_pathOutsideRoot(self) -> None:
        """A node outside the watched subtree is refused."""
        self.assertRaises(ValueError, self.dispatch.expect, "/local/domain/1/x", lambda v: True)


class RealXenstoredDispatchTests(DispatchSuite, RealXenstoredFixture, TestCase):
    """Over the C xenstored."""


class EmbeddedXenstoredDispatchTests(DispatchSuite, EmbeddedXenstoredFixture, TestCase):
    """Over the embedded xenstored."""
