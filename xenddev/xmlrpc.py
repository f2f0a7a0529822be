# -*- test-case-name: tests.test_xmlrpc -*-
"""
The XML-RPC service: xend's device methods and a modern namespace, over a
L{DeviceManager}.

Namespaces (see C{docs/xmlrpc.md} for every method):

  - C{xend.domain.*}: xend's device methods with its argument shapes
    (s-expressions as xmlrpclib sends them, or as text);
  - C{device.*}: plain structs (C{attach}, C{detach}, C{list},
    C{configure}, C{classes});
  - C{daemon.status}; C{system.listMethods}, C{system.methodHelp},
    C{system.methodSignature}.

Every method checks its arguments before the manager sees them and turns
every failure into a L{Fault} with a stable code (L{FaultCode}) and a
message a person can act on; tracebacks go only to the log. Each device
operation logs one line with domain, class, device id, outcome and
duration.
"""

from __future__ import annotations

import enum
import functools
import inspect
import os
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import Site
from twisted.web.xmlrpc import XMLRPC, Fault, addIntrospection

import xenddev
from xenddev.controller import DeviceError
from xenddev.diskspec import DiskError, VdevError, numberToVdev, vdevToNumber
from xenddev.driverdomain.errors import DriverDomainTimeout
from xenddev.sxp import SxpError, toConfig
from xenddev.toolstack import DeviceManager, DeviceRow
from xenddev.xenstore.errors import (
    AccessDeniedError,
    TransactionRetriesExhausted,
    XenStoreConnectionLost,
    XenStoreTimeout,
)

T = TypeVar("T")

#: The highest guest domain id (DOMID_FIRST_RESERVED - 1).
DOMID_MAX = 0x7FEF
_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,64}\Z")
_CLASS = re.compile(r"[a-z][a-z0-9_]{0,15}\Z")
_KEY = re.compile(r"[a-z][a-z0-9_-]{0,31}\Z")
MAX_STRING = 4096


class FaultCode(enum.IntEnum):
    """The fault codes of this service (stable; documented in docs/xmlrpc.md)."""

    INTERNAL = 1  # a bug or an unexpected condition: the log has the details
    GENERIC = 2  # the operation failed (xend's XendError/VmError)
    INVALID_DOMAIN = 3  # no such domain, or a domain id out of range
    BAD_CONFIG = 10  # bad arguments, unparsable s-expression, invalid config
    NO_SUCH_DEVICE = 11
    DEVICE_EXISTS = 12  # the device id is in use (or the device is busy)
    TIMEOUT = 13  # XenStore or the driver domain did not answer in time
    PERMISSION = 14  # XenStore refused access
    HOTPLUG_FAILED = 15  # the hotplug script failed, was busy or never reported
    UNAVAILABLE = 16  # the XenStore connection is down or the daemon is stopping
    # Twisted's own: 8001 no such method, 8002 malformed request.


#: DeviceError.code → fault code.
DEVICE_ERROR_CODES = {
    "bad-config": FaultCode.BAD_CONFIG,
    "device-exists": FaultCode.DEVICE_EXISTS,
    "no-such-device": FaultCode.NO_SUCH_DEVICE,
    "no-such-domain": FaultCode.INVALID_DOMAIN,
    "hotplug-failed": FaultCode.HOTPLUG_FAILED,
    "device-error": FaultCode.GENERIC,
}


def rpcFault(code: FaultCode, message: str) -> Fault:
    """A Fault with one of our codes."""
    return Fault(int(code), message)


