# -*- test-case-name: tests.test_pooldatapaths -*-
"""
The pool-wide data-path registry (seed 002: the coalescer must "know where
all the I/O is going on", "to be able to find the host and pid where the
related tapdisks (or qemus) live", across disks "on different hosts").

Each host's registry is its own XenStore (L{xenddev.backendctrl.records}:
the agents write a record while a VDI is active). A host of a pool also
publishes it in etcd (L{xenddev.pool.datapaths}: C{datapaths/<host>/<dd>/<vdi>}
under the host's session lease, so a dead host's entries vanish with its
lease):

  - L{DataPathPublisher} keeps etcd in step with this host's registry: a
    XenStore watch on each driver domain's registry directory marks it to
    be read again (registered, updated after a coalesce, removed), then the
    difference is written (puts under the lease, deletes of what went);
    a full resync at start, when the session recovers, when it rejoined
    under a new lease (its keys went with the old one), and every
    C{resyncEvery} seconds. A publish that fails is retried (backoff up to
    C{maxRetry} seconds) and logged, never dropped.
  - L{PoolDataPaths} is the storage control's view of the other hosts
    (L{IPoolDataPaths}): their published data paths, and the pool-wide
    quiesce through each host's daemon over the peer channel
    (C{datapath.quiesceLocal}, which pauses only that host's data paths, so
    a quiesce never recurses; C{datapath.resume} of the handle it gave). If
    one host fails (unreachable, or its quiesce faulted) the hosts already
    paused are resumed and L{HostQuiesceError} names the host. Each peer's
    handle still expires on that peer (its C{timeouts.quiesce}) if this
    daemon dies before resuming it.

What a data path's entry says: host, kind, pid (and tapdisk minor, QMP
socket), image, format, backing chain, the kind's values, and how to reach
its pauser (C{pauser}: that host's daemon, with its advertised address).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import implementer

from xenddev.backendctrl.records import (
    DataPath,
    registryDir,
    scanDriverDomain,
    scanRegistry,
)
from xenddev.errors import FaultCode, XenddevError
from xenddev.interfaces import IPoolPeers, IWatchHandle
from xenddev.pool import etcdwire as wire
from xenddev.pool.datapaths import (
    DATAPATHS,
    PublishedDataPath,
    RecordError,
    domainPrefix,
    hostPrefix,
)
from xenddev.pool.interfaces import IEtcd, IHostSession
from xenddev.pool.session import LIVE
from xenddev.storagectl import IPoolDataPaths, RemoteHold

__all__ = [
    "LOCAL_QUIESCE",
    "DataPathPublisher",
    "HostQuiesceError",
    "PoolDataPaths",
    "dataPathFromStruct",
    "published",
    "unpublished",
]

#: The peer method that quiesces one host's data paths only.
LOCAL_QUIESCE = "datapath.quiesceLocal"
#: The peer method that resumes a handle.
RESUME = "datapath.resume"
#: Operations per etcd transaction (etcd's default limit is 128).
BATCH = 64


class HostQuiesceError(XenddevError):
    """
    A pool-wide quiesce failed on one host; everything it had paused on
    the other hosts (and this one) was resumed.

    @ivar host: the host that failed.
    @ivar cause: its error (a peer's fault keeps the peer's code, which is
        this error's; an unreachable host is 16).
    @ivar unresumed: the holds that could not be resumed (each peer still
        resumes them at its own deadline).
    """

    #: Narrowed per instance to the failing host's code.
    faultCode = FaultCode.DATAPATH_FAILED

    def __init__(
        self, image: str, host: str, cause: BaseException, unresumed: Sequence[RemoteHold] = ()
    ) -> None:
        self.host = host
        self.cause = cause
        self.unresumed = list(unresumed)
        code = getattr(cause, "faultCode", FaultCode.DATAPATH_FAILED)
        try:
            self.faultCode = FaultCode(code)
        except ValueError:
            self.faultCode = FaultCode.DATAPATH_FAILED
        left = ""
        if self.unresumed:
            hosts = ", ".join(sorted({h.host for h in self.unresumed}))
            left = f"; NOT resumed on {hosts} (each resumes at its own deadline)"
        super().__init__(f"quiesce of {image} failed on host {host}: {cause}{left}")


def published(dp: DataPath, host: str, pauser: Mapping[str, Any]) -> PublishedDataPath:
    """A local data path as C{host} publishes it."""
    return PublishedDataPath(
        host=host,
        driverDomid=dp.driverDomid,
        vdi=dp.vdi,
        kind=dp.kind,
        image=dp.image,
        format=dp.format,
        chain=tuple(dp.chain),
        pid=dp.pid,
        minor=dp.minor,
        qmp=dp.qmp,
        extra=dict(dp.extra),
        pauser=dict(pauser),
    )


def unpublished(entry: PublishedDataPath) -> DataPath:
    """A published entry as a L{DataPath} (naming its host)."""
    return DataPath(
        entry.driverDomid,
        entry.vdi,
        entry.kind,
        entry.host,
        entry.image,
        entry.format,
        tuple(entry.chain),
        entry.pid,
        entry.minor,
        entry.qmp,
        dict(entry.extra),
    )


def dataPathFromStruct(struct: Mapping[str, Any]) -> DataPath:
    """A data path from its XML-RPC struct (another host's answer)."""
    return DataPath(
        int(struct["domain"]),
        str(struct["vdi"]),
        str(struct.get("kind", "")),
        str(struct.get("host", "")),
        str(struct.get("image", "")),
        str(struct.get("format", "")),
        tuple(str(i) for i in struct.get("chain", ())),
        None if struct.get("pid") is None else int(struct["pid"]),
        None if struct.get("minor") is None else int(struct["minor"]),
        None if struct.get("qmp") is None else str(struct["qmp"]),
        {str(k): str(v) for k, v in dict(struct.get("extra", {})).items()},
    )


@implementer(IPoolDataPaths)
class PoolDataPaths:
    """
    The other hosts' data paths, and quiescing them through their daemons.

    @param etcd: the pool's etcd client.
    @param host: this host's name in the pool.
    @param peers: the peer channel (None: the daemon advertises no
        address, so it cannot ask the other hosts: a quiesce that needs
        them fails with fault 16).
    @param clock: for the peers' handle deadlines.
    """

    log = Logger()

    def __init__(self, etcd: IEtcd, host: str, peers: IPoolPeers | None, clock: Any) -> None:
        self.etcd = etcd
        self.host = host
        self.peers = peers
        self.clock = clock

    def entries(self, host: str | None = None) -> Deferred[list[PublishedDataPath]]:
        """Every published entry (only C{host}'s); unreadable ones are logged and skipped."""

        async def run() -> list[PublishedDataPath]:
            start = DATAPATHS if host is None else hostPrefix(host)
            found = await self.etcd.range(wire.Range(start, wire.prefixEnd(start)))
            out = []
            for kv in found.kvs:
                try:
                    out.append(PublishedDataPath.decode(kv.key, kv.value))
                except RecordError as e:
                    self.log.warn("{error}", error=e)
            return out

        return Deferred.fromCoroutine(run())

    def others(self, image: str | None = None, host: str | None = None) -> Deferred[list[DataPath]]:
        """The other hosts' data paths (using C{image}; only C{host}'s), each naming its host."""

        async def run() -> list[DataPath]:
            found = [unpublished(e) for e in await self.entries(host) if e.host != self.host]
            return [dp for dp in found if image is None or dp.uses(image)]

        return Deferred.fromCoroutine(run())

    def quiesce(self, image: str) -> Deferred[list[RemoteHold]]:
        """
        Pause every other host's users of C{image} (one peer call per host,
        at once); fire with their holds. If a host fails, the holds already
        taken are resumed (without reload) and L{HostQuiesceError} names it.
        """

        async def run() -> list[RemoteHold]:
            hosts = sorted({dp.host for dp in await self.others(image)})
            if not hosts:
                return []
            peers = self.peers
            if peers is None:
                raise HostQuiesceError(
                    image,
                    hosts[0],
                    _Unreachable(
                        "this daemon has no peer channel (pool.advertise and "
                        "pool.peer_password_file) to ask the other hosts"
                    ),
                )
            answers = await gatherResults(
                [_settle(peers.call(h, LOCAL_QUIESCE, image)) for h in hosts]
            )
            holds: list[RemoteHold] = []
            failures: list[tuple[str, BaseException]] = []
            for host, (ok, value) in zip(hosts, answers, strict=True):
                if ok:
                    try:
                        holds.append(self._hold(host, value))
                    except (KeyError, TypeError, ValueError) as e:
                        failures.append((host, _Garbled(f"unreadable answer {value!r}: {e}")))
                else:
                    failures.append((host, value))
            if not failures:
                return holds
            host, cause = failures[0]
            self.log.warn(
                "Pool-wide quiesce of {image} failed on {hosts}; resuming {n} other host(s)",
                image=image,
                hosts=", ".join(h for h, _ in failures),
                n=len(holds),
            )
            unresumed = await self.resume(holds, False)
            raise HostQuiesceError(image, host, cause, unresumed)

        return Deferred.fromCoroutine(run())

    def _hold(self, host: str, answer: Mapping[str, Any]) -> RemoteHold:
        paused = [dataPathFromStruct(s) for s in answer["paused"]]
        deadline = self.clock.seconds() + float(answer["expires-in"])
        return RemoteHold(host, str(answer["handle"]), paused, deadline)

    def resume(self, holds: Sequence[RemoteHold], reload: bool) -> Deferred[list[RemoteHold]]:
        """
        Resume each hold on its host (at once); fire with those still
        paused. A hold its host no longer knows (fault 11: its deadline
        resumed it) is done; one whose host cannot be reached after its own
        deadline is dropped too (that host resumed it, or left the pool).
        """

        async def run() -> list[RemoteHold]:
            if not holds:
                return []
            peers = self.peers
            assert peers is not None, "holds come from the peer channel"
            answers = await gatherResults(
                [_settle(peers.call(h.host, RESUME, h.handle, reload)) for h in holds]
            )
            kept = []
            for hold, (ok, error) in zip(holds, answers, strict=True):
                if ok:
                    continue
                code = getattr(error, "faultCode", None)
                if code == FaultCode.NOT_FOUND:
                    self.log.info(
                        "Host {host} no longer holds quiesce handle {handle} (resumed there)",
                        host=hold.host,
                        handle=hold.handle,
                    )
                elif code == FaultCode.UNAVAILABLE and self.clock.seconds() >= hold.deadline:
                    self.log.warn(
                        "Host {host} cannot be reached to resume handle {handle}: {error}; "
                        "its own deadline has passed, so it resumed it (or left the pool)",
                        host=hold.host,
                        handle=hold.handle,
                        error=error,
                    )
                else:
                    self.log.error(
                        "Resume of handle {handle} on host {host} failed: {error}",
                        host=hold.host,
                        handle=hold.handle,
                        error=error,
                    )
                    kept.append(hold)
            return kept

        return Deferred.fromCoroutine(run())


class _Unreachable(XenddevError):
    """The other hosts cannot be asked from here."""

    faultCode = FaultCode.UNAVAILABLE


class _Garbled(XenddevError):
    """A peer answered something that is not a quiesce handle."""

    faultCode = FaultCode.DATAPATH_FAILED


def _settle(d: Deferred[Any]) -> Deferred[tuple[bool, Any]]:
    """(True, result) or (False, exception); never fails."""
    return d.addCallbacks(lambda r: (True, r), lambda f: (False, f.value))


class DataPathPublisher:
    """
    Keeps this host's entries in etcd in step with its registry (see the
    module docstring).

    @param xs: the toolstack's XenStore connection (reads every registry).
    @param etcd: the pool's etcd client.
    @param session: this host's pool session (its lease; recover and lost).
    @param driverDomains: the driver domains to watch besides those with
        records at a full resync (called at each check: the set grows as
        devices are attached).
    @param pauser: how the entries say their pauser is reached.
    @param checkEvery: seconds between checks of the session's lease (a
        rejoin publishes everything again) and of the driver domains.
    @param resyncEvery: seconds between full resyncs (a safety net).
    @param retry: seconds before the first retry of a failed publish
        (doubling up to C{maxRetry}).
    @ivar failures: publishes that failed so far.
    @ivar lease: the lease the entries are published under (0: none yet).
    """

    log = Logger()

    def __init__(
        self,
        xs: Any,
        etcd: IEtcd,
        session: IHostSession,
        reactor: Any,
        driverDomains: Callable[[], Iterable[int]] = lambda: (),
        pauser: Mapping[str, Any] | None = None,
        checkEvery: float = 1.0,
        resyncEvery: float = 60.0,
        retry: float = 0.5,
        maxRetry: float = 10.0,
    ) -> None:
        self.xs = xs
        self.etcd = etcd
        self.session = session
        self.host: str = session.host
        self.reactor = reactor
        self._driverDomains = driverDomains
        self.pauser = dict(pauser if pauser is not None else {"via": "daemon", "host": self.host})
        self.checkEvery = checkEvery
        self.resyncEvery = resyncEvery
        self.retry = retry
        self.maxRetry = maxRetry
        self.failures = 0
        self.lease = 0
        #: key -> value of what this host's registry holds now.
        self._desired: dict[bytes, bytes] = {}
        #: key -> value of what is in etcd under L{lease}.
        self._published: dict[bytes, bytes] = {}
        self._watches: dict[int, IWatchHandle | None] = {}
        self._dirty: set[int] = set()
        self._full = False
        #: A sync is under way (at most one at a time).
        self._busy = False
        self._waiters: list[Deferred[None]] = []
        self._retryCall: IDelayedCall | None = None
        self._delay = retry
        self._failing = False
        self._stopped = False
        self._loop: LoopingCall | None = None
        self._lastFull = 0.0

    @property
    def entries(self) -> dict[bytes, bytes]:
        """What is published now (key -> value)."""
        return dict(self._published)

    @property
    def pending(self) -> bool:
        """Whether etcd is behind this host's registry (a publish to do or to retry)."""
        return bool(self._dirty or self._full or self._busy or self._retryCall)

    def start(self) -> Deferred[None]:
        """
        Publish everything, then keep it in step; fires after the first
        attempt (a failure is retried, not raised).
        """
        self.session.onRecover(lambda: self.poke(full=True))
        self.session.onLost(self._leaseLost)
        # At once after a rejoin; the periodic check also notices the new lease.
        self.session.onRejoin(lambda: self.poke(full=True))
        self._loop = LoopingCall(self._check)
        self._loop.clock = self.reactor
        self._loop.start(self.checkEvery, now=False)
        self.poke(full=True)
        return self.settled()

    def stop(self) -> Deferred[None]:
        """
        Stop publishing (the entries stay until the lease ends: the data
        paths outlive the daemon, as its devices do).
        """
        self._stopped = True
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        if self._retryCall is not None and self._retryCall.active():
            self._retryCall.cancel()
        self._retryCall = None

        async def run() -> None:
            await self.settled()
            watches, self._watches = self._watches, {}
            for watch in watches.values():
                if watch is not None:
                    await _quietly(watch.stop())

        return Deferred.fromCoroutine(run())

    def settled(self) -> Deferred[None]:
        """Fires when the sync under way (if any) has ended."""
        if not self._busy:
            return Deferred.fromCoroutine(_nothing())
        d: Deferred[None] = Deferred()
        self._waiters.append(d)
        return d

    def poke(self, driverDomid: int | None = None, full: bool = False) -> None:
        """
        Read a driver domain's registry again (C{full}: every registry,
        and etcd's entries) and publish the difference.
        """
        if driverDomid is not None:
            self._dirty.add(driverDomid)
        self._full = self._full or full or driverDomid is None
        if self._stopped or self._busy or self._retryCall is not None:
            return
        self._busy = True
        Deferred.fromCoroutine(self._run())

    # The sync

    async def _run(self) -> None:
        try:
            while (self._dirty or self._full) and not self._stopped:
                if self.session.state != LIVE:
                    # Fenced or rejoining: no lease to publish under (the
                    # check publishes everything once it is live again).
                    return
                full, dirty = self._full, self._dirty
                self._full, self._dirty = False, set()
                try:
                    await self._sync(full, dirty)
                except Exception as e:
                    self._full = self._full or full
                    self._dirty |= dirty
                    self._failed(e)
                    return
                if self._failing:
                    self._failing = False
                    self.log.info(
                        "Data paths published in the pool again ({n} entries)",
                        n=len(self._published),
                    )
                self._delay = self.retry
        finally:
            self._busy = False
            waiters, self._waiters = self._waiters, []
            for d in waiters:
                d.callback(None)

    def _failed(self, error: Exception) -> None:
        self.failures += 1
        if not self._failing:
            self._failing = True
            self.log.warn(
                "Could not publish this host's data paths in the pool: {error}; "
                "retrying every {delay:g}s or less until it works",
                error=error,
                delay=self.maxRetry,
            )
        if self._stopped:
            return
        self._retryCall = self.reactor.callLater(self._delay, self._retryNow)
        self._delay = min(self._delay * 2, self.maxRetry)

    def _retryNow(self) -> None:
        self._retryCall = None
        self.poke()

    async def _sync(self, full: bool, dirty: set[int]) -> None:
        lease = self.session.lease
        if lease != self.lease:
            # A new lease: whatever was published went with the old one.
            full = True
        if full:
            found = await scanRegistry(self.xs)
            await self._watch({dp.driverDomid for dp in found} | set(self._driverDomains()))
            self._desired = self._entries(found)
            current = await self.etcd.range(
                wire.Range(hostPrefix(self.host), wire.prefixEnd(hostPrefix(self.host)))
            )
            self._published = {kv.key: kv.value for kv in current.kvs if kv.lease == lease}
            stale = [kv.key for kv in current.kvs if kv.lease != lease]
            self._lastFull = self.reactor.seconds()
        else:
            stale = []
            for domid in sorted(dirty):
                prefix = domainPrefix(self.host, domid)
                for key in [k for k in self._desired if k.startswith(prefix)]:
                    del self._desired[key]
                self._desired.update(self._entries(await scanDriverDomain(self.xs, domid)))
        puts = [(k, v) for k, v in sorted(self._desired.items()) if self._published.get(k) != v]
        deletes = [k for k in sorted(self._published) if k not in self._desired] + stale
        ops: list[wire.Put | wire.Delete] = [wire.Put(k, v, lease) for k, v in puts]
        ops += [wire.Delete(k) for k in deletes]
        for i in range(0, len(ops), BATCH):
            await self.etcd.txn(wire.Txn((), ops[i : i + BATCH]))
        for k, v in puts:
            self._published[k] = v
        for k in deletes:
            self._published.pop(k, None)
        self.lease = lease
        if puts or deletes:
            self.log.debug(
                "Data paths in the pool: {puts} published, {deletes} withdrawn",
                puts=len(puts),
                deletes=len(deletes),
            )

    def _entries(self, found: Iterable[DataPath]) -> dict[bytes, bytes]:
        out = {}
        for dp in found:
            entry = published(dp, self.host, self.pauser)
            out[entry.key] = entry.encode()
        return out

    async def _watch(self, domids: Iterable[int]) -> None:
        """Watch the registry of each driver domain not watched yet."""
        for domid in sorted(set(domids) - set(self._watches)):
            if self._stopped:
                return
            self._watches[domid] = None
            try:
                # xenstored fires a watch once as it is registered: a first read.
                self._watches[domid] = await self.xs.watch(
                    registryDir(domid), lambda _path, d=domid: self.poke(d)
                )
            except BaseException:
                del self._watches[domid]
                raise

    # Session events and the periodic check

    def _leaseLost(self, keys: frozenset[bytes]) -> None:
        """The lease expired: its entries are gone; publish again once rejoined."""
        self._published = {}
        self.lease = 0
        self.poke(full=True)

    def _check(self) -> None:
        """
        Publish everything after a rejoin or when a full resync is due,
        what is pending once the session is live again; watch new domains.
        """
        if self._stopped or self.session.state != LIVE:
            return
        new = set(self._driverDomains()) - set(self._watches)
        if new:
            # Each watch fires once as it is registered: its domain is read then.
            Deferred.fromCoroutine(self._watch(new)).addErrback(
                lambda f: self.log.warn(
                    "Could not watch a data-path registry: {error}", error=f.value
                )
            )
        due = self.reactor.seconds() - self._lastFull >= self.resyncEvery
        if self.session.lease != self.lease or due:
            self.poke(full=True)
        elif self._full or self._dirty:
            self.poke()


async def _nothing() -> None:
    """Nothing to wait for."""


async def _quietly(d: Deferred[Any]) -> None:
    """Wait for C{d}, whatever it does."""
    try:
        await d
    except Exception:
        pass
