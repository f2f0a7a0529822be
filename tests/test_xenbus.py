"""
Tests for L{xenddev.xenbus}: state parsing, path helpers and parsers, and
the wait helpers — their logic against a clock-driven fake connection, and
their behaviour against the real C xenstored.
"""

from __future__ import annotations

import os
import uuid
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.support.realxenstored import RealXenstored, requireRealXenstored
from xenddev.xenbus import (
    BackendDevice,
    DeviceIdentity,
    FrontendDevice,
    HotplugResult,
    HotplugStatus,
    XenbusPathError,
    XenbusState,
    backendPath,
    classifyHotplugStatus,
    domainPath,
    frontendPath,
    parseBackendPath,
    parseFrontendPath,
    vmPath,
    waitForHotplugStatus,
    waitForState,
)
from xenddev.xenstore.client import XenStoreClient
from xenddev.xenstore.connection import connectXenStore
from xenddev.xenstore.errors import InvalidArgumentError, NoEntryError, XenStoreTimeout
from xenddev.xenstore.wire import Op

FE = "/local/domain/5/device/vbd/51712"
BE = "/local/domain/0/backend/vbd/5/51712"


class XenbusStateTests(SynchronousTestCase):
    """L{XenbusState} values and its tolerant parser."""

    def test_values(self) -> None:
        """The states have xenbus.h's numbers."""
        self.assertEqual(
            [(s.name, int(s)) for s in XenbusState],
            [
                ("Unknown", 0),
                ("Initialising", 1),
                ("InitWait", 2),
                ("Initialised", 3),
                ("Connected", 4),
                ("Closing", 5),
                ("Closed", 6),
                ("Reconfiguring", 7),
                ("Reconfigured", 8),
            ],
        )

    def test_parseValid(self) -> None:
        """Decimal text (bytes too, surrounding whitespace ignored) parses."""
        self.assertIs(XenbusState.parse("4"), XenbusState.Connected)
        self.assertIs(XenbusState.parse("0"), XenbusState.Unknown)
        self.assertIs(XenbusState.parse(" 6\n"), XenbusState.Closed)
        self.assertIs(XenbusState.parse(b"2"), XenbusState.InitWait)
        self.assertIs(XenbusState.parse("08"), XenbusState.Reconfigured)

    def test_parseGarbage(self) -> None:
        """Missing, empty, non-decimal and out-of-range values give None."""
        for value in (None, "", " ", "x", "4x", "-1", "+4", "4.0", "9", "99999", "\udcff", 4):
            self.assertIsNone(XenbusState.parse(value), value)  # type: ignore[arg-type]


class PathTests(SynchronousTestCase):
    """The path builders."""

    def test_domainPath(self) -> None:
        """C{/local/domain/<domid>}; decimal text is accepted."""
        self.assertEqual(domainPath(0), "/local/domain/0")
        self.assertEqual(domainPath("17"), "/local/domain/17")

    def test_frontendPath(self) -> None:
        """C{/local/domain/<d>/device/<class>/<devid>}."""
        self.assertEqual(frontendPath(5, "vbd", 51712), FE)
        self.assertEqual(frontendPath("5", "vif", "0"), "/local/domain/5/device/vif/0")

    def test_backendPath(self) -> None:
        """C{/local/domain/<b>/backend/<class>/<f>/<devid>}."""
        self.assertEqual(backendPath(0, "vbd", 5, 51712), BE)
        self.assertEqual(backendPath(3, "vif", 7, 1), "/local/domain/3/backend/vif/7/1")

    def test_vmPath(self) -> None:
        """C{/vm/<uuid>}, from text or a UUID, normalised to lower case."""
        u = uuid.UUID("12345678-9abc-def0-1234-56789abcdef0")
        self.assertEqual(vmPath(u), f"/vm/{u}")
        self.assertEqual(vmPath(str(u).upper()), f"/vm/{u}")

    def assertField(self, field: str, f: Any, *args: Any) -> XenbusPathError:
        """C{f(*args)} raises a L{XenbusPathError} (a ValueError) naming C{field}."""
        e = self.assertRaises(XenbusPathError, f, *args)
        self.assertIsInstance(e, ValueError)
        self.assertIsInstance(e, InvalidArgumentError)
        self.assertEqual(e.field, field)
        self.assertIn(field, str(e))
        return e

    def test_badDomid(self) -> None:
        """Bad domain ids are refused, naming which domid was wrong."""
        for bad in (-1, 65536, "x", "007", "", True, 1.0, None):
            self.assertField("domid", domainPath, bad)
            self.assertField("domid", frontendPath, bad, "vbd", 1)
            self.assertField("backendDomid", backendPath, bad, "vbd", 1, 1)
            self.assertField("frontendDomid", backendPath, 0, "vbd", bad, 1)

    def test_badClass(self) -> None:
        """A device class must be a single node name."""
        for bad in ("", "a/b", "..", "v bd", "vbd/", 5, None):
            self.assertField("devclass", frontendPath, 1, bad, 1)
            self.assertField("devclass", backendPath, 0, bad, 1, 1)

    def test_badDevid(self) -> None:
        """A device id is a non-negative int (or its canonical decimal text)."""
        for bad in (-1, 2**31, "012", "x", "", "1.5", 1.0, True, None):
            self.assertField("devid", frontendPath, 1, "vbd", bad)
            self.assertField("devid", backendPath, 0, "vbd", 1, bad)

    def test_badUuid(self) -> None:
        """A VM UUID must be in the 8-4-4-4-12 form."""
        for bad in ("", "nope", "123456789abcdef0123456789abcdef0", "../x", 5):
            self.assertField("uuid", vmPath, bad)

    def test_valueObjectsValidate(self) -> None:
        """The value objects check their fields like the builders."""
        self.assertField("devid", FrontendDevice, 1, "vbd", -2)
        self.assertField("frontendDomid", BackendDevice, 0, "vbd", "x", 1)
        self.assertEqual(FrontendDevice("5", "vbd", "51712"), FrontendDevice(5, "vbd", 51712))


