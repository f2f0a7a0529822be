"""
The pool-wide data-path registry (L{xenddev.pool.datapaths},
L{xenddev.pooldatapaths}) and the pool-wide quiesce and coalesce of
L{xenddev.storagectl.StorageControl}, on fakes and a L{Clock}: the keys and
records; the other hosts seen from etcd; a quiesce across hosts that fails
on one host (the others resumed, the fault naming the host), holds that
expire; the publisher keeping etcd in step with a real embedded store's
registry (register, update, remove, a failed publish retried, a lost lease
and a rejoin, a recovery). The real thing, daemons as hosts on the shared
etcd cluster, is in C{tests.test_pool_datapaths}.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable
from typing import Any, cast

import attrs
from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock, deferLater
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from tests.support.fakeetcd import FakeEtcd
from tests.support.fixtures import EmbeddedXenstoredFixture
from tests.test_datapath import tapRecord
from tests.test_storagectl import RecordingPauser
from xenddev.backendctrl.records import registryDir, updateRecord
from xenddev.datapath import DataPath, DataPathControl
from xenddev.datapath.coalesce import CoalesceError, mergeIntoParent
from xenddev.errors import FaultCode
from xenddev.interfaces import IPoolPeers
from xenddev.pool import etcdwire as wire
from xenddev.pool.datapaths import (
    DATAPATHS,
    PublishedDataPath,
    RecordError,
    datapathKey,
    domainPrefix,
    hostPrefix,
    parseDatapathKey,
)
from xenddev.pool.errors import PoolConfigError
from xenddev.pool.interfaces import IHostSession
from xenddev.pooldatapaths import (
    LOCAL_QUIESCE,
    DataPathPublisher,
    HostQuiesceError,
    PoolDataPaths,
    dataPathFromStruct,
    published,
)
from xenddev.poolpeers import PeerFault, PeerUnavailable
from xenddev.storagectl import (
    IPoolDataPaths,
    IStorageControl,
    MergeConflictError,
    RemoteHold,
    RemoteResumeError,
    StorageControl,
)
from xenddev.xmlrpc import dataPathStruct

BASE = "/srv/pool/base.vhd"
MID = "/srv/pool/mid.vhd"
BOUND = 60.0
PEER_BOUND = 30.0


def captureLog(test: TestCase) -> list[dict[str, Any]]:
    """Collect log events for the rest of the test."""
    events: list[dict[str, Any]] = []
    observer: Any = events.append
    globalLogPublisher.addObserver(observer)
    test.addCleanup(globalLogPublisher.removeObserver, observer)
    return events


def _record(dp: DataPath, host: str) -> tuple[bytes, bytes]:
    entry = published(dp, host, {"via": "daemon", "host": host})
    return entry.key, entry.encode()


class KeyTests(SynchronousTestCase):
    """The keys and records of L{xenddev.pool.datapaths}."""

    def test_keys(self) -> None:
        """A key names host, driver domain and vdi, escaped, and parses back."""
        key = datapathKey("host-a", 3, "vbd-5-51728")
        self.assertEqual(key, DATAPATHS + b"host-a/3/vbd-5-51728")
        self.assertEqual(parseDatapathKey(key), ("host-a", 3, "vbd-5-51728"))
        self.assertTrue(key.startswith(domainPrefix("host-a", 3)))
        self.assertTrue(key.startswith(hostPrefix("host-a")))
        # One host's prefix never covers another's.
        self.assertFalse(datapathKey("host-ab", 3, "v").startswith(hostPrefix("host-a")))
        odd = datapathKey("h", 0, "a/b%c")
        self.assertEqual(parseDatapathKey(odd), ("h", 0, "a/b%c"))
        self.assertEqual(odd.count(b"/"), DATAPATHS.count(b"/") + 2)

    def test_badKeys(self) -> None:
        """Bad host names, domains, vdis and foreign keys are refused."""
        self.assertRaises(PoolConfigError, datapathKey, "no/slash", 0, "v")
        self.assertRaises(RecordError, datapathKey, "h", -1, "v")
        self.assertRaises(RecordError, datapathKey, "h", True, "v")
        self.assertRaises(RecordError, datapathKey, "h", 0, "")
        self.assertRaises(RecordError, parseDatapathKey, b"/xenddev/pool/hosts/h")
        self.assertRaises(RecordError, parseDatapathKey, DATAPATHS + b"h/x/v")

    def test_recordRoundTrip(self) -> None:
        """A record encodes to the same bytes each time and decodes to itself."""
        dp = tapRecord(3, "t0", (MID, BASE), 7)
        entry = published(dp, "host-a", {"via": "daemon", "host": "host-a", "rpc": None})
        again = PublishedDataPath.decode(entry.key, entry.encode())
        self.assertEqual(again, entry)
        self.assertEqual(again.encode(), entry.encode())
        record = json.loads(entry.encode())
        self.assertEqual(
            (record["host"], record["pid"], record["chain"], record["pauser"]["via"]),
            ("host-a", 1007, [MID, BASE], "daemon"),
        )

    def test_garbledRecord(self) -> None:
        """An unreadable value is a RecordError naming the key."""
        key = datapathKey("h", 0, "v")
        for value in (
            b"{",
            b"[]",
            b'{"image": "/x"}',
            b'{"kind": "tap", "image": "/x", "pid": "p"}',
        ):
            e = self.assertRaises(RecordError, PublishedDataPath.decode, key, value)
            self.assertIn("h/0/v", str(e))

    def test_structRoundTrip(self) -> None:
        """A data path sent as an XML-RPC struct is read back equal."""
        dp = attrs.evolve(tapRecord(3, "t0", (MID, BASE), 7), qmp="/run/q")
        self.assertEqual(dataPathFromStruct(dataPathStruct(dp)), dp)


@implementer(IPoolPeers)
class FakePeers:
    """
    The other hosts' daemons: each host's quiesces and resumes recorded;
    C{failures[host]} is raised by its next call (of C{failMethod}, if set).
    """

    timeout = 1.0

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, tuple[Any, ...]]] = []
        self.failures: dict[str, BaseException] = {}
        self.failMethod: str | None = None
        self.held: dict[str, set[str]] = {}
        self.paused: dict[str, list[DataPath]] = {}
        self.resumed: list[tuple[str, str, bool]] = []
        self._next = 0

    def address(self, host: str) -> Deferred[str]:
        """Unused."""
        return succeed(f"http://{host}:1/")

    def call(self, host: str, method: str, *args: Any) -> Deferred[Any]:
        """Record the call; fail as told, else answer as a daemon would."""
        self.calls.append((host, method, args))
        if host in self.failures and self.failMethod in (None, method):
            return fail(self.failures[host])
        if method == LOCAL_QUIESCE:
            self._next += 1
            handle = f"h{self._next}"
            self.held.setdefault(host, set()).add(handle)
            return succeed(
                {
                    "handle": handle,
                    "image": args[0],
                    "paused": [dataPathStruct(dp) for dp in self.paused.get(host, [])],
                    "expires-in": PEER_BOUND,
                    "resume-failures": 0,
                    "peers": [],
                }
            )
        if method == "datapath.resume":
            handle, reload = args
            if handle not in self.held.get(host, set()):
                return fail(PeerFault(host, method, 11, f"no quiesce handle {handle!r}"))
            self.held[host].discard(handle)
            self.resumed.append((host, handle, reload))
            return succeed(True)
        raise AssertionError(f"unexpected call {method}")

    def holding(self) -> dict[str, set[str]]:
        """The handles each host still holds."""
        return {h: set(s) for h, s in self.held.items() if s}


class PoolCoordinationTests(TestCase):
    """L{PoolDataPaths}: the other hosts from etcd, quiesced through their daemons."""

    def setUp(self) -> None:
        self.etcd = FakeEtcd()
        self.peers = FakePeers()
        self.clock = Clock()
        self.pool = PoolDataPaths(self.etcd, "here", self.peers, self.clock)
        self.users = {
            "here": [tapRecord(0, "h0", (MID, BASE), 1)],
            "b": [tapRecord(0, "b0", ("/srv/pool/b.vhd", MID, BASE), 2)],
            "c": [tapRecord(2, "c0", ("/srv/pool/c.vhd", MID, BASE), 3)],
            "d": [tapRecord(0, "d0", ("/srv/pool/d.vhd", BASE), 4)],
        }
        for host, dps in self.users.items():
            for dp in dps:
                key, value = _record(dp, host)
                self.etcd._put(wire.Put(key, value))
                self.peers.paused[host] = [attrs.evolve(dp, host=host) for dp in dps]

    def test_interface(self) -> None:
        """PoolDataPaths provides IPoolDataPaths; the fake peers IPoolPeers."""
        self.assertTrue(verifyObject(IPoolDataPaths, self.pool))
        self.assertTrue(verifyObject(IPoolPeers, self.peers))

    async def test_others(self) -> None:
        """The other hosts' entries (never this host's), by image and by host, naming the host."""
        everyone = await self.pool.others()
        self.assertEqual(
            sorted((dp.host, dp.vdi) for dp in everyone),
            [
                ("b", "b0"),
                ("c", "c0"),
                ("d", "d0"),
            ],
        )
        users = await self.pool.others(MID)
        self.assertEqual(sorted(dp.host for dp in users), ["b", "c"])
        self.assertEqual([dp.vdi for dp in await self.pool.others(None, "c")], ["c0"])
        self.assertEqual(await self.pool.others(None, "nobody"), [])
        (c0,) = await self.pool.others(None, "c")
        self.assertEqual((c0.driverDomid, c0.pid, c0.minor, c0.chain[1]), (2, 1003, 3, MID))

    async def test_garbledEntrySkipped(self) -> None:
        """An entry that cannot be read is logged and skipped; the others still count."""
        events = captureLog(self)
        self.etcd._put(wire.Put(datapathKey("e", 0, "bad"), b"{"))
        self.assertEqual(len(await self.pool.others()), 3)
        self.assertTrue(any("e/0/bad" in str(e.get("error")) for e in events))

    async def test_quiesceEveryHost(self) -> None:
        """
        Each other host using the image is asked once (its local-only
        quiesce); the holds carry its handle, its paused data paths and its
        deadline on this clock.
        """
        self.clock.advance(100)
        holds = await self.pool.quiesce(MID)
        self.assertEqual(
            sorted((h, m, a) for h, m, a in self.peers.calls),
            [("b", LOCAL_QUIESCE, (MID,)), ("c", LOCAL_QUIESCE, (MID,))],
        )
        self.assertEqual([(h.host, h.deadline) for h in holds], [("b", 130.0), ("c", 130.0)])
        self.assertEqual([dp.vdi for h in holds for dp in h.paused], ["b0", "c0"])
        self.assertEqual(holds[0].paused[0].host, "b")
        self.assertEqual(await self.pool.resume(holds, True), [])
        self.assertEqual(self.peers.holding(), {})
        self.assertEqual({r[2] for r in self.peers.resumed}, {True})
        self.assertEqual(await self.pool.quiesce("/srv/nobody.vhd"), [])

    async def test_unreachableHostFailsAndOthersResume(self) -> None:
        """
        One host cannot be reached: the host already paused is resumed
        (without reload), and the fault (16) names the host that failed.
        """
        self.peers.failures["c"] = PeerUnavailable("host c (datapath.quiesceLocal): refused")
        with self.assertRaises(HostQuiesceError) as cm:
            await self.pool.quiesce(MID)
        e = cm.exception
        self.assertEqual((e.host, e.faultCode, e.unresumed), ("c", FaultCode.UNAVAILABLE, []))
        self.assertIn("failed on host c", str(e))
        self.assertEqual(self.peers.holding(), {})
        self.assertEqual([(h, r) for h, _, r in self.peers.resumed], [("b", False)])

    async def test_faultedHostKeepsItsCode(self) -> None:
        """A host that refuses (busy: 12) fails the quiesce with its own code, naming it."""
        self.peers.failures["b"] = PeerFault("b", LOCAL_QUIESCE, 12, "vdi 'b0' is already quiesced")
        with self.assertRaises(HostQuiesceError) as cm:
            await self.pool.quiesce(MID)
        self.assertEqual(
            (cm.exception.host, cm.exception.faultCode), ("b", FaultCode.DEVICE_EXISTS)
        )
        self.assertIn("already quiesced", str(cm.exception))
        self.assertEqual(self.peers.holding(), {})

    async def test_undoThatFailsIsReported(self) -> None:
        """A host that fails its undo too is named as not resumed (its deadline will)."""
        self.peers.failures["c"] = PeerUnavailable("host c: refused")
        original = self.peers.call

        def call(host: str, method: str, *args: Any) -> Deferred[Any]:
            if host == "b" and method == "datapath.resume":
                return fail(PeerUnavailable("host b: gone"))
            return original(host, method, *args)

        self.peers.call = call  # type: ignore[method-assign]
        with self.assertRaises(HostQuiesceError) as cm:
            await self.pool.quiesce(MID)
        self.assertEqual([h.host for h in cm.exception.unresumed], ["b"])
        self.assertIn("NOT resumed on b", str(cm.exception))
        self.flushLoggedErrors()

    async def test_noPeerChannel(self) -> None:
        """Without a peer channel a quiesce needing other hosts is fault 16; none needed: fine."""
        pool = PoolDataPaths(self.etcd, "here", None, self.clock)
        with self.assertRaises(HostQuiesceError) as cm:
            await pool.quiesce(MID)
        self.assertEqual(cm.exception.faultCode, FaultCode.UNAVAILABLE)
        self.assertIn("pool.advertise", str(cm.exception))
        self.assertEqual(await pool.quiesce("/srv/nobody.vhd"), [])

    async def test_resumeOutcomes(self) -> None:
        """
        A hold its host no longer knows (11) is done; an unreachable host
        keeps its hold until that host's own deadline has passed, then it
        is dropped; any other failure keeps it.
        """
        holds = await self.pool.quiesce(MID)
        self.peers.held["b"].clear()  # b's deadline resumed it
        self.peers.failures["c"] = PeerUnavailable("host c: refused")
        kept = await self.pool.resume(holds, True)
        self.assertEqual([h.host for h in kept], ["c"])
        self.clock.advance(PEER_BOUND)
        self.assertEqual(await self.pool.resume(kept, True), [])
        self.peers.failures["c"] = PeerFault("c", "datapath.resume", 18, "tap-ctl: exit 1")
        stuck = RemoteHold("c", "hx", [], 0.0)
        self.assertEqual(await self.pool.resume([stuck], True), [stuck])
        self.flushLoggedErrors()


@attrs.define
class FakePool:
    """An IPoolDataPaths over L{PoolDataPaths} whose C{quiesce} can be made to fail."""

    inner: PoolDataPaths
    host: str = "here"

    def others(self, image: str | None = None, host: str | None = None) -> Any:
        """As the inner one."""
        return self.inner.others(image, host)

    def quiesce(self, image: str) -> Any:
        """As the inner one."""
        return self.inner.quiesce(image)

    def resume(self, holds: Any, reload: bool) -> Any:
        """As the inner one."""
        return self.inner.resume(holds, reload)


class PoolStorageControlTests(EmbeddedXenstoredFixture, TestCase):
    """
    L{StorageControl} in a pool: this host's data paths in a real embedded
    store (the recording pauser), the other hosts behind fake peers, the
    handles on a Clock.
    """

    async def setUp(self) -> None:  # type: ignore[override]
        """Two users of MID here, one on b, one on c; one of BASE only on d."""
        self.startServer()
        self.xs = await self.connect()
        self.clock = Clock()
        self.here = [
            tapRecord(0, "h0", ("/srv/pool/h0.vhd", MID, BASE), 1),
            tapRecord(3, "h1", ("/srv/pool/h1.vhd", MID, BASE), 2),
        ]
        for dp in self.here:
            await self.xs.mkdir(registryDir(dp.driverDomid))
            await self.xs.mkdir(dp.path)
            await updateRecord(self.xs, dp, dp)
        self.etcd = FakeEtcd()
        self.peers = FakePeers()
        for host, dp in (
            ("b", tapRecord(0, "b0", ("/srv/pool/b.vhd", MID, BASE), 5)),
            ("c", tapRecord(0, "c0", ("/srv/pool/c.vhd", MID, BASE), 6)),
        ):
            self.etcd._put(wire.Put(*_record(dp, host)))
            self.peers.paused[host] = [attrs.evolve(dp, host=host)]
        self.pool = PoolDataPaths(self.etcd, "here", self.peers, self.clock)
        self.pauser = RecordingPauser()
        self.merged: list[str] = []
        self.storage = StorageControl(
            DataPathControl(self.xs, {"tap": self.pauser}),
            reactor=None,
            bound=BOUND,
            clock=self.clock,
            pool=self.pool,
            merge=self.merge,
        )
        self.mergeFailure: Exception | None = None

    async def merge(self, image: str) -> None:
        """The stand-in merge: records the image and who was paused meanwhile."""
        self.merged.append(image)
        self.pausedDuringMerge = (set(self.pauser.paused), self.peers.holding())
        if self.mergeFailure is not None:
            raise self.mergeFailure

    async def settled(self) -> None:
        """Wait until no resume is running."""
        for _ in range(500):
            if not any(h.resuming for h in self.storage.handles()):
                return
            await deferLater(reactor, 0.01, lambda: None)
        raise AssertionError("a resume did not finish")

    def test_interface(self) -> None:
        """A StorageControl with a pool still provides IStorageControl."""
        self.assertTrue(verifyObject(IStorageControl, self.storage))

    async def test_findAndScan(self) -> None:
        """
        find and scan answer for the whole pool, each data path naming its
        host (this host's by its pool name); scan filters one host.
        """
        found = await self.storage.find(MID)
        self.assertEqual(
            sorted((dp.host, dp.vdi) for dp in found),
            [("b", "b0"), ("c", "c0"), ("here", "h0"), ("here", "h1")],
        )
        self.assertEqual([dp.vdi for dp in await self.storage.scan("c")], ["c0"])
        self.assertEqual(sorted(dp.vdi for dp in await self.storage.scan("here")), ["h0", "h1"])
        self.assertEqual(len(await self.storage.scan()), 4)

    async def test_quiesceAcrossHosts(self) -> None:
        """
        One handle pauses every user on every host; its resume resumes them
        all, with the reload asked for, and nothing stays held anywhere.
        """
        held = await self.storage.quiesce(MID)
        self.assertEqual(self.pauser.paused, {(0, "h0"), (3, "h1")})
        self.assertEqual(self.peers.holding(), {"b": {"h1"}, "c": {"h2"}})
        self.assertEqual(
            sorted((dp.host, dp.vdi) for dp in held.paused),
            [("b", "b0"), ("c", "c0"), ("here", "h0"), ("here", "h1")],
        )
        await self.storage.resume(held.id, True)
        self.assertEqual((self.pauser.paused, self.peers.holding()), (set(), {}))
        self.assertEqual({r[2] for r in self.peers.resumed}, {True})
        self.assertEqual(self.storage.handles(), [])

    async def test_quiesceLocalAsksNobody(self) -> None:
        """The local-only variant pauses this host's users and calls no peer."""
        held = await self.storage.quiesceLocal(MID)
        self.assertEqual((len(held.paused), held.remote, self.peers.calls), (2, [], []))
        await self.storage.resume(held.id, False)

    async def test_hostFailsInTheMiddle(self) -> None:
        """
        Host c cannot be reached: this host's data paths and b's are
        resumed, no handle is left, the fault names c; a second quiesce
        then finds nothing busy.
        """
        self.peers.failures["c"] = PeerUnavailable("host c (datapath.quiesceLocal): refused")
        with self.assertRaises(HostQuiesceError) as cm:
            await self.storage.quiesce(MID)
        self.assertEqual((cm.exception.host, cm.exception.faultCode), ("c", FaultCode.UNAVAILABLE))
        self.assertEqual((self.pauser.paused, self.peers.holding()), (set(), {}))
        self.assertEqual(self.storage.handles(), [])
        self.assertEqual(self.clock.getDelayedCalls(), [])
        del self.peers.failures["c"]
        held = await self.storage.quiesce(MID)
        await self.storage.resume(held.id, False)

    async def test_localUndoFailureKeepsAHandle(self) -> None:
        """
        The other host fails and this host's undo fails too: what is still
        paused here is kept under a handle, resumed at its deadline.
        """
        self.pauser.failures = 1
        self.peers.failures["c"] = PeerUnavailable("host c: refused")
        with self.assertRaises(HostQuiesceError):
            await self.storage.quiesce(MID)
        (held,) = self.storage.handles()
        self.assertEqual(len(held.paused), 1)
        self.clock.advance(BOUND)
        await self.settled()
        self.assertEqual((self.pauser.paused, self.storage.handles()), (set(), []))
        self.flushLoggedErrors()

    async def test_expiryResumesEveryHost(self) -> None:
        """A pool-wide handle nobody resumes is resumed at its deadline, on every host."""
        await self.storage.quiesce(MID)
        self.clock.advance(BOUND - 1)
        self.assertEqual(len(self.peers.holding()), 2)
        self.clock.advance(1)
        await self.settled()
        self.assertEqual((self.pauser.paused, self.peers.holding()), (set(), {}))
        self.assertEqual(self.storage.handles(), [])

    async def test_remoteResumeFailureRetried(self) -> None:
        """
        Host b fails the resume: the handle keeps b's hold (fault 18), this
        host's and c's are resumed; the retry at the deadline resumes b.
        """
        held = await self.storage.quiesce(MID)
        self.peers.failures["b"] = PeerFault("b", "datapath.resume", 18, "tap-ctl unpause: exit 1")
        self.peers.failMethod = "datapath.resume"
        with self.assertRaises(RemoteResumeError) as cm:
            await self.storage.resume(held.id, True)
        self.assertIn("host(s) b", str(cm.exception))
        self.assertEqual([(dp.host, dp.vdi) for dp in held.paused], [("b", "b0")])
        self.assertEqual(self.pauser.paused, set())
        del self.peers.failures["b"]
        self.clock.advance(BOUND)
        await self.settled()
        self.assertEqual((self.peers.holding(), self.storage.handles()), ({}, []))
        self.flushLoggedErrors()

    async def test_coalesceAcrossHosts(self) -> None:
        """
        coalesceImage quiesces every user on every host, merges while they
        are paused, and resumes them all with reload.
        """
        paused = await self.storage.coalesceImage(MID)
        self.assertEqual(len(paused), 4)
        self.assertEqual(self.merged, [MID])
        self.assertEqual(
            self.pausedDuringMerge, ({(0, "h0"), (3, "h1")}, {"b": {"h1"}, "c": {"h2"}})
        )
        self.assertEqual((self.pauser.paused, self.peers.holding()), (set(), {}))
        self.assertEqual({r[2] for r in self.peers.resumed}, {True})
        self.assertEqual({e[3] for e in self.pauser.log if e[0] == "resume"}, {True})

    async def test_coalesceMergeFails(self) -> None:
        """A merge that fails still resumes everyone (with reload); its error is raised."""
        self.mergeFailure = CoalesceError("qemu-img: Could not open")
        with self.assertRaises(CoalesceError):
            await self.storage.coalesceImage(MID)
        self.assertEqual((self.pauser.paused, self.peers.holding()), (set(), {}))
        self.assertEqual(self.storage.handles(), [])

    async def test_coalesceRefusedWhenParentIsShared(self) -> None:
        """
        A data path on another host reading the parent but not the image
        makes the merge refused before anything is paused.
        """
        other = tapRecord(0, "d0", ("/srv/pool/d.vhd", BASE), 7)
        self.etcd._put(wire.Put(*_record(other, "d")))
        with self.assertRaises(MergeConflictError) as cm:
            await self.storage.coalesceImage(MID)
        self.assertIn("d0 (host d", str(cm.exception))
        self.assertEqual((self.merged, self.peers.calls, self.pauser.calls), ([], [], 0))


@attrs.define
class FakeSession:
    """A host session: its lease and state, set by the test; callbacks recorded."""

    host: str = "here"
    lease: int = 0x1001
    state: str = "live"
    recover: list[Callable[[], object]] = attrs.Factory(list)
    lost: list[Callable[[frozenset[bytes]], object]] = attrs.Factory(list)
    rejoin: list[Callable[[], object]] = attrs.Factory(list)

    def onRejoin(self, callback: Callable[[], object]) -> None:
        """Record it."""
        self.rejoin.append(callback)

    def onRecover(self, callback: Callable[[], object]) -> None:
        """Record it."""
        self.recover.append(callback)

    def onLost(self, callback: Callable[[frozenset[bytes]], object]) -> None:
        """Record it."""
        self.lost.append(callback)


class PublisherTests(EmbeddedXenstoredFixture, TestCase):
    """L{DataPathPublisher}: a real embedded store's registry, a fake etcd, a Clock."""

    async def setUp(self) -> None:  # type: ignore[override]
        """A store with one record in domain 0; etcd with this host's lease."""
        self.startServer()
        self.xs = await self.connect()
        self.clock = Clock()
        self.etcd = FakeEtcd()
        self.etcd.leases[0x1001] = 3
        self.session = FakeSession()
        self.first = tapRecord(0, "t0", (MID, BASE), 1)
        await self.register(self.first)

    async def register(self, *dps: DataPath) -> None:
        """Write registry records as the kinds do."""
        for dp in dps:
            await self.xs.mkdir(registryDir(dp.driverDomid))
            await self.xs.mkdir(dp.path)
            await updateRecord(self.xs, dp, dp)

    async def publisher(self) -> DataPathPublisher:
        """A started publisher (domain 4 watched besides those with records)."""
        publisher = DataPathPublisher(
            self.xs, self.etcd, cast(IHostSession, self.session), self.clock, lambda: [4]
        )
        await publisher.start()
        self.addCleanup(publisher.stop)
        return publisher

    def published(self) -> dict[tuple[int, str], tuple[int, dict[str, Any]]]:
        """What etcd holds: (dd, vdi) -> (lease, record)."""
        return {
            parseDatapathKey(k)[1:]: (kv.lease, json.loads(kv.value))
            for k, kv in self.etcd.kvs.items()
            if k.startswith(DATAPATHS)
        }

    async def until(self, predicate: Callable[[], bool], what: str) -> None:
        """Wait (real time: the store's watch events) until C{predicate()}."""
        for _ in range(300):
            if predicate():
                return
            await deferLater(reactor, 0.01, lambda: None)
        self.fail(f"never: {what}; etcd has {self.published()}")

    async def test_keptInStep(self) -> None:
        """
        The registry at start is published under the lease; a record
        registered later (in a watched domain), updated, and removed is
        published, replaced and withdrawn.
        """
        publisher = await self.publisher()
        await self.until(lambda: (0, "t0") in self.published(), "t0 published")
        lease, record = self.published()[(0, "t0")]
        self.assertEqual((lease, record["host"], record["pid"]), (0x1001, "here", 1001))
        self.assertEqual(record["chain"], [MID, BASE])
        later = tapRecord(4, "t4", ("/srv/pool/t4.vhd", MID, BASE), 2)
        await self.register(later)
        await self.until(lambda: (4, "t4") in self.published(), "t4 published")
        shorter = attrs.evolve(later, image=MID, chain=(MID, BASE))
        await updateRecord(self.xs, later, shorter)
        await self.until(
            lambda: self.published()[(4, "t4")][1]["chain"] == [MID, BASE], "t4 updated"
        )
        await self.xs.rm(later.path)
        await self.until(lambda: (4, "t4") not in self.published(), "t4 withdrawn")
        self.assertEqual(set(self.published()), {(0, "t0")})
        self.assertEqual(publisher.failures, 0)

    async def test_failedPublishRetried(self) -> None:
        """
        etcd down: the publish fails, is logged once and retried on the
        clock (backing off) until etcd answers again; nothing is lost.
        """
        events = captureLog(self)
        self.etcd.down = True
        publisher = await self.publisher()
        await self.until(lambda: publisher.failures >= 1, "a failure")
        self.assertTrue(publisher.pending)
        self.clock.advance(0.5)
        await self.until(lambda: publisher.failures >= 2, "a retry")
        self.assertEqual(self.published(), {})
        warnings = [e for e in events if "Could not publish" in e.get("log_format", "")]
        self.assertEqual(len(warnings), 1)
        self.etcd.down = False
        self.clock.advance(1.0)
        await self.until(lambda: (0, "t0") in self.published(), "t0 published after the outage")
        await publisher.settled()
        self.assertFalse(publisher.pending)
        self.assertTrue(
            any("published in the pool again" in e.get("log_format", "") for e in events)
        )

    async def test_lostLeaseRepublished(self) -> None:
        """
        The lease expires (the entries go with it); while the session
        rejoins nothing is published; once rejoined under a new lease,
        everything is published again under it.
        """
        publisher = await self.publisher()
        await self.until(lambda: (0, "t0") in self.published(), "t0 published")
        self.etcd.expire(0x1001)
        self.session.state = "rejoining"
        for callback in self.session.lost:
            callback(frozenset())
        self.assertEqual(self.published(), {})
        self.clock.advance(1.0)
        self.assertEqual(self.published(), {})
        self.etcd.leases[0x2002] = 3
        self.session.lease, self.session.state = 0x2002, "live"
        # Told of the rejoin, it publishes at once, before the next check.
        for rejoined in self.session.rejoin:
            rejoined()
        await self.until(lambda: (0, "t0") in self.published(), "republished")
        self.assertEqual(self.published()[(0, "t0")][0], 0x2002)
        self.assertEqual(publisher.lease, 0x2002)

    async def test_recoveryResyncs(self) -> None:
        """After a recovery a full resync puts back an entry that went missing."""
        await self.publisher()
        await self.until(lambda: (0, "t0") in self.published(), "t0 published")
        del self.etcd.kvs[datapathKey("here", 0, "t0")]
        for callback in self.session.recover:
            callback()
        await self.until(lambda: (0, "t0") in self.published(), "t0 put back")


class MergeTests(EmbeddedXenstoredFixture, TestCase):
    """L{mergeIntoParent} with the real C{qemu-img}; L{StorageControl.coalesceImage} on one host."""

    def setUp(self) -> None:
        """qemu-img is needed."""
        if shutil.which("qemu-img") is None:
            raise SkipTest("qemu-img missing (qemu-utils)")
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)

    def qemuImg(self, *args: str) -> None:
        """Run qemu-img (no shell); it must succeed."""
        proc = subprocess.run(["qemu-img", *args], capture_output=True, text=True, check=False)
        self.assertEqual(proc.returncode, 0, proc.stderr)

    def chain(self) -> tuple[str, str]:
        """base <- top, top holding a cluster of data; (top, base)."""
        base, top = os.path.join(self.dir, "base.qcow2"), os.path.join(self.dir, "top.qcow2")
        self.qemuImg("create", "-q", "-f", "qcow2", base, "1M")
        self.qemuImg("create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top)
        io = ["qemu-io", "-f", "qcow2", "-c", "write -P 0x33 0 64k", top]
        self.assertEqual(subprocess.run(io, capture_output=True, check=False).returncode, 0)
        return top, base

    def holds(self, image: str) -> bool:
        """Whether C{image} itself (not its backing file) holds the written cluster."""
        out = subprocess.run(
            ["qemu-img", "map", "--output=json", "-f", "qcow2", image],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        return any(e["data"] and e["depth"] == 0 for e in json.loads(out))

    async def test_mergeIntoParent(self) -> None:
        """The top's data lands in the parent, whose path is returned; the top is emptied."""
        top, base = self.chain()
        self.assertEqual((self.holds(top), self.holds(base)), (True, False))
        self.assertEqual(await mergeIntoParent(reactor, top), base)
        self.assertEqual((self.holds(top), self.holds(base)), (False, True))

    async def test_nothingToMerge(self) -> None:
        """An image without a parent, or one qemu-img cannot read, is a CoalesceError naming it."""
        _, base = self.chain()
        with self.assertRaises(CoalesceError) as cm:
            await mergeIntoParent(reactor, base)
        self.assertIn("no parent", str(cm.exception))
        with self.assertRaises(CoalesceError) as cm:
            await mergeIntoParent(reactor, os.path.join(self.dir, "nosuch.qcow2"))
        self.assertIn("nosuch.qcow2", str(cm.exception))

    async def test_coalesceImageOnOneHost(self) -> None:
        """Without a pool coalesceImage merges an image no data path uses, pausing nothing."""
        top, base = self.chain()
        self.startServer()
        xs = await self.connect()
        storage = StorageControl(DataPathControl(xs, {}), reactor=reactor, clock=Clock())
        self.assertEqual(await storage.coalesceImage(top), [])
        self.assertTrue(self.holds(base))
        self.assertEqual(storage.handles(), [])
