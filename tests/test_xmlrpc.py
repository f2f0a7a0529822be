"""
The XML-RPC service end to end: C{rpcSite(manager)} listens on a real UNIX
socket in the test process; the stdlib C{xmlrpc.client} (in a thread, with
the CLI's UNIX transport) calls it; the DeviceManager drives the driver-domain
agent (blkback, netback, no hotplug scripts) with simulated backends and
frontends, over the C xenstored and the embedded one.
"""

from __future__ import annotations

import os
import xmlrpc.client
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail, gatherResults
from twisted.internet.task import Clock, deferLater
from twisted.internet.threads import deferToThread
from twisted.logger import Logger, globalLogPublisher
from twisted.protocols.policies import WrappingFactory
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.support.fixtures import EmbeddedXenstoredFixture, RealXenstoredFixture
from tests.support.host import HostSuite, shortTempDir, startDriverDomain
from tests.support.treedump import dumpTree
from tests.test_qemu_kind import QemuFixtureMixin, qemuIO
from xenddev.backendctrl.errors import (
    DriverDomainError,
    DriverDomainTimeout,
    InvalidNameError,
    PreconditionError,
)
from xenddev.backendctrl.protocol import VDI
from xenddev.cli import serverProxy
from xenddev.controllers import defaultControllers
from xenddev.datapath import DataPathControl, QemuPauser
from xenddev.datapath.coalesce import CoalesceError
from xenddev.datapath.quiesce import NoPauserError, QuiesceError
from xenddev.driverdomain.agent import BackendCtrlAgent
from xenddev.driverdomain.kinds.blkback import BlkbackKind
from xenddev.driverdomain.kinds.netback import NetbackKind
from xenddev.driverdomain.kinds.qemu import nbdURI
from xenddev.qmp import QMPTimeout
from xenddev.storagectl import (
    NoCoalesceError,
    NoSuchDataPathError,
    NothingToMergeError,
    QuiesceBusyError,
    StorageControl,
    UnknownHandleError,
)
from xenddev.sxp import SxpError
from xenddev.toolstack.controller import (
    DeviceConfigError,
    DeviceError,
    DeviceExistsError,
    DeviceNotFoundError,
    HotplugFailedError,
    UnknownDomainError,
)
from xenddev.toolstack.manager import DeviceManager
from xenddev.xenbus import waitForState
from xenddev.xenstore.errors import (
    AccessDeniedError,
    TransactionRetriesExhausted,
    XenStoreConnectionLost,
    XenStoreTimeout,
)
from xenddev.xmlrpc import DeviceRPC, FaultCode, rpcSite, toFault

GUEST = 5
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

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
    "vdi.list",
    "vdi.get",
    "vdi.prepare",
    "vdi.activate",
    "vdi.deactivate",
    "vdi.unprepare",
    "datapath.list",
    "datapath.find",
    "datapath.quiesce",
    "datapath.resume",
    "datapath.handles",
    "datapath.coalesce",
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

    def serveRPC(self, manager: Any, storage: Any = None) -> str:
        """Listen on a fresh socket; stop and drop every connection at cleanup."""
        self.rpcPath = os.path.join(shortTempDir(self, "rpc-"), "xenddev.sock")
        self.wrapper = WrappingFactory(rpcSite(manager, storage=storage))
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


