# -*- test-case-name: tests.test_poolmigration,tests.test_pool_migration -*-
"""
The storage side of a guest's migration between two hosts of a pool: the
coordinator across hosts (issue 14).

The B{destination} coordinates; each host does its own part of the guest's
disks (L{xenddev.toolstack.migration.DomainStorage}) and the destination
asks the source for its part over the peer channel
(L{IPoolPeers<xenddev.interfaces.IPoolPeers>}: C{migrate.*} on the
source's daemon):

  1. B{prepare} (the guest still runs on the source): the source says
     which disks the guest has (C{migrate.describe}); the destination
     makes each one with its vdi prepared and its vbd plugged, B{not}
     activated, its claim naming the source — its pool guard records the
     migration's intent in etcd, under its own lease, where the source
     holds the target read-write (a read-only target gets a reader key of
     the destination's own: readers share). Nothing is activated and the
     backend does not connect.
  2. B{commit} = the handover (the guest suspended): the source
     deactivates each vdi (C{migrate.release}: the driver domain's
     deactivate flushes and pauses the data path); each read-write
     target's activation key moves from the source's lease to the
     destination's in one etcd transaction (L{Migrations.handover
     <xenddev.pool.migration.Migrations.handover>}), the fencing token
     growing; the destination's grants take the new token and its vdis are
     activated (the backends connect). The source then forgets the moved
     activations (C{migrate.handedOver}). Each phase's time is returned:
     the window is from the release's start to the last vdi connected.
  3. B{abort} puts everything back: after a handover the destination
     deactivates its vdis and hands each key back
     (L{Migrations.handback<xenddev.pool.migration.Migrations.handback>});
     the source takes them and activates its vdis again
     (C{migrate.reinstate}); the destination's disks are detached, their
     intents withdrawn.

A source that cannot be asked to release (its daemon died, or is cut off)
is not trusted: the handover then takes only a target nobody holds, i.e.
once the source's lease has expired — by then it has fenced itself or
died — and is refused until then (fault 12, naming it). A destination that
dies loses its intents with its lease: nothing of it can be committed.
Nothing is ever active on both hosts: the destination activates only what
it holds, the source reactivates only what it holds again.

On the source, xend's steps (L{IStorageMigration}, called from each storage
device's C{DevController.migrate}) drive the same: 0 checks that the
destination is live and can take the targets, 1 asks it to prepare, 2 to
commit, 3 finishes; C{recover} asks it to abort. Each is done once per
guest however many of its disks ask.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Sequence
from typing import Any, TypeVar

import attrs
from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from xenddev.errors import FaultCode, XenddevError
from xenddev.interfaces import IPoolPeers, IStorageMigration
from xenddev.keyedlocks import KeyedLocks
from xenddev.pool.errors import ActivationConflict
from xenddev.pool.interfaces import IMigrations
from xenddev.pool.keys import checkHostName
from xenddev.poolguard import PoolGuard
from xenddev.poolpeers import PeerFault, PeerUnavailable
from xenddev.toolstack.activation import RW
from xenddev.toolstack.manager import underlyingError
from xenddev.toolstack.migration import DomainStorage, MigratingDevice

__all__ = [
    "COMMITTED",
    "PREPARED",
    "Incoming",
    "MigrationUnavailable",
    "NotMigrating",
    "Outgoing",
    "PoolMigrations",
]

T = TypeVar("T")

PREPARED = "prepared"
COMMITTED = "committed"


class MigrationUnavailable(XenddevError):
    """This daemon cannot migrate storage: it is not in a pool that has the peer channel."""

    faultCode = FaultCode.UNSUPPORTED


class NotMigrating(XenddevError):
    """No migration of the guest is prepared on this host (never, or aborted)."""

    faultCode = FaultCode.WRONG_STATE


class AlreadyMigrating(XenddevError):
    """The guest has a migration under way already (another source, or not finished)."""

    faultCode = FaultCode.DEVICE_EXISTS


@attrs.define
class Incoming:
    """
    A guest migrating in (this host is the destination).

    @ivar sourceDomain: the guest as the source names it.
    @ivar devices: its disks as made here.
    @ivar released: whether the source said it deactivated its vdis.
    @ivar moved: the read-write targets whose keys are here now, with their tokens.
    @ivar timings: the last commit's phases (seconds).
    """

    domid: int
    source: str
    sourceDomain: int | str
    devices: list[MigratingDevice]
    since: float
    state: str = PREPARED
    released: bool = False
    moved: dict[str, int] = attrs.field(factory=dict)
    timings: dict[str, float] = attrs.field(factory=dict)

    @property
    def exclusive(self) -> list[str]:
        """The read-write targets, each once, sorted (their keys move)."""
        return sorted({d.target for d in self.devices if d.mode == RW and d.target})

    def toJSON(self) -> dict[str, Any]:
        """The migration as plain data."""
        return {
            "direction": "in",
            "domain": self.domid,
            "from": self.source,
            "source-domain": str(self.sourceDomain),
            "state": self.state,
            "released": self.released,
            "devices": [d.toJSON() for d in self.devices],
            "moved": {t: str(token) for t, token in sorted(self.moved.items())},
            "timings-ms": {k: round(v * 1000, 3) for k, v in self.timings.items()},
        }


@attrs.define
class Outgoing:
    """A guest migrating out (this host is the source)."""

    domid: int
    destination: str
    since: float
    released: bool = False

    def toJSON(self) -> dict[str, Any]:
        """The migration as plain data."""
        return {
            "direction": "out",
            "domain": self.domid,
            "to": self.destination,
            "released": self.released,
        }


@implementer(IStorageMigration)
class PoolMigrations:
    """
    The migrations of this host's guests, in and out (see the module
    docstring).

    @param host: this host's name in the pool.
    @param storage: gives this host's guests' disks (over the daemon's
        device manager, which is made after this).
    @param guard: this host's pool guard.
    @param migrations: the intents and handovers in etcd.
    @param peers: the other hosts' daemons; without them nothing migrates.
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        host: str,
        storage: Callable[[], DomainStorage],
        guard: PoolGuard,
        migrations: IMigrations,
        peers: IPoolPeers | None,
    ) -> None:
        self.reactor = reactor
        self.host = host
        self._storage = storage
        self.guard = guard
        self.migrations = migrations
        self.peers = peers
        self.incoming: dict[int, Incoming] = {}
        self.outgoing: dict[int, Outgoing] = {}
        self._locks: KeyedLocks[tuple[str, int]] = KeyedLocks()
        #: (domid, destination) -> step -> the step's one run (xend's steps;
        #: forgotten at the next step 0, a new migration)
        self._steps: dict[tuple[int, str], dict[Any, _Once]] = {}

    @property
    def storage(self) -> DomainStorage:
        """This host's guests' disks."""
        return self._storage()

    def _peers(self) -> IPoolPeers:
        if self.peers is None:
            raise MigrationUnavailable(
                "storage migration needs the pool's peer channel: set pool.advertise and "
                "pool.peer_password_file"
            )
        return self.peers

    # --- the destination -----------------------------------------------------

    def prepare(self, source: str, sourceDomain: int | str, domid: int) -> Deferred[dict[str, Any]]:
        """
        Prepare guest C{domid} here for its migration from host C{source}
        (where it is C{sourceDomain}): its disks made, prepared and
        plugged, not activated; the intents recorded. A repeated prepare
        of the same migration answers it again.
        """
        checkHostName(source)
        peers = self._peers()
        if source == self.host:
            raise AlreadyMigrating(f"host {source} is this host: a migration needs two hosts")

        async def prepare() -> dict[str, Any]:
            current = self.incoming.get(domid)
            if current is not None:
                if current.state == PREPARED and current.source == source:
                    return current.toJSON()
                if current.state != COMMITTED:
                    raise AlreadyMigrating(
                        f"guest {domid} is already migrating here from host {current.source}"
                    )
            answer = await peers.call(source, "migrate.describe", sourceDomain, self.host)
            if not isinstance(answer, list):
                raise PeerFault(source, "migrate.describe", FaultCode.GENERIC, repr(answer))
            devices = [MigratingDevice.fromJSON(d) for d in answer]
            made = await self.storage.prepareIncoming(domid, devices, source)
            incoming = Incoming(domid, source, sourceDomain, made, self.reactor.seconds())
            self.incoming[domid] = incoming
            self.log.info(
                "Migration of guest {domid} from {source}: {n} disk(s) prepared here, "
                "not active; intents for {targets}",
                domid=domid,
                source=source,
                n=len(made),
                targets=", ".join(incoming.exclusive) or "(none)",
            )
            return incoming.toJSON()

        return self._serialised("in", domid, prepare)

    def commit(self, domid: int) -> Deferred[dict[str, Any]]:
        """
        The handover of guest C{domid}'s storage to this host: the source
        deactivates, the keys move, the vdis here are activated. A repeated
        commit finishes what an earlier one left.
        """
        peers = self._peers()

        async def commit() -> dict[str, Any]:
            incoming = self._incomingOf(domid)
            if incoming.state == COMMITTED:
                return incoming.toJSON()
            clock = self.reactor
            began = clock.seconds()
            released = True
            try:
                await peers.call(
                    incoming.source, "migrate.release", incoming.sourceDomain, self.host
                )
                incoming.released = True
            except PeerUnavailable as e:
                # Not trusted: only what nobody holds (its lease expired) is taken.
                released = False
                self.log.warn(
                    "Migration of guest {domid}: the source {source} cannot be asked to "
                    "release its disks ({error}); its targets are taken only once its "
                    "lease has expired",
                    domid=domid,
                    source=incoming.source,
                    error=e,
                )
            releasedAt = clock.seconds()
            pending = [t for t in incoming.exclusive if t not in incoming.moved]
            results = await _settle(
                [self.migrations.handover(t, incoming.source, self.host, released) for t in pending]
            )
            failures, adopted = [], []
            for target, result in zip(pending, results, strict=True):
                if isinstance(result, Failure):
                    failures.append(result)
                    continue
                incoming.moved[target] = result.token
                adopted.append(self.guard.adopt(result))
            if failures:
                await _all(adopted)
                raise _first(failures)
            # The grants' records take the new tokens first: the activation
            # sends each disk's record token to its driver domain, which
            # refuses a lower one than it has served for the target.
            await _all(adopted)
            movedAt = clock.seconds()
            await self.storage.activate(domid, incoming.devices)
            done = clock.seconds()
            incoming.state = COMMITTED
            incoming.timings = {
                "release": releasedAt - began,
                "handover": movedAt - releasedAt,
                "activate": done - movedAt,
                "window": done - began,
            }
            incoming.devices = [
                attrs.evolve(d, token=incoming.moved.get(d.target or "", d.token))
                for d in incoming.devices
            ]
            self.log.info(
                "Migration of guest {domid} from {source} committed: {n} key(s) moved, "
                "window {window:.1f} ms (release {r:.1f}, handover {h:.1f}, activate {a:.1f})",
                domid=domid,
                source=incoming.source,
                n=len(incoming.moved),
                window=incoming.timings["window"] * 1000,
                r=incoming.timings["release"] * 1000,
                h=incoming.timings["handover"] * 1000,
                a=incoming.timings["activate"] * 1000,
            )
            try:
                await peers.call(
                    incoming.source, "migrate.handedOver", incoming.sourceDomain, self.host
                )
            except XenddevError as e:
                # Harmless: the source's deactivations are guarded by its
                # lease, so it can delete nothing of ours.
                self.log.info(
                    "The source {source} was not told of the handover: {error}",
                    source=incoming.source,
                    error=e,
                )
            return incoming.toJSON()

        return self._serialised("in", domid, commit)

    def abort(self, domid: int) -> Deferred[dict[str, Any]]:
        """
        Put guest C{domid}'s migration back: keys handed back to the
        source (after a handover), its vdis active again there, the disks
        here detached and the intents withdrawn.
        """
        peers = self._peers()

        async def abort() -> dict[str, Any]:
            incoming = self._incomingOf(domid)
            if incoming.moved:
                # The keys can only go back to a host in the pool.
                await peers.address(incoming.source)
                await self.storage.deactivate(domid, incoming.devices)
                for target in sorted(incoming.moved):
                    try:
                        await self.migrations.handback(target, self.host, incoming.source)
                    except BaseException:
                        # Still ours: our vdis serve again, nothing is lost.
                        await self.storage.activate(domid, incoming.devices)
                        raise
                    del incoming.moved[target]
                    await self.guard.forget(target)
            reinstated = True
            try:
                await peers.call(
                    incoming.source, "migrate.reinstate", incoming.sourceDomain, self.host
                )
            except PeerUnavailable as e:
                reinstated = False
                self.log.warn(
                    "Migration of guest {domid} aborted, but its source {source} could not "
                    "be asked to activate its disks again: {error}",
                    domid=domid,
                    source=incoming.source,
                    error=e,
                )
            await self.storage.cancel(domid, incoming.devices)
            del self.incoming[domid]
            self.log.info(
                "Migration of guest {domid} from {source} aborted",
                domid=domid,
                source=incoming.source,
            )
            return {**incoming.toJSON(), "state": "aborted", "reinstated": reinstated}

        return self._serialised("in", domid, abort)

    def finish(self, domid: int) -> Deferred[dict[str, Any]]:
        """
        Guest C{domid}'s migration here is over (committed, and the guest
        runs here): its record goes, it can no longer be aborted.
        """

        async def finish() -> dict[str, Any]:
            incoming = self._incomingOf(domid)
            if incoming.state != COMMITTED:
                raise NotMigrating(
                    f"guest {domid}'s migration from host {incoming.source} is "
                    f"{incoming.state}, not committed: commit or abort it"
                )
            del self.incoming[domid]
            return {**incoming.toJSON(), "state": "finished"}

        return self._serialised("in", domid, finish)

    def listAll(self) -> list[dict[str, Any]]:
        """The migrations of this host's guests, in then out, by guest."""
        return [self.incoming[d].toJSON() for d in sorted(self.incoming)] + [
            self.outgoing[d].toJSON() for d in sorted(self.outgoing)
        ]

    def _incomingOf(self, domid: int) -> Incoming:
        incoming = self.incoming.get(domid)
        if incoming is None:
            raise NotMigrating(f"no migration of guest {domid} is prepared on host {self.host}")
        return incoming

    # --- the source (asked by the destination) ---------------------------------

    def describe(self, domid: int, destination: str) -> Deferred[list[dict[str, Any]]]:
        """Guest C{domid}'s disks, for C{destination} to prepare."""
        checkHostName(destination)

        async def describe() -> list[dict[str, Any]]:
            devices = await self.storage.devices(domid)
            self.outgoing[domid] = Outgoing(domid, destination, self.reactor.seconds())
            return [d.toJSON() for d in devices]

        return self._serialised("out", domid, describe)

    def release(self, domid: int, destination: str) -> Deferred[dict[str, Any]]:
        """Deactivate guest C{domid}'s vdis here (the handover's first phase)."""
        checkHostName(destination)

        async def release() -> dict[str, Any]:
            devices = await self.storage.devices(domid)
            await self.storage.deactivate(domid, devices)
            out = self.outgoing.setdefault(
                domid, Outgoing(domid, destination, self.reactor.seconds())
            )
            out.released = True
            return {"domain": domid, "released": len(devices)}

        return self._serialised("out", domid, release)

    def reinstate(self, domid: int, destination: str) -> Deferred[dict[str, Any]]:
        """
        Guest C{domid} stays here (its migration aborted): each read-write
        target is taken back (refused if another host holds it) and every
        vdi activated again.
        """
        checkHostName(destination)

        async def reinstate() -> dict[str, Any]:
            devices = await self.storage.devices(domid)
            tokens = {}
            for target in sorted({d.target for d in devices if d.mode == RW and d.target}):
                tokens[target] = (await self.guard.reclaim(target)).token
            await self.storage.activate(domid, devices)
            self.outgoing.pop(domid, None)
            return {"domain": domid, "tokens": {t: str(v) for t, v in tokens.items()}}

        return self._serialised("out", domid, reinstate)

    def handedOver(self, domid: int, destination: str) -> Deferred[dict[str, Any]]:
        """Forget the activations of guest C{domid}'s targets that moved away."""
        checkHostName(destination)

        async def handedOver() -> dict[str, Any]:
            devices = await self.storage.devices(domid)
            forgotten = [
                target
                for target in sorted({d.target for d in devices if d.mode == RW and d.target})
                if await self.guard.forget(target)
            ]
            self.outgoing.pop(domid, None)
            return {"domain": domid, "forgotten": forgotten}

        return self._serialised("out", domid, handedOver)

    # --- xend's steps on the source -------------------------------------------------

    def step(
        self, domid: int, dst: str, step: int, domName: str, recover: bool = False
    ) -> Deferred[int]:
        """
        xend's step C{step} of guest C{domid}'s migration to host C{dst}
        (where it is C{domName}), or its recovery; once per guest and step.
        """
        checkHostName(dst)
        key = (domid, dst)
        if step == 0 and not recover:
            self._steps.pop(key, None)
        runs = self._steps.setdefault(key, {})
        which = ("recover", step) if recover else step
        once = runs.get(which)
        if once is None:
            once = runs[which] = _Once(
                Deferred.fromCoroutine(self._step(domid, dst, step, domName, recover))
            )
        return once.wait()

    async def _step(self, domid: int, dst: str, step: int, domName: str, recover: bool) -> int:
        peers = self._peers()
        if recover:
            try:
                await peers.call(dst, "migrate.abort", domName)
            except (PeerUnavailable, PeerFault) as e:
                # Nothing there to undo, or the destination gone: take back here what is ours.
                self.log.warn(
                    "Recovering guest {domid}'s migration to {dst}: {error}; taking its "
                    "storage back here",
                    domid=domid,
                    dst=dst,
                    error=e,
                )
                await self.reinstate(domid, dst)
            return 0
        if step == 0:
            await peers.address(dst)
            await self._checkTargets(domid, dst)
        elif step == 1:
            await peers.call(dst, "migrate.prepare", self.host, domid, domName)
        elif step == 2:
            await peers.call(dst, "migrate.commit", domName)
        else:
            await self.handedOver(domid, dst)
            try:
                await peers.call(dst, "migrate.finish", domName)
            except XenddevError as e:
                self.log.info(
                    "Destination {dst} not told the migration is over: {error}", dst=dst, error=e
                )
        return 0

    async def _checkTargets(self, domid: int, dst: str) -> None:
        """
        Every read-write target of the guest is this host's (or nobody's),
        and no other destination intends it.
        """
        devices = await self.storage.devices(domid)
        exclusive = {d.target for d in devices if d.mode == RW and d.target}
        for intent in await self.migrations.intents():
            if intent.target in exclusive and intent.destination != dst:
                raise AlreadyMigrating(
                    f"{intent.target} is being migrated to host {intent.destination}"
                )
        for target in sorted(exclusive):
            where = await self.guard.where(target)
            writer = where.get("writer")
            if writer is not None and writer.get("host") != self.host:
                raise ActivationConflict(target, writer["host"], (), int(writer.get("token", 0)))

    # --- helpers ---------------------------------------------------------------

    def _serialised(
        self, side: str, domid: int, fn: Callable[[], Coroutine[Any, Any, T]]
    ) -> Deferred[T]:
        """Run C{fn} after the other migration steps of the guest on this side."""
        return self._locks.run((side, domid), lambda: Deferred.fromCoroutine(fn()))


