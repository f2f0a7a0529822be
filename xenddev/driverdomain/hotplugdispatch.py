# -*- test-case-name: tests.test_driverdomain_kinds,tests.test_controllers -*-
"""
Hotplug dispatch for the devices the agent created (the job of xl devd or
xenbackendd): the add script once the object is active and the backend is
in InitWait, the remove script once the backend is Closed with C{online=0}
(or when an unplug asks first), each at most once per device, never two at
once for one device. Scripts are run by an L{IHotplugRunner}.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from twisted.internet.defer import Deferred, gatherResults
from twisted.logger import Logger

from xenddev.backendctrl.protocol import ACTIVE, OBJECT_CLASSES, ControlPaths
from xenddev.driverdomain.jobs import Serialiser
from xenddev.driverdomain.kinds.base import DeviceRef, KindContext, PlugSpec
from xenddev.driverdomain.objects import (
    HOTPLUG_ADDED,
    HOTPLUG_REMOVED,
    AgentRecords,
    ServedObjects,
    hotplugRef,
    objectKey,
)
from xenddev.interfaces import IHotplugRunner, ITransaction, IWatchHandle, IXenStore

INIT_WAIT = "2"
CLOSED = "6"


class HotplugDispatcher:
    """
    Runs the hotplug scripts of the backends the agent created.

    @param xs: the agent's connection.
    @param records: where the agent's records are (the device records).
    @param objects: the objects served (kind and target of a device's object).
    @param runner: runs scripts; with None no script runs and a device
        counts as connected once its object is active and its backend is
        in InitWait.
    """

    log = Logger()

    def __init__(
        self,
        xs: IXenStore,
        records: AgentRecords,
        objects: ServedObjects,
        runner: IHotplugRunner | None,
    ) -> None:
        self.xs = xs
        self.records = records
        self.objects = objects
        self.runner = runner
        self.home = f"/local/domain/{records.domid}"
        self.runs = 0
        self._devices = Serialiser()
        self._jobs: dict[DeviceRef, Deferred[None]] = {}
        #: The backends this agent created: device -> (object, plug, absolute
        #: backend), so an event need not look them up in the store. Safe:
        #: an entry is made once the plug's completion has committed the
        #: device record and dropped once the unplug's has removed it; only
        #: this agent writes those records, and a plug's backend directory
        #: is fixed for its life. Filled by reading after a restart.
        self._owners: dict[DeviceRef, tuple[ControlPaths, str, str]] = {}

    def watch(self) -> Deferred[IWatchHandle]:
        """Watch the backend tree (the watch fires once at once: a scan)."""
        return self.xs.watch(f"{self.home}/backend", self._backendChanged)

    @property
    def busy(self) -> bool:
        """Whether a dispatch job runs."""
        return self._devices.busy

    def whenIdle(self) -> Deferred[None]:
        """Fire once no dispatch job runs."""
        return self._devices.whenIdle()

    # What the agent tells it

    def plugged(self, paths: ControlPaths, plug: str, backend: str) -> None:
        """A plug's completion made C{backend}: dispatch its scripts from now on."""
        ref = DeviceRef.fromBackendPath(backend)
        self._owners[ref] = (paths, plug, backend)
        self._pokeDevice(ref)

    def unplugged(self, spec: PlugSpec) -> None:
        """An unplug's completion removed the device."""
        self._owners.pop(hotplugRef(spec), None)

    def activated(self, paths: ControlPaths) -> None:
        """
        The object became active: its plugged devices in InitWait get their
        add scripts. Not awaited by the object's job, so its next request
        need not wait; tracked, so L{whenIdle} still covers it.
        """
        self._devices.poke(("plugs", *objectKey(paths)), lambda: self._reconsider(paths), self.log)

    def targetChanged(self, paths: ControlPaths) -> None:
        """A change replaced the object's medium: the add scripts run again (L{_readd})."""
        self._devices.poke(("plugs", *objectKey(paths)), lambda: self._readd(paths), self.log)

    # Events

    def _backendChanged(self, path: str) -> None:
        rest = path[len(self.home) + len("/backend") :].strip("/").split("/")
        if len(rest) >= 3 and rest[1].isdigit() and rest[2].isdigit():
            # Hotplug depends on the backend's state and online only (and on
            # the directory coming or going); the many other keys a backend
            # publishes cannot change what to do.
            if len(rest) == 3 or rest[3:] in (["state"], ["online"]):
                self._pokeDevice(DeviceRef(rest[0], int(rest[1]), int(rest[2])))
        elif len(rest) < 3:
            self._devices.poke("scan", self._scan, self.log)

    async def _scan(self) -> None:
        base = self.records.devices
        for devclass in await self.xs.ls(base, missingOk=True):
            for domu in await self.xs.ls(f"{base}/{devclass}", missingOk=True):
                for devid in await self.xs.ls(f"{base}/{devclass}/{domu}", missingOk=True):
                    if domu.isdigit() and devid.isdigit():
                        self._pokeDevice(DeviceRef(devclass, int(domu), int(devid)))

    def _pokeDevice(self, ref: DeviceRef) -> None:
        self._devices.poke(ref, lambda: self._serviceDevice(ref), self.log)

    async def _reconsider(self, paths: ControlPaths) -> None:
        for spec in await self.objects.pluggedSpecs(paths):
            self._pokeDevice(spec.device)

    async def _readd(self, paths: ControlPaths) -> None:
        """
        After a change, the add script for the new medium on each plugged
        device of an active object, whatever the backend's state (a backend
        that raced back to Connected would otherwise never get one); an
        inactive object's devices get theirs at activation.
        """
        if await self.xs.readOrNone(paths.state) != ACTIVE:
            return
        kind = await self.objects.kind(paths)
        ctx = self.objects.context(paths, await self.objects.target(paths))
        for spec in await self.objects.pluggedSpecs(paths):
            await self.add(kind, ctx, spec)

    async def _owner(self, ref: DeviceRef) -> tuple[ControlPaths, str, str] | None:
        """Who owns the device, from the records (after a restart)."""
        record = await self.xs.readOrNone(self.records.device(ref))
        if record is None:
            return None
        cls, _, rest = record.partition("/")
        name, _, plug = rest.partition("/")
        if cls not in OBJECT_CLASSES:
            return None
        paths = ControlPaths(OBJECT_CLASSES[cls], self.records.domid, name)
        relative = await self.xs.readOrNone(paths.plug(plug).backend)
        if relative is None:
            return None
        return paths, plug, paths.absolute(relative)

    async def _serviceDevice(self, ref: DeviceRef) -> None:
        owner = self._owners.get(ref)
        if owner is None:
            owner = await self._owner(ref)
            if owner is None:
                return  # not a device this agent created
            self._owners[ref] = owner
        paths, plug, backend = owner
        # The object's state is read where it lives, in the same round trip.
        state, online, objState, done = await gatherResults(
            [
                self.xs.readOrNone(f"{backend}/state"),
                self.xs.readOrNone(f"{backend}/online"),
                self.xs.readOrNone(paths.state),
                self.xs.readOrNone(self.records.hotplug(ref)),
            ],
            consumeErrors=True,
        )
        kind = await self.objects.kind(paths)
        ctx = self.objects.context(paths, await self.objects.target(paths))
        spec = PlugSpec(plug, "", ref, False, backend)
        if state == INIT_WAIT and objState == ACTIVE and done is None:
            await self.add(kind, ctx, spec)
        elif state == CLOSED and online == "0" and done == HOTPLUG_ADDED:
            await self.remove(kind, ctx, spec)

    # Scripts

    def _job(self, ref: DeviceRef, job: Callable[[], Awaitable[None]]) -> Deferred[None]:
        """
        Run C{job} after any hotplug job already running for the device, so
        an add and a remove never overlap (a remove asked for while the add
        script still runs must wait for it, then see its record).
        """
        previous = self._jobs.get(ref)

        async def run() -> None:
            if previous is not None:
                try:
                    await previous
                except Exception:
                    pass  # already logged by whoever waited for it
            await job()

        d = Deferred.fromCoroutine(run())
        self._jobs[ref] = d

        def forget(result: object) -> object:
            if self._jobs.get(ref) is d:
                del self._jobs[ref]
            return result

        d.addBoth(forget)
        return d

    async def add(self, kind: Any, ctx: KindContext, spec: PlugSpec) -> None:
        """Run the add script unless it already ran for this device."""
        ref = hotplugRef(spec)

        async def addOnce() -> None:
            if await self.xs.readOrNone(self.records.hotplug(ref)) is None:
                await self._run(kind, ctx, spec, "add")

        await self._job(ref, addOnce)

    async def remove(self, kind: Any, ctx: KindContext, spec: PlugSpec) -> None:
        """
        Run the remove script at most once per device, whoever asks first
        (the dispatcher on Closed, or an unplug or change), and only after
        the add.
        """
        ref = hotplugRef(spec)

        async def removeOnce() -> None:
            if await self.xs.readOrNone(self.records.hotplug(ref)) == HOTPLUG_ADDED:
                await self._run(kind, ctx, spec, "remove")

        await self._job(ref, removeOnce)

    async def _run(self, kind: Any, ctx: KindContext, spec: PlugSpec, action: str) -> None:
        assert spec.backend is not None
        ref = hotplugRef(spec)
        ran = HOTPLUG_ADDED if action == "add" else HOTPLUG_REMOVED
        command = None if self.runner is None else kind.hotplugCommand(ctx, spec, action)
        if command is None:
            # No script to wait for (none configured, or the kind needs
            # none): the device is as ready as it will get.
            if action == "add":
                await self._reportStatus(spec.backend, "connected")
            await self._mark(ref, ran)
            return
        assert self.runner is not None
        script, args, env = command
        self.runs += 1
        try:
            await self.runner.run(script, args, env)
        except Exception as e:
            self.log.warn(
                "Hotplug {script} {action} for {backend} failed: {error}",
                script=script,
                action=action,
                backend=spec.backend,
                error=e,
            )
            if action == "add":
                await self._reportFailure(spec.backend, str(e))
                await self._mark(ref, HOTPLUG_ADDED)  # so remove still runs
                return
        await self._mark(ref, ran)

    async def _mark(self, ref: DeviceRef, value: str) -> None:
        """
        Record that a script ran, unless the device was unplugged meanwhile
        (its record is gone): never resurrect a removed record.
        """
        device = self.records.device(ref)

        async def mark(tx: ITransaction) -> None:
            if await tx.exists(device):
                await tx.write(f"{device}/hotplug", value)

        await self.xs.transact(mark)

    async def _reportStatus(self, backend: str, status: str) -> None:
        async def report(tx: ITransaction) -> None:
            if (
                await tx.exists(backend)
                and await tx.readOrNone(f"{backend}/hotplug-status") is None
            ):
                await tx.write(f"{backend}/hotplug-status", status)

        await self.xs.transact(report)

    async def _reportFailure(self, backend: str, message: str) -> None:
        async def report(tx: ITransaction) -> None:
            # Never resurrect a backend removed meanwhile; keep what the
            # script itself reported.
            if not await tx.exists(backend):
                return
            if await tx.readOrNone(f"{backend}/hotplug-status") != "error":
                await tx.write(f"{backend}/hotplug-error", message[:1024])
                await tx.write(f"{backend}/hotplug-status", "error")

        await self.xs.transact(report)
