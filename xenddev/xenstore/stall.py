# -*- test-case-name: tests.test_xenstore_stall -*-
"""
Noticing a xenstored that keeps its connection open but stops answering.

A lost connection shows at once (EOF, a reset). A store that is stopped
(SIGSTOP), deadlocked or stuck in a live update keeps its socket open and
answers nothing: without this, every request on it waits for ever, or
until whatever its caller waits with gives up.

The rule: a connection is I{stalled} when requests are outstanding and
nothing at all (no reply, no watch event) has come from the store for
C{seconds}. Progress is what counts, not a request's latency: a store
working through a thousand pipelined requests answers some of them every
moment and is never stalled, however long the last of them waits; an idle
connection is never stalled either (nothing is asked of it). Time this
process itself did not run (a check far later than due: its reactor
blocked) is not counted against the store, whose replies may be sitting
unread.

A stalled connection is aborted with L{XenStoreStalled}, a
L{XenStoreConnectionLost}: its outstanding requests fail as on any lost
connection (the store may have executed them, or may yet, when it runs
again), and a L{ReconnectingXenStore} reconnects. The watch's timer runs
only while requests are outstanding: a check every quarter of C{seconds},
started again by the request that finds the watch idle; the request path
itself pays one attribute read (L{XenStoreProtocol.armStallWatch}).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from xenddev.xenstore.errors import XenStoreStalled
from xenddev.xenstore.protocol import XenStoreProtocol

__all__ = ["StallReport", "StallWatch"]

#: Called when a connection is found stalled, before it is aborted, with
#: the requests outstanding and the seconds the store has been silent.
StallReport = Callable[[int, float], object]


class StallWatch:
    """
    Watches one connection for a stall; aborts it when it finds one.

    @param protocol: the connection (attached at once; the watch ends with it).
    @param reactor: gives the time and the timer.
    @param seconds: how long the store may stay silent with requests outstanding.
    @param address: the store's address, for messages.
    @param report: told of the stall before the abort; by default the
        watch logs it as an error itself.
    """

    log = Logger()

    def __init__(
        self,
        protocol: XenStoreProtocol,
        reactor: IReactorTime,
        seconds: float,
        address: str = "xenstored",
        report: StallReport | None = None,
    ) -> None:
        if not seconds > 0:
            raise ValueError(f"a stall takes a positive number of seconds, not {seconds!r}")
        self.protocol = protocol
        self.reactor = reactor
        self.seconds = seconds
        self.address = address
        self.report: StallReport = report if report is not None else self._logStall
        #: Whether this watch found the connection stalled (and aborted it).
        self.stalled = False
        self._tick = seconds / 4
        self._call: IDelayedCall | None = None
        self._since = 0.0
        self._seen = 0
        self._due = 0.0
        protocol.whenConnectionLost().addCallback(self._ended)
        if protocol.connected:
            protocol.armStallWatch = self._arm
            if protocol.pendingCount:
                self._arm()

    def _arm(self) -> None:
        # The first request after an idle spell: the silence starts now.
        self.protocol.armStallWatch = None
        self._since = self.reactor.seconds()
        self._seen = self.protocol.packetsReceived
        self._schedule(self._tick)

    def _schedule(self, delay: float) -> None:
        self._due = self.reactor.seconds() + delay
        self._call = self.reactor.callLater(delay, self._check)

    def _check(self) -> None:
        self._call = None
        protocol = self.protocol
        if not protocol.connected:
            return
        outstanding = protocol.pendingCount
        if not outstanding:
            protocol.armStallWatch = self._arm
            return
        now = self.reactor.seconds()
        seen = protocol.packetsReceived
        if seen != self._seen or now - self._due > self._tick:
            # Something came since the last look; when exactly is not
            # known, so the silence is counted from now (never too early).
            # A check this late means this process was not running (the
            # reactor blocked, the machine suspended): the replies may be
            # waiting unread, so the store is not blamed for that time.
            self._seen = seen
            self._since = now
        silent = now - self._since
        if silent >= self.seconds:
            self._stall(outstanding, silent)
            return
        self._schedule(min(self._tick, self.seconds - silent))

    def _stall(self, outstanding: int, silent: float) -> None:
        self.stalled = True
        try:
            self.report(outstanding, silent)
        finally:
            self.protocol.abort(
                XenStoreStalled(
                    f"XenStore at {self.address} stopped answering: {outstanding} requests "
                    f"outstanding for {silent:.1f} s; connection aborted"
                )
            )

    def _logStall(self, outstanding: int, silent: float) -> None:
        self.log.error(
            "XenStore at {address} stopped answering: {outstanding} requests outstanding "
            "for {silent:.1f} s; aborting the connection",
            address=self.address,
            outstanding=outstanding,
            silent=silent,
        )

    def _ended(self, _: Any) -> None:
        self.protocol.armStallWatch = None
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
