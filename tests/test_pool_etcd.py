"""
The etcd client (xenddev.pool.etcd) against a real 3-member etcd cluster
on loopback (Debian's etcd-server 3.4, started by the tests): keys,
transactions, leases and watches through the JSON gateway; failover when a
member or the leader is killed; a prompt EtcdUnavailable when all of etcd
is down.
"""

from __future__ import annotations

import time
from typing import Any

from twisted.internet import reactor
from twisted.trial.unittest import TestCase
from zope.interface.verify import verifyObject

from tests.support.etcdcluster import SHARED, EtcdCluster, report, sleep, startCluster
from xenddev.pool import etcdwire as wire
from xenddev.pool.errors import (
    EtcdError,
    EtcdTimeout,
    EtcdUnavailable,
    LeaseNotFound,
    WatchCompacted,
)
from xenddev.pool.etcd import EtcdClient
from xenddev.pool.interfaces import IEtcd, IWatch


def client(test: TestCase, cluster: EtcdCluster, **kwargs: Any) -> EtcdClient:
    """A client of every member of C{cluster}, closed when C{test} ends."""
    etcd = EtcdClient(reactor, cluster.endpoints, **kwargs)
    test.addCleanup(etcd.close)
    return etcd


async def waitFor(predicate: Any, timeout: float = 5.0) -> None:
    """Poll C{predicate} every 10 ms until it holds (fail after C{timeout})."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await sleep(reactor, 0.01)


class KeyValueTests(TestCase):
    """Keys, transactions and leases on a shared healthy cluster."""

    async def setUp(self) -> None:
        """A client of the shared cluster; keys under a prefix of the test's own."""
        self.cluster = await SHARED.get(self)
        self.etcd = client(self, self.cluster)
        self.prefix = f"/t/{self.id()}/".encode()

    def test_interface(self) -> None:
        """The client provides IEtcd."""
        self.assertTrue(verifyObject(IEtcd, self.etcd))

    async def test_putGetDelete(self) -> None:
        """A put is read back with its revisions; arbitrary bytes survive base64."""
        key, value = self.prefix + b"\xff\x00k", b"\x00\x01\xfe value"
        put = await self.etcd.put(key, value)
        kv = await self.etcd.get(key)
        assert kv is not None
        self.assertEqual((kv.key, kv.value), (key, value))
        self.assertEqual(kv.createRevision, put.revision)
        self.assertEqual(kv.version, 1)
        deleted = await self.etcd.delete(key)
        self.assertEqual(deleted.deleted, 1)
        self.assertIsNone(await self.etcd.get(key))

    async def test_rangeByPrefix(self) -> None:
        """A prefix range finds exactly the keys under it, in key order."""
        for name in (b"a", b"b", b"c"):
            await self.etcd.put(self.prefix + b"r/" + name, name)
        await self.etcd.put(self.prefix + b"r0", b"outside")
        prefix = self.prefix + b"r/"
        found = await self.etcd.range(wire.Range(prefix, wire.prefixEnd(prefix)))
        self.assertEqual([kv.value for kv in found.kvs], [b"a", b"b", b"c"])
        self.assertEqual(found.count, 3)
        counted = await self.etcd.range(wire.Range(prefix, wire.prefixEnd(prefix), countOnly=True))
        self.assertEqual((counted.count, counted.kvs), (3, ()))

    async def test_txnCreateIfAbsent(self) -> None:
        """A create-if-absent transaction succeeds once; the second reads the winner."""
        key = self.prefix + b"x"
        txn = wire.Txn([wire.Compare.absent(key)], [wire.Put(key, b"first")], [wire.Range(key)])
        first = await self.etcd.txn(txn)
        self.assertTrue(first.succeeded)
        again = await self.etcd.txn(
            wire.Txn([wire.Compare.absent(key)], [wire.Put(key, b"second")], [wire.Range(key)])
        )
        self.assertFalse(again.succeeded)
        read = again.responses[0]
        assert isinstance(read, wire.RangeResult)
        self.assertEqual(read.kvs[0].value, b"first")
        self.assertEqual(read.kvs[0].createRevision, first.revision)

    async def test_txnRangeCompareAndNested(self) -> None:
        """
        A comparison over a range holds only when no key of it exists
        (etcd 3.3+), and nested transactions run their own comparisons.
        """
        prefix = self.prefix + b"n/"
        empty = wire.Txn([wire.Compare.absent(prefix, wire.prefixEnd(prefix))])
        self.assertTrue((await self.etcd.txn(empty)).succeeded)
        await self.etcd.put(prefix + b"one", b"1")
        self.assertFalse((await self.etcd.txn(empty)).succeeded)
        nested = await self.etcd.txn(
            wire.Txn(
                success=[
                    wire.Txn(
                        [wire.Compare.valueIs(prefix + b"one", b"1")],
                        [wire.Delete(prefix + b"one")],
                    ),
                    wire.Txn(
                        [wire.Compare.valueIs(prefix + b"two", b"2")],
                        [wire.Delete(prefix + b"two")],
                    ),
                ]
            )
        )
        inner = [r.succeeded for r in nested.responses if isinstance(r, wire.TxnResult)]
        self.assertEqual(inner, [True, False])
        self.assertIsNone(await self.etcd.get(prefix + b"one"))

    async def test_lease(self) -> None:
        """
        A key under a lease goes when the lease is revoked; a keepalive of
        a revoked lease is LeaseNotFound, as is a put under it.
        """
        lease = await self.etcd.grantLease(5)
        self.assertGreaterEqual(lease.ttl, 5)
        key = self.prefix + b"leased"
        await self.etcd.put(key, b"v", lease=lease.id)
        self.assertEqual(await self.etcd.keepAlive(lease.id), lease.ttl)
        info = await self.etcd.leaseTimeToLive(lease.id, keys=True)
        self.assertEqual(info.keys, (key,))
        self.assertGreater(info.ttl, 0)
        await self.etcd.revokeLease(lease.id)
        self.assertIsNone(await self.etcd.get(key))
        with self.assertRaises(LeaseNotFound):
            await self.etcd.keepAlive(lease.id)
        with self.assertRaises(LeaseNotFound):
            await self.etcd.put(key, b"v", lease=lease.id)
        self.assertEqual((await self.etcd.leaseTimeToLive(lease.id)).ttl, -1)

    async def test_leaseExpires(self) -> None:
        """A lease nobody renews expires with its keys after its TTL (here 1 s)."""
        lease = await self.etcd.grantLease(1)
        key = self.prefix + b"short"
        await self.etcd.put(key, b"v", lease=lease.id)
        started = time.monotonic()

        async def gone() -> None:
            while await self.etcd.get(key) is not None:
                await sleep(reactor, 0.05)

        await gone()
        # etcd may grant more than asked (its minimum TTL) and checks
        # expiry every 500 ms: the key goes no sooner than the TTL.
        self.assertGreaterEqual(time.monotonic() - started, lease.ttl - 0.1)

    async def test_etcdRefusal(self) -> None:
        """A request etcd refuses is an EtcdError with the gateway's code and message."""
        with self.assertRaises(EtcdError) as caught:
            await self.etcd.txn(
                wire.Txn(
                    success=[wire.Put(self.prefix + b"d", b"1"), wire.Put(self.prefix + b"d", b"2")]
                )
            )
        self.assertEqual(caught.exception.code, 3)
        self.assertIn("duplicate key", caught.exception.message)

    async def test_apiPrefixDetected(self) -> None:
        """The client reads the cluster's version and uses /v3 on etcd 3.4."""
        await self.etcd.status()
        self.assertEqual(self.etcd._apiPrefix, "/v3")
        status = await self.etcd.status()
        self.assertTrue(status.version.startswith("3."))
        self.assertNotEqual(status.leader, 0)

    async def test_watch(self) -> None:
        """
        A prefix watch sees puts and deletes in order, from its creation
        on; one started at a past revision replays history first.
        """
        prefix = self.prefix + b"w/"
        before = await self.etcd.put(prefix + b"old", b"0")
        seen: list[wire.WatchEvent] = []
        watch = self.etcd.watch(prefix, seen.append, wire.prefixEnd(prefix))
        self.assertTrue(verifyObject(IWatch, watch))
        created = await watch.whenCreated()
        self.assertGreaterEqual(created, before.revision)
        await self.etcd.put(prefix + b"a", b"1")
        await self.etcd.delete(prefix + b"a")
        await waitFor(lambda: len(seen) == 2)
        self.assertEqual(
            [(e.type, e.kv.key) for e in seen], [("PUT", prefix + b"a"), ("DELETE", prefix + b"a")]
        )
        history: list[wire.WatchEvent] = []
        past = self.etcd.watch(prefix, history.append, wire.prefixEnd(prefix), before.revision)
        await waitFor(lambda: len(history) == 3)
        self.assertEqual(history[0].kv.value, b"0")
        watch.cancel()
        past.cancel()
        await watch.whenDone()
        await past.whenDone()

    async def test_watchCompacted(self) -> None:
        """A watch from a compacted revision ends with WatchCompacted."""
        key = self.prefix + b"c"
        first = await self.etcd.put(key, b"1")
        last = await self.etcd.put(key, b"2")
        await self.etcd._call("/kv/compaction", {"revision": str(last.revision)})
        watch = self.etcd.watch(key, lambda e: None, startRevision=first.revision)
        with self.assertRaises(WatchCompacted) as caught:
            await watch.whenDone()
        self.assertEqual(caught.exception.compactRevision, last.revision)