def toFault(error: BaseException, log: Logger, method: str) -> Fault:
    """
    The Fault for an exception. Unexpected exceptions are logged with their
    traceback and a reference the caller can quote; only that reference
    reaches the caller.
    """
    if isinstance(error, Fault):
        return error
    if isinstance(error, SxpError):
        return rpcFault(FaultCode.BAD_CONFIG, str(error))
    if isinstance(error, DeviceError):
        code = DEVICE_ERROR_CODES.get(error.code, FaultCode.GENERIC)
        return rpcFault(code, error.message)
    if isinstance(error, DiskError | VdevError):
        return rpcFault(FaultCode.BAD_CONFIG, str(error))
    if isinstance(error, XenStoreTimeout | DriverDomainTimeout):
        return rpcFault(FaultCode.TIMEOUT, f"timed out: {error}; the operation may be retried")
    if isinstance(error, AccessDeniedError | PermissionError):
        return rpcFault(FaultCode.PERMISSION, f"permission denied: {error}")
    if isinstance(error, TransactionRetriesExhausted):
        return rpcFault(FaultCode.DEVICE_EXISTS, f"XenStore is busy ({error}); retry the operation")
    if isinstance(error, XenStoreConnectionLost):
        return rpcFault(
            FaultCode.UNAVAILABLE, "the daemon lost its XenStore connection; retry shortly"
        )
    if isinstance(error, CancelledError):
        return rpcFault(
            FaultCode.UNAVAILABLE, "the operation was cancelled (is the daemon stopping?)"
        )
    reference = uuid.uuid4().hex[:12]
    log.failure(
        "Internal error in {method} (reference {reference})",
        Failure(error, type(error), error.__traceback__),
        method=method,
        reference=reference,
    )
    return rpcFault(
        FaultCode.INTERNAL,
        f"internal error in {method} (reference {reference}); the daemon log has the details",
    )


def rpcMethod(
    signature: list[list[str]],
) -> Callable[[Callable[..., Coroutine[Any, Any, T]]], Callable[..., Deferred[T]]]:
    """
    Publish an C{async def xmlrpc_*} method: check the number of arguments,
    run it as a Deferred, and turn any exception into a L{Fault}. Its
    docstring is its C{system.methodHelp}.
    """

    def decorate(fn: Callable[..., Coroutine[Any, Any, T]]) -> Callable[..., Deferred[T]]:
        sig = inspect.signature(fn)
        params = list(sig.parameters.values())[1:]
        names = [{"devclass": "class"}.get(p.name, p.name) for p in params]
        required = sum(p.default is inspect.Parameter.empty for p in params)
        usage = ", ".join(n if i < required else f"[{n}]" for i, n in enumerate(names))
        counts = str(required) if required == len(params) else f"{required} to {len(params)}"

        @functools.wraps(fn)
        def wrapper(self: _Namespace, *args: Any) -> Deferred[T]:
            name = f"{self.prefix}.{fn.__name__.removeprefix('xmlrpc_')}"
            try:
                sig.bind(self, *args)
            except TypeError:
                d: Deferred[T] = Deferred()
                d.errback(
                    rpcFault(
                        FaultCode.BAD_CONFIG,
                        f"{name}({usage}) takes {counts} argument(s), not {len(args)}",
                    )
                )
                return d
            d = Deferred.fromCoroutine(fn(self, *args))

            def failed(f: Failure) -> Failure:
                assert f.value is not None
                return Failure(toFault(f.value, self.log, name))

            return d.addErrback(failed)

        wrapper.signature = signature  # type: ignore[attr-defined]
        wrapper.help = inspect.cleandoc(fn.__doc__ or "")  # type: ignore[attr-defined]
        return wrapper

    return decorate


# Argument checks


def checkString(value: object, what: str, pattern: re.Pattern[str] | None = None) -> str:
    """A string argument (non-empty, bounded, matching C{pattern})."""
    if not isinstance(value, str):
        raise rpcFault(FaultCode.BAD_CONFIG, f"{what} must be a string, not {type(value).__name__}")
    if not value or len(value) > MAX_STRING:
        raise rpcFault(FaultCode.BAD_CONFIG, f"{what} must be 1..{MAX_STRING} characters")
    if pattern is not None and not pattern.match(value):
        raise rpcFault(FaultCode.BAD_CONFIG, f"invalid {what} {value!r}")
    return value


