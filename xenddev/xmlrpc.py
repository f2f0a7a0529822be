# -*- test-case-name: tests.test_xmlrpc -*-
"""
The XML-RPC service: xend's device methods and a modern namespace, over a
L{DeviceManager}.

Namespaces (see C{docs/xmlrpc.md} for every method):

  - C{xend.domain.*}: xend's device methods with its argument shapes
    (s-expressions as xmlrpclib sends them, or as text);
  - C{device.*}: plain structs (C{attach}, C{detach}, C{list},
    C{configure}, C{classes});
  - C{vdi.*}: the driver-domain protocol's objects (vdis and vifs) through
    L{DriverDomainClient}: list, get, prepare, activate, deactivate,
    unprepare — for operators who manage vdis directly;
  - C{datapath.*}: the data paths of L{xenddev.datapath} (list, find,
    quiesce → handle, resume, handles, coalesce) through the daemon's
    L{IStorageControl}, which keeps the quiesce handles;
  - C{pool.*}: the hosts of the pool and who holds a storage target,
    through the daemon's L{IActivationGuard} (one host's without a pool);
  - C{daemon.status}; C{system.listMethods}, C{system.methodHelp},
    C{system.methodSignature}.

Every method checks its arguments before the manager sees them and turns
every failure into a L{Fault} with a stable code (L{FaultCode}) and a
message a person can act on: the code each error declares
(L{XenddevError.faultCode}), or L{FOREIGN_FAULTS}' for errors from below
or outside xenddev, found after unwrapping C{gatherResults}'
L{FirstError}; tracebacks go only to the log. Each device operation
logs one line (the L{DeviceManager}'s) with domain, class, device id,
outcome and duration. Nothing here knows a device class: what differs
between them (a disk's vdev, which device an expression names, xm's tap
expressions) are the controllers' hooks.
"""

from __future__ import annotations

import functools
import inspect
import os
import re
import time
import uuid
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectError
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.xmlrpc import XMLRPC, Fault, addIntrospection

from xenddev import __version__
from xenddev.backendctrl.protocol import OBJECT_CLASSES, ObjectClass, validateName, validateTarget
from xenddev.backendctrl.records import DataPath
from xenddev.errors import FaultCode, XenddevError
from xenddev.httplimits import HttpLimits, LimitedSite
from xenddev.interfaces import IActivationGuard, IPoolPeers
from xenddev.storagectl import HeldQuiesce, IStorageControl
from xenddev.sxp import toConfig
from xenddev.toolstack.client import DriverDomainClient, ObjectInfo
from xenddev.toolstack.manager import DeviceManager, DeviceRow, underlyingError
from xenddev.toolstack.objectguard import GuardedObjects
from xenddev.xenstore.errors import (
    AccessDeniedError,
    TransactionRetriesExhausted,
    XenStoreConnectionLost,
    XenStoreStalled,
    XenStoreTimeout,
)

T = TypeVar("T")

#: The highest guest domain id (DOMID_FIRST_RESERVED - 1).
DOMID_MAX = 0x7FEF
_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,64}\Z")
_CLASS = re.compile(r"[a-z][a-z0-9_]{0,15}\Z")
_KEY = re.compile(r"[a-z][a-z0-9_-]{0,31}\Z")
_HANDLE = re.compile(r"[A-Za-z0-9_-]{1,64}\Z")
MAX_STRING = 4096


#: The codes of errors that do not derive from L{XenddevError}, found along
#: the error's class hierarchy (the first class listed wins), with the
#: message a client reads (C{{error}}: the error's text). The XenStore
#: layer's errors are here because C{xenddev.xenstore} imports nothing from
#: the rest of xenddev and knows nothing of RPC: as AMP declares the errors
#: of a command with the command, the layer that answers declares the codes
#: of the layers it calls. Twisted's and Python's errors are here too.
FOREIGN_FAULTS: dict[type[BaseException], tuple[FaultCode, str]] = {
    XenStoreTimeout: (FaultCode.TIMEOUT, "timed out: {error}; the operation may be retried"),
    AccessDeniedError: (FaultCode.PERMISSION, "permission denied: {error}"),
    PermissionError: (FaultCode.PERMISSION, "permission denied: {error}"),
    TransactionRetriesExhausted: (
        FaultCode.DEVICE_EXISTS,
        "XenStore is busy ({error}); retry the operation",
    ),
    XenStoreStalled: (
        FaultCode.UNAVAILABLE,
        "XenStore is not answering ({error}); the store may still apply the last requests"
        " when it runs again: check, and retry once it answers",
    ),
    XenStoreConnectionLost: (
        FaultCode.UNAVAILABLE,
        "the daemon lost its XenStore connection; retry shortly",
    ),
    CancelledError: (
        FaultCode.UNAVAILABLE,
        "the operation was cancelled (is the daemon stopping?)",
    ),
}