class ParserTests(SynchronousTestCase):
    """L{parseFrontendPath} and L{parseBackendPath}."""

    def test_roundTrips(self) -> None:
        """Parsing a built path gives back its parts, and C{.path} rebuilds it."""
        for domid, cls, devid in [(0, "vbd", 0), (5, "vbd", 51712), (65535, "vif", 2**31 - 1)]:
            fe = parseFrontendPath(frontendPath(domid, cls, devid))
            self.assertEqual(fe, FrontendDevice(domid, cls, devid))
            self.assertEqual(fe.path, frontendPath(domid, cls, devid))
            be = parseBackendPath(backendPath(3, cls, domid, devid))
            self.assertEqual(be, BackendDevice(3, cls, domid, devid))
            self.assertEqual(be.path, backendPath(3, cls, domid, devid))

    def test_subpath(self) -> None:
        """Paths below a device directory parse only with C{allowSubpath}."""
        self.assertEqual(
            parseBackendPath(BE + "/state", allowSubpath=True), BackendDevice(0, "vbd", 5, 51712)
        )
        self.assertEqual(
            parseFrontendPath(FE + "/a/b", allowSubpath=True), FrontendDevice(5, "vbd", 51712)
        )
        self.assertEqual(
            self.assertRaises(XenbusPathError, parseBackendPath, BE + "/state").field, "path"
        )
        self.assertEqual(
            self.assertRaises(XenbusPathError, parseFrontendPath, FE + "/x").field, "path"
        )

    def test_badShape(self) -> None:
        """A path of the wrong shape is refused with field C{path}."""
        for bad in (
            "",
            "local/domain/5/device/vbd/1",
            "/local/domain/5/device/vbd",
            "/local/domain/5/backend/vbd/1",
            "/vm/5/device/vbd/1",
            "/local/domain/5/device/vbd/1/",
            "/local/domain//5/device/vbd/1",
            "/local/domain/5/device/vbd/1 ",
            5,
        ):
            e = self.assertRaises(XenbusPathError, parseFrontendPath, bad)
            self.assertEqual(e.field, "path", bad)
        for bad in ("/local/domain/0/backend/vbd/5", "/local/domain/0/device/vbd/5/1", FE):
            e = self.assertRaises(XenbusPathError, parseBackendPath, bad)
            self.assertEqual(e.field, "path", bad)

    def test_badComponents(self) -> None:
        """A malformed component is refused, naming its field."""
        cases = [
            (parseFrontendPath, "/local/domain/x/device/vbd/1", "domid"),
            (parseFrontendPath, "/local/domain/70000/device/vbd/1", "domid"),
            (parseFrontendPath, "/local/domain/5/device/vbd/012", "devid"),
            (parseFrontendPath, "/local/domain/5/device/vbd/xvda", "devid"),
            (parseBackendPath, "/local/domain/00/backend/vbd/5/1", "backendDomid"),
            (parseBackendPath, "/local/domain/0/backend/vbd/x/1", "frontendDomid"),
            (parseBackendPath, "/local/domain/0/backend/vbd/5/-1", "devid"),
        ]
        for parser, path, field in cases:
            e = self.assertRaises(XenbusPathError, parser, path)
            self.assertEqual(e.field, field, path)