def checkBool(value: object, what: str) -> bool:
    """A flag: a boolean, 0/1, or "0"/"1"/"true"/"false"/"yes"/"no"."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.lower() in ("0", "1", "true", "false", "yes", "no"):
        return value.lower() in ("1", "true", "yes")
    raise rpcFault(FaultCode.BAD_CONFIG, f"{what} must be a boolean, not {value!r}")


def checkDevid(value: object) -> int | str:
    """A device id: a number, or a name the controller resolves (xvdb, a MAC)."""
    if isinstance(value, bool):
        raise rpcFault(FaultCode.BAD_CONFIG, f"invalid device id {value!r}")
    if isinstance(value, int):
        if not 0 <= value < 2**31:
            raise rpcFault(FaultCode.BAD_CONFIG, f"device id {value} out of range")
        return value
    text = checkString(value, "device id")
    if len(text) > 64 or any(c.isspace() for c in text):
        raise rpcFault(FaultCode.BAD_CONFIG, f"invalid device id {text!r}")
    return int(text) if text.isascii() and text.isdigit() else text


def checkConfig(value: object) -> dict[str, str | int]:
    """A configuration struct: word keys, string or integer values (nil dropped)."""
    if not isinstance(value, dict):
        raise rpcFault(
            FaultCode.BAD_CONFIG,
            f"config must be a struct of key → value, not {type(value).__name__}",
        )
    out: dict[str, str | int] = {}
    for key, item in value.items():
        if not isinstance(key, str) or not _KEY.match(key):
            raise rpcFault(FaultCode.BAD_CONFIG, f"invalid config key {key!r}")
        if item is None:
            continue
        if isinstance(item, bool) or not isinstance(item, str | int):
            raise rpcFault(
                FaultCode.BAD_CONFIG,
                f"config value of {key} must be a string or an integer, not {type(item).__name__}",
            )
        if isinstance(item, str) and len(item) > MAX_STRING:
            raise rpcFault(FaultCode.BAD_CONFIG, f"config value of {key} is too long")
        out[key] = item
    return out


class _Namespace(XMLRPC):
    """A group of methods sharing the service's manager and helpers."""

    prefix = ""
    log = Logger()

    def __init__(self, service: DeviceRPC) -> None:
        super().__init__(allowNone=True, useDateTime=False)
        self.service = service
        self.manager = service.manager


class XendDomainNamespace(_Namespace):
    """C{xend.domain.*}: xend's device methods."""

    prefix = "xend.domain"

    @rpcMethod([["array", "int", "array"], ["array", "string", "string"]])
    async def xmlrpc_device_create(self, dom: object, sxpr: object) -> list[Any]:
        """
        device_create(dom, sxpr) → [class, [dom, <domid>, id, <devid>]]

        Create a device from xm's s-expression, e.g.
        (vbd (uname phy:/dev/sda) (dev xvda) (mode w)) or
        (vif (mac 00:16:3e:00:00:01) (bridge xenbr0)), as a nested array or as
        text. Fires once the device is connected.
        """
        domid = await self.service.resolveDomain(dom)
        devclass, config = self.service.deviceSxpr(sxpr)
        devid = await self.service.attach(domid, devclass, config)
        return [devclass, ["dom", domid, "id", devid]]

    @rpcMethod([["boolean", "int", "array"], ["boolean", "int", "array", "string"]])
    async def xmlrpc_device_configure(
        self, dom: object, sxpr: object, devid: object = None
    ) -> bool:
        """
        device_configure(dom, sxpr[, devid]) → true

        Reconfigure a device in place (a cdrom media change). Without devid
        the device is found from the expression (dev for vbd; devid or mac
        for vif).
        """
        domid = await self.service.resolveDomain(dom)
        devclass, config = self.service.deviceSxpr(sxpr)
        if devid is None:
            devid = _devidFromConfig(devclass, config)
        await self.service.configure(domid, devclass, checkDevid(devid), config)
        return True

    @rpcMethod([["boolean", "int", "string", "string", "boolean", "boolean"]])
    async def xmlrpc_destroyDevice(
        self,
        dom: object,
        devclass: object,
        devid: object,
        force: object = False,
        rm_cfg: object = False,
    ) -> bool:
        """
        destroyDevice(dom, class, devid[, force[, rm_cfg]]) → true

        Detach a device: devid is a number, a vbd name (xvdb) or a vif MAC.
        force skips waiting for the guest to close it. rm_cfg is accepted for
        compatibility: there is no stored domain configuration to edit.
        """
        domid = await self.service.resolveDomain(dom)
        cls = self.service.checkClass(devclass)
        number = checkDevid(devid)
        forced = checkBool(force, "force")
        checkBool(rm_cfg, "rm_cfg")
        await self.service.detach(domid, cls, number, forced)
        return True

    @rpcMethod([["array", "int", "string"]])
    async def xmlrpc_getDeviceSxprs(self, dom: object, devclass: object) -> list[Any]:
        """
        getDeviceSxprs(dom, class) → [[devid, [[key, value], ...]], ...]

        Each device's frontend directory (what xm block-list printed).
        """
        domid = await self.service.resolveDomain(dom)
        cls = self.service.checkClass(devclass)
        ctrl = await self.manager.controller(domid, cls)
        return await ctrl.sxprs()

    @rpcMethod([["boolean", "int"]])
    async def xmlrpc_waitForDevices(self, dom: object) -> bool:
        """
        waitForDevices(dom) → true

        Wait until every device of the domain is connected.
        """
        domid = await self.service.resolveDomain(dom)
        await self.manager.waitForDevices(domid)
        return True

    @rpcMethod([["string", "int", "string"], ["string", "int", "int"]])
    async def xmlrpc_getBlockDeviceClass(self, dom: object, dev: object) -> str | None:
        """
        getBlockDeviceClass(dom, dev) → vbd | tap | tap2 | nil

        Which block class serves a device (a number or a name like xvda),
        or nil when there is no such device.
        """
        domid = await self.service.resolveDomain(dom)
        return await self.manager.getBlockDeviceClass(domid, checkDevid(dev))


