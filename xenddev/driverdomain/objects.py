# -*- test-case-name: tests.test_driverdomain -*-
"""
The agent's records and what it knows of the objects it serves.

L{AgentRecords} says where the records live, under
C{/local/domain/<self>/private/xenddev/}:

  - C{inflight/<class>/<name>}: the request being executed (a journal entry
    written before executing and emptied with the result), so a request
    interrupted by a crash is executed again with C{recovering} set;
  - C{objects/<class>/<name>/kind}: which kind serves the object, and
    C{objects/<class>/<name>/data/*} for the kind's own records;
  - C{devices/<devclass>/<domu>/<devid>}: C{<class>/<name>/<plug>} of a
    backend this agent created, with C{hotplug} = C{added}|C{removed}.

L{ServedObjects} reads an object's kind, target and plugs from the store,
remembering kind and target from the prepare on.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import attrs
from twisted.internet.defer import gatherResults

from xenddev.backendctrl.protocol import (
    OBJECT_CLASSES,
    PLUGGED,
    ControlPaths,
    privateDir,
    validateName,
)
from xenddev.driverdomain.kinds.base import DeviceRef, KindContext, KindError, PlugSpec
from xenddev.interfaces import IDriverDomainKind, IXenStoreOps
from xenddev.xenstore.paths import validateDomid

#: C{devices/.../hotplug}: the add script ran (or failed: the remove still runs).
HOTPLUG_ADDED = "added"
#: C{devices/.../hotplug}: the remove script ran.
HOTPLUG_REMOVED = "removed"


@attrs.frozen
class AgentRecords:
    """Where the agent of driver domain C{domid} keeps its records."""

    domid: int = attrs.field(converter=validateDomid)

    @property
    def base(self) -> str:
        """C{/local/domain/<self>/private/xenddev}."""
        return privateDir(self.domid)

    @property
    def skeleton(self) -> tuple[str, ...]:
        """
        The fixed directories, made at start, so per-object records come and
        go as leaves and a failed request leaves no empty directory behind.
        """
        return (
            *(
                f"{self.base}/{top}/{cls}"
                for top in ("inflight", "objects")
                for cls in OBJECT_CLASSES
            ),
            self.devices,
            f"{self.base}/datapath",  # the data-path registry (seed 002)
            f"{self.base}/quiesced",  # data paths a quiesce holds paused
        )

    def journal(self, paths: ControlPaths) -> str:
        """The journal entry of the object's request."""
        return f"{self.base}/inflight/{paths.objectClass.name}/{paths.name}"

    def objectRecords(self, paths: ControlPaths) -> str:
        """The object's records directory."""
        return f"{self.base}/objects/{paths.objectClass.name}/{paths.name}"

    def kind(self, paths: ControlPaths) -> str:
        """The name of the kind serving the object."""
        return f"{self.objectRecords(paths)}/kind"

    def kindData(self, paths: ControlPaths) -> str:
        """The kind's own records for the object."""
        return f"{self.objectRecords(paths)}/data"

    @property
    def devices(self) -> str:
        """The device records' directory."""
        return f"{self.base}/devices"

    def device(self, ref: DeviceRef) -> str:
        """The record of a backend this agent created (by its backend directory)."""
        return f"{self.devices}/{ref.deviceClass}/{ref.frontendDomid}/{ref.devid}"

    def hotplug(self, ref: DeviceRef) -> str:
        """Which of the device's hotplug scripts ran (L{HOTPLUG_ADDED}, L{HOTPLUG_REMOVED})."""
        return f"{self.device(ref)}/hotplug"


def hotplugRef(spec: PlugSpec) -> DeviceRef:
    """
    The device a plug's records and hotplug jobs are keyed by: its *backend*
    directory (backend/<class>/<domu>/<devid>), whose class may differ from
    the frontend's (blktap1 serves device/vbd from backend/tap).
    """
    return DeviceRef.fromBackendPath(spec.backend) if spec.backend is not None else spec.device


