"""
One host's activation guard (L{xenddev.localguard}) with the toolstack:
the same image attached read-write to two guests is refused before
anything is written (issue 13, finding 9), C{w!} overrides, read-only
sharing works; the guard survives a restart (it reads the records), a
detach or a rollback gives the target back, a guest that vanished without
a detach does not hold it. Run against both stores; the target names
(L{targetIdentity}) on their own.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from tests.support.fixtures import EmbeddedXenstoredFixture, RealXenstoredFixture
from tests.support.host import HostSuite, startDriverDomain
from tests.support.treedump import dumpTree
from xenddev.controllers import defaultControllers
from xenddev.driverdomain.kinds.blkback import BlkbackKind
from xenddev.errors import FaultCode
from xenddev.interfaces import IActivationGuard
from xenddev.localguard import LocalActivationConflict, LocalGuard, excludes, targetIdentity
from xenddev.pool.errors import ActivationConflict, InvalidTarget
from xenddev.toolstack.activation import RO, RW, SHARED, Grant, activationPath
from xenddev.toolstack.manager import DeviceManager
from xenddev.toolstack.recovery import recoverDevices
from xenddev.xenbus import waitForState

GUESTS = (5, 6, 7)
XVDB = 51728


class TargetIdentityTests(SynchronousTestCase):
    """What a target path is named by."""

    def setUp(self) -> None:
        """A directory with a file and a link to it."""
        self.dir = os.path.realpath(self.mktemp())
        os.makedirs(self.dir)
        self.file = os.path.join(self.dir, "a.img")
        open(self.file, "wb").close()
        self.link = os.path.join(self.dir, "link.img")
        os.symlink(self.file, self.link)

    def test_linkResolved(self) -> None:
        """A link and its file, with or without C{file:}, are one target."""
        expected = f"file:{self.file}"
        for spelling in (self.file, self.link, f"file:{self.link}", self.dir + "/./a.img"):
            self.assertEqual(targetIdentity(spelling), expected, spelling)

    def test_missingOrRemoteAsWritten(self) -> None:
        """
        A missing path, or one a driver domain other than dom0 serves, is
        named as written (normalised); a relative one is under /dev/.
        """
        self.assertEqual(targetIdentity("/no/such/../x.img"), "file:/no/x.img")
        self.assertEqual(targetIdentity(self.link, local=False), f"file:{self.link}")
        self.assertEqual(targetIdentity("nosuchdisk"), "file:/dev/nosuchdisk")

    def test_devicesByNumber(self) -> None:
        """A block device is named by its numbers; C{dev:} names are taken as they are."""
        self.assertEqual(targetIdentity("dev:7:3"), "dev:7:3")
        self.assertEqual(targetIdentity("/dev/null", normalise=lambda p: "dev:1:3"), "dev:1:3")
        self.assertRaises(InvalidTarget, targetIdentity, "dev:seven")
        self.assertRaises(InvalidTarget, targetIdentity, "/a\0b")

    def test_rules(self) -> None:
        """The block script's: a guest never excludes itself; w! never refused."""

        def held(mode: Any, domid: int = 5) -> Grant:
            return Grant("file:/a", mode, domid, f"/vm/x/device/vbd/{domid}", "xvdb")

        self.assertTrue(excludes(RW, 6, held(RO)))
        self.assertTrue(excludes(RW, 6, held(SHARED)))
        self.assertTrue(excludes(RO, 6, held(RW)))
        self.assertFalse(excludes(RO, 6, held(RO)))
        self.assertFalse(excludes(RO, 6, held(SHARED)))
        self.assertFalse(excludes(SHARED, 6, held(RW)))
        self.assertFalse(excludes(RW, 5, held(RW)))


