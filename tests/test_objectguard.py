"""
C{vdi.*} under the activation guard (L{xenddev.toolstack.objectguard}),
through XML-RPC with one host's guard over a DeviceManager, on both
stores: C{vdi.activate} claims the object's target as an attach does
(refused with the attach's faults, nothing written), sends the grant's
fencing token to the driver domain (a stale one refused, the claim given
back), keeps the grant in the toolstack's record of the object (a
restarted guard holds it again), and C{deactivate}/C{unprepare} give it
back.
"""

from __future__ import annotations

import os
from typing import Any

import attrs
from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail
from twisted.protocols.policies import WrappingFactory
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.server import Site
from zope.interface import implementer

from tests.support.fixtures import EmbeddedXenstoredFixture, RealXenstoredFixture
from tests.support.host import HostSuite, shortTempDir, startDriverDomain
from tests.test_xmlrpc import RPCServerMixin
from xenddev.backendctrl.protocol import VDI, VIF
from xenddev.controllers import defaultControllers
from xenddev.driverdomain.fencing import FencingTokens
from xenddev.driverdomain.kinds.blkback import BlkbackKind
from xenddev.driverdomain.kinds.netback import NetbackKind
from xenddev.errors import FaultCode
from xenddev.interfaces import IActivationGuard
from xenddev.localguard import LocalGuard
from xenddev.pool.errors import SessionNotLive
from xenddev.toolstack.activation import RO, RW, SHARED, Claim, Grant, activationPath
from xenddev.toolstack.manager import DeviceManager
from xenddev.toolstack.objectguard import objectClaim
from xenddev.xenbus import waitForState
from xenddev.xmlrpc import rpcResource

GUEST = 5


class ObjectClaimTests(SynchronousTestCase):
    """What activating an object claims."""

    def test_claim(self) -> None:
        """Its params in its mode (absent: w), for its driver domain, kept in its record."""
        claim = objectClaim(3, VDI, "op1", {"type": "file", "params": "/srv/a.img"})
        self.assertEqual(
            claim,
            Claim("/srv/a.img", RW, 3, "/tool/xenddev/objects/3/vdi/op1", "vdi op1", 3),
        )
        for mode, wanted in (("r", RO), ("w", RW), ("w!", SHARED), ("rw?", RW)):
            found = objectClaim(0, VDI, "d", {"params": "/a", "mode": mode})
            self.assertEqual(found.mode if found else None, wanted, mode)

    def test_nothing(self) -> None:
        """A vif, an empty drive, a target without params claim nothing."""
        self.assertIsNone(objectClaim(0, VIF, "n", {"mac": "00:16:3e:00:00:01"}))
        self.assertIsNone(objectClaim(0, VDI, "d", {"type": "empty", "params": ""}))
        self.assertIsNone(objectClaim(0, VDI, "d", {"type": "file"}))


class TokenGuard(LocalGuard):
    """One host's guard whose grants carry a fencing token, as a pool's do."""

    token = 0

    def acquire(self, claim: Claim) -> Deferred[Grant]:
        async def acquire() -> Grant:
            grant = attrs.evolve(await super(TokenGuard, self).acquire(claim), token=self.token)
            self.hold(grant)
            return grant

        return Deferred.fromCoroutine(acquire())


@implementer(IActivationGuard)
class NotLiveGuard:
    """A pool's guard whose host cannot vouch for its lease."""

    def acquire(self, claim: Claim) -> Deferred[Grant]:
        return fail(SessionNotLive("h1", "fenced"))

    def release(self, grant: Grant) -> Deferred[None]:
        raise AssertionError("nothing was granted")

    def where(self, target: str) -> Any:
        raise NotImplementedError

    def hosts(self) -> Any:
        raise NotImplementedError


