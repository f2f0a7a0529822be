# -*- test-case-name: tests.test_embed -*-
"""
A blocking API for legacy threaded toolstacks (the way xend's
XendDomainInfo called its DevControllers).

The reactor runs in one background (daemon) thread, started once; every
call is handed to it with C{callFromThread} and the calling thread waits
for the result, for at most a timeout. On timeout the operation is
cancelled (its compensation runs: a failed attach leaves XenStore as it
was) and L{OperationTimeout} is raised. Any number of threads may call at
once: the L{DeviceManager} serialises operations on one device and runs
the rest in parallel. At interpreter exit (C{atexit}) the service stops
cleanly and the reactor thread ends.

Typical use::

    from xenddev.embed import EmbeddedToolstack

    xd = EmbeddedToolstack.start()                    # config defaults
    devid = xd.createDevice(5, "vbd", {"uname": "phy:/dev/vg/d", "dev": "xvdb", "mode": "w"})
    print(xd.listDevices(5, "vbd"))
    xd.destroyDevice(5, "vbd", devid)

The reactor must not already be running in another thread.

Child processes (hotplug scripts, qemu-storage-daemons, tap-ctl) work as in
the daemon. Twisted learns that a child exited from its SIGCHLD handler,
which only the main thread can install; with the reactor in a background
thread there is none, so L{ReactorThread} reaps instead: every
L{REAP_INTERVAL} seconds it calls C{twisted.internet.process.reapAllProcesses},
which asks (C{waitpid(pid, WNOHANG)}) only about the processes the reactor
spawned, never about the embedding program's own children. A script's exit
is therefore seen at most that long after it happened.
"""

from __future__ import annotations

import atexit
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, TypeVar

from twisted.internet.defer import CancelledError, Deferred, maybeDeferred
from twisted.python.failure import Failure

from xenddev.config import Config
from xenddev.errors import XenddevError

__all__ = [
    "DEFAULT_TIMEOUT",
    "REAP_INTERVAL",
    "EmbedError",
    "EmbeddedToolstack",
    "OperationTimeout",
    "ReactorThread",
]

T = TypeVar("T")

#: Seconds a blocking call waits by default.
DEFAULT_TIMEOUT = 60.0
#: Seconds to wait for a cancelled operation's compensation after a timeout.
CANCEL_GRACE = 15.0
#: Seconds between two reaps of the reactor's child processes (no SIGCHLD
#: handler in a background thread).
REAP_INTERVAL = 0.05


class EmbedError(XenddevError, RuntimeError):
    """The embedding API is used wrongly (not started, stopped, on the reactor thread)."""


class OperationTimeout(XenddevError, TimeoutError):
    """A blocking call did not finish in time; the operation was cancelled."""