class DeviceServiceFixture(RPCServerMixin, HostSuite):
    """
    A DeviceManager for guest 5 with a local driver domain, served on a UNIX
    socket; mixed with a server fixture and TestCase (also by test_cli).
    """

    flushLoggedErrors: Any

    async def setUp(self) -> None:
        self.startServer()
        self.xs = await self.connect()
        self.manager = DeviceManager(
            self.xs, defaultControllers(), createTimeout=10.0, destroyTimeout=10.0
        )
        await self.manager.registerDomain(GUEST, name="guest")
        await self.startDriverDomain(0)
        self.serveRPC(self.manager)

    async def startDriverDomain(
        self, domid: int, hotplug: dict[str, Any] | None = None
    ) -> BackendCtrlAgent:
        """
        The agent (blkback, netback; hotplug as in L{startDriverDomain}),
        simulated backends and, for domain 0, the guest's frontends.
        """
        dd = await startDriverDomain(
            self,
            self.xs,
            domid,
            [BlkbackKind(), NetbackKind()],
            hotplug=hotplug,
            guests=[GUEST] if domid == 0 else [],
        )
        return dd.agent

    def image(self) -> str:
        """A 1 MiB image file."""
        path = os.path.abspath(self.mktemp())
        with open(path, "wb") as f:
            f.truncate(1 << 20)
        return path

    async def connected(self, devclass: str, devid: int) -> None:
        """Wait until the simulated guest has connected the device."""
        await waitForState(self.xs, f"/local/domain/{GUEST}/device/{devclass}/{devid}", 4, 10)


