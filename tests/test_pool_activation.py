"""
Exclusive activation across the pool (xenddev.pool.activation) and target
identities (xenddev.pool.keys): on a real etcd cluster, hosts racing for
one target (exactly one wins, every time), a dead holder's target taken
only after its lease's TTL, read-only sharing, deactivation of our own
keys only, and the fencing token.
"""

from __future__ import annotations

import os
import time

from twisted.internet import reactor
from twisted.internet.defer import DeferredList
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from tests.support.etcdcluster import SHARED, report, sleep
from tests.support.fakeetcd import FakeEtcd
from xenddev.pool import etcdwire as wire
from xenddev.pool.activation import Activation, Activations
from xenddev.pool.errors import ActivationConflict, InvalidTarget, SessionNotLive
from xenddev.pool.etcd import EtcdClient
from xenddev.pool.interfaces import IActivations
from xenddev.pool.keys import (
    READERS,
    ROOT,
    activeKey,
    checkTarget,
    hostKey,
    hostOf,
    normaliseTarget,
    readerKey,
    readersPrefix,
)
from xenddev.pool.session import HostSession


class TargetTests(SynchronousTestCase):
    """Target identities and their keys."""

    def test_fileIdentity(self) -> None:
        """A file is named by its real path, whatever link or spelling reaches it."""
        base = os.path.realpath(self.mktemp())
        os.makedirs(base)
        image = os.path.join(base, "disk.img")
        with open(image, "wb"):
            pass
        link = os.path.join(base, "link.img")
        os.symlink(image, link)
        self.assertEqual(normaliseTarget(image), "file:" + image)
        self.assertEqual(normaliseTarget("file:" + link), "file:" + image)
        self.assertEqual(normaliseTarget(base + "/./disk.img"), "file:" + image)

    def test_deviceIdentity(self) -> None:
        """A block device is named by its numbers, not its path."""

        class Stat:
            st_mode = 0o060660
            st_rdev = os.makedev(7, 3)

        self.assertEqual(normaliseTarget("/dev/loop3", statPath=lambda p: Stat()), "dev:7:3")
        self.assertEqual(normaliseTarget("dev:253:0"), "dev:253:0")

    def test_refused(self) -> None:
        """Relative, missing, odd-typed or unnormalised targets are refused."""
        for spec in ("", "disk.img", "/nonexistent/xenddev-test", "/dev/null", "dev:a:b"):
            with self.assertRaises(InvalidTarget, msg=spec):
                normaliseTarget(spec)
        for target in ("file:/a/../b", "file:relative", "dev:1", "/a"):
            with self.assertRaises(InvalidTarget, msg=target):
                checkTarget(target)

    def test_keys(self) -> None:
        """
        A target's keys escape '/' so one target's readers prefix never
        covers another's; host keys round-trip.
        """
        self.assertEqual(activeKey("file:/srv/a"), ROOT + b"active/file%3A%2Fsrv%2Fa")
        self.assertFalse(readerKey("file:/srv/a/b", "h").startswith(readersPrefix("file:/srv/a")))
        self.assertTrue(readerKey("file:/srv/a", "h").startswith(READERS))
        self.assertEqual(hostOf(hostKey("host-1.pool")), "host-1.pool")


