"""
The blktap controllers end to end: DeviceManager → BlktapController /
Blktap2Controller → backendctrl protocol → the driver-domain agent with the
C{tap} kind (running the test suite's stand-in C{tap-ctl}, with real idle
tapdisk processes) and the C{blkback} kind, over the C xenstored and the
embedded one. The kernel backends and the guest frontend are simulated
(xenddev.simulator). Failure tests compare the whole tree before and after.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from twisted.logger import ILogObserver, globalLogPublisher
from twisted.trial.unittest import TestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from tests.support.fixtures import EmbeddedXenstoredFixture, RealXenstoredFixture
from tests.support.host import HostSuite, startDriverDomain
from tests.support.treedump import dumpTree
from tests.test_controllers import countCalls
from tests.test_tapctl import events, fakeTapCtl, inject, procState
from xenddev.backendctrl.protocol import VDI, ControlPaths, kindsPath
from xenddev.controllers import blktap
from xenddev.controllers.blkif import BlkifController
from xenddev.controllers.blktap import (
    DEPRECATED_WARNING,
    Blktap2Controller,
    BlktapController,
    TapdiskError,
)
from xenddev.controllers.vif import VifController
from xenddev.datapath import readRecord
from xenddev.driverdomain.agent import BackendCtrlAgent
from xenddev.driverdomain.kinds.base import KindContext
from xenddev.driverdomain.kinds.blkback import BlkbackKind
from xenddev.driverdomain.kinds.tap import TapKind
from xenddev.interfaces import IDevController, IDriverDomainKind
from xenddev.tapctl import BlktapSysfs, pidAlive
from xenddev.toolstack.controller import DeviceConfigError, DomainInfo
from xenddev.toolstack.manager import DeviceManager

GUEST = 5
XVDB = 51728


class Tap2Here(Blktap2Controller):
    """tap2 on a host where blktap2 is installed."""

    blktap2Available = staticmethod(lambda: True)


class Tap2Missing(Blktap2Controller):
    """tap2 on a host without blktap2."""

    blktap2Available = staticmethod(lambda: False)


@implementer(ILogObserver)
class LogCapture:
    """Collects formatted log lines while installed."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def __call__(self, event: dict[str, Any]) -> None:
        from twisted.logger import formatEvent

        self.lines.append(formatEvent(event))