class DeviceIdentityTests(SynchronousTestCase):
    """L{DeviceIdentity}: every path of one device, derived from one value."""

    def test_paths(self) -> None:
        """Frontend, backend, record and libxl paths of a plain device."""
        dev = DeviceIdentity(5, "vbd", 51712, backendDomid=3)
        self.assertEqual(dev.frontendPath, FE)
        self.assertEqual(dev.backendPath, "/local/domain/3/backend/vbd/5/51712")
        self.assertEqual(dev.frontend, FrontendDevice(5, "vbd", 51712))
        self.assertEqual(dev.backend, BackendDevice(3, "vbd", 5, 51712))
        self.assertEqual(dev.recordPath("/vm/abc"), "/vm/abc/device/vbd/51712")
        self.assertEqual(
            dev.libxlPaths,
            (
                "/libxl/5/device/vbd/51712",
                "/libxl/5/device/qdisk/51712",
                "/libxl/5/device/vbd3/51712",
            ),
        )
        self.assertEqual(DeviceIdentity(5, "vif", 0).libxlPaths, ("/libxl/5/device/vif/0",))

    def test_classesApart(self) -> None:
        """A tap2 disk: records under tap2, a vbd frontend and a vbd backend."""
        dev = DeviceIdentity(5, "tap2", 51712, frontendClass="vbd", backendClass="vbd")
        self.assertEqual(dev.frontendPath, FE)
        self.assertEqual(dev.backendPath, BE)
        self.assertEqual(dev.recordPath("/vm/abc"), "/vm/abc/device/tap2/51712")
        self.assertEqual(dev.libxlPaths, ("/libxl/5/device/tap2/51712",))

    def test_fromBackendPath(self) -> None:
        """The one backend-path parser gives the device back; bad paths name their field."""
        self.assertEqual(
            DeviceIdentity.fromBackendPath(BE),
            DeviceIdentity(5, "vbd", 51712, backendDomid=0, backendClass="vbd"),
        )
        dev = DeviceIdentity.fromBackendPath(BE, "tap2", "vbd")
        self.assertEqual((dev.devclass, dev.frontendPath, dev.backendPath), ("tap2", FE, BE))
        e = self.assertRaises(XenbusPathError, DeviceIdentity.fromBackendPath, FE)
        self.assertEqual(e.field, "path")

    def test_errorPath(self) -> None:
        """Where a backend driver's C{xenbus_dev_error} writes."""
        self.assertEqual(
            parseBackendPath(BE).errorPath, "/local/domain/0/error/backend/vbd/5/51712/error"
        )

    def test_validates(self) -> None:
        """Each field is checked like the path builders check it."""
        for args, kwargs, field in (
            ((-1, "vbd", 1), {}, "frontendDomid"),
            ((5, "a/b", 1), {}, "devclass"),
            ((5, "vbd", 2**31), {}, "devid"),
            ((5, "vbd", 1), {"backendDomid": "x"}, "backendDomid"),
            ((5, "tap", 1), {"frontendClass": ".."}, "devclass"),
        ):
            e = self.assertRaises(XenbusPathError, DeviceIdentity, *args, **kwargs)
            self.assertEqual(e.field, field, (args, kwargs))


class FakeProtocol:
    """
    Just enough of L{XenStoreProtocol} for L{XenStoreClient.waitFor}: READ,
    WATCH and UNWATCH over a dict, events fired synchronously.
    """

    connected = 1
    transport = None

    def __init__(self) -> None:
        self.store: dict[str, bytes] = {}
        self.watches: dict[bytes, bytes] = {}
        self.eventReceived: Any = None

    def request(self, op: int, payload: bytes, txId: int, context: Any) -> Deferred[bytes]:
        """Answer one request."""
        parts = payload.split(b"\0")
        if op == Op.READ:
            path = parts[0].decode()
            if path in self.store:
                return succeed(self.store[path])
            return fail(NoEntryError("ENOENT", "READ", path))
        if op == Op.WATCH:
            self.watches[parts[1]] = parts[0]
            # xenstored fires a new watch once.
            self.eventReceived(parts[0], parts[1])
            return succeed(b"OK\0")
        if op == Op.UNWATCH:
            del self.watches[parts[1]]
            return succeed(b"OK\0")
        raise AssertionError(f"unexpected request {op}")

    def set(self, path: str, value: str | None) -> None:
        """Write (or, with None, remove) a node and fire the watches on it."""
        if value is None:
            self.store.pop(path, None)
        else:
            self.store[path] = value.encode()
        for token, watched in list(self.watches.items()):
            if (path + "/").startswith(watched.decode() + "/"):
                self.eventReceived(path.encode(), token)


