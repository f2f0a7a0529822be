"""
The daemon's storage control (L{xenddev.storagectl.StorageControl}): quiesce
handles held for clients, their deadline on a L{Clock} (a handle not
resumed in time is resumed automatically and logged), retries after a
failed resume, busy data paths, data paths that vanish while paused, the
resume of everything at shutdown, and coalesce refusals. The data paths are
registry records in a real store (the C xenstored and the embedded one);
the pauser here only records what it is asked (the bookkeeping and the
clock are under test), while the real qemu pauser is driven end to end
over XML-RPC in C{tests.test_xmlrpc} and the real tap pauser in
C{tests.test_datapath_tap}.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock, deferLater
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import TestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from tests.support.fixtures import EmbeddedXenstoredFixture, RealXenstoredFixture
from tests.test_datapath import tapRecord
from xenddev.backendctrl.records import registryDir, updateRecord
from xenddev.datapath import DataPath, DataPathControl, IDataPathPauser, ResumeError
from xenddev.storagectl import (
    IStorageControl,
    NoCoalesceError,
    NoSuchDataPathError,
    QuiesceBusyError,
    StorageControl,
    TooManyHandlesError,
    UnknownHandleError,
)

PARENT = "/srv/parent.vhd"
BOUND = 60.0


@implementer(IDataPathPauser)
class RecordingPauser:
    """
    Records pauses and resumes (who is paused, each call with its reload
    flag); the first C{failures} resumes fail, leaving the data path paused.
    """

    def __init__(self, failures: int = 0) -> None:
        self.failures = failures
        self.calls = 0
        self.paused: set[tuple[int, str]] = set()
        self.log: list[tuple[str, int, str, bool | None]] = []

    def pause(self, dp: DataPath) -> Deferred[None]:
        """Mark it paused."""
        self.calls += 1
        self.paused.add((dp.driverDomid, dp.vdi))
        self.log.append(("pause", dp.driverDomid, dp.vdi, None))
        return succeed(None)

    def resume(self, dp: DataPath, reload: bool) -> Deferred[None]:
        """Fail while failures remain, else mark it resumed."""
        if self.failures:
            self.failures -= 1
            return fail(OSError(f"tap-ctl unpause -p {dp.pid}: exit 1"))
        self.paused.discard((dp.driverDomid, dp.vdi))
        self.log.append(("resume", dp.driverDomid, dp.vdi, reload))
        return succeed(None)


class StorageControlSuite:
    """The tests; mixed with a server fixture and TestCase."""

    startServer: Any
    connect: Any
    assertEqual: Any
    assertIs: Any
    assertTrue: Any
    assertIn: Any
    addCleanup: Any

    async def setUp(self) -> None:
        self.startServer()
        self.xs = await self.connect()
        self.clock = Clock()
        self.users = [
            tapRecord(dd, f"t{i}", (f"/srv/t{i}.vhd", PARENT), i) for i, dd in ((0, 0), (1, 3))
        ]
        await self.register(*self.users, tapRecord(3, "other", ("/srv/o.vhd",), 9))

    async def register(self, *dps: DataPath) -> None:
        """Write registry records as the kinds do when they activate."""
        for dp in dps:
            await self.xs.mkdir(registryDir(dp.driverDomid))
            await self.xs.mkdir(dp.path)
            await updateRecord(self.xs, dp, dp)

    def control(
        self, pauser: RecordingPauser | None = None, maxHandles: int = 64
    ) -> tuple[StorageControl, RecordingPauser]:
        """A storage control on the test's Clock, with the tap stand-in."""
        pauser = pauser if pauser is not None else RecordingPauser()
        dpc = DataPathControl(self.xs, {"tap": pauser})
        storage = StorageControl(
            dpc, reactor=None, bound=BOUND, clock=self.clock, maxHandles=maxHandles
        )
        return storage, pauser

    def captureLog(self) -> list[dict[str, Any]]:
        """Collect log events for the rest of the test."""
        events: list[dict[str, Any]] = []
        observer: Any = events.append
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        return events

    async def settled(self, storage: StorageControl) -> None:
        """Wait until no resume is running (they read the registry first)."""
        for _ in range(500):
            if not any(h.resuming for h in storage.handles()):
                return
            await deferLater(reactor, 0.01, lambda: None)
        raise AssertionError("a resume did not finish")

    def test_interface(self) -> None:
        """StorageControl provides IStorageControl (and the stand-in IDataPathPauser)."""
        storage, pauser = self.control()
        self.assertTrue(verifyObject(IStorageControl, storage))
        self.assertTrue(verifyObject(IDataPathPauser, pauser))

    async def test_quiesceAndResume(self) -> None:
        """
        quiesce pauses every user of the image under one handle with a
        deadline; the client's resume (no reload) unpauses them and cancels
        the deadline.
        """
        storage, pauser = self.control()
        held = await storage.quiesce(PARENT)
        self.assertEqual(sorted(dp.vdi for dp in held.paused), ["t0", "t1"])
        self.assertEqual(pauser.paused, {(0, "t0"), (3, "t1")})
        self.assertEqual(held.deadline, BOUND)
        self.assertEqual([h.id for h in storage.handles()], [held.id])
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.assertIs(await storage.resume(held.id, False), held)
        self.assertEqual(pauser.paused, set())
        self.assertEqual({e[3] for e in pauser.log if e[0] == "resume"}, {False})
        self.assertEqual((storage.handles(), self.clock.getDelayedCalls()), ([], []))
        with self.assertRaises(UnknownHandleError):
            await storage.resume(held.id, True)

    async def test_autoResumeAfterBound(self) -> None:
        """
        A handle nobody resumes is resumed (with reload) once the bound has
        passed, not before, and a warning names it; a client's resume
        meanwhile is refused as busy.
        """
        events = self.captureLog()
        storage, pauser = self.control()
        held = await storage.quiesce(PARENT)
        self.clock.advance(BOUND - 1)
        self.assertEqual(len(pauser.paused), 2)
        self.clock.advance(1)
        with self.assertRaises(QuiesceBusyError):  # the daemon is resuming it
            await storage.resume(held.id, False)
        await self.settled(storage)
        self.assertEqual((pauser.paused, storage.handles()), (set(), []))
        self.assertEqual({e[3] for e in pauser.log if e[0] == "resume"}, {True})
        warnings = [e for e in events if e.get("handle") == held.id and "not resumed" in str(e)]
        self.assertEqual(len(warnings), 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    async def test_failedResumeIsRetried(self) -> None:
        """
        A resume that fails keeps the handle with what is still paused and
        arms the deadline again; the daemon's retry then succeeds.
        """
        storage, pauser = self.control(RecordingPauser(failures=1))
        held = await storage.quiesce(PARENT)
        with self.assertRaises(ResumeError):
            await storage.resume(held.id, True)
        self.assertEqual(len(held.paused), 1)
        self.assertEqual(held.resumeFailures, 1)
        self.assertEqual(len(pauser.paused), 1)
        self.assertEqual([c.getTime() for c in self.clock.getDelayedCalls()], [BOUND])
        self.flushLoggedErrors()
        self.clock.advance(BOUND)
        await self.settled(storage)
        self.assertEqual((pauser.paused, storage.handles()), (set(), []))

    async def test_busyDataPathRefused(self) -> None:
        """
        A second quiesce reaching a data path already held is refused
        before anything is paused; a disjoint one is allowed.
        """
        storage, pauser = self.control()
        held = await storage.quiesce(PARENT)
        calls = pauser.calls
        with self.assertRaises(QuiesceBusyError) as cm:
            await storage.quiesce("/srv/t1.vhd")
        self.assertIn(held.id, str(cm.exception))
        self.assertEqual(pauser.calls, calls)
        other = await storage.quiesce("/srv/o.vhd")
        self.assertEqual([dp.vdi for dp in other.paused], ["other"])
        await storage.resumeAll()
        self.assertEqual((pauser.paused, storage.handles()), (set(), []))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    async def test_handlesCapped(self) -> None:
        """
        Quiesces of an unused image each get a handle until maxHandles are
        held or being made; then one more is refused (fault 12) before
        anything is looked up or paused, however many are asked at once,
        and a resume makes room again.
        """
        storage, pauser = self.control(maxHandles=3)
        held = [await storage.quiesce("/srv/unused.img") for _ in range(2)]
        racing = [storage.quiesce(PARENT), storage.quiesce("/srv/unused.img")]
        self.assertTrue(all(h.paused == [] for h in held))
        with self.assertRaises(TooManyHandlesError) as cm:
            await racing[1]
        self.assertEqual(cm.exception.faultCode, 12)
        self.assertIn("limits.quiesce_handles", str(cm.exception))
        self.assertEqual(len((await racing[0]).paused), 2)
        calls = pauser.calls
        with self.assertRaises(TooManyHandlesError):
            await storage.quiesce("/srv/o.vhd")
        self.assertEqual((pauser.calls, len(storage.handles())), (calls, 3))
        await storage.resume(held[0].id, False)
        self.assertEqual((await storage.quiesce("/srv/o.vhd")).paused[0].vdi, "other")
        await storage.resumeAll()
        self.assertEqual((pauser.paused, storage.handles()), (set(), []))

    async def test_vanishedDataPathDropped(self) -> None:
        """A data path whose record is gone (vdi deactivated) is not resumed."""
        storage, pauser = self.control()
        held = await storage.quiesce(PARENT)
        await self.xs.rm(self.users[0].path)
        await storage.resume(held.id, True)
        self.assertEqual([e[2] for e in pauser.log if e[0] == "resume"], ["t1"])
        self.assertEqual(storage.handles(), [])

    async def test_findAndGet(self) -> None:
        """find by image; get by (domain, vdi); a missing one raises."""
        storage, _ = self.control()
        self.assertEqual(sorted(dp.vdi for dp in await storage.find(PARENT)), ["t0", "t1"])
        self.assertEqual(len(await storage.scan()), 3)
        self.assertEqual(await storage.get(3, "t1"), self.users[1])
        with self.assertRaises(NoSuchDataPathError):
            await storage.get(3, "t0")

    async def test_coalesceRefusals(self) -> None:
        """A tapdisk cannot merge live; a missing data path is not found."""
        storage, _ = self.control()
        with self.assertRaises(NoCoalesceError) as cm:
            await storage.coalesce(0, "t0")
        self.assertIn("vhd-util coalesce", str(cm.exception))
        with self.assertRaises(NoSuchDataPathError):
            await storage.coalesce(0, "nothing")


class RealXenstoredStorageControlTests(StorageControlSuite, RealXenstoredFixture, TestCase):  # type: ignore[misc]
    """The storage control over the C xenstored."""


class EmbeddedXenstoredStorageControlTests(  # type: ignore[misc]
    StorageControlSuite, EmbeddedXenstoredFixture, TestCase
):
    """The storage control over the embedded xenstored."""
