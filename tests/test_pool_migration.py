"""
The storage side of migration across a pool (issue 14).

  - L{xenddev.pool.migration} on the in-memory etcd and on a real 3-member
    cluster (the shared one): the destination's intent under its lease, the
    handover moving the activation key in one transaction with a larger
    fencing token, the handback, a source that died (its key taken once its
    lease expired, not before), conflicts named;
  - two daemons as hosts of a pool (C{twistd -n xenddev}, each with its own
    embedded store and SIMULATED ends, calling each other over the peer
    channel; tests/test_pool_daemon.py's L{PoolHostsMixin}), driven through
    the CLI and XML-RPC as an operator would: prepare then commit (the key
    and the vdis move, the token grows), prepare then abort (both stores and
    etcd as before, a commit after it refused), and the source killed in the
    middle of the handover (the destination takes the target once the
    source's lease expired, not before; nothing doubly active).

Timings: lease TTL 3 s, self-fence after 1 s for the daemons (2 s and 1 s for
the transactions' tests).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from twisted.internet import reactor
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from tests.support.etcdcluster import SHARED, report, sleep
from tests.support.fakeetcd import FakeEtcd
from tests.support.host import shortTempDir
from tests.support.treedump import diffTrees, dumpTree
from tests.test_pool_daemon import GUEST, RENEW_EVERY, Host, PoolHostsMixin, _image
from tests.test_pool_daemon import TTL as DAEMON_TTL
from xenddev.cli import EXIT_EXISTS, EXIT_OK
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
from xenddev.xenbus import waitForState

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


XVDB = 51728
VDI = f"vbd-{GUEST}-{XVDB}"
FRONTEND = f"/local/domain/{GUEST}/device/vbd/{XVDB}"


class DaemonMigrationTests(PoolHostsMixin, TestCase):
    """Two daemons as hosts on the shared cluster, calling each other (peers)."""

    async def setUp(self) -> None:
        """The shared cluster, a directory for images, an etcd client to look with."""
        self.cluster = await SHARED.get(self)
        self.images = os.path.realpath(shortTempDir(self, "xmimg-"))
        self.etcd = EtcdClient(reactor, self.cluster.endpoints, timeout=2)
        self.addCleanup(self.etcd.close)

    async def running(self, prefix: str) -> tuple[Host, Host, str]:
        """
        Source and destination daemons; the guest exists on both (a vif);
        on the source it has a raw image read-write as xvdb, connected.
        """
        src, dst = [
            await self.startHost(f"{prefix}-{n}", self.cluster.endpoints, peers=True)
            for n in ("src", "dst")
        ]
        for host in (src, dst):
            await self.call(host, "device.attach", GUEST, "vif", {})
        image = _image(self.images, f"{prefix}.img")
        self.assertIsInstance(await self.attach(src, image, "xvdb"), dict)
        await self.connected(src, XVDB)
        return src, dst, image

    async def cliJson(self, host: Host, *argv: str) -> Any:
        """A CLI command with --json against C{host}; its answer (exit 0 asserted)."""
        code, out, err = await self.cli(host, *argv, "--json")
        self.assertEqual(code, EXIT_OK, err)
        return json.loads(out)

    async def state(self, host: Host) -> str:
        """The guest's vdi's state on C{host}."""
        info = await self.call(host, "vdi.get", 0, VDI)
        return str(info["state"])

    async def writer(self, image: str) -> tuple[str, int, int]:
        """The image's activation key: its holder, lease and token (mod revision)."""
        kv = await self.etcd.get(activeKey(f"file:{image}"))
        self.assertIsNotNone(kv)
        return json.loads(kv.value)["host"], kv.lease, kv.modRevision

    async def test_prepareCommit(self) -> None:
        """
        migrate-prepare on the destination: its disk there is prepared and
        plugged, inactive, not connected; the source still writes.
        migrate-commit: the key is the destination's (vdi-where says so,
        the token grew), the source's vdi is inactive, the destination's
        active and connected; the source's detach leaves the key alone.
        """
        src, dst, image = await self.running("mc")
        holder, _, before = await self.writer(image)
        self.assertEqual(holder, src.name)
        prepared = await self.cliJson(dst, "migrate-prepare", str(GUEST), "--from", src.name)
        self.assertEqual(prepared["state"], "prepared")
        self.assertEqual([d["devid"] for d in prepared["devices"]], [XVDB])
        self.assertEqual((await self.state(dst), await self.state(src)), ("inactive", "active"))
        await waitForState(dst.xs, f"/local/domain/0/backend/vbd/{GUEST}/{XVDB}", 2, 10)
        self.assertNotEqual(await dst.xs.read(f"{FRONTEND}/state"), "4")
        intent = await self.etcd.get(migrationKey(f"file:{image}"))
        record = json.loads(intent.value)
        self.assertEqual((record["from"], record["to"]), (src.name, dst.name))
        self.assertEqual(record["domain"], f"simulated-guest-{GUEST}")
        committed = await self.cliJson(dst, "migrate-commit", str(GUEST))
        self.assertEqual(committed["state"], "committed")
        timings = committed["timings-ms"]
        report("handover window (daemons, peers over HTTP)", timings["window"] / 1000)
        where = await self.cliJson(src, "vdi-where", image)
        self.assertEqual(where["writer"]["host"], dst.name)
        self.assertGreater(where["writer"]["token"], before)
        self.assertEqual(committed["moved"], {f"file:{image}": str(where["writer"]["token"])})
        self.assertEqual((await self.state(src), await self.state(dst)), ("inactive", "active"))
        await waitForState(dst.xs, FRONTEND, 4, 10)
        (device,) = (await self.call(dst, "pool.where", image))["devices"]
        self.assertEqual(device["token"], where["writer"]["token"])
        # The destination's driver domain was sent the new token with the activate.
        fencing = "/local/domain/0/private/xenddev/fencing"
        served = [await dst.xs.read(f"{fencing}/{k}") for k in await dst.xs.ls(fencing)]
        self.assertIn(f"{where['writer']['token']} file:{image}", served)
        self.assertIsNone(await self.etcd.get(migrationKey(f"file:{image}")))
        # The source's guest goes: its detach gives nothing back to etcd.
        self.assertTrue(await self.call(src, "device.detach", GUEST, "vbd", "xvdb"))
        self.assertEqual(await self.writer(image), (dst.name, *(await self.writer(image))[1:]))
        self.assertEqual((await self.writer(image))[2], where["writer"]["token"])

    async def test_prepareAbort(self) -> None:
        """
        migrate-prepare then migrate-abort: both stores and the image's
        keys in etcd are as before; a migrate-commit after it is refused.
        """
        src, dst, image = await self.running("ma")
        trees = {h.name: await dumpTree(h.xs) for h in (src, dst)}
        keys = await self.writer(image)
        await self.cliJson(dst, "migrate-prepare", str(GUEST), "--from", src.name)
        aborted = await self.cliJson(dst, "migrate-abort", str(GUEST))
        self.assertEqual((aborted["state"], aborted["reinstated"]), ("aborted", True))
        for host in (src, dst):
            self.assertEqual(diffTrees(trees[host.name], await dumpTree(host.xs)), [], host.name)
        self.assertEqual(await self.writer(image), keys)
        self.assertIsNone(await self.etcd.get(migrationKey(f"file:{image}")))
        code, _, err = await self.cli(dst, "migrate-commit", str(GUEST))
        self.assertNotEqual(code, EXIT_OK)
        self.assertIn("no migration of guest 5 is prepared", err)
        f = await self.fault(dst, "migrate.commit", GUEST)
        self.assertEqual(f.faultCode, 17)

    async def test_sourceKilledMidHandover(self) -> None:
        """
        The source has released (its vdi inactive) and is killed with
        SIGKILL before the key moved: migrate-commit is refused, naming it
        (its lease still holds the target), and activates nothing; once the
        lease expired it takes the target with a larger token.
        """
        src, dst, image = await self.running("mk")
        _, _, before = await self.writer(image)
        await self.cliJson(dst, "migrate-prepare", str(GUEST), "--from", src.name)
        await self.call(src, "migrate.release", GUEST, dst.name)
        self.assertEqual(await self.state(src), "inactive")
        tree = await dumpTree(dst.xs)
        killed = time.monotonic()
        src.process.signalProcess("KILL")
        refusals = 0
        while True:
            code, out, err = await self.cli(dst, "migrate-commit", str(GUEST), "--json")
            if code == EXIT_OK:
                break
            self.assertEqual(code, EXIT_EXISTS, err)
            self.assertIn(f"still held read-write by host {src.name}", err)
            if not refusals:
                self.assertEqual(diffTrees(tree, await dumpTree(dst.xs)), [])
                self.assertEqual(await self.state(dst), "inactive")
            refusals += 1
            await sleep(reactor, 0.1)
            self.assertLess(time.monotonic() - killed, DAEMON_TTL + 5)
        took = time.monotonic() - killed
        report("source killed mid-handover to the destination's commit", took)
        self.assertGreater(refusals, 0)
        self.assertGreaterEqual(took, DAEMON_TTL - RENEW_EVERY - 0.05)
        committed = json.loads(out)
        self.assertFalse(committed["released"])
        holder, _, token = await self.writer(image)
        self.assertEqual(holder, dst.name)
        self.assertGreater(token, before)
        self.assertEqual(await self.state(dst), "active")
        await waitForState(dst.xs, FRONTEND, 4, 10)

    async def test_abortAfterCommit(self) -> None:
        """
        migrate-abort after migrate-commit: the key goes back to the source
        (a larger token again, in its device's record too), its vdi is
        active again, the destination's disk is gone.
        """
        src, dst, image = await self.running("mb")
        await self.cliJson(dst, "migrate-prepare", str(GUEST), "--from", src.name)
        committed = await self.cliJson(dst, "migrate-commit", str(GUEST))
        moved = int(committed["moved"][f"file:{image}"])
        aborted = await self.cliJson(dst, "migrate-abort", str(GUEST))
        self.assertTrue(aborted["reinstated"])
        holder, _, token = await self.writer(image)
        self.assertEqual(holder, src.name)
        self.assertGreater(token, moved)
        self.assertEqual(await self.state(src), "active")
        (device,) = (await self.call(src, "pool.where", image))["devices"]
        self.assertEqual(device["token"], token)
        self.assertEqual(await self.call(dst, "vdi.list", 0, "vdi"), [])
        self.assertIsNone(await dst.xs.readOrNone(FRONTEND))
