# -*- test-case-name: tests.test_driverdomain -*-
"""
Jobs serialised per key, for the agent: one object's requests, one
device's hotplug dispatch.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Hashable

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger


class Serialiser:
    """
    Runs at most one job per key at a time; a poke during a run schedules
    exactly one more run afterwards (events are level-triggered: each run
    re-reads the store, so pokes in between may be merged).
    """

    def __init__(self) -> None:
        self._running: dict[Hashable, bool] = {}  # key -> poked again while running
        self._idle: list[Deferred[None]] = []

    def poke(self, key: Hashable, job: Callable[[], Awaitable[None]], log: Logger) -> None:
        """Run C{job} for C{key} now, or once more after the run in progress."""
        if key in self._running:
            self._running[key] = True
            return
        self._running[key] = False

        async def loop() -> None:
            while True:
                try:
                    await job()
                except Exception:
                    log.failure("Driver-domain agent job {key} failed", key=key)
                if not self._running[key]:
                    break
                self._running[key] = False
            del self._running[key]
            if not self._running:
                idle, self._idle = self._idle, []
                for d in idle:
                    d.callback(None)

        Deferred.fromCoroutine(loop())

    def whenIdle(self) -> Deferred[None]:
        """Fire once no job runs."""
        if not self._running:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._idle.append(d)
        return d

    @property
    def busy(self) -> bool:
        """Whether a job runs."""
        return bool(self._running)
