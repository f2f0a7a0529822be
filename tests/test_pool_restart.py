"""
A pool host's daemon restarted adopts its predecessor's lease while it
lives (xenddev.pool.session, xenddev.poolmember, xenddev.poolleasefile,
the fence watchdog's handover in xenddev.fencewatchdog and
xenddev.poolwatchdog):

  - the session on task.Clock with the in-memory etcd: a live lease whose
    membership key is this host's is adopted (same lease, same token, no
    grant, the deadline from the first keepalive, the keys under it held);
    an expired one, another lease's key, a TTL below the self-fence are
    not (a join as before); a late keepalive is sent again; what nothing
    claims again is deleted; a stop while adopting revokes nothing;
  - the membership on task.Clock: the record (mode 0600, host, lease,
    cluster) written at a join, kept at a stop holding activations,
    removed at one holding none; adopted by the next membership of the
    same run directory; not when it names another host or cluster, is
    writable by others, or a predecessor still holds its lock;
  - the watchdog on a clock: its daemon's pipe closed, it keeps the
    deadline; a successor adopts before it (nothing paused, its answer
    lists what earlier watchdogs paused), is watched (killed if it
    stalls), releases it with a disarm; a successor gone leaves it
    waiting; refusals; the link's handover over a real UNIX socket;
  - daemons (C{twistd -n xenddev}) on a xenstored of their own (which
    outlives them), serving a qcow2 image through a qemu-storage-daemon,
    on the shared etcd: stopped with SIGTERM and started again, then
    killed with SIGKILL and started again within the fence deadline:
    each time the same lease and token, the export never gone (QMP
    polled throughout), no watchdog state, and another host refused the
    image all along. The restart after the lease expired (a join, the
    targets taken back, the paused export resumed) is
    tests.test_pool_fencewatchdog.KilledDaemonTests.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
import xmlrpc.client
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import UNIXClientEndpoint, connectProtocol
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import StringTransport
from twisted.internet.threads import deferToThread
from twisted.protocols.basic import LineOnlyReceiver
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from tests.support.etcdcluster import SHARED, report
from tests.support.fakeetcd import FakeEtcd
from tests.support.host import (
    WatchedProcess,
    pythonEnv,
    shortTempDir,
    spawnTwistd,
    stopProcess,
)
from tests.test_pool_daemon import GUEST, PoolHostsMixin
from tests.test_xmlrpc import blockingCall
from xenddev.backendctrl.records import DataPath
from xenddev.datapath.quiesce import DataPathControl
from xenddev.fencewatchdog import (
    FenceWatchdog,
    SuccessorConnection,
    dataPathFromJSON,
    dataPathToJSON,
    readState,
)
from xenddev.pool import etcdwire as wire
from xenddev.pool.errors import HostNameInUse
from xenddev.pool.etcd import EtcdClient
from xenddev.pool.keys import activeKey, hostKey, migrationKey
from xenddev.pool.session import FENCED, LIVE, STOPPED, HostSession
from xenddev.poolfence import DataPathFence
from xenddev.poolleasefile import (
    LEASE_FILE,
    LEASE_LOCK,
    LeaseRecord,
    LeaseRecordLock,
    UntrustedLeaseRecord,
    readLeaseRecord,
    writeLeaseRecord,
)
from xenddev.poolmember import PoolMembership
from xenddev.poolwatchdog import HANDOVER_SOCKET, STATE_FILE, WatchdogLink
from xenddev.qmp import connectQMP
from xenddev.xenbus import waitForState
from xenddev.xenstore.connection import connectXenStore

KEY = activeKey("file:/srv/a.img")
OTHER = activeKey("file:/srv/b.img")
INTENT = migrationKey("file:/srv/c.img")


class SessionAdoptionTests(SynchronousTestCase):
    """L{HostSession} adopting a lease, on a clock: TTL 10 s, self-fence 4 s."""

    def setUp(self) -> None:
        """A predecessor's session of h1 holding two activations and an intent, stopped."""
        self.clock = Clock()
        self.clock.advance(100)
        self.etcd = FakeEtcd()
        old = HostSession(self.etcd, self.clock, "h1", ttl=10, fenceAfter=4.0)
        self.successResultOf(old.start())
        for key in (KEY, OTHER, INTENT):
            self.successResultOf(self.etcd.put(key, b"{}", old.lease))
        self.token = self.etcd.kvs[KEY].modRevision
        self.successResultOf(old.stop(revoke=False))
        self.old = old
        self.clock.advance(2)

    def session(self, fenceAfter: float = 4.0, adopt: int | None = None) -> HostSession:
        """A new session of h1 adopting the predecessor's lease (unless told another)."""
        return HostSession(
            self.etcd,
            self.clock,
            "h1",
            ttl=10,
            fenceAfter=fenceAfter,
            adopt=self.old.lease if adopt is None else adopt,
        )

    def test_adopts(self) -> None:
        """
        A live lease whose membership key is this host's: adopted — the
        same lease, token and TTL, no lease granted, its keys held (and
        reported lost with it), the record's pid written again under it;
        the self-fence runs from the adoption's keepalive, not before.
        """
        leases = dict(self.etcd.leases)
        new = self.session()
        fences: list[float] = []
        self.successResultOf(new.start())
        new.onFence(lambda: fences.append(self.clock.seconds()))
        self.addCleanup(new.stop, False)
        self.assertTrue(new.adopted)
        self.assertEqual((new.state, new.lease, new.ttl), (LIVE, self.old.lease, 10))
        self.assertEqual(new.token, self.old.token)
        self.assertEqual(self.etcd.leases, leases)
        self.assertEqual(self.etcd.keepAlives, [self.old.lease])
        self.assertEqual(new.held, {KEY, OTHER, INTENT})
        self.assertEqual(new.inherited, {KEY, OTHER, INTENT})
        self.assertEqual(self.etcd.kvs[KEY].modRevision, self.token)
        kv = self.etcd.kvs[hostKey("h1")]
        self.assertEqual((kv.lease, kv.createRevision), (self.old.lease, self.old.token))
        self.assertEqual(json.loads(kv.value)["pid"], os.getpid())
        self.assertEqual(new.lastRenewal, 102)
        self.etcd.keepAliveMode = "hang"
        self.clock.pump([0.5] * 7)
        self.assertEqual(fences, [])
        self.clock.advance(0.5)
        self.assertEqual((fences, new.state), ([106.0], FENCED))

    def test_lostWithTheLease(self) -> None:
        """The adopted lease expiring reports its inherited keys lost."""
        new = self.session()
        lost: list[frozenset[bytes]] = []
        new.onLost(lost.append)
        self.successResultOf(new.start())
        self.addCleanup(new.stop, False)
        self.etcd.expire(new.lease)
        self.clock.advance(1)
        self.assertEqual(lost, [{KEY, OTHER, INTENT}])

    def test_expired(self) -> None:
        """An expired lease is not adopted: the session joins under a new one."""
        self.etcd.expire(self.old.lease)
        new = self.session()
        self.successResultOf(new.start())
        self.addCleanup(new.stop, False)
        self.assertFalse(new.adopted)
        self.assertNotEqual(new.lease, self.old.lease)
        self.assertEqual(new.held, frozenset())

    def test_anotherLeasesKey(self) -> None:
        """
        A lease that is alive but does not hold this host's key (a record
        of another cluster, say) is not renewed at all; the join is then
        refused while the host's key lives.
        """
        stranger = self.successResultOf(self.etcd.grantLease(10))
        new = self.session(adopt=stranger.id)
        self.failureResultOf(new.start(), HostNameInUse)
        self.assertFalse(new.adopted)
        self.assertEqual(self.etcd.keepAlives, [])

    def test_ttlBelowTheFence(self) -> None:
        """A lease whose TTL is not above this session's self-fence deadline is not adopted."""
        new = HostSession(
            self.etcd, self.clock, "h1", ttl=20, fenceAfter=12.0, adopt=self.old.lease
        )
        self.failureResultOf(new.start(), HostNameInUse)
        self.assertEqual(self.etcd.keepAlives, [])

    def test_lateKeepalive(self) -> None:
        """A keepalive answered after its own deadline does not count: another is sent."""
        self.etcd.keepAliveMode = "hang"
        new = self.session()
        d = new.start()
        self.clock.advance(5)
        self.etcd.keepAliveMode = "ok"
        self.etcd.answerHanging()
        self.successResultOf(d)
        self.addCleanup(new.stop, False)
        self.assertEqual(len(self.etcd.keepAlives), 2)
        self.assertEqual(new.lastRenewal, 107)

    def test_stopWhileAdopting(self) -> None:
        """A session stopped before its adoption finished leaves the lease alone."""
        self.etcd.keepAliveMode = "hang"
        new = self.session()
        d = new.start()
        new.stop()
        self.etcd.keepAliveMode = "ok"
        self.etcd.answerHanging()
        self.successResultOf(d)
        self.assertEqual(new.state, STOPPED)
        self.assertEqual(self.etcd.revoked, [])
        self.assertIn(self.old.lease, self.etcd.leases)

    def test_dropUnclaimed(self) -> None:
        """
        What the daemon claimed again stays; the rest under the adopted
        lease is deleted (only while under it) and no longer held.
        """
        new = self.session()
        self.successResultOf(new.start())
        self.addCleanup(new.stop, False)
        new.hold(KEY)
        self.assertEqual(new.inherited, {OTHER, INTENT})
        dropped = self.successResultOf(new.dropUnclaimed())
        self.assertEqual(dropped, sorted([OTHER, INTENT]))
        self.assertNotIn(OTHER, self.etcd.kvs)
        self.assertNotIn(INTENT, self.etcd.kvs)
        self.assertEqual(self.etcd.kvs[KEY].lease, new.lease)
        self.assertEqual((new.held, new.inherited), ({KEY}, frozenset()))


