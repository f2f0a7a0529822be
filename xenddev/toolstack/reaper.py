# -*- test-case-name: tests.test_reaper -*-
"""
Releasing the devices of guests that died without a detach.

A guest destroyed by another toolstack (C{xl destroy}), or one that crashed
and was cleaned up, loses its home (C{/local/domain/<domid>}, frontends
included) and its C{/vm} records, but nothing tells the driver domains:
their backendctrl objects stay plugged, the kernel backend has let go of its
device (its frontend vanished) yet the backend directory, the loop device or
tapdisk behind it and the object's state stay for ever. xend released a dead
domain's devices itself; L{DeadDomainReaper} does it from what XenStore
holds: on every C{@releaseDomain} event (and once at start) it lists the
objects of each driver domain it knows and tears down every object whose
plugs all serve frontends of domains whose home is gone (each plug's unplug
runs the remove script before the backend directory goes).

A domain counts as gone when C{/local/domain/<domid>} does not exist: the
toolstack that destroys a domain removes it (libxl does, and so does
L{xenddev.toolstack.manager.DeviceManager}'s embedding), and it is the one fact
every xenstored agrees on (the embedded one has no hypervisor to ask).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from xenddev.backendctrl.protocol import OBJECT_CLASSES
from xenddev.interfaces import IWatchHandle, IXenStore
from xenddev.toolstack.client import DriverDomainClient, ObjectInfo
from xenddev.xenbus import XenbusPathError, domainPath, parseFrontendPath


def frontendDomain(path: str | None) -> int | None:
    """The guest of a frontend path, or C{None} if it is not one."""
    try:
        return parseFrontendPath(path or "").domid
    except XenbusPathError:
        return None


class DeadDomainReaper:
    """
    Tears down the backendctrl objects of guests whose home is gone (see
    the module docstring).

    @param xs: the toolstack's XenStore connection.
    @param driverDomains: the driver domains to look at (called at each
        scan: the set grows as devices are attached).
    @param client: the protocol client of a driver domain (the
        L{DeviceManager}'s, so requests are serialised with its own).
    """

    log = Logger()

    def __init__(
        self,
        xs: IXenStore,
        driverDomains: Callable[[], Iterable[int]],
        client: Callable[[int], DriverDomainClient],
    ) -> None:
        self.xs = xs
        self._driverDomains = driverDomains
        self._client = client
        self._watch: IWatchHandle | None = None
        self._running: Deferred[None] | None = None
        self._again = False
        #: Objects torn down so far (for logs and tests).
        self.released = 0

    def start(self) -> Deferred[None]:
        """Watch C{@releaseDomain} (xenstored fires it once at registration: the first scan)."""

        async def start() -> None:
            self._watch = await self.xs.watch("@releaseDomain", lambda _path: self.poke())

        return Deferred.fromCoroutine(start())

    def stop(self) -> Deferred[None]:
        """Stop watching; wait for a scan in progress."""

        async def stop() -> None:
            watch, self._watch = self._watch, None
            if watch is not None:
                await watch.stop()
            if self._running is not None:
                await self._running

        return Deferred.fromCoroutine(stop())

    def poke(self) -> Deferred[None]:
        """Scan soon (once more after the scan in progress, if any); fires when done."""
        self._again = True
        if self._running is None:
            self._running = Deferred.fromCoroutine(self._loop())
        return self._running

    async def _loop(self) -> None:
        try:
            while self._again:
                self._again = False
                try:
                    await self.scan()
                except Exception:
                    self.log.failure("Releasing the devices of dead domains failed")
        finally:
            self._running = None

    async def scan(self) -> int:
        """Tear down the objects of every gone guest; return how many."""
        released = 0
        alive: dict[int, bool] = {}
        for dd in sorted(set(self._driverDomains())):
            client = self._client(dd)
            for cls in OBJECT_CLASSES.values():
                for info in await client.list(cls):
                    if await self._orphaned(info, alive):
                        self.log.info(
                            "Domain of {cls} {name} (driver domain {dd}) is gone: releasing it",
                            cls=cls.name,
                            name=info.name,
                            dd=dd,
                        )
                        await client.teardown(info.name, cls)
                        released += 1
        self.released += released
        return released

    async def _orphaned(self, info: ObjectInfo, alive: dict[int, bool]) -> bool:
        guests = {frontendDomain(p.frontend) for p in info.plugs}
        if not guests or None in guests:
            # Not plugged (a vdi.* object of its own), or a frontend we do
            # not understand: not ours to judge.
            return False
        for guest in guests:
            assert guest is not None
            if guest not in alive:
                alive[guest] = await self.xs.exists(domainPath(guest))
            if alive[guest]:
                return False
        return True
