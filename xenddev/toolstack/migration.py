# -*- test-case-name: tests.test_poolmigration -*-
"""
A guest's storage during a migration, on one host: the per-guest steps
the pool's coordinator (C{xenddev.poolmigration}) runs on the source and
on the destination, over the L{DeviceManager}.

Seed 000 separates a vdi's activation from its preparation "to allow as
much of the setup for an incoming migration domain's storage to be done
before committing to the migration and entering the 'domain is down'
stage, during which access is switched from the old to the new host".
So:

  - the source says what the destination must prepare
    (L{DomainStorage.devices}: each disk's class, id, configuration as
    recorded, and grant), and at the handover deactivates each of its
    vdis (L{DomainStorage.deactivate}: the driver domain's deactivate
    flushes and pauses the data path; the vbds stay plugged);
  - the destination makes each disk with its vdi prepared and its vbd
    plugged but not active (L{DomainStorage.prepareIncoming}: no hotplug
    script runs, the backend does not connect), activates them once the
    activation keys are its own (L{DomainStorage.activate}), or detaches
    them on an abort (L{DomainStorage.cancel}).

Only the storage classes (those whose objects are vdis) take part: a
guest's network follows it by other means.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import attrs
from twisted.internet.defer import Deferred, DeferredList, gatherResults
from twisted.logger import Logger

from xenddev.backendctrl.protocol import VDI
from xenddev.toolstack.activation import readGrant
from xenddev.toolstack.controller import DeviceConfigError
from xenddev.toolstack.manager import DeviceManager, underlyingError

__all__ = ["DomainStorage", "MigratingDevice"]


@attrs.frozen
class MigratingDevice:
    """
    One disk of a migrating guest.

    @ivar config: the configuration the destination makes the disk from
        (its class's C{migrationConfig} of what the source's record holds).
    @ivar target: the normalised target of its grant (None: it claims
        none, an empty drive).
    @ivar mode: the grant's mode (C{rw}, C{ro}, C{w!}), or None.
    @ivar token: the grant's fencing token.
    """

    devclass: str
    devid: int
    config: Mapping[str, str]
    target: str | None = None
    mode: str | None = None
    token: int = 0

    def toJSON(self) -> dict[str, Any]:
        """The device as plain data (XML-RPC: no None, no large integers)."""
        return {
            "class": self.devclass,
            "devid": self.devid,
            "config": dict(self.config),
            "target": self.target or "",
            "mode": self.mode or "",
            "token": str(self.token),
        }

    @classmethod
    def fromJSON(cls, data: object) -> MigratingDevice:
        """A device from another host's answer; L{DeviceConfigError} naming what is wrong."""
        if not isinstance(data, dict):
            raise DeviceConfigError(f"a migrating device must be a struct, not {data!r}")
        devclass, devid, config = data.get("class"), data.get("devid"), data.get("config")
        if not isinstance(devclass, str) or not devclass:
            raise DeviceConfigError(f"a migrating device's class: {devclass!r}")
        if isinstance(devid, bool) or not isinstance(devid, int) or devid < 0:
            raise DeviceConfigError(f"a migrating device's devid: {devid!r}")
        if not isinstance(config, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in config.items()
        ):
            raise DeviceConfigError(f"a migrating device's config: {config!r}")
        token = str(data.get("token", "0"))
        return cls(
            devclass,
            devid,
            dict(config),
            str(data.get("target") or "") or None,
            str(data.get("mode") or "") or None,
            int(token) if token.isascii() and token.isdigit() else 0,
        )


