"""
The storage side of migration, its logic on L{task.Clock}: the pool
guard's incoming claims (L{xenddev.poolguard}), the coordinator across
hosts (L{xenddev.poolmigration}) over the in-memory etcd
(tests/support/fakeetcd.py) with real sessions, activations, migrations and
guards, each host's disks faked in memory (L{FakeStorage}: a vdi's state,
its claims through the host's real guard) and the peer channel faked
in-process (L{LocalPeers}: a call runs the other host's coordinator, a host
"down" is unreachable); xend's steps through L{DevController.migrate}.

The same with daemons as hosts on a real etcd: tests/test_pool_migration.py.
"""

from __future__ import annotations

import io
import os
import xmlrpc.client
from collections.abc import Sequence
from typing import Any

from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from tests.support.fakeetcd import FakeEtcd
from tests.support.fixtures import EmbeddedXenstoredFixture
from tests.support.host import HostSuite, startDriverDomain
from xenddev import cli
from xenddev.controllers import defaultControllers
from xenddev.driverdomain.kinds.blkback import BlkbackKind
from xenddev.errors import XenddevError
from xenddev.interfaces import IPoolPeers, IStorageMigration
from xenddev.localguard import LocalGuard
from xenddev.migraterpc import MigrateNamespace, checkHost, checkRemoteDomain
from xenddev.pool.activation import Activations
from xenddev.pool.errors import ActivationConflict
from xenddev.pool.keys import activeKey, migrationKey
from xenddev.pool.migration import IntentConflict, Migrations, StillHeld
from xenddev.pool.session import HostSession
from xenddev.poolguard import PoolGuard
from xenddev.poolmigration import (
    COMMITTED,
    MigrationUnavailable,
    NotMigrating,
    PoolMigrations,
)
from xenddev.poolpeers import PeerFault, PeerUnavailable
from xenddev.toolstack.activation import RO, RW, Claim, Grant, Mode
from xenddev.toolstack.controller import DevController, DeviceConfigError, DomainInfo
from xenddev.toolstack.manager import DeviceManager
from xenddev.toolstack.migration import DomainStorage, MigratingDevice
from xenddev.xenbus import waitForState

GUEST = 5
DISK = "/srv/pool/guest.img"
SHARED_DISK = "/srv/pool/iso.img"
TARGET = f"file:{DISK}"


class FakeXs:
    """What a L{LocalGuard} asks of XenStore here: writes are recorded, every domain exists."""

    def __init__(self) -> None:
        self.writes: dict[str, str] = {}

    def write(self, path: str, value: str) -> Deferred[None]:
        """Record a write."""
        self.writes[path] = value
        return succeed(None)

    def exists(self, path: str) -> Deferred[bool]:
        """Every domain exists."""
        return succeed(True)

    def readOrNone(self, path: str) -> Deferred[str | None]:
        """Every guest is named C{guest-<domid>}."""
        if path.startswith("/local/domain/") and path.endswith("/name"):
            return succeed(f"guest-{path.split('/')[3]}")
        return succeed(None)


