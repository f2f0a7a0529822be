# -*- test-case-name: tests.test_objectguard,tests.test_fencing_daemon -*-
"""
The objects an operator manages through C{vdi.*} (the raw protocol over
XML-RPC) under the activation guard, as an attach's are: C{activate}
claims the object's storage target from the daemon's guard before
anything is written, with the same rules and faults (one host's: another
guest's use excludes it; a pool's: another host holds it, or this host
cannot vouch for its lease), sends the grant's fencing token with the
request, and C{deactivate} and C{unprepare} give the grant back.

Only the activation claims: C{prepare} reserves nothing (seed 000 splits
the two so that storage can be prepared before committing to use it).

The claim is the object's own (its C{t/params} in its C{t/mode}, default
C{w}, as the kinds read it), for the driver domain as its "guest": a
device's rule that a guest never conflicts with itself then means only
that two objects of one driver domain do not exclude each other. Its
grant is kept in the toolstack's record of the object
(L{objectRecord<xenddev.toolstack.activation.objectRecord>}, under
C{/tool/xenddev/objects}), so a restarted daemon's guard holds it again
(L{recordedGrants<xenddev.toolstack.activation.recordedGrants>}) and a
deactivate gives back exactly what was granted. An object that is not
inactive (active, pending, not prepared) claims nothing: the driver
domain's precondition refuses it with its usual fault. A device's object
(C{vbd-5-51728}) is the device's: activating it here claims anew, and is
refused while the device holds its target read-write.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TypeVar

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from xenddev.backendctrl.protocol import INACTIVE, VDI, ObjectClass
from xenddev.interfaces import IActivationGuard, ITransaction, IXenStore
from xenddev.keyedlocks import KeyedLocks
from xenddev.toolstack.activation import (
    MODES,
    OBJECT_RECORDS,
    RW,
    Claim,
    Grant,
    objectRecord,
    readGrant,
    writeGrant,
)
from xenddev.toolstack.client import TRANSACT_ATTEMPTS, DriverDomainClient

__all__ = ["GuardedObjects", "objectClaim"]

T = TypeVar("T")


def objectClaim(
    driverDomid: int, objectClass: ObjectClass, name: str, target: Mapping[str, str]
) -> Claim | None:
    """
    What activating an object claims: its C{params} in its C{mode} (C{r},
    C{w}, C{w!}; absent C{w}, as the kinds default; unknown: read-write,
    the strictest), for its driver domain; None for a vif or an empty
    drive.
    """
    path = target.get("params")
    if objectClass is not VDI or not path or target.get("type") == "empty":
        return None
    return Claim(
        path,
        MODES.get(target.get("mode", "w"), RW),
        driverDomid,
        objectRecord(driverDomid, objectClass.name, name),
        f"{objectClass.name} {name}",
        driverDomid,
    )


class GuardedObjects:
    """
    C{vdi.activate}, C{deactivate} and C{unprepare} under the guard (see
    the module docstring). Operations on one object are serialised here,
    from the claim to the record, so two activates of it cannot both claim.

    @param xs: the toolstack's connection (its records).
    @param guard: the daemon's activation guard; None: nothing is claimed,
        the requests go straight to the driver domain.
    """

    log = Logger()

    def __init__(
        self,
        xs: IXenStore,
        guard: IActivationGuard | None,
        transactAttempts: int = TRANSACT_ATTEMPTS,
    ) -> None:
        self.xs = xs
        self.guard = guard
        self.transactAttempts = transactAttempts
        self._locks: KeyedLocks[str] = KeyedLocks()

    def activate(
        self, client: DriverDomainClient, name: str, objectClass: ObjectClass = VDI
    ) -> Deferred[None]:
        """
        Claim the object's target (refused: L{ActivationConflict
        <xenddev.pool.errors.ActivationConflict>} fault 12, or fault 16,
        nothing written), record the grant, activate with its token; a
        failed activate removes the record and gives the grant back.
        """
        if self.guard is None:
            return client.activate(name, objectClass)
        record = objectRecord(client.driverDomid, objectClass.name, name)
        return self._serialised(
            record, lambda: Deferred.fromCoroutine(self._activate(client, name, objectClass))
        )

    def deactivate(
        self, client: DriverDomainClient, name: str, objectClass: ObjectClass = VDI
    ) -> Deferred[None]:
        """Deactivate the object; once it is inactive, give its grant back."""
        return self._thenGiveBack(client, name, objectClass, client.deactivate)

    def unprepare(
        self, client: DriverDomainClient, name: str, objectClass: ObjectClass = VDI
    ) -> Deferred[None]:
        """Unprepare the object (deactivating it first); then give its grant back."""
        return self._thenGiveBack(client, name, objectClass, client.unprepare)

    async def _activate(self, client: DriverDomainClient, name: str, cls: ObjectClass) -> None:
        guard = self.guard
        assert guard is not None
        info = await client.describe(name, cls)
        claim = None
        if info.state == INACTIVE and info.request is None:
            claim = objectClaim(client.driverDomid, cls, name, info.target)
        grant: Grant | None = None
        if claim is not None:
            granted: Grant = await guard.acquire(claim)  # refused: nothing written
            try:
                await self.xs.transact(lambda tx: writeGrant(tx, granted), self.transactAttempts)
            except BaseException:
                await guard.release(granted)
                raise
            grant = granted
        try:
            await client.activate(name, cls, token=grant.token if grant is not None else 0)
        except BaseException:
            if grant is not None:
                await self._removeRecord(grant.record)
                await guard.release(grant)
            raise

    def _thenGiveBack(
        self,
        client: DriverDomainClient,
        name: str,
        cls: ObjectClass,
        request: Callable[[str, ObjectClass], Deferred[None]],
    ) -> Deferred[None]:
        if self.guard is None:
            return request(name, cls)
        record = objectRecord(client.driverDomid, cls.name, name)

        async def run() -> None:
            await request(name, cls)
            grant = await readGrant(self.xs, record, client.driverDomid)
            if grant is not None:
                await self._removeRecord(record)
                assert self.guard is not None
                await self.guard.release(grant)

        return self._serialised(record, lambda: Deferred.fromCoroutine(run()))

    def _removeRecord(self, record: str) -> Deferred[None]:
        """Remove an object's record and its parents left empty, up to C{/tool}."""
        return self.xs.transact(lambda tx: _rmPruned(tx, record), self.transactAttempts)

    def _serialised(self, key: str, fn: Callable[[], Deferred[T]]) -> Deferred[T]:
        """Run C{fn} after the operations on the same object."""
        return self._locks.run(key, fn)


async def _rmPruned(tx: ITransaction, record: str) -> None:
    """C{record}, then each parent up to C{/tool/xenddev} left empty."""
    await tx.rm(record, missingOk=True)
    parent = record.rsplit("/", 1)[0]
    stop = OBJECT_RECORDS.rsplit("/", 1)[0]  # /tool/xenddev goes too; /tool stays
    while parent == stop or parent.startswith(stop + "/"):
        if await tx.ls(parent, missingOk=True):
            break
        await tx.rm(parent, missingOk=True)
        parent = parent.rsplit("/", 1)[0]