class DomainStorage:
    """
    The migration steps of one host's guests' disks (see the module
    docstring), over C{manager}.
    """

    log = Logger()

    def __init__(self, manager: DeviceManager) -> None:
        self.manager = manager

    def storageClasses(self) -> list[str]:
        """The device classes whose objects are vdis (the disks), in a fixed order."""
        return sorted(
            name for name, cls in self.manager.controllerClasses.items() if cls.objectClass == VDI
        )

    def devices(self, domid: int) -> Deferred[list[MigratingDevice]]:
        """The guest's disks, from the toolstack's records, by class and id."""

        async def devices() -> list[MigratingDevice]:
            found: list[tuple[str, int]] = []
            for devclass in self.storageClasses():
                ctrl = await self.manager.controller(domid, devclass)
                found.extend((devclass, devid) for devid in await ctrl.deviceIDs())
            # Each disk's records read at once: this is in the handover's window.
            read: list[MigratingDevice] = await gatherResults(
                [Deferred.fromCoroutine(self._readBack(domid, c, devid)) for c, devid in found],
                consumeErrors=True,
            )
            return read

        return Deferred.fromCoroutine(devices())

    def deactivate(self, domid: int, devices: Sequence[MigratingDevice]) -> Deferred[None]:
        """
        Deactivate every disk's vdi (all at once); if one fails, those
        deactivated are activated again and the first failure is raised.
        """
        return Deferred.fromCoroutine(
            self._all(domid, devices, self.manager.deactivateDevice, self.manager.activateDevice)
        )

    def activate(self, domid: int, devices: Sequence[MigratingDevice]) -> Deferred[None]:
        """Activate every disk's vdi (all at once) and wait until each is connected."""
        return Deferred.fromCoroutine(self._all(domid, devices, self.manager.activateDevice, None))

    def prepareIncoming(
        self, domid: int, devices: Sequence[MigratingDevice], source: str
    ) -> Deferred[list[MigratingDevice]]:
        """
        Make each disk for guest C{domid} migrating in from C{source}, its
        vdi prepared and its vbd plugged, not active; fires with the disks
        as made here (their grants read back). If one cannot be made, those
        made are detached and the first failure is raised: nothing is left.
        """

        async def prepare() -> list[MigratingDevice]:
            results = await DeferredList(
                [
                    self.manager.prepareIncoming(domid, d.devclass, d.config, source)
                    for d in devices
                ],
                consumeErrors=True,
            )
            made = [
                (d.devclass, devid) for d, (ok, devid) in zip(devices, results, strict=True) if ok
            ]
            failed = [_error(f) for ok, f in results if not ok]
            if failed:
                await self._detach(domid, made)
                raise failed[0]
            return [await self._readBack(domid, c, devid) for c, devid in made]

        return Deferred.fromCoroutine(prepare())

    def cancel(self, domid: int, devices: Sequence[MigratingDevice]) -> Deferred[None]:
        """Detach the disks made for a migration (their grants, and intents, given back)."""
        return Deferred.fromCoroutine(self._detach(domid, [(d.devclass, d.devid) for d in devices]))

    async def _readBack(self, domid: int, devclass: str, devid: int) -> MigratingDevice:
        """A disk as its records say (its configuration for another host, its grant)."""
        ctrl = await self.manager.controller(domid, devclass)
        # Both in one round: the record's configuration and its grant.
        recording = ctrl.getDeviceConfiguration(devid)
        granted = Deferred.fromCoroutine(readGrant(self.manager.xs, ctrl.devicePath(devid), domid))
        config = ctrl.migrationConfig(await recording)
        grant = await granted
        if grant is None:
            return MigratingDevice(devclass, devid, config)
        return MigratingDevice(devclass, devid, config, grant.target, grant.mode, grant.token)

    async def _detach(self, domid: int, devices: Sequence[tuple[str, int]]) -> None:
        """Destroy the devices (all at once); failures are raised after all have run."""
        results = await DeferredList(
            [self.manager.destroyDevice(domid, c, devid, force=True) for c, devid in devices],
            consumeErrors=True,
        )
        failed = [_error(f) for ok, f in results if not ok]
        if failed:
            raise failed[0]

    async def _all(
        self,
        domid: int,
        devices: Sequence[MigratingDevice],
        do: Any,
        undo: Any,
    ) -> None:
        """
        C{do(domid, class, devid)} for every device at once; if one fails,
        C{undo} for those done (when given), then the first failure.
        """
        results = await DeferredList(
            [do(domid, d.devclass, d.devid) for d in devices], consumeErrors=True
        )
        failed = [_error(f) for ok, f in results if not ok]
        if not failed:
            return
        if undo is not None:
            done = [d for d, (ok, _) in zip(devices, results, strict=True) if ok]
            try:
                await gatherResults(
                    [undo(domid, d.devclass, d.devid) for d in done], consumeErrors=True
                )
            except Exception as e:
                self.log.error(
                    "Could not undo a step of guest {domid}'s migration: {error}",
                    domid=domid,
                    error=underlyingError(e),
                )
        raise failed[0]


def _error(failure: Any) -> BaseException:
    """The error a failed operation's L{Failure} is about."""
    assert failure.value is not None
    return underlyingError(failure.value)
