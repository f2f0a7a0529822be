# -*- test-case-name: tests.test_daemon -*-
"""
The xenddev daemon as a Twisted L{MultiService}: XenStore (a real
xenstored, or the embedded one), the local driver-domain agent, the
SIMULATED xenbus ends (by default only on the embedded xenstored;
C{driver_domain.simulate: on} also with a real one), the L{DeviceManager},
the data-path and storage control (C{datapath.*}, quiesce handles) and the
XML-RPC listeners.

Each part is a child service of the MultiService (L{xenddev.lifecycle.Part}),
added once the parts it depends on are ready, so the children are in
start-up order: run directory → embedded xenstored (or a probe of the
local one) → the toolstack's XenStore connection → driver-domain area,
the agent's connection and the agent → the simulator's connection and the
simulators → quiesce handles → (with C{pool:}) the pool session and its
fence watchdog →
device operations → reaper → the activation guard's records and the
recovery → listeners; the line C{xenddev ready} is logged last.
Shutdown stops the children one at a time in reverse
(L{xenddev.lifecycle.stopInReverse}): the listeners close first (no new
requests), the reaper stops, in-flight device operations get
C{timeouts.shutdown} seconds to finish and are then cancelled (their
compensation runs), the host leaves the pool, quiesce handles still held
are resumed, then the simulators, the agent, their connections and the
embedded xenstored stop, and the sockets are removed.

The toolstack's connection (the device manager's, so every XML-RPC
call's) is a L{GuardedXenStore}: during a XenStore outage a call waits at
most C{timeouts.connect} for a connection, then fails with fault 16
instead of blocking until the client gives up, and nothing of it is
written when the store comes back.
"""

from __future__ import annotations

import os
import stat
from collections import Counter
from collections.abc import Callable, Mapping
from typing import IO, Any, Protocol, cast

from twisted.application.service import MultiService, Service
from twisted.cred.portal import IRealm
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    DeferredList,
    DeferredLock,
    maybeDeferred,
    succeed,
)
from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    Logger,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogPublisher,
    jsonFileLogObserver,
    textFileLogObserver,
)
from twisted.python.failure import Failure
from zope.interface import implementer

from xenddev import xmlrpc
from xenddev.config import Config
from xenddev.controllers import defaultControllers
from xenddev.errors import FaultCode, XenddevError
from xenddev.httplimits import HttpLimits, LimitedSite
from xenddev.lifecycle import Part, stopInReverse
from xenddev.toolstack.controller import DevController, DeviceError
from xenddev.toolstack.manager import DeviceManager

__all__ = [
    "RpcFactories",
    "ServiceDeviceManager",
    "ShuttingDownError",
    "StartupError",
    "XenddevService",
    "loadRpcFactories",
    "onXenHost",
]


#: Seconds, at least, that cancelled operations get to run their compensation.
CANCEL_GRACE = 10.0


class StartupError(XenddevError):
    """The daemon cannot start (the message says why and what to do)."""


class ShuttingDownError(DeviceError):
    """
    The daemon is shutting down and accepts no new device operations
    (fault 16, as for a connection lost: transient, retry against the
    daemon that replaces it).
    """

    code = "busy"
    faultCode = FaultCode.UNAVAILABLE


class RpcFactories(Protocol):
    """What the service needs from C{xenddev.xmlrpc}."""

    def rpcSite(
        self,
        manager: DeviceManager,
        *,
        storage: Any = None,
        limits: HttpLimits | None = None,
        reactor: Any = None,
        label: str = "XML-RPC",
        guard: Any = None,
        peers: Any = None,
    ) -> Any:
        """A C{twisted.web.server.Site} serving the XML-RPC API, held to C{limits}."""

    def rpcResource(
        self, manager: DeviceManager, *, storage: Any = None, guard: Any = None, peers: Any = None
    ) -> Any:
        """The XML-RPC resource (wrapped in HTTP Basic auth for TCP)."""


def loadRpcFactories() -> RpcFactories:
    """C{xenddev.xmlrpc} (C{rpcSite}, C{rpcResource}), as the service's default."""
    return cast(RpcFactories, xmlrpc)


def onXenHost(exists: Callable[[str], bool] = os.path.exists) -> bool:
    """Whether this machine runs on Xen (a xenbus device or /proc/xen/capabilities)."""
    return any(exists(p) for p in ("/dev/xen/xenbus", "/proc/xen/xenbus", "/proc/xen/capabilities"))


def _removeSocket(path: str) -> None:
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    except FileNotFoundError:
        pass


