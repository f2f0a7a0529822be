# -*- test-case-name: tests.test_poolguard -*-
"""
This daemon as a host of a pool (C{pool:} in the configuration): the etcd
client, the host's session joined at start and left at stop, its
self-fence wired to the data paths (L{DataPathFence}).

Joining. The daemon records its lease in its run directory
(L{xenddev.poolleasefile}: host, lease, etcd cluster) at every join and
at stop. A daemon started again (an upgrade, a crash) finds that record
and, if it is this host's on this cluster and no predecessor still runs
(the record's lock is free), adopts the lease while it lives
(L{HostSession<xenddev.pool.session.HostSession>}): the same lease, its
activations still held, their tokens unchanged. Otherwise a session of
this host name that is still alive holds the name: the join is retried
until that lease has expired (C{ttl} seconds at most), then refused; etcd
that cannot be reached is retried for C{connect} seconds. Once the daemon
has taken its devices' targets back, what an adopted lease held that
nothing claimed again is deleted (L{dropUnclaimed}).

Leaving. A daemon that stops while its devices still hold activations
neither revokes its lease nor pauses their data paths: the devices keep
running after it, and the fence watchdog (L{xenddev.poolwatchdog}) keeps
the lease's fence deadline, pausing them then unless the next daemon
adopted the lease before; a later daemon that finds the lease expired
joins anew and takes the targets back
(L{PoolGuard.start<xenddev.poolguard.PoolGuard.start>}). With none held,
the lease is revoked, the record removed, and the host leaves the pool at
once.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import deferLater
from twisted.logger import Logger

from xenddev.pool.errors import EtcdUnavailable, HostNameInUse
from xenddev.pool.etcd import EtcdClient
from xenddev.pool.etcdsecurity import EtcdSecurity
from xenddev.pool.interfaces import IEtcd
from xenddev.pool.session import HostSession
from xenddev.poolfence import DataPathFence
from xenddev.poolleasefile import (
    LEASE_FILE,
    LEASE_LOCK,
    LeaseRecord,
    LeaseRecordLock,
    UntrustedLeaseRecord,
    readLeaseRecord,
    removeLeaseRecord,
    writeLeaseRecord,
)

__all__ = ["PoolMembership"]

#: Seconds between two attempts to join.
RETRY = 0.25


class PoolMembership:
    """
    This host's membership of the pool.

    @param host: this host's name in the pool.
    @param endpoints: the etcd members' client URLs.
    @param ttl: the session lease's seconds.
    @param fenceAfter: the self-fence deadline after the last renewal.
    @param timeout: seconds one etcd call may take.
    @param connect: seconds to keep trying to reach etcd at start.
    @param fence: pauses and resumes this host's data paths.
    @param etcd: the etcd client (tests); one on C{endpoints} unless given.
    @param security: TLS and the etcd user for that client (C{pool.ca_file} ...).
    @param info: what the host publishes of itself (C{rpc}: its daemon's address).
    @param rundir: where the lease is recorded for the next daemon (None:
        nowhere, nothing adopted).
    @ivar session: the live session, once joined.
    @ivar cluster: the etcd cluster's id (0 until known).
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        host: str,
        endpoints: tuple[str, ...],
        ttl: int,
        fenceAfter: float,
        timeout: float,
        connect: float,
        fence: DataPathFence,
        etcd: IEtcd | None = None,
        info: dict[str, Any] | None = None,
        security: EtcdSecurity | None = None,
        rundir: str | None = None,
    ) -> None:
        self.reactor = reactor
        self.host = host
        self.ttl = ttl
        self.fenceAfter = fenceAfter
        self.connect = connect
        self.fence = fence
        #: What the host says of itself in its membership (C{rpc}: its address).
        self.info = dict(info or {})
        self.etcd: IEtcd = etcd or EtcdClient(
            reactor, endpoints, timeout=timeout, security=security
        )
        self.session: HostSession | None = None
        self.cluster = 0
        self.recordPath = os.path.join(rundir, LEASE_FILE) if rundir is not None else None
        self._lock = LeaseRecordLock(os.path.join(rundir, LEASE_LOCK)) if rundir else None
        self._saidBusy = False
        self._onLost: list[Callable[[frozenset[bytes]], object]] = []

    def onLost(self, callback: Callable[[frozenset[bytes]], object]) -> None:
        """Also call C{callback(keys)} when the session's lease is lost (after the fence's)."""
        self._onLost.append(callback)

    async def start(self) -> None:
        """Adopt the lease or join the pool (as the module's doc says); done once live."""
        began = self.reactor.seconds()
        said = False
        pending = True  # the record not read yet (a predecessor may still run)
        adopt = 0
        while True:
            try:
                if pending:
                    found = await self._adoptable()
                    if found is not None:
                        pending, adopt = False, found
                session = HostSession(
                    self.etcd,
                    self.reactor,
                    self.host,
                    self.ttl,
                    self.fenceAfter,
                    info=self.info,
                    adopt=adopt,
                )
                await session.start()
                break
            except HostNameInUse as e:
                # Not adopted (if tried, it cannot be later): joined from now on.
                adopt = 0
                # An earlier daemon of this host: its lease ends within a TTL.
                if self.reactor.seconds() - began > self.ttl + self.fenceAfter:
                    raise
                if not said:
                    said = True
                    self.log.warn("Waiting for the pool to free this host's name: {e}", e=e)
            except EtcdUnavailable:
                if self.reactor.seconds() - began > self.connect:
                    raise
            await deferLater(self.reactor, RETRY, lambda: None)
        session.onFence(self.fence.fence)
        session.onRecover(self.fence.recover)
        session.onLost(self.fence.lost)
        for callback in self._onLost:
            session.onLost(callback)
        session.onRejoin(lambda: Deferred.fromCoroutine(self._record()))
        self.session = session
        await self._record()

    def dropUnclaimed(self) -> Deferred[list[bytes]]:
        """
        Once the daemon has taken its devices' targets back: delete what an
        adopted lease held that nothing claimed again (nothing to do after
        a join); fires with the keys deleted.
        """
        session = self.session
        if session is None or not session.adopted:
            return succeed([])
        return session.dropUnclaimed()

    async def stop(self) -> None:
        """
        Leave the pool (the lease revoked and its record removed unless
        activations are held; then recorded for the next daemon) and
        close etcd.
        """
        session, self.session = self.session, None
        try:
            if session is not None:
                held = session.held
                if held:
                    self.log.warn(
                        "Leaving the pool with {n} activation(s) of running devices: the "
                        "lease {lease:x} is kept for the next daemon to adopt (it expires "
                        "{ttl} s after its last renewal)",
                        n=len(held),
                        lease=session.lease,
                        ttl=session.ttl,
                    )
                await session.stop(revoke=not held)
                if self.recordPath is not None and session.lease:
                    if held:
                        self._write(session.lease)
                    else:
                        removeLeaseRecord(self.recordPath)
            await self.etcd.close()
        finally:
            if self._lock is not None:
                self._lock.release()

    # --- the lease record ---------------------------------------------------

    async def _adoptable(self) -> int | None:
        """
        The lease to adopt: the record's, when it is this host's on this
        cluster; 0 when there is none to adopt; None while a predecessor
        still runs (the record's lock is taken: ask again later).
        """
        if self.recordPath is None or self._lock is None:
            return 0
        if not self._lock.acquire():
            if not self._saidBusy:
                self._saidBusy = True
                self.log.warn(
                    "Not adopting the pool lease yet: another daemon holds {lock} "
                    "(still running or stopping)",
                    lock=self._lock.path,
                )
            return None
        try:
            record = readLeaseRecord(self.recordPath)
        except (OSError, UntrustedLeaseRecord) as e:
            self.log.error("Ignoring the pool lease record: {e}", e=e)
            return 0
        if record is None:
            return 0
        if record.host != self.host:
            self.log.info(
                "Not adopting lease {lease:x}: it was host {other}'s, this is {host}",
                lease=record.lease,
                other=record.host,
                host=self.host,
            )
            return 0
        cluster = await self._cluster()
        if record.cluster != cluster:
            self.log.info(
                "Not adopting lease {lease:x}: it was on etcd cluster {was:x}, this is {now:x}",
                lease=record.lease,
                was=record.cluster,
                now=cluster,
            )
            return 0
        return record.lease

    async def _cluster(self) -> int:
        """The etcd cluster's id (asked once)."""
        if not self.cluster:
            self.cluster = (await self.etcd.status()).clusterId
        return self.cluster

    async def _record(self) -> None:
        """Record the session's lease for the next daemon (at a join and a rejoin)."""
        session = self.session
        if self.recordPath is None or session is None or not session.lease:
            return
        if self._lock is not None and not self._lock.acquire():
            self.log.warn(
                "{lock} is still another daemon's: a daemon started meanwhile could adopt "
                "this one's lease",
                lock=self._lock.path,
            )
        try:
            await self._cluster()
        except EtcdUnavailable as e:
            # Recorded with the cluster unknown: not adopted, joined as before.
            self.log.warn("Could not read the etcd cluster's id: {e}", e=e)
        self._write(session.lease)

    def _write(self, lease: int) -> None:
        """Write the record (a failure is logged: the next daemon then joins anew)."""
        assert self.recordPath is not None
        try:
            writeLeaseRecord(
                self.recordPath, LeaseRecord(self.host, lease, self.cluster, os.getpid())
            )
        except OSError as e:
            self.log.error(
                "Could not record the pool lease in {path}: {e}", path=self.recordPath, e=e
            )
