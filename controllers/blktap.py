# -*- test-case-name: tests.test_blktap -*-
"""
C{BlktapController} (class C{tap}, the deprecated blktap1) and
C{Blktap2Controller} (class C{tap2}, seed 001): block devices served by a
tapdisk.

Both take xend's C{uname} (C{tap:[tapdisk:]<type>:<path>} or C{tap2:...})
or an xl spec with such a prefix, like L{BlkifController}, whose parsing
and device numbering they reuse. The guest sees an ordinary vbd frontend
(C{device/vbd/<devid>}); the toolstack's records are under the class
(C{/vm/<uuid>/device/tap|tap2/<devid>}), so L{getBlockDeviceClass} tells
which class created a device.

The toolstack never runs C{tap-ctl}: it sends the driver domain a target
with C{type=tap} and the C{tap} driver-domain kind
(L{xenddev.driverdomain.kinds.tap}) does the work there - prepare spawns
and attaches the tapdisk, activate opens the image, deactivate pauses it,
unprepare destroys it - and creates the backend: C{backend/vbd} (blkback on
the tapdisk's node, with C{tapdisk-params}) for tap2, C{backend/tap} for
blktap1.

Facts from seed 001 (xend's blktap2 patch) and xend 4.0/4.1:

  - tap2 falls back to blktap1, logging C{WARNING: using deprecated blktap
    module}, for a C{tap:} disk whose type blktap2 does not serve
    (C{ioemu}, C{qcow2}, C{vmdk}, C{sync}) or when blktap2 is not installed;
    the device then belongs to class C{tap}. Seed 001 looked for blktap2 on
    the toolstack's host; here the question concerns the device's driver
    domain: its agent advertises the kinds it serves
    (C{backendctrl/kinds}, L{xenddev.backendctrl.protocol.kindsPath}) and
    blktap2 is there if C{tap} is among them. Only when the driver domain
    does not say (an older agent) is the local check used;
  - the tap2 backend lives in the C{vbd} backend directory; its
    configuration reads back as C{tap:<tapdisk-params>};
  - after a destroy, the tapdisk is released only once the backend is gone
    (xend ran this in an untracked thread; here it is a Deferred the
    destroy waits for). On a Xen 4.0 host without tap-ctl, the release is a
    C{remove} written to C{/sys/class/blktap2/blktap<N>/remove}
    (L{Blktap2Controller.sysfs});
  - pausing a domain pauses its tapdisks, unpausing resumes them.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import attrs
from twisted.internet.defer import Deferred, gatherResults
from twisted.logger import Logger

from xenddev.backendctrl.errors import DriverDomainError
from xenddev.backendctrl.protocol import kindsPath
from xenddev.controllers.blkif import (
    BlkifController,
    backendDomid,
    diskSpecFromConfig,
    frontendKeys,
    recordedConfig,
)
from xenddev.diskspec import (
    BLKTAP2_TYPES,
    DiskSpec,
    VdevError,
    blktapDiskType,
    vdevToNumber,
)
from xenddev.interfaces import ITransaction
from xenddev.tapctl import BlktapSysfs, minorOfDevice
from xenddev.toolstack.client import PlugResult
from xenddev.toolstack.controller import DeviceConfigError, DeviceDetails, DeviceError
from xenddev.xenstore.errors import XenStoreTimeout

#: seed 001's warning when a tap2 device is handed to blktap1.
DEPRECATED_WARNING = "WARNING: using deprecated blktap module"

_TAPCTL_FAILURE = re.compile(
    r"(?P<command>.*?) failed \((?:exit (?P<code>-?\d+)|killed)\)(?:: (?P<stderr>.*))?\Z",
    re.DOTALL,
)


class TapdiskError(DeviceError):
    """
    C{tap-ctl} failed in the driver domain; nothing was left behind.

    @ivar command: the command line, as text.
    @ivar exitCode: its exit status (None if it was killed).
    @ivar stderr: what it wrote on stderr.
    """

    code = "tapdisk-failed"

    def __init__(self, message: str, command: str, exitCode: int | None, stderr: str) -> None:
        super().__init__(message)
        self.command = command
        self.exitCode = exitCode
        self.stderr = stderr


def defaultBlktap2Available() -> bool:
    """
    blktap2 on this host: C{tap-ctl} on the PATH, or C{blktap2} in
    /proc/devices. Only the fallback for a driver domain whose agent does
    not advertise its kinds (L{Blktap2Controller.blktap2In}).
    """
    return shutil.which("tap-ctl") is not None or BlktapSysfs("/").installed()


async def advertisedKinds(xs: Any, driverDomid: int) -> list[str] | None:
    """
    The kinds a driver domain's agent says it serves, or None if it says
    nothing (an agent older than the advertisement, or none running).
    """
    text = await xs.readOrNone(kindsPath(driverDomid))
    return None if text is None else text.split()


@attrs.frozen
class TapDisk:
    """
    A blktap disk's configuration, parsed once (it travels in
    L{DeviceDetails.parsed}).

    @ivar config: the configuration as given.
    @ivar spec: the disk.
    @ivar typ: its blktap type (C{vhd}, C{aio}, C{qcow2}...).
    @ivar prefix: C{tap} or C{tap2}, as the configuration wrote it.
    """

    config: Mapping[str, Any]
    spec: DiskSpec
    typ: str
    prefix: str


def tapDisk(config: Mapping[str, Any]) -> TapDisk:
    """The disk, its blktap type and its C{tap}/C{tap2} prefix (DeviceConfigError)."""
    spec = diskSpecFromConfig(config)
    typ = blktapDiskType(spec)
    prefix = next((p for p in spec.legacyPrefixes if p in ("tap", "tap2")), None)
    if typ is None or prefix is None or not spec.target:
        raise DeviceConfigError(
            f"{config.get('uname') or config.get('spec')!r} is not a blktap disk "
            "(tap:<type>:<path> or tap2:<type>:<path>)"
        )
    return TapDisk(config, spec, typ, prefix)


class BlktapController(BlkifController):
    """blktap1 devices (class C{tap}); deprecated."""

    deviceClass: ClassVar[str] = "tap"
    frontendClass: ClassVar[str | None] = "vbd"
    backendClass: ClassVar[str | None] = "tap"
    #: xm's tap expressions are this class's own.
    alsoTakes: ClassVar[tuple[str, ...]] = ()
    #: The driver-domain target's C{driver}.
    driver: ClassVar[str] = "blktap1"

    log = Logger()

    @classmethod
    def devidFromConfig(cls, config: Mapping[str, str]) -> int | str | None:
        """None: a blktap device is reconfigured by its device id only (as before)."""
        return None

    def migrationConfig(self, recorded: Mapping[str, str]) -> dict[str, Any]:
        """The disk again from its record: xend's triple (C{tap:<type>:<path>}), its backend."""
        keys = ("uname", "dev", "mode", "backend")
        return {key: recorded[key] for key in keys if key in recorded}

    def getDeviceDetails(self, config: Mapping[str, Any]) -> DeviceDetails:
        """A C{tap:<type>:<path>} disk into a C{type=tap} target."""
        return self.tapDetails(tapDisk(config))

    def tapDetails(self, disk: TapDisk) -> DeviceDetails:
        """The details of a parsed blktap disk for this class's driver."""
        spec, typ = disk.spec, disk.typ
        if self.driver == "blktap1":
            self.log.warn(
                "blktap1 (device class tap) is deprecated: {uname} for domain {domid}",
                uname=f"tap:{typ}:{spec.hostPath}",
                domid=self.domid,
            )
        try:
            devid = vdevToNumber(spec.vdev)
        except VdevError as e:
            raise DeviceConfigError(str(e)) from None
        backend = backendDomid(disk.config, spec)
        mode = "w!" if spec.sharedWrite else spec.access
        # A relative target names a path under /dev/ (xl-disk-configuration(5));
        # the driver domain takes absolute paths only (it answered EINVAL).
        path = spec.hostPath or ""
        target = {
            "type": "tap",
            "driver": self.driver,
            "taptype": typ,
            "params": path,
            "format": spec.format,
            "mode": mode,
            "devtype": spec.devtype,
        }
        recorded = {
            **recordedConfig(spec, f"tap:{typ}:{path}", mode, backend, self.driver),
            "tapdisk-params": f"{typ}:{path}",
        }
        return DeviceDetails(
            devid, target, frontendKeys(spec, devid), backend, config=recorded, parsed=disk
        )