def declaredFault(kind: type[BaseException]) -> tuple[FaultCode, str] | None:
    """
    The fault code (and message template) declared for a class of error
    outside L{XenddevError}, along its class hierarchy; L{None} if none is.
    """
    for base in kind.__mro__:
        found = FOREIGN_FAULTS.get(base)
        if found is not None:
            return found
    return None


def rpcFault(code: FaultCode, message: str) -> Fault:
    """A Fault with one of our codes."""
    return Fault(int(code), message)


def toFault(error: BaseException, log: Logger, method: str) -> Fault:
    """
    The Fault for an exception: the code the error declares
    (L{XenddevError.faultCode}) or L{FOREIGN_FAULTS} gives, for the error
    itself or, for a L{FirstError}, the one it wraps. Errors without a code
    (and those declaring L{FaultCode.INTERNAL}) are logged with their
    traceback and a reference the caller can quote; only that reference
    reaches the caller.
    """
    error = underlyingError(error)
    if isinstance(error, Fault):
        return error
    if isinstance(error, XenddevError) and error.faultCode != FaultCode.INTERNAL:
        return rpcFault(error.faultCode, error.faultMessage())
    foreign = declaredFault(type(error))
    if foreign is not None:
        code, template = foreign
        return rpcFault(code, template.format(error=error))
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


def checkObjectClass(value: object) -> ObjectClass:
    """A driver-domain object class: C{vdi} or C{vif}."""
    name = checkString(value, "object class")
    cls = OBJECT_CLASSES.get(name)
    if cls is None:
        known = ", ".join(sorted(OBJECT_CLASSES))
        raise rpcFault(FaultCode.BAD_CONFIG, f"unknown object class {name!r} (known: {known})")
    return cls


def checkImage(value: object) -> str:
    """An image path: absolute, no NUL."""
    path = checkString(value, "image")
    if not path.startswith("/") or "\0" in path:
        raise rpcFault(FaultCode.BAD_CONFIG, f"image must be an absolute path, not {path!r}")
    return path


def objectStruct(domid: int, info: ObjectInfo) -> dict[str, Any]:
    """A driver-domain object as a plain struct (unknown values left out)."""
    plugs = [
        _dropNone({"name": p.name, "state": p.state, "frontend": p.frontend, "backend": p.backend})
        for p in info.plugs
    ]
    return _dropNone(
        {
            "domain": domid,
            "class": info.objectClass,
            "name": info.name,
            "state": info.state,
            "request": info.request,
            "target": dict(info.target),
            "plugs": plugs,
        }
    )


def dataPathStruct(dp: DataPath) -> dict[str, Any]:
    """A data path as a plain struct (unknown values left out)."""
    return _dropNone(
        {
            "domain": dp.driverDomid,
            "vdi": dp.vdi,
            "kind": dp.kind,
            "host": dp.host,
            "image": dp.image,
            "format": dp.format,
            "chain": list(dp.chain),
            "pid": dp.pid,
            "minor": dp.minor,
            "qmp": dp.qmp,
            "extra": dict(dp.extra),
        }
    )


