"""
The device controllers end to end: DeviceManager → BlkifController /
VifController → backendctrl protocol → the driver-domain agent with the
real kinds and (where it matters) the real hotplug scripts, over the C
xenstored and the embedded one. The kernel backend and the guest frontend
are simulated (xenddev.simulator): nothing else can play them without a
hypervisor. Every failure test compares the whole tree before and after.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import deferLater
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from tests.support.fixtures import EmbeddedXenstoredFixture, RealXenstoredFixture
from tests.support.host import HostSuite, pollUntil, startDriverDomain
from tests.support.loopdev import acquireLoopTestLock, loopDevicesFor, requireLoopDevices
from tests.support.netns import NetNamespace, requireNetns
from tests.support.treedump import diffTrees, dumpTree
from xenddev.controllers import blkif, defaultControllers
from xenddev.controllers.blkif import BlkifController, NotACdromError
from xenddev.controllers.blktap import BlktapController
from xenddev.controllers.vif import VifController, parseRate, randomMac
from xenddev.driverdomain.agent import BackendCtrlAgent
from xenddev.driverdomain.kinds.base import KindContext, Outcome, PlugSpec
from xenddev.driverdomain.kinds.blkback import BlkbackKind
from xenddev.driverdomain.kinds.netback import NetbackKind
from xenddev.interfaces import IDevController
from xenddev.toolstack.client import DriverDomainClient
from xenddev.toolstack.controller import (
    DestroyMode,
    DeviceConfigError,
    DeviceError,
    DeviceExistsError,
    DeviceNotFoundError,
    DomainInfo,
    HotplugFailedError,
    UnknownDomainError,
)
from xenddev.toolstack.manager import DeviceManager
from xenddev.xenbus import waitForState

GUEST = 5


def countCalls(case: Any, module: Any, name: str) -> list[object]:
    """
    Wrap C{module.name} for the test C{case}: the list returned gets the
    first argument of each call.
    """
    calls: list[object] = []
    real = getattr(module, name)

    def counting(first: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(first)
        return real(first, *args, **kwargs)

    case.patch(module, name, counting)
    return calls


class GatedBlkback(BlkbackKind):
    """blkback whose operations can be held at a gate, to cancel mid-chain."""

    def __init__(self) -> None:
        super().__init__()
        self.gates: dict[str, Deferred[None]] = {}
        self.reached: dict[str, Deferred[None]] = {}

    def _gated(self, op: str, result: Any) -> Any:
        reached = self.reached.pop(op, None)
        if reached is not None:
            reached.callback(None)
        gate = self.gates.pop(op, None)
        if gate is None:
            return result
        return gate.addCallback(lambda _: result).addCallback(lambda r: r)

    def prepare(self, ctx: KindContext) -> Deferred[Outcome]:
        return self._gated("prepare", super().prepare(ctx))

    def plug(self, ctx: KindContext, plug: PlugSpec) -> Deferred[Outcome]:
        return self._gated("plug", super().plug(ctx, plug))

    def activate(self, ctx: KindContext) -> Deferred[Outcome]:
        return self._gated("activate", super().activate(ctx))


class ControllerFixture(HostSuite):
    """
    A DeviceManager with a registered guest, and a driver domain on demand;
    mixed with a server fixture and TestCase (no tests of its own, so other
    modules can build on it).
    """

    async def setUp(self) -> None:
        if not os.path.isdir("/var/log/xen") and os.geteuid() == 0:
            os.makedirs("/var/log/xen")
        self.startServer()
        self.xs = await self.connect()
        self.manager = DeviceManager(
            self.xs, defaultControllers(), createTimeout=10.0, destroyTimeout=10.0
        )
        await self.manager.registerDomain(GUEST, name="guest")
        self.kind = GatedBlkback()

    async def startDriverDomain(
        self,
        domid: int = 0,
        hotplug: bool = False,
        scriptDir: str = "/etc/xen/scripts",
        refuseToClose: bool = False,
        **runnerArgs: Any,
    ) -> BackendCtrlAgent:
        """The agent (real kinds), simulated backend and frontend; hotplug optional."""
        dd = await startDriverDomain(
            self,
            self.xs,
            domid,
            [self.kind, NetbackKind()],
            hotplug={"scriptDir": scriptDir, **runnerArgs} if hotplug else None,
            guests=[GUEST],
            refuseToClose=refuseToClose,
        )
        self.agent = dd.agent
        return dd.agent

    def image(self, size: int = 1 << 20) -> str:
        """A plain image file (no loop device unless a hotplug script makes one)."""
        path = os.path.abspath(self.mktemp())
        with open(path, "wb") as f:
            f.truncate(size)
        return path


class ControllerSuite(ControllerFixture):
    """Mixed with a server fixture and TestCase."""

    # Interfaces

    def test_controllersProvideInterface(self) -> None:
        """Every controller class provides IDevController completely."""
        info = DomainInfo(GUEST, "/vm/x")
        for cls in (BlkifController, VifController):
            self.assertTrue(verifyObject(IDevController, cls(self.xs, info)))

    # Block devices

    async def test_fileDiskWithRealBlockScript(self) -> None:
        """
        xl spec → vbd 51728 with the real block script on a loop device; the
        backend and frontend carry the reference keys; destroy removes the
        loop device and restores the tree exactly.
        """
        requireLoopDevices(self)  # type: ignore[arg-type]
        lock = acquireLoopTestLock()
        self.addCleanup(os.close, lock)
        img = self.image(8 << 20)
        await self.startDriverDomain(hotplug=True)
        before = await dumpTree(self.xs)
        devid = await self.manager.createDevice(GUEST, "vbd", {"spec": f"{img},raw,xvdb,w"})
        self.assertEqual(devid, 51728)
        ctrl = await self.manager.controller(GUEST, "vbd")
        (backend,) = await ctrl.readVm(devid, "backend")
        self.assertEqual(backend, f"/local/domain/0/backend/vbd/{GUEST}/51728")
        keys = set(await self.xs.ls(backend))
        for key in (
            "frontend", "frontend-id", "online", "state", "type", "params", "mode",
            "device-type", "removable", "bootable", "script", "hotplug-status",
            "physical-device",
        ):  # fmt: skip
            self.assertIn(key, keys)
        front = ctrl.frontendPath(devid)
        for key in ("backend", "backend-id", "state", "virtual-device", "device-type", "trusted"):
            self.assertIn(key, set(await self.xs.ls(front)))
        self.assertEqual(await self.xs.read(f"{front}/virtual-device"), "51728")
        self.assertEqual(len(loopDevicesFor(img)), 1)
        self.assertEqual(await self.manager.getBlockDeviceClass(GUEST, "xvdb"), "vbd")
        (row,) = await self.manager.listDevices(GUEST, "vbd")
        self.assertEqual((row.devid, row.backendId, row.backendPath), (51728, 0, backend))
        await self.manager.destroyDevice(GUEST, "vbd", "xvdb")
        await pollUntil(lambda: loopDevicesFor(img) == [])
        await self.assertTreeIs(before)
        self.assertEqual(await self.manager.getBlockDeviceClass(GUEST, "xvdb"), None)

    async def test_listShowsXlDevices(self) -> None:
        """
        Devices made by xl (libxl's records under /libxl/<dom>/device) are
        listed beside ours, marked libxl, with their frontend's state (the
        simulated guest plays with it); a guest-written frontend without a
        libxl record is not listed.
        """
        await self.startDriverDomain()
        devid = await self.manager.createDevice(
            GUEST, "vbd", {"spec": f"{self.image()},raw,xvdb,w"}
        )
        xlBackend = f"/local/domain/0/backend/vbd/{GUEST}/51760"
        await self.xs.write(f"/libxl/{GUEST}/device/vbd/51760/backend", xlBackend)
        await self.xs.write(f"/libxl/{GUEST}/device/vbd/51760/frontend", "x")
        await self.xs.write(f"/local/domain/{GUEST}/device/vbd/51760/state", "4")
        await self.xs.write(f"/local/domain/{GUEST}/device/vbd/51776/state", "4")
        rows = await self.manager.listDevices(GUEST, "vbd")
        self.assertEqual(
            [(r.devid, r.toolstack, r.backendId, r.backendPath) for r in rows],
            [
                (devid, "xenddev", 0, f"/local/domain/0/backend/vbd/{GUEST}/{devid}"),
                (51760, "libxl", 0, xlBackend),
            ],
        )
        self.assertIsNotNone(rows[1].state)
        self.assertEqual(await self.manager.listDevices(GUEST, "vif"), [])

    async def test_xendUname(self) -> None:
        """xend's uname/dev/mode form works and is reported back by getDeviceConfiguration."""
        img = self.image()
        await self.startDriverDomain()
        devid = await self.manager.createDevice(
            GUEST, "vbd", {"uname": f"file:{img}", "dev": "xvdc", "mode": "r"}
        )
        ctrl = await self.manager.controller(GUEST, "vbd")
        cfg = await ctrl.getDeviceConfiguration(devid)
        self.assertEqual((cfg["uname"], cfg["dev"], cfg["mode"]), (f"file:{img}", "xvdc", "r"))
        (mode,) = await ctrl.readBackend(devid, "mode")
        self.assertEqual(mode, "r")

    async def test_badSpecWritesNothing(self) -> None:
        """A bad spec raises DeviceConfigError with xl's message; nothing is written."""
        await self.startDriverDomain()
        before = await dumpTree(self.xs)
        e = await self.assertFails(
            self.manager.createDevice(GUEST, "vbd", {"spec": "/x,raw,xvdb,w,bogus=1"}),
            DeviceConfigError,
        )
        self.assertIn("config parsing error in disk specification", str(e))
        await self.assertFails(
            self.manager.createDevice(GUEST, "vbd", {"spec": "/x,raw,nonsense,w"}),
            DeviceConfigError,
        )
        await self.assertTreeIs(before)

    async def test_duplicateVdev(self) -> None:
        """A second device on the same vdev is refused; the first is untouched."""
        img = self.image()
        await self.startDriverDomain()
        await self.manager.createDevice(GUEST, "vbd", {"spec": f"{img},raw,xvdb,r"})
        await waitForState(self.xs, f"/local/domain/{GUEST}/device/vbd/51728", 4, 10)
        await self.agent.whenIdle()
        before = await dumpTree(self.xs)
        e = await self.assertFails(
            self.manager.createDevice(GUEST, "vbd", {"spec": f"{img},raw,xvdb,r"}),
            DeviceExistsError,
        )
        self.assertEqual(str(e), "Device xvdb (51728) is already connected.")
        await self.assertTreeIs(before)

    async def test_unknownDomain(self) -> None:
        """Devices for a domain with no home in XenStore are refused."""
        await self.startDriverDomain()
        before = await dumpTree(self.xs)
        await self.assertFails(
            self.manager.createDevice(77, "vbd", {"spec": "/x,raw,xvdb,w"}), UnknownDomainError
        )
        await self.assertTreeIs(before)

    async def test_targetMissing(self) -> None:
        """
        A missing file: refused at once when the driver domain is local (the
        toolstack can look), by the agent with ENOENT when it is remote;
        nothing is left either way.
        """
        await self.startDriverDomain(3)
        before = await dumpTree(self.xs)
        spec = "/nonexistent/disk.img,raw,xvdb,w"
        e = await self.assertFails(
            self.manager.createDevice(GUEST, "vbd", {"spec": spec}), DeviceConfigError
        )
        self.assertIn("does not exist", str(e))
        e = await self.assertFails(
            self.manager.createDevice(GUEST, "vbd", {"spec": spec, "backend": 3}), DeviceError
        )
        self.assertIn("could not be connected", str(e))
        self.assertIn("ENOENT", str(e))
        await self.assertTreeIs(before)

    async def test_hotplugFailure(self) -> None:
        """
        The real block script refuses (read-only image asked read-write):
        xend's message with the script's error; nothing left behind.
        """
        requireLoopDevices(self)  # type: ignore[arg-type]
        lock = acquireLoopTestLock()
        self.addCleanup(os.close, lock)
        img = self.image()
        os.chmod(img, 0o400)
        await self.startDriverDomain(hotplug=True)
        before = await dumpTree(self.xs)
        e = await self.assertFails(
            self.manager.createDevice(GUEST, "vbd", {"spec": f"{img},raw,xvdb,w"}),
            HotplugFailedError,
        )
        self.assertTrue(str(e).startswith("Device xvdb (vbd 51728) could not be connected. "))
        await self.assertTreeIs(before)
        self.assertEqual(loopDevicesFor(img), [])

    async def test_hotplugHang(self) -> None:
        """
        A hotplug script that never finishes: the create times out with
        "Hotplug scripts not working."; the script is killed; nothing left.
        """
        scripts = os.path.abspath(self.mktemp())
        os.makedirs(scripts)
        with open(os.path.join(scripts, "hang"), "w") as f:
            f.write("#!/bin/sh\nexec sleep 600\n")
        os.chmod(os.path.join(scripts, "hang"), 0o755)
        img = self.image()
        await self.startDriverDomain(hotplug=True, scriptDir=scripts, timeout=1.0)
        self.manager.controllerArgs["createTimeout"] = 0.5
        before = await dumpTree(self.xs)
        e = await self.assertFails(
            self.manager.createDevice(GUEST, "vbd", {"spec": f"{img},raw,xvdb,w,script=hang"}),
            HotplugFailedError,
        )
        self.assertEqual(
            str(e), "Device xvdb (vbd 51728) could not be connected. Hotplug scripts not working."
        )
        await self.assertTreeIs(before)

    # cdrom media change (reconfigureDevice → the protocol's change request)

    async def test_cdromMediaChangeWithRealBlockScript(self) -> None:
        """
        A cdrom's medium changed, ejected and inserted again through
        reconfigureDevice: the real block script detaches the old medium's
        loop device and attaches the new one; the backend and the records
        follow; destroy restores the tree exactly.
        """
        requireLoopDevices(self)  # type: ignore[arg-type]
        lock = acquireLoopTestLock()
        self.addCleanup(os.close, lock)
        first, second = self.image(), self.image()
        await self.startDriverDomain(hotplug=True)
        before = await dumpTree(self.xs)
        devid = await self.manager.createDevice(
            GUEST, "vbd", {"spec": f"{first},raw,xvdc,devtype=cdrom"}
        )
        ctrl = await self.manager.controller(GUEST, "vbd")
        self.assertEqual(len(loopDevicesFor(first)), 1)
        await self.manager.reconfigureDevice(
            GUEST, "vbd", devid, {"spec": f"{second},raw,xvdc,devtype=cdrom"}
        )
        self.assertEqual((loopDevicesFor(first), len(loopDevicesFor(second))), ([], 1))
        params, status = await ctrl.readBackend(devid, "params", "hotplug-status")
        self.assertEqual((params, status), (second, "connected"))
        self.assertEqual((await ctrl.getDeviceConfiguration(devid))["uname"], f"file:{second}")
        await self.manager.reconfigureDevice(GUEST, "vbd", "xvdc", {"spec": ",xvdc:cdrom,r"})
        self.assertEqual(loopDevicesFor(second), [])
        params, status = await ctrl.readBackend(devid, "params", "hotplug-status")
        self.assertEqual((params, status), ("", "connected"))
        (info,) = await DriverDomainClient(self.xs, 0).list()
        self.assertEqual(info.target["type"], "empty")
        await self.manager.reconfigureDevice(
            GUEST, "vbd", devid, {"spec": f"{first},raw,xvdc,devtype=cdrom"}
        )
        self.assertEqual(len(loopDevicesFor(first)), 1)
        await self.manager.destroyDevice(GUEST, "vbd", devid)
        await pollUntil(lambda: loopDevicesFor(first) == [])
        await self.assertTreeIs(before)

    async def test_emptyCdromDrive(self) -> None:
        """An empty cdrom drive attaches without a script and detaches cleanly."""
        await self.startDriverDomain(hotplug=True)
        before = await dumpTree(self.xs)
        devid = await self.manager.createDevice(GUEST, "vbd", {"spec": ",hdc:cdrom,r"})
        self.assertEqual(devid, 5632)
        ctrl = await self.manager.controller(GUEST, "vbd")
        params, removable, status = await ctrl.readBackend(
            devid, "params", "removable", "hotplug-status"
        )
        self.assertEqual((params, removable, status), ("", "1", "connected"))
        self.assertEqual(self.agent.hotplugRuns, 0)
        await self.manager.destroyDevice(GUEST, "vbd", "hdc")
        await self.assertTreeIs(before)

    async def test_reconfigureRefused(self) -> None:
        """
        What xend refused is refused before anything changes: a disk that is
        not a cdrom, another vdev, another driver domain, a vif, a device
        that does not exist; a new medium the driver domain cannot find
        comes back as its ENOENT. The tree is unchanged throughout.
        """
        img = self.image()
        await self.startDriverDomain()
        await self.startDriverDomain(3)
        disk = await self.manager.createDevice(GUEST, "vbd", {"spec": f"{img},raw,xvdb,r"})
        cd = await self.manager.createDevice(
            GUEST, "vbd", {"spec": f"{img},raw,xvdc,devtype=cdrom", "backend": 3}
        )
        await self.manager.createDevice(GUEST, "vif", {"bridge": "br0"})
        for front in ("vbd/51728", "vbd/51744", "vif/0"):
            path = f"/local/domain/{GUEST}/device/{front}"
            await waitForState(self.xs, path, 4, 10)
            # netfront is Connected before netback, which waits for the
            # hotplug script (as on real Xen).
            await waitForState(self.xs, await self.xs.read(f"{path}/backend"), 4, 10)
        await self.agentsIdle()
        before = await dumpTree(self.xs)
        e = await self.assertFails(
            self.manager.reconfigureDevice(
                GUEST, "vbd", disk, {"spec": f"{img},raw,xvdb,devtype=cdrom"}
            ),
            NotACdromError,
        )
        self.assertEqual(
            str(e),
            f"Device xvdb (51728) of domain {GUEST} is not a cdrom drive: "
            "only a cdrom's medium can be changed",
        )
        e = await self.assertFails(
            self.manager.reconfigureDevice(
                GUEST, "vbd", cd, {"spec": f"{img},raw,xvdd,devtype=cdrom", "backend": 3}
            ),
            DeviceConfigError,
        )
        self.assertIn("Refusing to reconfigure device xvdc (vbd 51744)", str(e))
        self.assertIn("another device, xvdd (51760)", str(e))
        e = await self.assertFails(
            self.manager.reconfigureDevice(
                GUEST, "vbd", cd, {"spec": f"{img},raw,xvdc,devtype=cdrom"}
            ),
            DeviceConfigError,
        )
        self.assertIn("driver domain cannot change", str(e))
        e = await self.assertFails(
            self.manager.reconfigureDevice(GUEST, "vif", 0, {"bridge": "br1"}), DeviceError
        )
        self.assertEqual(str(e), "vif devices may not be reconfigured")
        await self.assertFails(
            self.manager.reconfigureDevice(
                GUEST, "vbd", "xvde", {"spec": f"{img},raw,xvde,devtype=cdrom"}
            ),
            DeviceNotFoundError,
        )
        e = await self.assertFails(
            self.manager.reconfigureDevice(
                GUEST, "vbd", cd, {"spec": "/nonexistent.iso,raw,xvdc,devtype=cdrom", "backend": 3}
            ),
            DeviceError,
        )
        self.assertIn("ENOENT", str(e))
        # The refused medium cost the guest a blip: its drive was unplugged
        # and plugged again with the old medium (see _replug).
        await waitForState(self.xs, f"/local/domain/{GUEST}/device/vbd/51744", 4, 10)
        await waitForState(self.xs, f"/local/domain/3/backend/vbd/{GUEST}/51744", 4, 10)
        await self.assertTreeIs(before)

    async def test_newMediumFailsOldPutBack(self) -> None:
        """
        The new medium's hotplug script fails: reconfigureDevice fails with
        xend's message, the old medium is put back and connected, and the
        tree is as before.
        """
        scripts = os.path.abspath(self.mktemp())
        os.makedirs(scripts)
        script = os.path.join(scripts, "picky")
        with open(script, "w") as f:
            f.write(
                "#!/bin/sh\n"
                'params=$(xenstore-read "$XENBUS_PATH/params")\n'
                'case "$1:$params" in add:*bad*)\n'
                '  xenstore-write "$XENBUS_PATH/hotplug-error" "cannot read $params"\n'
                '  xenstore-write "$XENBUS_PATH/hotplug-status" error; exit 1;;\n'
                "esac\n"
                '[ "$1" = add ] && xenstore-write "$XENBUS_PATH/hotplug-status" connected\n'
                "exit 0\n"
            )
        os.chmod(script, 0o755)
        good, bad = self.image(), self.image()
        os.rename(bad, bad + "-bad")
        bad += "-bad"
        await self.startDriverDomain(hotplug=True, scriptDir=scripts)
        devid = await self.manager.createDevice(
            GUEST, "vbd", {"spec": f"{good},raw,xvdc,devtype=cdrom,script=picky"}
        )
        ctrl = await self.manager.controller(GUEST, "vbd")
        await waitForState(self.xs, ctrl.frontendPath(devid), 4, 10)
        await self.agent.whenIdle()  # the add script's record
        before = await dumpTree(self.xs)
        e = await self.assertFails(
            self.manager.reconfigureDevice(
                GUEST, "vbd", devid, {"spec": f"{bad},raw,xvdc,devtype=cdrom,script=picky"}
            ),
            HotplugFailedError,
        )
        self.assertEqual(
            str(e), f"Device xvdc (vbd {devid}) could not be connected. cannot read {bad}"
        )
        (backend,) = await ctrl.readVm(devid, "backend")
        await waitForState(self.xs, backend, 4, 10)
        # The frontend connects after its backend.
        await waitForState(self.xs, ctrl.frontendPath(devid), 4, 10)
        await self.assertTreeIs(before)

    # Destroy paths

    async def test_guestNeverClosesAutoForces(self) -> None:
        """A guest that never closes: after the timeout the default mode detaches anyway."""
        img = self.image()
        await self.startDriverDomain(refuseToClose=True)
        self.manager.controllerArgs["destroyTimeout"] = 0.3
        before = await dumpTree(self.xs)
        await self.manager.createDevice(GUEST, "vbd", {"spec": f"{img},raw,xvdb,r"})
        await self.manager.destroyDevice(GUEST, "vbd", 51728)
        await self.assertTreeIs(before)

    async def test_guestNeverClosesSafeMode(self) -> None:
        """In safe mode a guest that never closes keeps the device, with an error."""
        img = self.image()
        await self.startDriverDomain(refuseToClose=True)
        self.manager.controllerArgs["destroyTimeout"] = 0.3
        await self.manager.createDevice(GUEST, "vbd", {"spec": f"{img},raw,xvdb,r"})
        ctrl = await self.manager.controller(GUEST, "vbd")
        # A frontend still Initialising holds nothing: wait until it holds the device.
        await waitForState(self.xs, ctrl.frontendPath(51728), 4, 10)
        e = await self.assertFails(ctrl.destroyDevice(51728, mode=DestroyMode.SAFE), DeviceError)
        self.assertIn("could not be disconnected", str(e))
        self.assertEqual(await ctrl.deviceIDs(), [51728])
        await ctrl.destroyDevice(51728, force=True)
        self.assertEqual(await ctrl.deviceIDs(), [])

    async def test_driverDomainGone(self) -> None:
        """
        The driver domain vanishes (home removed); destroy cleans the
        toolstack side and succeeds.
        """
        img = self.image()
        await self.startDriverDomain(3)
        before = await dumpTree(self.xs)
        await self.manager.createDevice(GUEST, "vbd", {"spec": f"{img},raw,xvdb,r", "backend": 3})
        await self.agent.stop()
        await self.xs.rm("/local/domain/3")
        await self.manager.destroyDevice(GUEST, "vbd", "xvdb")
        after = await dumpTree(self.xs)
        expected = {p: v for p, v in before.items() if not p.startswith("/local/domain/3")}
        self.assertEqual(diffTrees(expected, after), [])

    async def test_destroyUnknown(self) -> None:
        """Destroying a device that does not exist: DeviceNotFoundError."""
        await self.startDriverDomain()
        await self.assertFails(self.manager.destroyDevice(GUEST, "vbd", 51728), DeviceNotFoundError)

    # Cancellation

    async def _cancelAt(self, op: str) -> None:
        img = self.image()
        await self.startDriverDomain()
        before = await dumpTree(self.xs)
        gate: Deferred[None] = Deferred()
        reached: Deferred[None] = Deferred()
        self.kind.gates[op] = gate
        self.kind.reached[op] = reached
        d = self.manager.createDevice(GUEST, "vbd", {"spec": f"{img},raw,xvdb,r"})
        await reached
        d.cancel()
        gate.callback(None)  # the driver domain finishes what it was doing
        await self.assertFails(d, CancelledError)
        await self.assertTreeIs(before)

    async def test_cancelDuringPrepare(self) -> None:
        """Cancel while the driver domain prepares: everything is undone."""
        await self._cancelAt("prepare")

    async def test_cancelDuringPlug(self) -> None:
        """Cancel while the driver domain plugs: everything is undone."""
        await self._cancelAt("plug")

    async def test_cancelDuringActivate(self) -> None:
        """Cancel while the driver domain activates: everything is undone."""
        await self._cancelAt("activate")

    async def test_cancelWhileWaitingForHotplug(self) -> None:
        """Cancel while waiting for hotplug-status (a hanging script): undone."""
        scripts = os.path.abspath(self.mktemp())
        os.makedirs(scripts)
        with open(os.path.join(scripts, "hang"), "w") as f:
            f.write("#!/bin/sh\nexec sleep 600\n")
        os.chmod(os.path.join(scripts, "hang"), 0o755)
        img = self.image()
        await self.startDriverDomain(hotplug=True, scriptDir=scripts, timeout=1.0)
        before = await dumpTree(self.xs)
        d = self.manager.createDevice(GUEST, "vbd", {"spec": f"{img},raw,xvdb,w,script=hang"})
        await deferLater(reactor, 0.3, lambda: None)
        d.cancel()
        await self.assertFails(d, CancelledError)
        await self.assertTreeIs(before)

    # Many at once

    async def test_manyDevicesAndRelease(self) -> None:
        """Twenty disks attached concurrently; releaseDevices removes all of them."""
        img = self.image()
        await self.startDriverDomain()
        before = await dumpTree(self.xs)
        names = [f"xvd{chr(ord('b') + i)}" for i in range(14)]
        from twisted.internet.defer import gatherResults

        await gatherResults(
            [self.manager.createDevice(GUEST, "vbd", {"spec": f"{img},raw,{n},r"}) for n in names]
        )
        ctrl = await self.manager.controller(GUEST, "vbd")
        self.assertEqual(len(await ctrl.deviceIDs()), len(names))
        await self.manager.releaseDevices(GUEST)
        await self.assertTreeIs(before)

    # Network interfaces

    async def test_vifWithRealVifBridge(self) -> None:
        """
        A vif with the real vif-bridge in a network namespace: it joins the
        bridge; destroy takes it off; the tree is as before.
        """
        requireNetns(self)  # type: ignore[arg-type]
        ns = NetNamespace()
        ns.create()
        self.addCleanup(ns.delete)
        ns.addBridge("xdbr1")
        ns.addTap(f"vif{GUEST}.0")
        await self.startDriverDomain(hotplug=True, wrapper=ns.wrapper)
        before = await dumpTree(self.xs)
        devid = await self.manager.createDevice(
            GUEST, "vif", {"mac": "00:16:3e:01:02:03", "bridge": "xdbr1", "rate": "10Mb/s"}
        )
        self.assertEqual(devid, 0)
        link = ns.link(f"vif{GUEST}.0")
        assert link is not None
        self.assertEqual(link.get("master"), "xdbr1")
        ctrl = await self.manager.controller(GUEST, "vif")
        mac, rate = await ctrl.readBackend(devid, "mac", "rate")
        self.assertEqual((mac, rate), ("00:16:3e:01:02:03", "62500,50000"))
        (row,) = await self.manager.listDevices(GUEST, "vif")
        self.assertEqual(row.mac, "00:16:3e:01:02:03")
        await self.manager.destroyDevice(GUEST, "vif", "00:16:3e:01:02:03")
        link = ns.link(f"vif{GUEST}.0")
        assert link is not None
        self.assertEqual(link.get("master"), None)
        await self.assertTreeIs(before)

    async def test_vifDevidsAllocated(self) -> None:
        """vifs without a devid get the lowest free one; MACs are generated in 00:16:3e."""
        await self.startDriverDomain()
        first = await self.manager.createDevice(GUEST, "vif", {"bridge": "br0"})
        second = await self.manager.createDevice(GUEST, "vif", {"bridge": "br0"})
        self.assertEqual((first, second), (0, 1))
        ctrl = await self.manager.controller(GUEST, "vif")
        cfg = await ctrl.getDeviceConfiguration(1)
        self.assertTrue(cfg["mac"].startswith("00:16:3e:"))
        self.assertTrue(int(cfg["mac"][9:11], 16) < 0x80)

    async def test_oneLogLinePerOperation(self) -> None:
        """
        Each device operation logs one line, the manager's, through the
        daemon's manager too (which still counts it for the metrics):
        domain, class, the device as named (an attach's id once known) with
        a disk's vdev, the outcome (a failure's fault code) and duration.
        """
        from xenddev.service import ServiceDeviceManager

        manager = ServiceDeviceManager(
            self.xs, reactor, defaultControllers(), createTimeout=10.0, destroyTimeout=10.0
        )
        events: list[dict[str, Any]] = []
        observer: Any = events.append
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        await self.startDriverDomain()
        devid = await manager.createDevice(GUEST, "vbd", {"spec": f"{self.image()},raw,xvdb,r"})
        await self.assertFails(manager.createDevice(GUEST, "vbd", {"colour": "red"}), DeviceError)
        await self.assertFails(manager.destroyDevice(GUEST, "vbd", "xvdc"), DeviceNotFoundError)
        await manager.destroyDevice(GUEST, "vbd", devid)
        lines = [e for e in events if str(e.get("log_format", "")).startswith("device ")]
        self.assertEqual(
            [(e["op"], e["domid"], e["devclass"], e["devid"], e["vdev"]) for e in lines],
            [
                ("attach", GUEST, "vbd", 51728, "xvdb"),
                ("attach", GUEST, "vbd", "new", None),
                ("detach", GUEST, "vbd", "xvdc", "xvdc"),
                ("detach", GUEST, "vbd", 51728, "xvdb"),
            ],
        )
        outcomes = [e["outcome"] for e in lines]
        self.assertEqual((outcomes[0], outcomes[3]), ("ok", "ok"))
        self.assertTrue(outcomes[1].startswith("fault 10: unknown vbd configuration key"))
        self.assertTrue(outcomes[2].startswith("fault 11: "))
        self.assertTrue(all(e["duration"] >= 0 for e in lines))
        self.assertIn("domain=5 class=vbd devid=51728 (xvdb) outcome=ok", formatEvent(lines[0]))
        self.assertEqual(manager.counts[("create", "vbd", "ok")], 1)
        self.assertEqual(manager.counts[("destroy", "vbd", "no-such-device")], 1)

    async def test_diskSpecParsedOnce(self) -> None:
        """A block attach parses its disk configuration once, its details travel down."""
        parsed = countCalls(self, blkif, "diskSpecFromConfig")
        await self.startDriverDomain()
        devid = await self.manager.createDevice(
            GUEST, "vbd", {"spec": f"{self.image()},raw,xvdb,r"}
        )
        self.assertEqual(len(parsed), 1)
        await self.manager.destroyDevice(GUEST, "vbd", devid)

    async def test_oneClientPerDriverDomain(self) -> None:
        """
        The manager owns the one protocol client of a driver domain: its
        controllers ask it, so they share one lock table; a controller
        made without it reaches no driver domain.
        """
        await self.startDriverDomain()
        vbd = await self.manager.controller(GUEST, "vbd")
        vif = await self.manager.controller(GUEST, "vif")
        client = self.manager.driverDomain(0)
        self.assertIs(vbd._driverDomain(0), client)
        self.assertIs(vif._driverDomain(0), client)
        self.assertEqual(self.manager.knownDriverDomains(), [0])
        alone = BlkifController(self.xs, DomainInfo(GUEST, "/vm/x"))
        self.assertRaises(RuntimeError, alone._driverDomain, 0)

    def test_vifConfigErrors(self) -> None:
        """
        Bad vif fields are refused naming the field, before anything is
        written: a type xl does not know, an ip that is not addresses
        separated by spaces (issue 13, finding 9).
        """
        ctrl = VifController(self.xs, DomainInfo(GUEST, "/vm/x"))
        for bad, field in (
            ({"mac": "01:00:00:00:00:00"}, "multicast"),
            ({"mac": "zz"}, "mac"),
            ({"bridge": "a b"}, "bridge"),
            ({"rate": "fast"}, "rate"),
            ({"script": "../evil"}, "script"),
            ({"colour": "red"}, "colour"),
            ({"type": "junk"}, "invalid type 'junk'"),
            ({"type": "VIF"}, "invalid type"),
            ({"ip": "999.1.1.1"}, "invalid ip '999.1.1.1'"),
            ({"ip": "10.0.0.1 nonsense"}, "'nonsense' is not an IPv4 or IPv6 address"),
            ({"ip": "10.0.0.1/33"}, "invalid ip"),
            ({"ip": "fe80::1%eth0"}, "invalid ip"),
            ({"ip": " "}, "invalid ip"),
            ({"ip": " ".join(["10.0.0.1"] * 40)}, "longer than 256"),
        ):
            e = self.assertRaises(DeviceConfigError, ctrl.getDeviceDetails, bad)
            self.assertIn(field, str(e))

    def test_rateGrammar(self) -> None:
        """xend's rate grammar and stored form."""
        self.assertEqual(parseRate("10Mb/s"), "62500,50000")
        self.assertEqual(parseRate("1MB/s@20ms"), "20000,20000")
        self.assertEqual(parseRate("8000b/s@1s"), "1000,1000000")
        self.assertTrue(randomMac(lambda: 0xFF).startswith("00:16:3e:7f"))


