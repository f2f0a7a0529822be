# -*- test-case-name: tests.test_driverdomain_kinds,tests.test_reconnect -*-
"""
Driver-domain restart: move every object of a dead (or retired) driver
domain to its replacement, so that the guests' frontends see only a stall.

For each vdi and vif the old driver domain had prepared, the new one
prepares it from the same target; each plugged frontend's permissions are
handed from the old driver domain to the new one (real xenstored refuses
the new agent and kernel backend the frontend otherwise); each plug is
re-plugged with C{takeover} (the frontend exists); the object is activated
if it was; then, in one transaction per frontend, C{backend}/C{backend-id}
are rewritten to the new backend, the frontend's C{state} is set back to
Initialising (the new kernel backend would otherwise map the rings the
guest granted to the dead driver domain, fail, and close), and the
toolstack's device record follows. The old driver domain's control entries
are removed last.

Linux's frontends read C{backend} only at probe and resume, so the guests
must then reconnect: L{restartDriverDomain} does the move and takes each
guest with moved frontends through a suspend and slow resume
(L{xenddev.toolstack.reconnect}). C{python -m
xenddev.toolstack.restart OLD NEW} runs it from dom0.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping
from typing import Any

import attrs
from twisted.internet.defer import Deferred, gatherResults
from twisted.logger import Logger

from xenddev.backendctrl.protocol import ACTIVE, OBJECT_CLASSES, PLUGGED, ObjectClass
from xenddev.interfaces import ITransaction, IXenStore
from xenddev.toolstack.client import (
    TRANSACT_ATTEMPTS,
    DriverDomainClient,
    ObjectInfo,
    PlugResult,
)
from xenddev.toolstack.reconnect import ResumingXenStore, reconnectGuest, suspendGuest
from xenddev.xenbus import (
    DeviceIdentity,
    XenbusPathError,
    XenbusState,
    domainPath,
    parseFrontendPath,
)
from xenddev.xenctrl import IDomainControl
from xenddev.xenstore.paths import Perm

__all__ = [
    "MovedObject",
    "RestartReport",
    "handOverPerms",
    "moveDriverDomain",
    "restartDriverDomain",
    "suspendGuestsOf",
]

log = Logger()


@attrs.frozen
class MovedObject:
    """One object moved to the new driver domain, with its new backends."""

    objectClass: str
    name: str
    active: bool
    backends: Mapping[str, str]  # plug name -> new absolute backend path
    frontends: Mapping[str, str] = attrs.field(factory=dict)  # plug name -> frontend path


def handOverPerms(perms: list[Perm], oldDomid: int, newDomid: int) -> list[Perm]:
    """
    A node's permissions with the old driver domain's grants given to the
    new one (read access if the old one had none); the owner entry stays.
    """
    owner, *grants = perms
    moved = [Perm(p.access, newDomid) if p.domid == oldDomid else p for p in grants]
    if owner.domid != newDomid and all(p.domid != newDomid for p in moved):
        moved.append(Perm("r", newDomid))
    seen: set[int] = set()
    unique = []
    for p in moved:
        if p.domid not in seen:
            seen.add(p.domid)
            unique.append(p)
    return [owner, *unique]


async def _handOverFrontend(tx: ITransaction, front: str, oldDomid: int, newDomid: int) -> None:
    """Give the frontend's subtree (the guest's nodes too) to the new driver domain."""
    if not await tx.exists(front):
        return
    pending = [front]
    while pending:
        path = pending.pop()
        perms = await tx.getPerms(path)
        wanted = handOverPerms(list(perms), oldDomid, newDomid)
        if wanted != list(perms):
            await tx.setPerms(path, wanted)
        pending += [f"{path}/{child}" for child in await tx.ls(path)]


async def _repointRecord(tx: ITransaction, result: PlugResult) -> None:
    """The toolstack's device record (C{<vm>/device/<class>/<devid>}) follows."""
    try:
        where = parseFrontendPath(result.frontendPath)
    except XenbusPathError:
        return
    vm = await tx.readOrNone(f"{domainPath(where.domid)}/vm")
    if vm is None:
        return
    record = DeviceIdentity(where.domid, where.devclass, where.devid).recordPath(vm)
    if await tx.readOrNone(f"{record}/frontend") != result.frontendPath:
        return
    await tx.write(f"{record}/backend-id", str(result.driverDomid))
    await tx.write(f"{record}/backend", result.backendPath)
    if await tx.exists(f"{record}/config/backend"):
        await tx.write(f"{record}/config/backend", str(result.driverDomid))


async def _repoint(tx: ITransaction, result: PlugResult) -> None:
    front = result.frontendPath
    if not await tx.exists(front):
        return  # the guest went away meanwhile: nothing to repoint
    await tx.write(f"{front}/backend", result.backendPath)
    await tx.write(f"{front}/backend-id", str(result.driverDomid))
    await tx.write(f"{front}/state", str(int(XenbusState.Initialising)))
    await _repointRecord(tx, result)
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
    frontends: dict[str, str] = {}
    results: list[PlugResult] = []
    for plug in info.plugs:
        if plug.state != PLUGGED or plug.frontend is None:
            continue
        front = plug.frontend
        await xs.transact(
            lambda tx, f=front: _handOverFrontend(tx, f, old.driverDomid, new.driverDomid),
            TRANSACT_ATTEMPTS,
        )
        result = await new.plug(info.name, plug.name, front, cls, takeover=True)
        backends[plug.name] = result.backendPath
        frontends[plug.name] = front
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
    return MovedObject(cls.name, info.name, info.state == ACTIVE, backends, frontends)


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


