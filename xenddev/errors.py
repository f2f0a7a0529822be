# -*- test-case-name: tests.test_errors -*-
"""
The root of xenddev's exceptions, and the fault codes clients see.

Every exception the daemon's layers raise derives from L{XenddevError} and
declares, beside its definition, the L{FaultCode} an XML-RPC client gets
for it (C{faultCode}); the XML-RPC layer reads that one attribute instead
of testing the exception against each class it knows — as AMP declares a
command's errors with the command. An exception that declares nothing is
internal (fault 1): the daemon logs its traceback.

Two kinds of exception stay outside this root, and the XML-RPC layer keeps
their codes (L{xenddev.xmlrpc.FOREIGN_FAULTS}): those of the XenStore
layer (C{xenddev.xenstore} imports nothing from the rest of xenddev; its
errors extend pyxs's), and those of Twisted and the standard library
(C{CancelledError}, C{PermissionError}).

This module is the bottom of the tree: it imports nothing from xenddev,
and nothing heavy (the command-line client may load it).
"""

from __future__ import annotations

import enum


class FaultCode(enum.IntEnum):
    """The fault codes of the XML-RPC service (stable; documented in docs/xmlrpc.md)."""

    INTERNAL = 1  # a bug or an unexpected condition: the log has the details
    GENERIC = 2  # the operation failed (xend's XendError/VmError)
    INVALID_DOMAIN = 3  # no such domain, or a domain id out of range
    BAD_CONFIG = 10  # bad arguments, unparsable s-expression, invalid config
    NO_SUCH_DEVICE = 11  # no such device, vdi/vif, data path or quiesce handle
    NOT_FOUND = 11
    DEVICE_EXISTS = 12  # the device id is in use (or the device/vdi/data path is busy)
    TIMEOUT = 13  # XenStore or the driver domain did not answer in time
    PERMISSION = 14  # XenStore refused access
    HOTPLUG_FAILED = 15  # the hotplug script failed, was busy or never reported
    UNAVAILABLE = 16  # the XenStore connection is down or the daemon is stopping
    WRONG_STATE = 17  # the vdi/vif is not in a state that allows the request
    DATAPATH_FAILED = 18  # pausing, resuming or merging a data path failed
    UNSUPPORTED = 19  # the lower layer does not offer this for that object
    # Twisted's own: 8001 no such method, 8002 malformed request.


class XenddevError(Exception):
    """
    The root of xenddev's exceptions.

    @ivar faultCode: the fault code a client gets for this error. A class
        declares it beside its definition; an instance may narrow it (a
        driver domain's refusal takes the code of its errno). L{INTERNAL
        <FaultCode.INTERNAL>} unless declared: the error is then a bug or
        a condition no client can act on, and its traceback is logged.
    """

    faultCode: FaultCode = FaultCode.INTERNAL

    def faultMessage(self) -> str:
        """The fault's message a client reads: by default, C{str(self)}."""
        return str(self)