class FakeStorage(DomainStorage):
    """
    One host's guests' disks in memory: each disk's vdi state and grant; its
    claims go through the host's real guard. Activating a read-write disk
    whose key this host does not hold in etcd, or that another host has
    active, fails the test: nothing may be doubly active.
    """

    #: target -> host with a read-write disk of it active (every host's)
    activeWriters: dict[str, str]

    def __init__(self, host: str, guard: PoolGuard, session: HostSession, etcd: FakeEtcd) -> None:
        self.host, self.guard, self.session, self.etcd = host, guard, session, etcd
        #: domid -> (class, devid) -> [config, grant, state]
        self.disks: dict[int, dict[tuple[str, int], list[Any]]] = {}
        self.failActivate = False

    def add(self, domid: int, devid: int, path: str, mode: Mode) -> Deferred[Grant]:
        """Attach a disk (active), claimed through the guard."""

        async def add() -> Grant:
            grant: Grant = await self.guard.acquire(self._claim(domid, devid, path, mode, None))
            self.disks.setdefault(domid, {})[("vbd", devid)] = [
                {"uname": path, "mode": mode},
                grant,
                "inactive",
            ]
            self._activate(domid, "vbd", devid)
            return grant

        return Deferred.fromCoroutine(add())

    def states(self, domid: int) -> dict[int, str]:
        """Each disk's vdi state."""
        return {devid: disk[2] for (_, devid), disk in self.disks.get(domid, {}).items()}

    def _claim(self, domid: int, devid: int, path: str, mode: str, source: str | None) -> Claim:
        record = f"/vm/{self.host}-{domid}/device/vbd/{devid}"
        return Claim(path, mode, domid, record, f"vbd {devid}", 0, source)  # type: ignore[arg-type]

    def _activate(self, domid: int, devclass: str, devid: int) -> None:
        _, grant, _ = self.disks[domid][(devclass, devid)]
        if grant.mode == RW:
            kv = self.etcd.kvs.get(activeKey(grant.target))
            assert kv is not None and kv.lease == self.session.lease, (
                f"{self.host} activated {grant.target} without holding it"
            )
            other = self.activeWriters.get(grant.target)
            assert other in (None, self.host), f"{grant.target} active on {other} too"
            self.activeWriters[grant.target] = self.host
        self.disks[domid][(devclass, devid)][2] = "active"

    def devices(self, domid: int) -> Deferred[list[MigratingDevice]]:
        """The guest's disks."""
        return succeed(
            [
                MigratingDevice(c, devid, config, grant.target, grant.mode, grant.token)
                for (c, devid), (config, grant, _) in sorted(self.disks.get(domid, {}).items())
            ]
        )

    def deactivate(self, domid: int, devices: Sequence[MigratingDevice]) -> Deferred[None]:
        """Every disk inactive."""
        for d in devices:
            disk = self.disks[domid][(d.devclass, d.devid)]
            if disk[2] == "active" and disk[1].mode == RW:
                self.activeWriters.pop(disk[1].target, None)
            disk[2] = "inactive"
        return succeed(None)

    def activate(self, domid: int, devices: Sequence[MigratingDevice]) -> Deferred[None]:
        """Every disk active (checked: held here, active nowhere else)."""
        if self.failActivate:
            return fail(XenddevError("the driver domain refused"))
        for d in devices:
            self._activate(domid, d.devclass, d.devid)
        return succeed(None)

    def prepareIncoming(
        self, domid: int, devices: Sequence[MigratingDevice], source: str
    ) -> Deferred[list[MigratingDevice]]:
        """Each disk claimed (naming the source) and made inactive; all or nothing."""

        async def prepare() -> list[MigratingDevice]:
            made: list[MigratingDevice] = []
            try:
                for d in devices:
                    grant = await self.guard.acquire(
                        self._claim(domid, d.devid, d.config["uname"], d.config["mode"], source)
                    )
                    self.disks.setdefault(domid, {})[(d.devclass, d.devid)] = [
                        dict(d.config),
                        grant,
                        "inactive",
                    ]
                    made.append(
                        MigratingDevice(
                            d.devclass, d.devid, d.config, grant.target, grant.mode, grant.token
                        )
                    )
            except BaseException:
                await self.cancel(domid, made)
                raise
            return made

        return Deferred.fromCoroutine(prepare())

    def cancel(self, domid: int, devices: Sequence[MigratingDevice]) -> Deferred[None]:
        """Each disk detached, its grant given back."""

        async def cancel() -> None:
            for d in devices:
                _, grant, state = self.disks[domid].pop((d.devclass, d.devid))
                if state == "active" and grant.mode == RW:
                    self.activeWriters.pop(grant.target, None)
                await self.guard.release(grant)
            if not self.disks[domid]:
                del self.disks[domid]

        return Deferred.fromCoroutine(cancel())