class _Status:
    """An etcd whose status names a cluster."""

    def __init__(self, etcd: FakeEtcd, cluster: int) -> None:
        self.cluster = cluster
        self._status = etcd.status
        etcd.status = self  # type: ignore[method-assign]

    def __call__(self) -> Deferred[wire.MemberStatus]:
        d: Deferred[wire.MemberStatus] = Deferred()
        d.callback(wire.MemberStatus(1, 1, "3.4.23", 1, self.cluster))
        return d


class MembershipRestartTests(SynchronousTestCase):
    """L{PoolMembership} with a run directory, on a clock: TTL 10 s, self-fence 4 s."""

    def setUp(self) -> None:
        """A fake etcd of cluster 0xc1, a fence over nothing, a run directory."""
        self.clock = Clock()
        self.etcd = FakeEtcd()
        self.status = _Status(self.etcd, 0xC1)
        self.fence = DataPathFence(DataPathControl(None, {}))
        self.rundir = self.mktemp()
        os.makedirs(self.rundir)
        self.record = os.path.join(self.rundir, LEASE_FILE)

    def member(self, host: str = "h1") -> PoolMembership:
        """A membership of C{host} in the run directory."""
        member = PoolMembership(
            self.clock,
            host,
            ("http://fake",),
            10,
            4.0,
            1.0,
            5.0,
            self.fence,
            self.etcd,
            rundir=self.rundir,
        )
        self.addCleanup(lambda: Deferred.fromCoroutine(member.stop()))
        return member

    def started(self, host: str = "h1", held: bool = True) -> PoolMembership:
        """A membership joined (holding an activation unless told not), then stopped."""
        member = self.member(host)
        self.successResultOf(Deferred.fromCoroutine(member.start()))
        assert member.session is not None
        if held:
            self.successResultOf(self.etcd.put(KEY, b"{}", member.session.lease))
            member.session.hold(KEY)
        self.lease, self.token = member.session.lease, member.session.token
        self.successResultOf(Deferred.fromCoroutine(member.stop()))
        return member

    def test_recorded(self) -> None:
        """
        A join records host, lease and cluster (mode 0600); a stop holding
        activations keeps the record (and the lease), one holding none
        revokes the lease and removes it.
        """
        member = self.member()
        self.successResultOf(Deferred.fromCoroutine(member.start()))
        assert member.session is not None
        self.assertEqual(stat.S_IMODE(os.stat(self.record).st_mode), 0o600)
        record = readLeaseRecord(self.record)
        self.assertEqual(record, LeaseRecord("h1", member.session.lease, 0xC1, os.getpid()))
        self.successResultOf(Deferred.fromCoroutine(member.stop()))
        self.assertFalse(os.path.exists(self.record))
        self.started()
        self.assertEqual(
            readLeaseRecord(self.record), LeaseRecord("h1", self.lease, 0xC1, os.getpid())
        )
        self.assertIn(self.lease, self.etcd.leases)

    def test_rejoinRecorded(self) -> None:
        """A rejoin under a new lease records that one."""
        self.fence.fence = lambda: Deferred()  # type: ignore[method-assign]  # no data paths
        member = self.member()
        self.successResultOf(Deferred.fromCoroutine(member.start()))
        assert member.session is not None
        first = member.session.lease
        self.etcd.expire(first)
        self.clock.advance(1)
        self.assertEqual(member.session.state, LIVE)
        self.assertNotEqual(member.session.lease, first)
        record = readLeaseRecord(self.record)
        assert record is not None
        self.assertEqual(record.lease, member.session.lease)

    def test_restartAdopts(self) -> None:
        """The next membership of the run directory adopts the live lease it recorded."""
        self.started()
        member = self.member()
        self.successResultOf(Deferred.fromCoroutine(member.start()))
        session = member.session
        assert session is not None
        self.assertTrue(session.adopted)
        self.assertEqual((session.lease, session.token), (self.lease, self.token))
        self.assertEqual(session.held, {KEY})
        self.assertEqual(self.successResultOf(member.dropUnclaimed()), [KEY])

    def test_notAdopted(self) -> None:
        """
        A record of another cluster, of another host, or that others may
        write is not adopted: the host waits for the lease to expire, then
        joins anew.
        """
        for spoil in ("cluster", "host", "mode"):
            self.started()
            if spoil == "cluster":
                self.status.cluster = 0xC2
            elif spoil == "host":
                writeLeaseRecord(self.record, LeaseRecord("h2", self.lease, 0xC1))
            else:
                os.chmod(self.record, 0o622)
            member = self.member()
            d = Deferred.fromCoroutine(member.start())
            self.clock.pump([0.25] * 8)
            self.assertNoResult(d)
            self.etcd.expire(self.lease)
            self.clock.advance(0.25)
            self.successResultOf(d)
            assert member.session is not None
            self.assertFalse(member.session.adopted, spoil)
            self.assertNotEqual(member.session.lease, self.lease)
            self.successResultOf(Deferred.fromCoroutine(member.stop()))
            self.status.cluster = 0xC1

    def test_predecessorStillRuns(self) -> None:
        """
        While another daemon holds the record's lock (still running or
        stopping) its lease is not adopted; once the lock is free it is.
        """
        self.started()
        predecessor = LeaseRecordLock(os.path.join(self.rundir, LEASE_LOCK))
        self.assertTrue(predecessor.acquire())
        member = self.member()
        d = Deferred.fromCoroutine(member.start())
        self.clock.pump([0.25] * 4)
        self.assertNoResult(d)
        predecessor.release()
        self.clock.advance(0.25)
        self.successResultOf(d)
        assert member.session is not None
        self.assertTrue(member.session.adopted)
        self.assertEqual(member.session.lease, self.lease)

    def test_recordFile(self) -> None:
        """
        Written atomically over anything (mode 0600); read back; refused
        when a symbolic link, or not a record.
        """
        with open(self.record + ".tmp", "w") as f:
            f.write("left over")
        os.chmod(self.record + ".tmp", 0o666)
        writeLeaseRecord(self.record, LeaseRecord("h1", 0x1234, 0xFFFF_FFFF_FFFF_FFFF, 7))
        self.assertEqual(stat.S_IMODE(os.stat(self.record).st_mode), 0o600)
        self.assertEqual(
            readLeaseRecord(self.record), LeaseRecord("h1", 0x1234, 0xFFFF_FFFF_FFFF_FFFF, 7)
        )
        link = os.path.join(self.rundir, "link.json")
        os.symlink(self.record, link)
        self.assertRaises(UntrustedLeaseRecord, readLeaseRecord, link)
        for bad in ('{"host": "h1"}', '{"host": 1, "lease": "1", "cluster": "0"}', "[]", "x"):
            with open(self.record, "w") as f:
                f.write(bad)
            self.assertRaises(UntrustedLeaseRecord, readLeaseRecord, self.record)
        self.assertIsNone(readLeaseRecord(os.path.join(self.rundir, "none.json")))

    def test_clusterId(self) -> None:
        """A member's status carries the cluster's id (from the answer's header)."""
        status = wire.MemberStatus.fromJSON(
            {
                "header": {"cluster_id": "14841639068965178418", "member_id": "9"},
                "leader": "9",
                "version": "3.4.23",
                "raftTerm": "2",
            }
        )
        self.assertEqual((status.memberId, status.clusterId), (9, 14841639068965178418))


