# -*- test-case-name: tests.test_xenbus -*-
"""
The xenbus conventions on top of XenStore: device states, where device
directories live, and waiting for a device to reach a state or for its
hotplug script to report.

Facts (Xen's C{xen/include/public/io/xenbus.h}, C{xenstore-paths}, xend):

  - Both ends of a split device keep their state in C{<dir>/state} as a
    decimal L{XenbusState}; either end may skip states.
  - The frontend directory is C{/local/domain/<F>/device/<class>/<devid>},
    the backend directory C{/local/domain/<B>/backend/<class>/<F>/<devid>},
    the toolstack's per-VM record C{/vm/<uuid>} (a device's record
    C{/vm/<uuid>/device/<class>/<devid>}), libxl's record of a device
    C{/libxl/<F>/device/<kind>/<devid>}; L{DeviceIdentity} derives them all.
  - Hotplug scripts report in the backend directory: C{hotplug-status} is
    C{connected}, C{error} (with C{hotplug-error} holding the message) or
    C{busy}.

Everything here validates its input before touching the store: a bad
domain id, class or device id raises L{XenbusPathError} naming the field.
"""

from __future__ import annotations

import enum
import re
import uuid as _uuid
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

import attrs
from twisted.internet.defer import Deferred

from xenddev.errors import XenddevError
from xenddev.interfaces import IXenStore
from xenddev.xenstore.errors import InvalidArgumentError, InvalidPathError
from xenddev.xenstore.paths import joinPath, validateDomid, validateNodeName, validatePath

__all__ = [
    "LIBXL_KINDS",
    "BackendDevice",
    "DeviceIdentity",
    "FrontendDevice",
    "HotplugResult",
    "HotplugStatus",
    "Waiting",
    "XenbusPathError",
    "XenbusState",
    "backendPath",
    "classifyHotplugStatus",
    "domainPath",
    "frontendClassPath",
    "frontendPath",
    "libxlClassPath",
    "parseBackendPath",
    "parseFrontendPath",
    "recordClassPath",
    "vmPath",
    "waitForHotplugStatus",
    "waitForState",
]


class Waiting(Protocol):
    """
    What the waits here need: an L{IXenStore}, or a
    L{xenddev.xenstore.dispatch.WatchDispatch} sharing one standing watch.
    """

    def waitFor(
        self, path: str, predicate: Callable[[str | None], bool], timeout: float | None = ...
    ) -> Deferred[str | None]: ...

    def readOrNone(self, path: str) -> Deferred[str | None]: ...


class XenbusState(enum.IntEnum):
    """The state of one end of a xenbus device (C{enum xenbus_state})."""

    Unknown = 0
    Initialising = 1
    InitWait = 2
    Initialised = 3
    Connected = 4
    Closing = 5
    Closed = 6
    Reconfiguring = 7
    Reconfigured = 8

    @classmethod
    def parse(cls, value: str | bytes | None) -> XenbusState | None:
        """
        Interpret the text of a C{state} node.

        Tolerant on purpose: the other end (or a half-written directory) may
        hold anything, and a watcher must not crash on it. Surrounding
        whitespace is ignored.

        @return: the state, or C{None} for a missing node (C{None}), an empty
            value, non-decimal text or a number outside the enum.
        """
        if value is None:
            return None
        if isinstance(value, bytes):
            value = value.decode("ascii", "replace")
        if not isinstance(value, str):
            return None
        m = _STATE_TEXT.match(value)
        if m is None:
            return None
        try:
            return cls(int(m.group(1)))
        except ValueError:
            return None


# At most a few digits: a state is 0..8, and int() on a huge string is slow.
_STATE_TEXT = re.compile(r"\s*([0-9]{1,4})\s*\Z")


# Paths