@implementer(IPoolPeers)
class LocalPeers:
    """The peer channel in-process: a call runs the host's coordinator; C{down} hosts fail."""

    timeout = 1.0

    def __init__(self) -> None:
        self.hosts: dict[str, PoolMigrations] = {}
        self.down: set[str] = set()
        self.calls: list[tuple[str, str]] = []

    def address(self, host: str) -> Deferred[str]:
        """A live host's (made-up) address."""
        if host in self.down or host not in self.hosts:
            return fail(PeerUnavailable(f"host {host} is not in the pool"))
        return succeed(f"local://{host}")

    def call(self, host: str, method: str, *args: Any) -> Deferred[Any]:
        """Run C{method} on C{host}'s coordinator; its refusal as a L{PeerFault}."""
        self.calls.append((host, method))
        if host in self.down or host not in self.hosts:
            return fail(PeerUnavailable(f"host {host} ({method}): connection refused"))
        m = self.hosts[host]
        fn = {
            "migrate.describe": m.describe,
            "migrate.release": m.release,
            "migrate.reinstate": m.reinstate,
            "migrate.handedOver": m.handedOver,
            "migrate.prepare": m.prepare,
            "migrate.commit": m.commit,
            "migrate.abort": m.abort,
            "migrate.finish": m.finish,
        }[method]

        def refused(f: Failure) -> Failure:
            if isinstance(f.value, XenddevError) and not isinstance(f.value, PeerUnavailable):
                raise PeerFault(host, method, int(f.value.faultCode), str(f.value))
            return f

        return maybeDeferred(fn, *args).addErrback(refused)


class Host:
    """One host: session, guard (real), disks (fake), coordinator."""

    def __init__(self, test: PoolTestCase, name: str) -> None:
        self.name = name
        self.session = HostSession(test.etcd, test.clock, name, ttl=10, fenceAfter=4.0)
        test.successResultOf(self.session.start())
        test.addCleanup(self.session.stop, False)
        self.migrations = Migrations(test.etcd, self.session, test.clock)
        self.xs = FakeXs()
        self.guard = PoolGuard(
            LocalGuard(self.xs, name),  # type: ignore[arg-type]
            Activations(test.etcd, self.session, test.clock),
            self.session,
            self.migrations,
        )
        self.session.onLost(self.guard.lost)
        self.storage = FakeStorage(name, self.guard, self.session, test.etcd)
        self.storage.activeWriters = test.activeWriters
        self.coordinator = PoolMigrations(
            test.clock, name, lambda: self.storage, self.guard, self.migrations, test.peers
        )
        test.peers.hosts[name] = self.coordinator


class PoolTestCase(TestCase):
    """Hosts src and dst on one fake etcd; src runs guest 5 with a rw and a ro disk."""

    def setUp(self) -> None:
        """The hosts; the guest's disks attached on src."""
        self.clock = Clock()
        self.etcd = FakeEtcd()
        self.peers = LocalPeers()
        self.activeWriters: dict[str, str] = {}
        self.src = Host(self, "src")
        self.dst = Host(self, "dst")
        self.rw = self.successResultOf(self.src.storage.add(GUEST, 51728, DISK, RW))
        self.ro = self.successResultOf(self.src.storage.add(GUEST, 51744, SHARED_DISK, RO))

    def etcdKeys(self) -> dict[bytes, tuple[bytes, int, int]]:
        """The pool's activation and intent keys: value, lease, mod revision."""
        return {
            k: (kv.value, kv.lease, kv.modRevision)
            for k, kv in self.etcd.kvs.items()
            if not k.startswith(b"/xenddev/pool/hosts/")
        }