def _dp(vdi: str, pid: int = 40) -> DataPath:
    """A qemu data path's record."""
    return DataPath(0, vdi, "qemu", "h", f"/srv/{vdi}.qcow2", "qcow2", pid=pid, qmp=f"/{vdi}")


class _Pauser:
    """Records pauses."""

    def __init__(self) -> None:
        self.paused: list[str] = []

    def pause(self, dp: DataPath) -> Deferred[None]:
        """Pause at once."""
        self.paused.append(dp.vdi)
        d: Deferred[None] = Deferred()
        d.callback(None)
        return d

    def resume(self, dp: DataPath, reload: bool) -> None:
        """Not used by the watchdog."""


class _Port:
    """A listening port that records being stopped."""

    stopped = False

    def stopListening(self) -> None:
        """Stop."""
        self.stopped = True


class HandoverLogicTests(SynchronousTestCase):
    """L{FenceWatchdog}'s handover on a clock: the daemon's pipe closed, a successor."""

    def setUp(self) -> None:
        """A watchdog told lease 0xabc, a deadline 2 s ahead and two paths, its pipe closed."""
        self.clock = Clock()
        self.clock.advance(1000)
        self.kills: list[tuple[int, int]] = []
        self.pauser = _Pauser()
        self.ports: list[_Port] = []
        os.makedirs(self.mktemp())
        self.state = os.path.join(self.mktemp(), "state.json")
        os.makedirs(os.path.dirname(self.state))
        self.watchdog = FenceWatchdog(
            self.clock,
            {"qemu": self.pauser},
            self.state,
            4242,
            kill=lambda pid, sig: self.kills.append((pid, sig)),
            monotonic=self.clock.seconds,
            pauseTimeout=1.0,
            listen=self.listen,
        )
        self.watchdog.message(
            {
                "lease": 0xABC,
                "paths": [dataPathToJSON(_dp("a")), dataPathToJSON(_dp("b"))],
                "paused": [dataPathToJSON(_dp("old"))],
                "until": self.clock.seconds() + 2,
            }
        )

    def listen(self) -> _Port:
        """The handover socket, as a stand-in."""
        self.ports.append(_Port())
        return self.ports[-1]

    def test_adoptedInTime(self) -> None:
        """
        The pipe closes: the watchdog listens and waits. A successor adopts
        before the deadline: nothing is paused past the old deadline, the
        answer lists what earlier watchdogs paused; the successor's
        messages move the deadline; its disarm and close end the watchdog
        without a pause, a kill or a state file, the socket gone.
        """
        self.watchdog.inputClosed()
        self.assertTrue(self.watchdog.orphaned)
        self.assertEqual(len(self.ports), 1)
        self.clock.advance(1.5)
        answer = self.watchdog.adopt(0xABC, self.clock.seconds() + 2, 777)
        self.assertTrue(answer["adopted"])
        self.assertEqual([dataPathFromJSON(d).vdi for d in answer["paused"]], ["old"])
        self.assertEqual(self.watchdog.successor, 777)
        self.clock.advance(1.5)
        self.watchdog.message({"until": self.clock.seconds() + 2})
        self.clock.advance(1.5)
        self.watchdog.message({"disarm": True})
        self.watchdog.successorGone()
        self.clock.advance(10)
        self.assertTrue(self.watchdog.done.called)
        self.assertEqual((self.pauser.paused, self.kills), ([], []))
        self.assertIsNone(readState(self.state))
        self.assertTrue(self.ports[0].stopped)

    def test_noSuccessor(self) -> None:
        """Nobody adopts: the data paths are paused at the deadline, nobody killed."""
        self.watchdog.inputClosed()
        self.clock.advance(1.9)
        self.assertEqual(self.pauser.paused, [])
        self.clock.advance(0.1)
        self.assertEqual((self.pauser.paused, self.kills), (["a", "b"], []))
        self.assertTrue(self.ports[0].stopped)
        refused = self.watchdog.adopt(0xABC, self.clock.seconds() + 2, 777)
        self.assertIn("has acted", refused["refused"])

    def test_successorStalls(self) -> None:
        """A successor that adopted and then says nothing past its deadline is killed first."""
        self.watchdog.inputClosed()
        self.watchdog.adopt(0xABC, self.clock.seconds() + 3, 777)
        self.clock.advance(2.9)
        self.assertEqual(self.kills, [])
        self.clock.advance(0.1)
        self.assertEqual(self.kills, [(777, signal.SIGKILL)])
        self.assertEqual(self.pauser.paused, ["a", "b"])

    def test_successorGone(self) -> None:
        """
        A successor gone without a disarm (it died): the watchdog waits
        again for its deadline, and another successor may adopt meanwhile.
        """
        self.watchdog.inputClosed()
        self.watchdog.adopt(0xABC, self.clock.seconds() + 3, 777)
        self.watchdog.successorGone()
        self.assertIsNone(self.watchdog.successor)
        self.assertTrue(self.watchdog.adopt(0xABC, self.clock.seconds() + 3, 778)["adopted"])
        self.watchdog.successorGone()
        self.clock.advance(3)
        self.assertEqual((self.pauser.paused, self.kills), (["a", "b"], []))

    def test_refused(self) -> None:
        """
        No adoption while the daemon's pipe is open, of another lease, or
        by a second successor at once.
        """
        self.assertIn("still watches", self.watchdog.adopt(0xABC, 2000, 777)["refused"])
        self.watchdog.inputClosed()
        self.assertIn("not the one watched", self.watchdog.adopt(0xABD, 2000, 777)["refused"])
        self.assertTrue(self.watchdog.adopt(0xABC, 2000, 777)["adopted"])
        self.assertIn("still watches", self.watchdog.adopt(0xABC, 2000, 778)["refused"])

    def test_fencedThenClosed(self) -> None:
        """A daemon that had fenced itself (no deadline) and went: paused at once."""
        self.watchdog.message({"fenced": True})
        self.watchdog.inputClosed()
        self.assertEqual(self.pauser.paused, ["a", "b"])
        self.assertEqual(self.ports, [])

    def test_carried(self) -> None:
        """What an earlier watchdog's unread state held is written again with the new pauses."""
        self.watchdog.carried = [_dp("older")]
        self.watchdog.inputClosed()
        self.clock.advance(2)
        state = readState(self.state)
        assert state is not None
        self.assertEqual([dp.vdi for dp in state["paused"]], ["older", "old", "a", "b"])

    def test_connection(self) -> None:
        """
        A successor's connection: its adoption answered (its pid from the
        socket's credentials), then its messages; its end noticed; another
        user's refused and closed.
        """
        self.watchdog.inputClosed()
        transport = StringTransport()
        connection = SuccessorConnection(self.watchdog, lambda t: (777, os.geteuid()))
        connection.makeConnection(transport)
        until = self.clock.seconds() + 3
        connection.dataReceived(b'{"adopt": %d, "until": %f}\n' % (0xABC, until))
        self.assertTrue(json.loads(transport.value())["adopted"])
        self.assertEqual(self.watchdog.successor, 777)
        connection.dataReceived(b'{"until": %f}\n' % (until + 5))
        self.clock.advance(4)
        self.assertEqual(self.kills, [])
        connection.connectionLost()
        self.assertIsNone(self.watchdog.successor)
        stranger = StringTransport()
        other = SuccessorConnection(self.watchdog, lambda t: (778, os.geteuid() + 1))
        other.makeConnection(stranger)
        other.dataReceived(b'{"adopt": %d, "until": %f}\n' % (0xABC, until))
        self.assertIn("uid", json.loads(stranger.value())["refused"])
        self.assertTrue(stranger.disconnecting)