class XMLRPCSuite(DeviceServiceFixture):
    """The XML-RPC tests; mixed with a server fixture and TestCase."""

    # Introspection

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

    async def test_everyMethodHelpedAndDocumented(self) -> None:
        """
        Every method has help text giving its usage, and docs/xmlrpc.md
        lists every method and every fault code.
        """
        with open(os.path.join(ROOT, "docs", "xmlrpc.md"), encoding="utf-8") as f:
            doc = f.read()
        for method in await self.call("system.listMethods"):
            if method.startswith("system."):
                continue
            short = method.rsplit(".", 1)[1]
            helpText = await self.call("system.methodHelp", method)
            self.assertTrue(helpText.startswith(f"{short}("), (method, helpText))
            self.assertTrue(f"`{short}(" in doc or f"`{method}(" in doc, method)
        for code in FaultCode:
            self.assertIn(f"\n| {int(code)} |", doc, code)

    # Block devices

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

    async def test_deviceExistsAndMissing(self) -> None:
        """A duplicate vdev: fault 12, the first untouched; a missing device: fault 11."""
        img = self.image()
        await self.call("device.attach", GUEST, "vbd", {"spec": f"{img},raw,xvdb,r"})
        await self.connected("vbd", 51728)
        before = await self.tree()
        f = await self.assertFault(
            FaultCode.DEVICE_EXISTS, "device.attach", GUEST, "vbd", {"spec": f"{img},raw,xvdb,r"}
        )
        self.assertEqual(f.faultString, "Device xvdb (51728) is already connected.")
        await self.assertTreeIs(before)
        await self.assertFault(FaultCode.NO_SUCH_DEVICE, "device.detach", GUEST, "vbd", "xvdc")
        await self.assertFault(
            FaultCode.NO_SUCH_DEVICE, "device.detach", GUEST, "vif", "00:16:3e:00:00:09"
        )
        await self.assertFault(
            FaultCode.NO_SUCH_DEVICE, "xend.domain.destroyDevice", GUEST, "vbd", 51760, True, False
        )
        await self.call("device.detach", GUEST, "vbd", 51728)

    async def test_genericFaults(self) -> None:
        """
        Fault 2: the driver domain refuses (a missing image on a remote
        backend), and vifs cannot be reconfigured; nothing is left behind.
        A cdrom change of a missing device: fault 11.
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
        await self.call("device.attach", GUEST, "vif", {"mac": "00:16:3e:00:00:01"})
        f = await self.assertFault(
            FaultCode.GENERIC,
            "xend.domain.device_configure",
            GUEST,
            "(vif (mac 00:16:3e:00:00:01) (bridge br0))",
        )
        self.assertIn("vif devices may not be reconfigured", f.faultString)
        await self.call("device.detach", GUEST, "vif", 0)
        await self.assertFault(
            FaultCode.NO_SUCH_DEVICE,
            "xend.domain.device_configure",
            GUEST,
            f"(vbd (uname file:{self.image()}) (dev xvdc:cdrom) (mode r))",
        )
        await self.assertFault(
            FaultCode.BAD_CONFIG, "xend.domain.device_configure", GUEST, "(vif (bridge br0))"
        )

    async def test_hotplugFailedFault(self) -> None:
        """A hotplug script that never reports: fault 15, xend's message, nothing left."""
        scripts = os.path.abspath(self.mktemp())
        os.makedirs(scripts)
        with open(os.path.join(scripts, "hang"), "w") as f:
            f.write("#!/bin/sh\nexec sleep 600\n")
        os.chmod(os.path.join(scripts, "hang"), 0o755)
        await self.startDriverDomain(4, {"scriptDir": scripts, "timeout": 1.0})
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
            "Device xvdb (vbd 51728) could not be connected. Hotplug scripts not working.",
        )
        await self.assertTreeIs(before)

    async def test_waitForDevicesHotplugFault(self) -> None:
        """
        waitForDevices gathers a wait per device (C{gatherResults}): a device
        whose hotplug script failed is fault 15 with xend's message, not the
        internal fault of the L{FirstError} that wraps it.
        """
        for vdev in ("xvdb", "xvdc"):
            await self.call("device.attach", GUEST, "vbd", {"spec": f"{self.image()},raw,{vdev},r"})
        self.assertTrue(await self.call("xend.domain.waitForDevices", GUEST))
        backend = f"/local/domain/0/backend/vbd/{GUEST}/51744"
        await self.xs.write(f"{backend}/hotplug-error", "no such file")
        await self.xs.write(f"{backend}/hotplug-status", "error")
        fault = await self.assertFault(
            FaultCode.HOTPLUG_FAILED, "xend.domain.waitForDevices", GUEST
        )
        self.assertEqual(
            fault.faultString, "Device xvdc (vbd 51744) could not be connected. no such file"
        )

    # Driver-domain objects (vdi.*)

    async def test_vdiLifecycle(self) -> None:
        """
        An operator's vdi: prepare (blkback file target), activate, get,
        list, deactivate, unprepare; every step's state, and the tree ends
        as it began.
        """
        img = self.image()
        before = await self.tree()
        target = {"type": "file", "params": img, "mode": "r"}
        made = await self.call("vdi.prepare", 0, "opdisk", target)
        self.assertEqual(
            made,
            {
                "domain": 0,
                "class": "vdi",
                "name": "opdisk",
                "state": "inactive",
                "target": target,
                "plugs": [],
            },
        )
        self.assertEqual((await self.call("vdi.activate", 0, "opdisk"))["state"], "active")
        self.assertEqual((await self.call("vdi.get", "0", "opdisk", "vdi"))["state"], "active")
        self.assertEqual([o["name"] for o in await self.call("vdi.list", 0, "vdi")], ["opdisk"])
        self.assertEqual((await self.call("vdi.deactivate", 0, "opdisk"))["state"], "inactive")
        self.assertTrue(await self.call("vdi.unprepare", 0, "opdisk"))
        await self.assertFault(FaultCode.NOT_FOUND, "vdi.get", 0, "opdisk")
        await self.assertTreeIs(before)

    async def test_vdiListShowsControllerPlugs(self) -> None:
        """vdi.list shows the objects the controllers made, with their plugs."""
        img = self.image()
        await self.call("device.attach", GUEST, "vbd", {"spec": f"{img},raw,xvdb,r"})
        await self.call("device.attach", GUEST, "vif", {"mac": "00:16:3e:01:02:03"})
        objects = await self.call("vdi.list", 0)
        self.assertEqual(
            [(o["class"], o["name"], o["state"]) for o in objects],
            [("vdi", "vbd-5-51728", "active"), ("vif", "vif-5-0", "active")],
        )
        (plug,) = objects[0]["plugs"]
        self.assertEqual(plug["frontend"], f"/local/domain/{GUEST}/device/vbd/51728")
        self.assertEqual(plug["backend"], f"/local/domain/0/backend/vbd/{GUEST}/51728")
        self.assertEqual(objects[0]["target"]["params"], img)
        await self.call("device.detach", GUEST, "vbd", "xvdb")
        await self.call("device.detach", GUEST, "vif", 0)
        self.assertEqual(await self.call("vdi.list", 0), [])

    async def test_vdiBadInputFaults(self) -> None:
        """
        Bad names, targets, classes and domains: a typed fault before
        anything is written (fault 10 or 3), and the tree is unchanged.
        """
        img = self.image()
        good = {"type": "file", "params": img}
        before = await self.tree()
        for args, code, words in (
            ((0, "bad/name", good), FaultCode.BAD_CONFIG, "invalid vdi 'bad/name'"),
            ((0, "x" * 65, good), FaultCode.BAD_CONFIG, "at most 64"),
            ((0, "d", "type=file"), FaultCode.BAD_CONFIG, "target must be a struct"),
            ((0, "d", {}), FaultCode.BAD_CONFIG, "non-empty"),
            ((0, "d", {"a/b": "x"}), FaultCode.BAD_CONFIG, "invalid target key 'a/b'"),
            ((0, "d", {"params": "a\nb"}), FaultCode.BAD_CONFIG, "control characters"),
            ((0, "d", {"params": "x" * 2000}), FaultCode.BAD_CONFIG, "longer than"),
            ((0, "d", good, "pci"), FaultCode.BAD_CONFIG, "unknown object class 'pci'"),
            ((GUEST, "d", good), FaultCode.INVALID_DOMAIN, "not a driver domain"),
            ((70000, "d", good), FaultCode.INVALID_DOMAIN, "must be 0..32751"),
            (("nosuch", "d", good), FaultCode.INVALID_DOMAIN, "no domain named"),
        ):
            f = await self.assertFault(code, "vdi.prepare", *args)
            self.assertIn(words, f.faultString)
        await self.assertFault(FaultCode.INVALID_DOMAIN, "vdi.list", GUEST)
        await self.assertFault(FaultCode.BAD_CONFIG, "vdi.activate", 0, 5)
        await self.assertFault(FaultCode.BAD_CONFIG, "vdi.list", 0, "vbd")
        await self.assertTreeIs(before)

    async def test_vdiStateFaults(self) -> None:
        """
        Requests the object's state does not allow, and targets the driver
        domain refuses: faults 11, 12, 17 and 10; the tree is unchanged by
        each.
        """
        img = self.image()
        before = await self.tree()
        await self.assertFault(FaultCode.NOT_FOUND, "vdi.activate", 0, "ghost")
        await self.assertFault(FaultCode.NOT_FOUND, "vdi.unprepare", 0, "ghost")
        f = await self.assertFault(
            FaultCode.NOT_FOUND, "vdi.prepare", 0, "d", {"type": "file", "params": "/no/such.img"}
        )
        self.assertIn("does not exist in the driver domain", f.faultString)
        f = await self.assertFault(
            FaultCode.BAD_CONFIG, "vdi.prepare", 0, "d", {"type": "nbd", "params": "x"}
        )
        self.assertIn("ENODEV", f.faultString)
        await self.assertTreeIs(before)
        await self.call("vdi.prepare", 0, "d", {"type": "file", "params": img})
        prepared = await self.tree()
        await self.assertFault(
            FaultCode.DEVICE_EXISTS, "vdi.prepare", 0, "d", {"type": "file", "params": img}
        )
        f = await self.assertFault(FaultCode.WRONG_STATE, "vdi.deactivate", 0, "d")
        self.assertIn("cannot deactivate in state inactive", f.faultString)
        await self.assertTreeIs(prepared)
        await self.call("vdi.activate", 0, "d")
        await self.assertFault(FaultCode.WRONG_STATE, "vdi.activate", 0, "d")
        # An active vdi is deactivated by its unprepare (docs/protocol.md).
        self.assertTrue(await self.call("vdi.unprepare", 0, "d"))
        await self.assertTreeIs(before)

    async def test_datapathWithoutStorage(self) -> None:
        """Served without a storage control, datapath.* gives fault 19."""
        f = await self.assertFault(FaultCode.UNSUPPORTED, "datapath.list")
        self.assertIn("no data-path control", f.faultString)

    async def test_unknownMethod(self) -> None:
        """An unknown method gets Twisted's fault 8001."""
        await self.assertFault(8001, "device.explode", GUEST)
        await self.assertFault(8001, "xend.domain.device_explode", GUEST)

    async def test_oneClientPerDriverDomain(self) -> None:
        """
        vdi.* and the device controllers reach a driver domain through one
        protocol client, the manager's, so one lock table serialises them.
        """
        rpc = DeviceRPC(self.manager)
        ctrl = await self.manager.controller(GUEST, "vbd")
        client = await rpc.driverDomain(0, VDI)
        self.assertIs(client, self.manager.driverDomain(0))
        self.assertIs(client, ctrl._driverDomain(0))
        self.assertEqual(self.manager.knownDriverDomains(), [0])

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


