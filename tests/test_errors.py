"""
The error root (xenddev.errors): every exception class of the product,
found by walking its modules, is under L{XenddevError} with a fault code
declared (or has its code from the XML-RPC layer, or is listed here as
internal with the reason); and docs/xmlrpc.md lists every code.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import os
import pkgutil
import re

from pyxs.exceptions import PyXSError
from twisted.trial.unittest import SynchronousTestCase

import xenddev
from xenddev.backendctrl.errors import ERRNO_FAULT_CODES, DriverDomainError
from xenddev.errors import FaultCode, XenddevError
from xenddev.xmlrpc import FOREIGN_FAULTS, declaredFault

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: The client's own errors: outside the root, as the client starts without
#: C{enum} (tests.test_cli lists what it loads) and never raises them in the
#: daemon.
CLIENT_SIDE = {
    "xenddev.cli.CommandError": "the command line's usage errors, in the client",
    "xenddev.rpcclient.Fault": "a fault as the client received it (it carries the daemon's code)",
    "xenddev.rpcclient.ProtocolError": "an answer the client could not read",
}

_DRIVER_DOMAIN_SIDE = (
    "driver-domain side: the agent turns it into the request's result or the "
    "hotplug status, which the toolstack sees as its own errors"
)
_XENSTORE = (
    "XenStore refused what the toolstack's own checks should have prevented "
    "(or a hostile guest wrote): a bug to find in the log"
)

#: Classes whose errors are internal (fault 1, traceback logged), and why.
INTERNAL = {
    "xenddev.errors.XenddevError": "the root: an error that declares no code is internal",
    "xenddev.config.ConfigError": "the daemon refuses to start; no RPC method reads a config",
    "xenddev.poolleasefile.UntrustedLeaseRecord": (
        "read at start only: an untrusted lease record is ignored and logged"
    ),
    "xenddev.driverdomain.completion._RequestReplaced": (
        "the completion transaction's control flow, caught inside it"
    ),
    "xenddev.driverdomain.completion._RequestWithdrawn": (
        "the completion transaction's control flow, caught inside it"
    ),
    "xenddev.toolstack.controller._GuestFrontend": (
        "the toolstack's control flow at attach, caught inside it"
    ),
    "xenddev.driverdomain.kinds.base.KindError": _DRIVER_DOMAIN_SIDE,
    "xenddev.driverdomain.nbd.NbdError": _DRIVER_DOMAIN_SIDE,
    "xenddev.driverdomain.hotplug.HotplugError": _DRIVER_DOMAIN_SIDE,
    "xenddev.driverdomain.hotplug.HotplugScriptError": _DRIVER_DOMAIN_SIDE,
    "xenddev.driverdomain.hotplug.HotplugTimeout": _DRIVER_DOMAIN_SIDE,
    "xenddev.driverdomain.hotplug.HotplugArgumentError": _DRIVER_DOMAIN_SIDE,
    "xenddev.driverdomain.hotplug.InvalidScriptError": _DRIVER_DOMAIN_SIDE,
    "xenddev.driverdomain.hotplugblock.BlockScriptError": _DRIVER_DOMAIN_SIDE,
    "xenddev.driverdomain.loopctl.LoopError": _DRIVER_DOMAIN_SIDE,
    "xenddev.tapctl.TapCtlError": _DRIVER_DOMAIN_SIDE,
    "xenddev.toolstack.reconnect.GuestReconnectError": "the restart command, not RPC",
    "xenddev.xenctrl.XenControlError": "a hypervisor call failed: nothing a client can correct",
    "xenddev.embed.EmbedError": "the embedding API, raised in the caller's thread, not RPC",
    "xenddev.embed.OperationTimeout": "the embedding API, raised in the caller's thread, not RPC",
    "xenddev.service.StartupError": "the daemon cannot start; no client is served yet",
    "xenddev.simulator.frontend.SimulatedDeviceNotFound": "the simulator's own misuse",
    "xenddev.xenbus.XenbusPathError": "a malformed xenbus path: " + _XENSTORE,
    "xenddev.xenstore.errors.XenStoreError": _XENSTORE,
    "xenddev.xenstore.errors.NoEntryError": _XENSTORE,
    "xenddev.xenstore.errors.ExistsError": _XENSTORE,
    "xenddev.xenstore.errors.BusyError": _XENSTORE,
    "xenddev.xenstore.errors.ConflictError": "EAGAIN: transact retries it, then exhausts",
    "xenddev.xenstore.errors.QuotaError": _XENSTORE,
    "xenddev.xenstore.errors.InvalidRequestError": _XENSTORE,
    "xenddev.xenstore.errors.InvalidArgumentError": "an argument the caller should have checked",
    "xenddev.xenstore.errors.InvalidPathError": "an argument the caller should have checked",
    "xenddev.xenstore.errors.InvalidPayloadError": "an argument the caller should have checked",
    "xenddev.xenstore.errors.InvalidPermissionError": "an argument the caller should have checked",
    "xenddev.xenstore.errors.MalformedPacket": "xenstored broke the protocol",
    "xenddev.xenstore.errors.UnexpectedPacket": "xenstored broke the protocol",
    "xenddev.xenstore.server.core.XsError": "the embedded xenstored's reply errno, in the server",
    "xenddev.xenstore.server.transaction.TransactionQuotaExceeded": "in the embedded xenstored",
}


def productExceptions() -> dict[str, type[BaseException]]:
    """Every exception class defined in C{xenddev} and its controllers, by qualified name."""
    found: dict[str, type[BaseException]] = {}
    for package in (xenddev,):
        names = [package.__name__]
        names += [m.name for m in pkgutil.walk_packages(package.__path__, package.__name__ + ".")]
        for name in names:
            module = importlib.import_module(name)
            for value in vars(module).values():
                if (
                    inspect.isclass(value)
                    and issubclass(value, BaseException)
                    and value.__module__ == name
                ):
                    found[f"{name}.{value.__qualname__}"] = value
    return found


def codeOf(kind: type[BaseException]) -> FaultCode:
    """The code a class's errors reach a client with (before any instance narrows it)."""
    if issubclass(kind, XenddevError) and kind.faultCode != FaultCode.INTERNAL:
        return kind.faultCode
    foreign = declaredFault(kind)
    return FaultCode.INTERNAL if foreign is None else foreign[0]


