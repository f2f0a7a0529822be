"""
The daemon: L{xenddev.service.XenddevService} in-process (listeners, HTTP
Basic on TCP, draining operations at shutdown) and C{twistd -n xenddev} as a
real subprocess (sockets and their modes, the store seen by the real
C{xenstore-ls}, SIGTERM, the metrics endpoint).

The daemon's parts are child services started in dependency order and
stopped in reverse; its limits reach its listeners; during a XenStore
outage (the store stopped, then restarted) calls are answered with fault
16 after C{timeouts.connect} and nothing of them is written afterwards.

The end-to-end tests — vbd and vif attached and detached through the CLI
and XML-RPC, error paths with their fault codes and exit codes, the
C{vdi.*}/C{datapath.*} namespaces, the metrics — run against both stores:
the daemon's embedded xenstored, and the real C xenstored (started per
test by L{RealXenstoredFixture}) with the daemon told to simulate the
xenbus ends there (C{--simulate on}), as no hypervisor runs here.
"""

from __future__ import annotations

import base64
import io
import os
import re
import shutil
import signal
import socket
import stat
import sys
from typing import Any

import attrs
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.internet.task import Clock, deferLater
from twisted.internet.threads import deferToThread
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SkipTest, TestCase
from twisted.web.client import Agent, FileBodyProducer, readBody
from twisted.web.http_headers import Headers

from tests.support.fixtures import EmbeddedXenstoredFixture, RealXenstoredFixture
from tests.support.host import (
    TWISTD_LAUNCHER,
    HostSuite,
    WatchedProcess,
    pythonEnv,
    shortTempDir,
    spawnTwistd,
)
from tests.support.treedump import dumpTree
from tests.test_cli import CLIClientMixin
from tests.test_datapath import tapRecord
from tests.test_httplimits import exchange, post
from tests.test_storagectl import RecordingPauser
from tests.test_xmlrpc import RPCServerMixin
from xenddev.backendctrl.records import updateRecord
from xenddev.cli import EXIT_BAD_CONFIG, EXIT_EXISTS, EXIT_NO_DEVICE, EXIT_NO_DOMAIN
from xenddev.config import (
    Config,
    DriverDomainConfig,
    LimitsConfig,
    TimeoutsConfig,
    XmlRpcConfig,
)
from xenddev.httplimits import HttpLimits
from xenddev.metrics import renderMetrics
from xenddev.service import ServiceDeviceManager, ShuttingDownError, StartupError, XenddevService
from xenddev.xenbus import waitForState
from xenddev.xenstore.connection import connectXenStore
from xenddev.xenstore.protocol import ROUND_TRIPS
from xenddev.xenstore.wire import Op
from xenddev.xmlrpc import FaultCode

GUEST = 5

STATUS_CALL = (
    b"<?xml version='1.0'?><methodCall><methodName>daemon.status</methodName>"
    b"<params></params></methodCall>"
)


def _rundir(test: TestCase) -> str:
    """A short temporary run directory (UNIX socket paths are limited to 107 bytes)."""
    return shortTempDir(test, "xd-")


def _image(directory: str, name: str = "disk.img", size: int = 1 << 20) -> str:
    """A sparse image file."""
    path = os.path.join(directory, name)
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def _roundTrips(text: str) -> dict[str, int]:
    """The XenStore round trips by operation in a metrics text."""
    return {
        m.group(1): int(m.group(2))
        for m in re.finditer(
            r'^xenddev_xenstore_requests_total\{operation="(\w+)"\} (\d+)$', text, re.M
        )
    }