class GuardIncomingTests(PoolTestCase):
    """The pool guard's claims for a guest migrating in."""

    async def test_intentNotKey(self) -> None:
        """
        An incoming read-write claim records the intent (token 0), takes no
        key; a third host's claim of the target is refused; giving the
        grant back withdraws the intent.
        """
        before = self.etcdKeys()
        grant = await self.dst.guard.acquire(
            Claim(DISK, RW, GUEST, "/vm/x/device/vbd/51728", "vbd 51728", 0, "src")
        )
        self.assertEqual(grant.token, 0)
        self.assertEqual(self.etcd.kvs[migrationKey(TARGET)].lease, self.dst.session.lease)
        self.assertEqual(self.etcd.kvs[activeKey(TARGET)].lease, self.src.session.lease)
        self.assertEqual(self.dst.guard.incoming[TARGET].domain, f"guest-{GUEST}")
        other = Host(self, "other")
        await self.assertFailure(
            other.guard.acquire(Claim(DISK, RW, 9, "/vm/y/device/vbd/1", "vbd 1", 0, "src")),
            IntentConflict,
        )
        await self.dst.guard.release(grant)
        self.assertEqual(self.etcdKeys(), before)
        self.assertEqual(self.dst.guard.incoming, {})

    async def test_wrongSourceRefused(self) -> None:
        """A claim naming a source that does not hold the target is refused, naming the holder."""
        Host(self, "other")
        e = await self.assertFailure(
            self.dst.guard.acquire(Claim(DISK, RW, GUEST, "/vm/x/d/1", "vbd 1", 0, "other")),
            ActivationConflict,
        )
        self.assertEqual(e.holder, "src")
        self.assertEqual(self.dst.guard.local.grants(), [])

    async def test_adoptWritesTokens(self) -> None:
        """After the handover the grants and their records carry the new token."""
        record = "/vm/x/device/vbd/51728"
        await self.dst.guard.acquire(Claim(DISK, RW, GUEST, record, "vbd 51728", 0, "src"))
        moved = await self.dst.migrations.handover(TARGET, "src", "dst")
        await self.dst.guard.adopt(moved)
        (grant,) = self.dst.guard.local.grants(TARGET)
        self.assertEqual(grant.token, moved.token)
        self.assertEqual(self.dst.xs.writes[f"{record}/activation/token"], str(moved.token))
        self.assertEqual(self.dst.guard.held[TARGET], moved)
        # The source forgets it; its later detach deletes nothing in etcd.
        self.assertTrue(await self.src.guard.forget(TARGET))
        self.assertFalse(await self.src.guard.forget(TARGET))
        await self.src.guard.release(self.rw)
        self.assertEqual(self.etcd.kvs[activeKey(TARGET)].lease, self.dst.session.lease)

    async def test_intentLostWithLease(self) -> None:
        """The destination's lease expires: its intent is forgotten (and logged)."""
        await self.dst.guard.acquire(Claim(DISK, RW, GUEST, "/vm/x/d/1", "vbd 1", 0, "src"))
        self.etcd.expire(self.dst.session.lease)
        self.clock.advance(1.5)
        self.assertEqual(self.dst.guard.incoming, {})
        self.flushLoggedErrors()


