"""
L{xenddev.toolstack.reaper}: the devices of a guest destroyed behind our back (its
home and C{/vm} records removed, as C{xl destroy} does) are released from
what the driver domain's control area holds, remove scripts included; a
live guest's devices and unplugged objects are left alone. Over the C
xenstored and the embedded one.
"""

from __future__ import annotations

import os

from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.support.fixtures import EmbeddedXenstoredFixture, RealXenstoredFixture
from tests.support.host import pollUntil, startFrontend
from tests.support.loopdev import acquireLoopTestLock, loopDevicesFor, requireLoopDevices
from tests.support.treedump import Tree, dumpTree
from tests.test_controllers import GUEST, ControllerFixture
from xenddev.interfaces import ITransaction
from xenddev.toolstack.reaper import DeadDomainReaper, frontendDomain

OTHER = 6


def _without(tree: Tree, *roots: str) -> Tree:
    """C{tree} less the subtrees at C{roots}."""
    return {
        p: v for p, v in tree.items() if not any(p == r or p.startswith(r + "/") for r in roots)
    }


class FrontendDomainTests(SynchronousTestCase):
    """L{frontendDomain} reads a guest from a frontend path, and nothing else."""

    def test_frontendDomain(self) -> None:
        """Frontend paths give their domain; anything else gives None."""
        self.assertEqual(frontendDomain("/local/domain/7/device/vbd/51712"), 7)
        for other in (None, "", "/local/domain/7", "/local/domain/x/device/vbd/1", "/vm/7"):
            self.assertIsNone(frontendDomain(other))


class ReaperSuite(ControllerFixture):
    """Mixed with a server fixture and TestCase."""

    def reaper(self) -> DeadDomainReaper:
        """A reaper over driver domain 0 with the manager's protocol clients."""
        return DeadDomainReaper(self.xs, lambda: [0], self.manager.driverDomain)

    async def destroyBehindOurBack(self, domid: int) -> list[str]:
        """Remove a guest's home and vm records in one transaction (libxl's destroy)."""
        vm = await self.xs.read(f"/local/domain/{domid}/vm")

        async def rm(tx: ITransaction) -> None:
            await tx.rm(f"/local/domain/{domid}")
            await tx.rm(vm)

        await self.xs.transact(rm)
        return [f"/local/domain/{domid}", vm]

    async def test_deadGuestReleased(self) -> None:
        """
        A vbd on a loop device (real block script) of a guest destroyed
        behind our back is torn down: remove script run (loop
        device gone), objects, backends and plug records removed; the tree
        is what it was before the attach, less the guest.
        """
        requireLoopDevices(self)  # type: ignore[arg-type]
        lock = acquireLoopTestLock()
        self.addCleanup(os.close, lock)
        img = self.image(8 << 20)
        await self.startDriverDomain(hotplug=True, scriptDir=self.scripts())
        await self.manager.registerDomain(OTHER, name="other")
        # The other guest is alive: its frontend answers, so the detach
        # below closes at once instead of waiting out the destroy timeout.
        await startFrontend(self, OTHER)
        before = await dumpTree(self.xs)
        await self.manager.createDevice(GUEST, "vbd", {"spec": f"{img},raw,xvdb,w"})
        other = await self.manager.createDevice(
            OTHER, "vbd", {"spec": f"{self.image()},raw,xvdc,r"}
        )
        self.assertEqual(len(loopDevicesFor(img)), 1)
        gone = await self.destroyBehindOurBack(GUEST)
        reaper = self.reaper()
        self.assertEqual(await reaper.scan(), 1)
        await pollUntil(lambda: loopDevicesFor(img) == [])
        # The other guest's disk is untouched; once detached, the tree is
        # the one before the attach less the dead guest.
        self.assertEqual(await reaper.scan(), 0)
        await self.manager.destroyDevice(OTHER, "vbd", other)
        await self.assertTreeIs(_without(before, *gone))

    async def test_watchReleases(self) -> None:
        """
        Started, the reaper scans on @releaseDomain by itself (xenstored
        fires the watch once at registration, so a guest that died while no
        daemon ran is released at start); a vbd and a vif go.
        """
        await self.startDriverDomain()
        before = await dumpTree(self.xs)
        await self.manager.createDevice(GUEST, "vbd", {"spec": f"{self.image()},raw,xvdb,w"})
        await self.manager.createDevice(GUEST, "vif", {"mac": "00:16:3e:00:00:01"})
        gone = await self.destroyBehindOurBack(GUEST)
        reaper = self.reaper()
        await reaper.start()
        self.addCleanup(reaper.stop)
        await pollUntil(lambda: reaper.released == 2)
        await self.assertTreeIs(_without(before, *gone))

    async def test_unpluggedObjectsLeftAlone(self) -> None:
        """An object without plugs (vdi.* of its own) is not the reaper's."""
        await self.startDriverDomain()
        client = self.manager.driverDomain(0)
        await client.prepare("mine", {"type": "file", "params": self.image()})
        self.addCleanup(client.teardown, "mine")
        self.assertEqual(await self.reaper().scan(), 0)
        (info,) = await client.list()
        self.assertEqual(info.state, "inactive")

    def scripts(self) -> str:
        """The real hotplug scripts."""
        return "/etc/xen/scripts"


class RealXenstoredReaperTests(ReaperSuite, RealXenstoredFixture, TestCase):
    """Against the real C xenstored."""


class EmbeddedXenstoredReaperTests(ReaperSuite, EmbeddedXenstoredFixture, TestCase):
    """Against the embedded xenstored."""
