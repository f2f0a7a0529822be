# -*- test-case-name: tests.test_controllers -*-
"""
The DeviceManager: the toolstack's entry point for devices of any class and
any domain.

It finds (or makes) the controller for a (domain, class), serialises
operations on the same device while letting everything else run in
parallel, answers C{getBlockDeviceClass} from XenStore (seed 001), releases
all of a domain's devices at once, and lists devices like C{xl block-list}
and C{xl network-list}.
"""

from __future__ import annotations

import uuid as uuidlib
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

import attrs
from twisted.internet.defer import Deferred, DeferredLock, gatherResults
from twisted.logger import Logger

from xenddev.interfaces import ITransaction, IXenStore
from xenddev.toolstack.client import DriverDomainClient
from xenddev.toolstack.controller import (
    ALLOCATE,
    DEFAULT_REQUEST_TIMEOUT,
    LIBXL_KINDS,
    DevController,
    DeviceConfigError,
    DomainInfo,
    UnknownDomainError,
)
from xenddev.xenbus import XenbusPathError, parseBackendPath
from xenddev.xenstore.errors import NoEntryError
from xenddev.xenstore.paths import Perm, validateDomid

T = TypeVar("T")

#: The block device classes, in the order getBlockDeviceClass tries them.
BLOCK_CLASSES = ("vbd", "tap", "tap2")


@attrs.frozen
class DeviceRow:
    """One line of a device listing (xl block-list / network-list)."""

    devclass: str
    devid: int
    backendId: int | None
    handle: int
    state: int | None
    eventChannel: str | None
    ringRef: str | None
    backendPath: str | None
    mac: str | None = None
    #: Which toolstack made the device: C{xenddev}, or C{libxl} for one
    #: made by C{xl} (listed from libxl's records, as C{xl} lists it).
    toolstack: str = "xenddev"