class ServedObjects:
    """
    The kind, target and plugs of the objects this agent serves.

    @param xs: the agent's connection.
    @param records: where its records are.
    @param kinds: the kinds, in the order a prepare tries them.
    """

    def __init__(
        self, xs: IXenStoreOps, records: AgentRecords, kinds: Sequence[IDriverDomainKind]
    ) -> None:
        self.xs = xs
        self.records = records
        self.order = list(kinds)
        self.kinds: Mapping[str, Any] = {k.name: k for k in kinds}
        #: (class, name) -> (kind name, target) of the objects this agent
        #: prepared, so a request need not read them. Safe: the kind is
        #: recorded once, at the prepare, and t/* changes only with a
        #: change, whose completion replaces the entry; the entry is made
        #: after a prepare (which never reads it, so an object abandoned by
        #: the toolstack and prepared again gets its new target) and
        #: dropped once the object is gone. Filled by reading after a restart.
        self._known: dict[tuple[str, str], tuple[str, dict[str, str]]] = {}

    def remembered(self, paths: ControlPaths) -> tuple[str, dict[str, str]] | None:
        """The kind name and target remembered for the object, if any."""
        return self._known.get(objectKey(paths))

    def remember(self, paths: ControlPaths, kindName: str, target: Mapping[str, str]) -> None:
        """After a prepare or a change: the kind and target the object is served with."""
        self._known[objectKey(paths)] = (kindName, dict(target))

    def forget(self, paths: ControlPaths) -> None:
        """The object is gone."""
        self._known.pop(objectKey(paths), None)

    def kindNamed(self, name: str | None) -> Any:
        """The kind of that name; C{ENODEV} if none serves here."""
        if name is None or name not in self.kinds:
            raise KindError("ENODEV", f"object served by unknown kind {name!r}")
        return self.kinds[name]

    def choose(self, paths: ControlPaths, target: Mapping[str, str]) -> Any:
        """The first kind that serves C{target}; C{ENODEV} if none does."""
        cls = paths.objectClass.name
        for kind in self.order:
            if cls in kind.objectClasses and kind.accepts(cls, target):
                return kind
        raise KindError(
            "ENODEV",
            f"no driver-domain kind here serves this target (kinds: "
            f"{', '.join(self.kinds) or 'none'})",
        )

    async def kind(self, paths: ControlPaths) -> Any:
        """The kind serving the object (recorded at its prepare)."""
        known = self.remembered(paths)
        if known is not None:
            return self.kinds[known[0]]
        return self.kindNamed(await self.xs.readOrNone(self.records.kind(paths)))

    async def target(self, paths: ControlPaths) -> dict[str, str]:
        """The object's target (C{t/*})."""
        known = self.remembered(paths)
        if known is not None:
            return dict(known[1])
        return await readTarget(self.xs, paths.targetDir)

    def context(
        self, paths: ControlPaths, target: Mapping[str, str], recovering: bool = False
    ) -> KindContext:
        """What a kind is told about the object."""
        return KindContext(self.xs, paths, target, recovering, self.records.kindData(paths))

    async def plugged(self, paths: ControlPaths) -> list[str]:
        """The names of the object's plugs in state C{ok}."""
        names = [n for n in await self.xs.ls(paths.plugsDir, missingOk=True) if _validName(n)]
        states = await gatherResults(
            [self.xs.readOrNone(paths.plug(n).state) for n in names], consumeErrors=True
        )
        return [n for n, s in zip(names, states, strict=True) if s == PLUGGED]

    async def pluggedSpecs(self, paths: ControlPaths) -> list[PlugSpec]:
        """
        The object's plugs in state C{ok} that have a backend, each with its
        device keyed by the backend directory (as hotplug jobs are).
        """
        specs = []
        for name in await self.plugged(paths):
            pp = paths.plug(name)
            frontend, relative = await gatherResults(
                [self.xs.readOrNone(pp.frontend), self.xs.readOrNone(pp.backend)],
                consumeErrors=True,
            )
            if relative is not None:
                backend = paths.absolute(relative)
                ref = DeviceRef.fromBackendPath(backend)
                specs.append(PlugSpec(name, frontend or "", ref, False, backend))
        return specs


async def readTarget(xs: IXenStoreOps, directory: str) -> dict[str, str]:
    """The keys and values under C{directory} (C{t/} or C{n/}); empty if missing."""
    keys = await xs.ls(directory, missingOk=True)
    values = await gatherResults([xs.read(f"{directory}/{k}") for k in keys], consumeErrors=True)
    return dict(zip(keys, values, strict=True))


def objectKey(paths: ControlPaths) -> tuple[str, str]:
    """An object's key in the agent's tables: (class, name)."""
    return (paths.objectClass.name, paths.name)


def _validName(name: str) -> bool:
    try:
        validateName(name, "plug")
    except ValueError:
        return False
    return True
