"""
Tests for L{xenddev.toolstack.reconnect} (a guest's suspend and slow
resume after a driver-domain restart), L{xenddev.xenctrl} (the hypervisor,
through ctypes) and the permission hand-over of
L{xenddev.toolstack.restart}.
"""

from __future__ import annotations

import ctypes
import struct
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from xenddev.toolstack.reconnect import GuestReconnectError, reconnectGuest, suspendGuest
from xenddev.toolstack.restart import MovedObject, _guestsOf, handOverPerms
from xenddev.xenctrl import (
    SHUTDOWN_CRASH,
    SHUTDOWN_SUSPEND,
    DomainState,
    IDomainControl,
    XenControl,
    parseDomainInfo,
)
from xenddev.xenstore.paths import Perm

GUEST = 7
REQUEST = f"/local/domain/{GUEST}/control/shutdown"


class FakeStore:
    """The XenStore calls a reconnection makes, in a dict; a call log."""

    def __init__(self) -> None:
        self.nodes: dict[str, str] = {}
        self.calls: list[tuple[Any, ...]] = []

    def write(self, path: str, value: str | bytes) -> Deferred[None]:
        """Write a node."""
        self.calls.append(("write", path, value))
        self.nodes[path] = value if isinstance(value, str) else value.decode()
        return succeed(None)

    def readOrNone(self, path: str) -> Deferred[str | None]:
        """Read a node."""
        return succeed(self.nodes.get(path))

    def rm(self, path: str, missingOk: bool = False) -> Deferred[None]:
        """Remove a node."""
        self.calls.append(("rm", path))
        self.nodes.pop(path, None)
        return succeed(None)

    def resumeDomain(self, domid: int) -> Deferred[None]:
        """XS_RESUME."""
        self.calls.append(("resumeDomain", domid))
        return succeed(None)


@implementer(IDomainControl)
class FakeControl:
    """
    A hypervisor with one guest, whose kernel suspends (or not) when the
    store asks it to: C{reaction} is what it does with a suspend request.
    """

    def __init__(self, xs: FakeStore, reaction: str = "suspend") -> None:
        self.xs = xs
        self.reaction = reaction
        self.state: DomainState | None = DomainState(GUEST)
        self.calls: list[tuple[Any, ...]] = []

    def domainState(self, domid: int) -> Deferred[DomainState | None]:
        """The guest's state; it reacts to a pending request first."""
        if self.state is not None and self.xs.nodes.get(REQUEST) == "suspend":
            if self.reaction == "suspend":
                del self.xs.nodes[REQUEST]  # the guest's kernel takes it
                self.state = DomainState(GUEST, shutdown=True, shutdownReason=SHUTDOWN_SUSPEND)
            elif self.reaction == "crash":
                self.state = DomainState(GUEST, shutdown=True, shutdownReason=SHUTDOWN_CRASH)
        return succeed(self.state if domid == GUEST else None)

    def resume(self, domid: int) -> Deferred[None]:
        """Resume: it runs again."""
        self.calls.append(("resume", domid))
        self.xs.calls.append(("resume", domid))
        self.state = DomainState(GUEST)
        return succeed(None)


class ReconnectGuestTests(TestCase):
    """L{reconnectGuest}."""

    def setUp(self) -> None:
        """A fake store, hypervisor and clock."""
        self.xs = FakeStore()
        self.control = FakeControl(self.xs)
        self.clock = Clock()

    def reconnect(self, timeout: float = 10.0) -> Deferred[float]:
        """Start a reconnection of the guest."""
        return Deferred.fromCoroutine(
            reconnectGuest(self.xs, self.control, GUEST, self.clock, timeout)
        )

    def test_suspendThenSlowResume(self) -> None:
        """
        The guest is asked to suspend through C{control/shutdown}; once Xen
        reports it suspended, it is resumed and xenstored told (XS_RESUME),
        in that order.
        """
        d = self.reconnect()
        self.clock.advance(0.1)
        self.successResultOf(d)
        self.assertEqual(
            self.xs.calls,
            [("write", REQUEST, "suspend"), ("resume", GUEST), ("resumeDomain", GUEST)],
        )
        self.assertFalse(self.control.state is None or self.control.state.shutdown)

    def test_suspendOnly(self) -> None:
        """
        L{suspendGuest} (before a planned driver-domain restart) leaves the
        guest suspended: nothing is resumed.
        """
        d = Deferred.fromCoroutine(suspendGuest(self.xs, self.control, GUEST, self.clock, 10))
        self.clock.advance(0.1)
        self.successResultOf(d)
        self.assertEqual(self.xs.calls, [("write", REQUEST, "suspend")])
        assert self.control.state is not None
        self.assertTrue(self.control.state.suspended)

    def test_alreadySuspended(self) -> None:
        """A guest already suspended is only resumed."""
        self.control.state = DomainState(GUEST, shutdown=True, shutdownReason=SHUTDOWN_SUSPEND)
        self.successResultOf(self.reconnect())
        self.assertEqual(self.xs.calls, [("resume", GUEST), ("resumeDomain", GUEST)])

    def test_guestIgnoresRequest(self) -> None:
        """
        A guest that does not suspend within the timeout: the request is
        withdrawn, nothing is resumed, L{GuestReconnectError}.
        """
        self.control.reaction = "ignore"
        d = self.reconnect(timeout=2)
        self.clock.pump([0.1] * 25)
        self.failureResultOf(d, GuestReconnectError)
        self.assertNotIn(REQUEST, self.xs.nodes)
        self.assertEqual(self.control.calls, [])

    def test_guestCrashes(self) -> None:
        """A guest that shuts down for another reason is not resumed."""
        self.control.reaction = "crash"
        d = self.reconnect()
        self.clock.advance(0.1)
        failure = self.failureResultOf(d, GuestReconnectError)
        self.assertIn("reason 3", str(failure.value))
        self.assertEqual(self.control.calls, [])

    def test_noSuchDomain(self) -> None:
        """A domain that does not exist: L{GuestReconnectError}, nothing written."""
        self.control.state = None
        self.failureResultOf(self.reconnect(), GuestReconnectError)
        self.assertEqual(self.xs.calls, [])


