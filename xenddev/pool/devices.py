# -*- test-case-name: tests.test_pool_devices -*-
"""
This host's devices, visible pool-wide (issue 14: "hosts, their liveness
and their devices are visible pool-wide").

Each host keeps one key, C{/xenddev/pool/devices/<host>}, under its session
lease: a JSON list of its guests' devices (domain, class, devid, and for a
device holding a storage target, the target, mode and fencing token). The
key goes with the lease, so a dead host's devices vanish with it, and it
is read by any host in the same range as the others
(L{readPoolDevices}), even when the host's daemon cannot be asked.

Keeping it true (L{DevicePublisher}): the toolstack's records are listed
again and written after a device operation ends (L{changed}), at most once
per C{interval} seconds however many operations end meanwhile (one put in
flight at a time, one more pending), and again at start, after a fence
recovered and after a rejoin (a new lease: the old key went with the old
one). A write etcd refuses is retried after C{interval}; only a changed
list is written.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any
from urllib.parse import quote, unquote

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from xenddev.pool import etcdwire as wire
from xenddev.pool.interfaces import IEtcd, IHostSession
from xenddev.pool.keys import ROOT, checkHostName

__all__ = [
    "DEVICES",
    "DevicePublisher",
    "devicesKey",
    "readPoolDevices",
]

DEVICES = ROOT + b"devices/"


def devicesKey(host: str) -> bytes:
    """The key listing C{host}'s devices."""
    return DEVICES + quote(checkHostName(host), safe="").encode("ascii")


def readPoolDevices(etcd: IEtcd) -> Deferred[dict[str, list[dict[str, Any]]]]:
    """Every live host's published devices, by host name (one range read)."""

    async def read() -> dict[str, list[dict[str, Any]]]:
        result = await etcd.range(wire.Range(DEVICES, wire.prefixEnd(DEVICES)))
        out: dict[str, list[dict[str, Any]]] = {}
        for kv in result.kvs:
            host = unquote(kv.key[len(DEVICES) :].decode("ascii", "replace"))
            try:
                devices = json.loads(kv.value)["devices"]
            except (ValueError, KeyError, TypeError):
                continue  # unreadable: as if not published
            if isinstance(devices, list):
                out[host] = [d for d in devices if isinstance(d, dict)]
        return out

    return Deferred.fromCoroutine(read())


class DevicePublisher:
    """
    Keeps this host's devices key true (see the module docstring).

    @param listDevices: fires with this host's devices as plain data.
    @param interval: the least seconds between two writes (and the retry delay).
    @param resync: seconds between two listings made without being told of
        a change (a guest's devices removed by its destruction, not by an
        operation of this daemon); written only if the list changed.
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        etcd: IEtcd,
        session: IHostSession,
        listDevices: Callable[[], Deferred[list[dict[str, Any]]]],
        interval: float = 0.5,
        resync: float = 30.0,
    ) -> None:
        self._reactor = reactor
        self._etcd = etcd
        self._session = session
        self._list = listDevices
        self.interval = interval
        self._call: IDelayedCall | None = None
        self._running: Deferred[None] | None = None
        self._dirty = False
        self._stopped = False
        #: (lease, JSON) last written: an unchanged list is not written again.
        self._written: tuple[int, bytes] | None = None
        self._failing = False
        self._resync = LoopingCall(self.changed)
        self._resync.clock = reactor
        self._resyncEvery = resync

    def start(self) -> Deferred[None]:
        """Publish now; again after a recovery or a rejoin."""
        self._session.onRecover(self.changed)
        self._session.onRejoin(self.changed)
        self._resync.start(self._resyncEvery, now=False)
        return self._publishNow()

    def stop(self) -> None:
        """Publish no more (the key goes with the lease, or is left to expire)."""
        self._stopped = True
        if self._resync.running:
            self._resync.stop()
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def changed(self) -> None:
        """The devices may have changed: publish within C{interval} seconds."""
        if self._stopped:
            return
        if self._running is not None:
            self._dirty = True
        elif self._call is None or not self._call.active():
            self._call = self._reactor.callLater(self.interval, self._publishNow)

    def _publishNow(self) -> Deferred[None]:
        self._call = None
        self._dirty = False
        d = self._running = Deferred.fromCoroutine(self._publish())

        def done(_: object) -> None:
            self._running = None
            if self._dirty:
                self.changed()

        d.addBoth(done)
        return d

    async def _publish(self) -> None:
        if self._stopped:
            return
        try:
            devices = await self._list()
            value = json.dumps({"devices": devices}, sort_keys=True).encode()
            lease = self._session.lease
            if self._written == (lease, value):
                return
            self._session.checkLive()
            await self._etcd.put(devicesKey(self._session.host), value, lease)
        except Exception as e:
            if not self._failing:
                self.log.warn(
                    "Could not publish this host's devices to the pool: {error}; retrying",
                    error=e,
                )
            self._failing = True
            self._dirty = True
            # Retried after the interval (changed() from done()).
            return
        if self._failing:
            self.log.info("This host's devices are published to the pool again")
        self._failing = False
        self._written = (lease, value)