class DeviceManager:
    """
    Devices of every class for every domain.

    @param xs: the toolstack's XenStore connection.
    @param controllers: device class → controller class; the daemon's wiring
        passes L{xenddev.controllers.defaultControllers} (nothing in the
        toolstack package knows the device classes).
    @param controllerArgs: passed to every controller (timeouts).
    """

    log = Logger()

    def __init__(
        self,
        xs: IXenStore,
        controllers: Mapping[str, type[DevController]],
        **controllerArgs: Any,
    ) -> None:
        self.xs = xs
        self.controllerClasses = dict(controllers)
        self.controllerArgs = controllerArgs
        self._locks: dict[tuple[int, str, int], DeferredLock] = {}
        self._driverDomains: dict[int, DriverDomainClient] = {}
        self.inFlight = 0

    # Domains

    def registerDomain(
        self, domid: int, uuid: str | None = None, name: str | None = None
    ) -> Deferred[DomainInfo]:
        """
        Make sure a guest's XenStore skeleton exists (as the domain builder
        writes it): C{/local/domain/<domid>/{domid,name,vm,device}} and
        C{/vm/<uuid>}, the guest reading its home, C{device} and its vm dir
        (C{/vm/<uuid>/device} comes and goes with the device records).
        A no-op for a domain that already has one.
        """
        domid = validateDomid(domid)
        vmPath = f"/vm/{uuid or uuidlib.uuid4()}"

        async def make(tx: ITransaction) -> DomainInfo:
            home = f"/local/domain/{domid}"
            existing = await tx.readOrNone(f"{home}/vm")
            if existing is not None:
                return DomainInfo(domid, existing)
            await tx.mkdir(home)
            await tx.setPerms(home, [Perm("n", 0), Perm("r", domid)])
            await tx.write(f"{home}/domid", str(domid))
            await tx.write(f"{home}/name", name or f"domain-{domid}")
            await tx.write(f"{home}/vm", vmPath)
            # The toolstack's, the guest may only read it (libxl's): a guest
            # that could create device/<class>/<devid> could plant frontends
            # or bring back one being removed (issue 13).
            await tx.mkdir(f"{home}/device")
            await tx.setPerms(f"{home}/device", [Perm("n", 0), Perm("r", domid)])
            await tx.mkdir(vmPath)
            await tx.setPerms(vmPath, [Perm("n", 0), Perm("r", domid)])
            return DomainInfo(domid, vmPath)

        return self.xs.transact(make)

    def domainInfo(self, domid: int) -> Deferred[DomainInfo]:
        """The guest's vm path; L{UnknownDomainError} if it has no home."""

        async def read() -> DomainInfo:
            d = validateDomid(domid)
            vm = await self.xs.readOrNone(f"/local/domain/{d}/vm")
            if vm is None:
                raise UnknownDomainError(f"Domain {d} does not exist")
            return DomainInfo(d, vm)

        return Deferred.fromCoroutine(read())

    # Controllers

    def controller(self, domid: int, devclass: str) -> Deferred[DevController]:
        """The controller for a device class of a domain."""
        cls = self.controllerClasses.get(devclass)
        if cls is None:
            raise DeviceConfigError(
                f"unknown device class {devclass!r} "
                f"(known: {', '.join(sorted(self.controllerClasses))})"
            )
        d = self.domainInfo(domid)
        return d.addCallback(
            lambda info: cls(self.xs, info, driverDomains=self.driverDomain, **self.controllerArgs)
        )

    def driverDomain(self, domid: int) -> DriverDomainClient:
        """
        The protocol client of a driver domain, one per driver domain for
        every controller: its control area is set up once, and requests on
        one object are queued however many callers there are.
        """
        client = self._driverDomains.get(domid)
        if client is None:
            timeout = self.controllerArgs.get("requestTimeout", DEFAULT_REQUEST_TIMEOUT)
            client = self._driverDomains[domid] = DriverDomainClient(self.xs, domid, timeout)
        return client

    def knownDriverDomains(self) -> list[int]:
        """The driver domains this manager has a protocol client for."""
        return sorted(self._driverDomains)

    def _serialised(self, key: tuple[int, str, int], fn: Callable[[], Awaitable[T]]) -> Deferred[T]:
        lock = self._locks.get(key)
        if lock is None:
            lock = self._locks[key] = DeferredLock()

        def release(result: object) -> object:
            self.inFlight -= 1
            if not lock.locked and not lock.waiting:
                self._locks.pop(key, None)
            return result

        self.inFlight += 1
        d: Deferred[Any] = lock.run(fn)
        return d.addBoth(release)

    def createDevice(self, domid: int, devclass: str, config: Mapping[str, Any]) -> Deferred[int]:
        """Create a device; fires with its devid once connected."""

        async def run() -> int:
            ctrl = await self.controller(domid, devclass)
            details = ctrl.getDeviceDetails(config)
            if details.devid == ALLOCATE:
                return await ctrl.createDevice(config)
            return await self._serialised(
                (domid, devclass, details.devid), lambda: ctrl.createDevice(config)
            )

        return Deferred.fromCoroutine(run())

    def destroyDevice(
        self, domid: int, devclass: str, devid: object, force: bool = False
    ) -> Deferred[None]:
        """Destroy a device (xend's destroyDevice)."""

        async def run() -> None:
            ctrl = await self.controller(domid, devclass)
            number = await ctrl.convertToDeviceNumber(devid)
            await self._serialised(
                (domid, devclass, number), lambda: ctrl.destroyDevice(number, force)
            )

        return Deferred.fromCoroutine(run())

    def reconfigureDevice(
        self, domid: int, devclass: str, devid: object, config: Mapping[str, Any]
    ) -> Deferred[int]:
        """Reconfigure a device in place (cdrom media change)."""

        async def run() -> int:
            ctrl = await self.controller(domid, devclass)
            number = await ctrl.convertToDeviceNumber(devid)
            return await self._serialised(
                (domid, devclass, number), lambda: ctrl.reconfigureDevice(number, config)
            )

        return Deferred.fromCoroutine(run())

    # Questions

    def getBlockDeviceClass(self, domid: int, dev: object) -> Deferred[str | None]:
        """
        Which block class (vbd, tap, tap2) serves device C{dev} (a devid or
        a name like C{xvda}) of a domain, from the toolstack's records.
        """

        async def find() -> str | None:
            info = await self.domainInfo(domid)
            for devclass in BLOCK_CLASSES:
                if devclass not in self.controllerClasses:
                    continue
                ctrl = self.controllerClasses[devclass](self.xs, info, **self.controllerArgs)
                try:
                    number = await ctrl.convertToDeviceNumber(dev)
                except DeviceConfigError:
                    continue
                if await self.xs.exists(ctrl.devicePath(number)):
                    return devclass
            return None

        return Deferred.fromCoroutine(find())

    def releaseDevices(self, domid: int) -> Deferred[None]:
        """Destroy every device of a domain, all in parallel."""

        async def release() -> None:
            jobs = []
            for devclass in self.controllerClasses:
                ctrl = await self.controller(domid, devclass)
                for devid in await ctrl.deviceIDs():
                    jobs.append(self.destroyDevice(domid, devclass, devid))
            await gatherResults(jobs, consumeErrors=True)

        return Deferred.fromCoroutine(release())

    def listDevices(self, domid: int, devclass: str) -> Deferred[list[DeviceRow]]:
        """Rows like C{xl block-list} / C{xl network-list}."""

        async def rows() -> list[DeviceRow]:
            ctrl = await self.controller(domid, devclass)
            out = []
            ours = await ctrl.deviceIDs()
            for devid in ours:
                backendId, backend = await ctrl.readVm(devid, "backend-id", "backend")
                out.append(await self._row(ctrl, devid, backendId, backend, "xenddev"))
            for devid, backend in await self._libxlDevices(domid, devclass):
                if devid not in ours:
                    try:
                        backendId = str(parseBackendPath(backend or "").backendDomid)
                    except XenbusPathError:
                        backendId = None
                    out.append(await self._row(ctrl, devid, backendId, backend, "libxl"))
            return sorted(out, key=lambda r: r.devid)

        return Deferred.fromCoroutine(rows())

    async def _row(
        self,
        ctrl: DevController,
        devid: int,
        backendId: str | None,
        backend: str | None,
        toolstack: str,
    ) -> DeviceRow:
        front = ctrl.frontendPath(devid)
        keys = ("state", "event-channel", "ring-ref", "tx-ring-ref", "mac")
        state, evtchn, ring, txRing, mac = await gatherResults(
            [self.xs.readOrNone(f"{front}/{k}") for k in keys],
            consumeErrors=True,
        )
        return DeviceRow(
            ctrl.deviceClass,
            devid,
            int(backendId) if backendId is not None and backendId.isdigit() else None,
            # xl block-list's "handle" column is the frontend's domain, xl
            # network-list's the device id.
            devid if ctrl.deviceClass == "vif" else ctrl.domid,
            int(state) if state is not None and state.isdigit() else None,
            evtchn,
            ring if ring is not None else txRing,
            backend,
            mac,
            toolstack,
        )

    async def _libxlDevices(self, domid: int, devclass: str) -> list[tuple[int, str | None]]:
        """
        (devid, backend path) of the devices C{xl} made for a domain, from
        libxl's own records (C{/libxl/<domid>/device/<kind>/<devid>}:
        writable by dom0 only, unlike the guest's frontend directories).
        """
        found = []
        for kind in LIBXL_KINDS.get(devclass, (devclass,)):
            root = f"/libxl/{int(domid)}/device/{kind}"
            try:
                names = await self.xs.ls(root)
            except NoEntryError:
                continue
            for name in names:
                if name.isdigit():
                    found.append((int(name), await self.xs.readOrNone(f"{root}/{name}/backend")))
        return found

    def waitForDevices(self, domid: int) -> Deferred[None]:
        """Wait until every device of the domain is connected."""

        async def wait() -> None:
            for devclass in self.controllerClasses:
                await (await self.controller(domid, devclass)).waitForDevices()

        return Deferred.fromCoroutine(wait())
