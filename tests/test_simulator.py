"""
Tests for L{xenddev.simulator}: the SIMULATED kernel backend and guest
frontend, against the real C xenstored (Xen 4.17, under the test shim),
plus the pure state-machine functions.

The test connection C{self.tool} plays the toolstack and the hotplug
script; each simulator has its own connection, as it would in a driver
domain or a guest. Tests never sleep: they wait for states with
L{waitForState} (bounded by a timeout) and, to assert that nothing more
happens, L{settleSimulators}, which returns once every simulator has
reacted to every change made so far.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from tests.support.realxenstored import RealXenstored, requireRealXenstored
from xenddev.interfaces import ITransaction, IXenbusSimulator
from xenddev.simulator import (
    BACKEND_FEATURES,
    FRONTEND_RINGS,
    BackendSimulator,
    DeviceView,
    FrontendSimulator,
    SimulatedDeviceNotFound,
    SimulatedHost,
    Transition,
    XenbusEndSimulator,
    decideBackend,
    decideFrontend,
    settleSimulators,
)
from xenddev.simulator.backend import BackendDriver, adoptBackend, netbackPath
from xenddev.xenbus import XenbusState, backendPath, frontendPath, waitForState
from xenddev.xenstore.client import XenStoreClient
from xenddev.xenstore.connection import connectXenStore
from xenddev.xenstore.paths import joinPath

S = XenbusState
VBD = 51712  # xvda
WAIT = 10.0  # seconds; only reached if a test is about to fail
ERROR_NODE = "/local/domain/0/error/backend/vbd/5/51712/error"


def view(
    devclass: str = "vbd",
    state: S | None = S.Initialising,
    other: S | None = None,
    seen: bool = False,
    exists: bool | None = None,
    **values: str,
) -> DeviceView:
    """
    A L{DeviceView} for the pure state-machine tests; the other end exists
    if it has a state (unless C{exists} says otherwise).
    """
    vals: dict[str, str | None] = {k.replace("_", "-"): v for k, v in values.items()}
    if state is not None:
        vals["state"] = str(int(state))
    return DeviceView(
        path="/x",
        devclass=devclass,
        values=vals,
        state=state,
        otherendPath="/y" if other is not None or seen else None,
        otherendState=other,
        otherendSeen=seen,
        otherendExists=other is not None if exists is None else exists,
    )


def driveBackend(
    v: DeviceView, driver: BackendDriver | None = None
) -> tuple[list[S | None], BackendDriver, list[Transition]]:
    """
    Run L{decideBackend} on C{v} step after step, as the engine does (the
    store updated with what each step writes), until it rests; return the
    states written (in order), the driver's memory, and the transitions.
    """
    memory = driver if driver is not None else BackendDriver()
    written: list[S | None] = []
    transitions: list[Transition] = []
    for _ in range(20):
        t, after = decideBackend(v, memory)
        if t is None and after == memory:
            return written, memory, transitions
        if t is not None:
            transitions.append(t)
            values = {k: v2 for k, v2 in v.values.items() if k not in t.removes}
            values.update(t.writes)
            if t.state is not None:
                written.append(t.state)
                values["state"] = str(int(t.state))
            v = attrs.evolve(v, values=values, state=S.parse(values.get("state")))
        memory = after
    raise AssertionError("decideBackend never rests")


def bound(devclass: str, state: S, **kw: Any) -> BackendDriver:
    """A driver bound to a device, in C{state}, its frontend state handed over already."""
    net = {"netState": state} if devclass == "vif" else {}
    return BackendDriver(bound=True, state=state, **{**net, **kw})


class DecideBackendTests(SynchronousTestCase):
    """
    L{decideBackend}, the simulated backend's rules, without a store; each
    test names the Linux 6.1 function whose behaviour it checks.
    """

    def test_probe(self) -> None:
        """
        xenbus_probe_node + xen_blkbk_probe: a device whose node says
        Initialising, with frontend-id set and an existing frontend, is
        bound: blkback publishes its features and goes to InitWait,
        whatever C{online} says; netback_probe publishes its features and
        stays Initialising until frontend_changed (its watch fires at once)
        takes it to InitWait.
        """
        for online in ("1", "0"):
            t, driver = decideBackend(
                view("vbd", S.Initialising, S.Initialising, frontend_id="5", online=online),
                BackendDriver(),
            )
            assert t is not None
            self.assertEqual((t.state, dict(t.writes)), (S.InitWait, dict(BACKEND_FEATURES["vbd"])))
            self.assertEqual((driver.bound, driver.state), (True, S.InitWait))
        # A frontend directory without a state yet exists all the same.
        t, driver = decideBackend(
            view("vbd", S.Initialising, None, True, True, frontend_id="5"), BackendDriver()
        )
        self.assertTrue(driver.bound)
        t, driver = decideBackend(
            view("vif", S.Initialising, S.Initialising, frontend_id="5"), BackendDriver()
        )
        assert t is not None
        self.assertEqual((t.state, dict(t.writes)), (None, dict(BACKEND_FEATURES["vif"])))
        self.assertEqual((driver.bound, driver.state), (True, S.Initialising))
        written, driver, _ = driveBackend(
            view("vif", S.Initialising, S.Initialising, frontend_id="5")
        )
        self.assertEqual(written, [S.InitWait])

    def test_noProbe(self) -> None:
        """
        xenbus_probe_node / xenbus_read_otherend_details: no binding while
        the frontend directory does not exist, C{frontend} is unset or
        C{frontend-id} missing, nor when the node does not say Initialising
        (a device going away, or unregistered): nothing is written.
        """
        for v in (
            view("vbd", S.Initialising, None, True, False, frontend_id="5"),
            view("vbd", S.Initialising, None, frontend_id="5"),
            view("vbd", S.Initialising, S.Initialising),
            view("vbd", S.InitWait, S.Initialising, frontend_id="5"),
            view("vbd", S.Closing, S.Connected, frontend_id="5"),
            view("vbd", S.Closed, S.Initialising, frontend_id="5"),
        ):
            self.assertEqual(decideBackend(v, BackendDriver()), (None, BackendDriver()), v)

    def test_switchStateSkipsTheDriversOwnState(self) -> None:
        """
        xenbus_switch_state compares with the driver's own state (dev->state),
        never with the node: a node the toolstack set to Closing (5) is
        left alone when the driver, Connected, sees its frontend Connected
        (no switch), and rewritten with 5 when the frontend's Closing makes
        the driver switch to Closing.
        """
        written, driver, _ = driveBackend(
            view("vbd", S.Closing, S.Connected, online="0"), bound("vbd", S.Connected)
        )
        self.assertEqual((written, driver.state), ([], S.Connected))
        written, driver, _ = driveBackend(
            view("vbd", S.Closing, S.Closing, online="0"), bound("vbd", S.Connected)
        )
        self.assertEqual((written, driver.state), ([S.Closing], S.Closing))

    def test_switchStateNodeGone(self) -> None:
        """
        xenbus_switch_state: no write when the C{state} node is gone (no
        resurrection); the driver's state changes all the same.
        """
        v = view("vbd", None, S.Closing, online="1")
        written, driver, _ = driveBackend(v, bound("vbd", S.Connected))
        self.assertEqual((written, driver.state), ([], S.Closing))

    def test_blkbackConnect(self) -> None:
        """
        blkback frontend_changed (Initialised/Connected: connect_ring) and
        backend_changed (the vbd, here hotplug-status=connected), each
        calling xen_update_blkif_status: Connected once both happened, in
        either order; never with hotplug-status error or busy.
        """
        for fe in (S.Initialised, S.Connected):
            written, driver, _ = driveBackend(
                view("vbd", S.InitWait, fe, hotplug_status="connected", dev="xvda"),
                bound("vbd", S.InitWait),
            )
            self.assertEqual(written, [S.Connected])
            self.assertTrue(driver.rings and driver.vbd)
        for fe in (S.Initialising, S.Unknown):
            written, driver, _ = driveBackend(
                view("vbd", S.InitWait, fe, seen=True, hotplug_status="connected"),
                bound("vbd", S.InitWait),
            )
            self.assertNotIn(S.Connected, written)
        for status in ("error", "busy", ""):
            written, _, _ = driveBackend(
                view("vbd", S.InitWait, S.Initialised, hotplug_status=status),
                bound("vbd", S.InitWait),
            )
            self.assertEqual(written, [])
        # Rings first, the vbd later.
        _, driver, _ = driveBackend(
            view("vbd", S.InitWait, S.Initialised, dev="xvda"), bound("vbd", S.InitWait)
        )
        self.assertEqual((driver.rings, driver.vbd, driver.state), (True, False, S.InitWait))
        written, driver, _ = driveBackend(
            view("vbd", S.InitWait, S.Initialised, hotplug_status="connected", dev="xvda"), driver
        )
        self.assertEqual(written, [S.Connected])

    def test_vbdWithoutDevServesNothing(self) -> None:
        """
        xen_update_blkif_status: a vbd backend without C{dev} connects but
        leaves blkback's error node ("get blkback dev name"); with C{dev},
        none.
        """
        v = attrs.evolve(
            view("vbd", S.InitWait, S.Initialised, hotplug_status="connected"),
            path="/local/domain/0/backend/vbd/5/51712",
        )
        written, _, transitions = driveBackend(v, bound("vbd", S.InitWait))
        self.assertEqual(written, [S.Connected])
        self.assertEqual(
            dict(transitions[-1].elsewhere),
            {"/local/domain/0/error/backend/vbd/5/51712/error": "2 get blkback dev name"},
        )
        _, _, transitions = driveBackend(
            view("vbd", S.InitWait, S.Initialised, hotplug_status="connected", dev="xvda"),
            bound("vbd", S.InitWait),
        )
        self.assertEqual([dict(t.elsewhere) for t in transitions], [{}])

    def test_vbdConnectKeys(self) -> None:
        """connect(): a read-only vbd gets info=4; sectors are 0 without an image."""
        _, _, transitions = driveBackend(
            view(
                "vbd",
                S.InitWait,
                S.Initialised,
                hotplug_status="connected",
                mode="r",
                params="/nonexistent",
                dev="xvda",
            ),
            bound("vbd", S.InitWait),
        )
        self.assertEqual(
            dict(transitions[-1].writes),
            {"sectors": "0", "sector-size": "512", "physical-sector-size": "512", "info": "4"},
        )

    def test_blkbackFrontendClosing(self) -> None:
        """
        blkback frontend_changed, XenbusStateClosing: the driver switches to
        Closing, not Closed, whatever C{online} says.
        """
        for online in ("0", "1"):
            written, driver, _ = driveBackend(
                view("vbd", S.Connected, S.Closing, online=online), bound("vbd", S.Connected)
            )
            self.assertEqual((written, driver.bound), ([S.Closing], True))

    def test_blkbackFrontendClosed(self) -> None:
        """
        blkback frontend_changed, XenbusStateClosed: disconnect and switch to
        Closed; with C{online=1} the device stays bound (and a frontend
        Initialising again makes it InitWait: "prepare for reconnect");
        with C{online=0} (xenbus_dev_is_online false) it is unregistered.
        """
        written, driver, _ = driveBackend(
            view("vbd", S.Closing, S.Closed, online="1"), bound("vbd", S.Closing, rings=True)
        )
        self.assertEqual((written, driver.bound, driver.rings), ([S.Closed], True, False))
        written, driver, _ = driveBackend(view("vbd", S.Closed, S.Initialising, online="1"), driver)
        self.assertEqual((written, driver.state), ([S.InitWait], S.InitWait))
        written, driver, _ = driveBackend(
            view("vbd", S.Closing, S.Closed, online="0"), bound("vbd", S.Connected)
        )
        self.assertEqual((written, driver), ([S.Closed], BackendDriver()))

    def test_blkbackFrontendGone(self) -> None:
        """
        blkback frontend_changed, XenbusStateUnknown (the frontend's node is
        gone): device_unregister, without a switch of its own; then
        xenbus_dev_remove writes Closed only because the node says Closing
        (blkback allows rebinding): a toolstack's C{state=5} gets its
        Closed, a Connected node stays Connected.
        """
        for seen in (S.Connected, S.Closing, S.Closed):
            written, driver, _ = driveBackend(
                view("vbd", S.Connected, None, seen=True, online="1"),
                bound("vbd", S.Connected, frontendSeen=seen),
            )
            self.assertEqual((written, driver), ([], BackendDriver()))
        written, driver, _ = driveBackend(
            view("vbd", S.Closing, None, seen=True, online="0"), bound("vbd", S.Connected)
        )
        self.assertEqual((written, driver), ([S.Closed], BackendDriver()))
        # Closed already (dev->state): xenbus_switch_state writes nothing.
        written, _, _ = driveBackend(
            view("vbd", S.Closing, None, seen=True, online="1"), bound("vbd", S.Closed)
        )
        self.assertEqual(written, [])

    def test_blkbackFrontendOddState(self) -> None:
        """
        blkback frontend_changed, default case: xenbus_dev_fatal ("saw state
        N at frontend"): the error node, then Closing.
        """
        for fe in (S.InitWait, S.Reconfiguring, S.Reconfigured):
            v = attrs.evolve(
                view("vbd", S.Connected, fe), path="/local/domain/0/backend/vbd/5/51712"
            )
            written, _, transitions = driveBackend(v, bound("vbd", S.Connected))
            self.assertEqual(written, [S.Closing])
            self.assertEqual(
                dict(transitions[0].elsewhere),
                {ERROR_NODE: f"22 saw state {int(fe)} at frontend"},
            )

    def test_netbackPath(self) -> None:
        """set_backend_state: the shortest path of netback's state diagram."""
        self.assertEqual(netbackPath(S.Initialising, S.Connected), (S.InitWait, S.Connected))
        self.assertEqual(netbackPath(S.Initialising, S.Closed), (S.Closed,))
        self.assertEqual(netbackPath(S.Connected, S.Closed), (S.Closing, S.Closed))
        self.assertEqual(netbackPath(S.Connected, S.InitWait), (S.Closing, S.Closed, S.InitWait))
        self.assertEqual(netbackPath(S.Closed, S.Connected), (S.InitWait, S.Connected))
        self.assertEqual(netbackPath(S.InitWait, S.Closed), (S.Closing, S.Closed))
        self.assertEqual(netbackPath(S.Closing, S.Closing), ())

    def test_netbackConnect(self) -> None:
        """
        netback frontend_changed: Initialised is ignored; Connected connects,
        the switch deferred (have_hotplug_status_watch) until
        hotplug_status_changed sees C{connected}.
        """
        written, driver, _ = driveBackend(
            view("vif", S.InitWait, S.Initialised, hotplug_status="connected"),
            bound("vif", S.InitWait),
        )
        self.assertEqual((written, driver.state), ([], S.InitWait))
        written, driver, _ = driveBackend(view("vif", S.InitWait, S.Connected), driver)
        self.assertEqual((written, driver.netState, driver.deferred), ([], S.Connected, True))
        written, driver, _ = driveBackend(
            view("vif", S.InitWait, S.Connected, hotplug_status="connected"), driver
        )
        self.assertEqual(
            (written, driver.state, driver.deferred), ([S.Connected], S.Connected, False)
        )

    def test_netbackFrontendClosing(self) -> None:
        """netback frontend_changed, XenbusStateClosing: set_backend_state(Closing)."""
        written, driver, _ = driveBackend(
            view("vif", S.Connected, S.Closing, online="0"), bound("vif", S.Connected)
        )
        self.assertEqual((written, driver.bound), ([S.Closing], True))

    def test_netbackFrontendClosedOrGone(self) -> None:
        """
        netback frontend_changed, XenbusStateClosed: set_backend_state(Closed)
        through Closing, each state written; with C{online=0}, or for
        XenbusStateUnknown, device_unregister too: netback_remove removes
        C{hotplug-status}.
        """
        written, driver, _ = driveBackend(
            view("vif", S.Connected, S.Closed, online="1", hotplug_status="connected"),
            bound("vif", S.Connected),
        )
        self.assertEqual((written, driver.bound), ([S.Closing, S.Closed], True))
        for v in (
            view("vif", S.Connected, S.Closed, online="0", hotplug_status="connected"),
            view("vif", S.Connected, None, seen=True, online="1", hotplug_status="connected"),
        ):
            written, driver, transitions = driveBackend(v, bound("vif", S.Connected))
            self.assertEqual((written, driver), ([S.Closing, S.Closed], BackendDriver()))
            self.assertEqual(transitions[-1].removes, ("hotplug-status",))

    def test_netbackDeferredThenGone(self) -> None:
        """
        backend_switch_state while a hotplug script is awaited writes
        nothing; xenbus_dev_remove (netback does not allow rebinding) then
        writes Closed.
        """
        driver = bound("vif", S.InitWait, netState=S.Connected, deferred=True)
        written, driver, _ = driveBackend(view("vif", S.InitWait, None, seen=True), driver)
        self.assertEqual((written, driver), ([S.Closed], BackendDriver()))

    def test_adopt(self) -> None:
        """
        A restarted simulator adopts a device bound in the state its node
        shows; Initialising, or Closed with C{online=0}, stays unbound.
        """
        driver = adoptBackend(view("vbd", S.InitWait, S.Initialised, hotplug_status="connected"))
        self.assertEqual(
            (driver.bound, driver.state, driver.rings, driver.vbd), (True, S.InitWait, True, True)
        )
        self.assertFalse(adoptBackend(view("vbd", S.Initialising, S.Initialising)).bound)
        self.assertFalse(adoptBackend(view("vbd", S.Closed, S.Closed, online="0")).bound)
        self.assertTrue(adoptBackend(view("vbd", S.Closed, S.Closed, online="1")).bound)


class DecideFrontendTests(SynchronousTestCase):
    """L{decideFrontend}, the simulated frontend's rules, without a store."""

    def assertGoes(self, v: DeviceView, state: S | None, refuse: bool = False) -> Transition | None:
        """C{v} leads to C{state} (None: no transition)."""
        t = decideFrontend(v, refuse)
        self.assertEqual(t.state if t is not None else None, state)
        return t

    def test_handshake(self) -> None:
        """Rings when the backend waits or is connected; Connected after the backend."""
        t = self.assertGoes(view("vbd", S.Initialising, S.InitWait), S.Initialised)
        assert t is not None
        self.assertEqual(
            dict(t.writes), {"ring-ref": "8", "event-channel": "9", "protocol": "x86_64-abi"}
        )
        t = self.assertGoes(
            view("vbd", S.Initialising, S.Connected, protocol="x86_32-abi"), S.Initialised
        )
        assert t is not None
        self.assertNotIn("protocol", t.writes)
        # netfront: straight to Connected on the backend's InitWait
        # (netback_changed); nothing on the backend's Connected.
        t = self.assertGoes(view("vif", S.Initialising, S.InitWait), S.Connected)
        assert t is not None
        self.assertEqual(dict(t.writes), dict(FRONTEND_RINGS["vif"]))
        self.assertGoes(view("vif", S.Initialising, S.Connected), None)
        self.assertGoes(view("vbd", S.Initialising, S.Initialising), None)
        self.assertGoes(view("vbd", S.Initialising, None), None)
        self.assertGoes(view("vbd", S.Initialised, S.InitWait), None)
        self.assertGoes(view("vbd", S.Initialised, S.Connected), S.Connected)

    def test_closing(self) -> None:
        """A closing backend makes the frontend close, in two steps, unless it refuses."""
        for be in (S.Closing, S.Closed):
            self.assertGoes(view("vbd", S.Connected, be), S.Closing)
            self.assertGoes(view("vbd", S.Connected, be), None, refuse=True)
            self.assertGoes(view("vbd", S.Closing, be), S.Closed)
            self.assertGoes(view("vbd", S.Closing, be), S.Closed, refuse=True)
        self.assertGoes(view("vbd", S.Closing, S.Connected), None)
        self.assertGoes(view("vbd", S.Connected, None), S.Closing)
        self.assertGoes(view("vbd", S.Initialising, None, seen=True), S.Closing)
        self.assertGoes(view("vbd", S.Closed, S.Closed), None)


class SimulatorTestBase(TestCase):
    """
    A real xenstored per test, a toolstack connection C{self.tool}, and
    helpers to attach and detach devices the way the toolstack does.
    """

    def setUp(self) -> Deferred[None]:  # type: ignore[override]
        self.socketPath = self.startStore()
        self.sims: list[XenbusEndSimulator] = []
        return Deferred.fromCoroutine(self._setUp())

    def startStore(self) -> str:
        """Start the C xenstored for this test; return its socket path."""
        requireRealXenstored(self)
        workdir = os.path.abspath(self.mktemp())
        # Domains 0-31 exist for the fake hypervisor.
        self.xenstored = RealXenstored(workdir, domains=range(32))
        self.xenstored.start()
        self.addCleanup(self.xenstored.stop)
        return self.xenstored.socketPath

    async def _setUp(self) -> None:
        self.tool = await self.connect()

    async def connect(self) -> XenStoreClient:
        """A new connection, closed at cleanup."""
        xs = await connectXenStore(reactor, "unix:" + self.socketPath)
        self.addCleanup(xs.disconnect)
        return xs

    async def backend(self, domid: int = 0, **kw: Any) -> BackendSimulator:
        """A started backend simulator on its own connection, stopped at cleanup."""
        sim = BackendSimulator(await self.connect(), domid, **kw)
        return await self.started(sim)

    async def frontend(self, domid: int = 5, **kw: Any) -> FrontendSimulator:
        """A started frontend simulator on its own connection, stopped at cleanup."""
        sim = FrontendSimulator(await self.connect(), domid, **kw)
        return await self.started(sim)

    async def started(self, sim: Any) -> Any:
        """Start C{sim}; stop it at cleanup (after which it must leave no watch)."""
        verifyObject(IXenbusSimulator, sim)
        await sim.start()
        self.sims.append(sim)

        async def stop() -> None:
            await sim.stop()
            self.assertEqual(watches(sim), 0)

        self.addCleanup(lambda: Deferred.fromCoroutine(stop()))
        return sim

    async def settle(self) -> None:
        """Wait until every running simulator has reacted to everything."""
        await settleSimulators(*[s for s in self.sims if s.running])

    async def attach(
        self,
        devclass: str = "vbd",
        domu: int = 5,
        devid: int = VBD,
        backdom: int = 0,
        back: dict[str, str] | None = None,
        front: dict[str, str] | None = None,
    ) -> tuple[str, str]:
        """
        Write both ends in state Initialising in one transaction, as xend and
        libxl do; return (backend path, frontend path).
        """
        be = backendPath(backdom, devclass, domu, devid)
        fe = frontendPath(domu, devclass, devid)
        backend = {"frontend": fe, "frontend-id": str(domu), "online": "1", "state": "1"}
        if devclass == "vbd":
            backend["dev"] = "xvda"  # blkback needs it to serve I/O
        backend.update(back or {})
        frontend = {"backend": be, "backend-id": str(backdom), "state": "1"}
        frontend.update(front or {})

        async def write(tx: ITransaction) -> None:
            for key, value in backend.items():
                await tx.write(joinPath(be, key), value)
            for key, value in frontend.items():
                await tx.write(joinPath(fe, key), value)

        await self.tool.transact(write)  # type: ignore[arg-type]
        return be, fe

    async def detach(self, be: str) -> None:
        """The toolstack's detach: online=0 and state=5 in one transaction."""

        async def write(tx: ITransaction) -> None:
            await tx.write(joinPath(be, "online"), "0")
            await tx.write(joinPath(be, "state"), "5")

        await self.tool.transact(write)  # type: ignore[arg-type]

    async def remove(self, *paths: str) -> None:
        """Remove directories in one transaction."""

        async def rm(tx: ITransaction) -> None:
            for p in paths:
                await tx.rm(p)

        await self.tool.transact(rm)  # type: ignore[arg-type]

    async def waitState(self, path: str, *states: S) -> S:
        """Wait (bounded) until C{path}'s state is one of C{states}."""
        return await waitForState(self.tool, path, states, timeout=WAIT)

    async def state(self, path: str) -> S | None:
        """The current state of a device directory."""
        return S.parse(await self.tool.readOrNone(joinPath(path, "state")))

    async def tree(self, path: str = "/") -> dict[str, str | None]:
        """Every node below C{path} with its value."""
        result: dict[str, str | None] = {}

        async def walk(p: str) -> None:
            result[p] = await self.tool.readOrNone(p)
            for name in await self.tool.ls(p):
                await walk(joinPath(p, name))

        await walk(path)
        return result

    def recordStates(self, sim: XenbusEndSimulator) -> list[S | None]:
        """
        The states C{sim} writes from now on (C{None}: a transition that
        writes no state), as a list that grows.
        """
        seen: list[S | None] = []
        apply = sim.applyTransition

        async def recording(tx: ITransaction, view: DeviceView, transition: Transition) -> None:
            await apply(tx, view, transition)
            seen.append(transition.state)

        sim.applyTransition = recording  # type: ignore[method-assign]
        return seen

    async def connected(self, devclass: str = "vbd", **kw: Any) -> tuple[str, str]:
        """Attach a device and take it through the handshake to Connected."""
        be, fe = await self.attach(devclass, **kw)
        await self.waitState(be, S.InitWait)
        await self.tool.write(joinPath(be, "hotplug-status"), "connected")
        await self.waitState(be, S.Connected)
        await self.waitState(fe, S.Connected)
        return be, fe


def watches(sim: Any) -> int:
    """Watches registered on C{sim}'s connection (a L{XenStoreClient} here)."""
    xs: XenStoreClient = sim.xs
    return xs.watchCount


def run(f: Callable[..., Awaitable[None]]) -> Callable[..., Deferred[None]]:
    """Let an C{async def} test return a Deferred, as trial wants."""

    def wrapper(self: Any) -> Deferred[None]:
        return Deferred.fromCoroutine(f(self))  # type: ignore[arg-type]

    wrapper.__name__ = f.__name__
    wrapper.__doc__ = f.__doc__
    return wrapper


class HandshakeTests(SimulatorTestBase):
    """Attaching devices: the xenbus handshake."""

    @run
    async def test_vbdHandshake(self) -> None:
        """
        Backend 1→2 with its features; frontend 1→3 with its rings; nothing
        more until hotplug-status=connected; then backend 4 with the image's
        size, frontend 4.
        """
        image = os.path.abspath(self.mktemp())
        with open(image, "wb") as f:
            f.truncate(3 * 1024 * 1024 + 1000)
        await self.backend()
        await self.frontend()
        be, fe = await self.attach(back={"params": image, "mode": "r"})
        self.assertEqual(await self.waitState(be, S.InitWait), S.InitWait)
        for key, value in BACKEND_FEATURES["vbd"].items():
            self.assertEqual(await self.tool.read(joinPath(be, key)), value)
        await self.waitState(fe, S.Initialised)
        self.assertEqual(await self.tool.read(joinPath(fe, "ring-ref")), "8")
        self.assertEqual(await self.tool.read(joinPath(fe, "event-channel")), "9")
        self.assertEqual(await self.tool.read(joinPath(fe, "protocol")), "x86_64-abi")
        await self.settle()
        self.assertEqual(await self.state(be), S.InitWait)  # waits for the script
        await self.tool.write(joinPath(be, "hotplug-status"), "connected")
        await self.waitState(be, S.Connected)
        await self.waitState(fe, S.Connected)
        self.assertEqual(await self.tool.read(joinPath(be, "sectors")), str(6144 + 1))
        self.assertEqual(await self.tool.read(joinPath(be, "sector-size")), "512")
        self.assertEqual(await self.tool.read(joinPath(be, "info")), "4")

    @run
    async def test_vifHandshake(self) -> None:
        """A vif goes through the same handshake with netback's features and netfront's rings."""
        await self.backend()
        await self.frontend()
        be, fe = await self.connected("vif", devid=0)
        for key, value in BACKEND_FEATURES["vif"].items():
            self.assertEqual(await self.tool.read(joinPath(be, key)), value)
        for key, value in FRONTEND_RINGS["vif"].items():
            self.assertEqual(await self.tool.read(joinPath(fe, key)), value)
        self.assertIsNone(await self.tool.readOrNone(joinPath(be, "sectors")))

    @run
    async def test_physicalDevicePathAndWritable(self) -> None:
        """physical-device-path wins over params; a writable disk has info 0."""
        image = os.path.abspath(self.mktemp())
        with open(image, "wb") as f:
            f.truncate(1024 * 1024)
        await self.backend()
        await self.frontend()
        be, _ = await self.connected(
            back={"params": "/nonexistent", "physical-device-path": image, "mode": "w"}
        )
        self.assertEqual(await self.tool.read(joinPath(be, "sectors")), "2048")
        self.assertEqual(await self.tool.read(joinPath(be, "info")), "0")

    @run
    async def test_missingImage(self) -> None:
        """An image that does not exist gives 0 sectors."""
        await self.backend()
        await self.frontend()
        be, _ = await self.connected(back={"params": "/nonexistent/disk.img"})
        self.assertEqual(await self.tool.read(joinPath(be, "sectors")), "0")

    @run
    async def test_hotplugErrorStaysInitWait(self) -> None:
        """With hotplug-status=error (or busy) the backend never connects."""
        await self.backend()
        await self.frontend()
        for devid, status in ((VBD, "error"), (VBD + 16, "busy")):
            be, fe = await self.attach(devid=devid)
            await self.waitState(be, S.InitWait)
            await self.waitState(fe, S.Initialised)
            await self.tool.write(joinPath(be, "hotplug-status"), status)
            await self.settle()
            self.assertEqual(await self.state(be), S.InitWait)
            self.assertEqual(await self.state(fe), S.Initialised)

    @run
    async def test_skippedFrontendStates(self) -> None:
        """A frontend already Connected (no frontend simulator) lets the backend connect."""
        await self.backend()
        be, fe = await self.attach()
        await self.waitState(be, S.InitWait)
        await self.tool.write(joinPath(fe, "state"), "4")
        await self.tool.write(joinPath(be, "hotplug-status"), "connected")
        await self.waitState(be, S.Connected)

    @run
    async def test_skippedBackendStates(self) -> None:
        """A backend already Connected (no backend simulator) takes the frontend 1→3→4."""
        await self.frontend()
        _, fe = await self.attach(back={"state": "4"})
        await self.waitState(fe, S.Connected)
        self.assertEqual(await self.tool.read(joinPath(fe, "ring-ref")), "8")

    @run
    async def test_everythingReadyUpFront(self) -> None:
        """
        hotplug-status and a Connected frontend present before the backend
        simulator starts: the backend goes 1→2→4 by itself (start scans).
        """
        be, _ = await self.attach(front={"state": "4"}, back={"hotplug-status": "connected"})
        await self.backend()
        await self.waitState(be, S.Connected)
        self.assertEqual(await self.tool.read(joinPath(be, "feature-flush-cache")), "1")

    @run
    async def test_backendFirstFrontendLater(self) -> None:
        """
        A backend made complete before its frontend exists is not bound,
        and the frontend's creation does not bind it either (as on real
        Xen: Linux looks at a backend only when its own directory changes);
        the next change in the backend directory does.
        """
        await self.backend()
        await self.frontend()
        be = backendPath(0, "vbd", 5, VBD)
        fe = frontendPath(5, "vbd", VBD)
        for key, value in {"frontend": fe, "frontend-id": "5", "online": "1", "state": "1"}.items():
            await self.tool.write(joinPath(be, key), value)
        await self.settle()
        self.assertEqual(await self.state(be), S.Initialising)
        for key, value in {"backend": be, "state": "1"}.items():
            await self.tool.write(joinPath(fe, key), value)
        await self.settle()
        self.assertEqual(await self.state(be), S.Initialising)
        self.assertEqual(await self.state(fe), S.Initialising)
        # The toolstack's write of <backend>/frontend (docs/protocol.md).
        await self.tool.write(joinPath(be, "frontend"), fe)
        await self.waitState(be, S.InitWait)
        await self.tool.write(joinPath(be, "hotplug-status"), "connected")
        await self.waitState(be, S.Connected)
        await self.waitState(fe, S.Connected)

    @run
    async def test_ignoresOthers(self) -> None:
        """Other classes, other driver domains and malformed entries are left alone."""
        await self.backend(classes=("vbd",))
        await self.frontend(classes=("vbd",))
        await self.attach("vif", devid=0)
        await self.attach(backdom=3, devid=VBD + 16)
        await self.tool.write("/local/domain/0/backend/vbd/5/xvdc/state", "1")
        await self.tool.write("/local/domain/0/backend/vbd/5/xvdc/online", "1")
        await self.tool.write("/local/domain/5/device/vbd/007/state", "1")
        before = await self.tree()
        mine, _ = await self.attach()
        await self.waitState(mine, S.InitWait)
        await self.settle()
        after = await self.tree()
        for path, value in before.items():
            self.assertEqual(after[path], value, path)


class RestartTests(SimulatorTestBase):
    """Simulators restarted mid-handshake carry on from XenStore."""

    @run
    async def test_backendRestart(self) -> None:
        """A new backend simulator connects a device its predecessor left in InitWait."""
        old = await self.backend()
        await self.frontend()
        be, fe = await self.attach()
        await self.waitState(be, S.InitWait)
        await old.stop()
        self.assertEqual(watches(old), 0)
        await self.waitState(fe, S.Initialised)
        await self.tool.write(joinPath(be, "hotplug-status"), "connected")
        await self.settle()
        self.assertEqual(await self.state(be), S.InitWait)  # nobody to connect it
        await self.backend()
        await self.waitState(be, S.Connected)
        await self.waitState(fe, S.Connected)

    @run
    async def test_frontendRestart(self) -> None:
        """A new frontend simulator picks up a device its predecessor never saw connect."""
        await self.backend()
        old = await self.frontend()
        be, fe = await self.attach()
        await self.waitState(fe, S.Initialised)
        await old.stop()
        await self.tool.write(joinPath(be, "hotplug-status"), "connected")
        await self.waitState(be, S.Connected)
        await self.settle()
        self.assertEqual(await self.state(fe), S.Initialised)
        await self.frontend()
        await self.waitState(fe, S.Connected)

    @run
    async def test_restartSameInstance(self) -> None:
        """A stopped simulator can be started again."""
        sim = await self.backend()
        await sim.stop()
        be, _ = await self.attach()
        await sim.start()
        await self.waitState(be, S.InitWait)


class ClosingTests(SimulatorTestBase):
    """Detaching devices."""

    @run
    async def test_detach(self) -> None:
        """online=0 + state=5 in one transaction: frontend closes, backend reaches 6."""
        await self.backend()
        await self.frontend()
        be, fe = await self.connected()
        await self.detach(be)
        await self.waitState(be, S.Closed)
        await self.waitState(fe, S.Closed)

    @run
    async def test_detachWithoutGuestDriver(self) -> None:
        """
        With no guest driver, nothing answers the toolstack's C{state=5}: it
        is a message to the frontend, and the backend driver (still
        InitWait) ignores it. Removing the frontend (the toolstack's
        forced detach) unregisters the device, and xenbus_dev_remove then
        writes Closed because the node says Closing.
        """
        back = await self.backend()
        be, fe = await self.attach()
        await self.waitState(be, S.InitWait)
        await self.detach(be)
        await self.settle()
        self.assertEqual(await self.state(be), S.Closing)
        self.assertEqual(await self.state(fe), S.Initialising)
        await self.remove(fe)
        await self.waitState(be, S.Closed)
        await self.settle()
        self.assertEqual(watches(back), 1)  # unregistered: no frontend watch

    @run
    async def test_guestCloses(self) -> None:
        """close() on the frontend: frontend 5 then 6, backend 6."""
        await self.backend()
        front = await self.frontend()
        be, fe = await self.connected()
        self.assertTrue(await front.close("vbd", VBD))
        await self.waitState(be, S.Closed)
        await self.waitState(fe, S.Closed)
        self.assertFalse(await front.close("vbd", VBD))

    @run
    async def test_closeMissing(self) -> None:
        """close() of a device that does not exist fails and writes nothing."""
        front = await self.frontend()
        before = await self.tree()
        with self.assertRaises(SimulatedDeviceNotFound):
            await front.close("vbd", VBD)
        self.assertEqual(await self.tree(), before)

    @run
    async def test_frontendVanishes(self) -> None:
        """
        blkback frontend_changed, XenbusStateUnknown: a connected vbd whose
        frontend directory is removed is unregistered without a switch of
        its own, and xenbus_dev_remove leaves a node that does not say
        Closing as it is: Connected.
        """
        back = await self.backend()
        await self.frontend()
        be, fe = await self.connected()
        await self.tool.rm(fe)
        await self.settle()
        self.assertEqual(await self.state(be), S.Connected)
        self.assertEqual(watches(back), 1)  # unregistered: no frontend watch
        self.assertFalse(await self.tool.exists(fe))

    @run
    async def test_vifFrontendVanishes(self) -> None:
        """
        netback frontend_changed, XenbusStateUnknown: set_backend_state(Closed)
        through Closing, then device_unregister (netback_remove removes
        C{hotplug-status}).
        """
        back = await self.backend()
        await self.frontend()
        be, fe = await self.connected("vif", devid=0)
        seen = self.recordStates(back)
        await self.tool.rm(fe)
        await self.waitState(be, S.Closed)
        await self.settle()
        # A transaction retried on a conflict applies its transition again.
        states = [state for state in seen if state is not None]
        distinct = [state for i, state in enumerate(states) if i == 0 or states[i - 1] != state]
        self.assertEqual(distinct[-2:], [S.Closing, S.Closed])
        self.assertIsNone(seen[-1])  # device_unregister: no state of its own
        self.assertIsNone(await self.tool.readOrNone(joinPath(be, "hotplug-status")))
        self.assertEqual(watches(back), 1)

    @run
    async def test_blkbackClosingThenClosed(self) -> None:
        """
        blkback frontend_changed, step by step (the test plays the guest):
        the frontend's Closing makes the backend Closing (not Closed); its
        Closed with online=1 makes it Closed and still bound, so the
        frontend Initialising again makes it InitWait ("prepare for
        reconnect"); Closed with online=0 unregisters it.
        """
        back = await self.backend()
        be, fe = await self.attach()
        await self.waitState(be, S.InitWait)
        await self.tool.write(joinPath(fe, "state"), "3")
        await self.tool.write(joinPath(be, "hotplug-status"), "connected")
        await self.waitState(be, S.Connected)
        await self.tool.write(joinPath(fe, "state"), "5")
        await self.waitState(be, S.Closing)
        await self.settle()
        self.assertEqual(await self.state(be), S.Closing)
        await self.tool.write(joinPath(fe, "state"), "6")
        await self.waitState(be, S.Closed)
        await self.tool.write(joinPath(fe, "state"), "1")
        await self.waitState(be, S.InitWait)
        await self.tool.write(joinPath(fe, "state"), "3")
        await self.waitState(be, S.Connected)
        await self.tool.write(joinPath(be, "online"), "0")
        await self.settle()
        self.assertEqual(watches(back), 2)  # online alone is no event for the driver
        await self.tool.write(joinPath(fe, "state"), "6")
        await self.waitState(be, S.Closed)
        await self.settle()
        self.assertEqual(watches(back), 1)  # unregistered
        await self.tool.write(joinPath(fe, "state"), "1")
        await self.settle()
        self.assertEqual(await self.state(be), S.Closed)

    @run
    async def test_netbackStates(self) -> None:
        """
        netback frontend_changed and set_backend_state (the test plays the
        guest): InitWait for an Initialising frontend, nothing for
        Initialised, Connected only for a Connected frontend and once the
        hotplug script said so, Closing, then Closed and unregistered.
        """
        back = await self.backend()
        be, fe = await self.attach("vif", devid=0)
        await self.waitState(be, S.InitWait)
        await self.tool.write(joinPath(fe, "state"), "3")
        await self.tool.write(joinPath(be, "hotplug-status"), "connected")
        await self.settle()
        self.assertEqual(await self.state(be), S.InitWait)
        await self.tool.write(joinPath(be, "hotplug-status"), "")
        await self.tool.write(joinPath(fe, "state"), "4")
        await self.settle()
        self.assertEqual(await self.state(be), S.InitWait)  # deferred
        await self.tool.write(joinPath(be, "hotplug-status"), "connected")
        await self.waitState(be, S.Connected)
        await self.tool.write(joinPath(fe, "state"), "5")
        await self.waitState(be, S.Closing)
        await self.tool.write(joinPath(be, "online"), "0")
        await self.tool.write(joinPath(fe, "state"), "6")
        await self.waitState(be, S.Closed)
        await self.settle()
        self.assertEqual(watches(back), 1)
        self.assertIsNone(await self.tool.readOrNone(joinPath(be, "hotplug-status")))

    @run
    async def test_toolstackStateIsAMessage(self) -> None:
        """
        xenbus_switch_state compares with the driver's own state: a value
        the toolstack writes into a bound backend's node changes nothing in
        the driver. A Connected backend whose node the toolstack set to
        InitWait does not rewrite Connected when its frontend says
        Connected again, and goes to Closing when the frontend closes.
        """
        await self.backend()
        be, fe = await self.attach()
        await self.waitState(be, S.InitWait)
        await self.tool.write(joinPath(fe, "state"), "4")
        await self.tool.write(joinPath(be, "hotplug-status"), "connected")
        await self.waitState(be, S.Connected)
        await self.tool.write(joinPath(be, "state"), "2")
        await self.tool.write(joinPath(fe, "state"), "4")
        await self.settle()
        self.assertEqual(await self.state(be), S.InitWait)
        await self.tool.write(joinPath(fe, "state"), "5")
        await self.waitState(be, S.Closing)

    @run
    async def test_unregisteredUntilInitialising(self) -> None:
        """
        xenbus_dev_changed/xenbus_probe_node: an unregistered device is
        probed again only when its node says Initialising.
        """
        await self.backend()
        be, fe = await self.attach()
        await self.waitState(be, S.InitWait)
        await self.tool.write(joinPath(fe, "state"), "3")
        await self.tool.write(joinPath(be, "hotplug-status"), "connected")
        await self.waitState(be, S.Connected)
        await self.detach(be)
        await self.tool.write(joinPath(fe, "state"), "6")
        await self.waitState(be, S.Closed)
        await self.tool.write(joinPath(fe, "state"), "1")
        await self.tool.write(joinPath(be, "online"), "1")
        await self.tool.write(joinPath(fe, "state"), "3")
        await self.settle()
        self.assertEqual(await self.state(be), S.Closed)
        await self.tool.write(joinPath(be, "state"), "1")
        await self.waitState(be, S.Connected)

    @run
    async def test_backendVanishes(self) -> None:
        """A connected frontend whose backend directory is removed closes."""
        await self.backend()
        await self.frontend()
        be, fe = await self.connected()
        await self.tool.rm(be)
        await self.waitState(fe, S.Closed)
        self.assertFalse(await self.tool.exists(be))

    @run
    async def test_refuseToClose(self) -> None:
        """
        A guest that never closes keeps the backend in Closing; the forced
        removal (frontend, then backend) leaves nothing behind.
        """
        await self.tool.mkdir("/local/domain/0/backend/vbd/5")
        await self.tool.mkdir("/local/domain/5/device/vbd")
        before = await self.tree()
        await self.backend()
        await self.frontend(refuseToClose=True)
        be, fe = await self.connected()
        await self.detach(be)
        await self.settle()
        self.assertEqual(await self.state(be), S.Closing)
        self.assertEqual(await self.state(fe), S.Connected)
        await self.remove(fe)
        await self.waitState(be, S.Closed)  # the frontend is gone now
        await self.remove(be)
        await self.settle()
        self.assertEqual(await self.tree(), before)
        for sim in self.sims:
            self.assertEqual(sim.devicePaths, [])
            self.assertEqual(watches(sim), 1)  # the tree watch only


class RacingBackend(BackendSimulator):
    """
    A backend simulator that, just before writing its first transition,
    lets the toolstack remove the device (committed on another connection,
    while the simulator's transaction is open).
    """

    remover: Callable[[str], Awaitable[None]]
    raced = 0

    async def applyTransition(
        self, tx: ITransaction, view: DeviceView, transition: Transition
    ) -> None:
        """Remove the device, then write as usual."""
        if not self.raced:
            self.raced += 1
            await self.remover(view.path)
        await super().applyTransition(tx, view, transition)


class RacingFrontend(FrontendSimulator):
    """The frontend counterpart of L{RacingBackend}."""

    remover: Callable[[str], Awaitable[None]]
    raced = 0

    async def applyTransition(
        self, tx: ITransaction, view: DeviceView, transition: Transition
    ) -> None:
        """Remove the device, then write as usual."""
        if not self.raced:
            self.raced += 1
            await self.remover(view.path)
        await super().applyTransition(tx, view, transition)


class NoResurrectionTests(SimulatorTestBase):
    """Removing device directories while the simulators react leaves nothing behind."""

    async def parents(self) -> dict[str, str | None]:
        """Create the parent directories the toolstack keeps; snapshot the tree."""
        for p in ("/local/domain/0/backend/vbd/5", "/local/domain/5/device/vbd"):
            await self.tool.mkdir(p)
        return await self.tree()

    @run
    async def test_backendRace(self) -> None:
        """The device removed inside the backend's transaction is not re-created."""
        before = await self.parents()
        sim = RacingBackend(await self.connect(), 0)
        be = backendPath(0, "vbd", 5, VBD)
        fe = frontendPath(5, "vbd", VBD)
        sim.remover = lambda path: self.remove(be, fe)
        await self.started(sim)
        await self.attach()
        await self.settle()
        self.assertEqual(sim.raced, 1)
        self.assertEqual(await self.tree(), before)
        self.assertEqual(sim.devicePaths, [])

    @run
    async def test_frontendRace(self) -> None:
        """The device removed inside the frontend's transaction is not re-created."""
        before = await self.parents()
        sim = RacingFrontend(await self.connect(), 5)
        be = backendPath(0, "vbd", 5, VBD)
        fe = frontendPath(5, "vbd", VBD)
        sim.remover = lambda path: self.remove(fe, be)
        await self.started(sim)
        await self.attach(back={"state": "2"})
        await self.settle()
        self.assertEqual(sim.raced, 1)
        self.assertEqual(await self.tree(), before)

    @run
    async def test_manyRemovals(self) -> None:
        """
        Devices removed at every point of the handshake (right after being
        written, after each wait) leave the tree exactly as it was.
        """
        before = await self.parents()
        await self.backend()
        await self.frontend()
        pending = []
        for i in range(12):
            devid = VBD + 16 * i
            be, fe = await self.attach(devid=devid)
            if i % 4 >= 1:
                await self.waitState(be, S.InitWait)
            if i % 4 >= 2:
                await self.tool.write(joinPath(be, "hotplug-status"), "connected")
            if i % 4 == 3:
                await self.waitState(fe, S.Connected)
            pending.append((be, fe))
            if i % 2:
                await self.remove(be, fe)
            else:
                await self.remove(fe)
                await self.remove(be)
        await self.settle()
        self.assertEqual(await self.tree(), before)


class LifecycleTests(SimulatorTestBase):
    """Starting, stopping and watching."""

    @run
    async def test_interfaces(self) -> None:
        """Both simulators and the host provide IXenbusSimulator."""
        verifyObject(IXenbusSimulator, BackendSimulator(self.tool))
        verifyObject(IXenbusSimulator, FrontendSimulator(self.tool, 3))
        verifyObject(IXenbusSimulator, SimulatedHost(self.tool, 0, [3]))

    @run
    async def test_oneWatchPlusOnePerDevice(self) -> None:
        """One tree watch, one watch per device on the other end's state; none after stop."""
        back = await self.backend()
        front = await self.frontend()
        self.assertEqual((watches(back), watches(front)), (1, 1))
        devices = [await self.attach(devid=VBD + 16 * i) for i in range(3)]
        await self.settle()
        self.assertEqual((watches(back), watches(front)), (4, 4))
        await self.remove(*[p for pair in devices[:2] for p in pair])
        await self.settle()
        self.assertEqual((watches(back), watches(front)), (2, 2))
        self.assertEqual(back.devicePaths, [devices[2][0]])

    @run
    async def test_stopLeavesNothing(self) -> None:
        """stop() while devices are moving removes every watch and leaves no DelayedCall."""
        await self.tool.exists("/")  # trial's own timeout call is set up by now
        calls = set(reactor.getDelayedCalls())
        back = await self.backend()
        front = await self.frontend()
        for i in range(5):
            be, _ = await self.attach(devid=VBD + 16 * i)
            await self.tool.write(joinPath(be, "hotplug-status"), "connected")
        await back.stop()
        await front.stop()
        await back.stop()  # idempotent
        self.assertEqual((watches(back), watches(front)), (0, 0))
        self.assertFalse(back.running)
        left = [c for c in reactor.getDelayedCalls() if c not in calls and c.active()]
        self.assertEqual(left, [])

    @run
    async def test_stopDuringStart(self) -> None:
        """stop() called before start() has finished leaves no watch."""
        sim = BackendSimulator(await self.connect())
        d = sim.start()
        await sim.stop()
        await d
        self.assertEqual(watches(sim), 0)

    @run
    async def test_startTwice(self) -> None:
        """Starting a running simulator is an error."""
        sim = await self.backend()
        self.assertRaises(RuntimeError, sim.start)

    @run
    async def test_badArguments(self) -> None:
        """Bad domids or classes are refused at construction."""
        self.assertRaises(ValueError, BackendSimulator, self.tool, -1)
        self.assertRaises(ValueError, FrontendSimulator, self.tool, 5, ("a/b",))
        self.assertRaises(ValueError, FrontendSimulator, self.tool, 5, ())

    @run
    async def test_logsThatItSimulates(self) -> None:
        """The start-up log line says that this is a simulation, and why."""
        from twisted.logger import capturedLogs

        with capturedLogs() as events:
            sim = BackendSimulator(await self.connect(), 0)
            await sim.start()
            await sim.stop()
        text = " ".join(str(e.get("banner", "")) for e in events)
        self.assertIn("SIMULATED kernel backend", text)
        self.assertIn("no hypervisor", text)
        self.assertIn("SIMULATED guest frontend", FrontendSimulator(self.tool, 5).banner())

    @run
    async def test_reconnectingStore(self) -> None:
        """The simulators work over a ReconnectingXenStore too, and stop cleanly."""
        from twisted.internet.endpoints import UNIXClientEndpoint

        from xenddev.xenstore.connection import ReconnectingXenStore

        store = ReconnectingXenStore(UNIXClientEndpoint(reactor, self.socketPath), reactor)
        store.start()
        self.addCleanup(store.stop)
        host = SimulatedHost(store, 0, [5])
        await host.start()
        be, fe = await self.attach()
        await self.waitState(be, S.InitWait)
        await self.tool.write(joinPath(be, "hotplug-status"), "connected")
        await self.waitState(fe, S.Connected)
        await host.stop()
        self.assertEqual(store.watchCount, 0)

    @run
    async def test_simulatedHost(self) -> None:
        """SimulatedHost runs a driver domain and two guests together."""
        host = SimulatedHost(await self.connect(), 0, [5])
        await host.start()
        self.addCleanup(host.stop)
        await host.addGuest(6)
        pairs = [await self.attach(domu=d) for d in (5, 6)]
        for be, _ in pairs:
            await self.waitState(be, S.InitWait)
            await self.tool.write(joinPath(be, "hotplug-status"), "connected")
        for _, fe in pairs:
            await self.waitState(fe, S.Connected)
        await host.settle()
        await host.removeGuest(6)
        await host.stop()
        self.assertEqual(watches(host), 0)


class EmbeddedStoreMixin:
    """Run a test class against the embedded xenstored instead."""

    def startStore(self) -> str:
        """Start the embedded xenstored in its own thread; return its socket path."""
        import shutil
        import tempfile

        from xenddev.xenstore.server.threaded import ThreadedXenstored

        workdir = tempfile.mkdtemp(prefix="xsd-")  # AF_UNIX paths are short
        self.addCleanup(shutil.rmtree, workdir, True)  # type: ignore[attr-defined]
        embedded = ThreadedXenstored(os.path.join(workdir, "socket"))
        embedded.start()
        self.addCleanup(embedded.stop)  # type: ignore[attr-defined]
        return embedded.socketPath


class EmbeddedHandshakeTests(EmbeddedStoreMixin, HandshakeTests):
    """L{HandshakeTests} against the embedded xenstored."""


class EmbeddedClosingTests(EmbeddedStoreMixin, ClosingTests):
    """L{ClosingTests} against the embedded xenstored."""


class EmbeddedNoResurrectionTests(EmbeddedStoreMixin, NoResurrectionTests):
    """L{NoResurrectionTests} against the embedded xenstored."""


class EmbeddedRestartTests(EmbeddedStoreMixin, RestartTests):
    """L{RestartTests} against the embedded xenstored."""
