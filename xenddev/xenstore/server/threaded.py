# -*- test-case-name: tests.test_xenstored_embedded -*-
"""
The embedded xenstored on a private reactor in its own thread.

Tests that run blocking clients (the C{xenstore-*} tools through
C{subprocess.run}) from the main reactor's thread would deadlock against a
server sharing that reactor. This runs the server on a reactor of its own
(an uninstalled L{PollReactor}), still in-process: the server code is the
same, only the injected reactor differs.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from twisted.internet.threads import blockingCallFromThread

from xenddev.xenstore.server.core import XenStoreServer
from xenddev.xenstore.server.protocol import XenStoreServerFactory


class ThreadedXenstored:
    """
    A server listening on C{socketPath}, run by a reactor in another thread.

    @param makeServer: builds the L{XenStoreServer} from the private reactor
        (at start and at each L{restart}).
    """

    def __init__(
        self,
        socketPath: str,
        makeServer: Callable[[Any], XenStoreServer] | None = None,
        domainSockets: dict[int, str] | None = None,
    ) -> None:
        self.socketPath = socketPath
        self.domainSockets = dict(domainSockets or {})
        self._makeServer = makeServer or (lambda reactor: XenStoreServer(reactor=reactor))
        self.server: XenStoreServer | None = None
        self._ports: list[Any] = []
        self._factories: list[Any] = []
        self._thread: threading.Thread | None = None
        #: Set to let the thread go on after L{pause}; None when not paused.
        self._resumed: threading.Event | None = None

    def start(self) -> None:
        """Start the thread and listen."""
        from twisted.internet.pollreactor import PollReactor

        self.reactor = PollReactor()
        self._thread = threading.Thread(
            target=self.reactor.run,
            kwargs={"installSignalHandlers": False},
            name="embedded-xenstored",
            daemon=True,
        )
        self._thread.start()
        self.call(self._listen)

    def call(self, f: Callable[..., Any], *args: Any) -> Any:
        """Run C{f(*args)} in the server's thread and wait for its result."""
        return blockingCallFromThread(self.reactor, f, *args)

    def _listen(self) -> None:
        self.server = self._makeServer(self.reactor)
        for domid, path in [(0, self.socketPath), *self.domainSockets.items()]:
            factory = XenStoreServerFactory(self.server, domid)
            self._factories.append(factory)
            self._ports.append(self.reactor.listenUNIX(path, factory, mode=0o600))

    def _kill(self) -> Any:
        from twisted.internet.defer import gatherResults

        factories, self._factories = self._factories, []
        for f in factories:
            f.abortAll()
        ports, self._ports = self._ports, []
        return gatherResults([p.stopListening() for p in ports])

    def kill(self) -> None:
        """Drop every connection abruptly and stop listening (a crash)."""
        self.call(self._kill)

    def restart(self) -> None:
        """Listen again on the same path with a new, empty store."""
        self.call(self._listen)

    def pause(self) -> None:
        """
        Stop the server's thread where it stands until L{resume}, as SIGSTOP
        stops a process: its connections stay open and the kernel still
        accepts connections into the listen backlog and queues what clients
        write, but nothing is read, run or answered.
        """
        if self._thread is None or self._resumed is not None:
            return
        resumed = self._resumed = threading.Event()
        holding = threading.Event()

        def hold() -> None:
            holding.set()
            resumed.wait()

        self.reactor.callFromThread(hold)
        holding.wait(10)

    def resume(self) -> None:
        """Let a paused server run again: it reads and answers what was queued."""
        resumed, self._resumed = self._resumed, None
        if resumed is not None:
            resumed.set()

    def stop(self) -> None:
        """Stop serving and end the thread."""
        if self._thread is None:
            return
        self.resume()
        self.call(self._kill)
        self.reactor.callFromThread(self.reactor.stop)
        self._thread.join(10)
        self._thread = None
