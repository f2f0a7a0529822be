# -*- test-case-name: tests.test_datapath -*-
"""
The data-path registry (seed 002): every process serving a VDI, recorded
in XenStore so the storage control path can find and signal it later (for
instance around a coalesce of a parent image shared by several VDIs).

Each driver-domain kind records its data path when it activates a VDI and
removes the record when it deactivates it, in the request's completion
transaction (so the record exists exactly while the VDI is active)::

  /local/domain/<dd>/private/xenddev/datapath/<vdi>/
      kind        "qemu" | "tap" | ...
      host        the host name of the driver domain
      pid         the serving process
      minor       the tapdisk minor (tap kinds)
      qmp         the QMP control socket (qemu kinds; not the kind's own)
      image       the image served (top of the chain)
      format      its format
      chain/<i>   the backing chain, 0 = the image itself, last = the base
      x/<key>     kind-specific values (qemu: export, export-id, node, nbd,
                  writable)

The records live with the driver domain's private records; the toolstack
(dom0) reads every driver domain's registry with L{scanRegistry} — which is
all the "rebuild after a restart" there is: XenStore is the registry.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from typing import Any

import attrs
from twisted.internet.defer import gatherResults

from xenddev.backendctrl.protocol import privateDir


def registryDir(driverDomid: int) -> str:
    """C{/local/domain/<dd>/private/xenddev/datapath}."""
    return f"{privateDir(driverDomid)}/datapath"


def recordPath(driverDomid: int, vdi: str) -> str:
    """The record of one VDI's data path."""
    return f"{registryDir(driverDomid)}/{vdi}"


def holdDir(driverDomid: int) -> str:
    """C{/local/domain/<dd>/private/xenddev/quiesced}: data paths a quiesce holds."""
    return f"{privateDir(driverDomid)}/quiesced"


def holdPath(driverDomid: int, vdi: str) -> str:
    """
    The hold of one VDI's data path: present (the quiesced target) while a
    quiesce has it paused, so that nothing else unpauses it meanwhile (a
    domain unpause reactivating its tapdisks during a coalesce).
    """
    return f"{holdDir(driverDomid)}/{vdi}"


def thisHost() -> str:
    """The host name recorded by default."""
    return socket.gethostname()


@attrs.frozen
class DataPath:
    """
    One registered data path.

    @ivar chain: the image and its backing chain, top first.
    @ivar extra: kind-specific values (C{x/*}).
    """

    driverDomid: int
    vdi: str
    kind: str
    host: str
    image: str
    format: str
    chain: tuple[str, ...] = ()
    pid: int | None = None
    minor: int | None = None
    qmp: str | None = None
    extra: Mapping[str, str] = attrs.field(factory=dict)

    @property
    def path(self) -> str:
        """Its record's XenStore path."""
        return recordPath(self.driverDomid, self.vdi)

    @property
    def images(self) -> tuple[str, ...]:
        """Every image this data path reads: the chain, or just the image."""
        return self.chain or (self.image,)

    def uses(self, image: str) -> bool:
        """Whether C{image} is the image served or any image of its chain."""
        want = _canonical(image)
        return any(_canonical(i) == want for i in self.images)

    def nodes(self) -> dict[str, str]:
        """The record as absolute path -> value (for a kind's Outcome.writes)."""
        base = self.path
        out = {
            f"{base}/kind": self.kind,
            f"{base}/host": self.host,
            f"{base}/image": self.image,
            f"{base}/format": self.format,
        }
        if self.pid is not None:
            out[f"{base}/pid"] = str(self.pid)
        if self.minor is not None:
            out[f"{base}/minor"] = str(self.minor)
        if self.qmp is not None:
            out[f"{base}/qmp"] = self.qmp
        for i, image in enumerate(self.chain):
            out[f"{base}/chain/{i}"] = image
        for k, v in self.extra.items():
            out[f"{base}/x/{k}"] = v
        return out

    @classmethod
    def fromNodes(cls, driverDomid: int, vdi: str, values: Mapping[str, str]) -> DataPath:
        """Parse a record read as relative key -> value (C{chain/0}, C{x/node}...)."""
        chain = []
        i = 0
        while f"chain/{i}" in values:
            chain.append(values[f"chain/{i}"])
            i += 1
        return cls(
            driverDomid,
            vdi,
            values.get("kind", ""),
            values.get("host", ""),
            values.get("image", ""),
            values.get("format", ""),
            tuple(chain),
            int(values["pid"]) if values.get("pid", "").isdigit() else None,
            int(values["minor"]) if values.get("minor", "").isdigit() else None,
            values.get("qmp"),
            {k[2:]: v for k, v in values.items() if k.startswith("x/")},
        )


def _canonical(path: str) -> str:
    return os.path.realpath(path)


async def readRecord(xs: Any, driverDomid: int, vdi: str) -> DataPath | None:
    """One record, or None if the VDI has no registered data path."""
    base = recordPath(driverDomid, vdi)
    keys = await xs.ls(base, missingOk=True)
    if not keys:
        return None
    rel: list[str] = []
    for k in keys:
        if k in ("chain", "x"):
            rel += [f"{k}/{c}" for c in await xs.ls(f"{base}/{k}", missingOk=True)]
        else:
            rel.append(k)
    values = await gatherResults([xs.readOrNone(f"{base}/{k}") for k in rel])
    return DataPath.fromNodes(
        driverDomid, vdi, {k: v for k, v in zip(rel, values, strict=True) if v is not None}
    )


async def scanDriverDomain(xs: Any, driverDomid: int) -> list[DataPath]:
    """Every data path one driver domain has registered."""
    vdis = await xs.ls(registryDir(driverDomid), missingOk=True)
    records = await gatherResults([_deferred(readRecord(xs, driverDomid, v)) for v in sorted(vdis)])
    return [r for r in records if r is not None]


async def scanRegistry(xs: Any) -> list[DataPath]:
    """
    Every data path of every driver domain (rebuilt from XenStore, e.g.
    after a restart of the toolstack or of an agent). Needs a connection
    that may read the driver domains' private records (dom0's).
    """
    domains = [d for d in await xs.ls("/local/domain", missingOk=True) if d.isdigit()]
    found = await gatherResults([_deferred(scanDriverDomain(xs, int(d))) for d in domains])
    return [dp for per in found for dp in per]


async def findDataPaths(xs: Any, target: str, host: str | None = None) -> list[DataPath]:
    """
    Every data path, across all driver domains, serving C{target} or
    reading it as part of a backing chain (optionally only on C{host}).
    """
    return [
        dp for dp in await scanRegistry(xs) if dp.uses(target) and (host is None or dp.host == host)
    ]


async def updateRecord(xs: Any, old: DataPath, new: DataPath) -> None:
    """Replace a record (after a coalesce changed its chain), in one transaction."""

    async def replace(tx: Any) -> None:
        if not await tx.exists(old.path):
            return  # deactivated meanwhile
        await tx.rm(f"{old.path}/chain", missingOk=True)
        for path, value in new.nodes().items():
            await tx.write(path, value)

    await xs.transact(replace)


def _deferred(coro: Any) -> Any:
    from twisted.internet.defer import Deferred

    return Deferred.fromCoroutine(coro)
