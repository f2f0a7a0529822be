# -*- test-case-name: tests.test_reconnect -*-
"""
What the toolstack asks the hypervisor about a domain, and the one thing it
asks it to do: resume a suspended domain.

L{XenControl} calls Xen's C{libxenctrl} (C{xc_domain_getinfo}) and
C{libxenguest} (C{xc_domain_resume}) through C{ctypes}, in the reactor's
thread pool (each call is a hypercall or two, but a slow resume maps guest
memory). L{IDomainControl} is the contract; tests use a fake.

Only the head of C{xc_dominfo_t} is read (stable since Xen 3): the domain
id, the ssid, a word of one-bit flags (dying, crashed, shutdown, paused,
blocked, running, hvm, ...) and the shutdown reason.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import struct
from typing import Any

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from zope.interface import Interface, implementer

from xenddev.errors import XenddevError

__all__ = [
    "SHUTDOWN_CRASH",
    "SHUTDOWN_SUSPEND",
    "DomainState",
    "IDomainControl",
    "XenControl",
    "XenControlError",
    "parseDomainInfo",
]

#: Xen's shutdown reasons (xen/include/public/sched.h) the toolstack tells apart.
SHUTDOWN_POWEROFF = 0
SHUTDOWN_REBOOT = 1
SHUTDOWN_SUSPEND = 2
SHUTDOWN_CRASH = 3

#: Bytes reserved for an C{xc_dominfo_t} (about 100 in Xen 4.17).
_DOMINFO_SIZE = 4096
_DOMINFO_HEAD = struct.Struct("=IIII")  # domid, ssidref, flags, shutdown_reason


class XenControlError(XenddevError, OSError):
    """A C{libxenctrl}/C{libxenguest} call failed (errno and the call)."""


@attrs.frozen
class DomainState:
    """
    A domain as the hypervisor sees it.

    @ivar domid: the domain.
    @ivar dying: being destroyed.
    @ivar crashed: it crashed (and was kept: C{on_crash=preserve}).
    @ivar shutdown: it has shut down (suspended, crashed, powered off...).
    @ivar shutdownReason: why (L{SHUTDOWN_SUSPEND}...), when C{shutdown}.
    @ivar paused: paused by the toolstack.
    """

    domid: int
    dying: bool = False
    crashed: bool = False
    shutdown: bool = False
    shutdownReason: int | None = None
    paused: bool = False

    @property
    def suspended(self) -> bool:
        """Whether it has shut down for a suspend (and waits to be resumed)."""
        return self.shutdown and self.shutdownReason == SHUTDOWN_SUSPEND


def parseDomainInfo(raw: bytes) -> DomainState:
    """The L{DomainState} in the head of an C{xc_dominfo_t}."""
    domid, _ssid, flags, reason = _DOMINFO_HEAD.unpack_from(raw)
    shutdown = bool(flags & 4)
    return DomainState(
        domid=domid,
        dying=bool(flags & 1),
        crashed=bool(flags & 2),
        shutdown=shutdown,
        shutdownReason=reason if shutdown else None,
        paused=bool(flags & 8),
    )


class IDomainControl(Interface):
    """The hypervisor's view of domains, for the toolstack."""

    def domainState(domid: int) -> Deferred[DomainState | None]:  # noqa: N805
        """The domain's state, or L{None} if it does not exist."""

    def resume(domid: int) -> Deferred[None]:  # noqa: N805
        """
        Resume a domain suspended by its own kernel (shut down with reason
        suspend) the slow way, as after a restore: its kernel then
        reconnects its frontends (the restore path), instead of carrying on
        as after a cancelled suspend.
        """


@implementer(IDomainControl)
class XenControl:
    """
    L{IDomainControl} over C{libxenctrl} and C{libxenguest} (dom0 only).

    @param reactor: its thread pool runs the calls.
    @param ctrl: the C{libxenctrl} library (default: loaded by name).
    @param guest: the C{libxenguest} library (default: loaded by name).
    """

    def __init__(self, reactor: Any, ctrl: Any = None, guest: Any = None) -> None:
        self._reactor = reactor
        self._ctrl = ctrl if ctrl is not None else _load("xenctrl")
        self._guest = guest if guest is not None else _load("xenguest")
        self._ctrl.xc_interface_open.restype = ctypes.c_void_p
        self._ctrl.xc_interface_open.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint]
        self._ctrl.xc_interface_close.argtypes = [ctypes.c_void_p]
        self._ctrl.xc_domain_getinfo.argtypes = [
            ctypes.c_void_p,
            ctypes.c_uint32,
            ctypes.c_uint,
            ctypes.c_void_p,
        ]
        self._guest.xc_domain_resume.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int]
        self._handle: int | None = None

    def _xch(self) -> int:
        if self._handle is None:
            handle = self._ctrl.xc_interface_open(None, None, 0)
            if not handle:
                errno = ctypes.get_errno()
                raise XenControlError(errno, "xc_interface_open failed")
            self._handle = handle
        return self._handle

    def _call(self, fn: Any) -> Deferred[Any]:
        return deferToThreadPool(self._reactor, self._reactor.getThreadPool(), fn)

    def domainState(self, domid: int) -> Deferred[DomainState | None]:
        """See L{IDomainControl.domainState}."""

        def get() -> DomainState | None:
            buffer = ctypes.create_string_buffer(_DOMINFO_SIZE)
            found = self._ctrl.xc_domain_getinfo(self._xch(), domid, 1, buffer)
            if found < 0:
                raise XenControlError(ctypes.get_errno(), f"xc_domain_getinfo({domid}) failed")
            if found == 0:
                return None
            state = parseDomainInfo(buffer.raw)
            return state if state.domid == domid else None

        return self._call(get)

    def resume(self, domid: int) -> Deferred[None]:
        """See L{IDomainControl.resume}: C{xc_domain_resume(xch, domid, fast=0)}."""

        def run() -> None:
            if self._guest.xc_domain_resume(self._xch(), domid, 0) != 0:
                raise XenControlError(ctypes.get_errno(), f"xc_domain_resume({domid}) failed")

        return self._call(run)

    def close(self) -> None:
        """Close the library handle (blocking; at shutdown)."""
        if self._handle is not None:
            self._ctrl.xc_interface_close(self._handle)
            self._handle = None


def _load(name: str) -> Any:
    """Load C{lib<name>} with errno kept, or raise L{XenControlError}."""
    path = ctypes.util.find_library(name)
    if path is None:
        raise XenControlError(2, f"lib{name} not found (Xen's runtime libraries)")
    return ctypes.CDLL(path, use_errno=True)
