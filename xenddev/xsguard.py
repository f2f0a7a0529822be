# -*- test-case-name: tests.test_xsguard -*-
"""
Answering clients during a XenStore outage instead of blocking them.

L{ReconnectingXenStore} keeps a request made while it has no connection
until the next one: right for the daemon's own background work (the
agent, the simulators), wrong for a client's call, which then blocks
silently until the client gives up (300 s for xm) — and whose requests,
still queued, would run whenever xenstored came back, long after the
client was told nothing.

L{GuardedXenStore} is the daemon's toolstack connection (the device
manager's, so every XML-RPC call's): with a connection, a request goes
straight through; without one, it waits at most C{bound} seconds (the
daemon's C{timeouts.connect}) for the next connection, then fails with
L{XenStoreUnreachableError} (fault 16) and is dropped, never sent. So an
operation refused this way writes nothing, then or later: its first
request is never made, and the requests after it are never reached.

A store that stops answering with its connection open is a lost connection
too (the C{stall} rule of L{ReconnectingXenStore}, the same seconds): the
requests it left unanswered fail (fault 16), and new ones wait for a
connection on which it answers again, at most C{bound} seconds.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IStreamClientEndpoint

from xenddev.errors import FaultCode, XenddevError
from xenddev.xenstore.client import XenStoreClient
from xenddev.xenstore.connection import ReconnectingXenStore

__all__ = ["GuardedXenStore", "XenStoreUnreachableError"]


class XenStoreUnreachableError(XenddevError, ConnectionError):
    """No XenStore connection could be had in time; the request was not sent."""

    faultCode = FaultCode.UNAVAILABLE


class GuardedXenStore(ReconnectingXenStore):
    """
    A L{ReconnectingXenStore} whose requests (and watches) wait at most
    C{bound} seconds for a connection.

    @param bound: seconds a request may wait for a connection.
    @param address: the store's address, for the error message.
    """

    def __init__(
        self,
        endpoint: IStreamClientEndpoint,
        reactor: Any = None,
        bound: float = 10.0,
        address: str = "XenStore",
        **kwargs: Any,
    ) -> None:
        super().__init__(endpoint, reactor, address=address, **kwargs)
        self.bound = bound

    def whenConnected(self, failAfterFailures: int | None = None) -> Deferred[XenStoreClient]:
        """
        The client of the current connection, or of the next one if it
        comes within L{bound} seconds; else L{XenStoreUnreachableError}
        (and whatever was to follow, a request or a watch, never runs).
        """
        d = super().whenConnected(failAfterFailures)
        if not d.called:
            d.addTimeout(self.bound, self.reactor, onTimeoutCancel=self._unreachable)
        return d

    def _unreachable(self, result: object, timeout: float) -> XenStoreClient:
        if self.stalledSince is not None:
            silent = self.reactor.seconds() - self.stalledSince
            raise XenStoreUnreachableError(
                f"XenStore is unreachable: {self.address} has not answered for {silent:.0f}s "
                f"(no answering connection within {timeout:g}s, timeouts.connect); "
                "nothing was written, retry once it is back"
            )
        raise XenStoreUnreachableError(
            f"XenStore is unreachable: no connection to {self.address} within "
            f"{timeout:g}s (timeouts.connect); nothing was written, retry once it is back"
        )
