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
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import attrs
from twisted.internet.defer import Deferred, DeferredLock
from twisted.logger import Logger
from zope.interface import implementer

from xenddev.interfaces import IActivationGuard
from xenddev.localguard import LocalGuard
from xenddev.pool.activation import Activation
from xenddev.pool.errors import ActivationConflict
from xenddev.pool.interfaces import IActivations, IHostSession
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
    """

    log = Logger()

    def __init__(self, local: LocalGuard, activations: IActivations, session: IHostSession) -> None:
        self.local = local
        self._activations = activations
        self._session = session
        #: target -> this host's activation of it in etcd
        self._held: dict[str, Activation] = {}
        self._locks: dict[str, DeferredLock] = {}

    @property
    def held(self) -> dict[str, Activation]:
        """This host's activations in etcd, by target."""
        return dict(self._held)

    def acquire(self, claim: Claim) -> Deferred[Grant]:
        """This host's rule, then the pool's; the grant carries the fencing token."""

        async def acquire() -> Grant:
            self._session.checkLive()
            grant = await self.local.acquire(claim)
            if grant.mode == SHARED:
                return grant
            try:
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
            return [
                {
                    **h.toJSON(),
                    "state": self._session.state if h.name == me else "live",
                    "self": h.name == me,
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

    def lost(self, keys: frozenset[bytes]) -> None:
        """
        The session's lease expired with C{keys}: forget the activations
        among them and say which devices stay paused (a session C{onLost}
        callback).
        """
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

    async def _giveBack(self, target: str) -> None:
        """Deactivate C{target} in etcd if no guest here uses it any more."""
        if any(g.mode != SHARED for g in self.local.grants(target)):
            return
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
        lock = self._locks.get(target)
        if lock is None:
            lock = self._locks[target] = DeferredLock()

        def done(result: object) -> object:
            if not lock.locked and not lock.waiting:
                self._locks.pop(target, None)
            return result

        d: Deferred[T] = lock.run(fn)
        return d.addBoth(done)
