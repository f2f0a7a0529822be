# -*- test-case-name: tests.test_reconnect -*-
"""
Make a guest's frontends follow backends that moved (driver-domain restart),
from the toolstack: suspend the guest and resume it the slow way.

Linux's blkfront and netfront read C{<frontend>/backend} only when they
probe and when they resume (C{xenbus_dev_resume}); a frontend whose backend
died just stalls. L{reconnectGuest} asks the guest's kernel to suspend
(C{control/shutdown = suspend}, as C{xl save} does), waits until Xen reports
the domain shut down for a suspend, and resumes it without cancelling the
suspend, the path a restore takes, on which xenbus re-reads each frontend's
C{backend}.

On real Xen this does not work with Linux 6.1 PV guests: after the slow
resume of the same domain the guest panics ("register_vcpu_info failed:
cpu=0 err=-22", its vcpu_info still registered), and a guest with a process
stuck in I/O on the dead backend does not suspend at all (its processes
cannot be frozen). It is therefore opt-in (C{restart --reconnect}); the
lane's guests reconnect themselves with a PM test suspend cycle. See
docs/protocol.md, "Driver-domain restart". L{suspendGuest} alone is what a
planned restart can use.
"""

from __future__ import annotations

import time
from typing import Any, Protocol

from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.logger import Logger

from xenddev.errors import XenddevError
from xenddev.xenctrl import IDomainControl
from xenddev.xenstore.paths import validateDomid

__all__ = ["GuestReconnectError", "ResumingXenStore", "reconnectGuest", "suspendGuest"]

log = Logger()

#: Seconds between two looks at the domain while it suspends.
POLL_SECONDS = 0.1


class ResumingXenStore(Protocol):
    """The XenStore calls a reconnection makes (a privileged connection)."""

    def write(self, path: str, value: str | bytes) -> Deferred[None]:
        """Write a node."""

    def readOrNone(self, path: str) -> Deferred[str | None]:
        """Read a node, L{None} if missing."""

    def rm(self, path: str, missingOk: bool = False) -> Deferred[None]:
        """Remove a node."""

    def resumeDomain(self, domid: int) -> Deferred[None]:
        """XS_RESUME: xenstored re-arms C{@releaseDomain} for the domain."""


class GuestReconnectError(XenddevError, RuntimeError):
    """The guest did not suspend in time, or could not be resumed."""


async def suspendGuest(
    xs: ResumingXenStore,
    control: IDomainControl,
    domid: int,
    reactor: Any,
    timeout: float = 60.0,
) -> None:
    """
    Ask guest C{domid}'s kernel to suspend (C{control/shutdown = suspend})
    and wait until Xen reports it shut down for a suspend; a guest already
    suspended is left so.

    A Linux guest freezes its processes first, and a process waiting
    uninterruptibly for I/O on a dead backend cannot be frozen: such a
    guest does not suspend (seen on real Xen; see docs/protocol.md).

    @raise GuestReconnectError: the guest does not exist, did not suspend
        within C{timeout} (the request is withdrawn), or shut down for
        another reason.
    """
    domid = validateDomid(domid)
    state = await control.domainState(domid)
    if state is None or state.dying:
        raise GuestReconnectError(f"domain {domid} does not exist")
    if state.suspended:
        return
    request = f"/local/domain/{domid}/control/shutdown"
    started = reactor.seconds()
    await xs.write(request, "suspend")
    while True:
        await deferLater(reactor, POLL_SECONDS, lambda: None)
        state = await control.domainState(domid)
        if state is None:
            raise GuestReconnectError(f"domain {domid} went away while suspending")
        if state.suspended:
            return
        if state.shutdown:
            raise GuestReconnectError(
                f"domain {domid} shut down (reason {state.shutdownReason}), not suspended"
            )
        if reactor.seconds() - started > timeout:
            # Withdraw the request unless the guest took it already.
            if await xs.readOrNone(request) == "suspend":
                await xs.rm(request, missingOk=True)
            raise GuestReconnectError(f"domain {domid} did not suspend within {timeout:.0f}s")


async def reconnectGuest(
    xs: ResumingXenStore,
    control: IDomainControl,
    domid: int,
    reactor: Any,
    timeout: float = 60.0,
) -> float:
    """
    Suspend guest C{domid} (L{suspendGuest}; one already suspended, e.g.
    before a planned driver-domain restart, is only resumed) and resume it
    the slow way, so that its frontends reconnect to the backends
    C{<frontend>/backend} names now.

    @param xs: a privileged XenStore connection.
    @param control: the hypervisor (L{xenddev.xenctrl.XenControl}).
    @param reactor: the clock to poll on.
    @param timeout: seconds for the guest to suspend.
    @return: the seconds from the call to the resume.
    @raise GuestReconnectError: see L{suspendGuest}.
    """
    wall = time.monotonic()
    await suspendGuest(xs, control, domid, reactor, timeout)
    await control.resume(domid)
    # xenstored re-arms @releaseDomain for the domain (as libxl does).
    await xs.resumeDomain(domid)
    away = time.monotonic() - wall
    log.info("Guest {domid} reconnected in {away:.2f}s", domid=domid, away=away)
    return away
