"""
The pool's activation guard (L{xenddev.poolguard}), the self-fence on the
data paths (L{xenddev.poolfence}) and the host's membership
(L{xenddev.poolmember}), on L{task.Clock} with the in-memory etcd
(tests/support/fakeetcd.py) and the embedded xenstored for the records
and the data-path registry. The same with real etcd and daemons as hosts:
tests/test_pool_daemon.py.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase
from zope.interface.verify import verifyObject

from tests.support.fakeetcd import FakeEtcd
from tests.support.fixtures import EmbeddedXenstoredFixture
from tests.test_datapath import tapRecord
from tests.test_storagectl import RecordingPauser
from xenddev.backendctrl.records import DataPath, holdPath, updateRecord
from xenddev.datapath.quiesce import DataPathControl
from xenddev.interfaces import IActivationGuard
from xenddev.localguard import LocalActivationConflict, LocalGuard
from xenddev.pool.activation import Activations
from xenddev.pool.errors import ActivationConflict, EtcdUnavailable, SessionNotLive
from xenddev.pool.keys import activeKey
from xenddev.pool.session import FENCED, LIVE, HostSession
from xenddev.poolfence import FENCE_HOLD, DataPathFence
from xenddev.poolguard import PoolGuard
from xenddev.poolmember import PoolMembership
from xenddev.toolstack.activation import RO, RW, SHARED, Claim, Grant, Mode, writeGrant

IMAGE = "/srv/pool/a.img"
TARGET = f"file:{IMAGE}"


def claim(domid: int, mode: Mode, devid: int = 51728) -> Claim:
    """A disk's claim of L{IMAGE} for guest C{domid}."""
    return Claim(IMAGE, mode, domid, f"/vm/u{domid}/device/vbd/{devid}", f"vbd {devid}")


