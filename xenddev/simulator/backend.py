# -*- test-case-name: tests.test_simulator -*-
"""
A SIMULATED kernel backend driver (a stand-in for blkback and netback).

No hypervisor is present where xenddev is developed and tested, so no
kernel backend exists to take a device from Initialising to Connected and
back to Closed. L{BackendSimulator} plays that part in XenStore, modelled
function by function on Linux 6.1 (C{drivers/xen/xenbus/xenbus_probe.c},
C{xenbus_client.c}, C{xen-blkback/xenbus.c}, C{xen-netback/xenbus.c}):

  - B{the driver's state is its own} (L{BackendDriver}, Linux's
    C{dev->state}). It publishes it in C{<backend>/state} with
    C{xenbus_switch_state}: no write when the driver is in that state
    already, whatever the node says; no write when the node is gone (no
    resurrection). A value the toolstack writes into C{<backend>/state}
    (its C{state=5} at detach) does not change the driver's state: it is
    a message the I{frontend} reads. The driver reads its own node only
    when probing (C{Initialising} means a new device) and when removed
    (C{xenbus_dev_remove}: see below);
  - B{probing}, as Linux's backend bus does it: on a change anywhere in a
    backend directory no driver is bound to, if C{state} is Initialising
    (1), C{frontend-id} is set and C{frontend} names a directory that
    exists at that moment, the driver binds: it publishes its features;
    blkback goes to InitWait (2), netback stays Initialising until its
    other-end watch first fires. Otherwise the change is ignored,
    silently: a backend directory completed before its frontend exists
    waits for the next change of the backend directory (the real-Xen lane
    showed it; the toolstack writes the backend's C{frontend} key in the
    transaction that creates the frontend, docs/protocol.md). C{online}
    plays no part in probing;
  - B{a bound driver reacts to its frontend's state} (C{frontend_changed},
    case by case as in each driver; the watch also fires once when set),
    and to C{hotplug-status} (standing in for the hotplug script's
    C{physical-device} for blkback; netback's C{hotplug-status} watch),
    never to its own C{state} or C{online} changing. blkback connects
    (4) once the frontend is Initialised or Connected and the hotplug
    script reported C{connected}; netback once the frontend is Connected,
    its switch deferred until C{connected}. A vbd backend without C{dev}
    connects but, like blkback, serves nothing and leaves an error node
    (C{<dd>/error/backend/vbd/.../error = "2 get blkback dev name"});
  - B{closing}: blkback answers a Closing frontend with Closing and a
    Closed one with Closed; netback walks C{set_backend_state}'s path
    (Connected → Closing → Closed, one write each). With C{online=0} a
    Closed frontend then makes the driver C{device_unregister} the device;
  - B{a vanished frontend} (its C{state} reads as Unknown) makes both
    drivers C{device_unregister} the device. Then C{xenbus_dev_remove}
    switches to Closed only for a driver that does not allow rebinding
    (netback, which has passed through Closing to Closed already) or if
    the node says Closing: blkback allows rebinding, so it writes Closed
    only when the toolstack had written C{state=5}, and otherwise leaves
    the node as it was (Connected, say). C{netback_remove} also removes
    C{hotplug-status}. An unregistered device is dead to the driver until
    its node says Initialising again.

A simulator started on a store with devices in it adopts them in the state
their node shows (L{adoptBackend}), so a restarted simulator carries on.

It never writes into a device directory that has been removed (see
L{xenddev.simulator.base}).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Mapping, Sequence

import attrs
from zope.interface import implementer

from xenddev.interfaces import IXenbusSimulator, IXenStore
from xenddev.simulator.base import DeviceView, Transition, XenbusEndSimulator
from xenddev.xenbus import XenbusPathError, XenbusState, domainPath, parseBackendPath
from xenddev.xenstore.paths import joinPath, validateDomid

__all__ = [
    "BACKEND_FEATURES",
    "BackendDriver",
    "BackendSimulator",
    "adoptBackend",
    "decideBackend",
    "imageSectors",
    "netbackPath",
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


@attrs.frozen
class BackendDriver:
    """
    What a SIMULATED kernel backend driver keeps of one device: Linux's
    C{struct xenbus_device} and the driver's C{backend_info}. The driver's
    state is its own (C{state}, Linux's C{dev->state}); the device's
    C{state} node in XenStore is where the driver I{publishes} it, and a
    value someone else writes there changes nothing in the driver.

    @ivar bound: a driver is bound to the device (probed, not unregistered).
    @ivar state: the driver's state, as last switched by L{xenbus_switch_state}.
    @ivar frontendSeen: the frontend state last handed to C{frontend_changed}
        (C{None}: the other-end watch's first firing, at registration, is due).
    @ivar rings: blkback: the rings are mapped (C{connect_ring}).
    @ivar vbd: blkback: the device is opened (C{backend_changed}, once the
        hotplug script is done: here, C{hotplug-status=connected}).
    @ivar netState: netback: C{be->state}, the state the driver goes to
        (published by C{backend_switch_state} unless deferred).
    @ivar deferred: netback: C{have_hotplug_status_watch}: state switches are
        held back until the hotplug script reports C{connected}.
    @ivar pending: netback: the rest of a C{set_backend_state} path, one
        C{xenbus_switch_state} per step; C{None} stands for the
        C{device_unregister} that follows it.
    """

    bound: bool = False
    state: S = S.Initialising
    frontendSeen: S | None = None
    rings: bool = False
    vbd: bool = False
    netState: S = S.Initialising
    deferred: bool = False
    pending: tuple[S | None, ...] = ()


#: netback's set_backend_state(): the next state on the way from the first
#: to the second (each hop one backend_switch_state).
_NETBACK_NEXT: Mapping[tuple[S, S], S] = {
    (S.Initialising, S.InitWait): S.InitWait,
    (S.Initialising, S.Connected): S.InitWait,
    (S.Initialising, S.Closing): S.InitWait,
    (S.Initialising, S.Closed): S.Closed,
    (S.Closed, S.InitWait): S.InitWait,
    (S.Closed, S.Connected): S.InitWait,
    (S.Closed, S.Closing): S.Closing,
    (S.InitWait, S.Connected): S.Connected,
    (S.InitWait, S.Closing): S.Closing,
    (S.InitWait, S.Closed): S.Closing,
    (S.Connected, S.InitWait): S.Closing,
    (S.Connected, S.Closing): S.Closing,
    (S.Connected, S.Closed): S.Closing,
    (S.Closing, S.InitWait): S.Closed,
    (S.Closing, S.Connected): S.Closed,
    (S.Closing, S.Closed): S.Closed,
}


def netbackPath(current: S, target: S) -> tuple[S, ...]:
    """
    The states netback's C{set_backend_state} passes through from
    C{current} to C{target} (the shortest path of its state diagram).
    """
    path: list[S] = []
    while current is not target:
        current = _NETBACK_NEXT[(current, target)]
        path.append(current)
    return tuple(path)


class _Effects:
    """What one step of a simulated backend does: collected, then one L{Transition}."""

    def __init__(self, view: DeviceView, driver: BackendDriver) -> None:
        self.view = view
        self.driver = driver
        self.state: S | None = None
        self.writes: dict[str, str] = {}
        self.elsewhere: dict[str, str] = {}
        self.removes: list[str] = []
        self.reasons: list[str] = []

    def storeState(self) -> S | None:
        """The C{state} node's value as this step leaves it so far."""
        return self.state if self.state is not None else self.view.state

    def switch(self, state: S, why: str) -> None:
        """
        Linux's C{xenbus_switch_state}: nothing if the driver's own state is
        C{state} already (whatever the node says); else, in a transaction,
        write the node unless it is gone (no resurrection). The driver's
        state becomes C{state} either way.
        """
        if state is self.driver.state:
            return
        self.driver = attrs.evolve(self.driver, state=state)
        if self.view.get("state") is not None:
            self.state = state
        self.reasons.append(f"{why}: {state.name}")

    def fatal(self, errno: int, message: str) -> None:
        """Linux's C{xenbus_dev_fatal}: the error node, then Closing."""
        self.elsewhere[_errorNode(self.view.path)] = f"{errno} {message}"
        self.switch(S.Closing, f"xenbus_dev_fatal ({message})")

    def note(self, why: str) -> None:
        """A reason to log with the step's transition."""
        self.reasons.append(why)

    def result(self) -> tuple[Transition | None, BackendDriver]:
        """The transition (C{None} if nothing happened) and the new memory."""
        if not self.reasons:
            return None, self.driver
        return (
            Transition(
                self.state,
                "; ".join(self.reasons),
                self.writes,
                self.elsewhere,
                tuple(self.removes),
            ),
            self.driver,
        )


def _frontendState(view: DeviceView) -> S:
    # xenbus_read_driver_state(): Unknown when the node is gone (or garbage).
    return view.otherendState if view.otherendState is not None else S.Unknown


def adoptBackend(view: DeviceView) -> BackendDriver:
    """
    The memory a restarted simulator gives a backend device it finds at
    start: bound in the state its node shows, if that is a state a bound
    driver publishes; unbound otherwise (Initialising: to be probed;
    Closed with C{online=0}: unregistered).
    """
    state = view.state
    online = view.get("online") == "1"
    if state in (None, S.Unknown, S.Initialising) or (state is S.Closed and not online):
        return BackendDriver()
    assert state is not None
    fe = _frontendState(view)
    connected = view.get("hotplug-status") == "connected"
    return BackendDriver(
        bound=True,
        state=state,
        rings=state is S.Connected or fe in (S.Initialised, S.Connected),
        vbd=connected,
        netState=state if state in _NETBACK_STATES else S.InitWait,
    )


_NETBACK_STATES = frozenset({S.InitWait, S.Connected, S.Closing, S.Closed})


def decideBackend(
    view: DeviceView, driver: BackendDriver
) -> tuple[Transition | None, BackendDriver]:
    """
    The simulated backend's state machine: what the driver does now about
    what C{view} shows, given what it remembers (C{driver}); returns the
    transition (C{None}: nothing to write) and the driver's memory after
    it. Pure, apart from looking up the image size when connecting a vbd.

    The kernel's callbacks, each modelled after Linux 6.1:

      - not bound: C{xenbus_dev_changed}/C{xenbus_probe_node} and the
        driver's C{probe} (L{_probe});
      - bound: C{frontend_changed} when the frontend's state differs from
        the one last handed to it (and once right after probing: a watch
        fires when registered), then the hotplug watch (blkback's
        C{backend_changed}, netback's C{hotplug_status_changed});
      - C{device_unregister} (C{xenbus_dev_remove}) where the driver calls it.
    """
    effects = _Effects(view, driver)
    if not driver.bound:
        _probe(effects)
        return effects.result()
    if view.devclass == "vif":
        _netbackStep(effects)
    else:
        _blkbackStep(effects)
    return effects.result()


def _probe(e: _Effects) -> None:
    view = e.view
    # xenbus_probe_node(): only a device whose node says Initialising is
    # new; xenbus_read_otherend_details(): frontend-id and an existing
    # frontend directory. Otherwise nothing, silently (see the module
    # docstring).
    if view.state is not S.Initialising:
        return
    if view.otherendPath is None or not view.otherendExists or not view.get("frontend-id"):
        return
    e.writes.update(BACKEND_FEATURES.get(view.devclass, {}))
    e.driver = BackendDriver(bound=True)
    if view.devclass == "vif":
        # netback_probe(): features; its state stays Initialising until
        # frontend_changed() (the other-end watch fires when registered).
        e.note("probed (frontend exists): features published")
    else:
        # xen_blkbk_probe(): features, then InitWait.
        e.switch(S.InitWait, "probed (frontend exists): features published")


# blkback (drivers/block/xen-blkback/xenbus.c)


def _blkbackStep(e: _Effects) -> None:
    fe = _frontendState(e.view)
    if fe is not e.driver.frontendSeen:
        e.driver = attrs.evolve(e.driver, frontendSeen=fe)
        _blkbackFrontendChanged(e, fe)
        if not e.driver.bound:
            return
    # backend_changed(): the hotplug script is done (the physical device is
    # known); the vbd is opened once.
    if not e.driver.vbd and e.view.get("hotplug-status") == "connected":
        e.driver = attrs.evolve(e.driver, vbd=True)
        e.note("hotplug-status=connected: vbd opened")
        _blkbackUpdateStatus(e)


def _blkbackFrontendChanged(e: _Effects, fe: S) -> None:
    """blkback's C{frontend_changed()}, case by case."""
    driver = e.driver
    if fe is S.Initialising:
        if driver.state is S.Closed:
            e.switch(S.InitWait, "frontend Initialising: prepare for reconnect")
    elif fe in (S.Initialised, S.Connected):
        if driver.state is S.Connected:
            return
        e.driver = attrs.evolve(driver, rings=True)
        e.note(f"frontend {fe.name}: rings mapped")
        _blkbackUpdateStatus(e)
    elif fe is S.Closing:
        e.switch(S.Closing, "frontend Closing")
    elif fe is S.Closed:
        e.driver = attrs.evolve(driver, rings=False)
        e.switch(S.Closed, "frontend Closed")
        if e.view.get("online") == "1":
            return
        _unregister(e, "frontend Closed, online=0")
    elif fe is S.Unknown:
        _unregister(e, "frontend gone")
    else:
        e.fatal(22, f"saw state {int(fe)} at frontend")


def _blkbackUpdateStatus(e: _Effects) -> None:
    """blkback's C{xen_update_blkif_status()}: connect once rings and vbd are ready."""
    driver = e.driver
    if not (driver.rings and driver.vbd) or driver.state is S.Connected:
        return
    view = e.view
    e.writes.update(_connectWrites(view))
    if view.devclass == "vbd" and not view.get("dev"):
        # Linux's blkback connects, then fails to name its I/O threads
        # after "dev": no request is ever served, and all it says is an
        # error node (xenbus_dev_error).
        e.switch(S.Connected, "connected WITHOUT I/O: no dev key (get blkback dev name)")
        e.elsewhere[_errorNode(view.path)] = "2 get blkback dev name"
    else:
        e.switch(S.Connected, "rings mapped and vbd opened: connected")


# netback (drivers/net/xen-netback/xenbus.c)


def _netbackStep(e: _Effects) -> None:
    if e.driver.pending:
        _netbackHop(e)
        return
    fe = _frontendState(e.view)
    if fe is not e.driver.frontendSeen:
        e.driver = attrs.evolve(e.driver, frontendSeen=fe)
        _netbackFrontendChanged(e, fe)
        if e.driver.pending:
            _netbackHop(e)
        return
    # hotplug_status_changed(): the deferred switch happens once the script
    # reports connected.
    if e.driver.deferred and e.view.get("hotplug-status") == "connected":
        e.driver = attrs.evolve(e.driver, deferred=False)
        e.switch(e.driver.netState, "hotplug-status=connected")


def _netbackFrontendChanged(e: _Effects, fe: S) -> None:
    """netback's C{frontend_changed()}, case by case."""
    target: S | None = None
    unregister = False
    if fe is S.Initialising:
        target = S.InitWait
    elif fe is S.Initialised:
        return
    elif fe is S.Connected:
        target = S.Connected
    elif fe is S.Reconfiguring:
        e.switch(S.Reconfigured, "frontend Reconfiguring")
        return
    elif fe is S.Closing:
        target = S.Closing
    elif fe is S.Closed:
        target = S.Closed
        unregister = e.view.get("online") != "1"
    elif fe is S.Unknown:
        target, unregister = S.Closed, True
    else:
        e.fatal(22, f"saw state {int(fe)} at frontend")
        return
    pending: tuple[S | None, ...] = netbackPath(e.driver.netState, target)
    if unregister:
        pending += (None,)
    e.driver = attrs.evolve(e.driver, pending=pending)
    e.note(f"frontend {fe.name}: set_backend_state({target.name})")


def _netbackHop(e: _Effects) -> None:
    """One hop of C{set_backend_state} (C{backend_switch_state}), or the unregistration."""
    hop, rest = e.driver.pending[0], e.driver.pending[1:]
    e.driver = attrs.evolve(e.driver, pending=rest)
    if hop is None:
        _unregister(e, "frontend Closed, online=0, or gone")
        return
    if hop is S.Connected:
        # backend_connect() -> connect(): the hotplug-status watch is
        # (re)registered, so the switch waits for "connected".
        e.driver = attrs.evolve(e.driver, deferred=True)
    e.driver = attrs.evolve(e.driver, netState=hop)
    if e.driver.deferred:
        e.note(f"backend_switch_state({hop.name}) deferred until hotplug-status=connected")
    else:
        e.switch(hop, "set_backend_state")


def _unregister(e: _Effects, why: str) -> None:
    """
    C{device_unregister()}: the driver's C{remove}, then C{xenbus_dev_remove}.
    blkback allows rebinding, so it switches to Closed only if the node
    says Closing (a toolstack forcing the removal); netback does not, so it
    always switches to Closed (a no-op when it is Closed already), and
    its C{netback_remove} removes C{hotplug-status}.
    """
    e.note(f"device_unregister ({why})")
    if e.view.devclass == "vif":
        e.driver = attrs.evolve(e.driver, deferred=False)
        e.removes.append("hotplug-status")
        e.switch(S.Closed, "xenbus_dev_remove")
    elif e.storeState() is S.Closing:
        e.switch(S.Closed, "xenbus_dev_remove (the toolstack asked to close)")
    e.driver = BackendDriver()


def _errorNode(path: str) -> str:
    """Where Linux's C{xenbus_dev_error} reports on a backend device."""
    return parseBackendPath(path).errorPath


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
    triggerKeys = frozenset({"hotplug-status"})

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

    def freshMemory(self, view: DeviceView, adopt: bool) -> BackendDriver:
        """
        Unbound, unless found at start (see L{adoptBackend}): a restarted
        simulator carries on with the devices it finds bound.
        """
        return adoptBackend(view) if adopt else BackendDriver()

    def decideStep(
        self, view: DeviceView, memory: BackendDriver
    ) -> tuple[Transition | None, BackendDriver]:
        """See L{decideBackend}."""
        return decideBackend(view, memory)

    def reactsTo(self, memory: BackendDriver | None, key: Sequence[str]) -> bool:
        """
        A device no driver is bound to is probed again on any change in its
        directory, as Linux's backend bus does (C{xenbus_dev_changed}); a
        bound one reacts to its directory coming or going and to
        C{hotplug-status} (blkback's C{physical-device} watch, netback's
        C{hotplug-status} watch), never to its own C{state} or C{online}:
        the driver reads those only when the frontend's state changes.
        """
        if memory is None or not memory.bound:
            return True
        return not key or list(key) == ["hotplug-status"]

    def watchesOtherend(self, memory: BackendDriver | None) -> bool:
        """Only a bound device watches its frontend (Linux sets the watch at probe)."""
        return memory is not None and memory.bound