class _Once:
    """One run whose outcome any number of callers wait for."""

    def __init__(self, d: Deferred[int]) -> None:
        self._outcome: Any = None
        self._done = False
        self._waiters: list[Deferred[int]] = []
        d.addBoth(self._finished)

    def _finished(self, result: object) -> None:
        self._outcome, self._done = result, True
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            self._fire(w)

    def _fire(self, d: Deferred[int]) -> None:
        if isinstance(self._outcome, Failure):
            d.errback(self._outcome)
        else:
            d.callback(self._outcome)

    def wait(self) -> Deferred[int]:
        """A Deferred with the run's outcome."""
        if self._done:
            return (
                fail(self._outcome)
                if isinstance(self._outcome, Failure)
                else succeed(self._outcome)
            )
        d: Deferred[int] = Deferred()
        self._waiters.append(d)
        return d


async def _settle(ds: Sequence[Deferred[T]]) -> list[T | Failure]:
    """Wait for all; each one's result or Failure."""
    out: list[T | Failure] = []
    for d in ds:
        try:
            out.append(await d)
        except Exception:
            out.append(Failure())
    return out


async def _all(ds: Sequence[Deferred[Any]]) -> None:
    """Wait for all; then raise the first one's error, if one failed."""
    failures = [r for r in await _settle(ds) if isinstance(r, Failure)]
    if failures:
        raise _first(failures)


def _first(failures: Sequence[Failure]) -> BaseException:
    """The error of the first failure."""
    value = failures[0].value
    assert value is not None
    return underlyingError(value)