def _httpUnix(path: str, request: bytes) -> bytes:
    """Send C{request} over a UNIX socket (blocking; run in a thread); the whole answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(30)
        s.connect(path)
        s.sendall(request)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data


def _httpGetUnix(path: str) -> str:
    """GET / over a UNIX socket (blocking; run in a thread); the body."""
    data = _httpUnix(path, b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200") or head.startswith(b"HTTP/1.1 200"), head
    return body.decode()


class DrainTests(TestCase):
    """L{ServiceDeviceManager.drain}: bounded waiting, then cancellation."""

    def setUp(self) -> None:
        """A manager on a Clock with no controllers."""
        self.clock = Clock()
        self.manager = ServiceDeviceManager(None, self.clock, {})

    def test_finishesInTime(self) -> None:
        """An operation finishing within the grace time is not cancelled."""
        op: Deferred[int] = Deferred()
        result = self.manager._run("create", 5, "vbd", "new", lambda: op)
        drained = self.manager.drain(10)
        self.assertNoResult(drained)
        self.clock.advance(3)
        op.callback(51728)
        self.successResultOf(drained)
        self.assertEqual(self.successResultOf(result), 51728)
        self.assertEqual(self.manager.counts[("create", "vbd", "ok")], 1)

    def test_cancelledAfterGrace(self) -> None:
        """An operation still running after the grace time is cancelled."""
        compensated: list[bool] = []
        op: Deferred[None] = Deferred(lambda d: compensated.append(True))
        result = self.manager._run("destroy", 5, "vbd", 51728, lambda: op)
        drained = self.manager.drain(5)
        self.clock.advance(5)
        self.successResultOf(drained)
        self.assertEqual(compensated, [True])
        self.failureResultOf(result, CancelledError)
        self.assertEqual(self.manager.counts[("destroy", "vbd", "cancelled")], 1)
        self.assertEqual(self.manager.operations, set())

    def test_refusesAfterDrain(self) -> None:
        """Once draining, new operations are refused with a busy error (fault 16)."""
        self.successResultOf(self.manager.drain(1))
        e = self.assertRaises(
            ShuttingDownError, self.manager._run, "create", 5, "vbd", "new", Deferred
        )
        self.assertEqual(e.code, "busy")
        self.assertEqual(e.faultCode, FaultCode.UNAVAILABLE)
        self.assertEqual(self.clock.getDelayedCalls(), [])


# The two stores


class EmbeddedStore:
    """The daemon starts its embedded xenstored (simulation: auto)."""

    storeKind = "embedded"

    def storeOptions(self, rundir: str) -> dict[str, Any]:
        """Config values selecting the store."""
        return {"xenstore": "embedded"}

    def storeFlags(self) -> list[str]:
        """twistd flags selecting the store."""
        return ["--xenstore", "embedded"]

    def storeSocket(self, rundir: str) -> str:
        """Where the store listens."""
        return os.path.join(rundir, "xenstored", "socket")


class RealStore(RealXenstoredFixture):
    """A real C xenstored per test; the daemon simulates the xenbus ends on it."""

    storeKind = "real"

    def storeOptions(self, rundir: str) -> dict[str, Any]:
        """Config values selecting the store: unix:PATH and simulate: on."""
        self.startServer()
        return {
            "xenstore": f"unix:{self.socketPath}",
            "driver_domain": DriverDomainConfig(simulate="on"),
        }

    def storeFlags(self) -> list[str]:
        """twistd flags: --xenstore unix:PATH --simulate on."""
        self.startServer()
        return ["--xenstore", f"unix:{self.socketPath}", "--simulate", "on"]

    def storeSocket(self, rundir: str) -> str:
        """The C xenstored's socket."""
        return self.socketPath


class StoreClientMixin:
    """A XenStore client of the test on the daemon's store (the suites' base)."""

    addCleanup: Any
    storeSocket: Any
    storeKind: str
    assertEqual: Any
    assertIn: Any
    assertTrue: Any
    assertFalse: Any
    assertGreater: Any

    async def storeClient(self, path: str) -> Any:
        """Connect to the store at C{path}; disconnected at cleanup."""
        xs = await connectXenStore(reactor, endpoint=UNIXClientEndpoint(reactor, path))
        self.addCleanup(xs.disconnect)
        return xs


# The service in this process