class XendNamespace(_Namespace):
    """C{xend.*}: only the C{domain} sub-namespace."""

    prefix = "xend"

    def __init__(self, service: DeviceRPC) -> None:
        super().__init__(service)
        self.putSubHandler("domain", XendDomainNamespace(service))


class DeviceNamespace(_Namespace):
    """C{device.*}: plain structs."""

    prefix = "device"

    @rpcMethod([["struct", "int", "string", "struct"]])
    async def xmlrpc_attach(self, dom: object, devclass: object, config: object) -> dict[str, Any]:
        """
        attach(dom, class, config) → {domain, class, devid}

        Create a device. vbd: {spec: "<xl disk spec>"} or {uname, dev, mode}
        with optional backend; vif: {mac, bridge, script, ip, vifname, model,
        rate, backend, devid}, all optional. Fires once connected.
        """
        domid = await self.service.resolveDomain(dom)
        cls = self.service.checkClass(devclass)
        cfg = checkConfig(config)
        devid = await self.service.attach(domid, cls, cfg)
        return {"domain": domid, "class": cls, "devid": devid}

    @rpcMethod([["boolean", "int", "string", "int", "boolean"]])
    async def xmlrpc_detach(
        self, dom: object, devclass: object, devid: object, force: object = False
    ) -> bool:
        """
        detach(dom, class, devid[, force]) → true

        Destroy a device: devid is a number, a vbd name (xvdb) or a vif MAC.
        force does not wait for the guest to close the device.
        """
        domid = await self.service.resolveDomain(dom)
        cls = self.service.checkClass(devclass)
        await self.service.detach(domid, cls, checkDevid(devid), checkBool(force, "force"))
        return True

    @rpcMethod([["array", "int"], ["array", "int", "string"]])
    async def xmlrpc_list(self, dom: object, devclass: object = None) -> list[dict[str, Any]]:
        """
        list(dom[, class]) → [{class, devid, handle, backend-id, state,
        event-channel, ring-ref, backend-path, vdev | mac, ...}, ...]

        The devices of a domain (of one class, or of every class). Unknown
        values are left out of a struct.
        """
        domid = await self.service.resolveDomain(dom)
        classes = (
            [self.service.checkClass(devclass)]
            if devclass is not None
            else sorted(self.manager.controllerClasses)
        )
        out: list[dict[str, Any]] = []
        for cls in classes:
            for row in await self.manager.listDevices(domid, cls):
                out.append(await self.service.rowStruct(domid, row))
        return out

    @rpcMethod([["struct", "int", "string", "int", "struct"]])
    async def xmlrpc_configure(
        self, dom: object, devclass: object, devid: object, config: object
    ) -> dict[str, Any]:
        """
        configure(dom, class, devid, config) → {domain, class, devid}

        Reconfigure a device in place (a vbd cdrom media change).
        """
        domid = await self.service.resolveDomain(dom)
        cls = self.service.checkClass(devclass)
        number = await self.service.configure(domid, cls, checkDevid(devid), checkConfig(config))
        return {"domain": domid, "class": cls, "devid": number}

    @rpcMethod([["array"]])
    async def xmlrpc_classes(self) -> list[str]:
        """classes() → the device classes this daemon serves."""
        return sorted(self.manager.controllerClasses)


