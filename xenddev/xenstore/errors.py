# -*- test-case-name: tests.test_xenstore_wire -*-
"""
Exceptions raised by the XenStore layer.

They extend pyxs's exception classes, so code written against pyxs (which
catches L{pyxs.exceptions.PyXSError} and reads C{errno}/C{strerror}) keeps
working, and the argument errors are also L{ValueError}s.
"""

from __future__ import annotations

import errno as _errno
import os
from typing import Any

from pyxs import exceptions as _pyxs

#: The errno names xenstored sends in ERROR replies (Xen 4.17 xs_wire.h,
#: C{xsd_errors}), in the order of that table.
XSD_ERRORS: tuple[str, ...] = (
    "EINVAL",
    "EACCES",
    "EEXIST",
    "EISDIR",
    "ENOENT",
    "ENOMEM",
    "ENOSPC",
    "EIO",
    "ENOTEMPTY",
    "ENOSYS",
    "EROFS",
    "EBUSY",
    "EAGAIN",
    "EISCONN",
    "E2BIG",
)


def _errnoOf(errname: str) -> tuple[int, str]:
    number = getattr(_errno, errname, 0)
    return number, (os.strerror(number) if number else errname)


#: errno name -> (number, text): an ERROR reply builds an exception, and
#: os.strerror was a quarter of that. Only names the errno module knows are
#: kept, so whatever a peer sends, this stays small.
_ERRNOS: dict[str, tuple[int, str]] = {}


class XenStoreError(_pyxs.PyXSError):
    """
    xenstored answered a request with an ERROR reply.

    @ivar errno: the errno number (Linux numbering) for L{errname}.
    @ivar strerror: the C library's text for that errno.
    @ivar errname: the errno name exactly as xenstored sent it.
    @ivar op: the name of the operation that failed, when known.
    @ivar path: the path the operation was about, when known.
    """

    def __init__(self, errname: str, op: str | None = None, path: str | None = None) -> None:
        known = _ERRNOS.get(errname)
        if known is None:
            known = _errnoOf(errname)
            if known[0]:
                _ERRNOS[errname] = known
        number, strerror = known
        self.errname = errname
        self.op = op
        self.path = path
        self.errno = number
        self.strerror = strerror
        super().__init__(number, strerror)

    def __str__(self) -> str:
        where = ""
        if self.op is not None:
            where = f" ({self.op}"
            if self.path is not None:
                where += f" {self.path}"
            where += ")"
        return f"{self.errname}: {self.strerror}{where}"


class NoEntryError(XenStoreError):
    """ENOENT: the node (or, for a write, its parent's chain) does not exist."""


class AccessDeniedError(XenStoreError):
    """EACCES: the connection's domain lacks the permission for this node."""


class ConflictError(XenStoreError):
    """EAGAIN: a transaction conflicted with another commit (retry it)."""


class ExistsError(XenStoreError):
    """EEXIST: the node or domain already exists."""


class InvalidRequestError(XenStoreError):
    """EINVAL: xenstored refused the request's arguments."""


class QuotaError(XenStoreError):
    """E2BIG or ENOSPC: a size or count quota of xenstored was exceeded."""


class BusyError(XenStoreError):
    """EBUSY: xenstored cannot serve the request right now."""


_ERROR_CLASSES: dict[str, type[XenStoreError]] = {
    "ENOENT": NoEntryError,
    "EACCES": AccessDeniedError,
    "EAGAIN": ConflictError,
    "EEXIST": ExistsError,
    "EINVAL": InvalidRequestError,
    "E2BIG": QuotaError,
    "ENOSPC": QuotaError,
    "EBUSY": BusyError,
}


def errorFromReply(errname: str, op: str | None = None, path: str | None = None) -> XenStoreError:
    """
    Build the most specific L{XenStoreError} for an ERROR reply's errno name.

    @param errname: the errno name from the reply payload, e.g. C{"EAGAIN"}.
    """
    return _ERROR_CLASSES.get(errname, XenStoreError)(errname, op, path)


# Argument errors: raised before anything is sent.


class InvalidPathError(_pyxs.InvalidPath):
    """A path or node name breaks xenstored's syntax or length rules."""

    def __init__(self, path: object, problem: str) -> None:
        self.path = path
        self.problem = problem
        super().__init__(f"invalid XenStore path {path!r}: {problem}")

    def __str__(self) -> str:
        return str(self.args[0])


class InvalidPermissionError(_pyxs.InvalidPermission):
    """A permission string is not C{n}/C{r}/C{w}/C{b} followed by a domid."""

    def __str__(self) -> str:
        return str(self.args[0])


class InvalidPayloadError(_pyxs.InvalidPayload):
    """A request's payload is too large for the wire or has a forbidden byte."""

    def __str__(self) -> str:
        return str(self.args[0])


class InvalidArgumentError(_pyxs.PyXSError, ValueError):
    """Any other bad argument (a domid out of range, a bad token)."""

    def __str__(self) -> str:
        return str(self.args[0])


# Connection-level errors.


class XenStoreConnectionLost(_pyxs.ConnectionError):
    """
    The connection to xenstored closed while the request was outstanding (or
    before it was sent). Whether xenstored executed the request is unknown.
    """

    def __init__(self, reason: str = "connection to xenstored lost") -> None:
        self.reason = reason
        super().__init__(reason)

    def __str__(self) -> str:
        return self.reason


class XenStoreStalled(XenStoreConnectionLost):
    """
    xenstored kept the connection open but stopped answering (stopped,
    deadlocked, stuck in a live update), so the connection was aborted
    (L{xenddev.xenstore.stall}). As for any lost connection, whether it
    executed the request is unknown: it may still do so when it runs again.
    """


class UnexpectedPacket(_pyxs.UnexpectedPacket):
    """A reply did not match its request (wrong type), so it cannot be trusted."""

    def __str__(self) -> str:
        return str(self.args[0])


class MalformedPacket(_pyxs.ConnectionError):
    """
    The byte stream from xenstored cannot be parsed; the connection is unusable.

    @ivar packets: the complete packets that preceded the bad header in the
        same chunk (L{Packet}s), still to be dispatched.
    """

    def __init__(self, message: str, packets: list[Any] | None = None) -> None:
        super().__init__(message)
        self.packets: list[Any] = packets or []

    def __str__(self) -> str:
        return str(self.args[0])


class XenStoreTimeout(_pyxs.PyXSError):
    """A wait on XenStore (L{waitFor}) did not see its condition in time."""

    def __init__(self, path: str, timeout: float, last: str | None = None) -> None:
        self.path = path
        self.timeout = timeout
        self.last = last
        super().__init__(f"timed out after {timeout:g} s waiting on {path} (last value: {last!r})")

    def __str__(self) -> str:
        return str(self.args[0])


class TransactionRetriesExhausted(_pyxs.PyXSError):
    """A transaction kept conflicting (EAGAIN) and the retry budget ran out."""

    def __init__(self, attempts: int) -> None:
        self.attempts = attempts
        super().__init__(
            f"transaction still conflicting (EAGAIN) after {attempts} attempts; giving up"
        )

    def __str__(self) -> str:
        return str(self.args[0])