class ReactorThread:
    """
    Runs a reactor in a background daemon thread and calls into it.

    @param reactor: the reactor to run (default: the global one, which
        must not be running yet). Tests give a fresh reactor instance.
    @param reapInterval: seconds between reaps of the reactor's child
        processes (see the module docstring); C{None} for no reaping.
    """

    def __init__(self, reactor: Any = None, reapInterval: float | None = REAP_INTERVAL) -> None:
        if reactor is None:
            import twisted.internet.reactor

            reactor = twisted.internet.reactor
        self.reactor = reactor
        self.reapInterval = reapInterval
        self._reaper: Any = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._stopped = False

    @property
    def running(self) -> bool:
        """Whether the reactor thread runs."""
        return self._thread is not None and self._thread.is_alive() and not self._stopped

    def start(self) -> None:
        """Start the reactor thread (once; later calls do nothing)."""
        with self._lock:
            if self._stopped:
                raise EmbedError("the reactor thread was stopped; a reactor cannot restart")
            if self._thread is not None:
                return
            started = threading.Event()
            if self.reapInterval is not None:
                self.reactor.callWhenRunning(self._startReaping, self.reapInterval)
            self.reactor.callWhenRunning(started.set)
            self._thread = threading.Thread(
                target=self.reactor.run,
                kwargs={"installSignalHandlers": False},
                name="xenddev-reactor",
                daemon=True,
            )
            self._thread.start()
        if not started.wait(30):
            raise EmbedError("the reactor did not start")

    def _startReaping(self, interval: float) -> None:
        """In the reactor thread: reap the reactor's exited children periodically."""
        from twisted.internet.process import reapAllProcesses
        from twisted.internet.task import LoopingCall

        self._reaper = LoopingCall(reapAllProcesses)
        self._reaper.clock = self.reactor
        self._reaper.start(interval, now=False)

    def call(
        self,
        f: Callable[..., Any],
        *args: Any,
        timeout: float | None = DEFAULT_TIMEOUT,
        **kwargs: Any,
    ) -> Any:
        """
        Run C{f(*args, **kwargs)} in the reactor thread and wait for its
        result (a Deferred's result if it returns one). Its exception is
        raised in the calling thread.

        @raise OperationTimeout: after C{timeout} seconds; the Deferred was
            cancelled and its cancellation given L{CANCEL_GRACE} seconds
            to finish (compensation included).
        """
        if threading.current_thread() is self._thread:
            raise EmbedError("a blocking call from the reactor thread would deadlock")
        if not self.running:
            raise EmbedError("the reactor thread is not running")
        future: Future[Any] = Future()
        settled = threading.Event()
        holder: list[Deferred[Any]] = []

        def deliver(result: object) -> None:
            settled.set()
            if future.done():
                return
            if isinstance(result, Failure):
                future.set_exception(result.value)
            else:
                future.set_result(result)

        def run() -> None:
            d = maybeDeferred(f, *args, **kwargs)
            holder.append(d)
            d.addBoth(deliver)

        self.reactor.callFromThread(run)
        try:
            return future.result(timeout)
        except FutureTimeout:
            pass

        def cancel() -> None:
            for d in holder:
                d.cancel()

        self.reactor.callFromThread(cancel)
        settled.wait(CANCEL_GRACE)
        if future.done() and not _isCancelled(future):
            return future.result()
        raise OperationTimeout(
            f"{getattr(f, '__name__', f)} did not finish within {timeout:g}s and was cancelled"
        )

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the reactor and wait for its thread to end."""
        with self._lock:
            if self._stopped or self._thread is None:
                self._stopped = True
                return
            self._stopped = True
            thread = self._thread
        if thread.is_alive():
            self.reactor.callFromThread(self._stopReactor)
            thread.join(timeout)

    def _stopReactor(self) -> None:
        if self._reaper is not None and self._reaper.running:
            self._reaper.stop()
        self.reactor.stop()


def _isCancelled(future: Future[Any]) -> bool:
    return isinstance(future.exception(), CancelledError)


class EmbeddedToolstack:
    """
    The L{DeviceManager} as blocking calls, for threaded toolstacks.

    Build it with L{start}; every method takes C{timeout} (seconds, default
    the instance's C{timeout}) and raises the manager's own exceptions
    (L{xenddev.toolstack.controller.DeviceError} and subclasses) in the caller.

    @ivar service: the L{xenddev.service.XenddevService} (no XML-RPC
        listener), living in the reactor thread.
    """

    def __init__(
        self,
        reactorThread: ReactorThread,
        service: Any,
        timeout: float = DEFAULT_TIMEOUT,
        stopReactorAtClose: bool = True,
    ) -> None:
        self.reactorThread = reactorThread
        self.stopReactorAtClose = stopReactorAtClose
        self.service = service
        self.timeout = timeout
        self._closed = False
        self._closeLock = threading.Lock()

    @classmethod
    def start(
        cls,
        config: Config | None = None,
        reactor: Any = None,
        timeout: float = DEFAULT_TIMEOUT,
        stopReactorAtClose: bool = True,
    ) -> EmbeddedToolstack:
        """
        Start the reactor thread (once) and, in it, the xenddev service
        for C{config} (XenStore, driver-domain agent, simulators on the
        embedded default) without listeners; wait until it is ready.

        @param reactor: a reactor instance to run (default: the global one).
        @param stopReactorAtClose: L{close} also stops the reactor thread.
        """
        from xenddev.service import XenddevService

        thread = ReactorThread(reactor)
        thread.start()
        cfg = config if config is not None else Config()

        def build() -> Deferred[Any]:
            service = XenddevService(cfg, reactor=thread.reactor, listen=False)
            service.startService()
            return service.ready.addCallback(lambda _: service)

        try:
            service = thread.call(build, timeout=cfg.timeouts.connect + 30.0)
        except BaseException:
            thread.stop()
            raise
        toolstack = cls(thread, service, timeout, stopReactorAtClose)
        atexit.register(toolstack.close)
        return toolstack

    def _call(self, name: str, *args: Any, timeout: float | None = None) -> Any:
        if self._closed:
            raise EmbedError("the embedded toolstack is closed")
        manager = self.service.manager
        return self.reactorThread.call(
            getattr(manager, name), *args, timeout=self.timeout if timeout is None else timeout
        )

    # The DeviceManager, blocking

    def registerDomain(
        self,
        domid: int,
        uuid: str | None = None,
        name: str | None = None,
        timeout: float | None = None,
    ) -> Any:
        """Create a guest's XenStore skeleton (see L{DeviceManager.registerDomain})."""
        return self._call("registerDomain", domid, uuid, name, timeout=timeout)

    def createDevice(
        self, domid: int, devclass: str, config: Mapping[str, Any], timeout: float | None = None
    ) -> int:
        """Attach a device; returns its devid once connected."""
        result: int = self._call("createDevice", domid, devclass, dict(config), timeout=timeout)
        return result

    def destroyDevice(
        self,
        domid: int,
        devclass: str,
        devid: object,
        force: bool = False,
        timeout: float | None = None,
    ) -> None:
        """Detach a device (devid, or a name such as C{xvdb} or a MAC)."""
        self._call("destroyDevice", domid, devclass, devid, force, timeout=timeout)

    def reconfigureDevice(
        self,
        domid: int,
        devclass: str,
        devid: object,
        config: Mapping[str, Any],
        timeout: float | None = None,
    ) -> int:
        """Reconfigure a device in place (cdrom media change)."""
        result: int = self._call(
            "reconfigureDevice", domid, devclass, devid, dict(config), timeout=timeout
        )
        return result

    def listDevices(self, domid: int, devclass: str, timeout: float | None = None) -> list[Any]:
        """Rows like C{xl block-list} (L{xenddev.toolstack.manager.DeviceRow})."""
        result: list[Any] = self._call("listDevices", domid, devclass, timeout=timeout)
        return result

    def getBlockDeviceClass(
        self, domid: int, dev: object, timeout: float | None = None
    ) -> str | None:
        """Which block class (vbd, tap, tap2) serves C{dev}, or C{None}."""
        result: str | None = self._call("getBlockDeviceClass", domid, dev, timeout=timeout)
        return result

    def releaseDevices(self, domid: int, timeout: float | None = None) -> None:
        """Detach every device of a domain."""
        self._call("releaseDevices", domid, timeout=timeout)

    def waitForDevices(self, domid: int, timeout: float | None = None) -> None:
        """Wait until every device of a domain is connected."""
        self._call("waitForDevices", domid, timeout=timeout)

    # Shutdown

    def close(self, timeout: float | None = None) -> None:
        """
        Stop the service (in-flight operations drain as in the daemon) and,
        unless told otherwise at start, the reactor thread. Idempotent;
        registered with C{atexit}.
        """
        with self._closeLock:
            if self._closed:
                return
            self._closed = True
        try:
            atexit.unregister(self.close)
        except Exception:
            pass
        grace = self.service.config.timeouts.shutdown * 2 + 10.0
        try:
            if self.reactorThread.running:
                self.reactorThread.call(
                    self.service.stopService, timeout=grace if timeout is None else timeout
                )
        finally:
            if self.stopReactorAtClose:
                self.reactorThread.stop()
