"""
The daemon: L{xenddev.service.XenddevService} in-process (listeners, HTTP
Basic on TCP, draining operations at shutdown) and C{twistd -n xenddev} as a
real subprocess (sockets and their modes, the embedded xenstored seen by the
real C{xenstore-ls}, SIGTERM, and an attach/detach through XML-RPC when
C{xenddev.xmlrpc} exists).

Until C{xenddev.xmlrpc} exists, the listeners are tested with a trivial
stand-in resource; the stand-in is never used once the real module is there.
"""

from __future__ import annotations

import base64
import importlib.util
import os
import shutil
import signal
import stat
import sys
import tempfile
import xmlrpc.client
from types import SimpleNamespace
from typing import Any

import attrs
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import Clock, deferLater
from twisted.internet.threads import deferToThread
from twisted.internet.utils import getProcessOutputAndValue
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, TestCase
from twisted.web.client import Agent, readBody
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from tests.support.xenstoresuite import deferredTest
from xenddev.config import Config, DriverDomainConfig, TimeoutsConfig, XmlRpcConfig
from xenddev.metrics import renderMetrics
from xenddev.service import ServiceDeviceManager, ShuttingDownError, StartupError, XenddevService

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAVE_XMLRPC = importlib.util.find_spec("xenddev.xmlrpc") is not None


class _StandIn(Resource):
    """A trivial stand-in for the XML-RPC resource: answers C{stand-in}."""

    isLeaf = True

    def render_POST(self, request: Request) -> bytes:
        """Any POST gets C{stand-in}."""
        return b"stand-in"

    render_GET = render_POST


STAND_IN_RPC = SimpleNamespace(
    rpcSite=lambda manager: Site(_StandIn()), rpcResource=lambda manager: _StandIn()
)

# Runs twistd after putting the stand-in in place of a missing xenddev.xmlrpc.
LAUNCHER = """
import importlib.util, sys, types
if importlib.util.find_spec("xenddev.xmlrpc") is None:
    from twisted.web.resource import Resource
    from twisted.web.server import Site

    class StandIn(Resource):
        isLeaf = True

        def render_POST(self, request):
            return b"stand-in"

    module = types.ModuleType("xenddev.xmlrpc")
    module.rpcSite = lambda manager: Site(StandIn())
    module.rpcResource = lambda manager: StandIn()
    sys.modules["xenddev.xmlrpc"] = module
from twisted.scripts.twistd import run
sys.argv[0] = "twistd"
run()
"""


def _rundir(test: TestCase) -> str:
    """A short temporary run directory (UNIX socket paths are limited to 107 bytes)."""
    path = tempfile.mkdtemp(prefix="xd-")
    test.addCleanup(shutil.rmtree, path, True)
    return path


class DrainTests(TestCase):
    """L{ServiceDeviceManager.drain}: bounded waiting, then cancellation."""

    def setUp(self) -> None:
        """A manager on a Clock with no controllers."""
        self.clock = Clock()
        self.manager = ServiceDeviceManager(None, self.clock, controllers={})

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
        """Once draining, new operations are refused with a busy error."""
        self.successResultOf(self.manager.drain(1))
        e = self.assertRaises(
            ShuttingDownError, self.manager._run, "create", 5, "vbd", "new", Deferred
        )
        self.assertEqual(e.code, "busy")
        self.assertEqual(self.clock.getDelayedCalls(), [])


