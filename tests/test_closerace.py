"""
A backend that goes back to Connected after the toolstack asked it to
close: the driver's switch to Connected waits for its hotplug script, and
Linux's C{xenbus_switch_state} overwrites the node, so a script reporting
just after a detach began undoes the toolstack's Closing. The detach asks
again (within its deadline) instead of waiting out the destroy timeout and
forcing the removal (seen as a 10 s vif detach with the simulated netback).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.trial.unittest import TestCase

from tests.support.fixtures import EmbeddedXenstoredFixture, RealXenstoredFixture
from tests.test_controllers import GUEST, ControllerFixture

BACKEND = f"/local/domain/0/backend/vif/{GUEST}/0"


class LateConnect:
    """
    A driver's late switch: the first Closing it sees is overwritten with
    Connected; a later one is answered with Closed.
    """

    def __init__(self, xs: Any) -> None:
        self.xs = xs
        self.closings = 0

    def changed(self, path: str) -> None:
        """On each change of the backend's state (a watch callback)."""
        Deferred.fromCoroutine(self._react(f"{BACKEND}/state"))

    async def _react(self, path: str) -> None:
        if await self.xs.readOrNone(path) != "5":
            return
        self.closings += 1
        await self.xs.write(path, "4" if self.closings == 1 else "6")


class CloseRaceSuite(ControllerFixture):
    """Mixed with a server fixture and TestCase."""

    async def test_closingAskedAgain(self) -> None:
        """Overwritten once with Connected, the Closing is written again and the backend closes."""
        await self.xs.write(f"{BACKEND}/state", "4")
        driver = LateConnect(await self.connect())
        handle = await driver.xs.watch(f"{BACKEND}/state", driver.changed)
        self.addCleanup(handle.stop)
        ctrl = await self.manager.controller(GUEST, "vif")
        ctrl.destroyTimeout = 5.0
        closed = await ctrl._closeBackend(BACKEND)
        self.assertTrue(closed, (driver.closings, await self.xs.read(f"{BACKEND}/state")))
        self.assertEqual(driver.closings, 2)
        self.assertEqual(await self.xs.read(f"{BACKEND}/state"), "6")
        self.assertEqual(await self.xs.read(f"{BACKEND}/online"), "0")


class EmbeddedCloseRaceTests(CloseRaceSuite, EmbeddedXenstoredFixture, TestCase):
    """On the embedded xenstored."""


class RealCloseRaceTests(CloseRaceSuite, RealXenstoredFixture, TestCase):
    """On the C xenstored."""
