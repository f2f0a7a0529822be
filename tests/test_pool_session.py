"""
A host's pool session (xenddev.pool.session): the timing check, renewals,
the self-fence before the lease can expire, recovery on the same lease,
the report of keys lost with an expired lease, and membership — on
task.Clock with an in-memory etcd, then on a real etcd cluster.
"""

from __future__ import annotations

import time
from typing import Any

from twisted.internet import reactor
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from tests.support.etcdcluster import SHARED, report, sleep
from tests.support.fakeetcd import FakeEtcd
from xenddev.pool.errors import HostNameInUse, PoolConfigError, SessionNotLive
from xenddev.pool.etcd import EtcdClient
from xenddev.pool.interfaces import IHostSession
from xenddev.pool.keys import hostKey
from xenddev.pool.session import (
    FENCED,
    LIVE,
    REJOINING,
    STOPPED,
    HostSession,
    checkTiming,
)


class TimingTests(SynchronousTestCase):
    """The self-fence must be able to work with the timings given."""

    def test_ttlAboveDeadline(self) -> None:
        """A TTL not above the self-fence deadline is refused, naming both."""
        with self.assertRaises(PoolConfigError) as caught:
            checkTiming(3, 3.0)
        self.assertIn("TTL (3 s)", str(caught.exception))
        self.assertIn("self-fence deadline (3 s)", str(caught.exception))
        with self.assertRaises(PoolConfigError):
            HostSession(FakeEtcd(), Clock(), "h1", ttl=2, fenceAfter=2.5)

    def test_renewalInterval(self) -> None:
        """Renewals default to a quarter of the deadline; over half of it is refused."""
        self.assertEqual(checkTiming(10, 4.0), 1.0)
        self.assertEqual(checkTiming(10, 4.0, 2.0), 2.0)
        with self.assertRaises(PoolConfigError) as caught:
            checkTiming(10, 4.0, 2.5)
        self.assertIn("renewal interval (2.5 s)", str(caught.exception))

    def test_badValues(self) -> None:
        """A TTL that is not a whole positive number of seconds, or a deadline <= 0, is refused."""
        for ttl, fence in ((0, 0.5), (2.5, 1.0), (True, 0.5), (5, 0), (5, -1)):
            with self.assertRaises(PoolConfigError, msg=(ttl, fence)):
                checkTiming(ttl, fence)  # type: ignore[arg-type]

    def test_badHostName(self) -> None:
        """A host name that cannot be a key segment is refused."""
        for name in ("", "a/b", "-x", "x" * 65, "é"):
            with self.assertRaises(PoolConfigError, msg=name):
                HostSession(FakeEtcd(), Clock(), name, ttl=5, fenceAfter=2)


