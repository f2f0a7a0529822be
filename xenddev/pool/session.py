# -*- test-case-name: tests.test_pool_session -*-
"""
A host's session in the pool: a lease kept alive, and the self-fence.

Everything a host holds in the pool (its membership key, its activations)
lives under one etcd lease of C{ttl} seconds, renewed every C{renewEvery}
seconds. If the host stops renewing (it crashed, its daemon stalled, or it
lost etcd) the lease expires and another host may take what it held.

Before that can happen the host must stop writing: the B{self-fence}.
etcd renews a lease when the keepalive reaches its leader, which is after
the host sent it, so a renewal sent at time I{s} (this host's clock) keeps
the lease alive until at least I{s + ttl}. The session therefore fences
itself at I{s + fenceAfter} after the last renewal that succeeded, where
C{fenceAfter < ttl}: it calls the fence callbacks (which pause the data
paths it serves) while the lease still stands, leaving C{ttl - fenceAfter}
seconds for them to finish. The check C{fenceAfter < ttl} is made when the
session is built (L{PoolConfigError}, naming both).

If renewals succeed again before the lease expired, the session is live
again and calls the recover callbacks (the data paths may resume: nobody
else could have taken their keys). If etcd answers that the lease has
expired, the keys held under it are gone (another host may hold them by
now): the session reports them to the lost callbacks, which must B{not}
resume I/O on them, then joins the pool again under a new lease.

The timer is the injected reactor's; a stalled reactor runs the overdue
deadline before it reads any late renewal, so a host that wakes up after
its deadline fences before it does anything else.

B{Adopting} a lease (a daemon restarted: C{adopt}, the lease its
predecessor left, L{xenddev.poolmember}): if this host's membership key is
under that lease and a keepalive of it succeeds (etcd renews any lease by
its id), the session continues under it instead of joining: the keys held
under it stay held, their fencing tokens unchanged. The predecessor's last
renewal is unknown here, so the first keepalive's send time counts as the
first renewal (the deadline runs from it). Otherwise (the lease expired,
the key is another lease's, its TTL would not outlast the self-fence) the
session joins as above. The activations and intents found under an
adopted lease count as held (a stop does not revoke it) until the daemon
has taken its targets back; those it did not claim again are then
deleted (L{dropUnclaimed}): with a new lease they would have gone with
the old one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from typing import Any

import attrs
from twisted.internet.defer import Deferred, gatherResults, maybeDeferred
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from xenddev.pool import etcdwire as wire
from xenddev.pool.errors import (
    EtcdTimeout,
    HostNameInUse,
    LeaseNotFound,
    PoolConfigError,
    SessionNotLive,
)
from xenddev.pool.interfaces import IEtcd, IHostSession
from xenddev.pool.keys import ACTIVE, HOSTS, MIGRATIONS, READERS, checkHostName, hostKey, hostOf

__all__ = [
    "FENCED",
    "LIVE",
    "NEW",
    "REJOINING",
    "STARTING",
    "STOPPED",
    "HostInfo",
    "HostSession",
    "checkTiming",
]

NEW = "new"
STARTING = "starting"
LIVE = "live"
FENCED = "fenced"
REJOINING = "rejoining"
STOPPED = "stopped"

#: Keepalives in flight at once: more would only queue behind a member
#: that does not answer (each is bounded by the client's timeout).
MAX_IN_FLIGHT = 4
#: Keepalives an adoption sends before giving up when each is answered
#: after its own deadline (it then fails as etcd being too slow).
ADOPT_ATTEMPTS = 3
#: The keys under a lease that are this host's holdings (not its records).
_HOLDINGS = (ACTIVE, READERS, MIGRATIONS)

FenceCallback = Callable[[], object]
LostCallback = Callable[[frozenset[bytes]], object]


def checkTiming(ttl: int, fenceAfter: float, renewEvery: float | None = None) -> float:
    """
    Check that the self-fence can work with these timings and return the
    renewal interval (C{fenceAfter / 4} unless given): the lease TTL is a
    whole number of seconds (etcd's unit) above the self-fence deadline,
    and at least two renewals fit before the deadline.
    """
    if isinstance(ttl, bool) or not isinstance(ttl, int) or ttl < 1:
        raise PoolConfigError(f"pool lease TTL {ttl!r}: a whole number of seconds, at least 1")
    if not fenceAfter > 0:
        raise PoolConfigError(f"pool self-fence deadline {fenceAfter!r}: must be positive")
    if not fenceAfter < ttl:
        raise PoolConfigError(
            f"pool lease TTL ({ttl} s) must be longer than the self-fence deadline "
            f"({fenceAfter:g} s): the host must pause its data paths before its lease "
            "can expire and its targets be taken by another host"
        )
    interval = fenceAfter / 4 if renewEvery is None else renewEvery
    if not 0 < interval <= fenceAfter / 2:
        raise PoolConfigError(
            f"pool renewal interval ({interval:g} s) must be positive and at most half "
            f"the self-fence deadline ({fenceAfter:g} s), so a renewal can fail and be retried"
        )
    return float(interval)


@attrs.frozen
class HostInfo:
    """
    A host of the pool as its membership key tells it, with the remaining
    TTL of its lease (-1: it has just expired).
    """

    name: str
    lease: int
    ttl: int
    joined: int
    pid: int = 0
    leaseTtl: int = 0
    fenceAfter: float = 0.0
    info: Mapping[str, Any] = attrs.field(factory=dict)

    def toJSON(self) -> dict[str, Any]:
        """The host as plain data (for C{--json} and XML-RPC)."""
        return {
            "name": self.name,
            "lease": f"{self.lease:x}",
            "ttl": self.ttl,
            "joined": self.joined,
            "pid": self.pid,
            "lease_ttl": self.leaseTtl,
            "fence_after": self.fenceAfter,
            "info": dict(self.info),
        }


@implementer(IHostSession)
class HostSession:
    """
    This host's session: the lease, its renewals, the self-fence.

    @ivar state: L{NEW}, L{STARTING}, L{LIVE}, L{FENCED}, L{REJOINING} or
        L{STOPPED}.
    @ivar lease: the current lease (0 before the first join).
    @ivar ttl: the TTL etcd granted (it may raise the one asked for).
    @ivar token: the revision at which the host joined under this lease.
    @ivar fencedAt: when the session last fenced itself (reactor time).
    @ivar lastRenewal: when the last successful renewal was sent.
    @ivar adopted: whether the session continues a predecessor's lease
        (C{adopt}, see the module's doc) rather than one it was granted.
    """

    log = Logger()

    def __init__(
        self,
        etcd: IEtcd,
        reactor: Any,
        host: str,
        ttl: int,
        fenceAfter: float,
        renewEvery: float | None = None,
        info: Mapping[str, Any] | None = None,
        adopt: int = 0,
    ) -> None:
        self.host = checkHostName(host)
        self.renewEvery = checkTiming(ttl, fenceAfter, renewEvery)
        self.requestedTtl = ttl
        self.fenceAfter = float(fenceAfter)
        self._etcd = etcd
        self._reactor = reactor
        self._info = dict(info or {})
        self.state = NEW
        self.lease = 0
        self.ttl = 0
        self.token = 0
        self.fencedAt: float | None = None
        self.lastRenewal: float | None = None
        self.adopted = False
        self._adopt = adopt
        self._held: set[bytes] = set()
        # An adopted lease's holdings nobody here has claimed (held) again yet.
        self._inherited: set[bytes] = set()
        self._deadline: IDelayedCall | None = None
        self._loop: LoopingCall | None = None
        self._inFlight = 0
        self._rejoining = False
        self._renewalFailing = False
        self._onFence: list[FenceCallback] = []
        self._onRecover: list[FenceCallback] = []
        self._onLost: list[LostCallback] = []
        self._onRejoin: list[FenceCallback] = []

    @property
    def held(self) -> frozenset[bytes]:
        """The keys this host holds under its lease."""
        return frozenset(self._held)

    @property
    def safeUntil(self) -> float | None:
        """The self-fence deadline now: the last renewal sent plus C{fenceAfter}."""
        return None if self.lastRenewal is None else self.lastRenewal + self.fenceAfter

    # --- life -------------------------------------------------------------

    def start(self) -> Deferred[None]:
        """
        Adopt the lease given (if it can be) or grant one, register the
        host, start renewing; fires when live.
        """
        if self.state != NEW:
            raise RuntimeError(f"session of {self.host} already {self.state}")
        self.state = STARTING

        async def start() -> None:
            try:
                if not (self._adopt and await self._adoptLease(self._adopt)):
                    await self._join()
            except BaseException:
                self.state = STOPPED
                raise
            if self.state != STARTING:
                # Stopped while joining: nothing will renew this lease. An
                # adopted one is left to expire: its keys are running devices'.
                self._cancelDeadline()
                if not self.adopted:
                    await self._revokeQuietly(self.lease)
                return
            self.state = LIVE
            if self._deadline is None:
                # The first renewal's answer came after its deadline: fence
                # at once (once the caller has registered its callbacks).
                self._deadline = self._reactor.callLater(0, self._deadlinePassed)
            self._loop = LoopingCall(self._tick)
            self._loop.clock = self._reactor
            self._loop.start(self.renewEvery, now=False)

        return Deferred.fromCoroutine(start())

    def stop(self, revoke: bool = True) -> Deferred[None]:
        """
        Stop renewing; with C{revoke}, revoke the lease so the host's keys
        go at once (a clean shutdown) rather than after the TTL. A revoke
        that fails is logged: the lease then expires on its own.
        """
        previous, self.state = self.state, STOPPED
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._cancelDeadline()
        lease, self._held, self._inherited = self.lease, set(), set()
        if not revoke or not lease or previous in (NEW, STOPPED):
            return Deferred.fromCoroutine(_nothing())

        return Deferred.fromCoroutine(self._revokeQuietly(lease))

    def checkLive(self) -> None:
        """
        Raise L{SessionNotLive} unless the lease is renewed and inside its
        self-fence deadline (checked against the clock, not only the timer,
        in case the reactor has not run it yet).
        """
        if self.state == LIVE:
            until = self.safeUntil
            if until is not None and self._reactor.seconds() >= until:
                self._fence("the self-fence deadline passed")
        if self.state != LIVE:
            raise SessionNotLive(self.host, self.state)

    # --- keys and callbacks -------------------------------------------------

    def hold(self, key: bytes) -> None:
        """Note C{key} as held under the lease (reported if the lease is lost)."""
        self._held.add(key)
        self._inherited.discard(key)

    def release(self, key: bytes) -> None:
        """Forget C{key}: it was deleted on purpose."""
        self._held.discard(key)
        self._inherited.discard(key)

    def onFence(self, callback: FenceCallback) -> None:
        """Call C{callback()} at the self-fence (it may return a Deferred)."""
        self._onFence.append(callback)

    def onRecover(self, callback: FenceCallback) -> None:
        """Call C{callback()} when renewals work again on the same lease."""
        self._onRecover.append(callback)

    def onLost(self, callback: LostCallback) -> None:
        """Call C{callback(keys)} with the keys lost with an expired lease."""
        self._onLost.append(callback)

    def onRejoin(self, callback: FenceCallback) -> None:
        """
        Call C{callback()} when the host has joined again under a new lease
        after losing the old one (what it publishes under its lease must be
        written again).
        """
        self._onRejoin.append(callback)

    # --- the pool's hosts ---------------------------------------------------

    def hosts(self) -> Deferred[list[HostInfo]]:
        """Every host of the pool, by name, with its lease's remaining TTL."""

        async def hosts() -> list[HostInfo]:
            found = await self._etcd.range(wire.Range(HOSTS, wire.prefixEnd(HOSTS)))
            ttls = await gatherResults(
                [self._etcd.leaseTimeToLive(kv.lease) for kv in found.kvs], consumeErrors=True
            )
            infos = []
            for kv, ttl in zip(found.kvs, ttls, strict=True):
                info = _hostInfo(kv, ttl.ttl)
                if info is None:
                    self.log.warn("unreadable pool host record {key!r}", key=kv.key)
                else:
                    infos.append(info)
            return sorted(infos, key=lambda h: h.name)

        return Deferred.fromCoroutine(hosts())

    @property
    def inherited(self) -> frozenset[bytes]:
        """An adopted lease's holdings not claimed here again (L{hold}) yet."""
        return frozenset(self._inherited)

    def dropUnclaimed(self) -> Deferred[list[bytes]]:
        """
        Delete what an adopted lease held that nobody here claimed again
        (L{inherited}; each only while still under the lease); fires with
        the keys deleted. Called once the daemon has taken its devices'
        targets back: the rest (a detach whose give-back failed, a
        migration's intent) went with the old lease before adoption
        existed, and would otherwise stay as long as this one.
        """

        async def drop() -> list[bytes]:
            lease, dropped = self.lease, []
            for key in sorted(self._inherited):
                result = await self._etcd.txn(
                    wire.Txn([wire.Compare.leaseIs(key, lease)], [wire.Delete(key)])
                )
                self.release(key)
                if result.succeeded:
                    dropped.append(key)
            if dropped:
                self.log.warn(
                    "host {host}: {n} key(s) under the adopted lease {lease:x} claimed by "
                    "nothing here deleted: {keys}",
                    host=self.host,
                    n=len(dropped),
                    lease=lease,
                    keys=", ".join(k.decode("utf-8", "replace") for k in dropped),
                )
            return dropped

        return Deferred.fromCoroutine(drop())

    # --- joining ------------------------------------------------------------

    def _record(self, ttl: int) -> bytes:
        """The membership key's value."""
        record = {
            "host": self.host,
            "pid": os.getpid(),
            "ttl": ttl,
            "fence_after": self.fenceAfter,
            "info": self._info,
        }
        return json.dumps(record).encode()

    async def _adoptLease(self, lease: int) -> bool:
        """
        Continue under C{lease} (see the module's doc); False when it
        cannot be, nothing written then.
        """
        key = hostKey(self.host)
        kv = await self._etcd.get(key)
        if kv is None or kv.lease != lease:
            self.log.info(
                "host {host}: lease {lease:x} not adopted: the host's key is {where}",
                host=self.host,
                lease=lease,
                where="absent" if kv is None else f"under lease {kv.lease:x}",
            )
            return False
        info = _hostInfo(kv, 0)
        if info is None or not info.leaseTtl > self.fenceAfter:
            # Its lease would expire before this session's self-fence.
            self.log.info(
                "host {host}: lease {lease:x} not adopted: its TTL ({ttl}) is not above "
                "the self-fence deadline ({fence:g} s)",
                host=self.host,
                lease=lease,
                ttl=info.leaseTtl if info is not None else "unknown",
                fence=self.fenceAfter,
            )
            return False
        for _ in range(ADOPT_ATTEMPTS):
            sent = self._reactor.seconds()
            try:
                ttl = await self._etcd.keepAlive(lease)
            except LeaseNotFound:
                self.log.info(
                    "host {host}: lease {lease:x} not adopted: it has expired",
                    host=self.host,
                    lease=lease,
                )
                return False
            # An answer later than its own deadline does not count (as a renewal's).
            if self._reactor.seconds() < sent + self.fenceAfter:
                break
        else:
            raise EtcdTimeout("/lease/keepalive", self.fenceAfter, {})
        result = await self._etcd.txn(
            wire.Txn(
                [wire.Compare.leaseIs(key, lease)],
                [wire.Put(key, self._record(ttl), lease)],
            )
        )
        if not result.succeeded:
            return False  # the key went with the lease a moment ago
        # Held until the daemon claims them again or drops them
        # (L{dropUnclaimed}): a stop before then must not revoke the lease.
        found = await self._etcd.leaseTimeToLive(lease, keys=True)
        self._inherited = {k for k in found.keys if k.startswith(_HOLDINGS)}
        self._held = set(self._inherited)
        self.lease = lease
        self.ttl = ttl
        self.token = kv.createRevision
        self.adopted = True
        # Nothing is known of the predecessor's renewals: the lease lives
        # until this keepalive's send time plus the TTL at least.
        self.lastRenewal = sent
        self._armDeadline()
        self.log.info(
            "host {host} adopted its pool lease {lease:x} (TTL {ttl} s, joined at revision "
            "{token}): the {n} activation(s) and intent(s) under it stay held",
            host=self.host,
            lease=lease,
            ttl=ttl,
            token=self.token,
            n=len(self._held),
        )
        return True

    async def _join(self) -> None:
        """A new lease, and the host's membership key under it (if the name is free)."""
        sent = self._reactor.seconds()
        lease = await self._etcd.grantLease(self.requestedTtl)
        key = hostKey(self.host)
        try:
            # Created only if absent; a repeat of our own request (the
            # client retried after a lost answer) finds it under our lease.
            result = await self._etcd.txn(
                wire.Txn(
                    [wire.Compare.absent(key)],
                    [wire.Put(key, self._record(lease.ttl), lease.id), wire.Range(key)],
                    [wire.Range(key)],
                )
            )
            found = result.responses[-1]
            assert isinstance(found, wire.RangeResult)
            kv = found.kvs[0] if found.kvs else None
            if kv is None or kv.lease != lease.id:
                raise HostNameInUse(self.host, kv.lease if kv is not None else 0)
        except BaseException:
            try:
                await self._etcd.revokeLease(lease.id)
            except Exception:
                self.log.info("could not revoke unused lease {lease:x}", lease=lease.id)
            raise
        self.lease = lease.id
        self.ttl = lease.ttl
        self.token = kv.createRevision
        # The grant was sent at `sent`: the lease lives until sent + ttl at least.
        self.lastRenewal = sent
        self._armDeadline()
        self.log.info(
            "host {host} joined the pool: lease {lease:x}, TTL {ttl} s, "
            "self-fence after {fence:g} s",
            host=self.host,
            lease=lease.id,
            ttl=lease.ttl,
            fence=self.fenceAfter,
        )

    async def _rejoin(self) -> None:
        """Join again under a new lease after the old one expired (retried each tick)."""
        if self._rejoining:
            return
        self._rejoining = True
        try:
            await self._join()
        except Exception as e:
            self.log.warn(
                "host {host} could not rejoin the pool yet: {error}", host=self.host, error=e
            )
            return
        finally:
            self._rejoining = False
        if self.state == REJOINING:
            self.state = LIVE
            self._run(self._onRejoin, ())
        elif self.state == STOPPED:
            self._cancelDeadline()
            await self._revokeQuietly(self.lease)

    async def _revokeQuietly(self, lease: int) -> None:
        """Revoke C{lease}; a failure is logged (the lease then expires by itself)."""
        try:
            await self._etcd.revokeLease(lease)
        except LeaseNotFound:
            pass
        except Exception:
            self.log.failure(
                "revoking the pool lease {lease:x} of {host}", lease=lease, host=self.host
            )

    # --- renewals and the deadline -------------------------------------------

    def _tick(self) -> None:
        """Send one keepalive (or retry joining after a lost lease)."""
        if self.state == REJOINING:
            Deferred.fromCoroutine(self._rejoin())
            return
        if self.state not in (LIVE, FENCED) or self._inFlight >= MAX_IN_FLIGHT:
            return
        lease, sent = self.lease, self._reactor.seconds()
        self._inFlight += 1
        d = self._etcd.keepAlive(lease)
        d.addCallbacks(
            lambda _: self._renewed(lease, sent), self._renewFailed, errbackArgs=(lease,)
        )

        def done(_: object) -> None:
            self._inFlight -= 1

        d.addBoth(done)

    def _renewed(self, lease: int, sent: float) -> None:
        """A renewal sent at C{sent} succeeded: move the deadline, maybe recover."""
        if lease != self.lease or self.state in (STOPPED, REJOINING):
            return
        if self._renewalFailing:
            self._renewalFailing = False
            self.log.info("pool lease {lease:x} renewed again", lease=lease)
        if self.lastRenewal is None or sent > self.lastRenewal:
            self.lastRenewal = sent
        if not self._armDeadline():
            return  # too late to count: the deadline has fired or is about to
        if self.state == FENCED:
            self.state = LIVE
            self.log.warn(
                "host {host} renewed its pool lease {lease:x} before it expired: "
                "recovering from the self-fence",
                host=self.host,
                lease=lease,
            )
            self._run(self._onRecover, ())

    def _armDeadline(self) -> bool:
        """
        Schedule the self-fence at the last renewal plus C{fenceAfter};
        False when that time has already come.
        """
        assert self.lastRenewal is not None
        delay = self.lastRenewal + self.fenceAfter - self._reactor.seconds()
        if delay <= 0:
            return False
        if self._deadline is not None and self._deadline.active():
            self._deadline.reset(delay)
        else:
            self._deadline = self._reactor.callLater(delay, self._deadlinePassed)
        return True

    def _renewFailed(self, failure: Failure, lease: int) -> None:
        """A renewal failed: an expired lease is lost; anything else waits for the deadline."""
        if lease != self.lease or self.state in (STOPPED, REJOINING):
            return
        if failure.check(LeaseNotFound):
            self._lost()
            return
        if not self._renewalFailing:
            self._renewalFailing = True
            self.log.warn(
                "host {host} could not renew its pool lease {lease:x}: {error}",
                host=self.host,
                lease=lease,
                error=failure.getErrorMessage(),
            )

    def _deadlinePassed(self) -> None:
        """The self-fence deadline: fence unless a renewal moved it."""
        self._deadline = None
        until = self.safeUntil
        if self.state == LIVE and until is not None and self._reactor.seconds() >= until:
            self._fence(f"no renewal of the lease for {self.fenceAfter:g} s")

    def _fence(self, why: str) -> None:
        """Fence: the data paths must stop before the lease can expire."""
        self.state = FENCED
        self.fencedAt = self._reactor.seconds()
        self._cancelDeadline()
        self.log.error(
            "host {host} fences itself ({why}): pausing its data paths before its "
            "pool lease {lease:x} can expire",
            host=self.host,
            why=why,
            lease=self.lease,
        )
        self._run(self._onFence, ())

    def _lost(self) -> None:
        """The lease expired: fence if not yet, report the keys lost, join again."""
        if self.state == LIVE:
            self._fence("the lease expired")
        lost, self._held, self._inherited = frozenset(self._held), set(), set()
        self.state = REJOINING
        self._cancelDeadline()
        self.log.error(
            "host {host} lost its pool lease {lease:x}; keys lost (not resumed): {keys}",
            host=self.host,
            lease=self.lease,
            keys=sorted(k.decode("utf-8", "replace") for k in lost),
        )
        self._run(self._onLost, (lost,))
        Deferred.fromCoroutine(self._rejoin())

    def _cancelDeadline(self) -> None:
        """Drop the pending deadline call."""
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def _run(self, callbacks: list[Any], args: tuple[Any, ...]) -> None:
        """Call each callback; a failure is logged and the others still run."""
        for callback in list(callbacks):
            maybeDeferred(callback, *args).addErrback(self._callbackFailed, callback)

    def _callbackFailed(self, failure: Failure, callback: object) -> None:
        """Log a callback's failure (the fence must not stop at the first one)."""
        self.log.failure("pool session callback {callback!r} failed", failure, callback=callback)


def _hostInfo(kv: wire.KeyValue, ttl: int) -> HostInfo | None:
    """A host's record, or None when it cannot be read."""
    try:
        record = json.loads(kv.value)
        return HostInfo(
            name=hostOf(kv.key),
            lease=kv.lease,
            ttl=ttl,
            joined=kv.createRevision,
            pid=int(record.get("pid", 0)),
            leaseTtl=int(record.get("ttl", 0)),
            fenceAfter=float(record.get("fence_after", 0.0)),
            info=dict(record.get("info", {})),
        )
    except (ValueError, TypeError, AttributeError):
        return None


async def _nothing() -> None:
    """A coroutine that does nothing (a Deferred that has fired)."""
