"""
The XML-RPC service end to end: C{rpcSite(manager)} listens on a real UNIX
socket in the test process; the stdlib C{xmlrpc.client} (in a thread, with
the CLI's UNIX transport) calls it; the DeviceManager drives the driver-domain
agent (blkback, netback, no hotplug scripts) with simulated backends and
frontends, over the C xenstored and the embedded one.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import xmlrpc.client
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.logger import Logger, globalLogPublisher
from twisted.protocols.policies import WrappingFactory
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.support.fixtures import EmbeddedXenstoredFixture, RealXenstoredFixture
from tests.support.treedump import diffTrees, dumpTree
from tests.support.xenstoresuite import deferredTest
from xenddev.cli import serverProxy
from xenddev.controller import (
    DeviceConfigError,
    DeviceError,
    DeviceExistsError,
    DeviceNotFoundError,
    HotplugFailedError,
    UnknownDomainError,
)
from xenddev.driverdomain.agent import BackendCtrlAgent
from xenddev.driverdomain.client import DriverDomainClient
from xenddev.driverdomain.errors import DriverDomainTimeout
from xenddev.driverdomain.kinds.blkback import BlkbackKind
from xenddev.driverdomain.kinds.netback import NetbackKind
from xenddev.hotplug import HotplugRunner
from xenddev.simulator import BackendSimulator, FrontendSimulator
from xenddev.sxp import SxpError
from xenddev.toolstack import DeviceManager
from xenddev.xenbus import waitForState
from xenddev.xenstore.errors import (
    AccessDeniedError,
    TransactionRetriesExhausted,
    XenStoreConnectionLost,
    XenStoreTimeout,
)
from xenddev.xmlrpc import FaultCode, rpcSite, toFault

GUEST = 5

EXPECTED_METHODS = {
    "xend.domain.device_create",
    "xend.domain.device_configure",
    "xend.domain.destroyDevice",
    "xend.domain.getDeviceSxprs",
    "xend.domain.waitForDevices",
    "xend.domain.getBlockDeviceClass",
    "device.attach",
    "device.detach",
    "device.list",
    "device.configure",
    "device.classes",
    "daemon.status",
    "system.listMethods",
    "system.methodHelp",
    "system.methodSignature",
}


def blockingCall(path: str, method: str, *args: Any) -> Any:
    """One call with a fresh proxy, closed afterwards (runs in a thread)."""
    proxy = serverProxy(path, timeout=60)
    try:
        return getattr(proxy, method)(*args)
    finally:
        proxy("close")()


class RPCServerMixin:
    """Serves rpcSite(manager) on a UNIX socket for the test; calls it from threads."""

    addCleanup: Any
    fail: Any
    assertEqual: Any
    assertNotIn: Any

    def serveRPC(self, manager: Any) -> str:
        """Listen on a fresh socket; stop and drop every connection at cleanup."""
        workdir = tempfile.mkdtemp(prefix="rpc-")
        self.addCleanup(shutil.rmtree, workdir, True)
        self.rpcPath = os.path.join(workdir, "xenddev.sock")
        self.wrapper = WrappingFactory(rpcSite(manager))
        port = reactor.listenUNIX(self.rpcPath, self.wrapper)  # type: ignore[attr-defined]
        self.addCleanup(self._stopServing, port)
        return self.rpcPath

    async def _stopServing(self, port: Any) -> None:
        await port.stopListening()
        for _ in range(200):
            if not self.wrapper.protocols:
                return
            await deferLater(reactor, 0.01, lambda: None)
        for proto in list(self.wrapper.protocols):
            proto.transport.abortConnection()
        await deferLater(reactor, 0.01, lambda: None)

    def call(self, method: str, *args: Any) -> Deferred[Any]:
        """Call a method (in a thread, with the stdlib client)."""
        return deferToThread(blockingCall, self.rpcPath, method, *args)

    async def assertFault(self, code: int, method: str, *args: Any) -> xmlrpc.client.Fault:
        """The call fails with this fault code and no traceback text."""
        try:
            result = await self.call(method, *args)
        except xmlrpc.client.Fault as f:
            self.assertEqual(f.faultCode, int(code), f.faultString)
            self.assertNotIn("Traceback", f.faultString)
            self.assertNotIn('File "', f.faultString)
            return f
        self.fail(f"{method}{args!r} returned {result!r} instead of fault {int(code)}")
        raise AssertionError("unreachable")


class DeviceServiceFixture(RPCServerMixin):
    """
    A DeviceManager for guest 5 with a local driver domain, served on a UNIX
    socket; mixed with a server fixture and TestCase (also by test_cli).
    """

    startServer: Any
    connect: Any
    socketPath: str
    mktemp: Any
    assertIn: Any
    assertTrue: Any
    assertIsInstance: Any
    flushLoggedErrors: Any

    async def _setUp(self) -> None:
        self.startServer()
        self.xs = await self.connect()
        self.manager = DeviceManager(self.xs, createTimeout=10.0, destroyTimeout=10.0)
        await self.manager.registerDomain(GUEST, name="guest")
        await self.startDriverDomain(0)
        self.serveRPC(self.manager)

    def setUp(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._setUp())

    async def startDriverDomain(self, domid: int, runner: Any = None) -> BackendCtrlAgent:
        """The agent (blkback, netback), simulated backends and guest frontends."""
        xs = await self.connect()
        agent = BackendCtrlAgent(xs, domid, [BlkbackKind(), NetbackKind()], runner)
        await DriverDomainClient(self.xs, domid).ensureArea()
        sims: list[Any] = [BackendSimulator(xs, domid)]
        if domid == 0:
            sims.append(FrontendSimulator(await self.connect(), GUEST))
        for sim in sims:
            await sim.start()
            self.addCleanup(sim.stop)
        await agent.start()
        self.addCleanup(agent.stop)
        self.agents = [*getattr(self, "agents", []), agent]
        return agent

    def image(self) -> str:
        """A 1 MiB image file."""
        path = os.path.abspath(self.mktemp())
        with open(path, "wb") as f:
            f.truncate(1 << 20)
        return path

    async def tree(self) -> dict[str, Any]:
        """The whole store, once the agents are idle."""
        for agent in self.agents:
            await agent.whenIdle()
        return await dumpTree(self.xs)

    async def connected(self, devclass: str, devid: int) -> None:
        """Wait until the simulated guest has connected the device."""
        await waitForState(self.xs, f"/local/domain/{GUEST}/device/{devclass}/{devid}", 4, 10)

    async def assertTreeIs(self, before: dict[str, Any]) -> None:
        """Nothing changed in XenStore."""
        self.assertEqual(diffTrees(before, await self.tree()), [])


class XMLRPCSuite(DeviceServiceFixture):
    """The XML-RPC tests; mixed with a server fixture and TestCase."""

    # Introspection

    @deferredTest
    async def test_introspection(self) -> None:
        """listMethods names every method; methodHelp and methodSignature describe them."""
        methods = set(await self.call("system.listMethods"))
        self.assertEqual(methods & EXPECTED_METHODS, EXPECTED_METHODS)
        helpText = await self.call("system.methodHelp", "device.attach")
        self.assertIn("attach(dom, class, config)", helpText)
        helpText = await self.call("system.methodHelp", "xend.domain.device_create")
        self.assertIn("(vbd (uname phy:/dev/sda)", helpText)
        sig = await self.call("system.methodSignature", "device.detach")
        self.assertEqual(sig, [["boolean", "int", "string", "int", "boolean"]])
        status = await self.call("daemon.status")
        self.assertEqual(status["classes"], ["tap", "tap2", "vbd", "vif"])
        self.assertEqual(status["in-flight"], 0)
        self.assertEqual(await self.call("device.classes"), ["tap", "tap2", "vbd", "vif"])

    # Block devices

    @deferredTest
    async def test_vbdModernNamespace(self) -> None:
        """device.attach / list / detach of an xl spec; the tree ends as it began."""
        img = self.image()
        before = await self.tree()
        result = await self.call("device.attach", GUEST, "vbd", {"spec": f"{img},raw,xvdb,r"})
        self.assertEqual(result, {"domain": GUEST, "class": "vbd", "devid": 51728})
        await self.connected("vbd", 51728)
        (row,) = await self.call("device.list", GUEST)
        self.assertEqual(row["class"], "vbd")
        self.assertEqual(row["vdev"], "xvdb")
        self.assertEqual(row["backend-id"], 0)
        self.assertEqual(row["backend-path"], f"/local/domain/0/backend/vbd/{GUEST}/51728")
        self.assertEqual(await self.call("device.list", GUEST, "vif"), [])
        self.assertEqual(await self.call("device.list", "guest", "vbd"), [row])
        self.assertTrue(await self.call("device.detach", GUEST, "vbd", "xvdb"))
        self.assertEqual(await self.call("device.list", GUEST), [])
        await self.assertTreeIs(before)

    @deferredTest
    async def test_vbdXendNamespace(self) -> None:
        """
        xm's calls: device_create with a nested array and with text,
        getDeviceSxprs, getBlockDeviceClass, waitForDevices, destroyDevice.
        """
        img = self.image()
        before = await self.tree()
        sxpr = ["vbd", ["uname", f"file:{img}"], ["dev", "xvdc"], ["mode", "r"]]
        self.assertEqual(
            await self.call("xend.domain.device_create", GUEST, sxpr),
            ["vbd", ["dom", GUEST, "id", 51744]],
        )
        text = f'(vbd (uname "file:{img}") (dev xvdd) (mode r))'
        self.assertEqual(
            await self.call("xend.domain.device_create", str(GUEST), text),
            ["vbd", ["dom", GUEST, "id", 51760]],
        )
        sxprs = await self.call("xend.domain.getDeviceSxprs", GUEST, "vbd")
        self.assertEqual([s[0] for s in sxprs], [51744, 51760])
        self.assertIn(["virtual-device", "51744"], sxprs[0][1])
        self.assertEqual(await self.call("xend.domain.getBlockDeviceClass", GUEST, "xvdc"), "vbd")
        self.assertTrue(await self.call("xend.domain.waitForDevices", GUEST))
        self.assertTrue(
            await self.call("xend.domain.destroyDevice", GUEST, "vbd", 51744, False, False)
        )
        self.assertTrue(await self.call("xend.domain.destroyDevice", GUEST, "vbd", "xvdd"))
        self.assertEqual(await self.call("xend.domain.getBlockDeviceClass", GUEST, "xvdc"), None)
        await self.assertTreeIs(before)

    # Network interfaces

    @deferredTest
    async def test_vifBothNamespaces(self) -> None:
        """vifs through device.attach and device_create; detached by MAC and by devid."""
        before = await self.tree()
        mac = "00:16:3e:01:02:03"
        result = await self.call("device.attach", GUEST, "vif", {"mac": mac, "bridge": "br0"})
        self.assertEqual(result["devid"], 0)
        created = await self.call(
            "xend.domain.device_create", GUEST, "(vif (mac 00:16:3e:01:02:04) (rate 10Mb/s))"
        )
        self.assertEqual(created, ["vif", ["dom", GUEST, "id", 1]])
        rows = await self.call("device.list", GUEST, "vif")
        self.assertEqual([(r["devid"], r["mac"]) for r in rows], [(0, mac), (1, mac[:-1] + "4")])
        self.assertTrue(await self.call("device.detach", GUEST, "vif", mac, True))
        self.assertTrue(await self.call("xend.domain.destroyDevice", GUEST, "vif", "1", 0))
        await self.assertTreeIs(before)

    # Errors

    @deferredTest
    async def test_badConfigFaults(self) -> None:
        """Bad specs, s-expressions, classes and argument types: fault 10, nothing written."""
        before = await self.tree()
        f = await self.assertFault(
            FaultCode.BAD_CONFIG, "device.attach", GUEST, "vbd", {"spec": "/x,raw,nonsense,w"}
        )
        self.assertIn("config parsing error in disk specification", f.faultString)
        f = await self.assertFault(
            FaultCode.BAD_CONFIG, "xend.domain.device_create", GUEST, "(vbd (dev xvda)"
        )
        self.assertIn("line 1, column 1", f.faultString)
        f = await self.assertFault(FaultCode.BAD_CONFIG, "device.attach", GUEST, "pci", {})
        self.assertIn("unknown device class 'pci' (known: tap, tap2, vbd, vif)", f.faultString)
        f = await self.assertFault(FaultCode.BAD_CONFIG, "device.attach", GUEST, "vif", [])
        self.assertIn("config must be a struct", f.faultString)
        f = await self.assertFault(
            FaultCode.BAD_CONFIG, "device.attach", GUEST, "vif", {"colour": "red"}
        )
        self.assertIn("colour", f.faultString)
        f = await self.assertFault(FaultCode.BAD_CONFIG, "device.attach", GUEST, "vif")
        self.assertEqual(
            "device.attach(dom, class, config) takes 3 argument(s), not 2", f.faultString
        )
        f = await self.assertFault(FaultCode.BAD_CONFIG, "device.list")
        self.assertIn("device.list(dom, [class]) takes 1 to 2 argument(s), not 0", f.faultString)
        await self.assertFault(FaultCode.BAD_CONFIG, "device.list", [GUEST])
        await self.assertFault(FaultCode.BAD_CONFIG, "device.detach", GUEST, "vbd", "xvdb", "maybe")
        await self.assertFault(FaultCode.BAD_CONFIG, "device.detach", GUEST, "vbd", -1)
        await self.assertFault(FaultCode.BAD_CONFIG, "xend.domain.device_create", GUEST, 5)
        await self.assertTreeIs(before)

    @deferredTest
    async def test_invalidDomainFaults(self) -> None:
        """Out-of-range ids, unknown domains and unknown names: fault 3."""
        before = await self.tree()
        f = await self.assertFault(FaultCode.INVALID_DOMAIN, "device.list", 70000)
        self.assertIn("must be 0..32751", f.faultString)
        f = await self.assertFault(
            FaultCode.INVALID_DOMAIN, "device.attach", 77, "vbd", {"spec": "/x,raw,xvdb,w"}
        )
        self.assertIn("Domain 77 does not exist", f.faultString)
        f = await self.assertFault(FaultCode.INVALID_DOMAIN, "device.list", "nosuchguest")
        self.assertIn("no domain named 'nosuchguest'", f.faultString)
        await self.assertFault(FaultCode.INVALID_DOMAIN, "xend.domain.waitForDevices", 77)
        await self.assertTreeIs(before)

    @deferredTest
    async def test_deviceExistsAndMissing(self) -> None:
        """A duplicate vdev: fault 12, the first untouched; a missing device: fault 11."""
        img = self.image()
        await self.call("device.attach", GUEST, "vbd", {"spec": f"{img},raw,xvdb,r"})
        await self.connected("vbd", 51728)
        before = await self.tree()
        f = await self.assertFault(
            FaultCode.DEVICE_EXISTS, "device.attach", GUEST, "vbd", {"spec": f"{img},raw,xvdb,r"}
        )
        self.assertEqual(f.faultString, "Device 51728 is already connected.")
        await self.assertTreeIs(before)
        await self.assertFault(FaultCode.NO_SUCH_DEVICE, "device.detach", GUEST, "vbd", "xvdc")
        await self.assertFault(
            FaultCode.NO_SUCH_DEVICE, "device.detach", GUEST, "vif", "00:16:3e:00:00:09"
        )
        await self.assertFault(
            FaultCode.NO_SUCH_DEVICE, "xend.domain.destroyDevice", GUEST, "vbd", 51760, True, False
        )
        await self.call("device.detach", GUEST, "vbd", 51728)

    @deferredTest
    async def test_genericFaults(self) -> None:
        """
        Fault 2: the driver domain refuses (a missing image on a remote
        backend), and vbds cannot be reconfigured; nothing is left behind.
        """
        await self.startDriverDomain(3)
        before = await self.tree()
        f = await self.assertFault(
            FaultCode.GENERIC,
            "device.attach",
            GUEST,
            "vbd",
            {"spec": "/nonexistent/disk.img,raw,xvdb,w", "backend": 3},
        )
        self.assertIn("could not be connected", f.faultString)
        await self.assertTreeIs(before)
        f = await self.assertFault(
            FaultCode.GENERIC,
            "xend.domain.device_configure",
            GUEST,
            "(vbd (uname file:/x.iso) (dev xvdc:cdrom) (mode r))",
        )
        self.assertIn("vbd devices may not be reconfigured", f.faultString)
        await self.assertFault(
            FaultCode.BAD_CONFIG, "xend.domain.device_configure", GUEST, "(vif (bridge br0))"
        )

    @deferredTest
    async def test_hotplugFailedFault(self) -> None:
        """A hotplug script that never reports: fault 15, xend's message, nothing left."""
        scripts = os.path.abspath(self.mktemp())
        os.makedirs(scripts)
        with open(os.path.join(scripts, "hang"), "w") as f:
            f.write("#!/bin/sh\nexec sleep 600\n")
        os.chmod(os.path.join(scripts, "hang"), 0o755)
        xs = await self.connect()
        runner = HotplugRunner(scripts, xenstore=xs, xenstoredPath=self.socketPath, timeout=1.0)
        await self.startDriverDomain(4, runner)
        self.manager.controllerArgs["createTimeout"] = 0.5
        before = await self.tree()
        img = self.image()
        fault = await self.assertFault(
            FaultCode.HOTPLUG_FAILED,
            "device.attach",
            GUEST,
            "vbd",
            {"spec": f"{img},raw,xvdb,w,script=hang", "backend": 4},
        )
        self.assertEqual(
            fault.faultString,
            "Device 51728 (vbd) could not be connected. Hotplug scripts not working.",
        )
        await self.assertTreeIs(before)

    @deferredTest
    async def test_unknownMethod(self) -> None:
        """An unknown method gets Twisted's fault 8001."""
        await self.assertFault(8001, "device.explode", GUEST)
        await self.assertFault(8001, "xend.domain.device_explode", GUEST)

    @deferredTest
    async def test_operationLogLines(self) -> None:
        """Each device operation logs one line: domain, class, devid, outcome, duration."""
        events: list[dict[str, Any]] = []
        observer: Any = events.append
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        img = self.image()
        await self.call("device.attach", GUEST, "vbd", {"spec": f"{img},raw,xvdb,r"})
        await self.assertFault(FaultCode.NO_SUCH_DEVICE, "device.detach", GUEST, "vbd", "xvdc")
        await self.call("device.detach", GUEST, "vbd", "xvdb")
        ops = [e for e in events if str(e.get("log_format", "")).startswith("device {op}")]
        self.assertEqual(
            [(e["op"], e["domid"], e["devclass"], e["devid"]) for e in ops],
            [
                ("attach", 5, "vbd", 51728),
                ("detach", 5, "vbd", "xvdc"),
                ("detach", 5, "vbd", "xvdb"),
            ],
        )
        self.assertEqual([e["outcome"] for e in ops][::2], ["ok", "ok"])
        self.assertIn("fault 11", ops[1]["outcome"])
        self.assertTrue(all(e["duration"] >= 0 for e in ops))