class SessionLogicTests(TestCase):
    """The session on task.Clock: TTL 10 s, self-fence at 4 s, renewals every 1 s."""

    def setUp(self) -> None:
        """A started session of host C{h1} with recording callbacks."""
        self.clock = Clock()
        self.etcd = FakeEtcd()
        self.session = HostSession(self.etcd, self.clock, "h1", ttl=10, fenceAfter=4.0)
        self.events: list[tuple[float, str, Any]] = []
        self.session.onFence(lambda: self.events.append((self.clock.seconds(), "fence", None)))
        self.session.onRecover(lambda: self.events.append((self.clock.seconds(), "recover", None)))
        self.session.onLost(lambda keys: self.events.append((self.clock.seconds(), "lost", keys)))
        self.session.onRejoin(lambda: self.events.append((self.clock.seconds(), "rejoin", None)))
        self.successResultOf(self.session.start())
        self.addCleanup(self.session.stop, False)

    def test_interface(self) -> None:
        """The session provides IHostSession."""
        self.assertTrue(verifyObject(IHostSession, self.session))

    def test_joins(self) -> None:
        """Starting grants the lease and writes the host's key under it."""
        self.assertEqual(self.session.state, LIVE)
        kv = self.etcd.kvs[hostKey("h1")]
        self.assertEqual(kv.lease, self.session.lease)
        self.assertEqual(self.session.token, kv.createRevision)
        self.assertEqual(self.session.ttl, 10)

    def test_renews(self) -> None:
        """A keepalive every second, and no fence while they succeed."""
        for _ in range(30):
            self.clock.advance(1)
        self.assertEqual(len(self.etcd.keepAlives), 30)
        self.assertEqual(self.events, [])
        self.assertEqual(self.session.state, LIVE)

    def test_fencesAtDeadline(self) -> None:
        """
        When renewals stop answering, the fence callbacks run at the last
        successful renewal plus 4 s — not a tick earlier — well before the
        lease's 10 s, and activations are refused from then on.
        """
        self.clock.advance(1)  # renewal sent at t=1 succeeds
        self.etcd.keepAliveMode = "hang"
        self.clock.advance(3.9)
        self.assertEqual(self.events, [])
        self.session.checkLive()
        self.clock.advance(0.1)
        self.assertEqual(self.events, [(5.0, "fence", None)])
        self.assertEqual(self.session.state, FENCED)
        self.assertRaises(SessionNotLive, self.session.checkLive)

    def test_recoversOnSameLease(self) -> None:
        """
        Renewals that work again before the lease expired lift the fence
        (the recover callbacks run); the deadline moves on.
        """
        self.etcd.keepAliveMode = "hang"
        self.clock.advance(4)
        self.assertEqual(self.session.state, FENCED)
        self.etcd.keepAliveMode = "ok"
        self.clock.advance(1)
        self.assertEqual([e[1] for e in self.events], ["fence", "recover"])
        self.assertEqual(self.session.state, LIVE)
        self.assertEqual(self.session.safeUntil, 9.0)

    def test_lateAnswerTooLate(self) -> None:
        """
        A renewal answered after its own send time plus the deadline does
        not lift the fence: the margin is counted from when it was sent.
        """
        self.etcd.keepAliveMode = "hang"
        self.clock.advance(1)  # keepalive sent at t=1, hangs
        self.clock.advance(3)  # t=4: fence (last renewal at t=0)
        self.assertEqual(self.session.state, FENCED)
        self.clock.advance(1.5)  # t=5.5 > 1 + 4
        self.etcd.hanging[:1], first = [], self.etcd.hanging[:1]
        for d, _lease in first:
            d.callback(10)
        self.assertEqual(self.session.state, FENCED)

    def test_lostKeysReported(self) -> None:
        """
        When etcd answers that the lease expired, the keys held under it
        are reported lost (after the fence, never resumed) and the host
        joins again under a new lease with nothing held, and says so to
        its rejoin callbacks (not at the first join).
        """
        self.session.hold(b"/xenddev/pool/active/file:%2Fa")
        self.session.hold(b"/xenddev/pool/active/file:%2Fb")
        self.session.release(b"/xenddev/pool/active/file:%2Fb")
        old = self.session.lease
        self.etcd.keepAliveMode = "down"
        self.clock.advance(4)
        self.etcd.expire(old)
        self.etcd.keepAliveMode = "ok"
        self.clock.advance(1)
        self.assertEqual(
            [(e[1], e[2]) for e in self.events],
            [
                ("fence", None),
                ("lost", frozenset({b"/xenddev/pool/active/file:%2Fa"})),
                ("rejoin", None),
            ],
        )
        self.assertEqual(self.session.state, LIVE)
        self.assertNotEqual(self.session.lease, old)
        self.assertEqual(self.session.held, frozenset())
        self.assertEqual(self.etcd.kvs[hostKey("h1")].lease, self.session.lease)

    def test_stalledReactor(self) -> None:
        """
        A reactor that stalls past the whole TTL runs the overdue deadline
        first: the fence comes before the late renewal finds the lease gone.
        """
        self.etcd.expire(self.session.lease)
        self.clock.advance(12)
        self.assertEqual([e[1] for e in self.events][:2], ["fence", "lost"])

    def test_rejoinRetried(self) -> None:
        """
        A lost lease while etcd cannot grant a new one: rejoining is
        retried each tick until it works.
        """
        self.etcd.expire(self.session.lease)
        self.etcd.failGrants = True
        self.clock.advance(1)
        self.assertEqual(self.session.state, REJOINING)
        self.assertRaises(SessionNotLive, self.session.checkLive)
        self.clock.advance(3)
        self.assertEqual(self.session.state, REJOINING)
        self.etcd.failGrants = False
        self.clock.advance(1)
        self.assertEqual(self.session.state, LIVE)
        self.assertIn(hostKey("h1"), self.etcd.kvs)

    def test_stopRevokes(self) -> None:
        """A clean stop revokes the lease (the host's keys go) and renews no more."""
        lease = self.session.lease
        self.successResultOf(self.session.stop())
        self.assertEqual(self.session.state, STOPPED)
        self.assertEqual(self.etcd.revoked, [lease])
        self.assertNotIn(hostKey("h1"), self.etcd.kvs)
        count = len(self.etcd.keepAlives)
        self.clock.advance(10)
        self.assertEqual(len(self.etcd.keepAlives), count)
        self.assertEqual(self.events, [])

    def test_nameInUse(self) -> None:
        """A second live session with the same host name is refused, its lease revoked."""
        other = HostSession(self.etcd, self.clock, "h1", ttl=10, fenceAfter=4.0)
        failure = self.failureResultOf(other.start(), HostNameInUse)
        self.assertEqual(failure.value.lease, self.session.lease)
        self.assertEqual(len(self.etcd.revoked), 1)
        self.assertEqual(other.state, STOPPED)

    def test_hosts(self) -> None:
        """hosts() lists each member with its lease's remaining TTL."""
        other = HostSession(self.etcd, self.clock, "h0", ttl=10, fenceAfter=4.0, info={"x": 1})
        self.successResultOf(other.start())
        self.addCleanup(other.stop, False)
        hosts = self.successResultOf(self.session.hosts())
        self.assertEqual([h.name for h in hosts], ["h0", "h1"])
        self.assertEqual(hosts[0].info, {"x": 1})
        self.assertEqual(hosts[0].ttl, 10)
        self.assertEqual(hosts[1].toJSON()["lease"], f"{self.session.lease:x}")