class ActivationLogicTests(SynchronousTestCase):
    """The activation rules on the in-memory etcd (one step per transaction)."""

    def setUp(self) -> None:
        """Hosts a and b on one fake etcd."""
        self.clock = Clock()
        self.etcd = FakeEtcd()
        self.hosts = {}
        for name in ("a", "b"):
            session = HostSession(self.etcd, self.clock, name, ttl=10, fenceAfter=4)
            self.successResultOf(session.start())
            self.addCleanup(session.stop, False)
            self.hosts[name] = Activations(self.etcd, session, self.clock)
        self.sessions = {name: a._session for name, a in self.hosts.items()}

    def test_interface(self) -> None:
        """Activations provides IActivations."""
        self.assertTrue(verifyObject(IActivations, self.hosts["a"]))

    def test_exclusive(self) -> None:
        """The second host is refused, naming the holder; nothing of its is written."""
        got = self.successResultOf(self.hosts["a"].activate("file:/t"))
        self.assertEqual((got.host, got.mode, got.token), ("a", "rw", self.etcd.revision))
        before = dict(self.etcd.kvs)
        failure = self.failureResultOf(self.hosts["b"].activate("file:/t"), ActivationConflict)
        self.assertEqual(failure.value.holder, "a")
        self.assertEqual(failure.value.token, got.token)
        self.assertEqual(self.etcd.kvs, before)
        self.assertIn(got.key, self.sessions["a"].held)

    def test_againIsSame(self) -> None:
        """Activating a target we hold again answers the same activation."""
        first = self.successResultOf(self.hosts["a"].activate("file:/t"))
        again = self.successResultOf(self.hosts["a"].activate("file:/t"))
        self.assertEqual(first, again)

    def test_notLive(self) -> None:
        """A fenced host activates nothing."""
        self.etcd.keepAliveMode = "hang"
        self.clock.advance(5)
        self.assertRaises(SessionNotLive, self.hosts["a"].activate, "file:/t")
        self.assertEqual(self.sessions["a"].held, frozenset())


#: Lease TTL and self-fence deadline of the real-etcd tests.
TTL, FENCE = 2, 1.0


