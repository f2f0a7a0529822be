"""
The standalone embedded xenstored: C{twistd -n xenstored} in a subprocess,
with the real xenstore-* tools as clients, and its C{--state} file.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SkipTest, TestCase

from tests.support.host import (
    TWISTD_LAUNCHER,
    WatchedProcess,
    pythonEnv,
    shortTempDir,
    stopSpawned,
)
from xenddev.xenstore.tap import Options


class _Twistd(WatchedProcess):
    """Watches the daemon's log for the line saying it serves its socket (C{ready})."""

    readyLine = b"Serving XenStore for domain 0"


class TwistdTests(TestCase):
    """C{twistd -n xenstored --rundir DIR} as an operator would run it."""

    def setUp(self) -> None:
        if shutil.which("xenstore-read") is None:
            raise SkipTest("the xenstore-* tools are not installed")
        self.rundir = shortTempDir(self, "xsd-")

    def startTwistd(self, *extra: str) -> _Twistd:
        proto = _Twistd()
        args = [sys.executable, "-c", TWISTD_LAUNCHER]
        args += ["-n", "--pidfile=", "xenstored", "--rundir", self.rundir, *extra]
        transport = reactor.spawnProcess(
            proto, sys.executable, args, env=pythonEnv(), path=self.rundir
        )
        self.addCleanup(stopSpawned, transport, proto.ended)
        return proto

    def tool(self, *argv: str) -> Deferred[tuple[bytes, bytes, int]]:
        env = dict(os.environ, XENSTORED_RUNDIR=self.rundir)
        env.pop("XENSTORED_PATH", None)
        exe = shutil.which(argv[0])
        assert exe is not None
        return getProcessOutputAndValue(exe, argv[1:], env=env)

    async def test_serveRundirSocket(self) -> None:
        """XENSTORED_RUNDIR=DIR xenstore-ls / works; the socket is mode 0600."""
        proto = self.startTwistd()
        await proto.ready
        mode = os.stat(os.path.join(self.rundir, "socket")).st_mode & 0o777
        self.assertEqual(mode, 0o600)
        _, err, code = await self.tool("xenstore-write", "/svc/a", "1")
        self.assertEqual(code, 0, err)
        out, _, _ = await self.tool("xenstore-ls", "/")
        self.assertIn(b"svc", out)
        self.assertIn(b"local", out)

    async def test_stateSurvivesRestart(self) -> None:
        """With --state, a clean stop saves the tree and the next start loads it."""
        state = os.path.join(self.rundir, "state")
        proto = self.startTwistd("--state", state)
        await proto.ready
        await self.tool("xenstore-write", "/dev/vbd/51712", "backend")
        await self.tool("xenstore-chmod", "/dev/vbd/51712", "n5", "r0")
        os.kill(self._pid(proto), signal.SIGTERM)
        await proto.ended
        self.assertTrue(os.path.exists(state))
        # Issue 13: the socket files went with the daemon.
        self.assertEqual(sorted(n for n in os.listdir(self.rundir) if "socket" in n), [])
        proto = self.startTwistd("--state", state)
        await proto.ready
        out, _, _ = await self.tool("xenstore-read", "/dev/vbd/51712")
        self.assertEqual(out, b"backend\n")
        out, _, _ = await self.tool("xenstore-ls", "-p", "/dev")
        self.assertIn(b"(n5,r0)", out)

    def _pid(self, proto: _Twistd) -> int:
        assert proto.transport is not None
        pid = proto.transport.pid  # type: ignore[attr-defined]
        assert pid is not None
        return int(pid)


class OptionsTests(TestCase):
    """The plugin's options."""

    def test_domainSocketsAndQuotas(self) -> None:
        """--domain-socket is repeatable; quota options reach Quotas."""
        o = Options()
        o.parseOptions(
            ["--domain-socket", "5:/tmp/a", "--domain-socket", "7:/tmp/b", "--entry-nb", "9"]
        )
        self.assertEqual(o["domain-sockets"], [(5, "/tmp/a"), (7, "/tmp/b")])
        self.assertEqual(o.quotas().nodesPerDomain, 9)
        self.assertEqual(o.quotas().watchesPerDomain, 128)

    def test_pluginListed(self) -> None:
        """twistd finds the xenstored plugin."""
        from twisted.application.service import IServiceMaker
        from twisted.plugin import getPlugins

        names = [p.tapname for p in getPlugins(IServiceMaker)]
        self.assertIn("xenstored", names)