class _AdoptedSession:
    """What the link reads of a session that adopted lease 0xabc."""

    ttl, fenceAfter, renewEvery = 3, 1.0, 0.25
    state = LIVE
    lease = 0xABC
    adopted = True
    held: frozenset[bytes] = frozenset()

    @property
    def safeUntil(self) -> float:
        """A deadline one self-fence from now."""
        return float(reactor.seconds()) + self.fenceAfter  # type: ignore[attr-defined]


class LinkHandoverTests(TestCase):
    """L{WatchdogLink}'s handover with a real watchdog's logic on a real UNIX socket."""

    async def test_handOver(self) -> None:
        """
        The link of a daemon that adopted the lease asks the waiting
        watchdog over its socket: taken on (this process's pid), what it
        had paused handed over; released with a disarm, it ends without
        pausing anything. Without a waiting watchdog there is none.
        """
        rundir = shortTempDir(self, "xho-")
        pauser = _Pauser()
        watchdog = FenceWatchdog(
            reactor,
            {"qemu": pauser},
            os.path.join(rundir, STATE_FILE),
            4242,
            kill=lambda pid, sig: self.fail("killed"),
            pauseTimeout=1.0,
            listen=lambda: reactor.listenUNIX(  # type: ignore[attr-defined]
                os.path.join(rundir, HANDOVER_SOCKET),
                _factory(watchdog),
                mode=0o600,
            ),
        )
        link = WatchdogLink(reactor, None, _AdoptedSession(), None, rundir, [0])  # type: ignore[arg-type]
        self.assertIsNone(await link._handOver())
        watchdog.message(
            {
                "lease": 0xABC,
                "paths": [dataPathToJSON(_dp("a"))],
                "paused": [dataPathToJSON(_dp("old"))],
                "until": time.monotonic() + 5,
            }
        )
        watchdog.inputClosed()
        self.assertEqual(
            stat.S_IMODE(os.stat(os.path.join(rundir, HANDOVER_SOCKET)).st_mode), 0o600
        )
        paused = await link._handOver()
        self.assertEqual([dp.vdi for dp in paused or []], ["old"])
        self.assertEqual(watchdog.successor, os.getpid())
        self.assertTrue(link.handedOver)
        link._releasePredecessor()
        await watchdog.done
        self.assertEqual(pauser.paused, [])
        self.assertIsNone(watchdog.reason)
        await deferLater(reactor, 0, lambda: None)
        self.assertFalse(os.path.exists(os.path.join(rundir, HANDOVER_SOCKET)))