class ServiceTests(TestCase):
    """The service in this process, on the embedded xenstored."""

    def makeService(self, **xmlrpc: Any) -> XenddevService:
        """A service on a fresh run directory."""
        config = Config(
            rundir=_rundir(self),
            xenstore="embedded",
            xmlrpc=XmlRpcConfig(**xmlrpc),
            timeouts=TimeoutsConfig(shutdown=2.0),
        )
        return XenddevService(config, reactor=reactor)

    async def startService(self, service: XenddevService) -> None:
        """Start it and stop it at cleanup."""
        service.startService()
        self.addCleanup(service.stopService)
        await service.ready

    async def test_socketsAndCleanStop(self) -> None:
        """Both sockets are mode 600 while running and gone after stop."""
        service = self.makeService()
        await self.startService(service)
        config = service.config
        for path in (config.socketPath, config.xenstoredSocketPath):
            st = os.stat(path)
            self.assertTrue(stat.S_ISSOCK(st.st_mode))
            self.assertEqual(stat.S_IMODE(st.st_mode), 0o600)
        self.assertTrue(service.embedded)
        self.assertTrue(service.simulated)
        await service.stopService()
        self.assertFalse(os.path.exists(config.socketPath))
        self.assertFalse(os.path.exists(config.xenstoredSocketPath))
        self.assertFalse(os.path.lexists(config.socketPath + ".lock"))

    async def test_tcpRequiresCredentials(self) -> None:
        """The TCP listener (127.0.0.1) refuses missing and wrong credentials."""
        secrets = os.path.join(_rundir(self), "passwords")
        with open(secrets, "w") as f:
            f.write("admin:s3cret\n")
        os.chmod(secrets, 0o600)
        service = self.makeService(tcp="tcp:0", password_file=secrets)
        await self.startService(service)
        address = service.ports[1].getHost()
        self.assertEqual(address.host, "127.0.0.1")
        url = f"http://127.0.0.1:{address.port}/RPC2".encode()
        agent = Agent(reactor)

        async def post(auth: str | None) -> tuple[int, bytes]:
            headers = Headers({b"content-type": [b"text/xml"]})
            if auth is not None:
                token = base64.b64encode(auth.encode()).decode()
                headers.addRawHeader(b"authorization", f"Basic {token}".encode())
            body = FileBodyProducer(io.BytesIO(STATUS_CALL))
            response = await agent.request(b"POST", url, headers, body)
            return response.code, await readBody(response)

        self.assertEqual((await post(None))[0], 401)
        self.assertEqual((await post("admin:wrong"))[0], 401)
        self.assertEqual((await post("intruder:s3cret"))[0], 401)
        code, body = await post("admin:s3cret")
        self.assertEqual(code, 200)
        self.assertIn(b"<methodResponse>", body)
        self.assertIn(b"<name>classes</name>", body)

    async def test_readablePasswordFileRefused(self) -> None:
        """A password file readable by others stops the start-up."""
        secrets = os.path.join(_rundir(self), "passwords")
        with open(secrets, "w") as f:
            f.write("admin:s3cret\n")
        os.chmod(secrets, 0o644)
        service = self.makeService(tcp="tcp:0", password_file=secrets)
        service.startService()
        self.addCleanup(service.stopService)
        with self.assertRaises(StartupError) as cm:
            await service.ready
        self.assertIn("readable by others", str(cm.exception))
        self.flushLoggedErrors()

    async def test_simulateOnXenHostRefused(self) -> None:
        """simulate: on is refused on a Xen host (a xenbus device exists)."""
        config = Config(
            rundir=_rundir(self),
            xenstore="embedded",
            driver_domain=DriverDomainConfig(simulate="on"),
        )
        service = XenddevService(
            config,
            reactor=reactor,
            exists=lambda p: p == "/dev/xen/xenbus" or os.path.exists(p),
        )
        service.startService()
        self.addCleanup(service.stopService)
        with self.assertRaises(StartupError) as cm:
            await service.ready
        self.assertIn("Xen host", str(cm.exception))

    async def test_autoFallsBackToEmbedded(self) -> None:
        """C{auto} with no xenstored and no xenbus device starts the embedded store."""
        service = self.makeService()
        service.config = attrs.evolve(service.config, xenstore="auto")
        real = os.path.exists
        service._exists = lambda p: (
            False if p.startswith(("/var/run/xen", "/dev/", "/proc/")) else real(p)
        )
        os.environ.pop("XENSTORED_PATH", None)
        await self.startService(service)
        self.assertTrue(service.embedded)
        self.assertEqual(service.xenstoreAddress, f"unix:{service.config.xenstoredSocketPath}")

    async def test_partsAreChildServices(self) -> None:
        """
        The embedded xenstored, the XenStore connections, the agent, the
        simulators, the operations, the reaper and the listeners are child
        services in dependency order (issue 12); stopping the daemon stops
        them in reverse.
        """
        service = self.makeService()
        await self.startService(service)
        names = [child.name for child in service]
        self.assertEqual(
            names[:-1],
            [
                None,  # the embedded xenstored
                "xenstore connection",
                "agent connection",
                "agent",
                "simulator connection",
                "simulator",
                "quiesce handles",
                "device operations",
                "reaper",
            ],
        )
        self.assertTrue(names[-1].startswith("listener unix:"), names[-1])
        self.assertIs(service.xenstored, next(iter(service)))
        stopped: list[str | None] = []
        for child in service:
            stop = child.stopService

            def recorded(child: Any = child, stop: Any = stop) -> Any:
                stopped.append(child.name)
                return stop()

            child.stopService = recorded
        await service.stopService()
        self.assertEqual(stopped, names[::-1])
        self.assertFalse(any(child.running for child in service))

    async def test_limitsReachListeners(self) -> None:
        """
        The C{limits:} keys hold the UNIX and TCP listeners and the quiesce
        handles; a body over the limit is refused with 413 on the daemon's
        socket.
        """
        secrets = os.path.join(_rundir(self), "passwords")
        with open(secrets, "w") as f:
            f.write("admin:s3cret\n")
        os.chmod(secrets, 0o600)
        service = self.makeService(tcp="tcp:0", password_file=secrets)
        service.config = attrs.evolve(
            service.config,
            limits=LimitsConfig(
                body_size=2048,
                connections=5,
                idle_timeout=7,
                request_timeout=3,
                quiesce_handles=2,
            ),
        )
        await self.startService(service)
        expected = HttpLimits(bodySize=2048, connections=5, idleTimeout=7, requestTimeout=3)
        self.assertEqual([p.factory.limits for p in service.ports], [expected, expected])
        self.assertEqual(service.storage.maxHandles, 2)
        body = b"<?xml version='1.0'?><methodCall>" + b" " * 4096
        answer = await deferToThread(exchange, service.config.socketPath, post(body))
        self.assertTrue(answer.startswith(b"HTTP/1.1 413 "), answer[:100])

    async def test_secondDaemonRefused(self) -> None:
        """A second service on the same run directory cannot take the socket."""
        first = self.makeService()
        await self.startService(first)
        second = XenddevService(
            attrs.evolve(first.config, xenstore=f"unix:{first.config.xenstoredSocketPath}"),
            reactor=reactor,
        )
        second.startService()
        self.addCleanup(second.stopService)
        with self.assertRaises(StartupError) as cm:
            await second.ready
        self.assertIn("another xenddev", str(cm.exception))
        self.assertTrue(os.path.exists(first.config.socketPath))