class XenbusPathError(InvalidArgumentError, XenddevError):
    """
    A xenbus path, or one of the values it is built from, is malformed.

    A L{ValueError} (through L{InvalidArgumentError}), so callers validating
    user input can catch either.

    @ivar field: which part was wrong: C{"domid"}, C{"backendDomid"},
        C{"frontendDomid"}, C{"devclass"}, C{"devid"}, C{"uuid"} or
        C{"path"} (the overall shape).
    @ivar value: the offending value.
    @ivar problem: what is wrong with it.
    """

    def __init__(self, field: str, value: object, problem: str) -> None:
        self.field = field
        self.value = value
        self.problem = problem
        super().__init__(f"invalid {field} {value!r}: {problem}")


_LOCAL_DOMAIN = "/local/domain"
_DECIMAL = re.compile(r"(0|[1-9][0-9]*)\Z")
_UUID_TEXT = re.compile(
    r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\Z"
)

#: Device ids are C ints in libxl; the largest real one (an extended xvd
#: number, C{(1<<28)|(disk<<8)|part}) stays below 2**29.
DEVID_MAX = 2**31 - 1


def _checkDomid(value: object, field: str) -> int:
    # validateDomid also accepts decimal text; its error does not say which
    # of several domids was wrong, so re-raise with the field name.
    if isinstance(value, str) and not _DECIMAL.match(value):
        raise XenbusPathError(field, value, "not a canonical decimal number")
    try:
        return validateDomid(value)
    except InvalidArgumentError as e:
        raise XenbusPathError(field, value, str(e)) from None


def _checkClass(value: object, field: str = "devclass") -> str:
    try:
        return validateNodeName(value)
    except InvalidPathError as e:
        raise XenbusPathError(field, value, e.problem) from None


def _checkDevid(value: object, field: str = "devid") -> int:
    if isinstance(value, str):
        if not _DECIMAL.match(value):
            raise XenbusPathError(field, value, "not a canonical decimal number")
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise XenbusPathError(field, value, "must be an integer")
    if not 0 <= value <= DEVID_MAX:
        raise XenbusPathError(field, value, f"out of range 0..{DEVID_MAX}")
    return value


def _checkUuid(value: object) -> str:
    if isinstance(value, _uuid.UUID):
        return str(value)
    if not isinstance(value, str) or not _UUID_TEXT.match(value):
        raise XenbusPathError("uuid", value, "expected the 8-4-4-4-12 hexadecimal form")
    # Xen tools write UUIDs in lower case; normalise so that two spellings
    # of one VM name one directory.
    return value.lower()


def domainPath(domid: int | str) -> str:
    """C{/local/domain/<domid>}."""
    return joinPath(_LOCAL_DOMAIN, _checkDomid(domid, "domid"))


def frontendPath(domid: int | str, devclass: str, devid: int | str) -> str:
    """The frontend directory C{/local/domain/<domid>/device/<class>/<devid>}."""
    return joinPath(frontendClassPath(domid, devclass), _checkDevid(devid))


def backendPath(backdom: int | str, devclass: str, frontdom: int | str, devid: int | str) -> str:
    """The backend directory C{/local/domain/<backdom>/backend/<class>/<frontdom>/<devid>}."""
    return joinPath(
        joinPath(_LOCAL_DOMAIN, _checkDomid(backdom, "backendDomid")),
        "backend",
        _checkClass(devclass),
        _checkDomid(frontdom, "frontendDomid"),
        _checkDevid(devid),
    )


def vmPath(uuid: str | _uuid.UUID) -> str:
    """The toolstack's per-VM directory C{/vm/<uuid>} (UUID in lower case)."""
    return joinPath("/vm", _checkUuid(uuid))


@attrs.frozen
class FrontendDevice:
    """Where a frontend directory lives: C{/local/domain/<domid>/device/<devclass>/<devid>}."""

    domid: int = attrs.field(converter=lambda v: _checkDomid(v, "domid"))
    devclass: str = attrs.field(converter=_checkClass)
    devid: int = attrs.field(converter=_checkDevid)

    @property
    def path(self) -> str:
        """The directory's path."""
        return frontendPath(self.domid, self.devclass, self.devid)