class DaemonNamespace(_Namespace):
    """C{daemon.*}: the service itself."""

    prefix = "daemon"

    @rpcMethod([["struct"]])
    async def xmlrpc_status(self) -> dict[str, Any]:
        """
        status() → {version, pid, uptime, in-flight, classes}

        The daemon's version, process id, seconds since the service started,
        device operations in progress and the device classes it serves.
        """
        return {
            "version": xenddev.__version__,
            "pid": os.getpid(),
            "uptime": round(self.service.clock() - self.service.started, 3),
            "in-flight": self.manager.inFlight,
            "classes": sorted(self.manager.controllerClasses),
        }


class DeviceRPC(XMLRPC):
    """
    The XML-RPC resource over a L{DeviceManager}.

    @param manager: the toolstack's device manager.
    @param clock: a monotonic clock for durations (injected in tests).
    """

    log = Logger()

    def __init__(self, manager: DeviceManager, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(allowNone=True, useDateTime=False)
        self.manager = manager
        self.clock = clock
        self.started = clock()
        self.putSubHandler("xend", XendNamespace(self))
        self.putSubHandler("device", DeviceNamespace(self))
        self.putSubHandler("daemon", DaemonNamespace(self))
        addIntrospection(self)

    # Checks shared by the namespaces

    async def resolveDomain(self, dom: object) -> int:
        """A domain id from a number, a decimal string or a domain name."""
        if isinstance(dom, bool):
            raise rpcFault(FaultCode.BAD_CONFIG, f"dom must be a domain id or name, not {dom!r}")
        if isinstance(dom, str) and dom.isascii() and dom.isdigit():
            dom = int(dom)
        if isinstance(dom, int):
            if not 0 <= dom <= DOMID_MAX:
                raise rpcFault(
                    FaultCode.INVALID_DOMAIN, f"invalid domain id {dom}: must be 0..{DOMID_MAX}"
                )
            return dom
        if not isinstance(dom, str):
            raise rpcFault(
                FaultCode.BAD_CONFIG,
                f"dom must be a domain id or name, not {type(dom).__name__}",
            )
        name = checkString(dom, "domain name", _NAME)
        xs = self.manager.xs
        for entry in await xs.ls("/local/domain"):
            if entry.isdigit() and await xs.readOrNone(f"/local/domain/{entry}/name") == name:
                return int(entry)
        raise rpcFault(FaultCode.INVALID_DOMAIN, f"no domain named {name!r}")

    def checkClass(self, devclass: object) -> str:
        """A device class this daemon serves."""
        cls = checkString(devclass, "device class", _CLASS)
        if cls not in self.manager.controllerClasses:
            known = ", ".join(sorted(self.manager.controllerClasses))
            raise rpcFault(FaultCode.BAD_CONFIG, f"unknown device class {cls!r} (known: {known})")
        return cls

    def deviceSxpr(self, sxpr: object) -> tuple[str, dict[str, str]]:
        """An xm device expression as (class, config); tap/tap2 fall back to vbd."""
        if not isinstance(sxpr, str | list):
            raise rpcFault(
                FaultCode.BAD_CONFIG,
                f"sxpr must be an array or a string, not {type(sxpr).__name__}",
            )
        devclass, config = toConfig(sxpr)
        if devclass in ("tap", "tap2") and devclass not in self.manager.controllerClasses:
            # xm sends tap:* unames as class tap; the vbd controller takes them.
            devclass = "vbd"
        return self.checkClass(devclass), config

    # Device operations (one log line each)

    async def _logged(
        self, op: str, domid: int, devclass: str, devid: object, run: Awaitable[T]
    ) -> T:
        start = self.clock()
        outcome = "ok"
        result: Any = None
        try:
            result = await run
            return result
        except BaseException as e:
            fault = toFault(e, self.log, f"device {op}")
            outcome = f"fault {fault.faultCode}: {fault.faultString}"
            raise fault from None
        finally:
            self.log.info(
                "device {op}: domain={domid} class={devclass} devid={devid} "
                "outcome={outcome} duration={duration:.3f}s",
                op=op,
                domid=domid,
                devclass=devclass,
                devid=result if op == "attach" and outcome == "ok" else devid,
                outcome=outcome,
                duration=self.clock() - start,
            )

    def attach(self, domid: int, devclass: str, config: dict[str, Any]) -> Awaitable[int]:
        """createDevice, logged."""
        return self._logged(
            "attach", domid, devclass, "-", self.manager.createDevice(domid, devclass, config)
        )

    def detach(self, domid: int, devclass: str, devid: int | str, force: bool) -> Awaitable[None]:
        """destroyDevice, logged."""
        return self._logged(
            "detach",
            domid,
            devclass,
            devid,
            self.manager.destroyDevice(domid, devclass, devid, force),
        )

    def configure(
        self, domid: int, devclass: str, devid: int | str, config: dict[str, Any]
    ) -> Awaitable[int]:
        """reconfigureDevice, logged."""
        return self._logged(
            "configure",
            domid,
            devclass,
            devid,
            self.manager.reconfigureDevice(domid, devclass, devid, config),
        )

    async def rowStruct(self, domid: int, row: DeviceRow) -> dict[str, Any]:
        """A listing row as a plain struct (unknown values left out)."""
        out: dict[str, Any] = {
            "class": row.devclass,
            "devid": row.devid,
            "handle": row.handle,
            "backend-id": row.backendId,
            "state": row.state,
            "event-channel": _intOrText(row.eventChannel),
            "ring-ref": _intOrText(row.ringRef),
            "backend-path": row.backendPath,
            "mac": row.mac,
        }
        if row.devclass in ("vbd", "tap", "tap2"):
            try:
                out["vdev"] = numberToVdev(row.devid)
            except (ValueError, VdevError):
                pass
        if row.devclass == "vif":
            front = f"/local/domain/{domid}/device/vif/{row.devid}"
            out["tx-ring-ref"] = _intOrText(
                await self.manager.xs.readOrNone(f"{front}/tx-ring-ref")
            )
            out["rx-ring-ref"] = _intOrText(
                await self.manager.xs.readOrNone(f"{front}/rx-ring-ref")
            )
        return {k: v for k, v in out.items() if v is not None}


def _intOrText(value: str | None) -> int | str | None:
    if value is None:
        return None
    return int(value) if value.isascii() and value.isdigit() and len(value) < 10 else value


def _devidFromConfig(devclass: str, config: dict[str, str]) -> int | str:
    if devclass == "vbd" and config.get("dev"):
        name = config["dev"].removeprefix("ioemu:").split(":", 1)[0]
        try:
            return vdevToNumber(name)
        except VdevError as e:
            raise rpcFault(FaultCode.BAD_CONFIG, f"invalid dev {config['dev']!r}: {e}") from None
    if devclass == "vif":
        for key in ("devid", "mac"):
            if config.get(key):
                return config[key]
    raise rpcFault(
        FaultCode.BAD_CONFIG,
        f"device_configure: give a devid (the {devclass} expression does not name the device)",
    )


def rpcResource(manager: DeviceManager, clock: Callable[[], float] = time.monotonic) -> Resource:
    """The XML-RPC resource (any request path serves it)."""
    return DeviceRPC(manager, clock)


def rpcSite(manager: DeviceManager, clock: Callable[[], float] = time.monotonic) -> Site:
    """A Site serving L{rpcResource} (listen on it with a UNIX or TCP endpoint)."""
    site = Site(rpcResource(manager, clock))
    site.displayTracebacks = False
    return site
