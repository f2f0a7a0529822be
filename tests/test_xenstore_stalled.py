"""
The daemon against a xenstored that stops answering while its connections
stay open (L{xenddev.xenstore.stall}): the embedded xenstored with its
thread held (L{ThreadedXenstored.pause}) and the C xenstored stopped with
SIGSTOP. A device attach fails with fault 16 about C{timeouts.connect}
after it began, the stall is logged once, nothing of the attach is in the
tree once the store runs again, and attaches work again; the driver-domain
agent's connection is aborted and made again the same way. The rule
itself, on a Clock, is in C{tests.test_xenstore_stall}.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.logger import globalLogPublisher
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.support.fixtures import EmbeddedXenstoredFixture, RealXenstoredFixture
from tests.support.treedump import diffTrees, dumpTree
from tests.test_daemon import GUEST, RPCServerMixin, StoreClientMixin, _image, _rundir
from xenddev.config import Config, DriverDomainConfig, TimeoutsConfig
from xenddev.driverdomain.run import Options
from xenddev.errors import FaultCode
from xenddev.service import XenddevService
from xenddev.xenstore.errors import XenStoreStalled

#: timeouts.connect, hence the stall, of the daemons here: short, to keep the tests fast.
STALL = 1.0


async def _until(condition: Any, timeout: float = 10.0) -> bool:
    """Poll C{condition()} every 10 ms for up to C{timeout} seconds."""
    for _ in range(int(timeout / 0.01)):
        if condition():
            return True
        await deferLater(reactor, 0.01, lambda: None)
    return bool(condition())


def _vbd(rundir: str) -> dict[str, str]:
    """An attach's configuration: a read-only vbd on a new image in C{rundir}."""
    return {"spec": f"format=raw, vdev=xvdb, access=r, target={_image(rundir)}"}


class StalledStoreSuite(RPCServerMixin, StoreClientMixin):
    """
    The daemon while its store is stopped and after it runs again; mixed
    with a server fixture offering C{pauseServer}/C{resumeServer}, and
    TestCase.
    """

    startServer: Any
    pauseServer: Any
    resumeServer: Any
    socketPath: str
    assertLess: Any
    assertGreaterEqual: Any

    async def startDaemon(self) -> XenddevService:
        """The service (simulating the xenbus ends) on the fixture's store."""
        rundir = _rundir(self)  # type: ignore[arg-type]
        config = Config(
            rundir=rundir,
            xenstore=f"unix:{self.startServer()}",
            driver_domain=DriverDomainConfig(simulate="on"),
            timeouts=TimeoutsConfig(connect=STALL, shutdown=2.0),
        )
        service = XenddevService(config, reactor=reactor)
        service.startService()
        self.addCleanup(service.stopService)
        self.addCleanup(self.resumeServer)  # before the stop (cleanups run last first)
        await service.ready
        self.rpcPath = config.socketPath
        return service

    def collectStalls(self) -> list[dict[str, Any]]:
        """The "stopped answering" events logged from now on, in a list."""
        events: list[dict[str, Any]] = []

        def observe(event: dict[str, Any]) -> None:
            if "stopped answering" in (event.get("log_format") or ""):
                events.append(event)

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        return events

    async def test_attachAgainstStoppedStore(self) -> None:
        """
        With the store stopped, an attach fails with fault 16 ("not
        answering") about C{timeouts.connect} after it began, and a call
        after it as well; the stall is logged as an error once for the
        daemon's connection. Once the store runs again the tree is as it
        was (nothing of the attach was written), and an attach works.
        """
        service = await self.startDaemon()
        rundir = service.config.rundir
        xs = await self.storeClient(self.socketPath)
        before = await dumpTree(xs)
        stalls = self.collectStalls()
        self.pauseServer()
        began = time.monotonic()
        f = await self.assertFault(
            FaultCode.UNAVAILABLE,
            "device.attach",
            GUEST,
            "vbd",
            _vbd(rundir),
        )
        elapsed = time.monotonic() - began
        self.assertIn("not answering", f.faultString)
        self.assertGreaterEqual(elapsed, STALL * 0.9)
        self.assertLess(elapsed, STALL + 1.5)
        f = await self.assertFault(FaultCode.UNAVAILABLE, "device.list", GUEST)
        self.assertIn("XenStore is unreachable", f.faultString)
        manager = service.manager
        assert manager is not None
        toolstack = [e for e in stalls if e.get("log_source") is manager.xs]
        self.assertEqual([e["log_level"].name for e in toolstack], ["error"])
        self.assertEqual(toolstack[0]["address"], service.config.xenstore)
        self.resumeServer()
        self.assertTrue(await _until(lambda: manager.xs.connected))
        await deferLater(reactor, 0.3, lambda: None)  # anything queued would be run by now
        self.assertEqual(diffTrees(before, await dumpTree(xs)), [])
        attached = await self.call("device.attach", GUEST, "vbd", _vbd(rundir))
        self.assertEqual(attached["devid"], 51728)
        self.assertTrue(await xs.exists(f"/local/domain/{GUEST}/device/vbd/51728"))

    async def test_agentConnectionStalls(self) -> None:
        """
        The driver-domain agent's connection has the same rule: its request
        to a stopped store fails as on a lost connection after the stall,
        and it connects again (its watches registered anew) once the store
        runs: an attach, which the agent serves, then works.
        """
        service = await self.startDaemon()
        agent = service.agent
        assert agent is not None
        self.assertEqual(agent.xs.stall, STALL)
        self.pauseServer()
        began = time.monotonic()
        with self.assertRaises(XenStoreStalled):  # type: ignore[attr-defined]
            await agent.xs.read("/local/domain/0/domid")
        self.assertLess(time.monotonic() - began, STALL + 1.5)
        self.assertFalse(agent.xs.connected)  # type: ignore[attr-defined]
        self.resumeServer()
        self.assertTrue(await _until(lambda: agent.xs.connected))
        attached = await self.call("device.attach", GUEST, "vbd", _vbd(service.config.rundir))
        self.assertEqual(attached["devid"], 51728)