def _dropNone(values: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


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
            devid = self.manager.controllerClasses[devclass].devidFromConfig(config)
        if devid is None:
            raise rpcFault(
                FaultCode.BAD_CONFIG,
                f"device_configure: give a devid (the {devclass} expression does not name "
                "the device)",
            )
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
                out.append(self.service.rowStruct(row))
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


class VdiNamespace(_Namespace):
    """
    C{vdi.*}: the objects of the driver-domain protocol (C{vdi}, and our
    C{vif}) in one driver domain, through L{DriverDomainClient}. Every
    argument is checked before anything is written. An activation claims
    its target from the daemon's activation guard as an attach does
    (L{GuardedObjects}).
    """

    prefix = "vdi"

    @functools.cached_property
    def guarded(self) -> GuardedObjects:
        """The activations' claims from the daemon's guard (one table of locks)."""
        return GuardedObjects(self.manager.xs, self.service.guard)

    @rpcMethod([["array", "int"], ["array", "int", "string"]])
    async def xmlrpc_list(self, dd: object, objectClass: object = None) -> list[dict[str, Any]]:
        """
        list(dd[, class]) → [{domain, class, name, state, request, target,
        plugs: [{name, state, frontend, backend}]}, ...]

        The objects of driver domain dd: of one class (vdi or vif), or of
        both. state is inactive or active (absent while a prepare is being
        performed); request is a request still pending; target the t/*
        values; plugs the frontends served.
        """
        domid = await self.service.resolveDomain(dd)
        classes = (
            [checkObjectClass(objectClass)]
            if objectClass is not None
            else [OBJECT_CLASSES[n] for n in sorted(OBJECT_CLASSES)]
        )
        out: list[dict[str, Any]] = []
        for cls in classes:
            client = await self.service.driverDomain(domid, cls)
            out += [objectStruct(domid, info) for info in await client.list(cls)]
        return out

    @rpcMethod([["struct", "int", "string"], ["struct", "int", "string", "string"]])
    async def xmlrpc_get(self, dd: object, name: object, objectClass: object = "vdi") -> Any:
        """
        get(dd, name[, class]) → {domain, class, name, state, request, target, plugs}

        One object of driver domain dd (class vdi by default); fault 11 if
        there is none.
        """
        domid, cls, client, vname = await self._object(dd, name, objectClass)
        return await self.service.describeObject(domid, client, vname, cls)

    @rpcMethod(
        [["struct", "int", "string", "struct"], ["struct", "int", "string", "struct", "string"]]
    )
    async def xmlrpc_prepare(
        self, dd: object, name: object, target: object, objectClass: object = "vdi"
    ) -> Any:
        """
        prepare(dd, name, target[, class]) → {domain, class, name, state, ...}

        Create the object from target, a struct of t/* keys to strings, e.g.
        {type: file, params: /srv/disk.img, mode: w} for blkback or
        {type: file, format: qcow2, params: /srv/a.qcow2} for qemu. The
        driver domain picks the kind that serves it; the state becomes
        inactive. Names: [A-Za-z0-9_-], at most 64 characters (names like
        vbd-5-51728 belong to the device controllers).
        """
        domid, cls, client, vname = await self._object(dd, name, objectClass)
        if not isinstance(target, dict):
            raise rpcFault(
                FaultCode.BAD_CONFIG,
                f"target must be a struct of key → value, not {type(target).__name__}",
            )
        clean = validateTarget(target)
        await client.prepare(vname, clean, cls)
        return await self.service.describeObject(domid, client, vname, cls)

    @rpcMethod([["struct", "int", "string"], ["struct", "int", "string", "string"]])
    async def xmlrpc_activate(self, dd: object, name: object, objectClass: object = "vdi") -> Any:
        """
        activate(dd, name[, class]) → {domain, class, name, state, ...}

        Make a prepared (inactive) object active: its data path starts
        serving. Its target is claimed as an attach claims it: fault 12 if
        another guest or host holds it (or the driver domain served a newer
        fencing token), 16 if the pool cannot vouch. Fault 17 if it is
        active already, 11 if not prepared.
        """
        domid, cls, client, vname = await self._object(dd, name, objectClass)
        await self.guarded.activate(client, vname, cls)
        return await self.service.describeObject(domid, client, vname, cls)

    @rpcMethod([["struct", "int", "string"], ["struct", "int", "string", "string"]])
    async def xmlrpc_deactivate(self, dd: object, name: object, objectClass: object = "vdi") -> Any:
        """
        deactivate(dd, name[, class]) → {domain, class, name, state, ...}

        Make an active object inactive again (its target's claim is given
        back). Fault 17 if it is not active.
        """
        domid, cls, client, vname = await self._object(dd, name, objectClass)
        await self.guarded.deactivate(client, vname, cls)
        return await self.service.describeObject(domid, client, vname, cls)

    @rpcMethod([["boolean", "int", "string"], ["boolean", "int", "string", "string"]])
    async def xmlrpc_unprepare(self, dd: object, name: object, objectClass: object = "vdi") -> bool:
        """
        unprepare(dd, name[, class]) → true

        Destroy an inactive object (its directory is removed). Fault 12 if
        it still has plugs, 11 if there is no such object.
        """
        _, cls, client, vname = await self._object(dd, name, objectClass)
        await self.guarded.unprepare(client, vname, cls)
        return True

    async def _object(
        self, dd: object, name: object, objectClass: object
    ) -> tuple[int, ObjectClass, DriverDomainClient, str]:
        domid = await self.service.resolveDomain(dd)
        cls = checkObjectClass(objectClass)
        vname = validateName(name, cls.name)
        return domid, cls, await self.service.driverDomain(domid, cls), vname


class DataPathNamespace(_Namespace):
    """
    C{datapath.*}: the data paths serving images (seed 002) and the
    daemon's quiesce handles (L{IStorageControl}).
    """

    prefix = "datapath"

    @property
    def storage(self) -> IStorageControl:
        """The daemon's storage control; fault 19 if this service has none."""
        if self.service.storage is None:
            raise rpcFault(FaultCode.UNSUPPORTED, "this service has no data-path control")
        return self.service.storage

    @rpcMethod([["array"], ["array", "string"]])
    async def xmlrpc_list(self, host: object = None) -> list[dict[str, Any]]:
        """
        list([host]) → [{domain, vdi, kind, host, image, format, chain, pid,
        minor, qmp, extra}, ...]

        Every registered data path, in every driver domain: the process
        serving an active vdi, the image it serves and its backing chain
        (top first). In a pool, every host's (each names its host), or
        only those of host.
        """
        name = None if host is None else checkString(host, "host", _NAME)
        return [dataPathStruct(dp) for dp in await self.storage.scan(name)]

    @rpcMethod([["array", "string"]])
    async def xmlrpc_find(self, image: object) -> list[dict[str, Any]]:
        """
        find(image) → [{domain, vdi, kind, ...}, ...]

        The data paths serving image, or reading it as part of a backing
        chain (paths compared after resolving symbolic links).
        """
        return [dataPathStruct(dp) for dp in await self.storage.find(checkImage(image))]

    @rpcMethod([["struct", "string"]])
    async def xmlrpc_quiesce(self, image: object) -> dict[str, Any]:
        """
        quiesce(image) → {handle, image, paused: [{domain, vdi, ...}], expires-in}

        Pause every data path using image (all or none: fault 18 if one
        cannot be paused, and none is left paused). Resume them with
        datapath.resume(handle); a handle not resumed within expires-in
        seconds (the daemon's timeouts.quiesce) is resumed by the daemon.
        Fault 12 if one of them is held by another handle. An image no
        data path uses gets a handle with nothing paused.
        """
        storage = self.storage
        held = await storage.quiesce(checkImage(image))
        return self.service.handleStruct(held)

    @rpcMethod([["struct", "string"]])
    async def xmlrpc_quiesceLocal(self, image: object) -> dict[str, Any]:
        """
        quiesceLocal(image) → {handle, image, paused, expires-in}

        datapath.quiesce of this host's data paths only: what another
        host's pool-wide quiesce asks of this one (it never asks further).
        """
        storage = self.storage
        held = await storage.quiesceLocal(checkImage(image))
        return self.service.handleStruct(held)

    @rpcMethod([["boolean", "string"], ["boolean", "string", "boolean"]])
    async def xmlrpc_resume(self, handle: object, reload: object = True) -> bool:
        """
        resume(handle[, reload]) → true

        Resume the data paths a quiesce paused; with reload (the default)
        they re-read their image chain first (after a merge). Fault 11 for
        an unknown (or already resumed) handle; fault 12 while the daemon
        is resuming it (its deadline passed); fault 18 if some could not be
        resumed: the handle then keeps those, to retry.
        """
        storage = self.storage
        hid = checkString(handle, "handle", _HANDLE)
        await storage.resume(hid, checkBool(reload, "reload"))
        return True

    @rpcMethod([["array"]])
    async def xmlrpc_handles(self) -> list[dict[str, Any]]:
        """
        handles() → [{handle, image, paused, expires-in, resume-failures}, ...]

        The quiesce handles the daemon holds now.
        """
        return [self.service.handleStruct(h) for h in self.storage.handles()]

    @rpcMethod([["struct", "int", "string"], ["struct", "string"]])
    async def xmlrpc_coalesce(self, dd: object, vdi: object = None) -> dict[str, Any]:
        """
        coalesce(dd, vdi) → {domain, vdi, kind, image, chain, ...}
        coalesce(image) → {image, paused: [{host, domain, vdi, ...}]}

        With dd and vdi: merge the top image of a data path's chain into
        its parent while it keeps serving (qemu data paths: block-commit),
        and return the updated data path. Fault 19 for kinds that cannot
        (tapdisks: quiesce, merge offline, resume), 10 if the image has no
        parent, 11 if the vdi has no data path, 18 if the merge failed.

        With an image: merge it into its parent (qemu-img commit, vhd-util
        coalesce) while every data path reading it — in a pool, on every
        host — is quiesced, then resume them with reload, also when the
        merge fails (18). Fault 12 if the parent is also read by data
        paths not through the image; a host failing is named in the fault.
        """
        storage = self.storage
        if vdi is None:
            image = checkImage(dd)
            paused = await storage.coalesceImage(image)
            return {"image": image, "paused": [dataPathStruct(dp) for dp in paused]}
        domid = await self.service.resolveDomain(dd)
        name = validateName(vdi, "vdi")
        try:
            dp = await storage.coalesce(domid, name)
        except ConnectError as e:
            raise rpcFault(
                FaultCode.DATAPATH_FAILED, f"cannot reach the data path of {name!r}: {e}"
            ) from None
        return dataPathStruct(dp)


class PoolNamespace(_Namespace):
    """
    C{pool.*}: the hosts of the pool and who holds a storage target
    (L{IActivationGuard}); without a pool, this host alone.
    """

    prefix = "pool"

    @property
    def guard(self) -> IActivationGuard:
        """The daemon's activation guard; fault 19 if this service has none."""
        if self.service.guard is None:
            raise rpcFault(FaultCode.UNSUPPORTED, "this service has no activation guard")
        return self.service.guard

    @rpcMethod([["array"]])
    async def xmlrpc_hosts(self) -> list[dict[str, Any]]:
        """
        hosts() → [{name, state, pid, ...}, ...]

        The hosts of the pool, by name: with a pool, each with its lease
        (lease, ttl: seconds left, lease_ttl, fence_after, joined) and
        this host's session state (live, fenced, rejoining) and its
        devices (as it published them: domain, class, devid, and a storage
        device's target, mode, token); without one, this host alone (state
        "single host", with its devices). Fault 16 if etcd cannot be
        reached.
        """
        hosts: list[dict[str, Any]] = await self.guard.hosts()
        return hosts

    @rpcMethod([["struct", "string"]])
    async def xmlrpc_where(self, target: object) -> dict[str, Any]:
        """
        where(target) → {target, writer, readers, devices}

        Who holds a storage target (a path, file:PATH or dev:MAJOR:MINOR;
        a path on this host is named by what it is: a block device by its
        numbers, a file by its real path): the host holding it read-write
        (writer: {host, mode, token}, or nil), those holding it read-only
        (readers), and this host's devices using it (devices: {domain,
        device, mode, token}). Fault 10 for a target that can name
        nothing, 16 if etcd cannot be reached.
        """
        where: dict[str, Any] = await self.guard.where(checkString(target, "target"))
        return where


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
            "version": __version__,
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

    def __init__(
        self,
        manager: DeviceManager,
        clock: Callable[[], float] = time.monotonic,
        storage: IStorageControl | None = None,
        guard: IActivationGuard | None = None,
        peers: IPoolPeers | None = None,
    ) -> None:
        super().__init__(allowNone=True, useDateTime=False)
        self.manager = manager
        self.clock = clock
        self.storage = storage
        self.guard = guard
        #: The other hosts' daemons (a pool with C{pool.advertise}), or None.
        self.peers = peers
        self.started = clock()
        self.putSubHandler("xend", XendNamespace(self))
        self.putSubHandler("device", DeviceNamespace(self))
        self.putSubHandler("vdi", VdiNamespace(self))
        self.putSubHandler("datapath", DataPathNamespace(self))
        self.putSubHandler("pool", PoolNamespace(self))
        self.putSubHandler("daemon", DaemonNamespace(self))
        addIntrospection(self)

    def lookupProcedure(self, procedurePath: Any) -> Callable[..., Any]:
        """
        The method a request names; a request without a C{methodName} is
        fault 8002 (malformed), not an HTTP error page.
        """
        if not isinstance(procedurePath, str):
            raise Fault(self.FAILURE, "malformed request: it names no method (no methodName)")
        method: Callable[..., Any] = super().lookupProcedure(procedurePath)
        return method

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

    async def driverDomain(self, domid: int, cls: ObjectClass) -> DriverDomainClient:
        """
        The protocol client of a driver domain: the manager's, the one its
        controllers use, so requests on one object are serialised whoever
        makes them. Read-only check first: the domain must already have
        C{backendctrl/<class>} (an agent serves it), so nothing is created
        for a domain that is not a driver domain.
        """
        area = f"/local/domain/{domid}/backendctrl/{cls.name}"
        if not await self.manager.xs.exists(area):
            raise rpcFault(
                FaultCode.INVALID_DOMAIN,
                f"domain {domid} is not a driver domain serving {cls.name}s (no {area})",
            )
        return self.manager.driverDomain(domid)

    async def describeObject(
        self, domid: int, client: DriverDomainClient, name: str, cls: ObjectClass
    ) -> dict[str, Any]:
        """One object as a struct; fault 11 if it does not exist."""
        info = await client.describe(name, cls)
        if info.state is None and info.request is None and not info.target and not info.plugs:
            raise rpcFault(FaultCode.NOT_FOUND, f"no {cls.name} {name!r} in driver domain {domid}")
        return objectStruct(domid, info)

    def handleStruct(self, held: HeldQuiesce) -> dict[str, Any]:
        """A quiesce handle as a plain struct."""
        storage = self.storage
        assert storage is not None
        now = storage.clock.seconds()
        return {
            "handle": held.id,
            "image": held.image,
            "paused": [dataPathStruct(dp) for dp in held.paused],
            "expires-in": round(max(0.0, held.deadline - now), 3),
            "resume-failures": held.resumeFailures,
            "peers": [{"host": r.host, "handle": r.handle} for r in held.remote],
        }

    def deviceSxpr(self, sxpr: object) -> tuple[str, dict[str, str]]:
        """
        An xm device expression as (class, config), the class being the
        one that serves it (L{DeviceManager.servedClass}: tap/tap2 fall
        back to vbd).
        """
        if not isinstance(sxpr, str | list):
            raise rpcFault(
                FaultCode.BAD_CONFIG,
                f"sxpr must be an array or a string, not {type(sxpr).__name__}",
            )
        devclass, config = toConfig(sxpr)
        return self.checkClass(self.manager.servedClass(devclass)), config

    # Device operations (the manager logs one line each)

    def attach(self, domid: int, devclass: str, config: dict[str, Any]) -> Deferred[int]:
        """createDevice."""
        return self.manager.createDevice(domid, devclass, config)

    def detach(self, domid: int, devclass: str, devid: int | str, force: bool) -> Deferred[None]:
        """destroyDevice."""
        return self.manager.destroyDevice(domid, devclass, devid, force)

    def configure(
        self, domid: int, devclass: str, devid: int | str, config: dict[str, Any]
    ) -> Deferred[int]:
        """reconfigureDevice."""
        return self.manager.reconfigureDevice(domid, devclass, devid, config)

    def rowStruct(self, row: DeviceRow) -> dict[str, Any]:
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
            "toolstack": row.toolstack,
            **row.facts,
            **{k: _intOrText(v) for k, v in row.extras.items()},
        }
        return {k: v for k, v in out.items() if v is not None}