class DataPathRPCSuite(RPCServerMixin, QemuFixtureMixin):
    """
    C{datapath.*} end to end: vdis served by real qemu-storage-daemons
    (prepared and activated through C{vdi.*}), quiesced and resumed through
    the daemon's storage control (deadline on a L{Clock}); mixed with a
    server fixture and TestCase.
    """

    async def _setUp(self) -> None:
        await QemuFixtureMixin._setUp(self)
        self.agent, self.qemu = await self.startDriverDomain(0)
        self.clock = Clock()
        control = DataPathControl(self.xs, {"qemu": QemuPauser(reactor, 20.0)})
        self.storage = StorageControl(control, reactor, bound=60.0, clock=self.clock, timeout=20.0)
        self.serveRPC(
            DeviceManager(self.xs, defaultControllers(), requestTimeout=20.0), self.storage
        )

    async def serve(self, name: str, image: str) -> str:
        """prepare + activate through vdi.*; the NBD URI of its export."""
        target = {"type": "file", "format": "qcow2", "params": image}
        await self.call("vdi.prepare", 0, name, target)
        await self.call("vdi.activate", 0, name)
        daemon = self.qemu.daemonFor(0, name)
        assert daemon is not None
        return nbdURI(name, daemon.nbdPath)

    async def retire(self, *names: str) -> None:
        """deactivate and unprepare through vdi.*."""
        for name in names:
            await self.call("vdi.deactivate", 0, name)
            await self.call("vdi.unprepare", 0, name)

    async def test_findQuiesceResume(self) -> None:
        """
        list and find see the data path with its chain; quiesce(parent)
        stops the export under a handle; a second quiesce is refused (12);
        resume brings the export back with the data; a second resume is
        fault 11; the tree ends as it began.
        """
        base, leaf = self.chain()
        before = await dumpTree(self.xs)
        uri = await self.serve("q1", leaf)
        qemuIO(uri, "write -P 0x42 1M 1M")
        (dp,) = await self.call("datapath.list")
        self.assertEqual(
            (dp["domain"], dp["vdi"], dp["kind"], dp["image"], dp["chain"]),
            (0, "q1", "qemu", leaf, [leaf, base]),
        )
        self.assertEqual(await self.call("datapath.find", base), [dp])
        self.assertEqual(await self.call("datapath.find", self.workdir + "/other.qcow2"), [])
        held = await self.call("datapath.quiesce", base)
        self.assertEqual((held["image"], held["paused"], held["expires-in"]), (base, [dp], 60.0))
        self.assertEqual(
            [h["handle"] for h in await self.call("datapath.handles")], [held["handle"]]
        )
        self.assertRaises(AssertionError, qemuIO, uri, "read 0 4k")
        f = await self.assertFault(FaultCode.DEVICE_EXISTS, "datapath.quiesce", leaf)
        self.assertIn(held["handle"], f.faultString)
        self.assertTrue(await self.call("datapath.resume", held["handle"]))
        qemuIO(uri, "read -P 0x42 1M 1M")
        await self.assertFault(FaultCode.NOT_FOUND, "datapath.resume", held["handle"])
        self.assertEqual(await self.call("datapath.handles"), [])
        await self.retire("q1")
        await self.assertTreeIs(before, self.agent)

    async def test_deadResumedAutomatically(self) -> None:
        """
        A client that quiesces and never resumes: once timeouts.quiesce has
        passed the daemon resumes the data path (logged) and the export
        serves again.
        """
        events: list[dict[str, Any]] = []
        observer: Any = events.append
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        _, leaf = self.chain()
        uri = await self.serve("q2", leaf)
        held = await self.call("datapath.quiesce", leaf)
        self.assertRaises(AssertionError, qemuIO, uri, "read 0 4k")
        self.clock.advance(60.0)
        for _ in range(1000):
            if not self.storage.handles():
                break
            await deferLater(reactor, 0.01, lambda: None)
        self.assertEqual(await self.call("datapath.handles"), [])
        qemuIO(uri, "read -P 0x11 0 1M")
        self.assertTrue(
            [e for e in events if e.get("handle") == held["handle"] and "not resumed" in str(e)]
        )
        await self.retire("q2")

    async def test_coalesceAndFaults(self) -> None:
        """
        coalesce merges the overlay into its parent while the export keeps
        serving both layers' data; coalescing again is fault 10; unknown
        data paths, bad images and handles give 11 and 10.
        """
        base, leaf = self.chain()
        uri = await self.serve("q3", leaf)
        qemuIO(uri, "write -P 0x42 1M 1M")
        merged = await self.call("datapath.coalesce", 0, "q3")
        self.assertEqual((merged["image"], merged["chain"]), (base, [base]))
        qemuIO(uri, "read -P 0x11 0 1M")
        qemuIO(uri, "read -P 0x42 1M 1M")
        self.assertEqual((await self.call("datapath.find", leaf)), [])
        await self.assertFault(FaultCode.BAD_CONFIG, "datapath.coalesce", 0, "q3")
        await self.assertFault(FaultCode.NOT_FOUND, "datapath.coalesce", 0, "nosuch")
        await self.assertFault(FaultCode.BAD_CONFIG, "datapath.coalesce", 0, "a/b")
        await self.assertFault(FaultCode.BAD_CONFIG, "datapath.find", "relative.qcow2")
        await self.assertFault(FaultCode.BAD_CONFIG, "datapath.quiesce", 42)
        await self.assertFault(FaultCode.BAD_CONFIG, "datapath.resume", "no such handle")
        await self.assertFault(FaultCode.NOT_FOUND, "datapath.resume", "0123abcd")
        await self.retire("q3")


