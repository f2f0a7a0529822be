"""
Server fixtures for protocol-level test suites.

A suite is written once as a mixin that calls C{self.startServer()} and
C{self.connect()}; concrete test classes combine it with one fixture mixin:
L{RealXenstoredFixture} (the C xenstored from Debian under our LD_PRELOAD
shim) or, once it exists, the embedded server fixture. Only the fixture
changes between the two.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.internet.error import ConnectError
from twisted.internet.task import deferLater

from tests.support.realxenstored import RealXenstored, requireRealXenstored
from xenddev.xenstore.client import XenStoreClient
from xenddev.xenstore.connection import connectXenStore


class ServerFixture:
    """
    What every fixture offers the suites: a server per test, connections to
    it, and the environment for the C{xenstore-*} command-line tools.
    """

    serverKind = "abstract"
    socketPath: str

    def startServer(self) -> str:
        """Start a fresh server for this test; return its socket path."""
        raise NotImplementedError()

    def cliEnv(self) -> dict[str, str]:
        """Environment that points the xenstore-* tools at the server."""
        env = dict(os.environ)
        env["XENSTORED_PATH"] = self.socketPath
        return env

    def connect(self, **clientArgs: Any) -> Deferred[XenStoreClient]:
        """
        Connect a new L{XenStoreClient}; it is disconnected at cleanup.

        A connect that the server closes at once is retried a few times: the
        C xenstored (4.17, under the shim) very rarely drops a brand-new
        connection before any request (about 1 in 50 runs of the
        four-connection test); that is not what the suites test.
        """

        async def attempt() -> XenStoreClient:
            for tries in range(5):
                ep = UNIXClientEndpoint(reactor, self.socketPath)
                try:
                    client = await connectXenStore(reactor, endpoint=ep, **clientArgs)
                except ConnectError:
                    if tries == 4:
                        raise
                    await deferLater(reactor, 0.05, lambda: None)
                    continue
                self.addCleanup(client.disconnect)  # type: ignore[attr-defined]
                return client
            raise AssertionError("unreachable")

        return Deferred.fromCoroutine(attempt())


class RealXenstoredFixture(ServerFixture):
    """A fresh C xenstored (Xen 4.17, Debian) per test, under the shim."""

    serverKind = "real"
    xenstored: RealXenstored

    def startServer(self) -> str:
        """Start the C xenstored in a temporary directory of this test."""
        requireRealXenstored(self)
        workdir = os.path.abspath(self.mktemp())  # type: ignore[attr-defined]
        os.makedirs(workdir)
        # Domains 0-31 "exist" for the fake hypervisor: xenstored refuses a
        # node owner it does not know (ENOENT).
        self.xenstored = RealXenstored(workdir, domains=range(32))
        self.xenstored.start()
        self.addCleanup(self.xenstored.stop)  # type: ignore[attr-defined]
        self.socketPath = self.xenstored.socketPath
        return self.socketPath

    def killServer(self) -> None:
        """Kill the server abruptly (SIGKILL)."""
        self.xenstored.kill()

    def restartServer(self) -> None:
        """Start the server again on the same socket path."""
        self.xenstored.start()


class EmbeddedXenstoredFixture(ServerFixture):
    """
    A fresh embedded xenstored per test, in this process, listening on a
    UNIX socket in a temporary directory. It runs on a private reactor in
    its own thread, so that the suites' blocking calls (the xenstore-* tools
    run with subprocess.run) cannot starve it.
    """

    serverKind = "embedded"

    def startServer(self) -> str:
        """Start the embedded server; return its socket path."""
        import shutil
        import tempfile

        from xenddev.xenstore.server.threaded import ThreadedXenstored

        # Not self.mktemp(): trial's paths exceed AF_UNIX's 108 bytes.
        workdir = tempfile.mkdtemp(prefix="xsd-")
        self.addCleanup(shutil.rmtree, workdir, True)  # type: ignore[attr-defined]
        self.socketPath = os.path.join(workdir, "socket")
        self.embedded = ThreadedXenstored(self.socketPath)
        self.embedded.start()
        self.addCleanup(self.embedded.stop)  # type: ignore[attr-defined]
        return self.socketPath

    def killServer(self) -> None:
        """Drop every connection abruptly and stop listening, like a crash."""
        self.embedded.kill()

    def restartServer(self) -> None:
        """
        Listen again on the same path with an empty store: the C daemon
        loses its tree on a restart, and so does this one.
        """
        self.embedded.restart()