class ServiceTests(TestCase):
    """The service in this process, on the embedded xenstored."""

    def makeService(self, **xmlrpc: Any) -> XenddevService:
        """A service on a fresh run directory with the stand-in XML-RPC resource."""
        rundir = _rundir(self)
        config = Config(
            rundir=rundir,
            xenstore="embedded",
            xmlrpc=XmlRpcConfig(**xmlrpc),
            timeouts=TimeoutsConfig(shutdown=2.0),
        )
        service = XenddevService(config, reactor=reactor, rpc=STAND_IN_RPC)
        return service

    async def startService(self, service: XenddevService) -> None:
        """Start it and stop it at cleanup."""
        service.startService()
        self.addCleanup(service.stopService)
        await service.ready

    @deferredTest
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

    @deferredTest
    async def test_attachDetachThroughManager(self) -> None:
        """On the embedded default a vbd attaches to a SIMULATED guest and detaches."""
        service = self.makeService()
        await self.startService(service)
        image = os.path.join(service.config.rundir, "disk.img")
        with open(image, "wb") as f:
            f.truncate(1 << 20)
        manager = service.manager
        assert manager is not None
        spec = f"format=raw, vdev=xvdb, access=rw, target={image}"
        devid = await manager.createDevice(5, "vbd", {"spec": spec})
        self.assertEqual(devid, 51728)
        rows = await manager.listDevices(5, "vbd")
        self.assertEqual([r.devid for r in rows], [51728])
        self.assertEqual(await manager.getBlockDeviceClass(5, "xvdb"), "vbd")
        await manager.destroyDevice(5, "vbd", "xvdb")
        self.assertEqual(await manager.listDevices(5, "vbd"), [])
        text = renderMetrics(service)
        self.assertIn('operation="create",class="vbd",outcome="ok"} 1', text)
        self.assertIn("xenddev_simulated 1", text)

    @deferredTest
    async def test_shutdownCancelsInFlightWithCompensation(self) -> None:
        """
        An attach still waiting at shutdown is cancelled after
        C{timeouts.shutdown}; its compensation leaves no trace in XenStore.
        """
        service = self.makeService()
        service.config = attrs.evolve(
            service.config, timeouts=TimeoutsConfig(shutdown=0.3, create=30)
        )
        await self.startService(service)
        manager = service.manager
        assert manager is not None
        # Without the (simulated) kernel backend the device never connects.
        await service.simHost.backend.stop()
        image = os.path.join(service.config.rundir, "disk.img")
        with open(image, "wb") as f:
            f.truncate(1 << 20)
        attach = manager.createDevice(7, "vbd", {"spec": f"vdev=xvdb, access=r, target={image}"})
        attach.addErrback(lambda f: f.trap(CancelledError) and None)
        server = service.xenstored.server
        request = b"/local/domain/7/device/vbd/51728"
        for _ in range(200):
            if server.tree.lookup(request) is not None:
                break
            await deferLater(reactor, 0.01, lambda: None)
        self.assertIsNotNone(server.tree.lookup(request))
        await service.stopService()
        self.assertEqual(dict(manager.counts), {("create", "vbd", "cancelled"): 1})
        self.assertIsNone(server.tree.lookup(request))
        self.assertIsNone(server.tree.lookup(b"/local/domain/0/backendctrl/vdi/vbd-7-51728"))
        self.assertIsNone(server.tree.lookup(b"/local/domain/0/backend/vbd/7/51728"))

    @deferredTest
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
            headers = Headers()
            if auth is not None:
                token = base64.b64encode(auth.encode()).decode()
                headers.addRawHeader(b"authorization", f"Basic {token}".encode())
            response = await agent.request(b"POST", url, headers)
            return response.code, await readBody(response)

        self.assertEqual((await post(None))[0], 401)
        self.assertEqual((await post("admin:wrong"))[0], 401)
        self.assertEqual((await post("intruder:s3cret"))[0], 401)
        self.assertEqual(await post("admin:s3cret"), (200, b"stand-in"))

    @deferredTest
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

    @deferredTest
    async def test_simulateOnXenHostRefused(self) -> None:
        """simulate: on is refused on a Xen host (a xenbus device exists)."""
        rundir = _rundir(self)
        config = Config(
            rundir=rundir,
            xenstore="embedded",
            driver_domain=DriverDomainConfig(simulate="on"),
        )
        service = XenddevService(
            config,
            reactor=reactor,
            rpc=STAND_IN_RPC,
            exists=lambda p: p == "/dev/xen/xenbus" or os.path.exists(p),
        )
        service.startService()
        self.addCleanup(service.stopService)
        with self.assertRaises(StartupError) as cm:
            await service.ready
        self.assertIn("Xen host", str(cm.exception))

    @deferredTest
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

    @deferredTest
    async def test_secondDaemonRefused(self) -> None:
        """A second service on the same run directory cannot take the socket."""
        first = self.makeService()
        await self.startService(first)
        second = XenddevService(
            attrs.evolve(first.config, xenstore=f"unix:{first.config.xenstoredSocketPath}"),
            reactor=reactor,
            rpc=STAND_IN_RPC,
        )
        second.startService()
        self.addCleanup(second.stopService)
        with self.assertRaises(StartupError) as cm:
            await second.ready
        self.assertIn("another xenddev", str(cm.exception))
        self.assertTrue(os.path.exists(first.config.socketPath))


