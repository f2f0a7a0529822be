# -*- test-case-name: tests.test_localguard -*-
"""
What an attach asks of the activation guard (L{IActivationGuard
<xenddev.interfaces.IActivationGuard>}), and what the device's record
keeps of the answer.

Seed 000: "no two vdis for the same target will simultaneously be
active". Before anything of an attach is written, the controller states a
L{Claim}: the path the driver domain will serve, how (L{RW}, L{RO}, or
L{SHARED} — xend's C{w!}, writable and exempt from the check), for which
guest and device. The daemon's guard (one host, or a pool over etcd)
refuses it, naming who holds the target, or answers a L{Grant}: the
target's normalised identity and the fencing token (0 without a pool).

The grant is written into the device's record in the transaction that
reserves it (C{<record>/activation/{target,mode,token,device}}), so the guard can
be rebuilt from XenStore after a restart, a detach (or a rollback) gives
back exactly what was granted, and the token stays with the device.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Literal

import attrs
from twisted.internet.defer import Deferred, gatherResults

from xenddev.interfaces import ITransaction, IXenStoreOps

__all__ = [
    "GRANT_NODES",
    "MODES",
    "OBJECT_RECORDS",
    "RO",
    "RW",
    "SHARED",
    "Claim",
    "Grant",
    "Mode",
    "activationPath",
    "deviceRecords",
    "grantFrom",
    "hostDevices",
    "objectRecord",
    "readGrant",
    "recordedGrants",
    "writeGrant",
]

Mode = Literal["rw", "ro", "w!"]

#: Exclusive: no other guest may use the target at all.
RW: Mode = "rw"
#: Shared with other readers; refused while another guest writes.
RO: Mode = "ro"
#: xend's C{w!}: writable, and the explicit override of the check (the
#: target is meant to be shared, a cluster file system on it).
SHARED: Mode = "w!"

#: A disk's access (C{r}, C{w}, C{w!}) -> its claim's mode.
MODES: dict[str, Mode] = {"r": RO, "w": RW, "w!": SHARED}

#: The nodes of a grant under C{<record>/activation}, in L{grantFrom}'s order.
GRANT_NODES = ("target", "mode", "token", "device")


@attrs.frozen
class Claim:
    """
    What an attach asks for, before anything is written.

    @ivar path: the target as the driver domain is told it (a disk's
        C{params}: a file or block device path).
    @ivar backendDomid: the driver domain that will serve it (a path is
        looked at on this host only when the driver domain is dom0).
    @ivar device: how messages name the device (C{vbd 51728 (xvdb)}).
    @ivar migratingFrom: for a guest migrating in, the host it comes from:
        the device is prepared but not activated, and the claim is granted
        while that host still holds the target (it hands it over at the
        migration's commit).
    """

    path: str
    mode: Mode
    domid: int
    record: str
    device: str
    backendDomid: int = 0
    migratingFrom: str | None = None


@attrs.frozen
class Grant:
    """
    A claim the guard granted.

    @ivar target: the normalised identity (C{file:<real path>},
        C{dev:<major>:<minor>}).
    @ivar token: the fencing token (the etcd revision of the pool's
        activation; 0 without a pool, or for L{SHARED}).
    """

    target: str
    mode: Mode
    domid: int
    record: str
    device: str
    token: int = 0


#: The toolstack's records of the objects an operator activates through
#: C{vdi.*} (no guest, no device of ours):
#: C{<OBJECT_RECORDS>/<dd>/<class>/<name>}, each keeping its grant as a
#: device's record does (L{xenddev.toolstack.objectguard}).
OBJECT_RECORDS = "/tool/xenddev/objects"


def objectRecord(driverDomid: int, objectClass: str, name: str) -> str:
    """The record of object C{name} of C{objectClass} in driver domain C{driverDomid}."""
    return f"{OBJECT_RECORDS}/{int(driverDomid)}/{objectClass}/{name}"


def activationPath(record: str) -> str:
    """Where a device's record keeps its grant: C{<record>/activation}."""
    return f"{record}/activation"


async def writeGrant(tx: ITransaction, grant: Grant) -> None:
    """Write C{grant} into its record (inside the reserving transaction)."""
    base = activationPath(grant.record)
    # Sent together: one round trip's wait for the three writes.
    await gatherResults(
        [
            tx.write(f"{base}/target", grant.target),
            tx.write(f"{base}/mode", grant.mode),
            tx.write(f"{base}/token", str(grant.token)),
            tx.write(f"{base}/device", grant.device),
        ],
        consumeErrors=True,
    )


async def readGrant(xs: IXenStoreOps, record: str, domid: int) -> Grant | None:
    """
    The grant a device's record holds, or None (no record, a device that
    claims nothing, or a record an older xenddev wrote).
    """
    base = activationPath(record)
    values = await gatherResults(
        [xs.readOrNone(f"{base}/{key}") for key in GRANT_NODES], consumeErrors=True
    )
    return grantFrom(values, domid, record)


def grantFrom(values: Sequence[str | None], domid: int, record: str) -> Grant | None:
    """
    A grant from the values of its record's L{GRANT_NODES}, in that order
    (None if they do not make one).
    """
    target, mode, token, device = values
    if target is None or mode not in (RW, RO, SHARED):
        return None
    number = int(token) if token is not None and token.isascii() and token.isdigit() else 0
    label = device or record.rsplit("/", 1)[-1]
    return Grant(target, mode, domid, record, label, number)


async def deviceRecords(xs: IXenStoreOps) -> tuple[list[str], list[tuple[int, str, str, str]]]:
    """
    The toolstack's device records: the domains that exist (their names
    under C{/local/domain}), and for every guest with a C{/vm} record each
    device's C{(domid, class, devid, record path)}.
    """
    names = [n for n in await xs.ls("/local/domain", missingOk=True) if n.isascii() and n.isdigit()]
    vms = await gatherResults(
        [xs.readOrNone(f"/local/domain/{n}/vm") for n in names], consumeErrors=True
    )
    records: list[tuple[int, str, str, str]] = []
    for name, vm in zip(names, vms, strict=True):
        if vm is None:
            continue
        for devclass in sorted(await xs.ls(f"{vm}/device", missingOk=True)):
            root = f"{vm}/device/{devclass}"
            for devid in sorted(await xs.ls(root, missingOk=True)):
                records.append((int(name), devclass, devid, f"{root}/{devid}"))
    return names, records


async def hostDevices(xs: IXenStoreOps, grants: Iterable[Grant] = ()) -> list[dict[str, Any]]:
    """
    This host's guests' devices from the toolstack's records
    (C{<vm>/device/<class>/<devid>}), each with its grant's target, mode
    and token if it holds one (C{grants}: the activation guard's, by record).
    """
    byRecord = {g.record: g for g in grants}
    _, records = await deviceRecords(xs)
    found: list[dict[str, Any]] = []
    for domid, devclass, devid, record in records:
        entry: dict[str, Any] = {"domain": domid, "class": devclass, "devid": devid}
        grant = byRecord.get(record)
        if grant is not None:
            entry.update(target=grant.target, mode=grant.mode, token=grant.token)
        found.append(entry)
    return found


async def recordedGrants(xs: IXenStoreOps) -> list[Grant]:
    """
    Every grant the toolstack's records hold: the devices of every guest
    with a C{/vm} record (C{<vm>/device/<class>/<devid>/activation}), and
    the objects activated through C{vdi.*} in driver domains that exist
    (L{objectRecord}; their domid is the driver domain's).
    """
    names, records = await deviceRecords(xs)
    grants: list[Grant | None] = await gatherResults(
        [Deferred.fromCoroutine(readGrant(xs, r, domid)) for domid, _, _, r in records],
        consumeErrors=True,
    )
    found: list[Grant] = [g for g in grants if g is not None]
    live = set(names)
    for dd in await xs.ls(OBJECT_RECORDS, missingOk=True):
        if dd not in live:
            continue  # gone with its driver domain
        for cls in await xs.ls(f"{OBJECT_RECORDS}/{dd}", missingOk=True):
            root = f"{OBJECT_RECORDS}/{dd}/{cls}"
            for name in await xs.ls(root, missingOk=True):
                used = Deferred.fromCoroutine(_objectInUse(xs, int(dd), cls, name))
                grant = await readGrant(xs, f"{root}/{name}", int(dd))
                # A record whose object is gone (a reused domid) holds nothing.
                if await used and grant is not None:
                    found.append(grant)
    return found


async def _objectInUse(xs: IXenStoreOps, driverDomid: int, objectClass: str, name: str) -> bool:
    """Whether the object is active, or has a request pending (an activate, maybe)."""
    base = f"/local/domain/{driverDomid}/backendctrl/{objectClass}/{name}"
    state, request = await gatherResults(
        [xs.readOrNone(f"{base}/state"), xs.readOrNone(f"{base}/request")], consumeErrors=True
    )
    return state == "active" or request is not None
