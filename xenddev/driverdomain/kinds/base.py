# -*- test-case-name: tests.test_driverdomain -*-
"""
Value types shared by the agent and the driver-domain kinds.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs
from twisted.internet.defer import Deferred, succeed

from xenddev.backendctrl.protocol import XEN_ERRNO, ControlPaths
from xenddev.errors import XenddevError
from xenddev.xenbus import XenbusPathError, parseBackendPath, parseFrontendPath
from xenddev.xenstore.paths import Perm


class KindError(XenddevError):
    """
    A kind could not perform an operation. Becomes the request's result.

    @ivar errname: a Xen errno name from L{XEN_ERRNO}.
    @ivar message: the C{result_msg}.
    """

    def __init__(self, errname: str, message: str) -> None:
        if errname not in XEN_ERRNO:
            raise ValueError(f"{errname} is not a Xen errno name the protocol uses")
        self.errname = errname
        self.message = message
        super().__init__(f"{errname}: {message}")


@attrs.frozen
class DeviceRef:
    """A xenbus device: class, frontend domain, device id."""

    deviceClass: str
    frontendDomid: int
    devid: int

    @classmethod
    def fromFrontendPath(cls, path: str) -> DeviceRef:
        """Parse C{/local/domain/<d>/device/<class>/<devid>}."""
        try:
            device = parseFrontendPath(path)
        except XenbusPathError:
            raise KindError(
                "EINVAL", f"frontend {path!r} is not /local/domain/<domid>/device/<class>/<devid>"
            ) from None
        return cls(device.devclass, device.domid, device.devid)

    @classmethod
    def fromBackendPath(cls, path: str) -> DeviceRef:
        """
        Parse an absolute C{/local/domain/<dd>/backend/<class>/<domu>/<devid>}
        (the class is the backend's: C{tap} for a blktap1 vbd).
        """
        try:
            device = parseBackendPath(path)
        except XenbusPathError:
            raise KindError("EINVAL", f"{path!r} is not a backend directory") from None
        return cls(device.devclass, device.frontendDomid, device.devid)

    def backendRelative(self, backendClass: str | None = None) -> str:
        """C{backend/<class>/<domu>/<devid>}, relative to the driver domain's home."""
        return f"backend/{backendClass or self.deviceClass}/{self.frontendDomid}/{self.devid}"


@attrs.frozen
class PlugSpec:
    """
    A plug being created or removed.

    @ivar name: the plug's name (the C{<vbd>} of the request).
    @ivar frontend: the frontend path the toolstack gave.
    @ivar device: the parsed frontend.
    @ivar takeover: the frontend exists and moves to this driver domain.
    @ivar backend: for unplug, the absolute backend directory.
    """

    name: str
    frontend: str
    device: DeviceRef
    takeover: bool = False
    backend: str | None = None


@attrs.frozen
class KindContext:
    """
    What a kind is told about the object it works on.

    @ivar xs: the agent's XenStore connection (the driver domain's rights).
    @ivar paths: the object's control paths.
    @ivar target: the C{t/*} values.
    @ivar recovering: the agent crashed while executing this very request;
        the operation may be partly done already.
    @ivar records: the kind's private record directory for this object
        (under C{private/xenddev/}), for anything it must find after a
        restart (a tapdisk's pid, a qemu socket).
    """

    xs: Any
    paths: ControlPaths
    target: Mapping[str, str]
    recovering: bool
    records: str

    @property
    def driverDomid(self) -> int:
        """The driver domain this agent serves."""
        return self.paths.driverDomid


@attrs.frozen
class Outcome:
    """
    XenStore changes a kind wants made atomically with the request's result.

    @ivar backend: for plug, the backend directory relative to the driver
        domain's home (e.g. C{backend/vbd/5/51712}).
    @ivar bcopy: for plug, C{b-copy/*} values for the toolstack to copy.
    @ivar mkdirs: directories to create, with their permissions.
    @ivar writes: nodes to write (absolute paths).
    @ivar removes: subtrees to remove (absolute paths).
    """

    backend: str | None = None
    bcopy: Mapping[str, str] = attrs.field(factory=dict)
    mkdirs: Mapping[str, list[Perm]] = attrs.field(factory=dict)
    writes: Mapping[str, str] = attrs.field(factory=dict)
    removes: tuple[str, ...] = ()


NOTHING = Outcome()


def done(outcome: Outcome = NOTHING) -> Deferred[Outcome]:
    """An already-fired Deferred with C{outcome}."""
    return succeed(outcome)


class KernelBackendKind:
    """
    Shared lifecycle of the kinds whose backend is a kernel driver fed by a
    hotplug script (blkback, netback): nothing to allocate or pause, so
    activate, deactivate, unprepare and unplug have no effect of their own
    (the agent runs the add script once the object is active and the
    remove script before an unplug completes).
    """

    def activate(self, ctx: KindContext) -> Deferred[Outcome]:
        """Nothing to do: the agent runs the hotplug script once active."""
        return done()

    def deactivate(self, ctx: KindContext) -> Deferred[Outcome]:
        """A kernel backend cannot pause: I/O stops when the guest disconnects."""
        return done()

    def unprepare(self, ctx: KindContext) -> Deferred[Outcome]:
        """Nothing was allocated by prepare."""
        return done()

    def unplug(self, ctx: KindContext, plug: PlugSpec) -> Deferred[Outcome]:
        """The agent removes the backend directory after the remove script."""
        return done()

    def _backendFor(self, ctx: KindContext, plug: PlugSpec, deviceClass: str) -> tuple[str, str]:
        """
        Check the frontend is of C{deviceClass}; return the backend directory
        (relative to the driver domain's home, and absolute).
        """
        if plug.device.deviceClass != deviceClass:
            raise KindError(
                "EINVAL",
                f"{type(self).__name__} serves {deviceClass} frontends, "
                f"not {plug.device.deviceClass}",
            )
        rel = plug.device.backendRelative(deviceClass)
        return rel, ctx.paths.absolute(rel)
