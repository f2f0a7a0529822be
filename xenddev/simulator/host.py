# -*- test-case-name: tests.test_simulator -*-
"""
A SIMULATED host: the backends of one driver domain and the frontends of
some guests, started and stopped together. A stand-in for what needs a
hypervisor (kernel backends, guests); see L{xenddev.simulator}.
"""

from __future__ import annotations

from collections.abc import Iterable

from twisted.internet.defer import Deferred, succeed
from zope.interface import implementer

from xenddev.interfaces import IXenbusSimulator, IXenStore
from xenddev.simulator.backend import BackendSimulator
from xenddev.simulator.base import XenbusEndSimulator, settleSimulators
from xenddev.simulator.frontend import FrontendSimulator
from xenddev.xenstore.paths import validateDomid

__all__ = ["SimulatedHost"]


@implementer(IXenbusSimulator)
class SimulatedHost:
    """
    SIMULATES, because no hypervisor is present, the kernel backends of
    driver domain C{driverDomid} and the frontends of the guests
    C{guestDomids}, all on the connection C{xs}.

    @ivar backend: the L{BackendSimulator}.
    @ivar frontends: L{FrontendSimulator} by guest domid.
    """

    def __init__(
        self,
        xs: IXenStore,
        driverDomid: int = 0,
        guestDomids: Iterable[int] = (),
        classes: Iterable[str] = ("vbd", "vif"),
        refuseToClose: bool = False,
    ) -> None:
        self.xs = xs
        self.classes = tuple(classes)
        self.refuseToClose = refuseToClose
        self.backend = BackendSimulator(xs, driverDomid, self.classes)
        self.frontends: dict[int, FrontendSimulator] = {}
        for domid in guestDomids:
            self._newGuest(domid)
        self._started = False

    def _newGuest(self, domid: int) -> FrontendSimulator:
        domid = validateDomid(domid)
        if domid in self.frontends:
            raise ValueError(f"guest {domid} is already simulated")
        sim = FrontendSimulator(self.xs, domid, self.classes, self.refuseToClose)
        self.frontends[domid] = sim
        return sim

    @property
    def simulators(self) -> list[XenbusEndSimulator]:
        """The backend simulator, then the frontend simulators by domid."""
        return [self.backend, *(self.frontends[d] for d in sorted(self.frontends))]

    def start(self) -> Deferred[None]:
        """Start every simulator."""
        return Deferred.fromCoroutine(self._start())

    async def _start(self) -> None:
        self._started = True
        for sim in self.simulators:
            await sim.start()

    def stop(self) -> Deferred[None]:
        """Stop every simulator (no watches, no timers left)."""
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        self._started = False
        for sim in self.simulators:
            await sim.stop()

    def addGuest(self, domid: int) -> Deferred[FrontendSimulator]:
        """Simulate one more guest's frontends (started if the host is)."""
        sim = self._newGuest(domid)
        if not self._started:
            return succeed(sim)
        return sim.start().addCallback(lambda _: sim)

    def removeGuest(self, domid: int) -> Deferred[None]:
        """Stop simulating a guest (its XenStore directories stay as they are)."""
        sim = self.frontends.pop(validateDomid(domid))
        return sim.stop()

    def settle(self) -> Deferred[None]:
        """Wait until no simulator of this host has anything left to react to."""
        return settleSimulators(*self.simulators)
