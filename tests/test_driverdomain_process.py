"""
The agent as a real process (python -m xenddev.driverdomain.run), killed with
SIGKILL in the middle of a request: restarted, it completes the request and
the toolstack sees exactly one result; killed after serving a fencing
token, restarted, it still refuses a lower one.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from typing import Any

from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from tests.support.fixtures import EmbeddedXenstoredFixture, RealXenstoredFixture
from tests.support.host import pythonEnv, stopProcess
from xenddev.backendctrl.errors import StaleTokenError
from xenddev.backendctrl.protocol import VDI, ControlPaths
from xenddev.toolstack.client import DriverDomainClient


class AgentProcessSuite:
    """Crash-and-restart of the agent process; mixed with a fixture."""

    startServer: Any
    connect: Any
    socketPath: str
    assertEqual: Any
    assertFailure: Any
    assertIn: Any
    addCleanup: Any
    mktemp: Any

    def spawnAgent(self, log: str) -> subprocess.Popen[bytes]:
        """
        Start the agent process with the slow kind; at cleanup it is stopped
        (SIGTERM, as an operator would, then SIGKILL if need be).
        """
        env = pythonEnv(XENDDEV_SLOWKIND_LOG=log)
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "xenddev.driverdomain.run",
                "--xenstore",
                f"unix:{self.socketPath}",
                "--domid",
                "0",
                "--kinds",
                "",
                "--kind-factory",
                "tests.support.slowkind:SlowKind",
                "--no-hotplug",
            ],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.addCleanup(stopProcess, proc)
        return proc

    async def waitForLines(self, log: str, count: int, timeout: float = 20.0) -> list[str]:
        """Poll the kind's log until it has C{count} lines."""
        waited = 0.0
        while waited < timeout:
            if os.path.exists(log):
                with open(log) as f:
                    lines = f.read().splitlines()
                if len(lines) >= count:
                    return lines
            await deferLater(reactor, 0.05, lambda: None)
            waited += 0.05
        raise AssertionError(f"{log} never reached {count} lines")

    async def test_killedAgentCompletesRequestOnce(self) -> None:
        """
        SIGKILL while the agent executes prepare; the restarted agent runs it
        again (recovering), answers once, and the vdi ends up prepared.
        """
        self.startServer()
        xs = await self.connect()
        log = os.path.abspath(self.mktemp())
        client = DriverDomainClient(xs, 0, timeout=30)
        await client.ensureArea()
        first = self.spawnAgent(log)
        pending = client.prepare("crashy", {"type": "slow"})
        await self.waitForLines(log, 1)
        first.send_signal(signal.SIGKILL)
        first.wait()
        paths = ControlPaths(VDI, 0, "crashy")
        self.assertEqual(await xs.read(paths.request), "prepare")
        self.spawnAgent(log)
        await pending
        self.assertEqual(await xs.read(paths.state), "inactive")
        lines = await self.waitForLines(log, 2)
        self.assertEqual(
            lines, ["prepare crashy recovering=False", "prepare crashy recovering=True"]
        )

    async def test_tokenRefusedAfterKill(self) -> None:
        """
        The agent process serves token 20 for an image and is killed
        (SIGKILL); the one started after it refuses token 10 for the same
        image (another object), from what the first left in XenStore.
        """
        self.startServer()
        xs = await self.connect()
        log = os.path.abspath(self.mktemp())
        client = DriverDomainClient(xs, 0, timeout=30)
        await client.ensureArea()
        first = self.spawnAgent(log)
        target = {"type": "slow", "params": "/srv/fenced.img"}
        await client.prepare("one", target)
        await client.prepare("two", target)
        await client.activate("one", token=20)
        first.send_signal(signal.SIGKILL)
        first.wait()
        self.spawnAgent(log)
        stale = client.activate("two", token=10)
        e = await self.assertFailure(stale, StaleTokenError)
        self.assertIn("token 20 was served here", e.message)
        self.assertEqual(await xs.read(ControlPaths(VDI, 0, "two").state), "inactive")
        await client.activate("two", token=20)


class RealXenstoredAgentProcessTests(AgentProcessSuite, RealXenstoredFixture, TestCase):
    """Agent crash over the C xenstored."""


class EmbeddedXenstoredAgentProcessTests(AgentProcessSuite, EmbeddedXenstoredFixture, TestCase):
    """Agent crash over the embedded xenstored."""