class CoordinatorTests(PoolTestCase):
    """prepare / commit / abort across two hosts."""

    def test_interface(self) -> None:
        """The coordinator provides IStorageMigration; the fake peers IPoolPeers."""
        self.assertTrue(verifyObject(IStorageMigration, self.src.coordinator))
        self.assertTrue(verifyObject(IPoolPeers, self.peers))

    async def test_prepareCommit(self) -> None:
        """
        Prepare: dst's disks inactive, its intent under its lease, src
        still active. Commit: the key under dst's lease with a larger
        token, src's vdis inactive and its guard no longer holding the
        target, dst's active; the read-only disk read by both.
        """
        prepared = await self.dst.coordinator.prepare("src", GUEST, GUEST)
        self.assertEqual(prepared["state"], "prepared")
        self.assertEqual(self.dst.storage.states(GUEST), {51728: "inactive", 51744: "inactive"})
        self.assertEqual(self.src.storage.states(GUEST), {51728: "active", 51744: "active"})
        self.assertEqual(self.etcd.kvs[migrationKey(TARGET)].lease, self.dst.session.lease)
        committed = await self.dst.coordinator.commit(GUEST)
        self.assertEqual(committed["state"], COMMITTED)
        kv = self.etcd.kvs[activeKey(TARGET)]
        self.assertEqual(kv.lease, self.dst.session.lease)
        self.assertGreater(kv.modRevision, self.rw.token)
        self.assertEqual(committed["moved"], {TARGET: str(kv.modRevision)})
        self.assertNotIn(migrationKey(TARGET), self.etcd.kvs)
        self.assertEqual(self.src.storage.states(GUEST), {51728: "inactive", 51744: "inactive"})
        self.assertEqual(self.dst.storage.states(GUEST), {51728: "active", 51744: "active"})
        self.assertNotIn(TARGET, self.src.guard.held)
        self.assertEqual(self.dst.guard.held[TARGET].token, kv.modRevision)
        self.assertEqual(
            set(committed["timings-ms"]), {"release", "handover", "activate", "window"}
        )
        # A repeated commit answers the same; finish ends it.
        self.assertEqual(await self.dst.coordinator.commit(GUEST), committed)
        await self.dst.coordinator.finish(GUEST)
        await self.assertFailure(self.dst.coordinator.commit(GUEST), NotMigrating)

    async def test_prepareAbort(self) -> None:
        """Prepare then abort: etcd and both hosts' disks as before; a commit after is refused."""
        before = self.etcdKeys()
        srcDisks = self.src.storage.states(GUEST)
        await self.dst.coordinator.prepare("src", GUEST, GUEST)
        aborted = await self.dst.coordinator.abort(GUEST)
        self.assertEqual(aborted["state"], "aborted")
        self.assertEqual(self.etcdKeys(), before)
        self.assertEqual(self.src.storage.states(GUEST), srcDisks)
        self.assertEqual(self.dst.storage.disks, {})
        self.assertEqual(self.dst.guard.local.grants(), [])
        e = await self.assertFailure(self.dst.coordinator.commit(GUEST), NotMigrating)
        self.assertEqual(int(e.faultCode), 17)

    async def test_abortAfterHandover(self) -> None:
        """
        Commit then abort: the key back under src's lease with a larger
        token still, src's vdis active again and its grants carrying it,
        dst's disks gone.
        """
        await self.dst.coordinator.prepare("src", GUEST, GUEST)
        committed = await self.dst.coordinator.commit(GUEST)
        moved = int(committed["moved"][TARGET])
        await self.dst.coordinator.abort(GUEST)
        kv = self.etcd.kvs[activeKey(TARGET)]
        self.assertEqual(kv.lease, self.src.session.lease)
        self.assertGreater(kv.modRevision, moved)
        self.assertEqual(self.src.storage.states(GUEST), {51728: "active", 51744: "active"})
        self.assertEqual(self.src.guard.held[TARGET].token, kv.modRevision)
        self.assertEqual([g.token for g in self.src.guard.local.grants(TARGET)], [kv.modRevision])
        self.assertEqual(self.dst.storage.disks, {})
        self.assertEqual(self.dst.guard.held, {})

    async def test_sourceUnreachable(self) -> None:
        """
        The source's daemon is gone at commit: the handover is refused
        (its key stands under its live lease) and nothing is activated;
        once its lease expired the commit takes the target.
        """
        await self.dst.coordinator.prepare("src", GUEST, GUEST)
        self.peers.down.add("src")
        before = self.etcdKeys()
        e = await self.assertFailure(self.dst.coordinator.commit(GUEST), StillHeld)
        self.assertEqual(e.holder, "src")
        self.assertEqual(self.etcdKeys(), before)
        self.assertEqual(self.dst.storage.states(GUEST), {51728: "inactive", 51744: "inactive"})
        # Its data paths were fenced before the lease could expire (a
        # crashed source's with it): the test's bookkeeping says so.
        self.activeWriters.clear()
        self.etcd.expire(self.src.session.lease)
        committed = await self.dst.coordinator.commit(GUEST)
        self.assertFalse(committed["released"])
        self.assertEqual(self.etcd.kvs[activeKey(TARGET)].lease, self.dst.session.lease)
        self.assertEqual(self.dst.storage.states(GUEST), {51728: "active", 51744: "active"})

    async def test_activationFailsThenRetried(self) -> None:
        """
        The destination cannot activate after the handover: the commit
        fails with the keys here; a second commit finishes without moving
        them again; an abort instead would hand them back.
        """
        await self.dst.coordinator.prepare("src", GUEST, GUEST)
        self.dst.storage.failActivate = True
        await self.assertFailure(self.dst.coordinator.commit(GUEST), XenddevError)
        token = self.etcd.kvs[activeKey(TARGET)].modRevision
        self.assertEqual(self.etcd.kvs[activeKey(TARGET)].lease, self.dst.session.lease)
        self.dst.storage.failActivate = False
        await self.dst.coordinator.commit(GUEST)
        self.assertEqual(self.etcd.kvs[activeKey(TARGET)].modRevision, token)

    async def test_secondPrepareRefused(self) -> None:
        """Another source for a guest prepared here is refused; the same prepare is answered."""
        first = await self.dst.coordinator.prepare("src", GUEST, GUEST)
        self.assertEqual(await self.dst.coordinator.prepare("src", GUEST, GUEST), first)
        Host(self, "third")
        await self.assertFailure(self.dst.coordinator.prepare("third", GUEST, GUEST), XenddevError)

    async def test_withoutPeers(self) -> None:
        """A daemon without the peer channel refuses with fault 19."""
        lonely = PoolMigrations(
            self.clock, "dst", lambda: self.dst.storage, self.dst.guard, self.dst.migrations, None
        )
        e = self.assertRaises(MigrationUnavailable, lonely.prepare, "src", GUEST, GUEST)
        self.assertEqual(int(e.faultCode), 19)