@attrs.frozen
class BackendDevice:
    """
    Where a backend directory lives:
    C{/local/domain/<backendDomid>/backend/<devclass>/<frontendDomid>/<devid>}.
    """

    backendDomid: int = attrs.field(converter=lambda v: _checkDomid(v, "backendDomid"))
    devclass: str = attrs.field(converter=_checkClass)
    frontendDomid: int = attrs.field(converter=lambda v: _checkDomid(v, "frontendDomid"))
    devid: int = attrs.field(converter=_checkDevid)

    @property
    def path(self) -> str:
        """The directory's path."""
        return backendPath(self.backendDomid, self.devclass, self.frontendDomid, self.devid)

    @property
    def errorPath(self) -> str:
        """
        Where the backend's driver reports an error (Linux's
        C{xenbus_dev_error} writes C{error/<nodename>/error} in its domain's
        home): C{/local/domain/<backendDomid>/error/backend/<class>/<frontendDomid>/<devid>/error}.
        """
        return joinPath(
            domainPath(self.backendDomid),
            "error",
            "backend",
            self.devclass,
            self.frontendDomid,
            self.devid,
            "error",
        )


def frontendClassPath(domid: int | str, devclass: str) -> str:
    """A guest's frontends of one class: C{/local/domain/<domid>/device/<class>}."""
    return joinPath(domainPath(domid), "device", _checkClass(devclass))


def recordClassPath(vm: str, devclass: str) -> str:
    """The toolstack's records of one class of a VM: C{<vm>/device/<class>}."""
    return joinPath(vm, "device", _checkClass(devclass))


def libxlClassPath(domid: int | str, kind: str) -> str:
    """
    libxl's records of one device kind of a domain,
    C{/libxl/<domid>/device/<kind>} (writable by dom0 only, unlike the
    guest's frontend directories).
    """
    return joinPath("/libxl", _checkDomid(domid, "domid"), "device", _checkClass(kind))


#: libxl's device kinds (its record directories) that are a device class's:
#: xl records a disk as C{vbd}, C{qdisk} or C{vbd3} after its backend.
LIBXL_KINDS: Mapping[str, tuple[str, ...]] = {"vbd": ("vbd", "qdisk", "vbd3"), "vif": ("vif",)}


def _optionalClass(value: object) -> str | None:
    return None if value is None else _checkClass(value)