class FailoverTests(TestCase):
    """Members die under the client: each test on a cluster of its own."""

    async def setUp(self) -> None:
        """A fresh cluster (these tests kill its members)."""
        self.cluster = await startCluster(self)

    async def test_memberKilled(self) -> None:
        """
        With the member the client uses (a follower) SIGKILLed, quorum
        holds and every call succeeds on another member at once, none
        failing. (The leader's death is an election: test_leaderKilled.)
        """
        leader = await self.cluster.leader()
        used = next(m for m in self.cluster.members if m is not leader)
        others = [m.clientURL for m in self.cluster.members if m is not used]
        etcd = EtcdClient(reactor, [used.clientURL, *others], timeout=5)
        self.addCleanup(etcd.close)
        await etcd.put(b"/f/k", b"0")
        self.assertEqual(etcd.current, used.clientURL)
        self.cluster.kill(used)
        started = time.monotonic()
        for i in range(20):
            await etcd.put(b"/f/k", b"%d" % i)
        elapsed = time.monotonic() - started
        self.assertEqual((await etcd.get(b"/f/k")).value, b"19")  # type: ignore[union-attr]
        self.assertNotEqual(etcd.current, used.clientURL)
        self.assertLess(elapsed, 1.0)
        report("20 puts across a follower's death", elapsed)

    async def test_leaderKilled(self) -> None:
        """
        With the raft leader SIGKILLed, calls go on through the election
        (a held request moves to another member after the attempt timeout)
        and a watch resumes without losing or repeating an event.
        """
        etcd = client(self, self.cluster, timeout=6, attemptTimeout=1.5)
        seen: list[bytes] = []
        watch = etcd.watch(b"/l/", lambda e: seen.append(e.kv.value), wire.prefixEnd(b"/l/"))
        await watch.whenCreated()
        leader = await self.cluster.leader()
        written = []
        for i in range(5):
            await etcd.put(b"/l/k", b"%d" % i)
            written.append(b"%d" % i)
        self.cluster.kill(leader)
        started = time.monotonic()
        slowest = 0.0
        for i in range(5, 30):
            before = time.monotonic()
            await etcd.put(b"/l/k", b"%d" % i)
            slowest = max(slowest, time.monotonic() - before)
            written.append(b"%d" % i)
        elapsed = time.monotonic() - started
        report("slowest put across the leader's death", slowest)
        self.assertLess(elapsed, 6.0)
        await waitFor(lambda: len(seen) >= len(written), 10)
        self.assertEqual(seen, written)
        newLeader = await self.cluster.leader()
        self.assertIsNot(newLeader, leader)
        watch.cancel()

    async def test_allDown(self) -> None:
        """
        With every member down a call fails with EtcdUnavailable at once
        (well inside the timeout); with members that accept but never
        answer (SIGSTOP) it fails with EtcdTimeout at the timeout.
        """
        etcd = client(self, self.cluster, timeout=3)
        await etcd.put(b"/d/k", b"v")
        for member in self.cluster.members:
            self.cluster.pause(member)
        started = time.monotonic()
        with self.assertRaises(EtcdTimeout):
            await etcd.get(b"/d/k")
        hung = time.monotonic() - started
        self.assertGreaterEqual(hung, 2.9)
        self.assertLess(hung, 4.0)
        self.cluster.stopAll()
        started = time.monotonic()
        with self.assertRaises(EtcdUnavailable) as caught:
            await etcd.get(b"/d/k")
        self.assertLess(time.monotonic() - started, 1.0)
        report("EtcdUnavailable with every member down", time.monotonic() - started)
        self.assertIn("connection refused", str(caught.exception))
        self.assertEqual(len(caught.exception.reasons), 3)

    async def test_recovery(self) -> None:
        """After the whole cluster restarts on its data, the same client works again."""
        etcd = client(self, self.cluster, timeout=3)
        await etcd.put(b"/r/k", b"kept")
        self.cluster.stopAll()
        with self.assertRaises(EtcdUnavailable):
            await etcd.get(b"/r/k")
        await self.cluster.restartAll()
        kv = await etcd.get(b"/r/k")
        self.assertEqual(kv.value if kv else None, b"kept")
