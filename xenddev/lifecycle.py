# -*- test-case-name: tests.test_lifecycle -*-
"""
The daemon's parts as child services of its C{MultiService}.

A L{Part} is one thing the daemon starts and stops — a XenStore
connection, the local agent, a simulator, a listener — as a Twisted
L{Service} whose start may take time: C{startService} begins it and
L{Part.ready} fires once it is up (or fails with why not). The daemon adds
its parts one at a time, each once the one it depends on is ready, so the
children of its C{MultiService} are in dependency order.

Twisted's C{MultiService.stopService} asks every child to stop at once;
the daemon's parts must stop one after the other instead (the listeners
close before the operations in flight are drained, which need the
XenStore connection that stops after them). L{stopInReverse} stops the
children of a service in reverse order, each once the one after it has
stopped; a part that fails to stop is logged and the next one stopped all
the same.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.logger import Logger

__all__ = ["Part", "stopInReverse"]

#: What a part's start or stop returns: nothing, a Deferred or a coroutine.
Step = Callable[[], Any]


def _run(step: Step | None) -> Deferred[Any]:
    """Run a step now; its outcome as a Deferred (a coroutine is driven)."""
    if step is None:
        return succeed(None)
    try:
        result = step()
    except BaseException:
        return fail()
    if inspect.iscoroutine(result):
        return Deferred.fromCoroutine(result)
    if isinstance(result, Deferred):
        return result
    return succeed(result)


class Part(Service):
    """
    One part of the daemon, as a child service.

    @param name: its name among the daemon's children (unique).
    @param start: begins it (may return a Deferred or a coroutine);
        L{ready} has its outcome.
    @param stop: ends it (may return a Deferred or a coroutine); called
        once the part was started, whether or not its start succeeded.
    @ivar ready: fires when the start is done; cancelling it cancels the
        start. C{None} until started.
    """

    def __init__(self, name: str, start: Step | None = None, stop: Step | None = None) -> None:
        self.name = name
        self._start = start
        self._stop = stop
        self.ready: Deferred[Any] | None = None

    def startService(self) -> None:
        """Begin the start; L{ready} follows it."""
        super().startService()
        self.ready = _run(self._start)

    def stopService(self) -> Deferred[None]:
        """Cancel a start still under way, then stop the part."""
        super().stopService()
        if self.ready is not None and not self.ready.called:
            self.ready.cancel()
        if self.ready is not None:
            self.ready.addErrback(lambda _: None)  # its waiter has been told
        return _run(self._stop).addCallback(lambda _: None)


def stopInReverse(parent: MultiService, log: Logger) -> Deferred[None]:
    """
    Stop the running children of C{parent}, last added first, each once
    the previous one has stopped; failures are logged, not raised.
    """

    async def run() -> None:
        for child in reversed(list(parent)):
            if not child.running:
                continue
            try:
                await maybeDeferred(child.stopService)
            except Exception:
                log.failure("Error while stopping {name}", name=child.name or child)

    return Deferred.fromCoroutine(run())