class XendStepsTests(PoolTestCase):
    """xend's steps on the source, through each disk's DevController.migrate."""

    def controller(self, migration: IStorageMigration | None) -> DevController:
        """A storage controller of the guest on src (it reaches no driver domain)."""
        ctrl = DevController(None, DomainInfo(GUEST, "/vm/x"), migration=migration)  # type: ignore[arg-type]
        return ctrl

    async def test_stepsOncePerGuest(self) -> None:
        """
        Steps 0-3 asked by both disks: each runs once (one prepare, one
        commit on dst); the migration ends committed and finished.
        """
        ctrl = self.controller(self.src.coordinator)
        for step in (0, 1, 2, 3):
            for _ in range(2):
                self.assertEqual(await ctrl.migrate({}, True, "dst", step, str(GUEST)), 0)
        methods = [m for _, m in self.peers.calls]
        self.assertEqual(methods.count("migrate.prepare"), 1)
        self.assertEqual(methods.count("migrate.commit"), 1)
        self.assertEqual(self.etcd.kvs[activeKey(TARGET)].lease, self.dst.session.lease)
        self.assertEqual(self.dst.coordinator.incoming, {})
        self.assertEqual(self.src.coordinator.outgoing, {})

    async def test_recover(self) -> None:
        """A recovery after the handover puts everything back on src."""
        ctrl = self.controller(self.src.coordinator)
        for step in (0, 1, 2):
            await ctrl.migrate({}, True, "dst", step, str(GUEST))
        self.assertEqual(await ctrl.migrate({}, True, "dst", 2, str(GUEST), recover=True), 0)
        self.assertEqual(self.etcd.kvs[activeKey(TARGET)].lease, self.src.session.lease)
        self.assertEqual(self.src.storage.states(GUEST), {51728: "active", 51744: "active"})
        self.assertEqual(self.dst.storage.disks, {})

    async def test_checkRefusesDeadDestination(self) -> None:
        """Step 0 fails (fault 16) when the destination is not live in the pool."""
        ctrl = self.controller(self.src.coordinator)
        self.peers.down.add("dst")
        e = await self.assertFailure(ctrl.migrate({}, True, "dst", 0, str(GUEST)), PeerUnavailable)
        self.assertEqual(int(e.faultCode), 16)

    async def test_withoutPoolNothingToDo(self) -> None:
        """Without a pool's migration every step succeeds at once (xend's answer); bad steps
        refused."""
        ctrl = self.controller(None)
        for step in (0, 1, 2, 3):
            self.assertEqual(await ctrl.migrate({}, True, "dst", step, "g"), 0)
        for bad in (4, -1, True):
            self.assertRaises(DeviceConfigError, ctrl.migrate, {}, True, "dst", bad, "g")
        self.assertRaises(DeviceConfigError, ctrl.migrate, {}, True, "", 0, "g")