class ServiceDeviceManager(DeviceManager):
    """
    A L{DeviceManager} that logs one line per device operation (domain,
    class, devid, outcome, duration), counts operations for the metrics,
    refuses new operations while shutting down, and can drain the ones in
    flight (see L{drain}).

    @param ensureGuest: called with a domid before a device is created for
        it (the SIMULATED mode registers the guest and simulates its
        frontends); C{None} on a real host.
    """

    log = Logger()

    def __init__(
        self,
        xs: Any,
        reactor: Any,
        controllers: Mapping[str, type[DevController]],
        ensureGuest: Callable[[int], Deferred[None]] | None = None,
        **controllerArgs: Any,
    ) -> None:
        super().__init__(xs, controllers, **controllerArgs)
        self.reactor = reactor
        self.ensureGuest = ensureGuest
        self.accepting = True
        self.operations: set[Deferred[Any]] = set()
        #: (operation, class, outcome) -> count
        self.counts: Counter[tuple[str, str, str]] = Counter()
        #: (operation, class) -> total seconds
        self.durations: Counter[tuple[str, str]] = Counter()
        #: Called with no argument after each operation ends, however it ended.
        self.onOperationDone: list[Callable[[], object]] = []

    def _run(
        self, op: str, domid: int, devclass: str, devid: object, start: Callable[[], Deferred[Any]]
    ) -> Deferred[Any]:
        if not self.accepting:
            raise ShuttingDownError("xenddev is shutting down; no new device operations")
        began = self.reactor.seconds()
        d = maybeDeferred(start)
        self.operations.add(d)

        def done(result: object) -> object:
            # Counted here for the metrics; the operation's one log line
            # is the DeviceManager's.
            self.operations.discard(d)
            duration = self.reactor.seconds() - began
            if isinstance(result, Failure):
                if result.check(CancelledError):
                    outcome = "cancelled"
                else:
                    outcome = getattr(result.value, "code", None) or "error"
            else:
                outcome = "ok"
            self.counts[(op, devclass, outcome)] += 1
            self.durations[(op, devclass)] += duration
            for callback in self.onOperationDone:
                callback()
            return result

        return d.addBoth(done)

    def createDevice(self, domid: int, devclass: str, config: Mapping[str, Any]) -> Deferred[int]:
        """Create a device (see L{DeviceManager.createDevice}); logged and tracked."""

        async def create() -> int:
            if self.ensureGuest is not None:
                await self.ensureGuest(domid)
            result: int = await DeviceManager.createDevice(self, domid, devclass, config)
            return result

        return self._run("create", domid, devclass, "new", lambda: Deferred.fromCoroutine(create()))

    def destroyDevice(
        self, domid: int, devclass: str, devid: object, force: bool = False
    ) -> Deferred[None]:
        """Destroy a device (see L{DeviceManager.destroyDevice}); logged and tracked."""
        return self._run(
            "destroy",
            domid,
            devclass,
            devid,
            lambda: DeviceManager.destroyDevice(self, domid, devclass, devid, force),
        )

    def reconfigureDevice(
        self, domid: int, devclass: str, devid: object, config: Mapping[str, Any]
    ) -> Deferred[int]:
        """Reconfigure a device (see L{DeviceManager.reconfigureDevice}); logged and tracked."""
        return self._run(
            "configure",
            domid,
            devclass,
            devid,
            lambda: DeviceManager.reconfigureDevice(self, domid, devclass, devid, config),
        )

    def drain(self, timeout: float) -> Deferred[None]:
        """
        Stop accepting operations; wait up to C{timeout} seconds for those
        in flight, then cancel the rest (each runs its compensation) and
        wait for them to settle (at most C{timeout} seconds more, but no
        less than L{CANCEL_GRACE}).
        """
        self.accepting = False

        async def run() -> None:
            if not self.operations:
                return
            self.log.info(
                "Waiting up to {t:g}s for {n} device operation(s) in flight",
                t=timeout,
                n=len(self.operations),
            )
            if await self._waitAll(timeout):
                return
            self.log.warn(
                "Cancelling {n} device operation(s) still in flight after {t:g}s",
                n=len(self.operations),
                t=timeout,
            )
            for d in list(self.operations):
                d.cancel()
            if not await self._waitAll(max(timeout, CANCEL_GRACE)):
                self.log.error(
                    "{n} device operation(s) did not settle after cancellation",
                    n=len(self.operations),
                )

        return Deferred.fromCoroutine(run())

    async def _waitAll(self, timeout: float) -> bool:
        pending = list(self.operations)
        if not pending:
            return True
        waiter: Deferred[Any] = DeferredList([_observe(d) for d in pending], consumeErrors=True)
        timedOut: list[bool] = []

        def expire() -> None:
            timedOut.append(True)
            waiter.cancel()

        call = self.reactor.callLater(timeout, expire)
        try:
            await waiter
        except CancelledError:
            pass
        finally:
            if call.active():
                call.cancel()
        return not timedOut and not self.operations


def _observe(d: Deferred[Any]) -> Deferred[None]:
    """A Deferred firing (with None) when C{d} does, without touching C{d}'s result."""
    out: Deferred[None] = Deferred()

    def fire(result: object) -> object:
        if not out.called:
            out.callback(None)
        return result

    d.addBoth(fire)
    return out


