"""
A hostile guest and a backend domain that cannot serve (issue 13, items 3
and 6): the toolstack's device operations must neither stall beyond their
documented timeouts nor leave anything behind, whatever a guest writes in
its own home, and a C{backend=} naming a domain without an agent is
refused before anything is written.

The guest acts through a connection of its own: on the embedded store a
socket bound to the guest's domain id (its permissions, as a real guest's
xenbus connection has); on the C xenstored, which offers no such socket
here, a privileged connection writing what the guest may write (the
storm), and the permission tests run on the embedded store only.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from tests.support.fixtures import EmbeddedXenstoredFixture, RealXenstoredFixture
from tests.support.treedump import dumpTree
from tests.test_controllers import GUEST, ControllerFixture
from xenddev.backendctrl.errors import NoAgentError
from xenddev.backendctrl.protocol import kindsPath
from xenddev.driverdomain.agent import BackendCtrlAgent
from xenddev.driverdomain.kinds.blkback import BlkbackKind
from xenddev.driverdomain.kinds.netback import NetbackKind
from xenddev.errors import FaultCode
from xenddev.toolstack.client import DriverDomainClient
from xenddev.toolstack.controller import DevController, DeviceError, DeviceExistsError
from xenddev.xenbus import waitForState
from xenddev.xenstore.client import XenStoreClient
from xenddev.xenstore.connection import connectXenStore
from xenddev.xenstore.errors import AccessDeniedError
from xenddev.xenstore.paths import Perm

XVDB = 51728


class Storm:
    """
    A guest rewriting its frontend C{state} as fast as its connection
    allows (pipelined, a bounded number in flight), until stopped; counts
    the writes that went through and those refused.
    """

    def __init__(self, xs: XenStoreClient, path: str, inFlight: int = 32) -> None:
        self.xs = xs
        self.path = path
        self.inFlight = inFlight
        self.written = 0
        self.refused = 0
        self._running = False
        self._done: Deferred[None] | None = None

    def start(self) -> None:
        """Start writing."""
        self._running = True
        self._done = Deferred.fromCoroutine(self._run())

    async def _run(self) -> None:
        values = ("1", "3", "4")
        n = 0
        while self._running:
            batch = []
            for _ in range(self.inFlight):
                d = self.xs.write(self.path, values[n % 3])
                n += 1
                batch.append(d)
            for d in batch:
                try:
                    await d
                    self.written += 1
                except Exception:
                    self.refused += 1
            if self.refused and not self.written:
                # Refused from the start (no permission): keep trying, but
                # without spinning the reactor.
                await deferLater(reactor, 0.001, lambda: None)

    async def stop(self) -> None:
        """Stop writing and wait for the last batch."""
        self._running = False
        if self._done is not None:
            await self._done


class HostileGuestSuite(ControllerFixture):
    """Mixed with a server fixture (and its guest connection) and TestCase."""

    #: Whether L{guestConnection} has the guest's permissions.
    guestPermissions = False

    async def guestConnection(self) -> XenStoreClient:
        """A connection acting as the guest (its own permissions where the store allows)."""
        return await self.connect()

    async def stopFrontends(self) -> None:
        """Stop the guest's simulated kernel frontends (a hostile guest has none)."""
        for dd in self.driverDomains:
            for frontend in dd.frontends:
                await frontend.stop()

    async def attached(self) -> None:
        """A read-only disk xvdb attached to the guest, its frontend Connected."""
        path = self.image()
        await self.startDriverDomain()
        await self.manager.createDevice(GUEST, "vbd", {"spec": f"{path},raw,xvdb,r"})
        ctrl = await self.manager.controller(GUEST, "vbd")
        await waitForState(self.xs, ctrl.frontendPath(XVDB), 4, 10)
        # From here on the guest is hostile: nothing of it closes the device.
        await self.stopFrontends()

    async def test_detachUnderStateStorm(self) -> None:
        """
        A guest rewriting its frontend's C{state} in a tight loop while the
        device is detached: the detach still finishes within the destroy
        timeout (forcing if the guest never closes, as documented) and
        leaves no device behind.
        """
        await self.attached()
        self.manager.controllerArgs["destroyTimeout"] = 2.0
        ctrl = await self.manager.controller(GUEST, "vbd")
        guest = await self.guestConnection()
        storm = Storm(guest, f"{ctrl.frontendPath(XVDB)}/state")
        if not self.guestPermissions:
            # A privileged writer would bring the removed frontend back,
            # which a guest may not do: stop writing when it is removed.
            remove = DevController._removeFrontend

            async def stopFirst(controller: DevController, devid: int) -> None:
                await storm.stop()
                await remove(controller, devid)

            self.patch(DevController, "_removeFrontend", stopFirst)
        storm.start()
        started = time.monotonic()
        try:
            await self.manager.destroyDevice(GUEST, "vbd", XVDB)
        finally:
            took = time.monotonic() - started
            await storm.stop()
        self.assertGreater(storm.written, 100)
        self.assertLess(took, 2.0 + 3.0, f"detach took {took:.1f} s")
        self.assertEqual(await ctrl.deviceIDs(), [])
        self.assertFalse(await self.xs.exists(ctrl.backendPath(0, XVDB)))

    async def test_guestMadeFrontendReplaced(self) -> None:
        """
        A frontend directory the guest made before the attach (no record of
        ours or libxl's: guest junk) does not make the attach fail with
        EEXIST: it is replaced, as libxl replaces any frontend directory it
        is about to make; a detach then leaves the tree as before the junk.
        """
        await self.startDriverDomain()
        before = await dumpTree(self.xs)
        ctrl = await self.manager.controller(GUEST, "vbd")
        junk = ctrl.frontendPath(XVDB)
        # Planted with the guest's ownership (a privileged connection: with
        # the device directory the toolstack makes, the guest cannot).
        await self.xs.write(f"{junk}/backend", "/local/domain/0/backend/vbd/6/51728")
        await self.xs.write(f"{junk}/state", "4")
        await self.xs.setPerms(junk, [Perm("n", GUEST)])
        path = self.image()
        await self.manager.createDevice(GUEST, "vbd", {"spec": f"{path},raw,xvdb,r"})
        self.assertEqual(await self.xs.read(f"{junk}/backend"), ctrl.backendPath(0, XVDB))
        await self.manager.destroyDevice(GUEST, "vbd", XVDB)
        await self.assertTreeIs(before)

    async def test_xlFrontendRefused(self) -> None:
        """
        A frontend directory with libxl's record (a disk C{xl} attached) is
        not the guest's: the attach is refused and changes nothing.
        """
        await self.startDriverDomain()
        path = self.image()
        await self.stopFrontends()  # xl's device: nothing of ours drives it
        ctrl = await self.manager.controller(GUEST, "vbd")
        await self.xs.write(f"{ctrl.frontendPath(XVDB)}/state", "4")
        await self.xs.write(f"/libxl/{GUEST}/device/vbd/{XVDB}/frontend", ctrl.frontendPath(XVDB))
        before = await dumpTree(self.xs)
        e = await self.assertFails(
            self.manager.createDevice(GUEST, "vbd", {"spec": f"{path},raw,xvdb,r"}),
            DeviceExistsError,
        )
        self.assertIn("xl", str(e))
        await self.assertTreeIs(before)

    # Item 3: backend= a domain that cannot serve

    async def test_backendDomainMissing(self) -> None:
        """
        C{backend=} a domain that does not exist: refused at once with
        L{NoAgentError} (fault 3) naming it, disks and NICs alike, and
        nothing written.
        """
        await self.startDriverDomain()
        before = await dumpTree(self.xs)
        started = time.monotonic()
        for devclass, config in (
            ("vbd", {"spec": "/dev/null,raw,xvdb,r", "backend": 7}),
            ("vif", {"backend": 9}),
        ):
            e = await self.assertFails(
                self.manager.createDevice(GUEST, devclass, config), NoAgentError
            )
            self.assertEqual(e.faultCode, FaultCode.INVALID_DOMAIN)
            self.assertIn("does not exist", str(e))
        self.assertIn("domain 9", str(e))
        self.assertLess(time.monotonic() - started, 1.0)
        await self.assertTreeIs(before)

    async def test_backendDomainWithoutAgent(self) -> None:
        """
        C{backend=} a domain that exists but runs no agent: its control area
        is offered for the request timeout, then taken back, and the attach
        refused with L{NoAgentError}; a retry gets the same answer (not
        EBUSY), and the tree is as before each time.
        """
        await self.startDriverDomain()
        self.manager.controllerArgs["requestTimeout"] = 0.5
        await self.manager.registerDomain(7, name="no-agent")
        before = await dumpTree(self.xs)
        for _ in range(2):
            e = await self.assertFails(
                self.manager.createDevice(
                    GUEST, "vbd", {"spec": "/dev/null,raw,xvdb,r", "backend": 7}
                ),
                NoAgentError,
            )
            self.assertIn("no agent runs there", str(e))
            await self.assertTreeIs(before)

    async def test_backendDomainGoneSinceSeen(self) -> None:
        """
        A driver domain that served an attach and is then destroyed (its
        home removed): the next attach naming it is refused at once and
        does not make its home again.
        """
        await self.startDriverDomain(3)
        config = {"spec": f"{self.image()},raw,xvdb,r", "backend": 3}
        await self.manager.createDevice(GUEST, "vbd", config)
        await self.manager.destroyDevice(GUEST, "vbd", XVDB)
        await self.agent.stop()
        await self.xs.rm("/local/domain/3")
        before = await dumpTree(self.xs)
        await self.assertFails(self.manager.createDevice(GUEST, "vbd", config), NoAgentError)
        await self.assertTreeIs(before)

    async def test_concurrentAttachesShareTheOffer(self) -> None:
        """
        Several attaches naming one agentless domain at once: one offer of
        its control area, all refused with L{NoAgentError} after one
        request timeout, nothing left.
        """
        await self.startDriverDomain()
        self.manager.controllerArgs["requestTimeout"] = 0.5
        await self.manager.registerDomain(7, name="no-agent")
        before = await dumpTree(self.xs)
        started = time.monotonic()
        attaches = [
            self.manager.createDevice(
                GUEST, "vbd", {"spec": f"/dev/null,raw,xvd{letter},r", "backend": 7}
            )
            for letter in "bcd"
        ]
        for attach in attaches:
            await self.assertFails(attach, NoAgentError)
        self.assertLess(time.monotonic() - started, 0.5 + 0.9)
        await self.assertTreeIs(before)

    async def test_agentComesWithItsArea(self) -> None:
        """
        An agent waiting for its control area (as in a guest driver domain,
        which cannot create it) is found: the offered area lets it start
        and advertise its kinds within the request timeout.
        """
        await self.manager.registerDomain(7, name="late-agent")
        agentXs = await self.connect()
        agent = BackendCtrlAgent(agentXs, 7, [BlkbackKind()])

        async def startWhenOffered() -> None:
            await agentXs.waitFor("/local/domain/7/private", lambda v: v is not None, 10)
            await agent.start()

        starting = Deferred.fromCoroutine(startWhenOffered())
        self.addCleanup(agent.stop)
        await DriverDomainClient(self.xs, 7, timeout=10).checkAgent()
        await starting
        self.assertEqual(await self.xs.read(kindsPath(7)), "blkback")

    async def test_agentSilentLeavesNothing(self) -> None:
        """
        An agent that advertised its kinds but no longer answers: the
        attach fails after the request timeout (not twice that), leaves no
        object or pending request behind, and once an agent answers again
        the same attach succeeds.
        """
        await self.startDriverDomain()
        await self.agent.stop()
        self.manager.controllerArgs["requestTimeout"] = 0.5
        path = self.image()
        config = {"spec": f"{path},raw,xvdb,r"}
        before = await dumpTree(self.xs)
        started = time.monotonic()
        e = await self.assertFails(self.manager.createDevice(GUEST, "vbd", config), DeviceError)
        self.assertIn("did not answer", str(e))
        self.assertLess(time.monotonic() - started, 0.5 + 0.9)
        await self.assertTreeIs(before)
        agent = BackendCtrlAgent(self.agent.xs, 0, [BlkbackKind(), NetbackKind()])
        await agent.start()
        self.addCleanup(agent.stop)
        await self.manager.createDevice(GUEST, "vbd", config)
        await self.manager.destroyDevice(GUEST, "vbd", XVDB)