@attrs.frozen
class DeviceIdentity:
    """
    One split device, from which every path of it is derived: its frontend
    directory, its backend directory, the toolstack's record under the
    guest's C{/vm} and libxl's records.

    @ivar frontendDomid: the guest.
    @ivar devclass: the toolstack's device class (its records' directory:
        C{vbd}, C{vif}, C{tap}, C{tap2}).
    @ivar devid: the device id (the frontend directory's name).
    @ivar backendDomid: the driver domain.
    @ivar frontendClass: the guest's class directory if not C{devclass}
        (blktap's classes serve C{vbd} frontends).
    @ivar backendClass: the backend's class directory if not C{devclass}
        (C{tap2} is served by a C{vbd} backend).
    """

    frontendDomid: int = attrs.field(converter=lambda v: _checkDomid(v, "frontendDomid"))
    devclass: str = attrs.field(converter=_checkClass)
    devid: int = attrs.field(converter=_checkDevid)
    backendDomid: int = attrs.field(
        default=0, converter=lambda v: _checkDomid(v, "backendDomid"), kw_only=True
    )
    frontendClass: str | None = attrs.field(default=None, converter=_optionalClass, kw_only=True)
    backendClass: str | None = attrs.field(default=None, converter=_optionalClass, kw_only=True)

    @classmethod
    def fromBackendPath(
        cls, path: str, devclass: str | None = None, frontendClass: str | None = None
    ) -> DeviceIdentity:
        """
        The device a backend directory serves (L{parseBackendPath}; the
        toolstack's class is the backend's unless C{devclass} is given).

        @raise XenbusPathError: naming the field that is wrong.
        """
        dev = parseBackendPath(path)
        return cls(
            dev.frontendDomid,
            devclass or dev.devclass,
            dev.devid,
            backendDomid=dev.backendDomid,
            frontendClass=frontendClass,
            backendClass=dev.devclass,
        )

    @property
    def frontend(self) -> FrontendDevice:
        """The frontend directory."""
        return FrontendDevice(self.frontendDomid, self.frontendClass or self.devclass, self.devid)

    @property
    def backend(self) -> BackendDevice:
        """The backend directory."""
        return BackendDevice(
            self.backendDomid, self.backendClass or self.devclass, self.frontendDomid, self.devid
        )

    @property
    def frontendPath(self) -> str:
        """C{/local/domain/<frontendDomid>/device/<frontend class>/<devid>}."""
        return self.frontend.path

    @property
    def backendPath(self) -> str:
        """C{/local/domain/<backendDomid>/backend/<backend class>/<frontendDomid>/<devid>}."""
        return self.backend.path

    def recordPath(self, vm: str) -> str:
        """The toolstack's record of the device: C{<vm>/device/<devclass>/<devid>}."""
        return joinPath(recordClassPath(vm, self.devclass), self.devid)

    @property
    def libxlPaths(self) -> tuple[str, ...]:
        """Where libxl would record the device: one directory per kind of L{LIBXL_KINDS}."""
        kinds = LIBXL_KINDS.get(self.devclass, (self.devclass,))
        return tuple(
            joinPath(libxlClassPath(self.frontendDomid, kind), self.devid) for kind in kinds
        )


def _components(path: object) -> list[str]:
    try:
        p = validatePath(path)
    except InvalidPathError as e:
        raise XenbusPathError("path", path, e.problem) from None
    if not p.startswith(_LOCAL_DOMAIN + "/"):
        raise XenbusPathError("path", path, f"does not start with {_LOCAL_DOMAIN}/")
    return p.split("/")[3:]


def parseFrontendPath(path: str, allowSubpath: bool = False) -> FrontendDevice:
    """
    Parse a frontend directory path.

    @param allowSubpath: accept a path below the directory too (e.g. a
        watch event on C{.../51712/state}); the extra components are ignored.
    @raise XenbusPathError: naming the field that is wrong.
    """
    parts = _components(path)
    # domid, "device", class, devid
    if len(parts) < 4 or (len(parts) > 4 and not allowSubpath):
        raise XenbusPathError("path", path, "expected /local/domain/<domid>/device/<class>/<devid>")
    if parts[1] != "device":
        raise XenbusPathError("path", path, f"expected 'device' after the domid, not {parts[1]!r}")
    return FrontendDevice(
        _checkDomid(parts[0], "domid"), _checkClass(parts[2]), _checkDevid(parts[3])
    )


def parseBackendPath(path: str, allowSubpath: bool = False) -> BackendDevice:
    """
    Parse a backend directory path.

    @param allowSubpath: accept a path below the directory too; the extra
        components are ignored.
    @raise XenbusPathError: naming the field that is wrong.
    """
    parts = _components(path)
    # backdom, "backend", class, frontdom, devid
    if len(parts) < 5 or (len(parts) > 5 and not allowSubpath):
        raise XenbusPathError(
            "path",
            path,
            "expected /local/domain/<backdom>/backend/<class>/<frontdom>/<devid>",
        )
    if parts[1] != "backend":
        raise XenbusPathError("path", path, f"expected 'backend' after the domid, not {parts[1]!r}")
    return BackendDevice(
        _checkDomid(parts[0], "backendDomid"),
        _checkClass(parts[2]),
        _checkDomid(parts[3], "frontendDomid"),
        _checkDevid(parts[4]),
    )


# Waiting