class PoolGuardTests(EmbeddedXenstoredFixture, TestCase):
    """Two hosts' guards on one (fake) etcd: TTL 10 s, self-fence 4 s."""

    async def setUp(self) -> None:
        """Hosts h1 and h2, joined; guests 5 and 6 exist in the store."""
        self.startServer()
        self.xs = await self.connect()
        for domid in (5, 6):
            await self.xs.write(f"/local/domain/{domid}/vm", f"/vm/u{domid}")
        self.clock = Clock()
        self.etcd = FakeEtcd()
        self.h1 = await self.host("h1")
        self.h2 = await self.host("h2")

    async def host(self, name: str) -> PoolGuard:
        """A host's guard over a live session."""
        session = HostSession(self.etcd, self.clock, name, ttl=10, fenceAfter=4.0)
        await session.start()
        self.addCleanup(session.stop, False)
        guard = PoolGuard(
            LocalGuard(self.xs, name), Activations(self.etcd, session, self.clock), session
        )
        session.onLost(guard.lost)
        return guard

    def test_interface(self) -> None:
        """PoolGuard provides IActivationGuard."""
        self.assertTrue(verifyObject(IActivationGuard, self.h1))

    async def test_otherHostRefused(self) -> None:
        """
        A target one host writes is refused to another, read-write or
        read-only, naming the holder and its fencing token; the refused
        host keeps no grant.
        """
        grant = await self.h1.acquire(claim(5, RW))
        self.assertGreater(grant.token, 0)
        self.assertEqual(self.etcd.kvs[activeKey(TARGET)].modRevision, grant.token)
        for mode in (RW, RO):
            e = await self.assertFailure(self.h2.acquire(claim(6, mode)), ActivationConflict)
            self.assertEqual((e.holder, e.token), ("h1", grant.token))
        self.assertEqual(self.h2.local.grants(), [])
        self.assertEqual(self.h1.local.grants(), [grant])

    async def test_localRuleFirst(self) -> None:
        """Two guests of one host are refused by the host's own rule, before etcd."""
        await self.h1.acquire(claim(5, RW))
        revision = self.etcd.revision
        await self.assertFailure(self.h1.acquire(claim(6, RW)), LocalActivationConflict)
        self.assertEqual(self.etcd.revision, revision)

    async def test_lastUserGivesBack(self) -> None:
        """A host holds a target for all its devices; the last detach gives it back."""
        first = await self.h1.acquire(claim(5, RW))
        second = await self.h1.acquire(claim(5, RW, devid=51744))
        self.assertEqual(second.token, first.token)
        await self.h1.release(first)
        await self.assertFailure(self.h2.acquire(claim(6, RW)), ActivationConflict)
        await self.h1.release(second)
        self.assertNotIn(activeKey(TARGET), self.etcd.kvs)
        await self.h2.acquire(claim(6, RW))

    async def test_readersAcrossHosts(self) -> None:
        """Hosts share a target read-only; a writer elsewhere is refused, naming them."""
        await self.h1.acquire(claim(5, RO))
        await self.h2.acquire(claim(6, RO))
        h3 = await self.host("h3")
        e = await self.assertFailure(h3.acquire(claim(7, RW)), ActivationConflict)
        self.assertEqual(sorted(e.readers), ["h1", "h2"])
        where = await self.h1.where(IMAGE)
        self.assertEqual(where["target"], TARGET)
        self.assertIsNone(where["writer"])
        self.assertEqual([r["host"] for r in where["readers"]], ["h1", "h2"])
        self.assertEqual([d["domain"] for d in where["devices"]], [5])

    async def test_sharedWriteTakesNoKey(self) -> None:
        """C{w!} is the override pool-wide too: no key, nothing refused."""
        grant = await self.h1.acquire(claim(5, SHARED))
        self.assertEqual(grant.token, 0)
        self.assertNotIn(activeKey(TARGET), self.etcd.kvs)
        await self.h2.acquire(claim(6, RW))

    async def test_fencedRefuses(self) -> None:
        """A fenced host is refused every claim (fault 16) before anything is held."""
        self.etcd.keepAliveMode = "hang"
        self.clock.advance(4.5)
        e = await self.assertFailure(self.h1.acquire(claim(5, SHARED)), SessionNotLive)
        self.assertEqual((e.state, int(e.faultCode)), (FENCED, 16))
        self.assertEqual(self.h1.local.grants(), [])

    async def test_lostActivationsForgotten(self) -> None:
        """
        The lease expired: the host's activations are forgotten (another
        host may take the target), its devices' grants stay (they are
        there until detached); a new claim is taken anew.
        """
        grant = await self.h1.acquire(claim(5, RW))
        self.etcd.expire(self.h1._session.lease)
        self.clock.advance(1)  # the next renewal finds the lease gone
        self.assertEqual(self.h1.held, {})
        self.assertEqual(self.h1.local.grants(), [grant])
        taken = await self.h2.acquire(claim(6, RW))
        self.assertGreater(taken.token, grant.token)
        self.clock.advance(1)  # h1 rejoined
        self.assertEqual(self.h1._session.state, LIVE)
        await self.assertFailure(self.h1.acquire(claim(5, RW, devid=51744)), ActivationConflict)

    async def test_startTakesBackRecordedTargets(self) -> None:
        """
        At start the guard reads the records and takes their targets again
        under its session; the new token goes to the records. A target
        held by another host meanwhile is left (logged).
        """
        old = claim(5, RW)
        recorded = Grant(TARGET, RW, 5, old.record, old.device, 3)
        await self.xs.transact(lambda tx: writeGrant(tx, recorded))
        await self.xs.write("/vm/u6/device/vbd/51728/activation/target", "file:/srv/other.img")
        await self.xs.write("/vm/u6/device/vbd/51728/activation/mode", RW)
        await self.h2.acquire(Claim("/srv/other.img", RW, 9, "/vm/u9/device/vbd/1", "vbd 1"))
        self.assertEqual(await self.h1.start(), 1)
        token = self.h1.held[TARGET].token
        self.assertEqual(await self.xs.read(f"{old.record}/activation/token"), str(token))
        self.assertEqual(
            [(g.target, g.token) for g in self.h1.local.grants()],
            [("file:/srv/other.img", 0), (TARGET, token)],
        )

    async def test_hosts(self) -> None:
        """The pool's hosts, this one with its session's state."""
        hosts = await self.h1.hosts()
        self.assertEqual(
            [(h["name"], h["self"], h["state"]) for h in hosts],
            [
                ("h1", True, LIVE),
                ("h2", False, "live"),
            ],
        )
        self.assertEqual(hosts[0]["ttl"], 10)