class ClassHookTests(SynchronousTestCase):
    """What differs between device classes, asked of the classes themselves."""

    def test_servedClass(self) -> None:
        """xm's tap expressions go to the tap classes if served, else to vbd."""
        manager = DeviceManager(None, defaultControllers())  # type: ignore[arg-type]
        self.assertEqual(
            [manager.servedClass(c) for c in ("vbd", "tap", "tap2", "vif", "pci")],
            ["vbd", "tap", "tap2", "vif", "pci"],
        )
        manager = DeviceManager(None, {"vbd": BlkifController, "vif": VifController})  # type: ignore[arg-type]
        self.assertEqual([manager.servedClass(c) for c in ("tap", "tap2")], ["vbd", "vbd"])

    def test_devidFromConfig(self) -> None:
        """The device an expression names: a disk's dev, a vif's devid or mac; else none."""
        self.assertEqual(BlkifController.devidFromConfig({"dev": "xvdc:cdrom"}), 51744)
        self.assertEqual(BlkifController.devidFromConfig({"dev": "ioemu:hdc"}), 5632)
        self.assertIsNone(BlkifController.devidFromConfig({"uname": "phy:/dev/sda"}))
        e = self.assertRaises(DeviceConfigError, BlkifController.devidFromConfig, {"dev": "zz"})
        self.assertIn("invalid dev 'zz'", str(e))
        self.assertEqual(VifController.devidFromConfig({"devid": "2", "mac": "x"}), "2")
        self.assertEqual(
            VifController.devidFromConfig({"mac": "00:16:3e:00:00:01"}), "00:16:3e:00:00:01"
        )
        self.assertIsNone(VifController.devidFromConfig({"bridge": "br0"}))
        self.assertIsNone(BlktapController.devidFromConfig({"dev": "xvdb"}))

    def test_listing(self) -> None:
        """A disk is listed with its vdev, a vif with both rings and its id as handle."""
        self.assertEqual(BlkifController.listingFacts(51728), {"vdev": "xvdb"})
        self.assertEqual(BlkifController.deviceName(51728), "xvdb")
        self.assertEqual(VifController.listingFacts(0), {})
        self.assertEqual(VifController.listedFrontendKeys, ("tx-ring-ref", "rx-ring-ref"))
        info = DomainInfo(GUEST, "/vm/x")
        self.assertEqual(VifController(None, info).listingHandle(3), 3)  # type: ignore[arg-type]
        self.assertEqual(BlkifController(None, info).listingHandle(51728), GUEST)  # type: ignore[arg-type]


class RealXenstoredControllerTests(ControllerSuite, RealXenstoredFixture, TestCase):
    """Controllers over the C xenstored."""


class EmbeddedXenstoredControllerTests(ControllerSuite, EmbeddedXenstoredFixture, TestCase):
    """Controllers over the embedded xenstored."""