class RealActivationTests(TestCase):
    """Activation on a real etcd cluster, hosts with TTL 2 s and a 1 s self-fence."""

    async def setUp(self) -> None:
        """A target of the test's own on the shared cluster."""
        self.cluster = await SHARED.get(self)
        self.target = f"file:/pool/{self.id()}"

    async def host(self, name: str) -> tuple[Activations, HostSession, EtcdClient]:
        """A host: its own client, a started session, its activations."""
        etcd = EtcdClient(reactor, self.cluster.endpoints, timeout=2)
        self.addCleanup(etcd.close)
        session = HostSession(etcd, reactor, f"{name}-{id(self)}", ttl=TTL, fenceAfter=FENCE)
        self.addCleanup(session.stop)
        await session.start()
        return Activations(etcd, session, reactor), session, etcd

    async def keysOf(self, etcd: EtcdClient, target: str) -> list[tuple[bytes, int]]:
        """Every key of C{target} (writer and readers), with its lease."""
        prefix = readersPrefix(target)
        found = await etcd.txn(
            wire.Txn(
                success=[wire.Range(activeKey(target)), wire.Range(prefix, wire.prefixEnd(prefix))]
            )
        )
        return [(kv.key, kv.lease) for r in found.responses for kv in r.kvs]  # type: ignore[union-attr]

    async def test_race(self) -> None:
        """
        Two hosts activate one target at the same moment, 25 times: each
        time exactly one wins, the other is refused naming the winner, and
        only the winner's key exists; the winner then deactivates.
        """
        a, sa, etcd = await self.host("race-a")
        b, sb, _ = await self.host("race-b")
        wins = {sa.host: 0, sb.host: 0}
        for i in range(25):
            target = f"{self.target}/{i}"
            pair = [a.activate(target), b.activate(target)]
            if i % 2:
                pair.reverse()
            results = await DeferredList(pair, consumeErrors=True)
            won = [r for ok, r in results if ok]
            lost = [r.value for ok, r in results if not ok]
            self.assertEqual(len(won), 1, results)
            self.assertEqual(len(lost), 1, results)
            winner: Activation = won[0]
            self.assertIsInstance(lost[0], ActivationConflict)
            self.assertEqual(lost[0].holder, winner.host)
            self.assertEqual(lost[0].token, winner.token)
            self.assertEqual(await self.keysOf(etcd, target), [(activeKey(target), winner.lease)])
            wins[winner.host] += 1
            self.assertTrue(await (a if winner.host == sa.host else b).deactivate(target))
        self.assertEqual(sum(wins.values()), 25)

    async def test_deadHolder(self) -> None:
        """
        The holder stops renewing (killed): the other host is refused
        until the holder's lease expires — not before its TTL — and then
        activates with a larger fencing token.
        """
        a, sa, _ = await self.host("dead-a")
        b, sb, _ = await self.host("dead-b")
        held = await a.activate(self.target)
        await sa.stop(revoke=False)  # a's daemon dies: no keepalive, no revoke
        stoppedAt = time.monotonic()
        # The last renewal was at most one renewal interval before the stop.
        earliest = stoppedAt - sa.renewEvery + TTL
        refusals = 0
        while True:
            try:
                taken = await b.activate(self.target)
                break
            except ActivationConflict as e:
                self.assertEqual(e.holder, sa.host)
                refusals += 1
            await sleep(reactor, 0.05)
            self.assertLess(time.monotonic() - stoppedAt, TTL + 3)
        takenAt = time.monotonic()
        report("takeover after the holder's death", takenAt - stoppedAt)
        self.assertGreater(refusals, 0)
        self.assertGreaterEqual(takenAt, earliest - 0.05)
        self.assertGreater(taken.token, held.token)
        self.assertEqual(taken.host, sb.host)

    async def test_readOnlySharing(self) -> None:
        """
        Readers share a target; a writer is refused while any reader holds
        it (naming them), a reader while a writer does.
        """
        a, sa, _ = await self.host("ro-a")
        b, sb, _ = await self.host("ro-b")
        ra = await a.activate(self.target, "ro")
        rb = await b.activate(self.target, "ro")
        self.assertEqual((ra.mode, rb.mode), ("ro", "ro"))
        with self.assertRaises(ActivationConflict) as caught:
            await a.activate(self.target, "rw")
        self.assertIsNone(caught.exception.holder)
        self.assertEqual(sorted(caught.exception.readers), sorted([sa.host, sb.host]))
        where = await a.where(self.target)
        self.assertIsNone(where.writer)
        self.assertEqual(sorted(r.host for r in where.readers), sorted([sa.host, sb.host]))
        self.assertTrue(await b.deactivate(self.target))
        with self.assertRaises(ActivationConflict):
            await b.activate(self.target, "rw")
        self.assertTrue(await a.deactivate(self.target))
        writer = await b.activate(self.target, "rw")
        with self.assertRaises(ActivationConflict) as caught:
            await a.activate(self.target, "ro")
        self.assertEqual(caught.exception.holder, sb.host)
        where = await a.where(self.target)
        self.assertEqual(where.writer.host if where.writer else None, sb.host)
        self.assertEqual(where.writer.token if where.writer else None, writer.token)
        self.assertEqual(where.toJSON()["writer"]["host"], sb.host)

    async def test_deactivateOnlyOurs(self) -> None:
        """Another host's deactivate deletes nothing; the holder's deletes its key."""
        a, sa, etcd = await self.host("own-a")
        b, _, _ = await self.host("own-b")
        held = await a.activate(self.target)
        self.assertFalse(await b.deactivate(self.target))
        self.assertEqual(await self.keysOf(etcd, self.target), [(held.key, sa.lease)])
        self.assertTrue(await a.deactivate(self.target))
        self.assertEqual(await self.keysOf(etcd, self.target), [])
        self.assertNotIn(held.key, sa.held)
        self.assertFalse((await a.where(self.target)).active)

    async def test_tokensGrow(self) -> None:
        """Each new activation of a target has a larger fencing token."""
        a, _, _ = await self.host("tok-a")
        tokens = []
        for _ in range(3):
            tokens.append((await a.activate(self.target)).token)
            await a.deactivate(self.target)
        self.assertEqual(tokens, sorted(set(tokens)))

    async def test_latency(self) -> None:
        """
        An activation and a deactivation each take one round trip: 50 of
        each take well under a second on loopback (the time is logged).
        """
        a, _, _ = await self.host("lat-a")
        started = time.monotonic()
        for i in range(50):
            await a.activate(f"{self.target}/{i}")
            await a.deactivate(f"{self.target}/{i}")
        elapsed = time.monotonic() - started
        self.assertLess(elapsed, 5.0)
        report("activate+deactivate", elapsed / 50)