class ObjectGuardSuite(RPCServerMixin, HostSuite):
    """vdi.* with a guard; mixed with a server fixture and TestCase."""

    async def setUp(self) -> None:
        """A store, a guest, a driver domain (blkback), a guarded manager served over XML-RPC."""
        self.startServer()
        self.xs = await self.connect()
        self.guard = TokenGuard(self.xs, "h1")
        self.serveWith(self.guard)
        await self.manager.registerDomain(GUEST, name="guest")
        await startDriverDomain(self, self.xs, 0, [BlkbackKind(), NetbackKind()], guests=[GUEST])
        self.image = os.path.realpath(self.mktemp())
        with open(self.image, "wb") as f:
            f.truncate(1 << 20)
        self.target = {"type": "file", "params": self.image, "mode": "w"}
        self.identity = f"file:{self.image}"

    def serveWith(self, guard: Any) -> None:
        """A manager claiming from C{guard}, and the XML-RPC face over both."""
        self.manager = DeviceManager(
            self.xs, defaultControllers(), createTimeout=10.0, destroyTimeout=10.0, guard=guard
        )
        self.rpcPath = os.path.join(shortTempDir(self, "rpc-"), "xenddev.sock")
        self.wrapper = WrappingFactory(Site(rpcResource(self.manager, guard=guard)))
        port = reactor.listenUNIX(self.rpcPath, self.wrapper)  # type: ignore[attr-defined]
        self.addCleanup(self._stopServing, port)

    def spec(self, mode: str) -> dict[str, str]:
        """An attach's configuration: the image as xvdb in C{mode}."""
        return {"spec": f"{self.image},raw,xvdb,{mode}"}

    async def attach(self, mode: str = "w") -> Any:
        """device.attach of the image to the guest in C{mode}: its answer."""
        answer = await self.call(
            "device.attach", GUEST, "vbd", {"spec": f"{self.image},raw,xvdb,{mode}"}
        )
        await waitForState(self.xs, f"/local/domain/{GUEST}/device/vbd/51728", 4, 10)
        return answer

    async def test_activateClaimsDeactivateGivesBack(self) -> None:
        """
        vdi.activate takes the target (kept in the object's record): an
        attach writing it is refused (fault 12, naming the object); after
        vdi.deactivate it is free and the record gone; a whole lifecycle
        leaves the tree as it began.
        """
        before = await self.tree()
        await self.call("vdi.prepare", 0, "op1", self.target)
        self.assertEqual(self.guard.grants(), [])  # prepare claims nothing
        self.assertEqual((await self.call("vdi.activate", 0, "op1"))["state"], "active")
        (grant,) = self.guard.grants()
        self.assertEqual((grant.domid, grant.mode, grant.device), (0, RW, "vdi op1"))
        base = activationPath("/tool/xenddev/objects/0/vdi/op1")
        self.assertEqual(await self.xs.read(f"{base}/target"), self.identity)
        (device,) = (await self.call("pool.where", self.image))["devices"]
        self.assertEqual((device["domain"], device["device"]), (0, "vdi op1"))
        active = await self.tree()
        f = await self.assertFault(
            FaultCode.DEVICE_EXISTS,
            "device.attach",
            GUEST,
            "vbd",
            self.spec("w"),
        )
        self.assertIn("domain 0 (vdi op1, read-write)", f.faultString)
        await self.assertTreeIs(active)
        self.assertEqual((await self.call("vdi.deactivate", 0, "op1"))["state"], "inactive")
        self.assertEqual(self.guard.grants(), [])
        self.assertFalse(await self.xs.exists("/tool/xenddev"))
        self.assertTrue(await self.call("vdi.unprepare", 0, "op1"))
        await self.assertTreeIs(before)
        await self.attach()

    async def test_refusedWhileAGuestWrites(self) -> None:
        """
        While a guest writes the image, vdi.activate of it is refused with
        the attach's fault (12, naming the guest) and nothing is written;
        read-only beside a reader is allowed.
        """
        await self.attach("w")
        await self.call("vdi.prepare", 0, "op1", self.target)
        before = await self.tree()
        f = await self.assertFault(FaultCode.DEVICE_EXISTS, "vdi.activate", 0, "op1")
        self.assertIn("by domain 5 (xvdb (vbd 51728), read-write)", f.faultString)
        await self.assertTreeIs(before)
        await self.call("device.detach", GUEST, "vbd", "xvdb")
        await self.attach("r")
        await self.call("vdi.unprepare", 0, "op1")
        await self.call("vdi.prepare", 0, "op1", {**self.target, "mode": "r"})
        self.assertEqual((await self.call("vdi.activate", 0, "op1"))["state"], "active")
        self.assertEqual(sorted(g.domid for g in self.guard.grants()), [0, GUEST])

    async def test_unprepareGivesBack(self) -> None:
        """vdi.unprepare of an active object (deactivated first) gives its target back."""
        before = await self.tree()
        await self.call("vdi.prepare", 0, "op1", self.target)
        await self.call("vdi.activate", 0, "op1")
        self.assertTrue(await self.call("vdi.unprepare", 0, "op1"))
        self.assertEqual(self.guard.grants(), [])
        await self.assertTreeIs(before)

    async def test_wrongStateClaimsNothing(self) -> None:
        """
        vdi.activate of an active object is the driver domain's fault 17 as
        before, its grant kept; of an unprepared one 11, nothing claimed.
        """
        await self.call("vdi.prepare", 0, "op1", self.target)
        await self.call("vdi.activate", 0, "op1")
        await self.assertFault(FaultCode.WRONG_STATE, "vdi.activate", 0, "op1")
        self.assertEqual(len(self.guard.grants()), 1)
        await self.assertFault(FaultCode.NOT_FOUND, "vdi.activate", 0, "ghost")
        self.assertEqual(len(self.guard.grants()), 1)

    async def test_restartedGuardHoldsIt(self) -> None:
        """
        A restarted guard reads the record of an active object (not of one
        that is gone): it refuses a guest writing the target.
        """
        await self.call("vdi.prepare", 0, "op1", self.target)
        await self.call("vdi.activate", 0, "op1")
        # A record whose object is not active (left by a killed daemon, or
        # a reused driver domain id) holds nothing.
        ghost = activationPath("/tool/xenddev/objects/0/vdi/ghost")
        for node, value in (("target", "file:/srv/g.img"), ("mode", "rw"), ("token", "0")):
            await self.xs.write(f"{ghost}/{node}", value)
        restarted = TokenGuard(self.xs, "h1")
        self.assertEqual(await restarted.start(), 1)
        (grant,) = restarted.grants()
        self.assertEqual((grant.domid, grant.device, grant.target), (0, "vdi op1", self.identity))
        self.serveWith(restarted)
        await self.assertFault(
            FaultCode.DEVICE_EXISTS,
            "device.attach",
            GUEST,
            "vbd",
            self.spec("w"),
        )
        await self.call("vdi.deactivate", 0, "op1")
        self.assertEqual(restarted.grants(), [])

    async def test_tokenSentAndStaleRefused(self) -> None:
        """
        The grant's token goes to the driver domain with the activate; one
        lower than the driver domain served is refused (fault 12, stale
        fencing token): the claim is given back and the tree is as it was.
        The attach's activate is refused alike.
        """
        self.guard.token = 50
        await self.call("vdi.prepare", 0, "op1", self.target)
        await self.call("vdi.activate", 0, "op1")
        fencing = FencingTokens(self.xs, 0)
        self.assertEqual(await fencing.served(self.identity), 50)
        self.assertEqual(
            await self.xs.read(activationPath("/tool/xenddev/objects/0/vdi/op1") + "/token"), "50"
        )
        await self.call("vdi.deactivate", 0, "op1")
        self.guard.token = 49
        before = await self.tree()
        f = await self.assertFault(FaultCode.DEVICE_EXISTS, "vdi.activate", 0, "op1")
        self.assertIn("stale fencing token 49", f.faultString)
        self.assertEqual(self.guard.grants(), [])
        await self.assertTreeIs(before)
        f = await self.assertFault(
            FaultCode.DEVICE_EXISTS,
            "device.attach",
            GUEST,
            "vbd",
            self.spec("w"),
        )
        self.assertIn("stale fencing token 49", f.faultString)
        self.assertEqual(self.guard.grants(), [])
        await self.assertTreeIs(before)

    async def test_poolNotLive(self) -> None:
        """A guard that cannot vouch: fault 16, as for an attach; nothing written."""
        self.serveWith(NotLiveGuard())
        await self.call("vdi.prepare", 0, "op1", self.target)
        before = await self.tree()
        f = await self.assertFault(FaultCode.UNAVAILABLE, "vdi.activate", 0, "op1")
        self.assertIn("not live", f.faultString)
        await self.assertTreeIs(before)


class EmbeddedObjectGuardTests(ObjectGuardSuite, EmbeddedXenstoredFixture, TestCase):  # type: ignore[misc]
    """vdi.* under the guard, on the embedded store."""


class RealXenstoredObjectGuardTests(ObjectGuardSuite, RealXenstoredFixture, TestCase):  # type: ignore[misc]
    """vdi.* under the guard, on the C xenstored."""
