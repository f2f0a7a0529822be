# -*- test-case-name: tests.test_controllers -*-
"""
The DeviceManager: the toolstack's entry point for devices of any class and
any domain.

It finds (or makes) the controller for a (domain, class), owns the one
protocol client of each driver domain, serialises operations on the same
device while letting everything else run in parallel, logs one line per
device operation, answers C{getBlockDeviceClass} from XenStore (seed 001),
releases all of a domain's devices at once, and lists devices like C{xl
block-list} and C{xl network-list}.
"""

from __future__ import annotations

import uuid as uuidlib
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from typing import Any, TypeVar

import attrs
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    FirstError,
    gatherResults,
)
from twisted.logger import Logger
from twisted.python.failure import Failure

from xenddev.errors import XenddevError
from xenddev.interfaces import ITransaction, IXenStore
from xenddev.keyedlocks import KeyedLocks
from xenddev.toolstack.client import DriverDomainClient
from xenddev.toolstack.controller import (
    ALLOCATE,
    DEFAULT_REQUEST_TIMEOUT,
    DevController,
    DeviceConfigError,
    DeviceNotFoundError,
    DomainInfo,
    NotAGuestError,
    UnknownDomainError,
)
from xenddev.xenbus import (
    LIBXL_KINDS,
    XenbusPathError,
    domainPath,
    libxlClassPath,
    parseBackendPath,
)
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
    #: What the device's class says of it (a disk's C{vdev}). Like
    #: C{extras}, left out of the hash: a row stays hashable.
    facts: Mapping[str, str] = attrs.field(factory=dict, hash=False)
    #: The frontend keys its class lists besides the ones above (a vif's
    #: two rings), as read.
    extras: Mapping[str, str | None] = attrs.field(factory=dict, hash=False)


def underlyingError(error: BaseException) -> BaseException:
    """
    The error a failure is about: C{gatherResults} (and C{DeferredList}
    with C{fireOnOneErrback}) fail with a L{FirstError} wrapping the first
    failure of the Deferreds they gathered, which may itself be one.
    """
    while isinstance(error, FirstError):
        inner = error.subFailure.value
        if inner is None:
            break
        error = inner
    return error


def outcomeOf(result: object) -> str:
    """
    How a device operation ended, for its log line: C{ok}, C{cancelled},
    C{fault <code>: <message>} for an error declaring its fault code, else
    the error's class and text.
    """
    if not isinstance(result, Failure):
        return "ok"
    assert result.value is not None
    error = underlyingError(result.value)
    if isinstance(error, CancelledError):
        return "cancelled"
    if isinstance(error, XenddevError):
        return f"fault {int(error.faultCode)}: {error.faultMessage()}"
    return f"error: {type(error).__name__}: {error}"


@attrs.define
class _Shown:
    """The device an operation's log line names, filled in as the operation learns it."""

    devid: object
    vdev: str | None = None

    def learn(self, ctrl: DevController, devid: int, named: bool = True) -> None:
        """The device is C{devid} (shown as such unless the caller C{named} it otherwise)."""
        if named:
            self.devid = devid
        self.vdev = ctrl.deviceName(devid)