class WaitLogicTests(SynchronousTestCase):
    """The wait helpers' logic, against a fake connection and a L{Clock}."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.proto = FakeProtocol()
        self.xs = XenStoreClient(self.proto, self.clock)  # type: ignore[arg-type]

    def assertClean(self) -> None:
        """No watch and no timer is left behind."""
        self.assertEqual(self.xs.watchCount, 0)
        self.assertEqual(self.proto.watches, {})
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_stateAlreadyThere(self) -> None:
        """A state already reached fires at once."""
        self.proto.set(BE + "/state", "4")
        d = waitForState(self.xs, BE, [XenbusState.Connected], timeout=10)
        self.assertIs(self.successResultOf(d), XenbusState.Connected)
        self.assertClean()

    def test_stateReachedLater(self) -> None:
        """Other states and garbage are skipped; the first wanted state fires."""
        d = waitForState(self.xs, BE, {XenbusState.Connected, XenbusState.Closed}, timeout=10)
        for value in ("1", "2", "bogus", "", "3"):
            self.proto.set(BE + "/state", value)
            self.assertNoResult(d)
        self.proto.set(BE + "/state", "6")
        self.assertIs(self.successResultOf(d), XenbusState.Closed)
        self.assertClean()

    def test_singleState(self) -> None:
        """One state may be given on its own, as an int too."""
        self.proto.set(BE + "/state", "2")
        d = waitForState(self.xs, BE, 2)
        self.assertIs(self.successResultOf(d), XenbusState.InitWait)

    def test_stateTimeout(self) -> None:
        """No wanted state within the timeout: XenStoreTimeout with the last value."""
        self.proto.set(BE + "/state", "2")
        d = waitForState(self.xs, BE, XenbusState.Connected, timeout=10)
        self.clock.advance(9.9)
        self.assertNoResult(d)
        self.clock.advance(0.1)
        e = self.failureResultOf(d, XenStoreTimeout).value
        self.assertEqual((e.path, e.last), (BE + "/state", "2"))
        self.assertClean()

    def test_stateCancel(self) -> None:
        """Cancelling the wait removes its watch and timer."""
        d = waitForState(self.xs, BE, XenbusState.Connected, timeout=10)
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertClean()

    def test_badArguments(self) -> None:
        """No states, a non-state, or a bad path raise before anything is sent."""
        self.assertRaises(InvalidArgumentError, waitForState, self.xs, BE, [])
        self.assertRaises(InvalidArgumentError, waitForState, self.xs, BE, [9])
        self.assertRaises(ValueError, waitForState, self.xs, BE + "/", 4)
        self.assertRaises(ValueError, waitForHotplugStatus, self.xs, "no//path")
        self.assertClean()

    def test_classify(self) -> None:
        """xend's reading of hotplug-status, with empty meaning not yet."""
        self.assertIsNone(classifyHotplugStatus(None))
        self.assertIsNone(classifyHotplugStatus(""))
        self.assertIs(classifyHotplugStatus("connected"), HotplugStatus.Connected)
        self.assertIs(classifyHotplugStatus("error"), HotplugStatus.Error)
        self.assertIs(classifyHotplugStatus("busy"), HotplugStatus.Busy)
        self.assertIs(classifyHotplugStatus("whatever"), HotplugStatus.Connected)

    def test_hotplugConnected(self) -> None:
        """Absent and empty keep waiting; connected fires without an error text."""
        d = waitForHotplugStatus(self.xs, BE, timeout=40)
        self.proto.set(BE + "/hotplug-status", "")
        self.assertNoResult(d)
        self.proto.set(BE + "/hotplug-error", "stale")
        self.proto.set(BE + "/hotplug-status", "connected")
        self.assertEqual(
            self.successResultOf(d), HotplugResult(HotplugStatus.Connected, "connected", None)
        )
        self.assertClean()

    def test_hotplugError(self) -> None:
        """error fires with the hotplug-error text."""
        d = waitForHotplugStatus(self.xs, BE, timeout=40)
        self.proto.set(BE + "/hotplug-error", "/dev/nope does not exist.")
        self.proto.set(BE + "/hotplug-status", "error")
        result = self.successResultOf(d)
        self.assertEqual(
            result, HotplugResult(HotplugStatus.Error, "error", "/dev/nope does not exist.")
        )
        self.assertEqual(result.status, "error")
        self.assertClean()

    def test_hotplugBusyWithoutText(self) -> None:
        """busy without a hotplug-error fires with error None."""
        self.proto.set(BE + "/hotplug-status", "busy")
        d = waitForHotplugStatus(self.xs, BE)
        self.assertEqual(self.successResultOf(d), HotplugResult(HotplugStatus.Busy, "busy", None))

    def test_hotplugOther(self) -> None:
        """Any other value counts as connected, as in xend."""
        self.proto.set(BE + "/hotplug-status", "online")
        d = waitForHotplugStatus(self.xs, BE)
        self.assertIs(self.successResultOf(d).status, HotplugStatus.Connected)

    def test_hotplugTimeout(self) -> None:
        """No status within the timeout: XenStoreTimeout, nothing left behind."""
        d = waitForHotplugStatus(self.xs, BE, timeout=40)
        self.clock.advance(40)
        e = self.failureResultOf(d, XenStoreTimeout).value
        self.assertEqual(e.path, BE + "/hotplug-status")
        self.assertClean()