class SimulatedGuests:
    """
    SIMULATED guests: a guest domain needs to exist (and to have frontend
    drivers) before devices can be attached to it; without a hypervisor
    there are no guests, so this registers the domain in XenStore the way
    a domain builder would and starts a frontend simulator for it.
    """

    log = Logger()

    def __init__(self, manager: DeviceManager | None, host: Any, driverDomid: int) -> None:
        self.manager = manager
        self.host = host
        self.driverDomid = driverDomid
        self._lock = DeferredLock()

    def ensureGuest(self, domid: int) -> Deferred[None]:
        """Register guest C{domid} and simulate its frontends, once."""
        if domid in self.host.frontends or domid == self.driverDomid:
            return succeed(None)

        async def add() -> None:
            if domid in self.host.frontends:
                return
            assert self.manager is not None
            await self.manager.registerDomain(domid, name=f"simulated-guest-{domid}")
            await self.host.addGuest(domid)
            self.log.info(
                "SIMULATED guest domain {domid} registered (no hypervisor: its frontends "
                "are played by xenddev's simulator)",
                domid=domid,
            )

        return self._lock.run(lambda: Deferred.fromCoroutine(add()))


@implementer(ILogObserver)
class _LevelObserver:
    """Filters events below a level before handing them to an observer."""

    def __init__(self, observer: ILogObserver, level: str) -> None:
        predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.levelWithName(level))
        self._observer = FilteringLogObserver(observer, [predicate])

    def __call__(self, event: dict[str, Any]) -> None:
        self._observer(event)