class RealXenstoredXMLRPCTests(XMLRPCSuite, RealXenstoredFixture, TestCase):  # type: ignore[misc]
    """The XML-RPC service over the C xenstored."""


class EmbeddedXenstoredXMLRPCTests(XMLRPCSuite, EmbeddedXenstoredFixture, TestCase):  # type: ignore[misc]
    """The XML-RPC service over the embedded xenstored."""


class BrokenManager:
    """A manager whose listing has a bug (for the internal-error path)."""

    controllerClasses = {"vbd": object}
    inFlight = 0

    def listDevices(self, domid: int, devclass: str) -> Any:
        """Fails with an unexpected exception."""
        raise ZeroDivisionError("secret internal detail")


class InternalErrorTests(RPCServerMixin, TestCase):
    """Unexpected exceptions: fault 1, a reference, the traceback only in the log."""

    @deferredTest
    async def test_internalError(self) -> None:
        """The caller sees a reference but neither the exception nor its traceback."""
        self.serveRPC(BrokenManager())
        f = await self.assertFault(FaultCode.INTERNAL, "device.list", GUEST)
        self.assertIn("internal error in device.list (reference ", f.faultString)
        self.assertNotIn("secret", f.faultString)
        self.assertNotIn("ZeroDivisionError", f.faultString)
        (logged,) = self.flushLoggedErrors(ZeroDivisionError)
        self.assertIn("secret internal detail", str(logged.value))


class ToFaultTests(SynchronousTestCase):
    """Every exception class maps to its documented fault code."""

    def test_mapping(self) -> None:
        """DeviceError codes, parse errors, timeouts, permissions, lost connections."""
        log = Logger()
        for error, code in (
            (DeviceConfigError("x"), 10),
            (SxpError("x"), 10),
            (DeviceExistsError("x"), 12),
            (DeviceNotFoundError("x"), 11),
            (UnknownDomainError("x"), 3),
            (HotplugFailedError("x"), 15),
            (DeviceError("x"), 2),
            (XenStoreTimeout("/a", 1.0), 13),
            (DriverDomainTimeout("prepare", "/p", 1.0), 13),
            (TransactionRetriesExhausted(32), 12),
            (AccessDeniedError("EACCES", "write", "/a"), 14),
            (PermissionError(13, "no"), 14),
            (XenStoreConnectionLost("x"), 16),
        ):
            fault = toFault(error, log, "m")
            self.assertEqual(fault.faultCode, code, repr(error))
        self.assertEqual(list(FaultCode), sorted(FaultCode))
