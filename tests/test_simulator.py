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
from xenddev.xenbus import XenbusState, backendPath, frontendPath, waitForState
from xenddev.xenstore.client import XenStoreClient
from xenddev.xenstore.connection import connectXenStore
from xenddev.xenstore.paths import joinPath

S = XenbusState
VBD = 51712  # xvda
WAIT = 10.0  # seconds; only reached if a test is about to fail


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


class DecideBackendTests(SynchronousTestCase):
    """L{decideBackend}, the simulated backend's rules, without a store."""

    def assertGoes(self, v: DeviceView, state: S | None) -> Transition | None:
        """C{v} leads to C{state} (None: no transition)."""
        t = decideBackend(v)
        self.assertEqual(t.state if t is not None else None, state)
        return t

    def test_initialising(self) -> None:
        """
        Initialising with frontend-id set and an existing frontend is bound
        (probed): the features are published and the backend goes to
        InitWait, whatever C{online} says (Linux's probe ignores it).
        """
        t = self.assertGoes(
            view("vbd", S.Initialising, S.Initialising, frontend_id="5"), S.InitWait
        )
        assert t is not None
        self.assertEqual(dict(t.writes), dict(BACKEND_FEATURES["vbd"]))
        self.assertGoes(
            view("vbd", S.Initialising, S.Initialising, frontend_id="5", online="0"), S.InitWait
        )
        # A frontend directory without a state yet exists all the same.
        self.assertGoes(view("vbd", S.Initialising, None, True, True, frontend_id="5"), S.InitWait)

    def test_initialisingWithoutFrontend(self) -> None:
        """
        No probe while the frontend directory does not exist, C{frontend}
        is unset or C{frontend-id} is missing: the backend stays
        Initialising (Linux ignores such a directory without a word).
        """
        self.assertGoes(view("vbd", S.Initialising, None, True, False, frontend_id="5"), None)
        self.assertGoes(view("vbd", S.Initialising, None, frontend_id="5"), None)
        self.assertGoes(view("vbd", S.Initialising, S.Initialising), None)

    def test_connect(self) -> None:
        """InitWait connects only with hotplug-status=connected and an initialised frontend."""
        for fe in (S.Initialised, S.Connected):
            self.assertGoes(
                view("vif", S.InitWait, fe, online="1", hotplug_status="connected"), S.Connected
            )
        for notReady in (None, S.Initialising, S.InitWait):
            self.assertGoes(
                view("vif", S.InitWait, notReady, online="1", hotplug_status="connected"), None
            )
        for status in ("error", "busy", ""):
            self.assertGoes(
                view("vif", S.InitWait, S.Initialised, online="1", hotplug_status=status), None
            )

    def test_vbdWithoutDevServesNothing(self) -> None:
        """
        A vbd backend without C{dev} connects but leaves blkback's error
        node, as Linux's does ("get blkback dev name"); with C{dev}, none.
        """
        v = attrs.evolve(
            view("vbd", S.InitWait, S.Initialised, hotplug_status="connected"),
            path="/local/domain/0/backend/vbd/5/51712",
        )
        t = self.assertGoes(v, S.Connected)
        assert t is not None
        self.assertEqual(
            dict(t.elsewhere),
            {"/local/domain/0/error/backend/vbd/5/51712/error": "2 get blkback dev name"},
        )
        t = self.assertGoes(
            view("vbd", S.InitWait, S.Initialised, hotplug_status="connected", dev="xvda"),
            S.Connected,
        )
        assert t is not None
        self.assertEqual(dict(t.elsewhere), {})

    def test_vbdConnectKeys(self) -> None:
        """A read-only vbd gets info=4; sectors are 0 without an image."""
        t = self.assertGoes(
            view(
                "vbd",
                S.InitWait,
                S.Initialised,
                hotplug_status="connected",
                mode="r",
                params="/nonexistent",
            ),
            S.Connected,
        )
        assert t is not None
        self.assertEqual(
            dict(t.writes),
            {"sectors": "0", "sector-size": "512", "physical-sector-size": "512", "info": "4"},
        )

    def test_closing(self) -> None:
        """A detach closes at once unless a frontend is engaged."""
        for fe in (None, S.Unknown, S.Initialising, S.Closing, S.Closed):
            self.assertGoes(view("vbd", S.Closing, fe, online="0"), S.Closed)
        for fe in (S.InitWait, S.Initialised, S.Connected):
            self.assertGoes(view("vbd", S.Closing, fe, online="0"), None)
        self.assertGoes(view("vbd", S.Closing, S.Connected, online="1"), None)

    def test_frontendClosedOrGone(self) -> None:
        """A closed frontend closes the backend; a vanished one too, once it mattered."""
        for state in (S.Initialising, S.InitWait, S.Connected):
            self.assertGoes(view("vbd", state, S.Closed, online="1"), S.Closed)
        self.assertGoes(view("vbd", S.Connected, None, online="1"), S.Closed)
        self.assertGoes(view("vbd", S.InitWait, None, seen=True, online="1"), S.Closed)
        # Not written yet (seed 000: backend first, frontend later).
        self.assertGoes(view("vbd", S.InitWait, None, online="1"), None)
        # Initialising with the frontend directory gone: never bound.
        self.assertGoes(view("vbd", S.Initialising, None, seen=True, online="1"), None)

    def test_noTransitions(self) -> None:
        """Closed, absent, unknown and reconfiguring states are left alone."""
        for state in (None, S.Unknown, S.Closed, S.Reconfiguring, S.Reconfigured):
            self.assertGoes(view("vbd", state, S.Closed, online="0"), None)


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
        t = self.assertGoes(view("vif", S.Initialising, S.InitWait), S.Initialised)
        assert t is not None
        self.assertEqual(dict(t.writes), dict(FRONTEND_RINGS["vif"]))
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
        """With the frontend still Initialising (no guest driver), the backend closes at once."""
        await self.backend()
        be, fe = await self.attach()
        await self.waitState(be, S.InitWait)
        await self.detach(be)
        await self.waitState(be, S.Closed)
        self.assertEqual(await self.state(fe), S.Initialising)

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
        """A connected backend whose frontend directory is removed goes to Closed."""
        await self.backend()
        await self.frontend()
        be, fe = await self.connected()
        await self.tool.rm(fe)
        await self.waitState(be, S.Closed)
        self.assertFalse(await self.tool.exists(fe))

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
