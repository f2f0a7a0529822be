"""
Errors of the driver-domain protocol, as the toolstack sees them.
"""

from __future__ import annotations

from xenddev.errors import FaultCode, XenddevError

#: A driver domain's result (Xen errno name) -> the fault code of its
#: L{DriverDomainError}; other results are L{FaultCode.GENERIC}.
ERRNO_FAULT_CODES = {
    "ENOENT": FaultCode.NOT_FOUND,
    "EEXIST": FaultCode.DEVICE_EXISTS,
    "EBUSY": FaultCode.DEVICE_EXISTS,
    "EISCONN": FaultCode.WRONG_STATE,
    "ENOTCONN": FaultCode.WRONG_STATE,
    "EINVAL": FaultCode.BAD_CONFIG,
    "ENODEV": FaultCode.BAD_CONFIG,
    "E2BIG": FaultCode.BAD_CONFIG,
    "EACCES": FaultCode.PERMISSION,
    "EPERM": FaultCode.PERMISSION,
    "ETIMEDOUT": FaultCode.TIMEOUT,
    "EOPNOTSUPP": FaultCode.UNSUPPORTED,
    "ENOSYS": FaultCode.UNSUPPORTED,
    "EBADRQC": FaultCode.UNSUPPORTED,
}


class DriverDomainError(XenddevError):
    """
    The driver domain completed a request with a non-zero result.

    @ivar errno: the Xen errno value from C{result}.
    @ivar errname: its symbolic name (C{"E?"} if unknown); it chooses the
        fault code (L{ERRNO_FAULT_CODES}, else the class's C{GENERIC}).
    @ivar message: C{result_msg}, or an empty string.
    @ivar request: the request string, e.g. C{"plug xvda"}.
    @ivar path: the object's directory in XenStore.
    """

    faultCode = FaultCode.GENERIC

    def __init__(self, errno: int, errname: str, message: str, request: str, path: str) -> None:
        self.errno = errno
        self.errname = errname
        self.faultCode = ERRNO_FAULT_CODES.get(errname, type(self).faultCode)
        self.message = message
        self.request = request
        self.path = path
        super().__init__(errno, errname, message, request, path)

    def __str__(self) -> str:
        text = (
            f"driver domain refused {self.request!r} on {self.path}: {self.errname} ({self.errno})"
        )
        return f"{text}: {self.message}" if self.message else text


class StaleTokenError(DriverDomainError):
    """
    The driver domain refused an C{activate} (C{EACCES}) because the
    fencing token it carried is lower than one it has already served for
    the same storage target: a newer holder activated the target there, so
    this one was superseded (docs/protocol.md, "Fencing tokens"). Nothing
    was changed. Fault 12, as the activation guard's conflicts: someone
    else holds the target.
    """

    def __init__(self, errno: int, errname: str, message: str, request: str, path: str) -> None:
        super().__init__(errno, errname, message, request, path)
        self.faultCode = FaultCode.DEVICE_EXISTS


class PreconditionError(DriverDomainError):
    """
    The toolstack found a precondition of the request violated and wrote
    nothing (same fields as L{DriverDomainError}, checked locally).
    """


class DriverDomainTimeout(XenddevError):
    """
    The driver domain did not complete a request in time. The request is
    left in place: the driver domain will still execute it, and the object
    accepts no new request until it has.
    """

    faultCode = FaultCode.TIMEOUT

    def __init__(self, request: str, path: str, timeout: float) -> None:
        self.request = request
        self.path = path
        self.timeout = timeout
        super().__init__(
            f"driver domain did not complete {request!r} on {path} within {timeout:g} s; "
            "the request is left for the driver domain to finish"
        )

    def faultMessage(self) -> str:
        """The timeout, and that the operation may be retried."""
        return f"timed out: {self}; the operation may be retried"


class NoAgentError(XenddevError):
    """
    The domain named as a driver domain cannot serve: it does not exist, or
    no agent runs there (none advertised its kinds, nor answered within the
    request timeout once its control area was offered). Nothing was left
    written.

    @ivar driverDomid: the domain.
    @ivar reason: what was found.
    """

    faultCode = FaultCode.INVALID_DOMAIN

    def __init__(self, driverDomid: int, reason: str) -> None:
        self.driverDomid = driverDomid
        self.reason = reason
        super().__init__(f"domain {driverDomid} cannot serve as a driver domain: {reason}")


class InvalidNameError(XenddevError, ValueError):
    """A name, target key or value is not acceptable; nothing was written."""

    faultCode = FaultCode.BAD_CONFIG

    def __init__(self, field: str, value: object, problem: str) -> None:
        self.field = field
        self.value = value
        self.problem = problem
        super().__init__(f"invalid {field} {value!r}: {problem}")