class WatchdogProcessTests(TestCase):
    """C{python -m xenddev.fencewatchdog} as a process of its own."""

    async def test_daemonGoneAtItsBirth(self) -> None:
        """
        A watchdog whose daemon went before it had even started (its
        standard output closed before it could say C{locking}, its input
        at its end) still takes its lock, waits on its handover socket
        (mode 0600), carries an earlier watchdog's unread state in its
        answer, and exits without pausing once a successor adopted the
        lease and disarmed it.
        """
        rundir = shortTempDir(self, "xwdp-")
        state = os.path.join(rundir, STATE_FILE)
        handover = os.path.join(rundir, HANDOVER_SOCKET)
        with open(state, "w") as f:
            json.dump({"reason": "earlier", "paused": [dataPathToJSON(_dp("older"))]}, f)
        bystander = subprocess.Popen(["sleep", "60"])  # the "daemon": nobody may kill it
        self.addCleanup(bystander.wait)
        self.addCleanup(bystander.kill)
        watchdog = subprocess.Popen(
            [
                sys.executable,
                *("-m", "xenddev.fencewatchdog", "--state", state),
                *("--daemon-pid", str(bystander.pid), "--pause-timeout", "1"),
                *("--handover", handover),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=pythonEnv(),
        )
        self.addCleanup(lambda: Deferred.fromCoroutine(stopProcess(watchdog, 1.0)))
        assert watchdog.stdin is not None and watchdog.stdout is not None
        until = time.monotonic() + 60
        watchdog.stdin.write(b'{"lease": 2748, "paths": [], "until": %f}\n' % until)
        watchdog.stdin.close()
        watchdog.stdout.close()
        deadline = time.monotonic() + 20
        while not os.path.exists(handover):
            self.assertIsNone(watchdog.poll(), "the watchdog ended")
            self.assertLess(time.monotonic(), deadline, "no handover socket")
            await deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(stat.S_IMODE(os.stat(handover).st_mode), 0o600)
        link = await connectProtocol(UNIXClientEndpoint(reactor, handover), _Lines())
        link.sendLine(b'{"adopt": 2748, "until": %f}' % until)
        answer = await link.answer
        self.assertTrue(answer["adopted"], answer)
        self.assertEqual([dataPathFromJSON(d).vdi for d in answer["paused"]], ["older"])
        link.sendLine(b'{"disarm": true}')
        link.transport.loseConnection()
        while watchdog.poll() is None:
            self.assertLess(time.monotonic(), deadline, "the watchdog did not exit")
            await deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(watchdog.returncode, 0)
        self.assertIsNone(bystander.poll())
        self.assertEqual(readState(state)["reason"], "earlier")  # type: ignore[index]
        self.assertFalse(os.path.exists(handover))


class _Lines(LineOnlyReceiver):
    """A client of the handover socket: C{answer} fires with the first line."""

    delimiter = b"\n"

    def __init__(self) -> None:
        self.answer: Deferred[dict[str, Any]] = Deferred()

    def lineReceived(self, line: bytes) -> None:
        """The watchdog's answer."""
        if not self.answer.called:
            self.answer.callback(json.loads(line))


def _factory(watchdog: FenceWatchdog) -> Any:
    """The handover socket's factory."""
    from twisted.internet.protocol import Factory

    return Factory.forProtocol(lambda: SuccessorConnection(watchdog))


# --- daemons restarted --------------------------------------------------------------

#: The lease and the fence deadline of the restarted daemons: a restart must
#: adopt before the fence watchdog's deadline (the last renewal plus
#: FENCE_AFTER plus half of TTL - FENCE_AFTER).
TTL = 6
FENCE_AFTER = 4.0


class _Daemon(WatchedProcess):
    """A daemon's output; C{ready} on its ready line."""

    readyLine = b"xenddev ready"


class _Xenstored(WatchedProcess):
    """The xenstored's output."""


class _ExportWatch:
    """
    Polls a qemu-storage-daemon's exports over QMP until stopped: whether
    they were ever gone (a pause deletes the export).
    """

    def __init__(self, qmp: str, every: float = 0.05) -> None:
        self.qmp = qmp
        self.every = every
        self.polls = 0
        self.gone: list[float] = []
        self._stopped = False
        self.done = Deferred.fromCoroutine(self._run())

    async def _run(self) -> None:
        while not self._stopped:
            client = await connectQMP(reactor, self.qmp, 5.0)
            try:
                if not list(await client.execute("query-block-exports")):
                    self.gone.append(time.monotonic())
            finally:
                await client.close()
            self.polls += 1
            await deferLater(reactor, self.every, lambda: None)

    async def stop(self) -> None:
        """Stop polling."""
        self._stopped = True
        await self.done


def _locked(path: str) -> bool:
    """Whether another process holds the C{flock} on C{path}."""
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


class DaemonRestartTests(PoolHostsMixin, TestCase):
    """A host's daemon serving a qemu data path, restarted, on the shared etcd."""

    async def startDaemon(self) -> _Daemon:
        """C{twistd -n xenddev} of host C{rs-a}, ready."""
        proto = _Daemon()
        self.process = spawnTwistd(self, proto, self.base, "xenddev", "--config", self.config)
        await proto.ready
        return proto

    async def oldWatchdogGone(self, run: str) -> None:
        """
        Wait until the previous watchdog has exited (its handover socket
        gone: it can pause nothing any more) and the new one holds the lock.
        """
        deadline = time.monotonic() + TTL
        while os.path.exists(os.path.join(run, HANDOVER_SOCKET)):
            self.assertLess(time.monotonic(), deadline, "the old watchdog did not exit")
            await deferLater(reactor, 0.02, lambda: None)
        lock = os.path.join(run, STATE_FILE + ".lock")
        while not _locked(lock):
            self.assertLess(time.monotonic(), deadline, "the new watchdog took no lock")
            await deferLater(reactor, 0.02, lambda: None)

    async def restart(self, proto: _Daemon, sig: str) -> _Daemon:
        """Signal the daemon and start it again at once; the new one, ready."""
        began = time.monotonic()
        self.process.signalProcess(sig)
        await proto.ended
        stopped = time.monotonic()
        proto = await self.startDaemon()
        report(f"daemon stop ({sig})", stopped - began)
        report(f"restart after {sig} to ready", time.monotonic() - stopped)
        return proto

    async def test_restartAdopts(self) -> None:
        """
        Host rs-a serves a qcow2 image through a qemu-storage-daemon; host
        rs-b wants it. rs-a's daemon stopped with SIGTERM, then killed
        with SIGKILL, each time started again at once: it adopts its
        lease (the same lease, the activation key's token unchanged in
        etcd and in the device's record), the previous watchdog hands
        over without pausing (the export is there at every poll, no
        state file), and rs-b is refused the image throughout.
        """
        if shutil.which("qemu-storage-daemon") is None or shutil.which("qemu-img") is None:
            raise SkipTest("qemu-storage-daemon/qemu-img (qemu-system-common, qemu-utils) missing")
        cluster = await SHARED.get(self)
        self.base = base = shortTempDir(self, "xprs-")
        storeDir = os.path.join(base, "xs")
        os.makedirs(storeDir)
        spawnTwistd(self, _Xenstored(), storeDir, "xenstored", "--rundir", storeDir)
        other = Deferred.fromCoroutine(self.startHost("rs-b", cluster.endpoints))
        socket = os.path.join(storeDir, "socket")
        deadline = time.monotonic() + 10
        while not os.path.exists(socket):
            self.assertLess(time.monotonic(), deadline, "xenstored did not start")
            await deferLater(reactor, 0.05, lambda: None)
        run = os.path.join(base, "run")
        self.config = os.path.join(base, "xenddev.yaml")
        with open(self.config, "w") as f:
            json.dump(
                {
                    "rundir": run,
                    "xenstore": f"unix:{socket}",
                    "driver_domain": {"simulate": "on"},
                    "timeouts": {"shutdown": 2, "connect": 3, "create": 10},
                    "pool": {
                        "endpoints": cluster.endpoints,
                        "host": "rs-a",
                        "ttl": TTL,
                        "fence_after": FENCE_AFTER,
                        "timeout": 0.5,
                    },
                },
                f,
            )
        proto = await self.startDaemon()
        b = await other
        await self.call(b, "device.attach", GUEST, "vif", {})
        rpc = os.path.join(run, "xenddev.sock")
        image = os.path.join(os.path.realpath(base), "rs.qcow2")
        made = await deferToThread(
            subprocess.run,
            ["qemu-img", "create", "-q", "-f", "qcow2", image, "16M"],
            capture_output=True,
        )
        self.assertEqual(made.returncode, 0, made.stderr)
        await deferToThread(blockingCall, rpc, "device.attach", GUEST, "vif", {})
        spec = {"spec": f"format=qcow2, vdev=xvdb, access=rw, target={image}"}
        await deferToThread(blockingCall, rpc, "device.attach", GUEST, "vbd", spec)
        xs = await connectXenStore(reactor, endpoint=UNIXClientEndpoint(reactor, socket))
        self.addCleanup(xs.disconnect)
        await waitForState(xs, f"/local/domain/{GUEST}/device/vbd/51728", 4, 10)
        (dp,) = await deferToThread(blockingCall, rpc, "datapath.list")
        self.assertEqual(dp["kind"], "qemu")
        observer = EtcdClient(reactor, cluster.endpoints, timeout=2)
        self.addCleanup(observer.close)
        key = activeKey(f"file:{image}")
        kv = await observer.get(key)
        assert kv is not None
        lease, token = kv.lease, kv.modRevision
        state = os.path.join(run, STATE_FILE)

        async def refused() -> None:
            answer = await self.attach(b, image, "xvdb")
            self.assertIsInstance(answer, xmlrpc.client.Fault, answer)
            self.assertEqual(answer.faultCode, 12, answer.faultString)
            self.assertIn("on host rs-a", answer.faultString)

        where = await deferToThread(blockingCall, rpc, "pool.where", image)
        self.assertEqual(where["devices"][0]["token"], token)
        for sig in ("TERM", "KILL"):
            watch = _ExportWatch(dp["qmp"])
            proto = await self.restart(proto, sig)
            await refused()
            await self.oldWatchdogGone(run)
            await watch.stop()
            self.assertGreater(watch.polls, 10)
            said = [line for line in proto.output.splitlines() if b"atchdog" in line]
            self.assertEqual(watch.gone, [], f"the export was gone after SIG{sig}: {said}")
            self.assertIn(b"adopted its pool lease", proto.output)
            self.assertIn(b"Fence watchdog handover", proto.output)
            self.assertNotIn(b"watchdog paused", proto.output)
            self.assertFalse(os.path.exists(state))
            kv = await observer.get(key)
            assert kv is not None
            self.assertEqual((kv.lease, kv.modRevision), (lease, token), sig)
            where = await deferToThread(blockingCall, rpc, "pool.where", image)
            self.assertEqual(where["devices"][0]["token"], token)
            await refused()
        # Detached: its qemu-storage-daemon ends, its key goes; the daemon then
        # stops holding nothing, its watchdog disarmed.
        self.assertTrue(
            await deferToThread(blockingCall, rpc, "device.detach", GUEST, "vbd", "xvdb")
        )
        self.assertIsNone(await observer.get(key))