def documentedCodes() -> set[int]:
    """The codes in docs/xmlrpc.md's fault-code table."""
    with open(os.path.join(ROOT, "docs", "xmlrpc.md"), encoding="utf-8") as f:
        doc = f.read()
    table = doc.split("## Fault codes", 1)[1].split("\n## ", 1)[0]
    return {int(m) for m in re.findall(r"^\| (\d+) \|", table, re.MULTILINE)}


class RootTests(SynchronousTestCase):
    """Every product exception is under the root with a code, or listed with a reason."""

    def setUp(self) -> None:
        self.classes = productExceptions()

    def test_found(self) -> None:
        """The walk finds the classes (a walk that found none would prove nothing)."""
        self.assertIn("xenddev.toolstack.controller.DeviceError", self.classes)
        self.assertIn("xenddev.controllers.blktap.TapdiskError", self.classes)
        self.assertIn("xenddev.xenstore.server.core.XsError", self.classes)
        self.assertGreater(len(self.classes), 60)

    def test_underTheRoot(self) -> None:
        """
        Every class outside the XenStore layer and the client derives from
        L{XenddevError}; the XenStore layer's derive from pyxs's root (or
        stay in its embedded server), never from ours.
        """
        outside = []
        for name, kind in self.classes.items():
            if name in CLIENT_SIDE:
                self.assertFalse(issubclass(kind, XenddevError), name)
            elif name.startswith("xenddev.xenstore."):
                self.assertFalse(issubclass(kind, XenddevError), name)
                if not name.startswith("xenddev.xenstore.server."):
                    self.assertTrue(issubclass(kind, PyXSError), name)
            elif not issubclass(kind, XenddevError):
                outside.append(name)
        self.assertEqual(outside, [])
        self.assertLessEqual(set(CLIENT_SIDE), set(self.classes))

    def test_codeDeclaredOrListedInternal(self) -> None:
        """
        The classes whose errors are internal (fault 1) are exactly those
        listed in L{INTERNAL}, each with its reason; every other class has
        a code of L{FaultCode}.
        """
        internal = {
            name
            for name, kind in self.classes.items()
            if name not in CLIENT_SIDE and codeOf(kind) is FaultCode.INTERNAL
        }
        self.assertEqual(sorted(internal), sorted(INTERNAL))
        self.assertTrue(all(INTERNAL.values()))
        for name, kind in self.classes.items():
            if name not in CLIENT_SIDE:
                self.assertIsInstance(codeOf(kind), FaultCode, name)

    def test_declaredBesideTheClass(self) -> None:
        """
        A code comes from the class or a product base of it, never the
        root's default: the root declares INTERNAL only.
        """
        self.assertIs(XenddevError.faultCode, FaultCode.INTERNAL)
        for name, kind in self.classes.items():
            if issubclass(kind, XenddevError) and name not in INTERNAL:
                owner = next(k for k in kind.__mro__ if "faultCode" in vars(k))
                self.assertIsNot(owner, XenddevError, name)
                self.assertTrue(owner.__module__.startswith("xenddev."), name)

    def test_builtinBasesKept(self) -> None:
        """Classes that were also builtins' (or pyxs's) still are."""
        for name, base in (
            ("xenddev.diskspec.DiskError", ValueError),
            ("xenddev.diskspec.VdevError", ValueError),
            ("xenddev.sxp.SxpError", ValueError),
            ("xenddev.toolstack.controller.DeviceConfigError", ValueError),
            ("xenddev.backendctrl.errors.InvalidNameError", ValueError),
            ("xenddev.storagectl.UnknownHandleError", LookupError),
            ("xenddev.storagectl.NothingToMergeError", ValueError),
            ("xenddev.driverdomain.loopctl.LoopError", OSError),
            ("xenddev.xenctrl.XenControlError", OSError),
            ("xenddev.embed.OperationTimeout", TimeoutError),
            ("xenddev.xenbus.XenbusPathError", PyXSError),
        ):
            self.assertTrue(issubclass(self.classes[name], base), name)

    def test_instanceNarrowsCode(self) -> None:
        """A driver domain's refusal takes its errno's code; an unknown errno the class's."""
        busy = DriverDomainError(16, "EBUSY", "", "unprepare", "/p")
        self.assertIs(busy.faultCode, FaultCode.DEVICE_EXISTS)
        odd = DriverDomainError(5, "EIO", "", "prepare", "/p")
        self.assertIs(odd.faultCode, FaultCode.GENERIC)

    def test_rootImportsNothing(self) -> None:
        """
        The root is the bottom of the tree and light enough for the client:
        it imports nothing but C{enum}.
        """
        path = os.path.join(ROOT, "xenddev", "errors.py")
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        imported = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                imported |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                imported.add(node.module or "")
        self.assertEqual(imported, {"__future__", "enum"})