class RealXenstoredDataPathRPCTests(DataPathRPCSuite, RealXenstoredFixture, TestCase):  # type: ignore[misc]
    """datapath.* over the C xenstored."""


class EmbeddedXenstoredDataPathRPCTests(  # type: ignore[misc]
    DataPathRPCSuite, EmbeddedXenstoredFixture, TestCase
):
    """datapath.* over the embedded xenstored."""


class BrokenManager:
    """A manager whose listing has a bug (for the internal-error path)."""

    controllerClasses = {"vbd": object}
    inFlight = 0

    def listDevices(self, domid: int, devclass: str) -> Any:
        """Fails with an unexpected exception."""
        raise ZeroDivisionError("secret internal detail")


class InternalErrorTests(RPCServerMixin, TestCase):
    """Unexpected exceptions: fault 1, a reference, the traceback only in the log."""

    async def test_internalError(self) -> None:
        """The caller sees a reference but neither the exception nor its traceback."""
        self.serveRPC(BrokenManager())
        f = await self.assertFault(FaultCode.INTERNAL, "device.list", GUEST)
        self.assertIn("internal error in device.list (reference ", f.faultString)
        self.assertNotIn("secret", f.faultString)
        self.assertNotIn("ZeroDivisionError", f.faultString)
        (logged,) = self.flushLoggedErrors(ZeroDivisionError)
        self.assertIn("secret internal detail", str(logged.value))