class OutageSuite(RPCServerMixin, StoreClientMixin):
    """
    The daemon during a XenStore outage (issue 13, finding 8): its store
    (a server fixture of the test) is stopped, then restarted; mixed with
    the fixture and TestCase.
    """

    startServer: Any
    killServer: Any
    restartServer: Any
    socketPath: str

    async def test_callsAnsweredDuringOutage(self) -> None:
        """
        With xenstored gone, an attach and a listing through XML-RPC fail
        with fault 16 ("XenStore is unreachable") after timeouts.connect,
        not at the client's timeout. Once the store is back, nothing of the
        refused attach is written to it, and calls are answered again.
        """
        rundir = _rundir(self)  # type: ignore[arg-type]
        config = Config(
            rundir=rundir,
            xenstore=f"unix:{self.startServer()}",
            driver_domain=DriverDomainConfig(simulate="on"),
            timeouts=TimeoutsConfig(connect=1.0, shutdown=2.0),
        )
        service = XenddevService(config, reactor=reactor)
        service.startService()
        self.addCleanup(service.stopService)
        await service.ready
        self.rpcPath = config.socketPath
        self.assertEqual(await self.call("vdi.list", 0), [])
        image = _image(rundir)
        self.killServer()
        began = reactor.seconds()
        f = await self.assertFault(
            FaultCode.UNAVAILABLE, "device.attach", GUEST, "vbd", {"spec": f"xvdb,r,{image}"}
        )
        self.assertIn("XenStore is unreachable", f.faultString)
        elapsed = reactor.seconds() - began
        self.assertTrue(1.0 <= elapsed < 10.0, elapsed)
        await self.assertFault(FaultCode.UNAVAILABLE, "vdi.list", 0)
        self.restartServer()
        manager = service.manager
        assert manager is not None
        for _ in range(500):
            if manager.xs.connected:
                break
            await deferLater(reactor, 0.01, lambda: None)
        await deferLater(reactor, 0.5, lambda: None)  # anything still queued would be sent
        xs = await self.storeClient(self.socketPath)
        self.assertFalse(await xs.exists(f"/local/domain/{GUEST}"))
        self.assertFalse(await xs.exists("/vm"))
        # Answered again: the restarted store knows no guest.
        await self.assertFault(FaultCode.INVALID_DOMAIN, "device.list", GUEST)


class EmbeddedXenstoredOutageTests(  # type: ignore[misc]
    OutageSuite, EmbeddedXenstoredFixture, TestCase
):
    """An outage of an embedded xenstored the daemon connects to."""


class RealXenstoredOutageTests(OutageSuite, RealXenstoredFixture, TestCase):  # type: ignore[misc]
    """An outage of the C xenstored."""