class DomainStorageSuite(HostSuite):
    """
    One host's migration steps on a store (a driver domain serving blkback,
    SIMULATED backend and guests); mixed with a server fixture and TestCase.
    """

    async def setUp(self) -> None:
        """A store, guests 5 and 6, a driver domain, a manager with one host's guard; an image."""
        self.startServer()
        self.xs = await self.connect()
        self.manager = DeviceManager(
            self.xs,
            defaultControllers(),
            createTimeout=10.0,
            destroyTimeout=10.0,
            guard=LocalGuard(self.xs, "h1"),
        )
        for guest in (5, 6):
            await self.manager.registerDomain(guest, name=f"guest-{guest}")
        await startDriverDomain(self, self.xs, 0, [BlkbackKind()], guests=(5, 6))
        self.image = os.path.abspath(self.mktemp())
        with open(self.image, "wb") as f:
            f.truncate(1 << 20)
        self.storage = DomainStorage(self.manager)
        #: The device operations the steps asked for.
        self.operations: list[tuple[str, str, int]] = []
        destroy = self.manager.destroyDevice

        def recording(domid: int, devclass: str, devid: Any, force: bool = False) -> Any:
            self.operations.append(("detach", devclass, devid))
            return destroy(domid, devclass, devid, force)

        self.manager.destroyDevice = recording  # type: ignore[method-assign]

    async def describedThenDetached(self) -> list[MigratingDevice]:
        """Guest 5's disk as the source describes it; then detached (the target free here)."""
        devid = await self.manager.createDevice(5, "vbd", {"spec": f"{self.image},raw,xvdb,w"})
        (device,) = await self.storage.devices(5)
        self.assertEqual((device.devclass, device.devid, device.mode), ("vbd", devid, RW))
        self.assertEqual(device.target, f"file:{os.path.realpath(self.image)}")
        await self.manager.destroyDevice(5, "vbd", devid)
        self.operations.clear()
        return [MigratingDevice.fromJSON(device.toJSON())]

    async def test_incomingNotConnectedUntilActive(self) -> None:
        """
        A disk made for a guest migrating in has its vdi prepared and its
        vbd plugged, not active: the backend waits in InitWait, no hotplug
        script reported, the guest's frontend does not connect. Activated,
        it connects; deactivated, the vdi is inactive; cancelled, the tree
        is as before.
        """
        devices = await self.describedThenDetached()
        before = await self.tree()
        (made,) = await self.storage.prepareIncoming(6, devices, "src")
        self.assertEqual((made.devid, made.mode, made.token), (51728, RW, 0))
        await self.agentsIdle()
        dd = self.manager.driverDomain(0)
        vdi = "vbd-6-51728"
        self.assertEqual((await dd.describe(vdi)).state, "inactive")
        backend = "/local/domain/0/backend/vbd/6/51728"
        front = "/local/domain/6/device/vbd/51728"
        # The simulated blkback binds (InitWait) and the frontend answers
        # (Initialised); then nothing: blkback waits for the hotplug script.
        await waitForState(self.xs, backend, 2, 10)
        await waitForState(self.xs, front, 3, 10)
        await self.agentsIdle()
        self.assertIsNone(await self.xs.readOrNone(f"{backend}/hotplug-status"))
        self.assertEqual(await self.xs.read(f"{backend}/state"), "2")
        self.assertEqual(await self.xs.read(f"{front}/state"), "3")
        await self.storage.activate(6, [made])
        await waitForState(self.xs, front, 4, 10)
        self.assertEqual((await dd.describe(vdi)).state, "active")
        await self.storage.deactivate(6, [made])
        self.assertEqual((await dd.describe(vdi)).state, "inactive")
        await self.storage.cancel(6, [made])
        await self.assertTreeIs(before)

    async def test_failedPrepareLeavesNothing(self) -> None:
        """One disk cannot be made (its image is missing): none is left, the tree as before."""
        devices = await self.describedThenDetached()
        missing = {"spec": "vdev=xvdc, access=rw, format=raw, target=/nonexistent/xenddev.img"}
        devices.append(MigratingDevice("vbd", 51744, missing))
        before = await self.tree()
        e = await self.assertFails(self.storage.prepareIncoming(6, devices, "src"), XenddevError)
        self.assertIn("xvdc", str(e))
        # The other disk was made, then detached.
        self.assertIn(("detach", "vbd", 51728), self.operations)
        await self.assertTreeIs(before)


