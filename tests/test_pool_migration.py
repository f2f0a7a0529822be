"""
The storage side of migration across a pool (issue 14).

  - L{xenddev.pool.migration} on the in-memory etcd and on a real 3-member
    cluster (the shared one): the destination's intent under its lease, the
    handover moving the activation key in one transaction with a larger
    fencing token, the handback, a source that died (its key taken once its
    lease expired, not before), conflicts named.
"""

from __future__ import annotations

import json
import time

from twisted.internet import reactor
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from tests.support.etcdcluster import SHARED, report, sleep
from tests.support.fakeetcd import FakeEtcd
from xenddev.pool.activation import Activations
from xenddev.pool.errors import ActivationConflict
from xenddev.pool.etcd import EtcdClient
from xenddev.pool.interfaces import IMigrations
from xenddev.pool.keys import activeKey, migrationKey
from xenddev.pool.migration import (
    HostGone,
    IntentConflict,
    IntentMissing,
    Migrations,
    StillHeld,
)
from xenddev.pool.session import HostSession

TARGET = "file:/srv/pool/guest.img"


class MigrationLogicTests(SynchronousTestCase):
    """The transactions' rules on the in-memory etcd (one step each)."""

    def setUp(self) -> None:
        """Hosts src, dst and other on one fake etcd; src writes L{TARGET}."""
        self.clock = Clock()
        self.etcd = FakeEtcd()
        self.sessions: dict[str, HostSession] = {}
        self.activations: dict[str, Activations] = {}
        self.migrations: dict[str, Migrations] = {}
        for name in ("src", "dst", "other"):
            session = HostSession(self.etcd, self.clock, name, ttl=10, fenceAfter=4)
            self.successResultOf(session.start())
            self.addCleanup(session.stop, False)
            self.sessions[name] = session
            self.activations[name] = Activations(self.etcd, session, self.clock)
            self.migrations[name] = Migrations(self.etcd, session, self.clock)
        self.held = self.successResultOf(self.activations["src"].activate(TARGET))

    def test_interface(self) -> None:
        """Migrations provides IMigrations."""
        self.assertTrue(verifyObject(IMigrations, self.migrations["dst"]))

    def test_handover(self) -> None:
        """
        The intent stands under the destination's lease; the handover puts
        the key under it (the same create revision, a larger token, a value
        naming the new host) and deletes the intent; a repeat answers the
        same activation.
        """
        intent = self.successResultOf(self.migrations["dst"].intend(TARGET, "src", "guest"))
        self.assertEqual((intent.source, intent.destination), ("src", "dst"))
        self.assertEqual(self.etcd.kvs[migrationKey(TARGET)].lease, self.sessions["dst"].lease)
        again = self.successResultOf(self.migrations["dst"].intend(TARGET, "src", "guest"))
        self.assertEqual(again.revision, intent.revision)
        created = self.etcd.kvs[activeKey(TARGET)].createRevision
        moved = self.successResultOf(self.migrations["dst"].handover(TARGET, "src", "dst"))
        kv = self.etcd.kvs[activeKey(TARGET)]
        self.assertEqual((kv.lease, kv.createRevision), (self.sessions["dst"].lease, created))
        self.assertEqual(json.loads(kv.value)["host"], "dst")
        self.assertGreater(moved.token, self.held.token)
        self.assertEqual(moved.token, kv.modRevision)
        self.assertNotIn(migrationKey(TARGET), self.etcd.kvs)
        self.assertIn(activeKey(TARGET), self.sessions["dst"].held)
        self.assertEqual(
            self.successResultOf(self.migrations["dst"].handover(TARGET, "src", "dst")), moved
        )
        # The source's deactivation is guarded by its lease: it deletes nothing.
        self.assertFalse(self.successResultOf(self.activations["src"].deactivate(TARGET)))
        self.assertIn(activeKey(TARGET), self.etcd.kvs)

    def test_handoverNeedsIntent(self) -> None:
        """Without the destination's intent nothing moves; a withdrawn one is gone."""
        self.failureResultOf(self.migrations["dst"].handover(TARGET, "src", "dst"), IntentMissing)
        self.successResultOf(self.migrations["dst"].intend(TARGET, "src", "guest"))
        self.assertTrue(self.successResultOf(self.migrations["dst"].withdraw(TARGET)))
        self.assertFalse(self.successResultOf(self.migrations["dst"].withdraw(TARGET)))
        before = dict(self.etcd.kvs)
        self.failureResultOf(self.migrations["dst"].handover(TARGET, "src", "dst"), IntentMissing)
        self.assertEqual(self.etcd.kvs, before)

    def test_conflicts(self) -> None:
        """
        A second destination's intent is refused naming the first; an
        intent naming a source that does not write the target is refused
        naming the writer.
        """
        self.successResultOf(self.migrations["dst"].intend(TARGET, "src", "guest"))
        f = self.failureResultOf(
            self.migrations["other"].intend(TARGET, "src", "guest"), IntentConflict
        )
        self.assertIn("to host dst", str(f.value))
        self.successResultOf(self.activations["other"].activate("file:/srv/pool/b.img"))
        f = self.failureResultOf(
            self.migrations["dst"].intend("file:/srv/pool/b.img", "src", "guest"),
            ActivationConflict,
        )
        self.assertEqual(f.value.holder, "other")

    def test_nobodyHolds(self) -> None:
        """A target nobody holds is intended and taken by the handover."""
        target = "file:/srv/pool/free.img"
        self.successResultOf(self.migrations["dst"].intend(target, "src", "guest"))
        moved = self.successResultOf(
            self.migrations["dst"].handover(target, "src", "dst", released=False)
        )
        self.assertEqual(self.etcd.kvs[activeKey(target)].lease, self.sessions["dst"].lease)
        self.assertEqual(moved.host, "dst")

    def test_notReleasedStillHeld(self) -> None:
        """Not released by a source whose key stands: refused, nothing moved."""
        self.successResultOf(self.migrations["dst"].intend(TARGET, "src", "guest"))
        before = dict(self.etcd.kvs)
        f = self.failureResultOf(
            self.migrations["dst"].handover(TARGET, "src", "dst", released=False), StillHeld
        )
        self.assertEqual(f.value.holder, "src")
        self.assertEqual(self.etcd.kvs, before)
        self.etcd.expire(self.sessions["src"].lease)
        moved = self.successResultOf(
            self.migrations["dst"].handover(TARGET, "src", "dst", released=False)
        )
        self.assertGreater(moved.token, self.held.token)

    def test_handback(self) -> None:
        """The handback puts the key under the source's lease again, with a new token."""
        self.successResultOf(self.migrations["dst"].intend(TARGET, "src", "guest"))
        moved = self.successResultOf(self.migrations["dst"].handover(TARGET, "src", "dst"))
        back = self.successResultOf(self.migrations["dst"].handback(TARGET, "dst", "src"))
        self.assertEqual(self.etcd.kvs[activeKey(TARGET)].lease, self.sessions["src"].lease)
        self.assertGreater(back.token, moved.token)
        self.assertNotIn(activeKey(TARGET), self.sessions["dst"].held)
        # The source takes it back as its own (the same key, the new token).
        again = self.successResultOf(self.activations["src"].activate(TARGET))
        self.assertEqual(again.token, back.token)
        # A repeated handback answers the same; one by a host not holding it is refused.
        self.assertEqual(
            self.successResultOf(self.migrations["dst"].handback(TARGET, "dst", "src")), back
        )
        self.failureResultOf(
            self.migrations["other"].handback(TARGET, "other", "dst"), ActivationConflict
        )

    def test_handbackToAGoneHost(self) -> None:
        """A handback to a host that left the pool is refused (fault 16), nothing moved."""
        self.successResultOf(self.migrations["dst"].intend(TARGET, "src", "guest"))
        self.successResultOf(self.migrations["dst"].handover(TARGET, "src", "dst"))
        self.etcd.expire(self.sessions["src"].lease)
        before = dict(self.etcd.kvs)
        f = self.failureResultOf(self.migrations["dst"].handback(TARGET, "dst", "src"), HostGone)
        self.assertEqual(int(f.value.faultCode), 16)
        self.assertEqual(self.etcd.kvs, before)

    def test_readersRefuseIntent(self) -> None:
        """A target read by other hosts cannot be intended read-write."""
        target = "file:/srv/pool/shared.img"
        self.successResultOf(self.activations["other"].activate(target, "ro"))
        f = self.failureResultOf(
            self.migrations["dst"].intend(target, "src", "guest"), ActivationConflict
        )
        self.assertEqual(f.value.readers, ("other",))