class DeviceManager:
    """
    Devices of every class for every domain.

    @param xs: the toolstack's XenStore connection.
    @param controllers: device class → controller class; the daemon's wiring
        passes L{xenddev.controllers.defaultControllers} (nothing in the
        toolstack package knows the device classes).
    @param reactor: the clock of the operations' durations (by default
        the connection's).
    @param controllerArgs: passed to every controller (timeouts).
    """

    log = Logger()

    def __init__(
        self,
        xs: IXenStore,
        controllers: Mapping[str, type[DevController]],
        *,
        reactor: Any = None,
        **controllerArgs: Any,
    ) -> None:
        self.xs = xs
        self.reactor: Any = reactor if reactor is not None else getattr(xs, "reactor", None)
        self.controllerClasses = dict(controllers)
        self.controllerArgs = controllerArgs
        self._locks: KeyedLocks[tuple[int, str, int]] = KeyedLocks()
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
            home = domainPath(domid)
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
        """
        The guest's vm path; L{UnknownDomainError} if it has no home,
        L{NotAGuestError} if it has one but no C{vm} (dom0: it exists, and
        saying otherwise misled its users).
        """

        async def read() -> DomainInfo:
            d = validateDomid(domid)
            home = domainPath(d)
            vm = await self.xs.readOrNone(f"{home}/vm")
            if vm is None:
                # Only on the refusal's path: the home and its name.
                there, name = await gatherResults(
                    [self.xs.exists(home), self.xs.readOrNone(f"{home}/name")],
                    consumeErrors=True,
                )
                if there:
                    raise NotAGuestError(d, name)
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
        return d.addCallback(lambda info: self._make(cls, info))

    def _make(self, cls: type[DevController], info: DomainInfo) -> DevController:
        return cls(self.xs, info, driverDomains=self.driverDomain, **self.controllerArgs)

    def servedClass(self, devclass: str) -> str:
        """
        The class serving expressions of class C{devclass}: itself if a
        controller serves it, else the first served class whose controller
        also takes it (L{DevController.alsoTakes}: the vbd controller takes
        xm's tap expressions), else C{devclass} (for the caller to refuse).
        """
        if devclass in self.controllerClasses:
            return devclass
        for name, cls in self.controllerClasses.items():
            if devclass in cls.alsoTakes:
                return name
        return devclass

    def driverDomain(self, domid: int) -> DriverDomainClient:
        """
        The protocol client of a driver domain: the manager is the only
        owner of one (controllers, the XML-RPC service, the reaper and the
        pausers all ask here), so its control area is set up once and
        requests on one object are queued however many callers there are.
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
        def done(result: object) -> object:
            self.inFlight -= 1
            return result

        self.inFlight += 1
        return self._locks.run(key, fn).addBoth(done)

    def createDevice(self, domid: int, devclass: str, config: Mapping[str, Any]) -> Deferred[int]:
        """Create a device; fires with its devid once connected. Logged."""
        shown = _Shown("new")

        async def run() -> int:
            ctrl = await self.controller(domid, devclass)
            # Parsed once: the details name the device to serialise on and
            # are what the controller creates.
            details = ctrl.getDeviceDetails(config)
            if details.devid == ALLOCATE:
                devid = await ctrl.create(details)
            else:
                shown.learn(ctrl, details.devid)
                devid = await self._serialised(
                    (domid, devclass, details.devid), lambda: ctrl.create(details)
                )
            shown.learn(ctrl, devid)
            return devid

        return self._logged("attach", domid, devclass, shown, run)

    def prepareIncoming(
        self, domid: int, devclass: str, config: Mapping[str, Any], source: str
    ) -> Deferred[int]:
        """
        Make a device of a guest migrating in from host C{source}, its
        object prepared and plugged but not activated
        (L{DevController.prepareIncoming}); fires with its devid. Logged.
        """
        shown = _Shown("new")

        async def run() -> int:
            ctrl = await self.controller(domid, devclass)
            details = ctrl.getDeviceDetails(config)
            if details.devid == ALLOCATE:
                devid = await ctrl.prepareIncoming(details, source)
            else:
                shown.learn(ctrl, details.devid)
                devid = await self._serialised(
                    (domid, devclass, details.devid),
                    lambda: ctrl.prepareIncoming(details, source),
                )
            shown.learn(ctrl, devid)
            return devid

        return self._logged("migrate-prepare", domid, devclass, shown, run)

    def activateDevice(self, domid: int, devclass: str, devid: int) -> Deferred[None]:
        """Activate a device's object and wait until it is connected. Logged."""
        return self._onDevice("activate", domid, devclass, devid, "activateDevice")

    def deactivateDevice(self, domid: int, devclass: str, devid: int) -> Deferred[None]:
        """Deactivate a device's object (its vbd stays plugged). Logged."""
        return self._onDevice("deactivate", domid, devclass, devid, "deactivateDevice")

    def _onDevice(
        self, op: str, domid: int, devclass: str, devid: int, method: str
    ) -> Deferred[None]:
        """Run the controller's C{method} on one device, serialised and logged as C{op}."""
        shown = _Shown(devid)

        async def run() -> None:
            ctrl = await self.controller(domid, devclass)
            shown.learn(ctrl, devid)
            await self._serialised((domid, devclass, devid), lambda: getattr(ctrl, method)(devid))

        return self._logged(op, domid, devclass, shown, run)

    def destroyDevice(
        self, domid: int, devclass: str, devid: object, force: bool = False
    ) -> Deferred[None]:
        """Destroy a device (xend's destroyDevice). Logged."""
        shown = _Shown(devid)

        async def run() -> None:
            ctrl = await self.controller(domid, devclass)
            number = await ctrl.convertToDeviceNumber(devid)
            shown.learn(ctrl, number, named=False)
            await self._serialised(
                (domid, devclass, number), lambda: ctrl.destroyDevice(number, force)
            )

        return self._logged("detach", domid, devclass, shown, run)

    def reconfigureDevice(
        self, domid: int, devclass: str, devid: object, config: Mapping[str, Any]
    ) -> Deferred[int]:
        """Reconfigure a device in place (cdrom media change). Logged."""
        shown = _Shown(devid)

        async def run() -> int:
            ctrl = await self.controller(domid, devclass)
            number = await ctrl.convertToDeviceNumber(devid)
            shown.learn(ctrl, number, named=False)
            return await self._serialised(
                (domid, devclass, number), lambda: ctrl.reconfigureDevice(number, config)
            )

        return self._logged("configure", domid, devclass, shown, run)

    def _logged(
        self,
        op: str,
        domid: int,
        devclass: str,
        shown: _Shown,
        run: Callable[[], Coroutine[Any, Any, T]],
    ) -> Deferred[T]:
        """
        Run one device operation and log its one line: domain, class,
        device (as the caller named it, or its id; a disk's vdev too),
        outcome and duration.
        """
        clock = self._clock()
        began = clock.seconds()

        def done(result: object) -> object:
            self.log.info(
                "device {op}: domain={domid} class={devclass} devid={devid}{named} "
                "outcome={outcome} duration={duration:.3f}s",
                op=op,
                domid=domid,
                devclass=devclass,
                devid=shown.devid,
                vdev=shown.vdev,
                named=f" ({shown.vdev})" if shown.vdev and shown.vdev != str(shown.devid) else "",
                outcome=outcomeOf(result),
                duration=clock.seconds() - began,
            )
            return result

        return Deferred.fromCoroutine(run()).addBoth(done)

    def _clock(self) -> Any:
        """The reactor that times operations (the global one only without any)."""
        if self.reactor is None:
            from twisted.internet import reactor

            return reactor
        return self.reactor

    # Questions

    def getBlockDeviceClass(self, domid: int, dev: object) -> Deferred[str | None]:
        """
        Which block class (vbd, tap, tap2) serves device C{dev} (a devid or
        a name like C{xvda}) of a domain, from the toolstack's records.
        """

        async def find() -> str | None:
            try:
                info = await self.domainInfo(domid)
            except NotAGuestError:
                return None  # dom0: no class of ours made any of its devices
            for devclass in BLOCK_CLASSES:
                if devclass not in self.controllerClasses:
                    continue
                ctrl = self._make(self.controllerClasses[devclass], info)
                try:
                    number = await ctrl.convertToDeviceNumber(dev)
                except (DeviceConfigError, DeviceNotFoundError):
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
            try:
                ctrl = await self.controller(domid, devclass)
                ours = await ctrl.deviceIDs()
            except NotAGuestError:
                # dom0 (no vm record) has none of our devices, but xl may
                # have attached some: listed as for any domain. The
                # controller only names paths here; it keeps no record.
                ctrl = self._make(self.controllerClasses[devclass], DomainInfo(domid, ""))
                ours = []
            out = []
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
        common = ("state", "event-channel", "ring-ref", "tx-ring-ref", "mac")
        # The class's keys (a vif's rings) are read in the same round.
        keys = common + tuple(k for k in ctrl.listedFrontendKeys if k not in common)
        read = await gatherResults(
            [self.xs.readOrNone(f"{front}/{k}") for k in keys], consumeErrors=True
        )
        values = dict(zip(keys, read, strict=True))
        state, ring = values["state"], values["ring-ref"]
        return DeviceRow(
            ctrl.deviceClass,
            devid,
            int(backendId) if backendId is not None and backendId.isdigit() else None,
            ctrl.listingHandle(devid),
            int(state) if state is not None and state.isdigit() else None,
            values["event-channel"],
            ring if ring is not None else values["tx-ring-ref"],
            backend,
            values["mac"],
            toolstack,
            ctrl.listingFacts(devid),
            {k: values[k] for k in ctrl.listedFrontendKeys},
        )

    async def _libxlDevices(self, domid: int, devclass: str) -> list[tuple[int, str | None]]:
        """
        (devid, backend path) of the devices C{xl} made for a domain, from
        libxl's own records (C{/libxl/<domid>/device/<kind>/<devid>}:
        writable by dom0 only, unlike the guest's frontend directories).
        """
        found = []
        for kind in LIBXL_KINDS.get(devclass, (devclass,)):
            root = libxlClassPath(domid, kind)
            for name in await self.xs.ls(root, missingOk=True):
                if name.isdigit():
                    found.append((int(name), await self.xs.readOrNone(f"{root}/{name}/backend")))
        return found

    def waitForDevices(self, domid: int) -> Deferred[None]:
        """Wait until every device of the domain is connected."""

        async def wait() -> None:
            for devclass in self.controllerClasses:
                try:
                    ctrl = await self.controller(domid, devclass)
                except NotAGuestError:
                    return  # dom0: none of its devices is ours to wait for
                await ctrl.waitForDevices()

        return Deferred.fromCoroutine(wait())