class DocumentedCodesTests(SynchronousTestCase):
    """docs/xmlrpc.md's fault codes are the ones declared."""

    def test_tableListsEveryCode(self) -> None:
        """
        The table lists every L{FaultCode}, every code a class declares or
        L{FOREIGN_FAULTS} gives, and no other code but Twisted's.
        """
        documented = documentedCodes()
        declared = {int(code) for code in FaultCode}
        declared |= {int(codeOf(kind)) for kind in productExceptions().values()}
        declared |= {int(code) for code, _ in FOREIGN_FAULTS.values()}
        declared |= {int(code) for code in ERRNO_FAULT_CODES.values()}
        self.assertEqual(documented - {8001, 8002}, {int(code) for code in FaultCode})
        self.assertLessEqual(declared, documented)

    def test_errnoCodesDocumented(self) -> None:
        """The paragraph on driver-domain results gives each errno its code."""
        with open(os.path.join(ROOT, "docs", "xmlrpc.md"), encoding="utf-8") as f:
            doc = " ".join(f.read().split())
        paragraph = doc.split("The driver domain's result maps to a fault:", 1)[1]
        paragraph = paragraph.split("other results", 1)[0]
        documented = {}
        for clause in paragraph.split(";"):
            code = re.findall(r"\b(\d+)\b", clause)
            for name in re.findall(r"`(E[A-Z0-9]+)`", clause):
                documented[name] = int(code[-1])
        self.assertEqual(documented, {name: int(c) for name, c in ERRNO_FAULT_CODES.items()})