class RealXenstoredWaitTests(TestCase):
    """The wait helpers against the real C xenstored."""

    async def setUp(self) -> None:
        """A real xenstored, a connection to wait on and one that writes."""
        requireRealXenstored(self)
        workdir = os.path.abspath(self.mktemp())
        self.xenstored = RealXenstored(workdir, domains=range(32))
        self.xenstored.start()
        self.addCleanup(self.xenstored.stop)
        self.xs = await self.connect()
        self.writer = await self.connect()

    async def connect(self) -> XenStoreClient:
        """A new connection, closed at cleanup."""
        xs = await connectXenStore(reactor, "unix:" + self.xenstored.socketPath)
        self.addCleanup(xs.disconnect)
        return xs

    async def test_stateChanges(self) -> None:
        """A wait sees another connection's writes and fires on the wanted state."""
        await self.writer.write(BE + "/state", "1")
        d = waitForState(self.xs, BE, [XenbusState.Connected], timeout=10)
        await self.writer.write(BE + "/state", "2")
        await self.writer.write(BE + "/state", "4")
        self.assertIs(await d, XenbusState.Connected)
        self.assertEqual(self.xs.watchCount, 0)

    async def test_stateTimeout(self) -> None:
        """A short real timeout fails with XenStoreTimeout and removes the watch."""
        await self.writer.write(BE + "/state", "2")
        d = waitForState(self.xs, BE, XenbusState.Closed, timeout=0.2)
        with self.assertRaises(XenStoreTimeout) as cm:
            await d
        self.assertEqual(cm.exception.last, "2")
        self.assertEqual(self.xs.watchCount, 0)

    async def test_stateOfRemovedDevice(self) -> None:
        """Removing the directory does not satisfy a wait (state absent)."""
        await self.writer.write(BE + "/state", "4")
        d = waitForState(self.xs, BE, XenbusState.Closed, timeout=10)
        await self.writer.rm(BE)
        await self.writer.write(BE + "/state", "6")
        self.assertIs(await d, XenbusState.Closed)

    async def test_hotplugError(self) -> None:
        """A script's error report (as the block script writes it) is returned."""
        d = waitForHotplugStatus(self.xs, BE, timeout=10)
        await self.writer.write(BE + "/hotplug-error", "losetup failed")
        await self.writer.write(BE + "/hotplug-status", "error")
        result = await d
        self.assertEqual(result, HotplugResult(HotplugStatus.Error, "error", "losetup failed"))
        self.assertEqual(self.xs.watchCount, 0)

    async def test_hotplugConnected(self) -> None:
        """An empty pre-written status is skipped; connected is returned."""
        await self.writer.write(BE + "/hotplug-status", "")
        d = waitForHotplugStatus(self.xs, BE, timeout=10)
        await self.writer.write(BE + "/hotplug-status", "connected")
        self.assertEqual(await d, HotplugResult(HotplugStatus.Connected, "connected", None))