class LocalGuardSuite(HostSuite):
    """The guard under a DeviceManager; mixed with a server fixture and TestCase."""

    async def setUp(self) -> None:
        """A store, three guests, a driver domain (blkback, simulated ends), a guarded manager."""
        self.startServer()
        self.xs = await self.connect()
        self.guard = LocalGuard(self.xs, "h1")
        self.manager = self.managerWith(self.guard)
        for guest in GUESTS:
            await self.manager.registerDomain(guest, name=f"guest-{guest}")
        await startDriverDomain(self, self.xs, 0, [BlkbackKind()], guests=GUESTS)
        self.image = os.path.abspath(self.mktemp())
        with open(self.image, "wb") as f:
            f.truncate(1 << 20)

    def managerWith(self, guard: LocalGuard, createTimeout: float = 10.0) -> DeviceManager:
        """A device manager claiming from C{guard}."""
        return DeviceManager(
            self.xs,
            defaultControllers(),
            createTimeout=createTimeout,
            destroyTimeout=10.0,
            guard=guard,
        )

    async def attach(self, guest: int, mode: str, vdev: str = "xvdb") -> int:
        """Attach the image to C{guest} in C{mode} (C{w!}: xend's form); wait until connected."""
        spec = {"spec": f"{self.image},raw,{vdev},{mode}"}
        if mode == "w!":  # xl has no shared write
            spec = {"uname": f"file:{self.image}", "dev": vdev, "mode": mode}
        devid: int = await self.manager.createDevice(guest, "vbd", spec)
        await waitForState(self.xs, f"/local/domain/{guest}/device/vbd/{devid}", 4, 10)
        return devid

    async def refused(self, guest: int, mode: str) -> LocalActivationConflict:
        """The attach is refused by the guard and the tree is as it was."""
        await self.agentsIdle()
        before = await dumpTree(self.xs)
        spec = {"spec": f"{self.image},raw,xvdc,{mode}"}
        e: LocalActivationConflict = await self.assertFails(
            self.manager.createDevice(guest, "vbd", spec), LocalActivationConflict
        )
        await self.assertTreeIs(before)
        return e

    def test_interface(self) -> None:
        """LocalGuard provides IActivationGuard."""
        self.assertTrue(verifyObject(IActivationGuard, self.guard))

    async def test_twoWritersRefused(self) -> None:
        """
        A second guest is refused the image read-write, or read-only, while
        one writes it: fault 12, naming the holder; nothing is written. The
        grant is in the writer's record.
        """
        await self.attach(5, "w")
        e = await self.refused(6, "w")
        self.assertIsInstance(e, ActivationConflict)
        self.assertEqual(e.faultCode, FaultCode.DEVICE_EXISTS)
        self.assertEqual(e.holder, "h1")
        self.assertIn("domain 5 (xvdb (vbd 51728), read-write)", str(e))
        self.assertIn("w!", str(e))
        await self.refused(6, "r")
        record = await self.manager.controller(5, "vbd")
        base = activationPath(record.devicePath(XVDB))
        self.assertEqual(
            await self.xs.read(f"{base}/target"), f"file:{os.path.realpath(self.image)}"
        )
        self.assertEqual(await self.xs.read(f"{base}/mode"), "rw")
        self.assertEqual(await self.xs.read(f"{base}/token"), "0")

    async def test_sharedWriteOverrides(self) -> None:
        """C{w!} is allowed beside a writer; a later plain writer is refused by both."""
        await self.attach(5, "w")
        await self.attach(6, "w!")
        e = await self.refused(7, "w")
        self.assertIn("domain 6", str(e))

    async def test_readersShare(self) -> None:
        """Readers share the image; a writer is refused while they read."""
        await self.attach(5, "r")
        await self.attach(6, "r")
        e = await self.refused(7, "w")
        self.assertIsNone(e.holder)
        self.assertEqual(e.readers, ("h1",))
        where = await self.guard.where(self.image)
        self.assertIsNone(where["writer"])
        self.assertEqual([d["domain"] for d in where["devices"]], [5, 6])

    async def test_sameGuestTwice(self) -> None:
        """One guest may have the image twice (the block script's same_vm)."""
        await self.attach(5, "w")
        await self.attach(5, "w", vdev="xvdc")

    async def test_detachFrees(self) -> None:
        """Once the writer detaches, another guest may write."""
        await self.attach(5, "w")
        await self.manager.destroyDevice(5, "vbd", "xvdb")
        self.assertEqual(self.guard.grants(), [])
        await self.attach(6, "w")

    async def test_rollbackFrees(self) -> None:
        """An attach that fails after the grant (no backend) gives the target back."""
        await self.driverDomains[0].backend.stop()  # type: ignore[union-attr]
        self.manager = self.managerWith(self.guard, createTimeout=0.3)
        d: Deferred[int] = self.manager.createDevice(5, "vbd", {"spec": f"{self.image},raw,xvdb,w"})
        await self.assertFails(d, Exception)
        self.assertEqual(self.guard.grants(), [])

    async def test_recoveryRollbackFrees(self) -> None:
        """
        A device a killed daemon left half-done (here: its frontend gone) is
        rolled back at start through the detach, which gives its target back.
        """
        await self.attach(5, "w")
        await self.xs.rm(f"/local/domain/5/device/vbd/{XVDB}")
        restarted = LocalGuard(self.xs, "h1")
        await restarted.start()
        self.manager = self.managerWith(restarted)
        (found,) = await recoverDevices(self.manager, 1.0)
        self.assertEqual(found.missing, "no frontend")
        self.assertEqual(restarted.grants(), [])
        await self.attach(6, "w")

    async def test_survivesRestart(self) -> None:
        """A new guard reads the records: it refuses what the first refused."""
        await self.attach(5, "w")
        restarted = LocalGuard(self.xs, "h1")
        self.assertEqual(await restarted.start(), 1)
        self.manager = self.managerWith(restarted)
        await self.refused(6, "w")
        (grant,) = restarted.grants()
        self.assertEqual((grant.domid, grant.mode, grant.device), (5, RW, "xvdb (vbd 51728)"))

    async def test_goneGuestDoesNotHold(self) -> None:
        """A holder whose guest's home vanished (no detach) no longer counts."""
        await self.attach(5, "w")
        await self.xs.rm("/local/domain/5")
        await self.attach(6, "w")
        self.assertEqual([g.domid for g in self.guard.grants()], [6])


class EmbeddedLocalGuardTests(LocalGuardSuite, EmbeddedXenstoredFixture, TestCase):  # type: ignore[misc]
    """On the embedded xenstored."""


class RealLocalGuardTests(LocalGuardSuite, RealXenstoredFixture, TestCase):  # type: ignore[misc]
    """On the C xenstored."""