#: Lease TTL and self-fence deadline of the real-etcd tests.
TTL, FENCE = 2, 1.0


class RealMigrationTests(TestCase):
    """The transactions on a real etcd cluster (the shared one)."""

    async def setUp(self) -> None:
        """A target of the test's own; hosts made by L{host}."""
        self.cluster = await SHARED.get(self)
        self.target = f"file:/pool/{self.id()}"

    async def host(self, name: str) -> tuple[HostSession, Activations, Migrations, EtcdClient]:
        """A host: its own client, a started session, its activations and migrations."""
        etcd = EtcdClient(reactor, self.cluster.endpoints, timeout=2)
        self.addCleanup(etcd.close)
        session = HostSession(etcd, reactor, f"{name}-{id(self)}", ttl=TTL, fenceAfter=FENCE)
        self.addCleanup(session.stop)
        await session.start()
        return (
            session,
            Activations(etcd, session, reactor),
            Migrations(etcd, session, reactor),
            etcd,
        )

    async def test_handoverAndBack(self) -> None:
        """
        On etcd 3.4: the intent, the handover (one transaction: key under
        the destination's lease, token grown, create revision kept, intent
        gone) and the handback (under the source's again, token grown).
        """
        src, srcActs, _, etcd = await self.host("mig-src")
        dst, _, dstMig, _ = await self.host("mig-dst")
        held = await srcActs.activate(self.target)
        intent = await dstMig.intend(self.target, src.host, "guest")
        kv = await etcd.get(migrationKey(self.target))
        self.assertEqual(kv.lease, dst.lease)
        self.assertEqual(json.loads(kv.value)["from"], src.host)
        self.assertEqual(intent.destination, dst.host)
        created = (await etcd.get(activeKey(self.target))).createRevision
        began = time.monotonic()
        moved = await dstMig.handover(self.target, src.host, dst.host)
        report("handover (etcd)", time.monotonic() - began)
        kv = await etcd.get(activeKey(self.target))
        self.assertEqual((kv.lease, kv.createRevision), (dst.lease, created))
        self.assertEqual((moved.token, json.loads(kv.value)["host"]), (kv.modRevision, dst.host))
        self.assertGreater(moved.token, held.token)
        self.assertIsNone(await etcd.get(migrationKey(self.target)))
        self.assertFalse(await srcActs.deactivate(self.target))
        back = await dstMig.handback(self.target, dst.host, src.host)
        kv = await etcd.get(activeKey(self.target))
        self.assertEqual(kv.lease, src.lease)
        self.assertGreater(back.token, moved.token)
        self.assertTrue(await srcActs.deactivate(self.target))

    async def test_intentGoesWithTheDestination(self) -> None:
        """The destination's session ends: its intent goes with its lease."""
        src, srcActs, _, etcd = await self.host("gone-src")
        dst, _, dstMig, _ = await self.host("gone-dst")
        await srcActs.activate(self.target)
        await dstMig.intend(self.target, src.host, "guest")
        await dst.stop()
        self.assertIsNone(await etcd.get(migrationKey(self.target)))
        self.assertEqual((await etcd.get(activeKey(self.target))).lease, src.lease)

    async def test_deadSourceTakenAfterTtl(self) -> None:
        """
        The source dies after releasing nothing (no keepalive, no revoke):
        a handover that cannot trust it is refused until its lease expired,
        then takes the target with a larger token.
        """
        src, srcActs, _, _ = await self.host("dead-src")
        dst, _, dstMig, etcd = await self.host("dead-dst")
        held = await srcActs.activate(self.target)
        await dstMig.intend(self.target, src.host, "guest")
        await src.stop(revoke=False)
        stopped = time.monotonic()
        refusals = 0
        while True:
            try:
                moved = await dstMig.handover(self.target, src.host, dst.host, released=False)
                break
            except StillHeld as e:
                self.assertEqual(e.holder, src.host)
                refusals += 1
            await sleep(reactor, 0.05)
            self.assertLess(time.monotonic() - stopped, TTL + 3)
        took = time.monotonic() - stopped
        report("dead source's target taken", took)
        self.assertGreater(refusals, 0)
        self.assertGreaterEqual(took, TTL - src.renewEvery - 0.05)
        self.assertGreater(moved.token, held.token)
        self.assertEqual((await etcd.get(activeKey(self.target))).lease, dst.lease)
