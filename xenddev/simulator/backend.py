# -*- test-case-name: tests.test_simulator -*-
"""
A SIMULATED kernel backend driver (a stand-in for blkback and netback).

No hypervisor is present where xenddev is developed and tested, so no
kernel backend exists to take a device from Initialising to Connected and
back to Closed. L{BackendSimulator} plays that part in XenStore, following
the xenbus conventions (Xen's C{io/xenbus.h}, C{io/blkif.h}, C{io/netif.h})
and the sequence of seed 004:

  1. probing, as Linux's xenbus backend bus does it: on a change anywhere
     in a backend directory the driver is not yet bound to, if C{state} is
     Initialising (1), C{frontend-id} is set and C{frontend} names a
     directory that exists at that moment, the backend publishes its
     features and goes to InitWait (2), in one transaction. Otherwise the
     change is ignored, silently: a backend directory completed before its
     frontend exists waits for the next change of the backend directory
     (the frontend's own creation is not one). Seed 000 warns of this
     ("backends that cannot cope with the backend directory coming into
     existence before the corresponding frontend directory"); the real-Xen
     lane showed it is Linux's behaviour, so the toolstack writes the
     backend's C{frontend} key in the transaction that creates the frontend
     (docs/protocol.md). C{online} plays no part in probing;
  2. the hotplug script writes C{hotplug-status=connected} and the
     frontend reaches Initialised (3) or Connected (4) → for a vbd the
     backend publishes C{sectors}, C{sector-size} and C{info}; it goes to
     Connected (4). A vbd backend without C{dev} connects but, like
     blkback, serves nothing and leaves an error node
     (C{<dd>/error/backend/vbd/.../error = "2 get blkback dev name"}).
     With C{hotplug-status=error} (or C{busy}) it stays in InitWait, as a
     real backend would never connect;
  3. the frontend goes to Closing (5) or Closed (6), or its directory
     vanishes → Closed (6);
  4. the toolstack's detach writes C{online=0} and C{state=5} in one
     transaction → Closed (6) once the frontend is not connected (closed,
     never started, or gone). A frontend still connected must close first,
     as with a real guest: a guest that never closes keeps the backend in
     Closing, and the toolstack has to force the removal.

It never writes into a device directory that has been removed (see
L{xenddev.simulator.base}).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Mapping, Sequence

from zope.interface import implementer

from xenddev.interfaces import IXenbusSimulator, IXenStore
from xenddev.simulator.base import DeviceView, Transition, XenbusEndSimulator
from xenddev.xenbus import XenbusPathError, XenbusState, domainPath, parseBackendPath
from xenddev.xenstore.paths import joinPath, validateDomid

__all__ = [
    "BACKEND_FEATURES",
    "BackendSimulator",
    "decideBackend",
    "imageSectors",
]

S = XenbusState

#: What each simulated backend publishes on its way to InitWait. The
#: numbers are typical of Linux's blkback and netback; frontends read them
#: to pick ring sizes and offloads.
BACKEND_FEATURES: Mapping[str, Mapping[str, str]] = {
    "vbd": {
        "feature-flush-cache": "1",
        "feature-discard": "0",
        "feature-persistent": "1",
        "max-ring-page-order": "4",
        "multi-queue-max-queues": "4",
    },
    "vif": {
        "feature-sg": "1",
        "feature-gso-tcpv4": "1",
        "feature-gso-tcpv6": "1",
        "feature-ipv6-csum-offload": "1",
        "feature-rx-copy": "1",
        "feature-rx-flip": "0",
        "feature-multicast-control": "1",
        "feature-split-event-channels": "1",
        "multi-queue-max-queues": "4",
    },
}

SECTOR_SIZE = 512

_BASE_KEYS = ("state", "online", "hotplug-status", "frontend", "frontend-id")
_VBD_KEYS = ("mode", "params", "physical-device-path", "device-type", "dev")

#: Frontend states in which the guest driver is engaged with the device:
#: the backend must wait for it to close.
_FRONTEND_ACTIVE = frozenset(
    {S.InitWait, S.Initialised, S.Connected, S.Reconfiguring, S.Reconfigured}
)


def _sizeOf(path: str) -> int | None:
    """Size in bytes of a regular file or block device, or C{None}."""
    # A stat (and for block devices an open+lseek) of a local path: quick
    # enough to do on the reactor thread; FIFOs and the like are skipped,
    # as opening them could block.
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    if stat.S_ISREG(st.st_mode):
        return st.st_size
    if stat.S_ISBLK(st.st_mode):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            return os.lseek(fd, 0, os.SEEK_END)
        except OSError:
            return None
        finally:
            os.close(fd)
    return None


def _candidates(name: str) -> list[str]:
    if name.startswith("/"):
        return [name]
    # xend wrote bare device names for phy: ("loop0" = /dev/loop0); tap
    # params carry a "type:" prefix ("vhd:/srv/a.vhd").
    result = []
    if ":" in name:
        tail = name.rsplit(":", 1)[1]
        if tail.startswith("/"):
            result.append(tail)
    elif "/" not in name:
        result.append("/dev/" + name)
    return result


def imageSectors(values: Mapping[str, str | None]) -> int:
    """
    The number of 512-byte sectors of the image a vbd backend serves: the
    size of the file or block device named by C{physical-device-path}, else
    by C{params}; 0 if neither names something that exists.
    """
    for key in ("physical-device-path", "params"):
        name = values.get(key)
        if not name:
            continue
        for candidate in _candidates(name):
            size = _sizeOf(candidate)
            if size is not None:
                return size // SECTOR_SIZE
    return 0


def _connectWrites(view: DeviceView) -> dict[str, str]:
    if view.devclass != "vbd":
        return {}
    info = 0
    if (view.get("mode") or "").startswith("r"):
        info |= 4  # VDISK_READONLY
    if view.get("device-type") == "cdrom":
        info |= 1  # VDISK_CDROM
    return {
        "sectors": str(imageSectors(view.values)),
        "sector-size": str(SECTOR_SIZE),
        "physical-sector-size": str(SECTOR_SIZE),
        "info": str(info),
    }


def decideBackend(view: DeviceView) -> Transition | None:
    """
    The simulated backend's state machine: the transition to make for what
    C{view} shows, or C{None}. Pure, apart from looking up the image size
    when connecting a vbd.
    """
    state = view.state
    if state is None or state not in (
        S.Initialising,
        S.InitWait,
        S.Initialised,
        S.Connected,
        S.Closing,
    ):
        return None
    fe = view.otherendState
    online = view.get("online") == "1"

    if fe in (S.Closing, S.Closed):
        return Transition(S.Closed, f"frontend is {fe.name}")
    if fe in (None, S.Unknown) and state is not S.Initialising:
        # Absent differs from "not written yet" only if it was there
        # before, or if we got far enough to need it (a restarted simulator
        # has not seen it, but a backend past InitWait had).
        if view.otherendSeen or state in (S.Initialised, S.Connected, S.Closing):
            return Transition(S.Closed, "frontend is gone")
    if state is S.Closing:
        if not online and fe not in _FRONTEND_ACTIVE:
            return Transition(S.Closed, "detached by the toolstack (online=0, state=5)")
        return None  # a connected frontend must close first
    if state is S.Initialising:
        if view.otherendPath is not None and view.otherendExists and view.get("frontend-id"):
            return Transition(
                S.InitWait,
                "probed (frontend exists): features published",
                dict(BACKEND_FEATURES.get(view.devclass, {})),
            )
        return None
    if state in (S.InitWait, S.Initialised):
        if view.get("hotplug-status") == "connected" and fe in (S.Initialised, S.Connected):
            if view.devclass == "vbd" and not view.get("dev"):
                # Linux's blkback connects, then fails to name its I/O
                # threads after "dev": no request is ever served, and all
                # it says is an error node (xenbus_dev_error).
                return Transition(
                    S.Connected,
                    "connected WITHOUT I/O: no dev key (blkback: get blkback dev name)",
                    _connectWrites(view),
                    {_errorNode(view.path): "2 get blkback dev name"},
                )
            return Transition(
                S.Connected,
                f"hotplug-status=connected, frontend {fe.name}",
                _connectWrites(view),
            )
    return None


def _errorNode(path: str) -> str:
    """Where Linux's C{xenbus_dev_error} reports on a backend device."""
    # /local/domain/<dd>/backend/... -> /local/domain/<dd>/error/backend/.../error
    parts = path.split("/")
    return "/".join([*parts[:4], "error", *parts[4:], "error"])