class _Daemon(ProcessProtocol):
    """Collects the daemon's output; fires C{ready} on its ready line."""

    def __init__(self) -> None:
        self.ready: Deferred[None] = Deferred()
        self.ended: Deferred[bool] = Deferred()
        self.output = b""

    def outReceived(self, data: bytes) -> None:
        """Collect output and watch for the ready line."""
        self.output += data
        if b"xenddev ready" in self.output and not self.ready.called:
            self.ready.callback(None)

    errReceived = outReceived

    def processEnded(self, reason: Failure) -> None:
        """
        Fire C{ended} with whether the exit was clean: status 0, or (as
        twistd does after a clean shutdown on a signal) killed by SIGTERM.
        """
        if not self.ready.called:
            self.ready.errback(RuntimeError(self.output.decode(errors="replace")))
        value: Any = reason.value
        self.ended.callback(value.exitCode == 0 or value.signal == signal.SIGTERM)


class UnixTransport(xmlrpc.client.Transport):
    """stdlib XML-RPC over a UNIX socket."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path

    def make_connection(self, host: Any) -> Any:
        """An HTTP connection whose socket is the UNIX socket."""
        import http.client
        import socket

        path = self.path

        class Connection(http.client.HTTPConnection):
            def connect(self) -> None:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.settimeout(60)
                self.sock.connect(path)

        return Connection("localhost")


class DaemonProcessTests(TestCase):
    """C{twistd -n xenddev --rundir DIR --xenstore embedded} as a subprocess."""

    def setUp(self) -> None:
        """A run directory and the launcher."""
        self.rundir = _rundir(self)
        self.launcher = os.path.join(self.rundir, "launch.py")
        with open(self.launcher, "w") as f:
            f.write(LAUNCHER)

    async def startDaemon(self, *args: str) -> _Daemon:
        """Start the daemon; wait for its ready line; SIGKILL it at cleanup if alive."""
        proto = _Daemon()
        env = dict(os.environ, PYTHONPATH=ROOT)
        env.pop("XENSTORED_PATH", None)
        process = reactor.spawnProcess(
            proto,
            sys.executable,
            [sys.executable, self.launcher, "-n", "--pidfile=", "xenddev", *args],
            env=env,
            path=self.rundir,
        )
        self.process = process

        def kill() -> Deferred[Any] | None:
            if proto.ended.called:
                return None
            process.signalProcess("KILL")
            return proto.ended

        self.addCleanup(kill)
        await proto.ready
        return proto

    async def stopDaemon(self, proto: _Daemon) -> bool:
        """SIGTERM, then wait for the exit; whether it was clean."""
        self.process.signalProcess("TERM")
        clean: bool = await proto.ended
        if not clean or b"xenddev stopped" not in proto.output:
            self.fail(proto.output.decode(errors="replace"))
        return clean

    @deferredTest
    async def test_startSocketsXenstoreLsStop(self) -> None:
        """It starts, its sockets are 600, xenstore-ls sees the store, SIGTERM cleans up."""
        if shutil.which("xenstore-ls") is None:
            raise SkipTest("xenstore-ls (xenstore-utils) is not installed")
        run = os.path.join(self.rundir, "run")
        proto = await self.startDaemon("--rundir", run, "--xenstore", "embedded")
        self.assertIn(b"SIMULATED", proto.output)
        sock, xsSock = os.path.join(run, "xenddev.sock"), os.path.join(run, "xenstored", "socket")
        for path in (sock, xsSock):
            self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        out, err, code = await getProcessOutputAndValue(
            "xenstore-ls", ["/"], env=dict(os.environ, XENSTORED_PATH=xsSock)
        )
        self.assertEqual(code, 0, err)
        self.assertIn(b"backendctrl", out)
        self.assertIn(b'name = "Domain-0"', out)
        self.assertTrue(await self.stopDaemon(proto))
        self.assertIn(b"xenddev stopped", proto.output)
        self.assertFalse(os.path.lexists(sock))
        self.assertFalse(os.path.lexists(sock + ".lock"))
        self.assertFalse(os.path.lexists(xsSock))

    @deferredTest
    async def test_defaultRundirAndConfigFile(self) -> None:
        """With a config file and no flags, its rundir and xenstore are used."""
        config = os.path.join(self.rundir, "xenddev.yaml")
        with open(config, "w") as f:
            f.write("rundir: state\nxenstore: embedded\ntimeouts: {shutdown: 1}\n")
        proto = await self.startDaemon("--config", config)
        self.assertTrue(os.path.exists(os.path.join(self.rundir, "state", "xenddev.sock")))
        self.assertTrue(await self.stopDaemon(proto))

    @deferredTest
    async def test_badConfigExits(self) -> None:
        """A bad config file stops twistd at once with the config's message."""
        config = os.path.join(self.rundir, "bad.yaml")
        with open(config, "w") as f:
            f.write("timeouts:\n  create: never\n")
        out, err, code = await getProcessOutputAndValue(
            sys.executable,
            [self.launcher, "-n", "xenddev", "--config", config],
            env=dict(os.environ, PYTHONPATH=ROOT),
            path=self.rundir,
        )
        self.assertNotEqual(code, 0)
        self.assertIn(f"{config}:2: timeouts.create = 'never'".encode(), out + err)

    @deferredTest
    async def test_attachDetachOverXmlRpc(self) -> None:
        """A vbd attached and detached through the XML-RPC UNIX socket."""
        if not HAVE_XMLRPC:
            raise SkipTest("xenddev.xmlrpc does not exist yet")
        run = os.path.join(self.rundir, "run")
        proto = await self.startDaemon("--rundir", run, "--xenstore", "embedded")
        image = os.path.join(self.rundir, "disk.img")
        with open(image, "wb") as f:
            f.truncate(64 << 20)
        proxy = xmlrpc.client.ServerProxy(
            "http://localhost/RPC2", transport=UnixTransport(os.path.join(run, "xenddev.sock"))
        )
        spec = f"format=raw, vdev=xvda, access=rw, target={image}"

        def session() -> tuple[Any, Any, Any]:
            attached: Any = proxy.device.attach(5, "vbd", {"spec": spec})
            listed = proxy.device.list(5, "vbd")
            proxy.device.detach(5, "vbd", attached["devid"], False)
            return attached, listed, proxy.device.list(5, "vbd")

        attached, listed, after = await deferToThread(session)
        self.assertEqual(attached["devid"], 51712)
        self.assertEqual(len(listed), 1)
        self.assertEqual(after, [])
        self.assertTrue(await self.stopDaemon(proto))

    @deferredTest
    async def test_sigint(self) -> None:
        """SIGINT (Ctrl-C in the foreground) stops it cleanly too."""
        run = os.path.join(self.rundir, "run")
        proto = await self.startDaemon("--rundir", run, "--xenstore", "embedded")
        os.kill(self.process.pid, signal.SIGINT)
        await proto.ended
        self.assertIn(b"xenddev stopped", proto.output)
        self.assertFalse(os.path.lexists(os.path.join(run, "xenddev.sock")))