class Blktap2Controller(BlktapController):
    """
    blktap2 devices (class C{tap2}): a tapdisk plus blkback on its node.

    @cvar blktap2Available: whether blktap2 can be used on this host (seed
        001 looked in /proc/devices): the answer for a driver domain that
        does not advertise its kinds (L{blktap2In}); injected in tests.
    @cvar sysfs: the Xen 4.0 kernel interface, if the tapdisks are to be
        released (and paused) through sysfs rather than through the driver
        domain's tap kind; None by default.
    """

    deviceClass: ClassVar[str] = "tap2"
    backendClass: ClassVar[str | None] = "vbd"
    driver: ClassVar[str] = "tapdisk2"

    blktap2Available: Callable[[], bool] = staticmethod(defaultBlktap2Available)
    sysfs: ClassVar[BlktapSysfs | None] = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._args = args
        self._kwargs = kwargs
        self._tapdevs: dict[int, str | None] = {}
        #: finishDeviceCleanup Deferreds not yet fired.
        self.pendingCleanups: set[Deferred[None]] = set()

    # Choosing blktap2 or blktap1

    def _blktap1(self) -> BlktapController:
        return BlktapController(*self._args, **self._kwargs)

    def blktap2In(self, driverDomid: int) -> Deferred[bool]:
        """
        Whether blktap2 serves in a driver domain: C{tap} among the kinds
        its agent advertises; L{blktap2Available} (this host) if it
        advertises none.
        """

        async def ask() -> bool:
            kinds = await advertisedKinds(self.xs, driverDomid)
            if kinds is None:
                return self.blktap2Available()
            return "tap" in kinds

        return Deferred.fromCoroutine(ask())

    def _usesBlktap1(self, disk: TapDisk, blktap2: bool = True) -> bool:
        if disk.typ in BLKTAP2_TYPES and blktap2:
            return False
        if disk.prefix == "tap":
            return True
        why = "is not a blktap2 type" if disk.typ not in BLKTAP2_TYPES else "needs blktap2"
        raise DeviceConfigError(
            f"tap2:{disk.typ} {why} and tap2: disks do not fall back to blktap1 "
            f"(use tap:{disk.typ})"
        )

    def getDeviceDetails(self, config: Mapping[str, Any]) -> DeviceDetails:
        """
        tap2 details for a blktap2 type, blktap1's for the others (a
        C{tap2:} disk of another type is refused here, before any read).
        Whether the driver domain has blktap2 is not known here (it takes
        a read); L{create} asks, and falls back then.
        """
        disk = tapDisk(config)
        if self._usesBlktap1(disk):
            return self._blktap1().tapDetails(disk)
        return self.tapDetails(disk)

    def create(self, details: DeviceDetails) -> Deferred[int]:
        """
        Create the tapdisk and blkback on it through the driver domain; or
        hand the device to blktap1 (class C{tap}) with seed 001's warning
        when the type needs it or the driver domain has no blktap2
        (L{blktap2In}).
        """
        disk = details.parsed
        assert isinstance(disk, TapDisk), "details not made by getDeviceDetails"

        async def create() -> int:
            if self._usesBlktap1(disk, await self.blktap2In(details.backendDomid)):
                self.log.warn(DEPRECATED_WARNING)
                blktap1 = self._blktap1()
                # Details made for blktap1 already (a type blktap2 does not
                # serve) are used as they are; blktap2's are made again.
                mine = details if self._usesBlktap1(disk) else blktap1.tapDetails(disk)
                return await blktap1.create(mine)
            return await super(Blktap2Controller, self).create(details)

        return Deferred.fromCoroutine(create())

    async def _writeFrontend(
        self, tx: ITransaction, details: DeviceDetails, plug: PlugResult, backendReady: bool
    ) -> None:
        await super()._writeFrontend(tx, details, plug, backendReady)
        # The tapdisk's node, for the sysfs release after a destroy.
        node = await tx.readOrNone(f"{plug.backendPath}/params")
        if node is not None:
            await tx.write(f"{self.devicePath(details.devid)}/tapdev", node)

    def _explain(self, e: BaseException, devid: int) -> BaseException:
        if isinstance(e, DriverDomainError):
            m = _TAPCTL_FAILURE.match(e.message or "")
            if m is not None and "tap-ctl" in m.group("command"):
                code = m.group("code")
                return TapdiskError(
                    f"Device {self.deviceLabel(devid, withClass=True)} could not be "
                    f"connected: {e.message}",
                    m.group("command"),
                    int(code) if code is not None else None,
                    m.group("stderr") or "",
                )
        return super()._explain(e, devid)

    # Reading back

    def getDeviceConfiguration(self, devid: int) -> Deferred[dict[str, str]]:
        """The recorded configuration, with C{uname} = C{tap:<tapdisk-params>}."""

        async def read() -> dict[str, str]:
            cfg = await super(Blktap2Controller, self).getDeviceConfiguration(devid)
            params = cfg.get("tapdisk-params")
            try:
                (live,) = await self.readBackend(devid, "tapdisk-params")
            except DeviceError:
                live = None
            params = live or params
            if params:
                cfg["uname"] = f"tap:{params}"
            return cfg

        return Deferred.fromCoroutine(read())

    # Destroying

    async def _destroy(self, name: object, mode: Any) -> None:
        devid = await self.convertToDeviceNumber(name)
        self._tapdevs[devid] = await self.xs.readOrNone(f"{self.devicePath(devid)}/tapdev")
        try:
            await super()._destroy(devid, mode)
        finally:
            self._tapdevs.pop(devid, None)

    def finishDeviceCleanup(self, backpath: str, path: str) -> Deferred[None]:
        """
        Wait until the backend directory is gone, then release the tapdisk.

        Through the driver domain, the release is the object's unprepare,
        which the protocol accepts only once the plug - and with it the
        backend directory - is gone, so this only confirms the order. With
        L{sysfs} set, C{remove} is written to the tapdisk's control node.
        C{path} is the tapdisk's node or the device's frontend path.
        """

        async def run() -> None:
            try:
                await self.xs.waitFor(backpath, lambda v: v is None, self.destroyTimeout)
            except XenStoreTimeout:
                raise DeviceError(
                    f"backend {backpath} still exists; the tapdisk was not released"
                ) from None
            node: str | None = path
            if not re.search(r"tapdev\d+\Z", path):
                tail = path.rsplit("/", 1)[-1]
                node = self._tapdevs.get(int(tail)) if tail.isdigit() else None
            if self.sysfs is not None and node:
                await self.sysfs.remove(minorOfDevice(node))

        d = Deferred.fromCoroutine(run())
        self.pendingCleanups.add(d)

        def forget(result: object) -> object:
            self.pendingCleanups.discard(d)
            return result

        return d.addBoth(forget)

    # Domain pause / unpause

    async def _eachDevice(self, fn: Callable[[int, str, int, str | None], Any]) -> None:
        jobs = []
        for devid in await self.deviceIDs():
            record = self.devicePath(devid)
            vdi, backendId, node = await gatherResults(
                [self.xs.readOrNone(f"{record}/{k}") for k in ("vdi", "backend-id", "tapdev")]
            )
            if vdi is not None and backendId is not None:
                jobs.append(fn(devid, vdi, int(backendId), node))
        await gatherResults(jobs, consumeErrors=True)

    def pauseDevices(self) -> Deferred[None]:
        """Pause every tapdisk of the domain (domain pause)."""

        def pause(devid: int, vdi: str, dd: int, node: str | None) -> Deferred[None]:
            if self.sysfs is not None and node:
                return self.sysfs.pause(minorOfDevice(node))
            return self._driverDomain(dd).deactivate(vdi, self.objectClass)

        return Deferred.fromCoroutine(self._eachDevice(pause))

    def unpauseDevices(self) -> Deferred[None]:
        """Resume every tapdisk of the domain (domain unpause)."""

        def resume(devid: int, vdi: str, dd: int, node: str | None) -> Deferred[None]:
            if self.sysfs is not None and node:
                return self.sysfs.resume(minorOfDevice(node))
            return self._driverDomain(dd).activate(vdi, self.objectClass)

        return Deferred.fromCoroutine(self._eachDevice(resume))