class BlktapSuite(HostSuite):
    """Mixed with a server fixture and TestCase."""

    async def setUp(self) -> None:
        self.startServer()
        self.xs = await self.connect()
        self.controllers: dict[str, Any] = {
            "vbd": BlkifController,
            "vif": VifController,
            "tap": BlktapController,
            "tap2": Tap2Here,
        }
        self.manager = DeviceManager(
            self.xs, self.controllers, createTimeout=10.0, destroyTimeout=10.0
        )
        await self.manager.registerDomain(GUEST, name="guest")
        self.tapctl, self.state = fakeTapCtl(self)  # type: ignore[arg-type]
        self.log = LogCapture()
        globalLogPublisher.addObserver(self.log)
        self.addCleanup(globalLogPublisher.removeObserver, self.log)

    async def startDriverDomain(self, domid: int = 0) -> BackendCtrlAgent:
        """The agent (tap + blkback kinds), simulated backends (vbd, tap) and frontend."""
        dd = await startDriverDomain(
            self,
            self.xs,
            domid,
            [TapKind(self.tapctl), BlkbackKind()],
            backendClasses=("vbd", "tap"),
            guests=[GUEST],
        )
        self.agent = dd.agent
        return dd.agent

    def image(self, name: str = "disk one.img", size: int = 1 << 20) -> str:
        """An image file, with a space in its path."""
        d = os.path.abspath(self.mktemp())
        os.makedirs(d)
        path = os.path.join(d, name)
        with open(path, "wb") as f:
            f.truncate(size)
        return path

    def commands(self) -> list[str]:
        """The stand-in tap-ctl commands run so far."""
        return [str(e["cmd"]) for e in events(self.state)]

    # Interfaces

    def test_interfaces(self) -> None:
        """Both controllers provide IDevController; the tap kind IDriverDomainKind."""
        info = DomainInfo(GUEST, "/vm/x")
        for cls in (BlktapController, Blktap2Controller):
            self.assertTrue(verifyObject(IDevController, cls(self.xs, info)))
        self.assertTrue(verifyObject(IDriverDomainKind, TapKind(self.tapctl)))

    # tap2

    async def test_tap2AttachDetach(self) -> None:
        """
        tap:aio on a path with a space → a real tapdisk (spawn, allocate,
        attach, open) and a vbd backend on its node with tapdisk-params;
        configuration reads back as tap:<tapdisk-params>; destroy kills the
        tapdisk and restores the tree exactly.
        """
        img = self.image()
        await self.startDriverDomain()
        before = await dumpTree(self.xs)
        devid = await self.manager.createDevice(
            GUEST, "tap2", {"uname": f"tap:aio:{img}", "dev": "xvdb", "mode": "w"}
        )
        self.assertEqual(devid, XVDB)
        ctrl: Any = await self.manager.controller(GUEST, "tap2")
        (backend,) = await ctrl.readVm(devid, "backend")
        self.assertEqual(backend, f"/local/domain/0/backend/vbd/{GUEST}/{XVDB}")
        typ, params, tparams = await ctrl.readBackend(devid, "type", "params", "tapdisk-params")
        (row,) = await self.tapctl.list()
        self.assertEqual((typ, tparams), ("phy", f"aio:{img}"))
        assert params is not None and row.pid is not None
        self.assertTrue(params.endswith(f"/dev/xen/blktap-2/tapdev{row.minor}"))
        self.assertEqual((row.type, row.path, row.paused), ("aio", img, False))
        self.assertTrue(pidAlive(row.pid))
        self.assertEqual(self.commands()[:4], ["spawn", "allocate", "attach", "list"])
        self.assertIn("open", self.commands())
        self.assertEqual(await self.manager.getBlockDeviceClass(GUEST, "xvdb"), "tap2")
        cfg = await ctrl.getDeviceConfiguration(devid)
        self.assertEqual(cfg["uname"], f"tap:aio:{img}")
        await self.manager.destroyDevice(GUEST, "tap2", "xvdb")
        self.assertFalse(pidAlive(row.pid))
        self.assertEqual(await self.tapctl.list(), [])
        await self.assertTreeIs(before)

    async def test_vhdThroughVbdClass(self) -> None:
        """A plain vbd in vhd format is served by the tap kind (seed 003: vhd → tapdisk2)."""
        img = self.image("a.vhd")
        await self.startDriverDomain()
        before = await dumpTree(self.xs)
        await self.manager.createDevice(GUEST, "vbd", {"spec": f"vhd:{img},xvdc,w"})
        (row,) = await self.tapctl.list()
        self.assertEqual(row.args, f"vhd:{img}")
        await self.manager.destroyDevice(GUEST, "vbd", "xvdc")
        self.assertEqual(await self.tapctl.list(), [])
        await self.assertTreeIs(before)

    # tap (blktap1) and the fallback

    async def test_tap1AttachDetach(self) -> None:
        """
        Class tap: backend/tap with params <type>:<path>, a vbd frontend, a
        deprecation warning; no tapdisk is started by tap-ctl.
        """
        img = self.image("q.qcow2")
        await self.startDriverDomain()
        before = await dumpTree(self.xs)
        devid = await self.manager.createDevice(
            GUEST, "tap", {"uname": f"tap:qcow2:{img}", "dev": "xvdb", "mode": "r"}
        )
        ctrl: Any = await self.manager.controller(GUEST, "tap")
        (backend,) = await ctrl.readVm(devid, "backend")
        self.assertEqual(backend, f"/local/domain/0/backend/tap/{GUEST}/{XVDB}")
        (params,) = await ctrl.readBackend(devid, "params")
        self.assertEqual(params, f"qcow2:{img}")
        self.assertTrue(await self.xs.exists(f"/local/domain/{GUEST}/device/vbd/{XVDB}"))
        self.assertTrue(any("deprecated" in line for line in self.log.lines))
        self.assertEqual(self.commands(), [])
        await self.manager.destroyDevice(GUEST, "tap", devid)
        await self.assertTreeIs(before)

    async def test_fallbackToBlktap1(self) -> None:
        """
        tap2 with tap:qcow2 (not a blktap2 type), or with blktap2 missing on
        this host and a driver domain that does not advertise its kinds (an
        older agent), becomes a blktap1 device of class tap, with seed
        001's warning; tap2:qcow2 is refused (no fallback for an explicit
        tap2:).
        """
        img = self.image("q.qcow2")
        await self.startDriverDomain()
        devid = await self.manager.createDevice(
            GUEST, "tap2", {"uname": f"tap:qcow2:{img}", "dev": "xvdb", "mode": "w"}
        )
        self.assertIn(DEPRECATED_WARNING, self.log.lines)
        self.assertEqual(await self.manager.getBlockDeviceClass(GUEST, devid), "tap")
        self.assertTrue(await self.xs.exists(f"/local/domain/0/backend/tap/{GUEST}/{XVDB}"))
        self.assertEqual(self.commands(), [])
        await self.manager.destroyDevice(GUEST, "tap", devid)

        self.manager.controllerClasses["tap2"] = Tap2Missing
        await self.xs.rm(kindsPath(0))  # an agent that does not advertise
        raw = self.image()
        devid = await self.manager.createDevice(
            GUEST, "tap2", {"uname": f"tap:aio:{raw}", "dev": "xvdc", "mode": "w"}
        )
        self.assertEqual(await self.manager.getBlockDeviceClass(GUEST, devid), "tap")
        self.assertEqual(self.commands(), [])
        e = await self.assertFails(
            self.manager.createDevice(
                GUEST, "tap2", {"uname": f"tap2:qcow2:{img}", "dev": "xvdd", "mode": "w"}
            ),
            DeviceConfigError,
        )
        self.assertIn("do not fall back", str(e))

    async def test_blktap2DecidedByDriverDomain(self) -> None:
        """
        Each agent advertises its kinds in backendctrl/kinds (with the
        control area's permissions), and blktap2 is decided by the device's
        driver domain, not by this host: with blktap2 missing here, tap:aio
        becomes a tap2 device in domain 0 (its agent serves tap). With
        blktap2 present here, domain 3 (blkback only) refuses tap2:aio
        (needs blktap2) and hands tap:aio to blktap1, with the warning,
        which it cannot serve either; nothing is left behind.
        """
        img = self.image()
        await self.startDriverDomain()
        agent3 = (
            await startDriverDomain(self, self.xs, 3, [BlkbackKind()], backendClasses=None)
        ).agent
        self.assertEqual(await self.xs.read(kindsPath(0)), "tap blkback")
        self.assertEqual(await self.xs.read(kindsPath(3)), "blkback")
        self.assertEqual(
            await self.xs.getPerms(kindsPath(3)),
            await self.xs.getPerms("/local/domain/3/backendctrl"),
        )

        self.manager.controllerClasses["tap2"] = Tap2Missing
        devid = await self.manager.createDevice(
            GUEST, "tap2", {"uname": f"tap:aio:{img}", "dev": "xvdb"}
        )
        self.assertEqual(await self.manager.getBlockDeviceClass(GUEST, devid), "tap2")
        (row,) = await self.tapctl.list()
        self.assertEqual(row.args, f"aio:{img}")
        self.assertNotIn(DEPRECATED_WARNING, self.log.lines)
        await self.manager.destroyDevice(GUEST, "tap2", devid)

        self.manager.controllerClasses["tap2"] = Tap2Here
        before = await dumpTree(self.xs)
        e = await self.assertFails(
            self.manager.createDevice(
                GUEST, "tap2", {"uname": f"tap2:aio:{img}", "dev": "xvdc", "backend": "3"}
            ),
            DeviceConfigError,
        )
        self.assertIn("needs blktap2", str(e))
        e = await self.assertFails(
            self.manager.createDevice(
                GUEST, "tap2", {"uname": f"tap:aio:{img}", "dev": "xvdc", "backend": "3"}
            ),
            Exception,
        )
        self.assertIn("no driver-domain kind here serves this target", str(e))
        self.assertIn(DEPRECATED_WARNING, self.log.lines)
        await agent3.whenIdle()
        await self.assertTreeIs(before)

    async def test_tapDiskParsedOncePerAttach(self) -> None:
        """
        An attach parses its blktap disk once, the fallback to blktap1
        included (the parsed disk travels in the details).
        """
        parsed = countCalls(self, blktap, "tapDisk")
        await self.startDriverDomain()
        aio = await self.manager.createDevice(
            GUEST, "tap2", {"uname": f"tap:aio:{self.image()}", "dev": "xvdb"}
        )
        self.assertEqual(len(parsed), 1)
        qcow = await self.manager.createDevice(
            GUEST, "tap2", {"uname": f"tap:qcow2:{self.image('q.qcow2')}", "dev": "xvdc"}
        )
        self.assertEqual(len(parsed), 2)
        self.assertEqual(await self.manager.getBlockDeviceClass(GUEST, qcow), "tap")
        await self.manager.destroyDevice(GUEST, "tap", qcow)
        await self.manager.destroyDevice(GUEST, "tap2", aio)

    # Cleanup ordering, pause

    async def test_cleanupOrdering(self) -> None:
        """
        The tapdisk is destroyed only after the backend directory is gone:
        the time the test's watch sees the backend vanish precedes the
        stand-in's destroy event (both on the system-wide monotonic clock).
        """
        img = self.image()
        await self.startDriverDomain()
        await self.manager.createDevice(GUEST, "tap2", {"uname": f"tap:aio:{img}", "dev": "xvdb"})
        backend = f"/local/domain/0/backend/vbd/{GUEST}/{XVDB}"
        gone: list[float] = []

        def changed(path: str) -> None:
            d = self.xs.exists(backend)
            d.addCallback(lambda there: None if there or gone else gone.append(time.monotonic()))

        handle = await self.xs.watch(backend, changed)
        self.addCleanup(handle.stop)
        await self.manager.destroyDevice(GUEST, "tap2", XVDB)
        await self.agent.whenIdle()
        (destroy,) = [e for e in events(self.state) if e["cmd"] == "destroy"]
        self.assertEqual(len(gone), 1)
        self.assertTrue(gone[0] < float(str(destroy["t"])), (gone, destroy))

    async def test_sysfsRemoveAfterBackendGone(self) -> None:
        """
        With the Xen 4.0 sysfs interface, finishDeviceCleanup writes
        "remove" only once the backend is gone; until then it waits, as a
        tracked Deferred.
        """
        img = self.image()
        await self.startDriverDomain()
        root = os.path.join(self.state, "root")

        class Tap2Sysfs(Tap2Here):
            sysfs = BlktapSysfs(root)

        self.manager.controllerClasses["tap2"] = Tap2Sysfs
        await self.manager.createDevice(GUEST, "tap2", {"uname": f"tap:aio:{img}", "dev": "xvdb"})
        ctrl: Any = await self.manager.controller(GUEST, "tap2")
        (backend, node) = await ctrl.readVm(XVDB, "backend", "tapdev")
        remove = os.path.join(root, "sys/class/blktap2/blktap0/remove")
        d = ctrl.finishDeviceCleanup(backend, node)
        await self.agent.whenIdle()
        self.assertFalse(d.called)
        self.assertEqual(ctrl.pendingCleanups, {d})
        with open(remove) as f:
            self.assertEqual(f.read(), "")
        await self.xs.rm(backend)
        await d
        with open(remove) as f:
            self.assertEqual(f.read(), "remove")
        self.assertEqual(ctrl.pendingCleanups, set())

    async def test_pauseUnpause(self) -> None:
        """
        Domain pause pauses the tapdisk (process stopped) and its data path
        leaves the registry; unpause resumes it and registers it again.
        """
        img = self.image()
        await self.startDriverDomain()
        await self.manager.createDevice(GUEST, "tap2", {"uname": f"tap:aio:{img}", "dev": "xvdb"})
        ctrl: Any = await self.manager.controller(GUEST, "tap2")
        (row,) = await self.tapctl.list()
        assert row.pid is not None
        vdi = ctrl.vdiName(XVDB)
        registered = await readRecord(self.xs, 0, vdi)
        assert registered is not None
        self.assertEqual((registered.pid, registered.minor), (row.pid, row.minor))
        await ctrl.pauseDevices()
        (paused,) = await self.tapctl.list()
        self.assertTrue(paused.paused)
        self.assertEqual(procState(row.pid), "T")
        self.assertEqual(await readRecord(self.xs, 0, vdi), None)
        await ctrl.unpauseDevices()
        (resumed,) = await self.tapctl.list()
        self.assertFalse(resumed.paused)
        self.assertNotEqual(procState(row.pid), "T")
        self.assertEqual(await readRecord(self.xs, 0, vdi), registered)
        self.assertIn("unpause", self.commands())

    # Failures

    async def test_tapCtlFailuresAreTyped(self) -> None:
        """
        tap-ctl failing at attach (prepare) or at open (activate): a
        TapdiskError with the command, exit code and stderr; no tapdisk
        process or minor is left and the tree is unchanged.
        """
        img = self.image()
        await self.startDriverDomain()
        before = await dumpTree(self.xs)
        for command, code in (("attach", 16), ("open", 28)):
            inject(self.state, command, code, f"{command} refused\n")
            e = await self.assertFails(
                self.manager.createDevice(
                    GUEST, "tap2", {"uname": f"tap:aio:{img}", "dev": "xvdb"}
                ),
                TapdiskError,
            )
            self.assertEqual((e.exitCode, e.stderr.strip()), (code, f"{command} refused"))
            self.assertIn(command, e.command)
            os.unlink(os.path.join(self.state, "fail", command))
            await self.assertTreeIs(before)
            self.assertEqual(await self.tapctl.list(), [])
            with open(os.path.join(self.state, "tapdisks.json")) as f:
                self.assertEqual(json.load(f)["tapdisks"], {})

    async def test_recoveringReusesTapdisk(self) -> None:
        """
        A prepare re-executed after an agent crash (recovering) reuses the
        recorded tapdisk when its process is alive, and replaces it when not.
        """
        img = self.image()
        kind = TapKind(self.tapctl)
        paths = ControlPaths(VDI, 0, "v1")
        records = "/local/domain/0/private/xenddev/objects/vdi/v1/data"
        target = {"type": "tap", "taptype": "aio", "params": img}
        ctx = KindContext(self.xs, paths, target, False, records)
        await kind.prepare(ctx)
        pid = int(await self.xs.read(f"{records}/pid"))
        again = KindContext(self.xs, paths, target, True, records)
        await kind.prepare(again)
        self.assertEqual(int(await self.xs.read(f"{records}/pid")), pid)
        self.assertEqual(self.commands().count("spawn"), 1)
        os.kill(pid, 9)
        await kind.prepare(again)
        newPid = int(await self.xs.read(f"{records}/pid"))
        self.assertNotEqual(newPid, pid)
        self.assertTrue(pidAlive(newPid))
        await kind.unprepare(ctx)
        self.assertFalse(pidAlive(newPid))
        self.assertEqual(await self.tapctl.list(), [])


class RealXenstoredBlktapTests(BlktapSuite, RealXenstoredFixture, TestCase):  # type: ignore[misc]
    """Blktap controllers over the C xenstored."""


class EmbeddedXenstoredBlktapTests(  # type: ignore[misc]
    BlktapSuite, EmbeddedXenstoredFixture, TestCase
):
    """Blktap controllers over the embedded xenstored."""
