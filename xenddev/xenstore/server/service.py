# -*- test-case-name: tests.test_xenstored_service -*-
"""
The embedded xenstored as a Twisted service: the privileged socket, the
per-domain sockets, the optional trace log and state file.
"""

from __future__ import annotations

import os
from typing import IO, Any

from twisted.application.service import Service
from twisted.internet.defer import gatherResults
from twisted.logger import Logger

from xenddev.xenstore.server.core import XenStoreServer
from xenddev.xenstore.server.persistence import readTree, saveTree
from xenddev.xenstore.server.protocol import XenStoreServerFactory
from xenddev.xenstore.server.quota import Quotas


class XenstoredService(Service):
    """
    Serve a L{XenStoreServer} on UNIX sockets.

    @param socketPath: the privileged socket (mode 0600).
    @param domainSockets: C{(domid, path)} pairs: sockets whose clients act
        as that (unprivileged) domain.
    @param stateFile: load the tree from it at start (if it exists) and save
        it there, atomically, on a clean stop.
    @param traceFile: append one line per request to it.
    """

    log = Logger()

    def __init__(
        self,
        socketPath: str,
        domainSockets: list[tuple[int, str]] | None = None,
        quotas: Quotas | None = None,
        stateFile: str | None = None,
        traceFile: str | None = None,
        reactor: Any = None,
    ) -> None:
        self.socketPath = socketPath
        self.domainSockets = list(domainSockets or [])
        self.quotas = quotas
        self.stateFile = stateFile
        self.traceFile = traceFile
        self._reactor = reactor
        self.server: XenStoreServer | None = None
        self._ports: list[Any] = []
        self._trace: IO[str] | None = None

    @property
    def reactor(self) -> Any:
        """The injected reactor, or the global one."""
        if self._reactor is None:
            from twisted.internet import reactor

            self._reactor = reactor
        return self._reactor

    def startService(self) -> None:
        """Load the state, then listen on every socket."""
        super().startService()
        tree = readTree(self.stateFile) if self.stateFile else None
        self.server = XenStoreServer(quotas=self.quotas, reactor=self.reactor, tree=tree)
        if tree is not None:
            self.log.info("Loaded the tree from {file}", file=self.stateFile)
        if self.traceFile:
            self._trace = open(self.traceFile, "a", buffering=1)
            trace = self._trace

            def writeTrace(line: str) -> None:
                trace.write(line + "\n")

            self.server.trace = writeTrace
        for domid, path in [(0, self.socketPath), *self.domainSockets]:
            _removeStaleSocket(path)
            port = self.reactor.listenUNIX(
                path, XenStoreServerFactory(self.server, domid), mode=0o600
            )
            self._ports.append(port)
            self.log.info("Serving XenStore for domain {domid} on {path}", domid=domid, path=path)

    def stopService(self) -> Any:
        """Stop listening and remove the socket files, save the state, close the trace."""
        super().stopService()
        ports, self._ports = self._ports, []
        # A UNIX port removes its socket file once it has stopped: wait for
        # it (returned below), or twistd exits first and leaves the files.
        stopped = [port.stopListening() for port in ports]
        if self.server is not None and self.stateFile:
            saveTree(self.server.tree, self.stateFile)
            self.log.info("Saved the tree to {file}", file=self.stateFile)
        if self._trace is not None:
            self._trace.close()
            self._trace = None
        return gatherResults([d for d in stopped if d is not None]).addCallback(lambda _: None)


def _removeStaleSocket(path: str) -> None:
    # A socket left by a killed server would make bind() fail.
    import stat

    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    except FileNotFoundError:
        pass