class ServiceStoreSuite(StoreClientMixin):
    """The service in this process on one of the stores; mixed with a store and TestCase."""

    storeOptions: Any
    assertIsNone: Any

    async def startService(self, **timeouts: float) -> XenddevService:
        """A service with the store's options; stopped at cleanup."""
        rundir = _rundir(self)  # type: ignore[arg-type]
        config = Config(
            rundir=rundir,
            timeouts=TimeoutsConfig(**{"shutdown": 2.0, **timeouts}),
            **self.storeOptions(rundir),
        )
        service = XenddevService(config, reactor=reactor, listen=False)
        service.startService()
        self.addCleanup(service.stopService)
        await service.ready
        self.assertTrue(service.simulated)
        self.assertEqual(service.embedded, self.storeKind == "embedded")
        return service

    async def test_attachDetachThroughManager(self) -> None:
        """
        A vbd and a vif attach to a SIMULATED guest and detach; the XenStore
        round trips counted for the metrics grew with the attach.
        """
        service = await self.startService()
        image = _image(service.config.rundir)
        manager = service.manager
        assert manager is not None
        writes = ROUND_TRIPS.get(Op.WRITE, 0)
        starts = ROUND_TRIPS.get(Op.TRANSACTION_START, 0)
        spec = f"format=raw, vdev=xvdb, access=rw, target={image}"
        devid = await manager.createDevice(GUEST, "vbd", {"spec": spec})
        self.assertEqual(devid, 51728)
        self.assertGreater(ROUND_TRIPS[Op.WRITE], writes)
        self.assertGreater(ROUND_TRIPS[Op.TRANSACTION_START], starts)
        self.assertEqual(await manager.createDevice(GUEST, "vif", {"bridge": "xenbr0"}), 0)
        rows = await manager.listDevices(GUEST, "vbd")
        self.assertEqual([r.devid for r in rows], [51728])
        self.assertEqual(await manager.getBlockDeviceClass(GUEST, "xvdb"), "vbd")
        await manager.destroyDevice(GUEST, "vbd", "xvdb")
        await manager.destroyDevice(GUEST, "vif", 0)
        self.assertEqual(await manager.listDevices(GUEST, "vbd"), [])
        text = renderMetrics(service)
        self.assertIn('operation="create",class="vbd",outcome="ok"} 1', text)
        self.assertIn('operation="destroy",class="vif",outcome="ok"} 1', text)
        self.assertIn("xenddev_simulated 1", text)
        self.assertGreater(_roundTrips(text)["WRITE"], writes)

    async def test_shutdownCancelsInFlightWithCompensation(self) -> None:
        """
        An attach still waiting at shutdown is cancelled after
        C{timeouts.shutdown}; its compensation leaves no trace in XenStore.
        """
        service = await self.startService(shutdown=0.3, create=30)
        xs = await self.storeClient(self.storeSocket(service.config.rundir))
        manager = service.manager
        assert manager is not None
        # Without the (simulated) kernel backend the device never connects.
        await service.simHost.backend.stop()
        image = _image(service.config.rundir)
        attach = manager.createDevice(7, "vbd", {"spec": f"vdev=xvdb, access=r, target={image}"})
        attach.addErrback(lambda f: f.trap(CancelledError) and None)
        request = "/local/domain/7/device/vbd/51728"
        for _ in range(200):
            if await xs.exists(request):
                break
            await deferLater(reactor, 0.01, lambda: None)
        self.assertTrue(await xs.exists(request))
        await service.stopService()
        self.assertEqual(dict(manager.counts), {("create", "vbd", "cancelled"): 1})
        for path in (
            request,
            "/local/domain/0/backendctrl/vdi/vbd-7-51728",
            "/local/domain/0/backend/vbd/7/51728",
        ):
            if self.storeKind == "real":  # the embedded store stopped with the service
                self.assertFalse(await xs.exists(path), path)
        if self.storeKind == "embedded":
            tree = service.xenstored.server.tree
            for path in (request, "/local/domain/0/backendctrl/vdi/vbd-7-51728"):
                self.assertIsNone(tree.lookup(path.encode()), path)

    async def test_stopResumesQuiesceHandles(self) -> None:
        """
        The service's storage control holds quiesce handles on its own
        data-path control (timeouts.quiesce as their bound); stopping the
        service resumes what they still hold.
        """
        service = await self.startService(quiesce=7)
        xs = await self.storeClient(self.storeSocket(service.config.rundir))
        dp = tapRecord(0, "held", ("/srv/held.vhd",), 3)
        await xs.mkdir(dp.path)
        await updateRecord(xs, dp, dp)
        pauser = RecordingPauser()
        service.dataPaths.register("tap", pauser)
        held = await service.storage.quiesce("/srv/held.vhd")
        self.assertEqual(held.deadline - held.created, 7)
        self.assertEqual(pauser.paused, {(0, "held")})
        await service.stopService()
        self.assertEqual(pauser.paused, set())
        self.assertEqual(service.storage.handles(), [])


class EmbeddedServiceTests(ServiceStoreSuite, EmbeddedStore, TestCase):  # type: ignore[misc]
    """The service on its embedded xenstored."""


class RealXenstoredServiceTests(ServiceStoreSuite, RealStore, TestCase):  # type: ignore[misc]
    """The service on the C xenstored, simulating the xenbus ends."""


# twistd -n xenddev as a subprocess


class _Daemon(WatchedProcess):
    """Collects the daemon's output; fires C{ready} on its ready line."""

    readyLine = b"xenddev ready"

    def endedWith(self, end: Any) -> bool:
        """
        Whether the exit was clean: status 0, or (as twistd does after a
        clean shutdown on a signal) killed by SIGTERM.
        """
        return bool(end.exitCode == 0 or end.signal == signal.SIGTERM)


