# -*- test-case-name: tests.test_controllers -*-
"""
The device controller: xend's C{DevController} API as Deferred chains over
the backendctrl protocol and XenStore watches.

A controller serves one device class of one guest domain. It keeps no
state of its own: everything is in XenStore, in the guest's frontend
directories and in the toolstack's records under
C{/vm/<uuid>/device/<class>/<devid>}. Subclasses (in C{controllers/}) give
only class facts and hooks: how a configuration becomes a target and
frontend keys, how a device id is derived, what cleanup follows a destroy.

C{createDevice}: validate → ask the activation guard for the storage
target (L{IActivationGuard}: refused, naming the holder, before anything
is written) → reserve the device id in the records, with the guard's
grant (refusing a duplicate, inside a transaction, from the toolstack's
own records only) → C{prepare} → C{plug} → one transaction writing the
frontend, the backend cross-pointer, b-copy and the records → C{activate}
→ wait for C{hotplug-status}. Any failure, or C{cancel()}, runs the
compensating chain in reverse (the grant given back last), so the tree
ends exactly as it began.

C{destroyDevice}: C{online=0} and C{state=5} in one transaction → wait for
Closed → remove the frontend → C{unplug} (the driver domain runs the remove
script first) → C{deactivate} → C{unprepare} → remove the records →
C{finishDeviceCleanup} → give the grant back to the guard.

Migration (seed 000: "a vbd may be created with the vdi inactive"):
C{prepareIncoming} makes a device for a guest migrating in as
C{createDevice} does, but stops before C{activate} (the backend does not
connect: no hotplug script runs for an inactive object); C{activateDevice}
finishes it at the commit, C{deactivateDevice} stops a source's I/O at the
handover. C{migrate} is xend's per-device entry to the steps, which the
injected L{IStorageMigration} does once per guest.
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, ClassVar

import attrs
from twisted.internet.defer import CancelledError, Deferred, gatherResults
from twisted.internet.defer import TimeoutError as DeferTimeoutError
from twisted.logger import Logger
from zope.interface import implementer

from xenddev.backendctrl.errors import DriverDomainError, DriverDomainTimeout, StaleTokenError
from xenddev.backendctrl.protocol import ACTIVE, VDI, ObjectClass
from xenddev.errors import FaultCode, XenddevError
from xenddev.interfaces import (
    IActivationGuard,
    IDevController,
    IStorageMigration,
    ITransaction,
    IXenStore,
)
from xenddev.toolstack.activation import (
    GRANT_NODES,
    Claim,
    Grant,
    activationPath,
    grantFrom,
    readGrant,
    writeGrant,
)
from xenddev.toolstack.client import (
    DriverDomainClient,
    PlugResult,
    backendReady,
    populateFrontend,
)
from xenddev.xenbus import (
    DEVID_MAX,
    DeviceIdentity,
    HotplugStatus,
    Waiting,
    XenbusPathError,
    XenbusState,
    domainPath,
    frontendClassPath,
    parseBackendPath,
    recordClassPath,
    waitForHotplugStatus,
    waitForState,
)
from xenddev.xenstore.errors import XenStoreError, XenStoreTimeout
from xenddev.xenstore.paths import Perm

#: libxl's device timeouts (xend used 100 s).
DEFAULT_CREATE_TIMEOUT = 10.0
DEFAULT_DESTROY_TIMEOUT = 10.0
#: How long to wait for a driver domain to answer one request.
DEFAULT_REQUEST_TIMEOUT = 30.0
#: A DeviceDetails devid asking for the lowest free id.
ALLOCATE = -1
#: How many times an attach removes a frontend directory the guest made
#: before it gives up (a guest that may create one can make it again).
_GUEST_FRONTEND_REMOVALS = 3
#: The attempts of a transaction bounded by a deadline instead (its
#: backoff, capped at 200 ms, reaches the deadline long before these).
_UNTIL_DEADLINE = 1_000_000


class DeviceError(XenddevError):
    """
    A device operation failed (xend's C{VmError}); nothing was left behind.

    @ivar code: a stable name of the error (the metrics' outcome label).
    """

    code = "device-error"
    faultCode = FaultCode.GENERIC

    def __init__(self, message: str) -> None:
        self.message = message
        super().__init__(message)

    def faultMessage(self) -> str:
        """The message the operation failed with."""
        return self.message


class DeviceConfigError(DeviceError, ValueError):
    """The configuration is invalid; refused before anything was written."""

    code = "bad-config"
    faultCode = FaultCode.BAD_CONFIG


class DeviceExistsError(DeviceError):
    """The device id is already in use ("Device %s is already connected.")."""

    code = "device-exists"
    faultCode = FaultCode.DEVICE_EXISTS


class DeviceNotFoundError(DeviceError):
    """No such device ("Device %s not connected")."""

    code = "no-such-device"
    faultCode = FaultCode.NO_SUCH_DEVICE


class UnknownDomainError(DeviceError):
    """The guest domain does not exist in XenStore."""

    code = "no-such-domain"
    faultCode = FaultCode.INVALID_DOMAIN


class NotAGuestError(UnknownDomainError):
    """
    The domain exists but has no C{/vm} record (dom0, or a domain another
    toolstack is still building): the toolstack keeps its device records
    there, so it attaches no device to it. Its devices made by xl are
    still listed.
    """

    code = "not-a-guest"

    def __init__(self, domid: int, name: str | None) -> None:
        self.domid = domid
        named = f" ({name})" if name else ""
        if domid == 0:
            why = "is dom0: xenddev attaches devices to guests only, not to dom0"
        else:
            why = "has no /vm record: xenddev attaches devices only to guests that have one"
        super().__init__(f"Domain {domid}{named} {why}")


class HotplugFailedError(DeviceError):
    """The hotplug script reported an error, was busy, or never reported."""

    code = "hotplug-failed"
    faultCode = FaultCode.HOTPLUG_FAILED


class DestroyMode(enum.Enum):
    """What destroyDevice does when the guest does not close in time."""

    SAFE = "safe"  # give up with an error, the device stays
    AUTO = "auto"  # libxl's FORCE_AUTO: proceed as forced after the timeout
    FORCE = "force"  # do not wait for the guest at all


@attrs.frozen
class DomainInfo:
    """The guest a controller serves."""

    domid: int
    vmPath: str


@attrs.frozen
class DeviceDetails:
    """
    What a subclass derives from a configuration (before anything is written).

    @ivar devid: the device id (the frontend directory name).
    @ivar target: the C{t/*} the driver domain prepares.
    @ivar frontend: frontend keys (besides backend/backend-id/state).
    @ivar backendExtras: keys the toolstack adds to the backend (rare).
    @ivar backendDomid: the driver domain.
    @ivar config: the normalised configuration, recorded for
        C{getDeviceConfiguration}.
    @ivar parsed: what the class parsed the configuration into (a disk
        spec...), for its own hooks: a configuration is parsed once per
        operation, and this travels with the details instead.
    """

    devid: int
    target: Mapping[str, str]
    frontend: Mapping[str, str]
    backendDomid: int = 0
    backendExtras: Mapping[str, str] = attrs.field(factory=dict)
    config: Mapping[str, str] = attrs.field(factory=dict)
    parsed: Any = attrs.field(default=None, eq=False)


class _GuestFrontend(XenddevError):
    """A frontend directory without a toolstack's record is in the way (caught inside)."""

    def __init__(self, path: str) -> None:
        self.path = path
        super().__init__(path)


class _Compensation:
    """Undo steps, run in reverse order when a creation fails."""

    def __init__(self) -> None:
        self._steps: list[tuple[str, Callable[[], Awaitable[Any]]]] = []

    def push(self, what: str, undo: Callable[[], Awaitable[Any]]) -> None:
        self._steps.append((what, undo))

    async def run(self, log: Logger) -> None:
        while self._steps:
            what, undo = self._steps.pop()
            try:
                await undo()
            except Exception:
                log.failure("Compensation step {what!r} failed", what=what)


@implementer(IDevController)
class DevController:
    """
    One device class of one guest. Subclasses set C{deviceClass} and
    override C{getDeviceDetails} (and hooks).

    @param xs: the toolstack's XenStore connection.
    @param domain: the guest.
    @param driverDomains: gives the protocol client of a driver domain:
        the L{DeviceManager}'s, its only owner (one client, hence one lock
        table, per driver domain). A controller made without it serves
        only what needs no driver domain (checking configurations, paths,
        records).
    @param guard: the activation guard the storage targets of attaches
        are claimed from (the daemon's: one host's, or the pool's); without
        one nothing is claimed.
    @param migration: the storage side of migrations to other hosts (a
        pool's); without it C{migrate} has nothing to do.
    """

    deviceClass: ClassVar[str] = "base"
    objectClass: ClassVar[ObjectClass] = VDI
    #: The frontend directory class (Blktap and Blktap2 use vbd).
    frontendClass: ClassVar[str | None] = None
    #: The backend directory class (Blktap2 maps tap2 to vbd).
    backendClass: ClassVar[str | None] = None
    #: Classes of device expressions this class takes when no controller
    #: of their own is served (xm sends tap:* unames as class tap; the vbd
    #: controller takes them).
    alsoTakes: ClassVar[tuple[str, ...]] = ()
    #: Frontend keys a listing reports besides the common ones (a vif's
    #: two rings).
    listedFrontendKeys: ClassVar[tuple[str, ...]] = ()

    log = Logger()

    def __init__(
        self,
        xs: IXenStore,
        domain: DomainInfo,
        createTimeout: float = DEFAULT_CREATE_TIMEOUT,
        destroyTimeout: float = DEFAULT_DESTROY_TIMEOUT,
        requestTimeout: float = DEFAULT_REQUEST_TIMEOUT,
        driverDomains: Callable[[int], DriverDomainClient] | None = None,
        guard: IActivationGuard | None = None,
        migration: IStorageMigration | None = None,
    ) -> None:
        self.xs = xs
        self.guard = guard
        self.migration = migration
        self.domain = domain
        self.domid = domain.domid
        self.createTimeout = createTimeout
        self.destroyTimeout = destroyTimeout
        self.requestTimeout = requestTimeout
        self._driverDomains = driverDomains

    # Paths (xend's names), all derived from the device's identity

    def identity(self, devid: int, backendDomid: int = 0) -> DeviceIdentity:
        """The device C{devid} of this class and guest, served by C{backendDomid}."""
        return DeviceIdentity(
            self.domid,
            self.deviceClass,
            devid,
            backendDomid=backendDomid,
            frontendClass=self.frontendClass,
            backendClass=self.backendClass,
        )

    def frontendRoot(self) -> str:
        """C{/local/domain/<domid>/device/<class>}."""
        return frontendClassPath(self.domid, self.frontendClass or self.deviceClass)

    def frontendPath(self, devid: int) -> str:
        """The frontend directory of a device."""
        return self.identity(devid).frontendPath

    def backendPath(self, backdom: int, devid: int) -> str:
        """Where the backend of a device lives in driver domain C{backdom}."""
        return self.identity(devid, backdom).backendPath

    def devicePath(self, devid: int) -> str:
        """The toolstack's record of a device: C{/vm/<uuid>/device/<class>/<devid>}."""
        return self.identity(devid).recordPath(self.domain.vmPath)

    def recordRoot(self) -> str:
        """The toolstack's records of this class: C{/vm/<uuid>/device/<class>}."""
        return recordClassPath(self.domain.vmPath, self.deviceClass)

    def vdiName(self, devid: int) -> str:
        """The name of the device's object in the driver domain's control area."""
        return f"{self.deviceClass}-{self.domid}-{int(devid)}"

    plugName = "p0"

    #: Retry budget of this controller's transactions. Devices of one guest
    #: are siblings in XenStore, so concurrent creates and destroys conflict
    #: on the shared parent (EAGAIN) by design; a compensation step that gave
    #: up would leave nodes behind, which is worse than waiting.
    transactAttempts: ClassVar[int] = 500

    # Subclass interface

    def getDeviceDetails(self, config: Mapping[str, Any]) -> DeviceDetails:
        """Turn a configuration into L{DeviceDetails}; raise DeviceConfigError."""
        raise NotImplementedError()

    def convertToDeviceNumber(self, devid: object) -> Deferred[int]:
        """
        A device id from an int, C{"class/NNN"} or a decimal string
        (subclasses add names: C{xvdb} for vbd, a MAC for vif, which may need
        a lookup, hence the Deferred).
        """
        d: Deferred[int] = Deferred()
        d.callback(_plainDevid(devid))
        return d

    @classmethod
    def devidFromConfig(cls, config: Mapping[str, str]) -> int | str | None:
        """
        The device a configuration names, for a reconfiguration given
        without a device id (xend's C{device_configure}): a number or a
        name L{convertToDeviceNumber} resolves; C{None} if it names none.
        """
        return None

    @classmethod
    def deviceName(cls, devid: int) -> str | None:
        """A person's name for a device id (a disk's vdev), or C{None}."""
        return None

    @classmethod
    def listingFacts(cls, devid: int) -> dict[str, str]:
        """What a listing adds for a device of this class (a disk's C{vdev})."""
        return {}

    def listingHandle(self, devid: int) -> int:
        """The C{handle} column of a listing (xl block-list: the guest)."""
        return self.domid

    @classmethod
    def deviceLabel(cls, devid: int, withClass: bool = False) -> str:
        """
        How messages name a device: its L{deviceName} beside its id when it
        has one (C{xvdq (268439552)}: a person wrote C{xvdq}, and the number
        alone does not say which disk it is), else its id; with the class,
        C{xvdb (vbd 51728)} or C{0 (vif)}.
        """
        name = cls.deviceName(devid)
        if name is None or name == str(devid):
            return f"{devid} ({cls.deviceClass})" if withClass else str(devid)
        return f"{name} ({cls.deviceClass} {devid})" if withClass else f"{name} ({devid})"

    def withDevid(self, details: DeviceDetails, devid: int) -> DeviceDetails:
        """The details once an allocated device id is known (see L{ALLOCATE})."""
        return attrs.evolve(details, devid=devid)

    def activationClaim(self, details: DeviceDetails) -> Claim | None:
        """
        Hook: the storage target a device's details claim from the
        activation guard (called with the device id known), or None for
        a device that uses none (a vif, an empty cdrom drive).
        """
        return None

    def migrationConfig(self, recorded: Mapping[str, str]) -> dict[str, Any]:
        """
        Hook: the configuration that makes this device again on another
        host (a migration's destination), from the one its record keeps
        (L{getDeviceConfiguration}); by default the record's as it is.
        """
        return dict(recorded)

    def finishDeviceCleanup(self, backpath: str, path: str) -> Deferred[None]:
        """Hook run after a device is destroyed (Blktap2 frees its tapdisk)."""
        d: Deferred[None] = Deferred()
        d.callback(None)
        return d

    #: Whether C{reconfigureDevice} may change a device's target in place
    #: (Blkif: a cdrom's medium); xend refused for every other class.
    changesMedium: ClassVar[bool] = False

    def checkReconfigure(
        self, devid: int, recorded: Mapping[str, str], details: DeviceDetails
    ) -> None:
        """
        Hook: refuse (DeviceConfigError) a reconfiguration the class does
        not allow, given the recorded configuration and the new details.
        """

    def reconfigureDevice(self, devid: object, config: Mapping[str, Any]) -> Deferred[int]:
        """
        Change a device's target in place (a cdrom's medium) through the
        driver domain's C{change} request, then wait for the hotplug script
        to connect the new medium; if it does not, the old medium is put
        back. Classes without L{changesMedium} refuse as xend did: "%s
        devices may not be reconfigured".
        """
        if not self.changesMedium:
            raise DeviceError(f"{self.deviceClass} devices may not be reconfigured")
        details = self.getDeviceDetails(config)  # raises before anything is written
        return Deferred.fromCoroutine(self._newMedium(devid, details))

    async def _newMedium(self, name: object, details: DeviceDetails) -> int:
        """
        L{_reconfigure} with the guard asked first for the new medium
        (refused before anything changes), the new grant given back if the
        change fails, and the old one once it is replaced.
        """
        previous = await readGrant(self.xs, self.devicePath(details.devid), self.domid)
        grant = await self._acquire(details)
        # The same target again is the same entry in the guard: kept.
        same = grant is not None and previous is not None and grant.target == previous.target
        try:
            devid = await self._reconfigure(name, details, grant)
        except BaseException:
            if not same:
                await self._release(grant)
            raise
        if not same:
            await self._release(previous)
        return devid

    async def _reconfigure(
        self, name: object, details: DeviceDetails, grant: Grant | None = None
    ) -> int:
        devid = await self.convertToDeviceNumber(name)
        # The device as a person named it: the configuration itself is no
        # message (it printed as a Python dict).
        refusal = f"Refusing to reconfigure device {self.deviceLabel(devid, withClass=True)}"
        if details.devid != devid:
            raise DeviceConfigError(
                f"{refusal}: the new configuration is another device, "
                f"{self.deviceLabel(details.devid)}"
            )
        recorded = await self.getDeviceConfiguration(devid)
        vdi, backendId, backend = await self.readVm(devid, "vdi", "backend-id", "backend")
        if vdi is None or backendId is None or backend is None:
            raise DeviceNotFoundError(f"Device {self.deviceLabel(devid)} not connected")
        # The class's refusal first: a disk that is not a cdrom is refused
        # as such, whichever driver domain the new medium names.
        self.checkReconfigure(devid, recorded, details)
        if int(backendId) != details.backendDomid:
            raise DeviceConfigError(f"{refusal}: the driver domain cannot change")
        dd = self._driverDomain(details.backendDomid)
        old = await dd.describe(vdi, self.objectClass)
        try:
            await self._replug(devid, details, dd, vdi, backend)
        except (DriverDomainError, DriverDomainTimeout) as e:
            raise DeviceError(f"{refusal}: {e}") from e
        except HotplugFailedError:
            self.log.warn(
                "New medium of {cls} {devid} of domain {domid} failed; putting the old one back",
                cls=self.deviceClass,
                devid=devid,
                domid=self.domid,
            )
            try:
                # The frontend's keys are the drive's, the same for both media.
                await self._replug(devid, details, dd, vdi, backend, old.target)
            except Exception:
                self.log.failure("Could not put the old medium of {vdi} back", vdi=vdi)
            raise

        async def record(tx: ITransaction) -> None:
            await tx.rm(f"{self.devicePath(devid)}/config", missingOk=True)
            await self._writeConfig(tx, devid, details.config)
            # The new medium's grant replaces the old one's (an empty drive has none).
            await tx.rm(activationPath(self.devicePath(devid)), missingOk=True)
            if grant is not None:
                await writeGrant(tx, grant)

        await self.xs.transact(record, self.transactAttempts)
        return devid

    async def _replug(
        self,
        devid: int,
        details: DeviceDetails,
        dd: DriverDomainClient,
        vdi: str,
        backend: str,
        target: Mapping[str, str] | None = None,
    ) -> None:
        """
        A new medium for a drive: the vbd is closed and unplugged, the
        object's target changed, and the vbd plugged again with a new
        frontend, which the guest sees as the disk leaving and coming back.
        Linux's blkback cannot do it in place: it keeps serving the device
        it opened ("changing physical device ... not supported", seen on
        real Xen), and its frontend does not reconnect to a backend that
        was closed under it.
        """
        if not await self._closeBackend(backend):
            self.log.warn(
                "Guest {domid} did not close {cls} {devid} for a medium change; forcing it",
                domid=self.domid,
                cls=self.deviceClass,
                devid=devid,
            )
        await self._removeFrontend(devid)
        await dd.unplug(vdi, self.plugName, self.objectClass)
        try:
            await dd.change(vdi, details.target if target is None else target, self.objectClass)
        except (DriverDomainError, DriverDomainTimeout):
            # Refused (the medium is not there...): the old one is still
            # the target; give the guest its drive back.
            await self._plugAgain(devid, details, dd, vdi)
            raise
        await self._plugAgain(devid, details, dd, vdi)

    async def _plugAgain(
        self, devid: int, details: DeviceDetails, dd: DriverDomainClient, vdi: str
    ) -> None:
        """Plug an active object's vbd again with a new frontend; wait until connected."""
        plug = await dd.plug(vdi, self.plugName, self.frontendPath(devid), self.objectClass)
        ready = await backendReady(self.xs, plug)
        await self.xs.transact(
            lambda tx: self._writeFrontend(tx, details, plug, ready), self.transactAttempts
        )
        await self._waitConnected(devid, plug.backendPath)

    async def _writeConfig(self, tx: ITransaction, devid: int, config: Mapping[str, str]) -> None:
        base = f"{self.devicePath(devid)}/config"
        await gatherResults(
            [tx.write(f"{base}/{k}", v) for k, v in config.items()], consumeErrors=True
        )

    # Lifecycle

    def _driverDomain(self, domid: int) -> DriverDomainClient:
        if self._driverDomains is None:
            # A second client would have a lock table of its own: requests
            # on one object would no longer be queued behind each other.
            raise RuntimeError(
                f"{type(self).__name__} for domain {self.domid} was made without a "
                "DeviceManager's driverDomains: it cannot reach a driver domain"
            )
        return self._driverDomains(domid)

    def _waits(self, backendPath: str) -> IXenStore | Waiting:
        """What to wait on a backend path with (its driver domain's standing watch)."""
        try:
            backend = parseBackendPath(backendPath)
        except XenbusPathError:
            return self.xs
        return self._driverDomain(backend.backendDomid).waits(backendPath)

    def createDevice(self, config: Mapping[str, Any]) -> Deferred[int]:
        """
        Create a device from C{config}; fires with its device id once the
        hotplug script has connected it. Cancelling the Deferred runs the
        compensating chain (the tree ends as it began).
        """
        return self.create(self.getDeviceDetails(config))  # raises before anything is written

    def create(self, details: DeviceDetails) -> Deferred[int]:
        """
        L{createDevice} from the details of a configuration already parsed
        (the L{DeviceManager} derives them once, to know which device to
        serialise the operation on).
        """
        return Deferred.fromCoroutine(self._create(details))

    def prepareIncoming(self, details: DeviceDetails, source: str) -> Deferred[int]:
        """
        A device for a guest migrating in from host C{source}: made as
        L{create} makes one, with its object prepared and its vbd plugged
        and the frontend written, but the object B{not} activated, so the
        backend does not connect (seed 000: "a vbd may be created with the
        vdi inactive"). Its claim names the source: a pool's guard grants
        it while the source still holds the target. Fires with the device
        id; L{activateDevice} finishes it at the migration's commit. A
        failure leaves nothing behind.
        """
        return Deferred.fromCoroutine(self._create(details, incoming=source))

    def activateDevice(self, devid: int) -> Deferred[None]:
        """
        Activate a device's object (if it is not active) and wait until
        its backend is connected (a migration's commit, or a source taking
        its guest back).
        """

        async def activate() -> None:
            dd, vdi, backend = await self._objectOf(devid)
            if await self.xs.readOrNone(dd.paths(vdi, self.objectClass).state) != ACTIVE:
                # The record's token: the pool's, once the handover moved the key here.
                grant = await readGrant(self.xs, self.devicePath(devid), self.domid)
                await dd.activate(vdi, self.objectClass, token=grant.token if grant else 0)
            await self._waitConnected(devid, backend)

        return Deferred.fromCoroutine(activate())

    def deactivateDevice(self, devid: int) -> Deferred[None]:
        """
        Deactivate a device's object if it is active: its I/O stops (a data
        path flushes and pauses), the vbd stays plugged (a migration's
        source at the handover).
        """

        async def deactivate() -> None:
            dd, vdi, _ = await self._objectOf(devid)
            if await self.xs.readOrNone(dd.paths(vdi, self.objectClass).state) == ACTIVE:
                await dd.deactivate(vdi, self.objectClass)

        return Deferred.fromCoroutine(deactivate())

    async def _objectOf(self, devid: int) -> tuple[DriverDomainClient, str, str]:
        """A device's driver domain client, object name and backend path (from its record)."""
        vdi, backendId, backend = await self.readVm(devid, "vdi", "backend-id", "backend")
        if vdi is None or backendId is None or not backendId.isdigit() or backend is None:
            raise DeviceNotFoundError(f"Device {self.deviceLabel(devid)} not connected")
        return self._driverDomain(int(backendId)), vdi, backend

    async def _create(self, details: DeviceDetails, incoming: str | None = None) -> int:
        devid = details.devid
        dd = self._driverDomain(details.backendDomid)
        # Before anything is written: the storage target may be in use by
        # another guest or host (ActivationConflict, naming the holder);
        # a domain without an agent would never answer (NoAgentError).
        # Nothing is left behind either way.
        grant = await self._acquire(details, incoming)
        try:
            await dd.checkAgent()
        except BaseException:
            await self._release(grant)
            raise
        undo = _Compensation()
        # The first step pushed is undone last: the grant goes back once
        # nothing of the device is left.
        undo.push("grant", lambda: self._release(grant))
        #: Whether the driver domain failed to answer a request: the undo
        #: then gives the object up at once instead of waiting again.
        unanswered = False

        async def undoObject() -> None:
            if not unanswered:
                try:
                    await dd.teardown(vdi, self.objectClass)
                    return
                except DriverDomainTimeout:
                    pass
            await dd.abandon(vdi, self.objectClass)

        try:
            devid = await self._reserve(details, grant)
            details = self.withDevid(details, devid)
            undo.push("reservation", lambda: self._removeRecord(devid))
            vdi = self.vdiName(devid)
            # One undo step takes the object down from whatever state it
            # reached (even a request whose caller was cancelled), or, if
            # its driver domain does not answer, removes what we wrote.
            undo.push("object", undoObject)
            await dd.prepare(vdi, details.target, self.objectClass)
            plug = await dd.plug(vdi, self.plugName, self.frontendPath(devid), self.objectClass)
            undo.push("frontend", lambda: self._removeFrontend(devid))
            ready = await backendReady(self.xs, plug)
            await self.xs.transact(
                lambda tx: self._writeFrontend(tx, details, plug, ready), self.transactAttempts
            )
            if incoming is None:
                # The driver domain checks the grant's fencing token (0: none).
                await dd.activate(vdi, self.objectClass, token=grant.token if grant else 0)
                await self._waitConnected(devid, plug.backendPath)
        except BaseException as e:
            self.log.info(
                "Creating {cls} {devid} for domain {domid} failed ({error}); undoing",
                cls=self.deviceClass,
                devid=devid,
                domid=self.domid,
                error=e,
            )
            unanswered = isinstance(e, DriverDomainTimeout)
            await undo.run(self.log)
            raise self._explain(e, devid) from e
        return devid

    def _explain(self, e: BaseException, devid: int) -> BaseException:
        # A stale fencing token keeps its own fault (12: a newer holder).
        if isinstance(e, DeviceError | CancelledError | StaleTokenError):
            return e
        if isinstance(e, DriverDomainError):
            return DeviceError(
                f"Device {self.deviceLabel(devid, withClass=True)} could not be connected: {e}"
            )
        if isinstance(e, DriverDomainTimeout):
            return DeviceError(
                f"Device {self.deviceLabel(devid, withClass=True)} could not be connected: "
                "the driver domain did not answer"
            )
        return e

    async def _acquire(self, details: DeviceDetails, incoming: str | None = None) -> Grant | None:
        """
        The guard's grant of the details' storage target (None: nothing
        claimed); C{incoming}: the host a migrating guest comes from.
        """
        claim = self.activationClaim(details)
        if claim is None or self.guard is None:
            return None
        if incoming is not None:
            claim = attrs.evolve(claim, migratingFrom=incoming)
        grant: Grant = await self.guard.acquire(claim)
        return grant

    async def _release(self, grant: Grant | None) -> None:
        """Give a grant back to the guard (which logs what it could not give back)."""
        if grant is not None and self.guard is not None:
            await self.guard.release(grant)

    async def _reserve(self, details: DeviceDetails, grant: Grant | None = None) -> int:
        """
        Claim the device id in our own records, or refuse a duplicate; with
        L{ALLOCATE}, claim the lowest free id. The guard's C{grant} is kept
        in the record. Fires with the id.
        """

        async def claim(tx: ITransaction) -> int:
            if not await tx.exists(domainPath(self.domid)):
                raise UnknownDomainError(f"Domain {self.domid} does not exist")
            # Only the toolstack's own records count (XSA-178: never trust
            # data a backend or guest may have written).
            devid = details.devid
            if devid == ALLOCATE:
                used = set(await tx.ls(self.recordRoot(), missingOk=True))
                devid = next(n for n in range(len(used) + 1) if str(n) not in used)
            record = self.devicePath(devid)
            front = self.frontendPath(devid)
            ours, there = await gatherResults(
                [tx.exists(record), tx.exists(front)], consumeErrors=True
            )
            if ours:
                raise DeviceExistsError(f"Device {self.deviceLabel(devid)} is already connected.")
            if there:
                if await self._libxlOwns(tx, devid):
                    raise DeviceExistsError(
                        f"Device {self.deviceLabel(devid)} is already connected (by xl)."
                    )
                raise _GuestFrontend(front)
            await tx.write(f"{record}/frontend", front)
            await tx.write(f"{record}/frontend-id", str(self.domid))
            await tx.write(f"{record}/backend-id", str(details.backendDomid))
            await tx.write(f"{record}/vdi", self.vdiName(devid))
            await self._writeConfig(tx, devid, details.config)
            if grant is not None:
                await writeGrant(tx, grant)
            return devid

        for _ in range(_GUEST_FRONTEND_REMOVALS):
            try:
                return await self.xs.transact(claim, self.transactAttempts)
            except _GuestFrontend as junk:
                # No record of ours or libxl's: the guest made it (it may
                # not, where the toolstack made its device directory). Like
                # libxl, which removes any frontend directory before making
                # its own, replace it; outside a transaction, so the
                # guest's writes in it cannot hold the attach up.
                self.log.warn(
                    "Removing {path}, a frontend directory no toolstack made",
                    path=junk.path,
                )
                await self.xs.rm(junk.path, missingOk=True)
        raise DeviceExistsError(
            f"Device {self.deviceLabel(details.devid)}: the guest keeps making its "
            "frontend directory"
        )

    async def _libxlOwns(self, tx: ITransaction, devid: int) -> bool:
        """Whether libxl (xl) has a record of this device (writable by dom0 only)."""
        found = await gatherResults(
            [tx.exists(path) for path in self.identity(devid).libxlPaths], consumeErrors=True
        )
        return any(found)

    async def _writeFrontend(
        self, tx: ITransaction, details: DeviceDetails, plug: PlugResult, backendReady: bool
    ) -> None:
        frontend = {"state": str(int(XenbusState.Initialising)), **details.frontend}
        await populateFrontend(tx, plug, self.domid, frontend, details.backendExtras, backendReady)
        await tx.write(f"{self.devicePath(details.devid)}/backend", plug.backendPath)

    async def _waitConnected(self, devid: int, backendPath: str) -> None:
        device = self.deviceLabel(devid, withClass=True)
        try:
            result = await waitForHotplugStatus(
                self._waits(backendPath), backendPath, self.createTimeout
            )
        except XenStoreTimeout:
            raise HotplugFailedError(
                f"Device {device} could not be connected. Hotplug scripts not working."
            ) from None
        if result.status is HotplugStatus.Error:
            raise HotplugFailedError(
                f"Device {device} could not be connected. "
                f"{result.error or 'Hotplug script failed.'}"
            )
        if result.status is HotplugStatus.Busy:
            raise HotplugFailedError(
                f"Device {device} could not be connected. {result.error or 'Device is busy.'}"
            )

    def waitForDevice(self, devid: int) -> Deferred[None]:
        """Wait until the device's hotplug script has connected it."""

        async def wait() -> None:
            backend = await self.xs.readOrNone(f"{self.devicePath(devid)}/backend")
            if backend is None:
                raise DeviceNotFoundError(f"Device {self.deviceLabel(devid)} not connected")
            await self._waitConnected(devid, backend)

        return Deferred.fromCoroutine(wait())

    def waitForDevices(self) -> Deferred[None]:
        """Wait for every device of this class."""

        async def wait() -> None:
            await gatherResults(
                [self.waitForDevice(d) for d in await self.deviceIDs()], consumeErrors=True
            )

        return Deferred.fromCoroutine(wait())

    def waitForDevice_destroy(self, devid: int, backpath: str) -> Deferred[None]:
        """Wait until the backend directory is gone."""
        waits = self._waits(backpath)
        d: Deferred[Any] = waits.waitFor(backpath, lambda v: v is None, self.destroyTimeout)
        return d.addCallback(lambda _: None)

    def destroyDevice(
        self, devid: object, force: bool = False, mode: DestroyMode | None = None
    ) -> Deferred[None]:
        """
        Destroy a device. By default a guest that does not close within the
        timeout is detached forcibly (libxl's FORCE_AUTO); C{force=True}
        does not wait for it; C{mode=DestroyMode.SAFE} gives up instead.
        """
        chosen = DestroyMode.FORCE if force else (mode or DestroyMode.AUTO)
        return Deferred.fromCoroutine(self._destroy(devid, chosen))

    async def _destroy(self, name: object, mode: DestroyMode) -> None:
        devid = await self.convertToDeviceNumber(name)
        record = self.devicePath(devid)
        granted = activationPath(record)
        # The grant's nodes in the same round trip as the rest.
        backend, vdi, backendId, *values = await gatherResults(
            [
                self.xs.readOrNone(f"{record}/backend"),
                self.xs.readOrNone(f"{record}/vdi"),
                self.xs.readOrNone(f"{record}/backend-id"),
                *(self.xs.readOrNone(f"{granted}/{node}") for node in GRANT_NODES),
            ],
            consumeErrors=True,
        )
        grant = grantFrom(values, self.domid, record)
        if vdi is None or backendId is None:
            raise DeviceNotFoundError(f"Device {self.deviceLabel(devid)} not connected")
        front = self.frontendPath(devid)
        ddId = int(backendId)
        # The driver domain's home (a read, not an exists: same answer, and
        # xenstored answers either in one round trip).
        if await self.xs.readOrNone(domainPath(ddId)) is None:
            await self._cleanToolstackSide(devid, ddId, vdi, "driver domain is gone")
            await self._release(grant)
            return
        if backend is not None and mode is not DestroyMode.FORCE:
            if not await self._closeBackend(backend):
                if mode is DestroyMode.SAFE:
                    raise DeviceError(
                        f"Device {self.deviceLabel(devid, withClass=True)} could not be "
                        "disconnected: the guest did not close it"
                    )
                self.log.warn(
                    "Guest {domid} did not close {cls} {devid}; detaching forcibly",
                    domid=self.domid,
                    cls=self.deviceClass,
                    devid=devid,
                )
        await self._removeFrontend(devid)
        try:
            await self._driverDomain(ddId).teardown(vdi, self.objectClass)
        except DriverDomainTimeout:
            await self._cleanToolstackSide(devid, ddId, vdi, "driver domain did not answer")
            await self._release(grant)
            return
        # The device's data path is gone with the teardown: its target is
        # free for others, given back while the record goes (in a pool, an
        # etcd round trip beside XenStore's).
        released = Deferred.fromCoroutine(self._release(grant))
        try:
            await self._removeRecord(devid)
            await self.finishDeviceCleanup(backend or self.backendPath(ddId, devid), front)
        finally:
            await released

    def _reactor(self) -> Any:
        """The reactor that times this controller's deadlines."""
        clock = getattr(self.xs, "reactor", None)
        if clock is None:
            from twisted.internet import reactor as clock
        return clock

    async def _transactWithin(
        self, fn: Callable[[ITransaction], Awaitable[None]], seconds: float
    ) -> bool:
        """
        Run a transaction, retrying its conflicts until C{seconds} have
        passed rather than for a number of attempts; whether it committed
        in time. For transactions a guest's writes may conflict with: the
        operation's deadline, not the guest, decides when to stop.
        """
        d = self.xs.transact(fn, _UNTIL_DEADLINE)
        d.addTimeout(max(seconds, 0.0), self._reactor())
        try:
            await d
        except DeferTimeoutError:
            return False
        return True

    async def _closeBackend(self, backend: str) -> bool:
        """
        Ask for a vbd/vif to close (C{online=0}, C{state=5}) and wait for
        Closed, both within C{destroyTimeout}; whether it closed.
        """
        clock = self._reactor()
        deadline = clock.seconds() + self.destroyTimeout
        while True:
            left = max(deadline - clock.seconds(), 0.0)
            if not await self._transactWithin(lambda tx: self._close(tx, backend), left):
                return False
            try:
                reached = await waitForState(
                    self._waits(backend),
                    backend,
                    (XenbusState.Closed, XenbusState.Connected),
                    max(deadline - clock.seconds(), 0.0),
                )
            except XenStoreTimeout:
                return False
            if reached is XenbusState.Closed:
                return True
            # Back to Connected after our Closing: the driver's switch to
            # Connected (deferred until its hotplug script reported) landed
            # after our write, and xenbus_switch_state overwrites the node.
            # Ask again, within the same deadline.
            self.log.info("Backend {path} reconnected after Closing; closing again", path=backend)

    async def _close(self, tx: ITransaction, backend: str) -> None:
        state = await tx.readOrNone(f"{backend}/state")
        if state is None:
            return  # the backend is gone already
        await tx.write(f"{backend}/online", "0")
        if XenbusState.parse(state) is not XenbusState.Closed:
            await tx.write(f"{backend}/state", str(int(XenbusState.Closing)))

    async def _cleanToolstackSide(self, devid: int, ddId: int, vdi: str, why: str) -> None:
        """The driver domain cannot help: remove what the toolstack owns."""
        self.log.warn(
            "Destroying {cls} {devid} of domain {domid} on the toolstack side only: {why}",
            cls=self.deviceClass,
            devid=devid,
            domid=self.domid,
            why=why,
        )

        await self._removeFrontend(devid)

        async def clean(tx: ITransaction) -> None:
            await tx.rm(self._driverDomain(ddId).paths(vdi, self.objectClass).base, missingOk=True)
            await _rmPruned(tx, self.devicePath(devid), 2)

        await self.xs.transact(clean, self.transactAttempts)

    async def _removeFrontend(self, devid: int) -> None:
        """
        Remove a device's frontend, then its class directory if left empty.

        The frontend goes in one request, outside any transaction: the
        guest writes there as it likes, and a transaction removing it
        conflicted with each of those writes (issue 13: a guest rewriting
        its C{state} starved the detach for 500 attempts, 62 s). The class
        directory (the toolstack's, which the guest may only read) is
        pruned in a transaction bounded by the destroy timeout; if that
        fails, an empty directory is all that is left.
        """
        front = self.frontendPath(devid)
        await self.xs.rm(front, missingOk=True)
        parent = front.rsplit("/", 1)[0]
        for _ in range(3):
            try:
                pruned = await self._transactWithin(
                    lambda tx: _pruneEmpty(tx, parent), self.destroyTimeout
                )
            except XenStoreError as e:
                # The C xenstored answers EIO to a transaction removing a
                # directory another transaction removed after this one
                # read it (concurrent detaches of one guest's devices).
                self.log.debug("Pruning {path}: {error}; again", path=parent, error=e)
                continue
            if not pruned:
                self.log.warn("Could not prune {path} in time; left empty", path=parent)
            return
        self.log.warn("Could not prune {path}; left empty", path=parent)

    def _removeRecord(self, devid: int) -> Deferred[None]:
        # <vm>/device goes too once empty: a domain another toolstack made
        # (xl writes no such directory) ends as it was before our devices.
        return self.xs.transact(
            lambda tx: _rmPruned(tx, self.devicePath(devid), 2), self.transactAttempts
        )

    # Reading

    def deviceIDs(self) -> Deferred[list[int]]:
        """The ids of this class's devices (from the toolstack's records)."""
        d: Deferred[list[str]] = self.xs.ls(self.recordRoot(), missingOk=True)
        return d.addCallback(lambda names: sorted(int(n) for n in names if n.isdigit()))

    def allocateDeviceID(self) -> Deferred[int]:
        """xend's monotonic counter in C{device-misc/<class>/nextDeviceID}."""
        path = f"{domainPath(self.domid)}/device-misc/{self.deviceClass}/nextDeviceID"

        async def bump(tx: ITransaction) -> int:
            current = int(await tx.readOrNone(path) or 0)
            await tx.write(path, str(current + 1))
            return current

        return self.xs.transact(bump)

    def getDeviceConfiguration(self, devid: int) -> Deferred[dict[str, str]]:
        """The configuration the device was created with (from our records)."""

        async def read() -> dict[str, str]:
            base = f"{self.devicePath(devid)}/config"
            keys = await self.xs.ls(base, missingOk=True)
            if not keys and not await self.xs.exists(self.devicePath(devid)):
                raise DeviceNotFoundError(f"Device {self.deviceLabel(devid)} not connected")
            values = await gatherResults(
                [self.xs.read(f"{base}/{k}") for k in keys], consumeErrors=True
            )
            return dict(zip(keys, values, strict=True))

        return Deferred.fromCoroutine(read())

    def configuration(self, devid: int) -> Deferred[list[Any]]:
        """The device as an s-expression: C{[class, [key, value], ...]}."""
        d = self.getDeviceConfiguration(devid)
        return d.addCallback(
            lambda cfg: [self.deviceClass, *([k, v] for k, v in sorted(cfg.items()))]
        )

    def configurations(self) -> Deferred[list[list[Any]]]:
        """Every device's s-expression."""

        async def all_() -> list[list[Any]]:
            return [await self.configuration(d) for d in await self.deviceIDs()]

        return Deferred.fromCoroutine(all_())

    def sxpr(self, devid: int) -> list[Any]:
        """xend's short form: C{[class, ['dom', domid, 'id', devid]]}."""
        return [self.deviceClass, ["dom", self.domid, "id", int(devid)]]

    def sxprs(self) -> Deferred[list[list[Any]]]:
        """C{[devid, [[key, value], ...]]} of each frontend directory (block-list)."""

        async def read() -> list[list[Any]]:
            out: list[list[Any]] = []
            for name in sorted(await self.xs.ls(self.frontendRoot(), missingOk=True)):
                if not name.isdigit():
                    continue
                keys = await self.xs.ls(f"{self.frontendRoot()}/{name}", missingOk=True)
                values = await gatherResults(
                    [self.xs.readOrNone(f"{self.frontendRoot()}/{name}/{k}") for k in keys],
                    consumeErrors=True,
                )
                out.append([int(name), [[k, v] for k, v in zip(keys, values, strict=True)]])
            return out

        return Deferred.fromCoroutine(read())

    def readBackend(self, devid: int, *keys: str) -> Deferred[list[str | None]]:
        """Values of keys in the device's backend directory."""
        return self._readUnder(f"{self.devicePath(devid)}/backend", keys, indirect=True)

    def readFrontend(self, devid: int, *keys: str) -> Deferred[list[str | None]]:
        """Values of keys in the device's frontend directory."""
        return self._readUnder(self.frontendPath(devid), keys)

    def readVm(self, devid: int, *keys: str) -> Deferred[list[str | None]]:
        """Values of keys in the device's record."""
        return self._readUnder(self.devicePath(devid), keys)

    def _readUnder(
        self, base: str, keys: tuple[str, ...], indirect: bool = False
    ) -> Deferred[list[str | None]]:
        async def read() -> list[str | None]:
            root = await self.xs.readOrNone(base) if indirect else base
            if root is None:
                raise DeviceNotFoundError(f"no such device ({base})")
            return list(
                await gatherResults(
                    [self.xs.readOrNone(f"{root}/{k}") for k in keys], consumeErrors=True
                )
            )

        return Deferred.fromCoroutine(read())

    def writeBackend(self, devid: int, values: Mapping[str, str]) -> Deferred[None]:
        """Write keys into the device's backend directory (one transaction)."""

        async def write(tx: ITransaction) -> None:
            backend = await tx.readOrNone(f"{self.devicePath(devid)}/backend")
            if backend is None or not await tx.exists(backend):
                raise DeviceNotFoundError(f"Device {self.deviceLabel(devid)} not connected")
            for key, value in values.items():
                await tx.write(f"{backend}/{key}", value)

        return self.xs.transact(write)

    def migrate(
        self,
        deviceConfig: Mapping[str, Any],
        network: bool,
        dst: str,
        step: int,
        domName: str,
        recover: bool = False,
    ) -> Deferred[int]:
        """
        xend's migration steps for this device, on the source host: 0
        checks that host C{dst} is live in the pool and can take the
        guest's storage targets, 1 prepares the guest's disks there
        (prepared and plugged, not activated), 2 (the guest suspended) is
        the handover — each vdi deactivated here, the activation keys moved
        to C{dst} in etcd, the vdis activated there —, 3 finishes here.
        With C{recover} (xend's C{recover_migrate}, C{step} the last step
        that succeeded) everything is put back. The steps are the guest's,
        done once however many of its disks ask (L{IStorageMigration}).
        A class that serves no storage, or a toolstack without a pool's
        migration, has nothing to do: 0 at once (xend's answer without an
        external migration tool).
        """
        if isinstance(step, bool) or step not in (0, 1, 2, 3):
            raise DeviceConfigError(f"migration step must be 0..3, not {step!r}")
        if not isinstance(dst, str) or not dst:
            raise DeviceConfigError(f"migration destination must be a host name, not {dst!r}")
        if self.migration is None or self.objectClass != VDI:
            d: Deferred[int] = Deferred()
            d.callback(0)
            return d
        result: Deferred[int] = self.migration.step(self.domid, dst, step, domName, recover)
        return result


def _plainDevid(devid: object) -> int:
    text = devid.rsplit("/", 1)[-1] if isinstance(devid, str) else ""
    if isinstance(devid, int) and not isinstance(devid, bool):
        number = devid
    elif text.isascii() and text.isdigit():
        number = int(text)
    else:
        raise DeviceConfigError(f"invalid device id {devid!r}")
    if not 0 <= number <= DEVID_MAX:
        # No device has such an id: no path can even be made for it.
        raise DeviceNotFoundError(f"Device {devid} not connected")
    return number


async def _pruneEmpty(tx: ITransaction, path: str) -> None:
    """Remove C{path} if it has no children (missing or empty, it is gone after)."""
    if not await tx.ls(path, missingOk=True):
        await tx.rm(path, missingOk=True)


async def _rmPruned(tx: ITransaction, path: str, ancestors: int = 1) -> None:
    """
    Remove a device directory, and up to C{ancestors} of its parents (its
    class directory C{.../device/<class>}, then C{device}) that are left
    empty, so a failed or finished device leaves no trace.
    """
    removed = tx.rm(path, missingOk=True)
    parent = path.rsplit("/", 1)[0]
    # Sent behind the removal, so it lists what is left.
    left = tx.ls(parent, missingOk=True)
    await removed
    if not await left:
        if ancestors > 1:
            await _rmPruned(tx, parent, ancestors - 1)
        else:
            await tx.rm(parent, missingOk=True)


def guestPerms(domid: int, backend: int) -> list[Perm]:
    """Frontend permissions: owned by the guest, readable by the driver domain."""
    return [Perm("n", domid), Perm("r", backend)]