class DomainInfoTests(TestCase):
    """L{parseDomainInfo} and L{XenControl} over fake libraries."""

    def test_parse(self) -> None:
        """The head of C{xc_dominfo_t}: domid, ssid, flag bits, reason."""
        raw = struct.pack("=IIII", 9, 0, 0b0110, SHUTDOWN_CRASH) + bytes(64)
        self.assertEqual(
            parseDomainInfo(raw),
            DomainState(9, crashed=True, shutdown=True, shutdownReason=SHUTDOWN_CRASH),
        )

    def test_parseRunning(self) -> None:
        """A running domain has no shutdown reason (Xen leaves garbage there)."""
        state = parseDomainInfo(struct.pack("=IIII", 3, 0, 0b100000, 77))
        self.assertEqual(state, DomainState(3))
        self.assertFalse(state.suspended)

    async def test_xenControl(self) -> None:
        """
        L{XenControl} opens one handle, reads a domain (another domain's
        answer means "no such domain") and resumes without cancelling the
        suspend (C{fast = 0}).
        """
        calls: list[tuple[Any, ...]] = []

        class Lib:
            pass

        ctrl, guest = Lib(), Lib()

        def xcOpen(*args: Any) -> int:
            calls.append(("open",))
            return 1234

        def getinfo(xch: int, first: int, count: int, buffer: Any) -> int:
            calls.append(("getinfo", xch, first, count))
            raw = struct.pack("=IIII", first if first != 99 else 100, 0, 0b100, SHUTDOWN_SUSPEND)
            ctypes.memmove(buffer, raw, len(raw))
            return 1

        def resume(xch: int, domid: int, fast: int) -> int:
            calls.append(("resume", xch, domid, fast))
            return 0

        ctrl.xc_interface_open = xcOpen  # type: ignore[attr-defined]
        ctrl.xc_interface_close = lambda xch: calls.append(("close", xch))  # type: ignore[attr-defined]
        ctrl.xc_domain_getinfo = getinfo  # type: ignore[attr-defined]
        guest.xc_domain_resume = resume  # type: ignore[attr-defined]
        control = XenControl(reactor, ctrl, guest)
        verifyObject(IDomainControl, control)

        state = await control.domainState(GUEST)
        self.assertEqual(state, DomainState(GUEST, shutdown=True, shutdownReason=2))
        self.assertIsNone(await control.domainState(99))
        await control.resume(GUEST)
        control.close()
        self.assertEqual(
            calls,
            [
                ("open",),
                ("getinfo", 1234, GUEST, 1),
                ("getinfo", 1234, 99, 1),
                ("resume", 1234, GUEST, 0),
                ("close", 1234),
            ],
        )


class HandOverTests(TestCase):
    """The frontend permissions a driver-domain move hands over."""

    def test_oldGrantGoesToNew(self) -> None:
        """The owner stays; the old driver domain's grant is the new one's."""
        self.assertEqual(
            handOverPerms([Perm("n", 7), Perm("r", 3)], 3, 4), [Perm("n", 7), Perm("r", 4)]
        )

    def test_noGrantYet(self) -> None:
        """A node without the old driver domain's grant gets read access for the new."""
        self.assertEqual(handOverPerms([Perm("n", 7)], 3, 4), [Perm("n", 7), Perm("r", 4)])

    def test_alreadyHandedOver(self) -> None:
        """Handing over twice changes nothing (a retried move)."""
        perms = [Perm("n", 7), Perm("r", 4)]
        self.assertEqual(handOverPerms(perms, 3, 4), perms)

    def test_othersKept(self) -> None:
        """Other domains' grants stay, in order, without duplicates."""
        self.assertEqual(
            handOverPerms([Perm("n", 7), Perm("r", 3), Perm("b", 9), Perm("r", 4)], 3, 4),
            [Perm("n", 7), Perm("r", 4), Perm("b", 9)],
        )

    def test_guestsOfMove(self) -> None:
        """The guests to reconnect: each guest whose frontends moved, once."""
        moved = [
            MovedObject("vdi", "a", True, {}, {"p0": "/local/domain/7/device/vbd/51728"}),
            MovedObject("vif", "b", True, {}, {"p0": "/local/domain/7/device/vif/0"}),
            MovedObject("vdi", "c", True, {}, {"p0": "/local/domain/5/device/vbd/51712"}),
        ]
        self.assertEqual(_guestsOf(moved), [5, 7])