@implementer(IXenbusSimulator)
class BackendSimulator(XenbusEndSimulator):
    """
    SIMULATES the kernel backend drivers (blkback, netback) of driver domain
    C{backendDomid}, because no hypervisor is present: it watches
    C{/local/domain/<backendDomid>/backend} and plays the backend's part of
    the xenbus handshake for every device of the given classes (see the
    module docstring for the rules, L{decideBackend} for the code).

    @param xs: the XenStore connection (any L{IXenStore}).
    @param backendDomid: the driver domain whose backends are simulated.
    @param classes: the device classes served.
    """

    role = "backend"
    otherendKey = "frontend"
    depth = 3  # <class>/<frontend domid>/<devid>
    triggerKeys = frozenset({"state", "online", "hotplug-status", "frontend"})

    def __init__(
        self, xs: IXenStore, backendDomid: int = 0, classes: Iterable[str] = ("vbd", "vif")
    ) -> None:
        self.backendDomid = validateDomid(backendDomid)
        super().__init__(xs, joinPath(domainPath(self.backendDomid), "backend"), classes)

    def banner(self) -> str:
        """The start-up log line."""
        return (
            f"SIMULATED kernel backend (stand-in for blkback/netback) for domain "
            f"{self.backendDomid}, classes {', '.join(self.classes)}: no hypervisor is "
            f"present, so xenddev itself plays the backend side of the xenbus handshake "
            f"under {self.root}"
        )

    def deviceClassOf(self, path: str) -> str | None:
        """The class of a backend directory of ours, else C{None}."""
        try:
            dev = parseBackendPath(path)
        except XenbusPathError:
            return None
        if dev.backendDomid != self.backendDomid or dev.devclass not in self.classes:
            return None
        return dev.devclass

    def readKeys(self, devclass: str) -> tuple[str, ...]:
        """The keys of a backend directory a step reads."""
        return _BASE_KEYS + _VBD_KEYS if devclass == "vbd" else _BASE_KEYS

    def decide(self, view: DeviceView) -> Transition | None:
        """See L{decideBackend}."""
        return decideBackend(view)

    def reactsTo(self, lastState: XenbusState | None, key: Sequence[str]) -> bool:
        """
        A device not yet bound (never stepped, or still Initialising) is
        probed again on any change in its directory, as Linux's backend bus
        does; a bound one reacts to its trigger keys only.
        """
        if lastState in (None, S.Initialising):
            return True
        return super().reactsTo(lastState, key)

    def watchesOtherend(self, lastState: XenbusState | None) -> bool:
        """Only a bound device watches its frontend (Linux sets the watch at probe)."""
        return lastState not in (None, S.Initialising)