class EmbeddedStalledTests(  # type: ignore[misc]
    StalledStoreSuite, EmbeddedXenstoredFixture, TestCase
):
    """The embedded xenstored, its thread held."""

    def pauseServer(self) -> None:
        """Hold the server's thread."""
        self.embedded.pause()

    def resumeServer(self) -> None:
        """Let it run again."""
        self.embedded.resume()


class RealStalledTests(StalledStoreSuite, RealXenstoredFixture, TestCase):  # type: ignore[misc]
    """The C xenstored, stopped with SIGSTOP."""

    paused = False

    def _signal(self, sig: int, state: str) -> None:
        pid = self.xenstored.pid
        assert pid is not None
        os.kill(pid, sig)
        # Delivered at once in practice; waited for, so the test's timing holds.
        for _ in range(200):
            with open(f"/proc/{pid}/stat") as f:
                if (f.read().rpartition(")")[2].split()[0] == "T") == (state == "T"):
                    return
            time.sleep(0.005)
        raise AssertionError(f"xenstored {pid} did not reach state {state}")

    def pauseServer(self) -> None:
        """SIGSTOP the daemon."""
        self._signal(signal.SIGSTOP, "T")
        self.paused = True

    def resumeServer(self) -> None:
        """SIGCONT it."""
        if self.paused:
            self.paused = False
            self._signal(signal.SIGCONT, "S")


class AgentOptionTests(SynchronousTestCase):
    """The agent as a process of its own takes the stall from its command line."""

    def test_stallOption(self) -> None:
        """C{--xenstore-stall} is seconds, 10 by default; nothing else is accepted."""
        options = Options()
        options.parseOptions(["--kinds", "blkback"])
        self.assertEqual(options["xenstore-stall"], 10.0)
        options = Options()
        options.parseOptions(["--xenstore-stall", "2.5"])
        self.assertEqual(options["xenstore-stall"], 2.5)
        for bad in ("0", "soon"):
            self.assertRaises(usage.UsageError, Options().parseOptions, ["--xenstore-stall", bad])
