# -*- test-case-name: tests.test_driverdomain_restart -*-
"""
Driver-domain restart: move every object of a dead (or retired) driver
domain to its replacement, so that the guests' frontends see only a stall.

For each vdi and vif the old driver domain had prepared, the new one
prepares it from the same target, re-plugs each plugged vbd with
C{takeover} (the frontend exists), activates it if it was active, and then
the frontend's C{backend}/C{backend-id} are rewritten to the new backend in
one transaction. The old driver domain's control entries are removed last.
"""

from __future__ import annotations

from collections.abc import Mapping

import attrs
from twisted.internet.defer import Deferred, gatherResults
from twisted.logger import Logger

from xenddev.driverdomain.client import DriverDomainClient, ObjectInfo, PlugResult
from xenddev.driverdomain.protocol import ACTIVE, OBJECT_CLASSES, PLUGGED, ObjectClass
from xenddev.interfaces import ITransaction, IXenStore

log = Logger()


@attrs.frozen
class MovedObject:
    """One object moved to the new driver domain, with its new backends."""

    objectClass: str
    name: str
    active: bool
    backends: Mapping[str, str]  # plug name -> new absolute backend path


async def _repoint(tx: ITransaction, result: PlugResult) -> None:
    front = result.frontendPath
    if not await tx.exists(front):
        return  # the guest went away meanwhile: nothing to repoint
    await tx.write(f"{front}/backend", result.backendPath)
    await tx.write(f"{front}/backend-id", str(result.driverDomid))
    if not await tx.exists(result.backendPath):
        await tx.mkdir(result.backendPath)
    for key, value in result.bcopy.items():
        await tx.write(f"{result.backendPath}/{key}", value)
    if await tx.readOrNone(f"{result.backendPath}/frontend") is None:
        await tx.write(f"{result.backendPath}/frontend", front)


async def _moveObject(
    cls: ObjectClass, info: ObjectInfo, old: DriverDomainClient, new: DriverDomainClient
) -> MovedObject:
    xs = new.xs
    await new.prepare(info.name, info.target, cls)
    backends: dict[str, str] = {}
    results: list[PlugResult] = []
    for plug in info.plugs:
        if plug.state != PLUGGED or plug.frontend is None:
            continue
        result = await new.plug(info.name, plug.name, plug.frontend, cls, takeover=True)
        backends[plug.name] = result.backendPath
        results.append(result)
    if info.state == ACTIVE:
        # Activate before repointing, so that a frontend following the new
        # path finds a backend whose hotplug script is already running.
        await new.activate(info.name, cls)
    for result in results:
        await xs.transact(lambda tx, r=result: _repoint(tx, r))
    await xs.rm(old.paths(info.name, cls).base, missingOk=True)
    log.info(
        "Moved {cls} {name} from driver domain {old} to {new}",
        cls=cls.name,
        name=info.name,
        old=old.driverDomid,
        new=new.driverDomid,
    )
    return MovedObject(cls.name, info.name, info.state == ACTIVE, backends)


def moveDriverDomain(
    xs: IXenStore, oldDomid: int, newDomid: int, timeout: float = 30.0
) -> Deferred[list[MovedObject]]:
    """
    Move every prepared vdi and vif from driver domain C{oldDomid} (whose
    agent is gone) to C{newDomid} (whose agent runs). Objects are moved in
    parallel; the result lists them.
    """
    old = DriverDomainClient(xs, oldDomid, timeout)
    new = DriverDomainClient(xs, newDomid, timeout)

    async def run() -> list[MovedObject]:
        jobs = []
        for cls in OBJECT_CLASSES.values():
            for info in await old.list(cls):
                if info.state is None:
                    continue  # never prepared: nothing to move
                jobs.append(Deferred.fromCoroutine(_moveObject(cls, info, old, new)))
        return list(await gatherResults(jobs, consumeErrors=True))

    return Deferred.fromCoroutine(run())