@attrs.frozen
class RestartReport:
    """
    What L{restartDriverDomain} did.

    @ivar moved: the objects moved.
    @ivar guests: each reconnected guest, with the seconds it was away.
    @ivar moveSeconds: how long the move took.
    @ivar seconds: how long it all took.
    """

    moved: tuple[MovedObject, ...]
    guests: Mapping[int, float]
    moveSeconds: float
    seconds: float


def _guestsOf(moved: list[MovedObject]) -> list[int]:
    """The guests whose frontends moved."""
    found: set[int] = set()
    for obj in moved:
        for front in obj.frontends.values():
            try:
                found.add(parseFrontendPath(front).domid)
            except XenbusPathError:
                continue
    return sorted(found)


async def restartDriverDomain(
    xs: Any,
    control: IDomainControl | None,
    oldDomid: int,
    newDomid: int,
    reactor: Any,
    timeout: float = 30.0,
    reconnectTimeout: float = 60.0,
) -> RestartReport:
    """
    The restart operation: L{moveDriverDomain}, then every guest whose
    frontends moved is suspended and resumed the slow way so that its
    frontends reconnect to the new backends (guests in parallel).

    @param xs: a privileged connection (L{IXenStore} with C{resumeDomain}).
    @param control: the hypervisor (L{xenddev.xenctrl.XenControl}) to reconnect
        each guest with moved frontends (L{reconnectGuest}: crashes Linux 6.1
        PV guests, see docs/protocol.md), or L{None}: the move only.
    @param reactor: the clock.
    @raise GuestReconnectError: a guest did not suspend (the others are
        still reconnected; the first error is raised).
    """
    started = time.monotonic()
    moved = await moveDriverDomain(xs, oldDomid, newDomid, timeout)
    moveSeconds = time.monotonic() - started
    guests = _guestsOf(moved) if control is not None else []
    resumingXs: ResumingXenStore = xs
    aways = await gatherResults(
        [
            Deferred.fromCoroutine(
                reconnectGuest(resumingXs, control, domid, reactor, reconnectTimeout)  # type: ignore[arg-type]
            )
            for domid in guests
        ],
        consumeErrors=True,
    )
    return RestartReport(
        tuple(moved),
        dict(zip(guests, aways, strict=True)),
        moveSeconds,
        time.monotonic() - started,
    )


async def suspendGuestsOf(
    xs: Any,
    control: IDomainControl,
    driverDomid: int,
    reactor: Any,
    timeout: float = 60.0,
) -> list[int]:
    """
    Suspend every guest whose frontends driver domain C{driverDomid} serves,
    before a planned restart of it: their I/O then waits, suspended, and
    L{restartDriverDomain} resumes them on the new backends. (After a
    crash a guest with I/O stuck on a dead backend cannot suspend.)

    @return: the guests suspended.
    """
    old = DriverDomainClient(xs, driverDomid)
    frontends = [
        MovedObject(
            cls.name, info.name, False, {}, {p.name: p.frontend for p in info.plugs if p.frontend}
        )
        for cls in OBJECT_CLASSES.values()
        for info in await old.list(cls)
    ]
    guests = _guestsOf(frontends)
    await gatherResults(
        [
            Deferred.fromCoroutine(suspendGuest(xs, control, domid, reactor, timeout))
            for domid in guests
        ],
        consumeErrors=True,
    )
    return guests


def main(argv: list[str] | None = None) -> None:
    """
    C{python -m xenddev.toolstack.restart [--xenstore ADDR] OLD NEW}: run
    the restart operation in dom0 and print what moved.
    """
    import argparse

    from twisted.internet import task
    from twisted.logger import globalLogBeginner, textFileLogObserver

    parser = argparse.ArgumentParser(prog="python -m xenddev.toolstack.restart")
    parser.add_argument("old", type=int, help="the dead driver domain")
    parser.add_argument("new", type=int, nargs="?", help="its replacement (its agent runs)")
    parser.add_argument(
        "--reconnect",
        action="store_true",
        help="suspend each moved guest and resume it the slow way (crashes Linux 6.1 PV guests)",
    )
    parser.add_argument(
        "--suspend",
        action="store_true",
        help="only suspend the guests OLD serves (a planned restart: before stopping OLD)",
    )
    parser.add_argument("--xenstore", default="auto", help="auto, unix:PATH or xenbus:PATH")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per request")
    parser.add_argument(
        "--reconnect-timeout", type=float, default=60.0, help="seconds for a guest to suspend"
    )
    args = parser.parse_args(argv)
    # Our report goes to stdout, the log to stderr (not redirected).
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)], redirectStandardIO=False)

    async def run(reactor: Any) -> None:
        from xenddev.xenctrl import XenControl
        from xenddev.xenstore import connectXenStore

        xs = await connectXenStore(reactor, args.xenstore)
        control = XenControl(reactor)
        if args.suspend:
            try:
                guests = await suspendGuestsOf(
                    xs, control, args.old, reactor, args.reconnect_timeout
                )
            finally:
                control.close()
            print(f"suspended guests {' '.join(map(str, guests)) or '(none)'}")
            return
        if args.new is None:
            parser.error("NEW is required (unless --suspend)")
        try:
            report = await restartDriverDomain(
                xs,
                control if args.reconnect else None,
                args.old,
                args.new,
                reactor,
                args.timeout,
                args.reconnect_timeout,
            )
        finally:
            control.close()
        for obj in report.moved:
            for plug, backend in sorted(obj.backends.items()):
                print(f"moved {obj.objectClass} {obj.name} {plug} -> {backend}")
        for domid, away in sorted(report.guests.items()):
            print(f"reconnected guest {domid} in {away:.2f}s")
        print(f"move {report.moveSeconds:.2f}s total {report.seconds:.2f}s")

    task.react(lambda reactor: Deferred.fromCoroutine(run(reactor)))


if __name__ == "__main__":
    main()