class FenceTests(EmbeddedXenstoredFixture, TestCase):
    """The self-fence on two registered tapdisk data paths (a recording pauser)."""

    async def setUp(self) -> None:
        """Two data paths in driver domain 0's registry; the fence over them."""
        self.startServer()
        self.xs = await self.connect()
        self.paths = [tapRecord(0, f"vbd-5-{n}", (f"/srv/{n}.vhd",), n) for n in (1, 2)]
        for dp in self.paths:
            await self.register(dp)
        self.pauser = RecordingPauser()
        self.fence = DataPathFence(DataPathControl(self.xs, {"tap": self.pauser}))

    async def register(self, dp: DataPath) -> None:
        """Write C{dp}'s registry record."""
        await self.xs.mkdir(dp.path)
        await updateRecord(self.xs, dp, dp)

    async def test_fenceThenRecover(self) -> None:
        """Every data path is paused (its hold written); recovery resumes them (no reload)."""
        await self.fence.fence()
        self.assertEqual(self.pauser.paused, {(0, "vbd-5-1"), (0, "vbd-5-2")})
        self.assertEqual(await self.xs.read(holdPath(0, "vbd-5-1")), FENCE_HOLD)
        await self.fence.fence()  # a second fence pauses nothing twice
        self.assertEqual(self.pauser.calls, 2)
        await self.fence.recover()
        self.assertEqual(self.pauser.paused, set())
        self.assertEqual([c[3] for c in self.pauser.log if c[0] == "resume"], [False, False])
        self.assertFalse(await self.xs.exists(holdPath(0, "vbd-5-1")))

    async def test_oneFailureLeavesTheOthersPaused(self) -> None:
        """A data path that cannot be paused does not unpause the others."""
        failing = RecordingPauser()
        failing.pause = (  # type: ignore[method-assign]
            lambda dp: self.pauser.pause(dp) if dp.vdi == "vbd-5-1" else fail(OSError("exit 1"))
        )
        self.fence.control.register("tap", failing)
        await self.fence.fence()
        self.assertEqual(self.pauser.paused, {(0, "vbd-5-1")})
        self.assertEqual([dp.vdi for dp in self.fence.paused], ["vbd-5-1"])

    async def test_lostKeepsPaused(self) -> None:
        """
        After the lease is lost the paused data paths stay paused: no
        recovery resumes them, a later fence leaves them; once detached
        (their record replaced), they are not kept any more.
        """
        await self.fence.fence()
        await self.fence.lost(frozenset({b"k"}))
        await self.fence.recover()
        self.assertEqual(len(self.pauser.paused), 2)
        await self.fence.fence()
        self.assertEqual(self.pauser.calls, 2)
        self.assertEqual(len(self.fence.kept), 2)
        await self.xs.rm(self.paths[0].path)
        await self.register(tapRecord(0, "vbd-5-1", ("/srv/1.vhd",), 9))
        await self.fence.fence()
        self.assertEqual([dp.vdi for dp in self.fence.kept], ["vbd-5-2"])
        self.assertEqual(self.pauser.calls, 3)


class MembershipTests(TestCase):
    """Joining and leaving, on task.Clock: TTL 10 s, self-fence 4 s."""

    def setUp(self) -> None:
        """A fake etcd and a fence over nothing."""
        self.clock = Clock()
        self.etcd = FakeEtcd()
        self.fence = DataPathFence(DataPathControl(None, {}))

    def member(self, connect: float = 5.0) -> PoolMembership:
        """Host h1's membership."""
        return PoolMembership(
            self.clock, "h1", ("http://fake",), 10, 4.0, 1.0, connect, self.fence, self.etcd
        )

    def test_waitsForTheEarlierSession(self) -> None:
        """
        A daemon of a host whose earlier session still lives waits for its
        lease to expire, then joins.
        """
        first = self.member()
        self.successResultOf(Deferred.fromCoroutine(first.start()))
        assert first.session is not None
        first.session.stop(revoke=False)
        second = self.member()
        d = Deferred.fromCoroutine(second.start())
        self.clock.advance(5)
        self.assertNoResult(d)
        self.etcd.expire(first.session.lease)
        self.clock.advance(0.25)
        self.successResultOf(d)
        assert second.session is not None
        self.assertEqual(second.session.state, LIVE)

    def test_gaveUpAfterTtl(self) -> None:
        """Waiting ends after a TTL and a self-fence deadline."""
        first = self.member()
        self.successResultOf(Deferred.fromCoroutine(first.start()))
        d = Deferred.fromCoroutine(self.member().start())
        self.clock.pump([0.25] * 60)
        self.failureResultOf(d)

    def test_etcdDownRetriedUntilConnect(self) -> None:
        """etcd unreachable at start is retried for C{connect} seconds, then raised."""
        self.etcd.down = True
        d = Deferred.fromCoroutine(self.member(connect=1.0).start())
        self.clock.pump([0.25] * 3)
        self.assertNoResult(d)
        self.clock.pump([0.25] * 3)
        self.failureResultOf(d, EtcdUnavailable)

    def test_stopRevokesOnlyWhenNothingHeld(self) -> None:
        """A host holding activations leaves its lease to expire; one with none revokes it."""
        member = self.member()
        self.successResultOf(Deferred.fromCoroutine(member.start()))
        assert member.session is not None
        member.session.hold(b"/xenddev/pool/active/x")
        lease = member.session.lease
        self.successResultOf(Deferred.fromCoroutine(member.stop()))
        self.assertEqual(self.etcd.revoked, [])
        self.assertIn(lease, self.etcd.leases)
        other = self.member()
        self.etcd.expire(lease)
        self.successResultOf(Deferred.fromCoroutine(other.start()))
        self.successResultOf(Deferred.fromCoroutine(other.stop()))
        self.assertEqual(len(self.etcd.revoked), 1)
