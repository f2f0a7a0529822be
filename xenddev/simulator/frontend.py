# -*- test-case-name: tests.test_simulator -*-
"""
A SIMULATED guest frontend driver (a stand-in for blkfront and netfront
inside a guest).

No hypervisor is present where xenddev is developed and tested, so there is
no guest whose drivers would answer the backend. L{FrontendSimulator} plays
the guest's part in XenStore:

  1. its device is in Initialising (1) and the backend reached InitWait (2)
     (for a vbd, also Connected (4)) → it publishes ring references and an
     event channel (made-up numbers: there is no shared memory); a vbd
     goes to Initialised (3) (blkfront's C{talk_to_blkback}), a vif
     straight to Connected (4) (netfront's C{netback_changed} on InitWait:
     C{xennet_connect}, then Connected; netback ignores an Initialised
     frontend and connects when it sees Connected);
  2. a vbd: the backend reaches Connected (4) → Connected (4);
  3. the backend goes to Closing (5) or Closed (6), or vanishes → Closing
     (5), then Closed (6) in a second transaction, so that watchers may see
     both;
  4. L{FrontendSimulator.close} closes a device on request, as a guest
     unplugging it would (Closing now, Closed once the backend reacted).

With C{refuseToClose=True} it behaves like a guest that never lets go of its
devices: step 3 does not happen, so the toolstack must force the detach.

It never writes into a device directory that has been removed (see
L{xenddev.simulator.base}).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from twisted.internet.defer import Deferred
from zope.interface import implementer

from xenddev.errors import XenddevError
from xenddev.interfaces import ITransaction, IXenbusSimulator, IXenStore
from xenddev.simulator.base import DeviceView, Transition, XenbusEndSimulator
from xenddev.xenbus import (
    XenbusPathError,
    XenbusState,
    domainPath,
    frontendPath,
    parseFrontendPath,
)
from xenddev.xenstore.paths import joinPath, validateDomid

__all__ = [
    "FRONTEND_RINGS",
    "FrontendSimulator",
    "SimulatedDeviceNotFound",
    "decideFrontend",
]

S = XenbusState

#: What each simulated frontend publishes on its way to Initialised.
FRONTEND_RINGS: Mapping[str, Mapping[str, str]] = {
    "vbd": {"ring-ref": "8", "event-channel": "9"},
    "vif": {
        "tx-ring-ref": "10",
        "rx-ring-ref": "11",
        "event-channel": "12",
        "request-rx-copy": "1",
        "feature-rx-notify": "1",
        "feature-sg": "1",
    },
}
_DEFAULT_RINGS: Mapping[str, str] = {"ring-ref": "8", "event-channel": "9"}
_PROTOCOL = "x86_64-abi"


class SimulatedDeviceNotFound(XenddevError, LookupError):
    """L{FrontendSimulator.close} was asked about a device that does not exist."""

    def __init__(self, path: str) -> None:
        self.path = path
        super().__init__(f"no frontend device at {path}")


def _ringWrites(view: DeviceView) -> dict[str, str]:
    writes = dict(FRONTEND_RINGS.get(view.devclass, _DEFAULT_RINGS))
    if view.devclass == "vbd" and not view.get("protocol"):
        # The toolstack may have chosen the ABI already (xend wrote it);
        # keep its choice.
        writes["protocol"] = _PROTOCOL
    return writes


def decideFrontend(view: DeviceView, refuseToClose: bool = False) -> Transition | None:
    """
    The simulated frontend's state machine: the transition to make for what
    C{view} shows, or C{None}. Pure.
    """
    state = view.state
    if state is None or state in (S.Unknown, S.Closed, S.Reconfiguring, S.Reconfigured):
        return None
    be = view.otherendState
    backendClosing = be in (S.Closing, S.Closed)
    backendGone = be in (None, S.Unknown) and (
        view.otherendSeen or state in (S.Initialised, S.Connected, S.Closing)
    )
    if state is S.Closing:
        # Closing was our own doing (the backend closed, or close() was
        # called): finish once the backend has reacted.
        if backendClosing or backendGone:
            return Transition(S.Closed, "backend " + (be.name if be is not None else "gone"))
        return None
    if backendClosing or backendGone:
        if refuseToClose:
            return None
        return Transition(S.Closing, "backend " + (be.name if be is not None else "gone"))
    if view.devclass == "vif":
        # netfront's netback_changed(): only the backend's InitWait starts it.
        if state is S.Initialising and be is S.InitWait:
            return Transition(
                S.Connected, "backend InitWait: rings published, connected", _ringWrites(view)
            )
        return None
    if state in (S.Initialising, S.InitWait) and be in (S.InitWait, S.Connected):
        return Transition(S.Initialised, f"backend {be.name}: rings published", _ringWrites(view))
    if state is S.Initialised and be is S.Connected:
        return Transition(S.Connected, "backend Connected")
    return None


@implementer(IXenbusSimulator)
class FrontendSimulator(XenbusEndSimulator):
    """
    SIMULATES the frontend drivers of guest C{domid} (what blkfront and
    netfront do inside a guest), because no hypervisor — hence no guest — is
    present: it watches C{/local/domain/<domid>/device} and plays the
    frontend's part of the xenbus handshake (see the module docstring for
    the rules, L{decideFrontend} for the code).

    @param xs: the XenStore connection (any L{IXenStore}).
    @param domid: the guest whose frontends are simulated.
    @param classes: the device classes served.
    @param refuseToClose: simulate a guest that never closes its devices
        when the backend asks (L{close} still works).
    """

    role = "frontend"
    otherendKey = "backend"
    depth = 2  # <class>/<devid>
    triggerKeys = frozenset({"state", "backend"})

    def __init__(
        self,
        xs: IXenStore,
        domid: int,
        classes: Iterable[str] = ("vbd", "vif"),
        refuseToClose: bool = False,
    ) -> None:
        self.domid = validateDomid(domid)
        self.refuseToClose = refuseToClose
        super().__init__(xs, joinPath(domainPath(self.domid), "device"), classes)

    def banner(self) -> str:
        """The start-up log line."""
        refusing = " (refusing to close)" if self.refuseToClose else ""
        return (
            f"SIMULATED guest frontend (stand-in for blkfront/netfront) for domain "
            f"{self.domid}{refusing}, classes {', '.join(self.classes)}: no hypervisor "
            f"and no guest are present, so xenddev itself plays the frontend side of "
            f"the xenbus handshake under {self.root}"
        )

    def deviceClassOf(self, path: str) -> str | None:
        """The class of a frontend directory of ours, else C{None}."""
        try:
            dev = parseFrontendPath(path)
        except XenbusPathError:
            return None
        if dev.domid != self.domid or dev.devclass not in self.classes:
            return None
        return dev.devclass

    def readKeys(self, devclass: str) -> tuple[str, ...]:
        """The keys of a frontend directory a step reads."""
        return ("state", "backend", "protocol")

    def decide(self, view: DeviceView) -> Transition | None:
        """See L{decideFrontend}."""
        return decideFrontend(view, self.refuseToClose)

    def close(self, devclass: str, devid: int | str) -> Deferred[bool]:
        """
        Close a device as the guest would when unplugging it: move it to
        Closing now; it goes to Closed once the backend has reacted (if this
        simulator is running).

        @return: a Deferred firing with C{True} if the device was moved to
            Closing, C{False} if it was Closing or Closed already; failing
            with L{SimulatedDeviceNotFound} if there is no such frontend
            (nothing is written then), or L{XenbusPathError} for bad input.
        """
        path = frontendPath(self.domid, devclass, devid)
        stateNode = joinPath(path, "state")

        async def closing(tx: ITransaction) -> bool:
            if not await tx.exists(path):
                raise SimulatedDeviceNotFound(path)
            state = XenbusState.parse(await tx.readOrNone(stateNode))
            if state in (S.Closing, S.Closed):
                return False
            await tx.write(stateNode, str(int(S.Closing)))
            return True

        d: Deferred[Any] = self.xs.transact(closing)

        def closed(moved: bool) -> bool:
            if moved:
                self.log.info("Simulated frontend {path}: closing on request", path=path)
                if devclass in self.classes:
                    self.poke(path, devclass)
            return moved

        return d.addCallback(closed)
