"""
The driver-domain agent with its real kinds and the real hotplug scripts:
C{block} on real loop devices, C{vif-bridge} on a real bridge inside a
network namespace; hotplug failures and hangs; driver-domain restart.

Only the kernel backend and the guest frontend are simulated
(L{xenddev.simulator}): without a hypervisor nothing else can play them.
The toolstack steps are written out by hand here (the device controllers
wrap them); every test ends by comparing the whole tree with its start.
"""

from __future__ import annotations

import os
import stat
from typing import Any

from twisted.trial.unittest import TestCase

from tests.support.fixtures import EmbeddedXenstoredFixture, RealXenstoredFixture
from tests.support.host import (
    HostSuite,
    attachByProtocol,
    closeBackend,
    detachByProtocol,
    pollUntil,
    startDriverDomain,
    startFrontend,
)
from tests.support.loopdev import (
    acquireLoopTestLock,
    loopDevicesFor,
    makeImage,
    requireLoopDevices,
)
from tests.support.netns import NetNamespace, requireNetns
from tests.support.treedump import dumpTree
from xenddev.backendctrl.errors import DriverDomainError
from xenddev.backendctrl.protocol import VDI, VIF, ObjectClass
from xenddev.driverdomain.agent import BackendCtrlAgent
from xenddev.driverdomain.kinds.blkback import BlkbackKind
from xenddev.driverdomain.kinds.netback import NetbackKind
from xenddev.simulator import BackendSimulator
from xenddev.toolstack.client import DriverDomainClient, PlugResult
from xenddev.toolstack.restart import moveDriverDomain
from xenddev.xenbus import HotplugStatus, waitForHotplugStatus, waitForState

GUEST = 5
VBD_FRONT = f"/local/domain/{GUEST}/device/vbd/51728"
VIF_FRONT = f"/local/domain/{GUEST}/device/vif/0"
TIMEOUT = 20.0


