# -*- test-case-name: tests.test_poolguard -*-
"""
A pool's activation guard (L{IActivationGuard}): one host's rule (the
L{LocalGuard}: two guests of this host) and the pool's
(L{Activations<xenddev.pool.activation.Activations>}: two hosts, in etcd)
in one.

A host takes a target in etcd once for all its guests that use it —
read-write while one of them writes, else read-only — and gives it back
when the last of them detaches. The activation's mod revision, the
fencing token, is the token of each of their grants, kept in their
device records. A claim is refused before anything is written: by the
local rule (L{LocalActivationConflict}), by etcd (L{ActivationConflict}
naming the other host and its token), or because this host cannot vouch
for its lease now (L{SessionNotLive}, fault 16: fenced or rejoining;
L{EtcdUnavailable}, fault 16, when no member answers).

Shared write (C{w!}, the explicit override) takes no key in etcd: the
check is waived pool-wide as it is on one host. A target this host holds
read-only does not become read-write while a guest here still reads it
(etcd refuses: this host is among its readers); one held read-write stays
so until its last user detaches.

At start (L{start}) the targets of the devices found in the records are
taken again under the new session (a new lease, a new token, written back
to the records); one another host took meanwhile is logged as such. When
the session loses its lease (L{lost}), its activations are gone: they are
forgotten here and logged with their devices, which the fence paused and
which are not resumed (another host may hold their targets now).

Migration (L{xenddev.poolmigration}): a claim for a guest migrating in
(C{Claim.migratingFrom}: the source host) is granted, read-write, while the
target's writer is that source (or nobody): the host records its intent
(L{Migrations.intend<xenddev.pool.migration.Migrations.intend>}, under its
lease) instead of taking the key, and the grant's token is 0 until the
handover moves the key here (L{adopt}: the grants and their records get
the new token). A detach before it withdraws the intent. On the source,
L{forget} drops an activation moved away, L{reclaim} takes one handed back.
A read-only claim is an ordinary one: readers share.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import attrs
from twisted.internet.defer import Deferred, gatherResults
from twisted.logger import Logger
from zope.interface import implementer

from xenddev.interfaces import IActivationGuard
from xenddev.keyedlocks import KeyedLocks
from xenddev.localguard import LocalGuard
from xenddev.pool.activation import Activation
from xenddev.pool.errors import ActivationConflict
from xenddev.pool.interfaces import IActivations, IHostSession, IMigrations
from xenddev.pool.keys import migrationKey
from xenddev.pool.migration import Intent
from xenddev.toolstack.activation import RO, RW, SHARED, Claim, Grant, Mode, activationPath

__all__ = ["PoolGuard"]

T = TypeVar("T")


@implementer(IActivationGuard)
class PoolGuard:
    """
    The activation guard of a host in a pool (see the module docstring).

    @param local: this host's guard (its grants are this host's devices).
    @param activations: the pool's activations under this host's session.
    @param session: this host's session (live or not, its hosts).
    @param published: fires with the devices each host published, by
        host (L{xenddev.pool.devices.readPoolDevices}).
    @param migrations: the migrations' intents and handovers (without it a
        claim for a guest migrating in is refused).
    """

    log = Logger()

    def __init__(
        self,
        local: LocalGuard,
        activations: IActivations,
        session: IHostSession,
        migrations: IMigrations | None = None,
        published: Callable[[], Deferred[dict[str, list[dict[str, Any]]]]] | None = None,
    ) -> None:
        self.local = local
        self._activations = activations
        self._session = session
        self._migrations = migrations
        self._published = published
        #: target -> this host's activation of it in etcd
        self._held: dict[str, Activation] = {}
        #: target -> this host's intent to take it (a guest migrating in)
        self._incoming: dict[str, Intent] = {}
        self._locks: KeyedLocks[str] = KeyedLocks()

    @property
    def held(self) -> dict[str, Activation]:
        """This host's activations in etcd, by target."""
        return dict(self._held)

    @property
    def incoming(self) -> dict[str, Intent]:
        """This host's migration intents, by target."""
        return dict(self._incoming)

    def acquire(self, claim: Claim) -> Deferred[Grant]:
        """This host's rule, then the pool's; the grant carries the fencing token."""

        async def acquire() -> Grant:
            self._session.checkLive()
            grant = await self.local.acquire(claim)
            if grant.mode == SHARED:
                return grant
            try:
                if claim.migratingFrom is not None and grant.mode == RW:
                    source = claim.migratingFrom
                    await self._serialised(
                        grant.target, lambda: self._intend(grant.target, source, claim.domid)
                    )
                    return grant  # token 0: the key is the source's until the handover
                taken = await self._serialised(
                    grant.target, lambda: self._take(grant.target, grant.mode)
                )
            except BaseException:
                await self.local.release(grant)
                raise
            grant = attrs.evolve(grant, token=taken.token)
            self.local.hold(grant)
            return grant

        return Deferred.fromCoroutine(acquire())

    def release(self, grant: Grant) -> Deferred[None]:
        """Forget the device's grant; give the target back once no guest here uses it."""

        async def release() -> None:
            await self.local.release(grant)
            if grant.mode != SHARED:
                await self._serialised(grant.target, lambda: self._giveBack(grant.target))

        return Deferred.fromCoroutine(release())

    def where(self, target: str) -> Deferred[dict[str, Any]]:
        """The pool's holders of C{target} (one read of etcd) and this host's devices."""

        async def where() -> dict[str, Any]:
            identity = self.local.identify(target)
            holders = await self._activations.where(identity)
            return {**holders.toJSON(), "devices": self.local.devices(identity)}

        return Deferred.fromCoroutine(where())

    def hosts(self) -> Deferred[list[dict[str, Any]]]:
        """Every host of the pool, with its lease's remaining TTL; this one with its state."""

        async def hosts() -> list[dict[str, Any]]:
            me = self._session.host
            devices = await self._published() if self._published is not None else {}
            return [
                {
                    **h.toJSON(),
                    "state": self._session.state if h.name == me else "live",
                    "self": h.name == me,
                    # None: the host has published none (yet).
                    "devices": devices.get(h.name),
                }
                for h in await self._session.hosts()
            ]

        return Deferred.fromCoroutine(hosts())

    def start(self) -> Deferred[int]:
        """
        This host's guard reads the records (L{LocalGuard.start}); then
        their targets are taken again under this session; fires with how
        many were. One held by another host now is logged, not raised: its
        devices are there, unprotected, until detached.
        """

        async def start() -> int:
            await self.local.start()
            taken = 0
            for target in sorted({g.target for g in self.local.grants() if g.mode != SHARED}):
                try:
                    activation = await self._take(target, self._needed(target))
                except ActivationConflict as e:
                    self.log.error(
                        "Pool activation of {target} could not be taken back: {error}; "
                        "its devices here ({devices}) are not protected — detach them",
                        target=target,
                        error=e,
                        devices=self._devices(target),
                    )
                    continue
                taken += 1
                for grant in self.local.grants(target):
                    if grant.mode != SHARED:
                        self.local.hold(attrs.evolve(grant, token=activation.token))
                        # The device's record keeps the token it runs under.
                        await self.local.xs.write(
                            f"{activationPath(grant.record)}/token", str(activation.token)
                        )
            self.log.info("Pool: {n} target(s) of this host's devices taken again", n=taken)
            return taken

        return Deferred.fromCoroutine(start())

    def adopt(self, activation: Activation) -> Deferred[None]:
        """
        C{activation} is this host's now (moved here by a handover, or
        handed back): the intent is done, the devices' grants of its target
        carry its token, in memory and in their records.
        """

        async def adopt() -> None:
            target = activation.target
            self._incoming.pop(target, None)
            self._held[target] = activation
            grants = [g for g in self.local.grants(target) if g.mode != SHARED]
            for grant in grants:
                self.local.hold(attrs.evolve(grant, token=activation.token))
            await gatherResults(
                [
                    self.local.xs.write(f"{activationPath(g.record)}/token", str(activation.token))
                    for g in grants
                ],
                consumeErrors=True,
            )

        return Deferred.fromCoroutine(adopt())

    def reclaim(self, target: str) -> Deferred[Activation]:
        """
        Take back C{target}, handed back to this host by an aborted
        migration's destination (its key under our lease again), and adopt
        it; L{ActivationConflict} if another host holds it.
        """

        async def reclaim() -> Activation:
            activation = await self._activations.activate(target, "rw")
            await self.adopt(activation)
            return activation

        return Deferred.fromCoroutine(reclaim())

    def forget(self, target: str) -> Deferred[bool]:
        """
        Drop this host's activation of C{target} if its key is no longer
        under our lease (a handover moved it away): our devices of it keep
        their grants, but a detach gives nothing back to etcd. Fires with
        whether it was dropped.
        """

        async def forget() -> bool:
            held = self._held.get(target)
            if held is None:
                return False
            writer = (await self._activations.where(target)).writer
            if writer is not None and writer.lease == held.lease:
                return False  # still ours
            del self._held[target]
            self._session.release(held.key)
            self.log.info(
                "Pool activation of {target} moved to {host}: forgotten here",
                target=target,
                host=writer.host if writer is not None else "(nobody)",
            )
            return True

        return Deferred.fromCoroutine(forget())

    def lost(self, keys: frozenset[bytes]) -> None:
        """
        The session's lease expired with C{keys}: forget the activations
        among them and say which devices stay paused (a session C{onLost}
        callback).
        """
        for target in [t for t in self._incoming if migrationKey(t) in keys]:
            del self._incoming[target]
            self.log.error(
                "The migration intent of {target} was lost with the lease: the migration "
                "cannot be committed; abort it",
                target=target,
            )
        for target, activation in sorted(self._held.items()):
            if activation.key not in keys:
                continue
            del self._held[target]
            self.log.error(
                "The pool activation of {target} (token {token}) was lost with the lease: "
                "its devices here ({devices}) stay paused and are not resumed (another host "
                "may hold it now); detach them",
                target=target,
                token=activation.token,
                devices=self._devices(target),
            )

    # --- this host's activation of a target ------------------------------

    def _needed(self, target: str) -> Mode:
        """The mode this host's guests need of C{target} in the pool."""
        return RW if any(g.mode == RW for g in self.local.grants(target)) else RO

    async def _take(self, target: str, mode: Mode) -> Activation:
        """This host's activation of C{target} in C{mode} or better, taken if not held."""
        held = self._held.get(target)
        if held is not None and (held.mode == RW or mode == RO):
            return held
        activation = await self._activations.activate(target, "rw" if mode == RW else "ro")
        self._held[target] = activation
        return activation

    async def _intend(self, target: str, source: str, domid: int) -> None:
        """Record this host's intent to take C{target} from C{source} (a guest migrating in)."""
        if self._migrations is None:
            raise ActivationConflict(target, source, (), 0)
        # The intent names the guest as people do (its id where it has no name).
        name = await self.local.xs.readOrNone(f"/local/domain/{domid}/name")
        self._incoming[target] = await self._migrations.intend(target, source, name or str(domid))

    async def _giveBack(self, target: str) -> None:
        """Deactivate C{target} in etcd if no guest here uses it any more."""
        if any(g.mode != SHARED for g in self.local.grants(target)):
            return
        if self._incoming.pop(target, None) is not None and self._migrations is not None:
            # A migration that did not happen: its intent goes.
            try:
                await self._migrations.withdraw(target)
            except Exception as e:
                self.log.warn(
                    "Could not withdraw the migration intent of {target}: {error}; it goes "
                    "with this host's lease",
                    target=target,
                    error=e,
                )
        if self._held.pop(target, None) is None:
            return
        try:
            await self._activations.deactivate(target)
        except Exception as e:
            # Still under our lease: harmless to this host (taking it again
            # finds it ours), and it goes with the lease at the latest.
            self.log.warn(
                "Could not give {target} back to the pool: {error}; its key stays "
                "under this host's lease",
                target=target,
                error=e,
            )

    def _devices(self, target: str) -> str:
        """This host's devices holding C{target}, for a log line."""
        return ", ".join(f"domain {g.domid} {g.device}" for g in self.local.grants(target))

    def _serialised(self, target: str, fn: Callable[[], Coroutine[Any, Any, T]]) -> Deferred[T]:
        """Run C{fn} after the others on C{target} (take and give back never interleave)."""
        return self._locks.run(target, fn)
