# -*- test-case-name: tests.test_poolguard -*-
"""
This daemon as a host of a pool (C{pool:} in the configuration): the etcd
client, the host's session joined at start and left at stop, its
self-fence wired to the data paths (L{DataPathFence}).

Joining. A session of this host name that is still alive (the daemon
was restarted, or killed, less than a TTL ago) holds the name: the join
is retried until that lease has expired (C{ttl} seconds at most), then
refused; etcd that cannot be reached is retried for C{connect} seconds.

Leaving. A daemon that stops while its devices still hold activations
does not revoke its lease: the devices keep running after it, and their
targets stay held for the TTL, their data paths paused by the fence
watchdog (L{xenddev.poolwatchdog}), until the next daemon takes them back
(L{PoolGuard.start<xenddev.poolguard.PoolGuard.start>}) once that lease
expired; with none, the lease is revoked and the host leaves the pool at
once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.task import deferLater
from twisted.logger import Logger

from xenddev.pool.errors import EtcdUnavailable, HostNameInUse
from xenddev.pool.etcd import EtcdClient
from xenddev.pool.etcdsecurity import EtcdSecurity
from xenddev.pool.interfaces import IEtcd
from xenddev.pool.session import HostSession
from xenddev.poolfence import DataPathFence

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
    @ivar session: the live session, once joined.
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
        self._onLost: list[Callable[[frozenset[bytes]], object]] = []

    def onLost(self, callback: Callable[[frozenset[bytes]], object]) -> None:
        """Also call C{callback(keys)} when the session's lease is lost (after the fence's)."""
        self._onLost.append(callback)

    async def start(self) -> None:
        """Join the pool (retried as the module docstring says); done once live."""
        began = self.reactor.seconds()
        said = False
        while True:
            session = HostSession(
                self.etcd, self.reactor, self.host, self.ttl, self.fenceAfter, info=self.info
            )
            try:
                await session.start()
                break
            except HostNameInUse as e:
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
        self.session = session

    async def stop(self) -> None:
        """Leave the pool (the lease revoked unless activations are held) and close etcd."""
        session, self.session = self.session, None
        if session is not None:
            held = session.held
            if held:
                self.log.warn(
                    "Leaving the pool with {n} activation(s) of running devices: their "
                    "keys stay held until the lease expires ({ttl} s)",
                    n=len(held),
                    ttl=session.ttl,
                )
            await session.stop(revoke=not held)
        await self.etcd.close()