def _stateSet(states: XenbusState | int | Iterable[XenbusState | int]) -> frozenset[XenbusState]:
    items: Iterable[Any] = [states] if isinstance(states, int) else states
    try:
        result = frozenset(XenbusState(s) for s in items)
    except (TypeError, ValueError) as e:
        raise InvalidArgumentError(f"not a set of xenbus states: {states!r} ({e})") from None
    if not result:
        raise InvalidArgumentError("waitForState needs at least one state to wait for")
    return result


def waitForState(
    xs: IXenStore | Waiting,
    path: str,
    states: XenbusState | int | Iterable[XenbusState | int],
    timeout: float | None = None,
) -> Deferred[XenbusState]:
    """
    Wait until C{<path>/state} holds one of C{states}.

    @param path: a device directory (frontend or backend).
    @param states: one state or several.
    @param timeout: seconds; C{None} waits for ever.
    @return: a Deferred firing with the state reached (checked at once and
        on every change), or failing with L{XenStoreTimeout} (whose C{last}
        is the last value seen). Cancelling it, like a timeout, removes the
        watch and the timer (L{IXenStore.waitFor} guarantees this).
    """
    wanted = _stateSet(states)
    statePath = joinPath(validatePath(path), "state")
    d: Deferred[Any] = xs.waitFor(statePath, lambda v: XenbusState.parse(v) in wanted, timeout)

    def reached(value: str | None) -> XenbusState:
        state = XenbusState.parse(value)
        assert state is not None  # the predicate held
        return state

    return d.addCallback(reached)


class HotplugStatus(enum.StrEnum):
    """What a hotplug script reported in C{hotplug-status} (xend's reading)."""

    Connected = "connected"
    Error = "error"
    Busy = "busy"


def classifyHotplugStatus(value: str | None) -> HotplugStatus | None:
    """
    Read a C{hotplug-status} value the way xend did: absent means the script
    has not finished (C{None}); C{error} and C{busy} are failures; anything
    else means connected.

    An empty value counts as absent, unlike in xend: libxl pre-writes an
    empty C{hotplug-status} for NICs before the script runs.
    """
    if value is None or value == "":
        return None
    if value == HotplugStatus.Error:
        return HotplugStatus.Error
    if value == HotplugStatus.Busy:
        return HotplugStatus.Busy
    return HotplugStatus.Connected


@attrs.frozen
class HotplugResult:
    """
    The outcome of a hotplug script, as found in the backend directory.

    @ivar status: L{HotplugStatus}.
    @ivar value: the C{hotplug-status} text as read.
    @ivar error: the C{hotplug-error} text for C{error} and C{busy} (or
        C{None} if the script wrote none); always C{None} when connected.
    """

    status: HotplugStatus
    value: str
    error: str | None = None


def waitForHotplugStatus(
    xs: IXenStore | Waiting, backendPath: str, timeout: float | None = None
) -> Deferred[HotplugResult]:
    """
    Wait until the hotplug script has written C{<backendPath>/hotplug-status}
    and fire with a L{HotplugResult}. Fails with L{XenStoreTimeout} if it
    has not after C{timeout} seconds (watch and timer are removed).

    Waiting on C{hotplug-status} rather than on the backend state is what
    seed 004 asks: the state says what the kernel did, the status says
    whether the script finished.
    """
    base = validatePath(backendPath)
    d: Deferred[Any] = xs.waitFor(
        joinPath(base, "hotplug-status"),
        lambda v: classifyHotplugStatus(v) is not None,
        timeout,
    )

    def classified(value: str) -> Deferred[HotplugResult] | HotplugResult:
        status = classifyHotplugStatus(value)
        assert status is not None
        if status is HotplugStatus.Connected:
            return HotplugResult(status, value)
        # Scripts write hotplug-error before hotplug-status, so it is there
        # by now (or the script gave no message).
        e: Deferred[Any] = xs.readOrNone(joinPath(base, "hotplug-error"))
        return e.addCallback(lambda text: HotplugResult(status, value, text))

    return d.addCallback(classified)