class DaemonProcessMixin:
    """Starts C{twistd -n xenddev} in a run directory of the test."""

    addCleanup: Any
    fail: Any

    def setUp(self) -> None:
        """A run directory and the launcher."""
        self.rundir = _rundir(self)  # type: ignore[arg-type]
        self.launcher = os.path.join(self.rundir, "launch.py")
        with open(self.launcher, "w") as f:
            f.write(TWISTD_LAUNCHER)

    async def startDaemon(self, *args: str) -> _Daemon:
        """Start the daemon; wait for its ready line; stop it at cleanup if alive."""
        proto = _Daemon()
        self.process = spawnTwistd(self, proto, self.rundir, "xenddev", *args)
        await proto.ready
        return proto

    async def stopDaemon(self, proto: _Daemon) -> bool:
        """SIGTERM, then wait for the exit; whether it was clean."""
        self.process.signalProcess("TERM")
        clean: bool = await proto.ended
        if not clean or b"xenddev stopped" not in proto.output:
            self.fail(proto.output.decode(errors="replace"))
        return clean


class DaemonProcessTests(DaemonProcessMixin, TestCase):
    """C{twistd -n xenddev} on its embedded xenstored: start, config, stop."""

    async def test_defaultRundirAndConfigFile(self) -> None:
        """With a config file and no flags, its rundir and xenstore are used."""
        config = os.path.join(self.rundir, "xenddev.yaml")
        with open(config, "w") as f:
            f.write("rundir: state\nxenstore: embedded\ntimeouts: {shutdown: 1}\n")
        proto = await self.startDaemon("--config", config)
        self.assertTrue(os.path.exists(os.path.join(self.rundir, "state", "xenddev.sock")))
        self.assertTrue(await self.stopDaemon(proto))

    async def test_badConfigExits(self) -> None:
        """A bad config file stops twistd at once with the config's message."""
        config = os.path.join(self.rundir, "bad.yaml")
        with open(config, "w") as f:
            f.write("timeouts:\n  create: never\n")
        out, err, code = await getProcessOutputAndValue(
            sys.executable,
            [self.launcher, "-n", "xenddev", "--config", config],
            env=pythonEnv(),
            path=self.rundir,
        )
        self.assertNotEqual(code, 0)
        self.assertIn(f"{config}:2: timeouts.create = 'never'".encode(), out + err)

    async def test_sigint(self) -> None:
        """SIGINT (Ctrl-C in the foreground) stops it cleanly too."""
        run = os.path.join(self.rundir, "run")
        proto = await self.startDaemon("--rundir", run, "--xenstore", "embedded")
        os.kill(self.process.pid, signal.SIGINT)
        await proto.ended
        self.assertIn(b"xenddev stopped", proto.output)
        self.assertFalse(os.path.lexists(os.path.join(run, "xenddev.sock")))