class KindsSuite(HostSuite):
    """Mixed with a server fixture and TestCase."""

    async def startDriverDomain(
        self, domid: int = 0, scriptDir: str = "/etc/xen/scripts", **runnerArgs: Any
    ) -> tuple[BackendCtrlAgent, BackendSimulator]:
        """An agent with the real kinds and hotplug runner, plus the simulated backend."""
        dd = await startDriverDomain(
            self,
            self.xs,
            domid,
            [BlkbackKind(), NetbackKind()],
            hotplug={"scriptDir": scriptDir, **runnerArgs},
        )
        assert dd.backend is not None
        return dd.agent, dd.backend

    async def setUp(self) -> None:
        if not os.path.isdir("/var/log/xen") and os.geteuid() == 0:
            os.makedirs("/var/log/xen")  # the scripts log there or fail (set -e)
        self.startServer()
        self.xs = await self.connect()
        # The guest's home exists before any device, as a toolstack makes it.
        await self.xs.mkdir(f"/local/domain/{GUEST}/device/vbd")
        await self.xs.mkdir(f"/local/domain/{GUEST}/device/vif")
        self.frontend = await startFrontend(self, GUEST)

    async def attach(
        self,
        client: DriverDomainClient,
        name: str,
        target: dict[str, str],
        front: str,
        objectClass: ObjectClass,
    ) -> PlugResult:
        """The toolstack's attach: prepare, plug, frontend, activate."""
        return await attachByProtocol(self.xs, client, name, target, front, objectClass, GUEST)

    async def detach(
        self, client: DriverDomainClient, name: str, plug: PlugResult, objectClass: ObjectClass
    ) -> None:
        """The toolstack's detach: close, wait for Closed, drop the frontend, unplug, unprepare."""
        await detachByProtocol(self.xs, client, name, plug, objectClass, TIMEOUT)

    def image(self) -> str:
        """An 8 MiB image file; its loop devices are detached at cleanup."""
        requireLoopDevices(self)  # type: ignore[arg-type]
        lock = acquireLoopTestLock()
        self.addCleanup(os.close, lock)
        path = os.path.abspath(self.mktemp())
        makeImage(path)
        return path

    # blkback + block

    async def test_pluggedMediumNotChangedInPlace(self) -> None:
        """
        A change of a plugged cdrom holding a medium is refused with EBUSY
        (blkback cannot swap the device it opened; the toolstack replugs),
        leaving the medium in use and the tree as it was.
        """
        img = self.image()
        await self.startDriverDomain()
        client = DriverDomainClient(self.xs, 0, TIMEOUT)
        front = f"/local/domain/{GUEST}/device/vbd/51744"
        target = {"type": "file", "params": img, "mode": "r", "devtype": "cdrom"}
        plug = await self.attach(client, "cd", target, front, VDI)
        await waitForHotplugStatus(self.xs, plug.backendPath, TIMEOUT)
        await waitForState(self.xs, front, 4, TIMEOUT)
        await self.agentsIdle()
        before = await dumpTree(self.xs)
        other = os.path.abspath(self.mktemp())
        makeImage(other)
        e = await self.assertFails(
            client.change("cd", {**target, "params": other}), DriverDomainError
        )
        self.assertEqual(e.errname, "EBUSY")
        self.assertIn("in place", str(e))
        await self.assertTreeIs(before)
        self.assertEqual(len(loopDevicesFor(img)), 1)
        await self.detach(client, "cd", plug, VDI)

    async def test_blockOnLoopDevice(self) -> None:
        """
        A file disk: the agent runs the real block script once active, a loop
        device appears, the simulated backend connects; detach runs block
        remove before the backend goes, the loop device is gone, and the tree
        is exactly as before.
        """
        img = self.image()
        agent, _ = await self.startDriverDomain()
        client = DriverDomainClient(self.xs, 0, TIMEOUT)
        before = await dumpTree(self.xs)
        target = {"type": "file", "params": img, "mode": "w"}
        plug = await self.attach(
            client, "disk1", target, VBD_FRONT, ObjectClass("vdi", "vbd", "vbd")
        )
        status = await waitForHotplugStatus(self.xs, plug.backendPath, TIMEOUT)
        self.assertEqual(status.status, HotplugStatus.Connected)
        (loop,) = loopDevicesFor(img)
        self.assertEqual(await self.xs.read(f"{plug.backendPath}/node"), loop)
        await waitForState(self.xs, plug.backendPath, 4, TIMEOUT)
        await waitForState(self.xs, VBD_FRONT, 4, TIMEOUT)
        await self.detach(client, "disk1", plug, ObjectClass("vdi", "vbd", "vbd"))
        # The kernel may release a loop device a moment after losetup -d.
        await pollUntil(lambda: loopDevicesFor(img) == [], TIMEOUT)
        await self.assertTreeIs(before, agent)

    async def test_blockFailureReported(self) -> None:
        """
        The block script fails (a read-only image asked for read-write):
        hotplug-status=busy with the script's hotplug-error reaches the
        toolstack; detaching afterwards restores the tree.
        """
        img = self.image()
        os.chmod(img, stat.S_IRUSR)
        agent, _ = await self.startDriverDomain()
        client = DriverDomainClient(self.xs, 0, TIMEOUT)
        before = await dumpTree(self.xs)
        target = {"type": "file", "params": img, "mode": "w"}
        plug = await self.attach(client, "ro", target, VBD_FRONT, ObjectClass("vdi", "vbd", "vbd"))
        status = await waitForHotplugStatus(self.xs, plug.backendPath, TIMEOUT)
        self.assertIn(status.status, (HotplugStatus.Busy, HotplugStatus.Error))
        self.assertTrue(status.error)
        self.assertEqual(loopDevicesFor(img), [])
        await self.detachUnconnected(client, "ro", plug)
        await self.assertTreeIs(before, agent)

    async def detachUnconnected(
        self, client: DriverDomainClient, name: str, plug: PlugResult
    ) -> None:
        """Detach a device whose backend never connected (the guest closes at once)."""
        await self.detach(client, name, plug, ObjectClass("vdi", "vbd", "vbd"))

    async def test_hangingScriptKilled(self) -> None:
        """
        A hotplug script that hangs is killed at the timeout; the agent
        reports hotplug-status=error naming the timeout; the device is then
        detached and the tree is as before.
        """
        scripts = os.path.abspath(self.mktemp())
        os.makedirs(scripts)
        hang = os.path.join(scripts, "hang")
        with open(hang, "w") as f:
            f.write("#!/bin/sh\nexec sleep 600\n")
        os.chmod(hang, 0o755)
        img = os.path.abspath(self.mktemp())
        with open(img, "wb") as f:
            f.truncate(1 << 20)
        agent, _ = await self.startDriverDomain(scriptDir=scripts, timeout=0.5)
        client = DriverDomainClient(self.xs, 0, TIMEOUT)
        before = await dumpTree(self.xs)
        target = {"type": "file", "params": img, "script": "hang"}
        plug = await self.attach(client, "h", target, VBD_FRONT, ObjectClass("vdi", "vbd", "vbd"))
        status = await waitForHotplugStatus(self.xs, plug.backendPath, TIMEOUT)
        self.assertEqual(status.status, HotplugStatus.Error)
        self.assertIn("0.5", status.error or "")
        await self.detach(client, "h", plug, ObjectClass("vdi", "vbd", "vbd"))
        await self.assertTreeIs(before, agent)

    async def test_closedBackendGetsRemoveScript(self) -> None:
        """
        The agent's hotplug dispatcher runs the remove script as soon as the
        backend is Closed with online=0, before (and without) any unplug
        request; the unplug that follows does not run it again.
        """
        scripts = os.path.abspath(self.mktemp())
        os.makedirs(scripts)
        runs = os.path.join(scripts, "runs")
        record = os.path.join(scripts, "record")
        with open(record, "w") as f:
            f.write(f'#!/bin/sh\necho "$1" >> {runs}\n')
        os.chmod(record, 0o755)

        def actions() -> list[str]:
            if not os.path.exists(runs):
                return []
            with open(runs) as f:
                return f.read().split()

        img = os.path.abspath(self.mktemp())
        with open(img, "wb") as f:
            f.truncate(1 << 20)
        agent, _ = await self.startDriverDomain(scriptDir=scripts)
        client = DriverDomainClient(self.xs, 0, TIMEOUT)
        vbd = ObjectClass("vdi", "vbd", "vbd")
        before = await dumpTree(self.xs)
        target = {"type": "file", "params": img, "script": "record"}
        plug = await self.attach(client, "rec", target, VBD_FRONT, vbd)
        await pollUntil(lambda: actions() == ["add"], TIMEOUT)
        await closeBackend(self.xs, plug, TIMEOUT)
        await pollUntil(lambda: actions() == ["add", "remove"], TIMEOUT)
        await self.xs.rm(plug.frontendPath)
        await client.unplug("rec", "p0", vbd)
        await client.deactivate("rec", vbd)
        await client.unprepare("rec", vbd)
        await self.assertTreeIs(before, agent)
        self.assertEqual(actions(), ["add", "remove"])

    # netback + vif-bridge

    async def test_vifBridge(self) -> None:
        """
        A vif: vif-bridge online (inside a network namespace with a real
        bridge and a tap standing in for netback's vif5.0) puts the interface
        on the bridge; detach runs offline and takes it off; tree as before.
        """
        requireNetns(self)  # type: ignore[arg-type]
        ns = NetNamespace()
        ns.create()
        self.addCleanup(ns.delete)
        ns.addBridge("xdbr0")
        ns.addTap(f"vif{GUEST}.0")
        agent, _ = await self.startDriverDomain(wrapper=ns.wrapper)
        client = DriverDomainClient(self.xs, 0, TIMEOUT)
        before = await dumpTree(self.xs)
        target = {"mac": "00:16:3e:12:34:56", "bridge": "xdbr0"}
        plug = await self.attach(client, "nic0", target, VIF_FRONT, VIF)
        status = await waitForHotplugStatus(self.xs, plug.backendPath, TIMEOUT)
        self.assertEqual(status.status, HotplugStatus.Connected)
        link = ns.link(f"vif{GUEST}.0")
        assert link is not None
        self.assertEqual(link.get("master"), "xdbr0")
        await self.detach(client, "nic0", plug, VIF)
        link = ns.link(f"vif{GUEST}.0")
        assert link is not None
        self.assertEqual(link.get("master"), None)
        await self.assertTreeIs(before, agent)

    # Driver-domain restart

    async def test_driverDomainRestart(self) -> None:
        """
        Driver domain 1 serves a disk and dies; the toolstack moves it to
        driver domain 2 in one operation: the guest's frontend directory is
        never removed, now points at domain 2's backend, which is connected
        (real block script, new loop device).
        """
        img = self.image()
        oldAgent, oldBackend = await self.startDriverDomain(1)
        await self.startDriverDomain(2)
        client = DriverDomainClient(self.xs, 1, TIMEOUT)
        vdi = ObjectClass("vdi", "vbd", "vbd")
        plug = await self.attach(client, "d", {"type": "file", "params": img}, VBD_FRONT, vdi)
        await waitForState(self.xs, VBD_FRONT, 4, TIMEOUT)
        # Domain 1 dies: its agent and kernel backend stop answering.
        await oldAgent.stop()
        await oldBackend.stop()
        (moved,) = await moveDriverDomain(self.xs, 1, 2, TIMEOUT)
        newBackend = moved.backends["p0"]
        self.assertEqual(newBackend, f"/local/domain/2/backend/vbd/{GUEST}/51728")
        self.assertEqual(await self.xs.read(f"{VBD_FRONT}/backend"), newBackend)
        self.assertEqual(await self.xs.read(f"{VBD_FRONT}/backend-id"), "2")
        status = await waitForHotplugStatus(self.xs, newBackend, TIMEOUT)
        self.assertEqual(status.status, HotplugStatus.Connected)
        await waitForState(self.xs, newBackend, 4, TIMEOUT)
        # The move set the frontend back to Initialising; it reconnects.
        await waitForState(self.xs, VBD_FRONT, 4, TIMEOUT)
        self.assertIn("r2", [str(p) for p in await self.xs.getPerms(VBD_FRONT)])
        self.assertFalse(await self.xs.exists("/local/domain/1/backendctrl/vdi/d"))
        (info,) = await DriverDomainClient(self.xs, 2).list()
        self.assertEqual((info.name, info.state), ("d", "active"))
        del plug


class RealXenstoredKindsTests(KindsSuite, RealXenstoredFixture, TestCase):
    """Real kinds and scripts over the C xenstored."""


class EmbeddedXenstoredKindsTests(KindsSuite, EmbeddedXenstoredFixture, TestCase):
    """Real kinds and scripts over the embedded xenstored."""