class EmbeddedHostileGuestTests(HostileGuestSuite, EmbeddedXenstoredFixture, TestCase):
    """On the embedded xenstored, the guest on a socket bound to its domain."""

    guestPermissions = True

    def startServer(self) -> str:
        """The embedded store with a socket for the guest's domain."""
        from xenddev.xenstore.server.threaded import ThreadedXenstored

        workdir = tempfile.mkdtemp(prefix="xsd-")
        self.addCleanup(shutil.rmtree, workdir, True)
        self.socketPath = os.path.join(workdir, "socket")
        self.guestSocket = os.path.join(workdir, "guest")
        self.embedded = ThreadedXenstored(self.socketPath, domainSockets={GUEST: self.guestSocket})
        self.embedded.start()
        self.addCleanup(self.embedded.stop)
        return self.socketPath

    async def test_guestCannotPlantFrontend(self) -> None:
        """
        The guest may only read its C{device} directory (libxl's
        permissions): it cannot create a frontend directory there, before
        an attach or while one is removed.
        """
        before = await dumpTree(self.xs)
        guest = await self.guestConnection()
        for path in ("device/vbd/51728/state", f"/local/domain/{GUEST}/device/vif/0/state"):
            await self.assertFails(guest.write(path, "4"), AccessDeniedError)
        await self.assertTreeIs(before)

    async def guestConnection(self) -> XenStoreClient:
        """A connection with the guest's permissions."""
        client = await connectXenStore(
            reactor, endpoint=UNIXClientEndpoint(reactor, self.guestSocket)
        )
        self.addCleanup(client.disconnect)
        return client


class RealXenstoredHostileGuestTests(HostileGuestSuite, RealXenstoredFixture, TestCase):
    """On the C xenstored (the guest's writes made by a privileged connection)."""