class EmbeddedDomainStorageTests(DomainStorageSuite, EmbeddedXenstoredFixture, TestCase):
    """On the embedded xenstored."""


class RpcAndCliTests(TestCase):
    """migrate.*'s checks and the CLI's, without a daemon."""

    async def test_withoutPoolFault19(self) -> None:
        """Every migrate.* method of a daemon without a pool is fault 19, saying what is missing."""

        class Service:
            manager = None

        namespace = MigrateNamespace(Service(), None)  # type: ignore[arg-type]
        with self.assertRaises(xmlrpc.client.Fault) as caught:
            await namespace.xmlrpc_list()
        self.assertEqual(caught.exception.faultCode, 19)
        self.assertIn("pool.advertise", caught.exception.faultString)

    async def test_argumentsNamed(self) -> None:
        """A bad host or source domain is refused naming the argument, before the pool is asked."""

        class Service:
            manager = None

        namespace = MigrateNamespace(Service(), None)  # type: ignore[arg-type]
        for args, code, named in (
            (("bad host", 5, 5), 10, "source"),
            (("h1", 99999, 5), 3, "source domain id"),
            (("h1", "no/slash", 5), 10, "source domain"),
        ):
            with self.assertRaises(xmlrpc.client.Fault) as caught:
                await namespace.xmlrpc_prepare(*args)
            self.assertEqual(caught.exception.faultCode, code, args)
            self.assertIn(named, caught.exception.faultString)
        self.assertEqual(checkRemoteDomain("guest-1"), "guest-1")
        self.assertEqual(checkRemoteDomain("7"), 7)
        self.assertEqual(checkHost("h-1.pool", "x"), "h-1.pool")

    def test_cliChecksHost(self) -> None:
        """migrate-prepare refuses a bad --from (exit 4, naming it) without asking the daemon."""
        out, err = io.StringIO(), io.StringIO()
        code = cli.main(
            ["migrate-prepare", "5", "--from", "bad host", "--socket", "/nonexistent/sock"],
            stdout=out,
            stderr=err,
        )
        self.assertEqual(code, 4)
        self.assertIn("--from 'bad host'", err.getvalue())

    def test_cliText(self) -> None:
        """The text of a committed migration names each disk's new token and the window."""
        text = cli.migrationText(
            {
                "domain": 5,
                "from": "h1",
                "state": "committed",
                "devices": [{"class": "vbd", "devid": 51728, "target": TARGET, "mode": "rw"}],
                "moved": {TARGET: "42"},
                "timings-ms": {"window": 12.5, "release": 3, "handover": 4, "activate": 5.5},
            }
        )
        self.assertIn("guest 5 from host h1: committed", text)
        self.assertIn(f"vbd 51728  {TARGET}  rw  token 42", text)
        self.assertIn("handover window 12.5 ms", text)
