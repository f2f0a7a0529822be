"""
A host's devices published to the pool (L{xenddev.pool.devices}): the key
under the session's lease, writes coalesced and only when the list
changed, retried while etcd is down, written again after a rejoin, and a
periodic listing for changes nobody announced — on a fake etcd and
L{task.Clock}.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from tests.support.fakeetcd import FakeEtcd
from xenddev.pool import etcdwire as wire
from xenddev.pool.devices import DevicePublisher, devicesKey, readPoolDevices
from xenddev.pool.session import HostSession


class _CountingEtcd(FakeEtcd):
    """The fake, counting the puts of the devices keys."""

    def __init__(self) -> None:
        super().__init__()
        self.devicePuts = 0

    def put(self, key: bytes, value: bytes, lease: int = 0) -> Deferred[wire.PutResult]:
        """Count, then write."""
        if key.startswith(b"/xenddev/pool/devices/"):
            self.devicePuts += 1
        return super().put(key, value, lease)


class DevicePublisherTests(SynchronousTestCase):
    """The publisher of host h1 on a live session (TTL 10 s, fence at 4 s)."""

    def setUp(self) -> None:
        """A session, a device list the test changes, a started publisher."""
        self.clock = Clock()
        self.etcd = _CountingEtcd()
        self.session = HostSession(self.etcd, self.clock, "h1", ttl=10, fenceAfter=4.0)
        self.successResultOf(self.session.start())
        self.addCleanup(self.session.stop, False)
        self.devices: list[dict[str, Any]] = [{"domain": 5, "class": "vif", "devid": "0"}]
        self.listed = 0
        self.publisher = DevicePublisher(
            self.clock, self.etcd, self.session, self.list, interval=0.5, resync=30
        )
        self.successResultOf(self.publisher.start())
        self.addCleanup(self.publisher.stop)

    def list(self) -> Deferred[list[dict[str, Any]]]:
        """The host's devices now (counted)."""
        self.listed += 1
        return succeed(list(self.devices))

    def published(self) -> dict[str, list[dict[str, Any]]]:
        """What the pool reads."""
        return self.successResultOf(readPoolDevices(self.etcd))

    def test_publishedUnderLease(self) -> None:
        """At start the list is written under the session's lease; any host reads it."""
        kv = self.etcd.kvs[devicesKey("h1")]
        self.assertEqual(kv.lease, self.session.lease)
        self.assertEqual(self.published(), {"h1": self.devices})
        self.assertEqual(self.etcd.devicePuts, 1)

    def test_coalesced(self) -> None:
        """Many changes within the interval make one listing and one write; no change, none."""
        self.devices.append({"domain": 5, "class": "vbd", "devid": "51712", "target": "file:/a"})
        for _ in range(10):
            self.publisher.changed()
        self.assertEqual(self.etcd.devicePuts, 1)
        self.clock.advance(0.5)
        self.assertEqual((self.listed, self.etcd.devicePuts), (2, 2))
        self.assertEqual(self.published()["h1"][1]["target"], "file:/a")
        self.publisher.changed()
        self.clock.advance(0.5)
        self.assertEqual((self.listed, self.etcd.devicePuts), (3, 2))

    def test_retriedWhileDown(self) -> None:
        """A write etcd refuses is tried again each interval until it is taken."""
        self.devices.append({"domain": 6, "class": "vif", "devid": "0"})
        self.etcd.down = True
        self.publisher.changed()
        self.clock.advance(0.5)
        self.clock.advance(0.5)
        self.clock.advance(0.5)
        # One attempt per interval (the count includes refused ones); the old list stays.
        self.assertEqual(self.etcd.devicePuts, 4)
        stale = json.loads(self.etcd.kvs[devicesKey("h1")].value)["devices"]
        self.assertEqual(len(stale), 1)
        self.etcd.down = False
        self.clock.advance(0.5)
        self.assertEqual(self.published()["h1"], self.devices)

    def test_rejoin(self) -> None:
        """The lease lost, the key went with it; after the rejoin it is written again."""
        old = self.session.lease
        self.etcd.keepAliveMode = "down"
        self.clock.advance(4)
        self.etcd.expire(old)
        self.assertEqual(self.published(), {})
        self.etcd.keepAliveMode = "ok"
        self.clock.advance(1)
        self.clock.advance(0.5)
        kv = self.etcd.kvs[devicesKey("h1")]
        self.assertEqual(kv.lease, self.session.lease)
        self.assertNotEqual(kv.lease, old)

    def test_resync(self) -> None:
        """A change nobody announced (a guest destroyed) is found by the periodic listing."""
        self.devices.clear()
        self.clock.advance(30)
        self.clock.advance(0.5)
        self.assertEqual(self.published(), {"h1": []})

    def test_stopped(self) -> None:
        """A stopped publisher lists and writes nothing more."""
        self.publisher.stop()
        self.devices.clear()
        self.publisher.changed()
        self.clock.advance(60)
        self.assertEqual((self.listed, self.etcd.devicePuts), (1, 1))

    def test_unreadableSkipped(self) -> None:
        """A value that is not a device list reads as not published."""
        self.etcd.put(devicesKey("h2"), b"not json")
        self.etcd.put(devicesKey("h3"), json.dumps({"devices": [1, {"domain": 1}]}).encode())
        self.assertEqual(self.published(), {"h1": self.devices, "h3": [{"domain": 1}]})