def _intOrText(value: str | None) -> int | str | None:
    if value is None:
        return None
    return int(value) if value.isascii() and value.isdigit() and len(value) < 10 else value


def rpcResource(
    manager: DeviceManager,
    clock: Callable[[], float] = time.monotonic,
    storage: IStorageControl | None = None,
    guard: IActivationGuard | None = None,
    peers: IPoolPeers | None = None,
) -> Resource:
    """
    The XML-RPC resource (any request path serves it).

    @param storage: the daemon's data-path control for C{datapath.*}
        (without it those methods give fault 19).
    @param guard: the daemon's activation guard for C{pool.*} (without it
        those methods give fault 19).
    @param peers: the other hosts' daemons (work that spans hosts).
    """
    return DeviceRPC(manager, clock, storage, guard, peers)


def rpcSite(
    manager: DeviceManager,
    clock: Callable[[], float] = time.monotonic,
    storage: IStorageControl | None = None,
    limits: HttpLimits | None = None,
    reactor: Any = None,
    label: str = "XML-RPC",
    guard: IActivationGuard | None = None,
    peers: IPoolPeers | None = None,
) -> LimitedSite:
    """
    A Site serving L{rpcResource} (listen on it with a UNIX or TCP
    endpoint), held to C{limits} (body size, request and idle timeouts,
    open connections; L{HttpLimits}' defaults if C{None}).
    """
    return LimitedSite(
        rpcResource(manager, clock, storage, guard, peers), limits, reactor=reactor, label=label
    )