class DaemonEndToEndSuite(
    CLIClientMixin, DaemonProcessMixin, RPCServerMixin, StoreClientMixin, HostSuite
):
    """
    The daemon as a subprocess on one of the stores, driven through the
    CLI and XML-RPC; mixed with a store and TestCase.
    """

    storeFlags: Any

    async def startStoreDaemon(self) -> _Daemon:
        """
        The daemon on the store, with metrics on a UNIX socket (config file)
        and the store chosen by flags; C{self.rpcPath} is its socket.
        """
        self.run = os.path.join(self.rundir, "run")
        config = os.path.join(self.rundir, "xenddev.yaml")
        with open(config, "w") as f:
            f.write(
                "timeouts: {shutdown: 2}\n"
                f"metrics: {{enabled: true, endpoint: 'unix:{self.rundir}/metrics.sock'}}\n"
            )
        proto = await self.startDaemon("--config", config, "--rundir", self.run, *self.storeFlags())
        self.rpcPath = os.path.join(self.run, "xenddev.sock")
        self.xs = await self.storeClient(self.storeSocket(self.run))
        return proto

    async def connected(self, devclass: str, devid: int) -> None:
        """Wait until the simulated guest has connected the device."""
        await waitForState(self.xs, f"/local/domain/{GUEST}/device/{devclass}/{devid}", 4, 10)

    def metrics(self) -> Deferred[str]:
        """The metrics endpoint's text."""
        return deferToThread(_httpGetUnix, os.path.join(self.rundir, "metrics.sock"))

    async def test_vbdThroughCliAndXenstoreLs(self) -> None:
        """
        block-attach, block-list (table), xenstore-ls on the store, detach;
        the sockets are 600; the metrics count the attach and its XenStore
        round trips, and their endpoint keeps the listeners' limits (a body
        over C{limits.body_size} is refused with 413 unread); SIGTERM stops
        the daemon cleanly, removing its socket.
        """
        if shutil.which("xenstore-ls") is None:
            raise SkipTest("xenstore-ls (xenstore-utils) is not installed")
        proto = await self.startStoreDaemon()
        self.assertIn(b"SIMULATED", proto.output)
        self.assertEqual(stat.S_IMODE(os.stat(self.rpcPath).st_mode), 0o600)
        trips = _roundTrips(await self.metrics())
        big = await deferToThread(
            _httpUnix,
            os.path.join(self.rundir, "metrics.sock"),
            b"POST /metrics HTTP/1.0\r\nContent-Length: 50000000\r\n\r\n",
        )
        self.assertTrue(big.startswith(b"HTTP/1.1 413") or big.startswith(b"HTTP/1.0 413"), big)
        image = _image(self.rundir)
        await self.ok("block-attach", str(GUEST), "format=raw", "vdev=xvda", f"target={image}")
        await self.connected("vbd", 51712)
        table = (await self.ok("block-list", str(GUEST))).splitlines()
        self.assertEqual(table[1].split()[:4], ["51712", "0", str(GUEST), "4"])
        store = self.storeSocket(self.run)
        out, err, code = await getProcessOutputAndValue(
            "xenstore-ls",
            ["/local/domain/0/backend/vbd"],
            env=dict(os.environ, XENSTORED_PATH=store),
        )
        self.assertEqual(code, 0, err)
        self.assertIn(f'params = "{image}"'.encode(), out)
        text = await self.metrics()
        self.assertIn('operation="create",class="vbd",outcome="ok"} 1', text)
        self.assertGreater(_roundTrips(text)["WRITE"], trips.get("WRITE", 0))
        self.assertGreater(
            _roundTrips(text)["TRANSACTION_START"], trips.get("TRANSACTION_START", 0)
        )
        self.assertEqual(await self.ok("block-detach", str(GUEST), "xvda"), "")
        self.assertEqual(len((await self.ok("block-list", str(GUEST))).splitlines()), 1)
        self.assertTrue(await self.stopDaemon(proto))
        self.assertFalse(os.path.lexists(self.rpcPath))
        self.assertFalse(os.path.lexists(self.rpcPath + ".lock"))
        if self.storeKind == "embedded":
            self.assertFalse(os.path.lexists(store))

    async def test_qcow2WithDefaultKinds(self) -> None:
        """
        Out of the box (driver_domain.kinds: auto) a qcow2 image attaches
        through the qemu kind where qemu-storage-daemon is installed, and
        the start-up log names the kinds chosen.
        """
        if shutil.which("qemu-storage-daemon") is None or shutil.which("qemu-img") is None:
            raise SkipTest("qemu-storage-daemon/qemu-img (qemu-system-common, qemu-utils) missing")
        proto = await self.startStoreDaemon()
        self.assertIn(b"kinds blkback,netback,qemu", proto.output)
        image = os.path.join(self.rundir, "disk.qcow2")
        _out, err, code = await getProcessOutputAndValue(
            "qemu-img", ["create", "-q", "-f", "qcow2", image, "16M"]
        )
        self.assertEqual(code, 0, err)
        await self.ok("block-attach", str(GUEST), "format=qcow2", "vdev=xvdb", f"target={image}")
        await self.connected("vbd", 51728)
        kind = await self.xs.read("/local/domain/0/private/xenddev/objects/vdi/vbd-5-51728/kind")
        self.assertEqual(kind, "qemu")
        self.assertEqual(await self.ok("block-detach", str(GUEST), "xvdb"), "")
        self.assertTrue(await self.stopDaemon(proto))

    async def test_vifThroughXmlRpc(self) -> None:
        """
        vifs through device.attach and xend's device_create, listed, and
        detached by MAC and by devid; network-list through the CLI.
        """
        proto = await self.startStoreDaemon()
        mac = "00:16:3e:0a:0b:0c"
        attached = await self.call("device.attach", GUEST, "vif", {"mac": mac, "bridge": "br0"})
        self.assertEqual(attached, {"domain": GUEST, "class": "vif", "devid": 0})
        created = await self.call(
            "xend.domain.device_create", GUEST, "(vif (mac 00:16:3e:0a:0b:0d))"
        )
        self.assertEqual(created, ["vif", ["dom", GUEST, "id", 1]])
        await self.connected("vif", 0)
        await self.connected("vif", 1)
        rows = await self.call("device.list", GUEST, "vif")
        self.assertEqual([(r["devid"], r["state"]) for r in rows], [(0, 4), (1, 4)])
        table = (await self.ok("network-list", str(GUEST))).splitlines()
        self.assertEqual(table[1].split()[:5], ["0", "0", mac, "0", "4"])
        self.assertTrue(await self.call("device.detach", GUEST, "vif", mac))
        self.assertTrue(await self.call("xend.domain.destroyDevice", GUEST, "vif", 1, True))
        self.assertEqual(await self.call("device.list", GUEST), [])
        self.assertTrue(await self.stopDaemon(proto))

    async def test_errorPaths(self) -> None:
        """
        Fault codes over XML-RPC and exit codes of the CLI; none of the
        failures changes XenStore.
        """
        proto = await self.startStoreDaemon()
        image = _image(self.rundir)
        await self.ok("block-attach", str(GUEST), f"{image},raw,xvdb,r")
        await self.connected("vbd", 51728)
        before = await dumpTree(self.xs)
        f = await self.assertFault(
            FaultCode.DEVICE_EXISTS, "device.attach", GUEST, "vbd", {"spec": f"{image},raw,xvdb,r"}
        )
        self.assertEqual(f.faultString, "Device xvdb (51728) is already connected.")
        await self.assertFault(FaultCode.NO_SUCH_DEVICE, "device.detach", GUEST, "vbd", "xvdc")
        await self.assertFault(FaultCode.INVALID_DOMAIN, "device.list", 70000)
        await self.assertFault(FaultCode.INVALID_DOMAIN, "device.list", "nosuchguest")
        await self.assertFault(FaultCode.BAD_CONFIG, "device.attach", GUEST, "pci", {})
        await self.assertFault(
            FaultCode.BAD_CONFIG, "xend.domain.device_create", GUEST, "(vbd (dev xvda)"
        )
        await self.assertFault(FaultCode.BAD_CONFIG, "vdi.prepare", 0, "a/b", {"type": "file"})
        await self.assertFault(FaultCode.INVALID_DOMAIN, "vdi.list", GUEST)
        await self.assertFault(FaultCode.NOT_FOUND, "datapath.resume", "0123abcd")
        await self.assertFault(8001, "device.explode")
        for argv, exitCode, words in (
            (["block-attach", str(GUEST), f"{image},raw,xvdb,r"], EXIT_EXISTS, "already"),
            (["block-detach", str(GUEST), "xvdc"], EXIT_NO_DEVICE, "not connected"),
            (["block-list", "70000"], EXIT_NO_DOMAIN, "must be 0..32751"),
            (["network-attach", str(GUEST), "colour=red"], EXIT_BAD_CONFIG, "colour"),
            (["block-attach", str(GUEST), "/x,raw,nonsense,w"], EXIT_BAD_CONFIG, "vdev"),
        ):
            code, out, err = await self.cli(*argv)
            self.assertEqual((code, out), (exitCode, ""), (argv, err))
            self.assertTrue(err.startswith(f"xenddev {argv[0]}: "), err)
            self.assertIn(words, err)
            self.assertEqual(err.count("\n"), 1, err)
        await self.assertTreeIs(before)
        await self.ok("block-detach", str(GUEST), "xvdb")
        self.assertTrue(await self.stopDaemon(proto))

    async def test_vdiAndDatapathNamespaces(self) -> None:
        """
        An operator's vdi through vdi.* on the daemon's local driver domain
        (prepare, activate, list, deactivate, unprepare); the daemon's
        datapath.* answers (a blkback vdi has no data-path record).
        """
        proto = await self.startStoreDaemon()
        image = _image(self.rundir)
        target = {"type": "file", "params": image, "mode": "r"}
        self.assertEqual((await self.call("vdi.prepare", 0, "op1", target))["state"], "inactive")
        self.assertEqual((await self.call("vdi.activate", 0, "op1"))["state"], "active")
        listed = await self.call("vdi.list", 0, "vdi")
        self.assertEqual([(o["name"], o["target"]) for o in listed], [("op1", target)])
        self.assertEqual(await self.call("datapath.list"), [])
        self.assertEqual(await self.call("datapath.find", image), [])
        held = await self.call("datapath.quiesce", image)
        self.assertEqual(held["paused"], [])
        # A real clock in a real daemon: counted down from 60 s at the reply.
        self.assertTrue(59.0 < held["expires-in"] <= 60.0, held["expires-in"])
        self.assertTrue(await self.call("datapath.resume", held["handle"], False))
        await self.assertFault(FaultCode.WRONG_STATE, "vdi.activate", 0, "op1")
        self.assertEqual((await self.call("vdi.deactivate", 0, "op1"))["state"], "inactive")
        self.assertTrue(await self.call("vdi.unprepare", 0, "op1"))
        self.assertEqual(await self.call("vdi.list", 0, "vdi"), [])
        self.assertTrue(await self.stopDaemon(proto))


class EmbeddedDaemonTests(DaemonEndToEndSuite, EmbeddedStore, TestCase):  # type: ignore[misc]
    """twistd -n xenddev --xenstore embedded."""


class RealXenstoredDaemonTests(DaemonEndToEndSuite, RealStore, TestCase):  # type: ignore[misc]
    """twistd -n xenddev --xenstore unix:<the C xenstored> --simulate on."""