class GatheringManager:
    """
    A manager whose listing gathers two reads (C{gatherResults}, as the
    controllers do): the first fails with L{error}, or, if it is L{None},
    both wait until the listing is cancelled (as the daemon cancels its
    operations when it stops with C{timeouts.shutdown: 0}).
    """

    controllerClasses = {"vbd": object}
    inFlight = 0

    def __init__(self, error: BaseException | None, depth: int = 1) -> None:
        self.error = error
        self.depth = depth

    def listDevices(self, domid: int, devclass: str) -> Deferred[Any]:
        """The gathered reads, wrapped L{depth} times in L{FirstError}."""
        if self.error is None:
            d: Deferred[Any] = gatherResults([Deferred(), Deferred()], consumeErrors=True)
            reactor.callLater(0, d.cancel)  # type: ignore[attr-defined]
            return d
        d = fail(self.error)
        for _ in range(self.depth):
            d = gatherResults([d, Deferred()], consumeErrors=True)
        return d


class FirstErrorFaultTests(RPCServerMixin, TestCase):
    """
    Errors that reach a method wrapped in C{gatherResults}' L{FirstError}
    (once or more) reach the client with the code of the error inside
    (issue 13, item 5: they were internal faults).
    """

    async def test_cancelled(self) -> None:
        """Gathered Deferreds cancelled (the daemon stopping): fault 16, not 1."""
        self.serveRPC(GatheringManager(None))
        f = await self.assertFault(FaultCode.UNAVAILABLE, "device.list", GUEST)
        self.assertEqual(f.faultString, "the operation was cancelled (is the daemon stopping?)")
        self.assertEqual(self.flushLoggedErrors(), [])

    async def test_connectionLost(self) -> None:
        """A XenStore connection lost under a gathered read: fault 16."""
        self.serveRPC(GatheringManager(XenStoreConnectionLost("xenstored went away")))
        f = await self.assertFault(FaultCode.UNAVAILABLE, "device.list", GUEST)
        self.assertEqual(f.faultString, "the daemon lost its XenStore connection; retry shortly")

    async def test_nested(self) -> None:
        """A L{FirstError} of a L{FirstError} of a declared error: that error's code and message."""
        self.serveRPC(GatheringManager(DeviceNotFoundError("Device 51728 not connected"), 2))
        f = await self.assertFault(FaultCode.NO_SUCH_DEVICE, "device.list", GUEST)
        self.assertEqual(f.faultString, "Device 51728 not connected")

    async def test_internalInside(self) -> None:
        """An unexpected error inside: fault 1, the log has that error (not the wrapper)."""
        self.serveRPC(GatheringManager(ZeroDivisionError("secret internal detail")))
        f = await self.assertFault(FaultCode.INTERNAL, "device.list", GUEST)
        self.assertNotIn("secret", f.faultString)
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
        self.assertIs(FaultCode.NOT_FOUND, FaultCode.NO_SUCH_DEVICE)

    def test_storageMapping(self) -> None:
        """Driver-domain results, names, handles and data-path failures."""
        log = Logger()
        for error, code in (
            (DriverDomainError(106, "EISCONN", "m", "activate", "/p"), 17),
            (DriverDomainError(107, "ENOTCONN", "m", "deactivate", "/p"), 17),
            (PreconditionError(2, "ENOENT", "not prepared", "activate", "/p"), 11),
            (DriverDomainError(16, "EBUSY", "m", "unprepare", "/p"), 12),
            (DriverDomainError(22, "EINVAL", "m", "prepare", "/p"), 10),
            (DriverDomainError(95, "EOPNOTSUPP", "m", "change", "/p"), 19),
            (DriverDomainError(5, "EIO", "m", "prepare", "/p"), 2),
            (InvalidNameError("vdi", "a/b", "bad"), 10),
            (UnknownHandleError("h"), 11),
            (NoSuchDataPathError("x"), 11),
            (QuiesceBusyError("x"), 12),
            (NoCoalesceError("x"), 19),
            (NoPauserError("x"), 19),
            (NothingToMergeError("x"), 10),
            (QuiesceError([], []), 18),
            (CoalesceError("x"), 18),
            (QMPTimeout("x"), 13),
        ):
            fault = toFault(error, log, "m")
            self.assertEqual(fault.faultCode, code, repr(error))