class XenddevService(MultiService):
    """
    The daemon's services wired together from a L{Config}.

    @param config: the configuration (flags already applied).
    @param reactor: the reactor (injected; the global one if C{None}).
    @param rpc: provides C{rpcSite}/C{rpcResource} (default: L{loadRpcFactories}).
    @param exists: C{os.path.exists}, replaceable to test the discovery.
    @param stopReactorOnFailure: stop the reactor if start-up fails (the daemon).
    @param listen: open the XML-RPC (and metrics) listeners; the embedding
        API (L{xenddev.embed}) calls the manager directly and opens none.

    @ivar ready: fires when everything is up (or fails with the reason).
    @ivar manager: the L{ServiceDeviceManager}, once started.
    @ivar dataPaths: the L{xenddev.datapath.DataPathControl} (seed 002:
        quiesce and resume every data path reading an image), with the
        C{qemu} and C{tap} pausers, once started.
    @ivar simulated: whether the xenbus simulator runs.
    @ivar xenstoreAddress: the XenStore address in use.
    """

    log = Logger()

    def __init__(
        self,
        config: Config,
        reactor: Any = None,
        rpc: RpcFactories | None = None,
        exists: Callable[[str], bool] = os.path.exists,
        stopReactorOnFailure: bool = False,
        listen: bool = True,
    ) -> None:
        super().__init__()
        self.listen = listen
        self.stopReactorOnFailure = stopReactorOnFailure
        self.config = config
        self._reactor = reactor
        self._rpc = rpc
        self._exists = exists
        self.ready: Deferred[None] = Deferred()
        self.manager: ServiceDeviceManager | None = None
        self.reaper: Any = None
        self.dataPaths: Any = None
        #: The L{xenddev.storagectl.StorageControl} over L{dataPaths}
        #: (C{datapath.*}: quiesce handles with their deadline).
        self.storage: Any = None
        #: The activation guard (L{xenddev.interfaces.IActivationGuard}):
        #: this host's, or the pool's with C{pool:}.
        self.guard: Any = None
        #: The L{xenddev.poolmember.PoolMembership}, with C{pool:}.
        self.pool: Any = None
        #: The other hosts' daemons (L{xenddev.interfaces.IPoolPeers}), with
        #: C{pool.advertise}.
        self.peers: Any = None
        #: The fence watchdog's link (L{xenddev.poolwatchdog.WatchdogLink}),
        #: with C{pool:} and the local agent.
        self.fenceWatchdog: Any = None
        #: The storage side of migrations (L{xenddev.poolmigration}), with C{pool:}.
        self.migrations: Any = None
        self.simulated = False
        self.embedded = False
        self.xenstoreAddress: str | None = None
        self.xenstored: Any = None
        self.agent: Any = None
        self.simHost: Any = None
        self.guests: SimulatedGuests | None = None
        self.ports: list[Any] = []
        self._starting: Deferred[None] | None = None
        self._stopping: Deferred[None] | None = None
        self._logObserver: ILogObserver | None = None
        self._logFile: IO[str] | None = None
        self._socketPaths: list[str] = []

    @property
    def reactor(self) -> Any:
        """The injected reactor, or the global one."""
        if self._reactor is None:
            from twisted.internet import reactor

            self._reactor = reactor
        return self._reactor

    # Start

    def startService(self) -> None:
        """Start everything; L{ready} fires when done. A failure stops the reactor."""
        self._startLogging()
        super().startService()
        d = Deferred.fromCoroutine(self._start())
        self._starting = d

        def failed(f: Failure) -> None:
            if f.check(StartupError):
                self.log.error("xenddev cannot start: {why}", why=f.getErrorMessage())
            else:
                self.log.failure("xenddev cannot start", f)
            if not self.ready.called:
                self.ready.errback(f)
            if self.stopReactorOnFailure and getattr(self.reactor, "running", False):
                self.reactor.stop()

        def started(_: object) -> None:
            if not self.ready.called:
                self.ready.callback(None)

        d.addCallbacks(started, failed)

    def _startLogging(self) -> None:
        cfg = self.config.logging
        if cfg.file is None:
            return
        self._logFile = open(cfg.file, "a", buffering=1, encoding="utf-8")
        observer = (
            jsonFileLogObserver(self._logFile)
            if cfg.format == "json"
            else textFileLogObserver(self._logFile)
        )
        self._logObserver = _LevelObserver(observer, cfg.level)
        globalLogPublisher.addObserver(self._logObserver)

    def _stopLogging(self) -> None:
        if self._logObserver is not None:
            globalLogPublisher.removeObserver(self._logObserver)
            self._logObserver = None
        if self._logFile is not None:
            self._logFile.close()
            self._logFile = None

    async def _start(self) -> None:
        cfg = self.config
        rpc: RpcFactories | None = None
        if self.listen:
            rpc = self._rpc if self._rpc is not None else loadRpcFactories()
        os.makedirs(cfg.rundir, mode=0o755, exist_ok=True)
        address = await self._chooseXenStore()
        dd = cfg.driver_domain
        self.simulated = self._decideSimulation()
        xs = await self._connect("xenstore", address, guarded=True)
        if self.embedded:
            await self._initialiseDom0(xs)
        from xenddev.toolstack.client import DriverDomainClient

        if dd.enabled:
            await DriverDomainClient(xs, dd.domid).ensureArea()
            await self._startAgent(address)
        if self.simulated:
            await self._startSimulators(address)
        from xenddev.datapath import DataPathControl
        from xenddev.toolstack.pauser import protocolPausers

        # Through each data path's agent: the toolstack cannot reach the
        # tapdisks or QMP sockets of a remote driver domain. (The manager,
        # which owns the agents' clients, is made below: asked when used.)
        self.dataPaths = DataPathControl(xs, protocolPausers(self._driverDomain))
        storage = self.storage = self._storageControl()
        # No data path stays paused because a client's handle outlived us;
        # stopped after the operations are drained (children stop in reverse).
        await self._add(Part("quiesce handles", stop=storage.resumeAll))
        guard = self.guard = await self._startGuard(xs)
        self.manager = ServiceDeviceManager(
            xs,
            self.reactor,
            defaultControllers(),
            ensureGuest=self.guests.ensureGuest if self.guests is not None else None,
            createTimeout=cfg.timeouts.create,
            destroyTimeout=cfg.timeouts.destroy,
            requestTimeout=cfg.timeouts.request,
            guard=guard,
            migration=self.migrations,
        )
        if self.guests is not None:
            self.guests.manager = self.manager
        manager = self.manager
        await self._add(
            Part("device operations", stop=lambda: manager.drain(cfg.timeouts.shutdown))
        )
        await self._startReaper(xs, self.manager)
        # Before the rollbacks, which give back what they held.
        await guard.start()
        if self.pool is not None:
            # An adopted lease: what its devices no longer claim goes.
            await self.pool.dropUnclaimed()
            await self._startPoolDevices(xs, self.manager, guard)
        if self.fenceWatchdog is not None:
            # What a dead predecessor's watchdog paused, for the targets taken back.
            await self.fenceWatchdog.takeOver(set(guard.held))
        await self._recover(self.manager)
        if rpc is not None:
            await self._listen(rpc, self.manager)
        self.log.info(
            "xenddev ready: XML-RPC on {socket}, XenStore {address}{embedded}{sim}",
            socket=cfg.socketPath if rpc is not None else "(none)",
            address=self.xenstoreAddress,
            embedded=" (embedded xenstored)" if self.embedded else "",
            sim=" — SIMULATED backends and frontends" if self.simulated else "",
        )

    def _driverDomain(self, domid: int) -> Any:
        """The manager's protocol client of a driver domain (the data paths' pausers')."""
        assert self.manager is not None, "no data path is paused before the manager exists"
        return self.manager.driverDomain(domid)

    async def _startGuard(self, xs: Any) -> Any:
        """
        The activation guard the toolstack claims storage targets from:
        this host's (L{xenddev.localguard}) without C{pool:}; with it, the
        pool's (L{xenddev.poolguard}) over a session joined here as the
        part C{pool session} (L{xenddev.poolmember}), whose self-fence
        pauses this host's data paths (L{xenddev.poolfence}).
        """
        import socket

        from xenddev.localguard import LocalGuard

        pool = self.config.pool
        local = LocalGuard(xs, pool.host if pool is not None else socket.gethostname())
        if pool is None:
            return local
        from xenddev.pool.activation import Activations
        from xenddev.pool.errors import (
            EtcdAuthError,
            EtcdUnavailable,
            HostNameInUse,
            PoolConfigError,
        )
        from xenddev.poolfence import DataPathFence
        from xenddev.poolguard import PoolGuard
        from xenddev.poolmember import PoolMembership

        try:
            # Checked with the config already: read again, as the client uses them.
            security = pool.security()
        except PoolConfigError as e:
            raise StartupError(str(e)) from None
        member = self.pool = PoolMembership(
            self.reactor,
            pool.host,
            pool.endpoints,
            pool.ttl,
            pool.fence_after,
            pool.timeout,
            self.config.timeouts.connect,
            DataPathFence(self.dataPaths),
            info={"rpc": pool.advertise} if pool.advertise else None,
            security=security,
            rundir=self.config.rundir,
        )

        async def join() -> None:
            try:
                await member.start()
            except (EtcdUnavailable, HostNameInUse, EtcdAuthError) as e:
                raise StartupError(
                    f"cannot join the pool as host {pool.host!r} "
                    f"(etcd {', '.join(pool.endpoints)}): {e}"
                ) from None

        await self._add(Part("pool session", join, member.stop))
        session = member.session
        assert session is not None
        await self._startFenceWatchdog(xs, session)
        from xenddev.pool.migration import Migrations

        migrations = Migrations(member.etcd, session, self.reactor)
        from xenddev.pool.devices import readPoolDevices

        guard = PoolGuard(
            local,
            Activations(member.etcd, session, self.reactor),
            session,
            migrations,
            published=lambda: readPoolDevices(member.etcd),
        )
        member.onLost(guard.lost)
        if pool.advertise and pool.peer_password_file:
            from xenddev.poolpeers import PoolPeers, readPeerCredentials

            try:
                user, password = readPeerCredentials(pool.peer_password_file)
            except (OSError, ValueError) as e:
                raise StartupError(f"pool.peer_password_file: {e}") from None
            self.peers = PoolPeers(
                self.reactor, member.etcd, user, password, self.config.timeouts.request
            )
        from xenddev.poolmigration import PoolMigrations
        from xenddev.toolstack.migration import DomainStorage

        # The manager is made once the guard is: asked when used.
        self.migrations = PoolMigrations(
            self.reactor,
            pool.host,
            lambda: DomainStorage(cast(DeviceManager, self.manager)),
            guard,
            migrations,
            self.peers,
        )
        await self._startPoolDataPaths(xs, member, session)
        self.log.info(
            "Host {host} in the pool (etcd {endpoints}): lease {lease:x}, TTL {ttl} s, "
            "self-fence after {fence:g} s",
            host=pool.host,
            endpoints=", ".join(pool.endpoints),
            lease=session.lease,
            ttl=session.ttl,
            fence=pool.fence_after,
        )
        return guard

    async def _startPoolDevices(self, xs: Any, manager: ServiceDeviceManager, guard: Any) -> None:
        """
        The part C{pool devices} (L{xenddev.pool.devices}): this host's
        devices in etcd, written again after device operations end.
        """
        from xenddev.pool.devices import DevicePublisher
        from xenddev.toolstack.activation import hostDevices

        session = self.pool.session
        publisher = DevicePublisher(
            self.reactor,
            self.pool.etcd,
            session,
            lambda: Deferred.fromCoroutine(hostDevices(xs, guard.local.grants())),
        )
        manager.onOperationDone.append(publisher.changed)

        async def stop() -> None:
            publisher.stop()

        await self._add(Part("pool devices", publisher.start, stop))

    async def _startFenceWatchdog(self, xs: Any, session: Any) -> None:
        """
        The part C{fence watchdog} (L{xenddev.poolwatchdog}): a process that
        pauses the local agent's data paths if this daemon dies or stalls
        past its lease. Without the local agent there is none it could reach.
        """
        from xenddev.poolwatchdog import WatchdogLink

        dd = self.config.driver_domain
        if not dd.enabled:
            return
        link = self.fenceWatchdog = WatchdogLink(
            self.reactor, xs, session, self.dataPaths, self.config.rundir, [dd.domid]
        )
        await self._add(Part("fence watchdog", link.start, link.stop))

    async def _startPoolDataPaths(self, xs: Any, member: Any, session: Any) -> None:
        """
        The pool-wide data-path registry (L{xenddev.pooldatapaths}): this
        host's data paths published in etcd (the part C{pool data paths}),
        and the storage control's view of the other hosts.
        """
        from xenddev.pooldatapaths import DataPathPublisher, PoolDataPaths

        pool = self.config.pool
        assert pool is not None
        self.storage.pool = PoolDataPaths(member.etcd, pool.host, self.peers, self.reactor)
        dd = self.config.driver_domain
        here = [dd.domid] if dd.enabled else []
        publisher = DataPathPublisher(
            xs,
            member.etcd,
            session,
            self.reactor,
            lambda: [*here, *(self.manager.knownDriverDomains() if self.manager else ())],
            pauser={"via": "daemon", "host": pool.host, "rpc": pool.advertise},
        )
        await self._add(Part("pool data paths", publisher.start, publisher.stop))

    async def _recover(self, manager: DeviceManager) -> None:
        """
        Before taking requests: roll back what a killed daemon left half-done
        (L{xenddev.toolstack.recovery}), one line per device, one in all.
        """
        from xenddev.toolstack.recovery import recoverDevices

        found = await recoverDevices(manager, self.config.timeouts.request)
        rolledBack = sum(1 for r in found if r.missing is not None)
        self.log.info(
            "Recovery: {made} devices made, {rolledBack} half-done rolled back",
            made=len(found) - rolledBack,
            rolledBack=rolledBack,
        )

    async def _startReaper(self, xs: Any, manager: DeviceManager) -> None:
        """Release the devices of guests that die without a detach (xenddev.toolstack.reaper)."""
        from xenddev.toolstack.reaper import DeadDomainReaper

        local = [self.config.driver_domain.domid] if self.config.driver_domain.enabled else []
        reaper = self.reaper = DeadDomainReaper(
            xs, lambda: [*local, *manager.knownDriverDomains()], manager.driverDomain
        )
        await self._add(Part("reaper", reaper.start, reaper.stop))

    async def _add(self, part: Part) -> None:
        """Add a part as the next child service (it starts now); wait until it is ready."""
        part.setServiceParent(self)
        assert part.ready is not None
        await part.ready

    async def _chooseXenStore(self) -> str:
        from xenddev.xenstore.endpoints import parseAddress

        cfg = self.config
        if cfg.xenstore == "embedded":
            return self._startEmbedded("xenstore: embedded")
        if cfg.xenstore != "auto":
            self.xenstoreAddress = cfg.xenstore
            return cfg.xenstore
        addr = parseAddress("auto", exists=self._exists)
        if addr.kind == "xenbus":
            self.xenstoreAddress = str(addr)
            return str(addr)
        if self._exists(addr.path) and await self._probe(str(addr)):
            self.xenstoreAddress = str(addr)
            return str(addr)
        return self._startEmbedded(f"no xenstored reachable at {addr.path} and no xenbus device")

    async def _probe(self, address: str) -> bool:
        from xenddev.xenstore.connection import connectXenStore

        try:
            d = connectXenStore(self.reactor, address)
            d.addTimeout(self.config.timeouts.connect, self.reactor)
            client = await d
        except Exception as e:
            self.log.warn("xenstored at {address} is not reachable: {e}", address=address, e=e)
            return False
        await client.disconnect()
        return True

    def _startEmbedded(self, why: str) -> str:
        from xenddev.xenstore.server.service import XenstoredService

        path = self.config.xenstoredSocketPath
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        self.log.info("Starting the embedded xenstored on {path} ({why})", path=path, why=why)
        self.xenstored = XenstoredService(path, reactor=self.reactor)
        self.xenstored.setServiceParent(self)
        self.embedded = True
        self._socketPaths.append(path)
        self.xenstoreAddress = f"unix:{path}"
        return self.xenstoreAddress

    def _decideSimulation(self) -> bool:
        mode = self.config.driver_domain.simulate
        if mode == "off":
            return False
        if mode == "auto":
            return self.embedded and not onXenHost(self._exists)
        if onXenHost(self._exists):
            raise StartupError(
                "driver_domain.simulate is 'on' but this is a Xen host: the simulator would "
                "fight the real backends and frontends; set it to auto or off"
            )
        return True

    async def _connect(self, name: str, address: str, guarded: bool = False) -> Any:
        """
        A XenStore connection as the child service C{name}, once connected.
        C{guarded}: a L{GuardedXenStore} (requests wait at most
        C{timeouts.connect} for a connection; the toolstack's, which
        clients wait on); else one that waits for xenstored to come back
        (the agent's and the simulators' background work). Either treats
        a store silent for C{timeouts.connect} with requests outstanding
        as gone (L{xenddev.xenstore.stall}).
        """
        from xenddev.xenstore.connection import ReconnectingXenStore
        from xenddev.xenstore.endpoints import endpointFor
        from xenddev.xsguard import GuardedXenStore

        endpoint = cast(Any, endpointFor(self.reactor, address))
        timeout = self.config.timeouts.connect
        xs = (
            GuardedXenStore(endpoint, self.reactor, bound=timeout, address=address, stall=timeout)
            if guarded
            else ReconnectingXenStore(endpoint, self.reactor, stall=timeout, address=address)
        )

        async def connect() -> None:
            xs.start()
            d = xs.whenConnected()
            d.addTimeout(timeout, self.reactor)
            try:
                await d
            except Exception as e:
                raise StartupError(
                    f"cannot connect to XenStore at {address} within {timeout:g}s: {e}"
                ) from None

        await self._add(Part(f"{name} connection", connect, xs.stop))
        return xs

    async def _initialiseDom0(self, xs: Any) -> None:
        # What xencommons' init does on a real host.
        async def init(tx: Any) -> None:
            if await tx.readOrNone("/local/domain/0/domid") is None:
                await tx.write("/local/domain/0/domid", "0")
                await tx.write("/local/domain/0/name", "Domain-0")

        await xs.transact(init)

    async def _startAgent(self, address: str) -> None:
        from xenddev.driverdomain.agent import BackendCtrlAgent
        from xenddev.driverdomain.kinds import kindsByName, resolveKinds

        dd = self.config.driver_domain
        xs = await self._connect("agent", address)
        hotplug = None
        useHotplug = dd.hotplug == "on" or (dd.hotplug == "auto" and not self.simulated)
        if useHotplug:
            from xenddev.driverdomain.hotplug import HotplugRunner

            builtins = {}
            if "block" in dd.builtin_scripts:
                from xenddev.driverdomain.hotplugblock import BuiltinBlockScript

                builtins["block"] = BuiltinBlockScript(xs, dd.domid, self.reactor)
            hotplug = HotplugRunner(
                dd.script_dir,
                xenstore=xs,
                timeout=dd.hotplug_timeout,
                xenstoredPath=address.partition(":")[2] if address.startswith("unix:") else None,
                reactor=self.reactor,
                builtins=builtins,
            )
        from xenddev.datapath import standardPausers

        names, leftOut = resolveKinds(dd.kinds, kernel=not self.simulated)
        agent = self.agent = BackendCtrlAgent(
            xs,
            dd.domid,
            kindsByName(names, kernel=not self.simulated),
            hotplug,
            standardPausers(self.reactor),
        )
        await self._add(Part("agent", agent.start, agent.stop))
        self.log.info(
            "Driver-domain agent for domain {domid} (kinds {kinds}{why}; hotplug scripts {hp})",
            domid=dd.domid,
            kinds=",".join(names),
            why="".join(f"; not {k}: {reason}" for k, reason in leftOut.items()),
            hp=(dd.script_dir + "".join(f", {n} built in" for n in dd.builtin_scripts))
            if hotplug is not None
            else "off",
        )

    async def _startSimulators(self, address: str) -> None:
        from xenddev.simulator import SimulatedHost

        xs = await self._connect("simulator", address)
        dd = self.config.driver_domain.domid
        guests = []
        for name in await xs.ls("/local/domain", missingOk=True):
            if name.isdigit() and int(name) != dd and await xs.exists(f"/local/domain/{name}/vm"):
                guests.append(int(name))
        self.log.warn(
            "SIMULATED xenbus ({why}, XenStore {address}): xenddev plays the kernel backends "
            "of domain {dd} and the frontends of every guest; nothing is really attached",
            why="embedded xenstored, no hypervisor"
            if self.embedded
            else "driver_domain.simulate: on, with a real xenstored",
            address=address,
            dd=dd,
        )
        host = self.simHost = SimulatedHost(xs, dd, guests)
        await self._add(Part("simulator", host.start, host.stop))
        self.guests = SimulatedGuests(None, self.simHost, dd)

    def _storageControl(self) -> Any:
        """The storage control over L{dataPaths} (C{datapath.*})."""
        from xenddev.storagectl import StorageControl

        timeouts = self.config.timeouts
        return StorageControl(
            self.dataPaths,
            self.reactor,
            bound=timeouts.quiesce,
            timeout=timeouts.request,
            maxHandles=self.config.limits.quiesce_handles,
        )

    def httpLimits(self) -> HttpLimits:
        """What one client of a listener may hold (C{limits:})."""
        limits = self.config.limits
        return HttpLimits(
            bodySize=limits.body_size,
            connections=limits.connections,
            idleTimeout=limits.idle_timeout,
            requestTimeout=limits.request_timeout,
        )

    # Listeners

    async def _listen(self, rpc: RpcFactories, manager: DeviceManager) -> None:
        from twisted.internet.endpoints import quoteStringArgument

        cfg = self.config
        path = cfg.socketPath
        os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
        desc = (
            f"unix:address={quoteStringArgument(path)}:mode={cfg.xmlrpc.socket_mode:o}:lockfile=1"
        )
        site = rpc.rpcSite(
            manager,
            storage=self.storage,
            limits=self.httpLimits(),
            reactor=self.reactor,
            label=f"XML-RPC on {path}",
            guard=self.guard,
            peers=self.peers,
        )
        self._addNamespaces(site.resource)
        await self._listenOn(
            desc,
            site,
            f"cannot listen on {path}: {{e}} (is another xenddev running with this rundir?)",
        )
        self._socketPaths.append(path)
        self.log.info("XML-RPC listening on {path}", path=path)
        for spec in (cfg.xmlrpc.tcp, cfg.xmlrpc.tls):
            if spec:
                await self._listenNetwork(rpc, manager, spec)
        if cfg.metrics.enabled:
            from xenddev.metrics import MetricsResource

            endpoint = self._withInterface(cfg.metrics.endpoint)
            # The same limits as the XML-RPC listeners: a scraper is a client too.
            site = LimitedSite(
                MetricsResource(self),
                self.httpLimits(),
                reactor=self.reactor,
                label=f"metrics on {endpoint}",
            )
            await self._listenOn(endpoint, site, f"cannot listen on {endpoint}: {{e}}")
            self.log.info("Metrics on {endpoint}", endpoint=cfg.metrics.endpoint)

    def _addNamespaces(self, resource: Any) -> None:
        """
        The namespaces of the daemon's parts beside C{xenddev.xmlrpc}'s own:
        C{migrate.*} (L{xenddev.migraterpc}; fault 19 without a pool).
        """
        from xenddev.migraterpc import addMigrateNamespace

        addMigrateNamespace(resource, self.migrations)

    async def _listenOn(self, description: str, factory: Any, failure: str) -> None:
        """
        Listen on an endpoint string as the next child service (its port
        in L{ports} while it listens); L{StartupError} with C{failure}
        (C{{e}}: the reason) if it cannot.
        """
        from twisted.internet.endpoints import serverFromString

        ports, mine = self.ports, []

        async def listen() -> None:
            try:
                port = await serverFromString(self.reactor, description).listen(factory)
            except Exception as e:
                raise StartupError(failure.format(e=e)) from None
            ports.append(port)
            mine.append(port)

        async def stop() -> None:
            for port in mine:
                ports.remove(port)
                await port.stopListening()

        await self._add(Part(f"listener {description}", listen, stop))

    def _withInterface(self, spec: str) -> str:
        if spec.startswith(("tcp:", "ssl:")) and "interface=" not in spec:
            return f"{spec}:interface={self.config.xmlrpc.interface}"
        return spec

    async def _listenNetwork(self, rpc: RpcFactories, manager: DeviceManager, spec: str) -> None:
        from twisted.cred.checkers import FilePasswordDB
        from twisted.cred.portal import Portal
        from twisted.web.guard import BasicCredentialFactory, HTTPAuthSessionWrapper

        passwords = self.config.xmlrpc.password_file
        assert passwords is not None  # the config refuses a listener without one
        try:
            st = os.stat(passwords)
        except OSError as e:
            raise StartupError(f"xmlrpc.password_file {passwords}: {e.strerror}") from None
        if st.st_mode & 0o077:
            raise StartupError(
                f"xmlrpc.password_file {passwords} is readable by others "
                f"(mode {stat.S_IMODE(st.st_mode):o}); chmod 600 it"
            )
        resource = rpc.rpcResource(
            manager, storage=self.storage, guard=self.guard, peers=self.peers
        )
        self._addNamespaces(resource)
        portal = Portal(_RpcRealm(resource), [FilePasswordDB(passwords)])
        wrapper = HTTPAuthSessionWrapper(portal, [BasicCredentialFactory(b"xenddev")])
        full = self._withInterface(spec)
        site = LimitedSite(
            wrapper, self.httpLimits(), reactor=self.reactor, label=f"XML-RPC on {full}"
        )
        await self._listenOn(full, site, f"cannot listen on {full}: {{e}}")
        self.log.info("XML-RPC listening on {endpoint} (HTTP Basic auth)", endpoint=full)

    # Stop

    def stopService(self) -> Deferred[None]:
        """
        Stop accepting, drain operations (bounded), stop everything, remove
        sockets. A second call waits for the first.
        """
        if self._stopping is None:
            self._stopping = Deferred.fromCoroutine(self._stop())
        waiter: Deferred[None] = Deferred()

        def release(result: object) -> object:
            waiter.callback(None)
            return result

        self._stopping.addBoth(release)
        return waiter

    async def _stop(self) -> None:
        if self._starting is not None and not self._starting.called:
            self._starting.cancel()
        self.log.info("xenddev stopping")
        Service.stopService(self)
        # Listeners, reaper, operations (drained), quiesce handles (resumed),
        # simulators, agent, connections, the embedded xenstored.
        await stopInReverse(self, self.log)
        # A UNIX port removes its socket one reactor turn after stopListening.
        from twisted.internet.task import deferLater

        for _ in range(3):
            await deferLater(self.reactor, 0, lambda: None)
        for path in self._socketPaths:
            _removeSocket(path)
        self.log.info("xenddev stopped")
        self._stopLogging()


@implementer(IRealm)
class _RpcRealm:
    """Every authenticated user gets the XML-RPC resource."""

    def __init__(self, resource: Any) -> None:
        self.resource = resource

    def requestAvatar(self, avatarId: Any, mind: Any, *interfaces: Any) -> Any:
        from twisted.web.resource import IResource

        if IResource in interfaces:
            return (IResource, self.resource, lambda: None)
        raise NotImplementedError()