class BlockableEtcd:
    """
    A real client whose keepalives can be held back: the host is cut off
    from etcd (or stalled) while everyone else still reaches it.
    """

    def __init__(self, etcd: EtcdClient) -> None:
        self._etcd = etcd
        self.blocked = False

    def __getattr__(self, name: str) -> Any:
        """Everything else goes to the real client."""
        return getattr(self._etcd, name)

    def keepAlive(self, lease: int) -> Any:
        """A keepalive that times out like an unreachable cluster when blocked."""
        if self.blocked:
            from twisted.internet.defer import Deferred

            d: Deferred[int] = Deferred()
            reactor.callLater(0.2, d.errback, TimeoutError("blocked by the test"))
            return d
        return self._etcd.keepAlive(lease)


class RealSessionTests(TestCase):
    """Sessions on a real etcd cluster: TTL 2 s, self-fence at 1 s."""

    async def setUp(self) -> None:
        """Two clients of the shared cluster: the host's (blockable) and an observer's."""
        self.cluster = await SHARED.get(self)
        self.real = EtcdClient(reactor, self.cluster.endpoints, timeout=2)
        self.addCleanup(self.real.close)
        self.etcd = BlockableEtcd(self.real)
        self.observer = EtcdClient(reactor, self.cluster.endpoints, timeout=2)
        self.addCleanup(self.observer.close)

    def session(self, name: str) -> HostSession:
        """A session of host C{name} (TTL 2 s, fence at 1 s), stopped at the end."""
        session = HostSession(self.etcd, reactor, name, ttl=2, fenceAfter=1.0)  # type: ignore[arg-type]
        self.addCleanup(session.stop)
        return session

    async def test_membership(self) -> None:
        """A started host is listed with a live lease; a stopped one is gone at once."""
        a, b = self.session("real-a"), self.session("real-b")
        await a.start()
        await b.start()
        names = [h.name for h in await a.hosts()]
        self.assertIn("real-a", names)
        self.assertIn("real-b", names)
        self.assertTrue(all(h.ttl > 0 for h in await a.hosts() if h.name.startswith("real-")))
        await b.stop()
        self.assertNotIn("real-b", [h.name for h in await a.hosts()])
        with self.assertRaises(HostNameInUse):
            await self.session("real-a").start()

    async def test_selfFenceBeforeExpiry(self) -> None:
        """
        A host cut off from etcd fences itself 1 s after its last renewal,
        before its lease expires (seen by an observer watching its key);
        when it reaches etcd again it learns the lease is gone, reports
        the key it held as lost and joins again.
        """
        session = self.session("fence-a")
        fenced: list[float] = []
        lost: list[frozenset[bytes]] = []
        session.onFence(lambda: fenced.append(time.monotonic()))
        session.onLost(lost.append)
        await session.start()
        held = b"/xenddev/pool/active/file:%2Ffence"
        await self.real.put(held, b"{}", lease=session.lease)
        session.hold(held)
        gone: list[float] = []
        watch = self.observer.watch(
            hostKey("fence-a"),
            lambda e: gone.append(time.monotonic()) if e.type == "DELETE" else None,
        )
        await watch.whenCreated()
        await sleep(reactor, 0.3)
        self.etcd.blocked = True
        blockedAt = time.monotonic()
        while not gone:
            await sleep(reactor, 0.05)
            self.assertLess(time.monotonic() - blockedAt, 6)
        self.assertEqual(len(fenced), 1)
        self.assertLess(fenced[0], gone[0])
        # The margin is the TTL less the deadline (1 s), less the renewal
        # interval the last renewal may have been sent before the block.
        self.assertGreater(gone[0] - fenced[0], 0.5)
        report("self-fence ahead of the lease's expiry", gone[0] - fenced[0])
        self.assertIsNone(await self.observer.get(held))
        self.etcd.blocked = False
        while session.state != LIVE or not lost:
            await sleep(reactor, 0.05)
            self.assertLess(time.monotonic() - blockedAt, 10)
        self.assertEqual(lost, [frozenset({held})])
        kv = await self.observer.get(hostKey("fence-a"))
        self.assertEqual(kv.lease if kv else None, session.lease)
        watch.cancel()

    async def test_leaseKeptThroughMemberKill(self) -> None:
        """
        Killing the member the host renews through (a follower: the
        leader's death is an election, which the deadline must also cover)
        does not fence the host: renewals move to another member in time.
        """
        leader = await self.cluster.leader()
        follower = next(m for m in self.cluster.members if m is not leader)
        others = [m.clientURL for m in self.cluster.members if m is not follower]
        client = EtcdClient(reactor, [follower.clientURL, *others], timeout=2)
        self.addCleanup(client.close)
        session = HostSession(client, reactor, "kill-a", ttl=2, fenceAfter=1.0)
        self.addCleanup(session.stop)
        fenced: list[float] = []
        session.onFence(lambda: fenced.append(time.monotonic()))
        await session.start()
        self.cluster.kill(follower)
        try:
            await sleep(reactor, 2.5)
            self.assertEqual(fenced, [])
            self.assertEqual(session.state, LIVE)
            self.assertNotEqual(client.current, follower.clientURL)
            info = await self.observer.leaseTimeToLive(session.lease)
            self.assertGreater(info.ttl, 0)
        finally:
            await self.cluster.restart(follower)
