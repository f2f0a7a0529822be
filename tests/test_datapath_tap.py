"""
Tapdisk data paths (seed 002) end to end: the C{tap} kind registers each
activated tapdisk (pid, minor, image, VHD chain) in the registry through
the agent's completion transaction; L{TapPauser} quiesces and resumes them
with C{tap-ctl}. The tapdisks are served by driver-domain agents (domains 0
and 3), each with its own stand-in C{tap-ctl} (tests/support/fake-tap-ctl:
real idle processes, SIGSTOP/SIGCONT for pause/unpause; blktap is not
packaged for Debian); the VHD chains are real VHD headers (bases made by
qemu-img, differencing children by tests/support/vhd.py). Run over the C
xenstored and the embedded one.
"""

from __future__ import annotations

import os
import shutil
from typing import Any, cast

from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from tests.support.fixtures import EmbeddedXenstoredFixture, RealXenstoredFixture
from tests.support.host import HostSuite, shortTempDir, startDriverDomain
from tests.support.treedump import dumpTree
from tests.support.vhd import makeBase, makeChild
from tests.test_tapctl import events, fakeTapCtl, inject, procState
from xenddev.backendctrl.errors import DriverDomainError, PreconditionError
from xenddev.backendctrl.protocol import VDI
from xenddev.datapath import (
    DataPath,
    DataPathControl,
    IDataPathPauser,
    ImageError,
    NoPauserError,
    QuiesceError,
    ResumeError,
    TapPauser,
    coalesceQuiesced,
    findDataPaths,
    holdPath,
    readRecord,
    recordPath,
    scanRegistry,
    standardPausers,
)
from xenddev.datapath.images import vhdChain, vhdParent
from xenddev.driverdomain.agent import BackendCtrlAgent
from xenddev.driverdomain.kinds.blkback import BlkbackKind
from xenddev.driverdomain.kinds.tap import TapKind
from xenddev.tapctl import TapCtl, TapCtlError, TapdiskInfo
from xenddev.toolstack.client import DriverDomainClient
from xenddev.toolstack.pauser import protocolPausers

HAVE_QEMU_IMG = shutil.which("qemu-img") is not None


def _workdir(test: TestCase | SynchronousTestCase) -> str:
    """A short temporary directory, removed at cleanup."""
    return shortTempDir(test, "xdt-")


class VhdChainTests(SynchronousTestCase):
    """L{vhdChain}: the parent of a differencing VHD, from its headers."""

    def setUp(self) -> None:
        if not HAVE_QEMU_IMG:
            raise self.skipTest("qemu-img (Debian qemu-utils) is not installed")
        self.dir = _workdir(self)

    def test_chainThroughEveryLocator(self) -> None:
        """
        A three-level chain across directories: the MacX (relative URL),
        W2ku (absolute) and W2ru (relative) locators all lead to the parent;
        a qemu-img base has no parent.
        """
        os.makedirs(os.path.join(self.dir, "sub"))
        base = makeBase(os.path.join(self.dir, "base.vhd"))
        mid = makeChild(os.path.join(self.dir, "sub", "mid.vhd"), base, ("W2ru",))
        leaf = makeChild(os.path.join(self.dir, "sub", "leaf.vhd"), mid, ("W2ku",))
        top = makeChild(os.path.join(self.dir, "top.vhd"), leaf, ("MacX",))
        self.assertEqual(vhdChain(top), [top, leaf, mid, base])
        self.assertIsNone(vhdParent(base))

    def test_headerNameLastResort(self) -> None:
        """Without locators, the parent's name in the header (beside the child) is used."""
        base = makeBase(os.path.join(self.dir, "base.vhd"))
        child = makeChild(os.path.join(self.dir, "child.vhd"), base, ())
        self.assertEqual(vhdChain(child), [child, base])

    def test_undeterminable(self) -> None:
        """Not a VHD, a corrupt header, a missing parent: ImageError naming the file."""
        plain = os.path.join(self.dir, "plain.vhd")
        with open(plain, "wb") as f:
            f.truncate(1 << 20)
        e = self.assertRaises(ImageError, vhdChain, plain)
        self.assertIn("not a VHD", str(e))
        base = makeBase(os.path.join(self.dir, "base.vhd"))
        child = makeChild(os.path.join(self.dir, "child.vhd"), base)
        with open(child, "r+b") as f:
            f.seek(512 + 100)
            f.write(b"x")
        self.assertIn("checksum", str(self.assertRaises(ImageError, vhdChain, child)))
        orphan = makeChild(os.path.join(self.dir, "orphan.vhd"), base)
        os.unlink(base)
        e = self.assertRaises(ImageError, vhdChain, orphan)
        self.assertIn("parent not found", str(e))


@implementer(IDataPathPauser)
class ScriptedPauser:
    """
    A fake pauser for DataPathControl's own logic: the pause of the vdi
    named C{failOn} raises synchronously; records every call.
    """

    def __init__(self, failOn: str | None = None) -> None:
        self.failOn = failOn
        self.calls: list[tuple[str, str, bool | None]] = []

    def pause(self, dp: DataPath) -> Deferred[None]:
        if dp.vdi == self.failOn:
            raise RuntimeError(f"cannot pause {dp.vdi}")
        self.calls.append(("pause", dp.vdi, None))
        return succeed(None)

    def resume(self, dp: DataPath, reload: bool) -> Deferred[None]:
        self.calls.append(("resume", dp.vdi, reload))
        return succeed(None)


class _Holds:
    """Just enough of a store for L{DataPathControl}'s holds: write and rm."""

    def __init__(self) -> None:
        self.nodes: dict[str, str] = {}

    def write(self, path: str, value: str) -> Deferred[None]:
        self.nodes[path] = value
        return succeed(None)

    def rm(self, path: str, missingOk: bool = False) -> Deferred[None]:
        self.nodes.pop(path, None)
        return succeed(None)


class ControlLogicTests(SynchronousTestCase):
    """L{DataPathControl.pauseAll} with fakes (no store, no tapdisk)."""

    def paths(self, kind: str = "tap") -> list[DataPath]:
        return [DataPath(0, f"v{i}", kind, "h", f"/i{i}", "raw", pid=i, minor=i) for i in range(3)]

    def test_synchronousRaiseIsUndone(self) -> None:
        """
        A pauser raising at once counts as a failure: the others are
        resumed, and no data path is left held.
        """
        pauser = ScriptedPauser(failOn="v1")
        holds = _Holds()
        control = DataPathControl(holds, {"tap": pauser})
        d = Deferred.fromCoroutine(control.pauseAll("/i", self.paths()))
        e = self.failureResultOf(d, QuiesceError).value
        self.assertEqual([dp.vdi for dp, _ in e.failures], ["v1"])
        self.assertEqual(
            pauser.calls,
            [
                ("pause", "v0", None),
                ("pause", "v2", None),
                ("resume", "v0", False),
                ("resume", "v2", False),
            ],
        )
        self.assertEqual(holds.nodes, {})

    def test_noPauserPausesNothing(self) -> None:
        """A kind without a pauser is refused before anything is paused."""
        pauser = ScriptedPauser()
        control = DataPathControl(None, {"tap": pauser})
        dps = [*self.paths(), DataPath(0, "q", "qemu", "h", "/q", "qcow2")]
        d = Deferred.fromCoroutine(control.pauseAll("/i", dps))
        self.failureResultOf(d, NoPauserError)
        self.assertEqual(pauser.calls, [])

    def test_pausers(self) -> None:
        """TapPauser and the standard pausers provide IDataPathPauser."""
        tap = TapCtl("tap-ctl", reactor=reactor)
        self.assertTrue(verifyObject(IDataPathPauser, TapPauser(tap)))
        pausers = standardPausers(reactor, tap)
        self.assertEqual(sorted(pausers), ["qemu", "tap"])
        for pauser in pausers.values():
            self.assertTrue(verifyObject(IDataPathPauser, pauser))

    def test_recordWithoutPid(self) -> None:
        """A tap record without pid or minor fails the pause (a Deferred, not a raise)."""
        pauser = TapPauser(TapCtl("/nonexistent/tap-ctl", reactor=reactor))
        dp = DataPath(0, "v", "tap", "h", "/i", "raw")
        self.assertIn("pid and minor", str(self.failureResultOf(pauser.pause(dp)).value))


class ServiceWiringTests(TestCase):
    """The daemon builds its data-path control with the real pausers."""

    async def test_daemonRegistersTapAndQemu(self) -> None:
        """
        XenddevService (embedded xenstored, no listeners) has a
        DataPathControl pausing tap and qemu data paths through their
        driver domain's agent, and its agent serves those requests with the
        real tap and qemu pausers.
        """
        from xenddev.config import Config
        from xenddev.datapath.quiesce import QemuPauser
        from xenddev.service import XenddevService
        from xenddev.toolstack.pauser import ProtocolPauser

        service = XenddevService(
            Config(rundir=_workdir(self), xenstore="embedded"), reactor=reactor, listen=False
        )
        service.startService()
        self.addCleanup(service.stopService)
        await service.ready
        control = service.dataPaths
        self.assertIsInstance(control, DataPathControl)
        self.assertEqual(sorted(control.pausers), ["qemu", "tap"])
        self.assertIsInstance(control.pausers["tap"], ProtocolPauser)
        self.assertIsInstance(control.pausers["qemu"], ProtocolPauser)
        assert service.agent is not None
        self.assertIsInstance(service.agent.pausers["tap"], TapPauser)
        self.assertIsInstance(service.agent.pausers["qemu"], QemuPauser)
        self.assertEqual(await control.find("/nothing"), [])


class TapDataPathSuite(HostSuite):
    """Mixed with a server fixture and TestCase."""

    assertFailure: Any

    async def setUp(self) -> None:
        if not HAVE_QEMU_IMG:
            self.skipTest("qemu-img (Debian qemu-utils) is not installed")
        self.startServer()
        self.xs = await self.connect()
        self.dir = _workdir(self)
        #: driver domain -> (its stand-in tap-ctl, its state directory)
        self.taps: dict[int, tuple[TapCtl, str]] = {}
        self.agents: dict[int, BackendCtrlAgent] = {}
        self.clients: dict[int, DriverDomainClient] = {}

    async def startAgent(self, dd: int) -> BackendCtrlAgent:
        """An agent for C{dd} with the tap and blkback kinds over dd's own tap-ctl."""
        if dd not in self.taps:
            self.taps[dd] = fakeTapCtl(self)
        kind = TapKind(self.taps[dd][0], host="testhost")
        pausers = {"tap": TapPauser(self.taps[dd][0])}  # pause/resume requests
        started = await startDriverDomain(
            self, self.xs, dd, [kind, BlkbackKind()], pausers=pausers, backendClasses=None
        )
        agent = self.agents[dd] = started.agent
        self.clients.setdefault(dd, DriverDomainClient(self.xs, dd, 20.0))
        return agent

    def chain(self, name: str, parent: str | None = None) -> str:
        """A differencing VHD over C{parent} (a new qemu-img base if None)."""
        if parent is None:
            return makeBase(os.path.join(self.dir, f"{name}.vhd"))
        return makeChild(os.path.join(self.dir, f"{name}.vhd"), parent)

    async def serve(self, dd: int, name: str, image: str, fmt: str = "vhd") -> None:
        """prepare + activate a vdi of C{image} in C{dd}."""
        client = self.clients[dd]
        await client.prepare(name, {"type": "file", "format": fmt, "params": image}, VDI)
        await client.activate(name, VDI)

    async def tapdisk(self, dd: int, image: str) -> TapdiskInfo:
        """The tapdisk of C{dd} serving C{image}."""
        (row,) = [r for r in await self.taps[dd][0].list() if r.path == image]
        return row

    async def sharedParent(self) -> tuple[str, dict[tuple[int, str], str]]:
        """
        Agents in domains 0 and 3; five vdis over leaves of one base (a0, a1,
        a2 in 0; b0, b1 in 3), and one vdi over another base in 3.
        """
        for dd in (0, 3):
            await self.startAgent(dd)
        base = self.chain("base")
        served = {(0, "a0"): "", (0, "a1"): "", (0, "a2"): "", (3, "b0"): "", (3, "b1"): ""}
        for dd, name in served:
            served[(dd, name)] = self.chain(name, self.chain(f"{name}-mid", base))
            await self.serve(dd, name, served[(dd, name)])
        await self.serve(3, "other", self.chain("other", self.chain("otherbase")))
        return base, served

    async def pausedState(self) -> dict[tuple[int, str], tuple[bool, str | None]]:
        """(dd, image) -> (tap-ctl list says paused, the process state letter)."""
        out = {}
        for dd, (tap, _) in self.taps.items():
            for row in await tap.list():
                assert row.pid is not None and row.path is not None
                out[(dd, row.path)] = (row.paused, procState(row.pid))
        return out

    def assertNothingPaused(self, state: dict[tuple[int, str], tuple[bool, str | None]]) -> None:
        self.assertTrue(state)
        for key, (paused, letter) in state.items():
            self.assertFalse(paused, key)
            self.assertNotEqual(letter, "T", key)

    def control(self) -> DataPathControl:
        """The data-path control with the real tap pauser (each domain's tap-ctl)."""
        byDomain = {dd: tap for dd, (tap, _) in self.taps.items()}
        return DataPathControl(self.xs, {"tap": TapPauser(byDomain[0], byDomain)})

    def tapctlCalls(self, command: str) -> list[list[str]]:
        """The argument lists of every C{command} run by any stand-in."""
        return [
            [str(a) for a in cast(list, e["argv"])]
            for _, state in self.taps.values()
            for e in events(state)
            if e["cmd"] == command
        ]

    # Registration by the tap kind

    async def test_registeredWhileActive(self) -> None:
        """
        activate registers pid, minor, image, format, the VHD chain and the
        tapdisk type; deactivate removes the record (the tapdisk pauses),
        activate writes it again, and an unprepare of the active vdi
        removes it with the tapdisk; the tree ends as it began.
        """
        await self.startAgent(0)
        base = self.chain("base")
        mid = self.chain("mid", base)
        leaf = self.chain("leaf", mid)
        before = await dumpTree(self.xs)
        client = self.clients[0]
        await client.prepare("v", {"type": "file", "format": "vhd", "params": leaf}, VDI)
        self.assertEqual(await readRecord(self.xs, 0, "v"), None)
        await client.activate("v", VDI)
        row = await self.tapdisk(0, leaf)
        chain = (leaf, mid, base)
        extra = {"type": "vhd"}
        expected = DataPath(
            0, "v", "tap", "testhost", leaf, "vhd", chain, row.pid, row.minor, extra=extra
        )
        self.assertEqual(await readRecord(self.xs, 0, "v"), expected)
        await client.deactivate("v", VDI)
        self.assertEqual(await readRecord(self.xs, 0, "v"), None)
        self.assertTrue((await self.tapdisk(0, leaf)).paused)
        await client.activate("v", VDI)
        self.assertEqual(await readRecord(self.xs, 0, "v"), expected)
        await client.unprepare("v", VDI)
        self.assertEqual(await readRecord(self.xs, 0, "v"), None)
        self.assertEqual(await self.taps[0][0].list(), [])
        await self.assertTreeIs(before)

    async def test_imageOnlyWhenChainUnknown(self) -> None:
        """
        A "vhd" that is no VHD is registered with just the image; a raw
        image served by tapdisk's aio driver too, with format raw.
        """
        await self.startAgent(0)
        fake = os.path.join(self.dir, "fake.vhd")
        raw = os.path.join(self.dir, "disk.img")
        for path in (fake, raw):
            with open(path, "wb") as f:
                f.truncate(1 << 20)
        await self.serve(0, "f", fake)
        client = self.clients[0]
        await client.prepare("r", {"type": "tap", "taptype": "aio", "params": raw}, VDI)
        await client.activate("r", VDI)
        f, r = await readRecord(self.xs, 0, "f"), await readRecord(self.xs, 0, "r")
        assert f is not None and r is not None
        self.assertEqual((f.chain, f.format, f.extra), ((fake,), "vhd", {"type": "vhd"}))
        self.assertEqual((r.chain, r.format, r.extra), ((raw,), "raw", {"type": "aio"}))

    async def test_registryAfterAgentRestart(self) -> None:
        """
        The registry lives in XenStore: after both agents are stopped and
        new ones (new kind instances) started, scanRegistry and
        findDataPaths see the same tapdisks, a quiesce through them pauses
        the live processes, and the new agent's deactivate unregisters.
        """
        base, served = await self.sharedParent()
        recorded = await scanRegistry(self.xs)
        self.assertEqual(len(recorded), 6)
        for dd in (0, 3):
            await self.agents[dd].stop()
            await self.startAgent(dd)
        self.assertEqual(await scanRegistry(self.xs), recorded)
        users = await findDataPaths(self.xs, base)
        self.assertEqual({(d.driverDomid, d.vdi) for d in users}, set(served))
        for dp in users:
            self.assertEqual(dp.pid, (await self.tapdisk(dp.driverDomid, dp.image)).pid)
        control = self.control()
        handle = await control.quiesce(base)
        self.assertEqual(len(handle.paused), 5)
        await control.resume(handle)
        await self.clients[3].deactivate("b0", VDI)
        self.assertEqual(await readRecord(self.xs, 3, "b0"), None)
        self.assertEqual(len(await scanRegistry(self.xs)), 5)

    # Quiesce with real tapdisks

    async def test_quiesceAcrossTwoDriverDomains(self) -> None:
        """
        quiesce(shared base) finds the five users in domains 0 and 3 (by
        their recorded chains) and pauses exactly those: tap-ctl list says
        paused and each process is stopped (T); the unrelated tapdisk runs
        on. resume(reload=True) unpauses each with -a <type>:<image>; the
        registry is unchanged.
        """
        base, served = await self.sharedParent()
        before = await dumpTree(self.xs)
        control = self.control()
        handle = await control.quiesce(base)
        self.assertEqual({(d.driverDomid, d.vdi) for d in handle.paused}, set(served))
        state = await self.pausedState()
        for (dd, _), image in served.items():
            self.assertEqual(state.pop((dd, image)), (True, "T"))
        self.assertNothingPaused(state)  # the unrelated one
        await control.resume(handle, reload=True)
        self.assertEqual(handle.paused, [])
        self.assertNothingPaused(await self.pausedState())
        unpauses = self.tapctlCalls("unpause")
        self.assertEqual(len(unpauses), 5)
        self.assertEqual(
            sorted(argv[argv.index("-a") + 1] for argv in unpauses),
            sorted(f"vhd:{image}" for image in served.values()),
        )
        await self.assertTreeIs(before)

    async def test_reactivationLeavesQuiescedPaused(self) -> None:
        """
        A domain pause and unpause (deactivate, activate: what the tap2
        controller does) while a quiesce holds a tapdisk leaves it paused —
        a coalesce must not see I/O resume under it; the quiesce's resume
        then unpauses it and releases the hold; the tree ends as it began.
        """
        await self.startAgent(0)
        image = self.chain("leaf", self.chain("base"))
        await self.serve(0, "v0", image)
        before = await dumpTree(self.xs)
        control = self.control()
        handle = await control.quiesce(image)
        hold = holdPath(0, "v0")
        self.assertEqual(await self.xs.read(hold), image)
        await self.clients[0].deactivate("v0", VDI)
        await self.clients[0].activate("v0", VDI)
        self.assertEqual((await self.pausedState())[(0, image)], (True, "T"))
        await control.resume(handle, reload=True)
        self.assertNothingPaused(await self.pausedState())
        self.assertFalse(await self.xs.exists(hold))
        await self.assertTreeIs(before)

    async def test_quiesceThroughTheAgents(self) -> None:
        """
        With the protocol pauser the toolstack runs no tap-ctl: each agent
        gets pause and reload requests and pauses its own tapdisks (as for a
        remote driver domain); the five users of the shared base in domains
        0 and 3 are paused, the unrelated one runs on; resume reopens each
        on its leaf; the tree ends as it began.
        """
        base, served = await self.sharedParent()
        before = await dumpTree(self.xs)
        control = DataPathControl(self.xs, protocolPausers(lambda dd: self.clients[dd]))
        handle = await control.quiesce(base)
        state = await self.pausedState()
        for (dd, _), image in served.items():
            self.assertEqual(state.pop((dd, image)), (True, "T"))
        self.assertNothingPaused(state)
        await control.resume(handle, reload=True)
        self.assertNothingPaused(await self.pausedState())
        self.assertEqual(
            sorted(argv[argv.index("-a") + 1] for argv in self.tapctlCalls("unpause")),
            sorted(f"vhd:{image}" for image in served.values()),
        )
        await self.assertTreeIs(before)

    async def test_pauseRequestRefusals(self) -> None:
        """
        pause of an inactive vdi is ENOTCONN (refused locally), in an agent
        without a pauser for the data path's kind EOPNOTSUPP, and of a vdi
        with no data path registered ENOENT; nothing gets paused.
        """
        await self.startAgent(0)
        client = self.clients[0]
        idle = {"type": "file", "format": "vhd", "params": self.chain("solo")}
        await client.prepare("idle", idle, VDI)
        busy = self.chain("busy")
        await self.serve(0, "busy", busy)
        e = await self.assertFailure(client.pause("idle"), PreconditionError)
        self.assertEqual(e.errname, "ENOTCONN")
        self.agents[0].pausers.clear()
        e = await self.assertFailure(client.pause("busy"), DriverDomainError)
        self.assertEqual(e.errname, "EOPNOTSUPP")
        await self.xs.rm(recordPath(0, "busy"))
        e = await self.assertFailure(client.pause("busy"), DriverDomainError)
        self.assertEqual(e.errname, "ENOENT")
        self.assertFalse((await self.tapdisk(0, busy)).paused)

    async def test_failureInTheMiddleResumesEverything(self) -> None:
        """
        The stand-in fails the pause of one tapdisk (b0, in domain 3):
        QuiesceError names it with tap-ctl's exit code; the four that were
        paused are resumed without reload; nothing is left paused in either
        domain and the tree is as before.
        """
        base, served = await self.sharedParent()
        before = await dumpTree(self.xs)
        victim = await self.tapdisk(3, served[(3, "b0")])
        inject(self.taps[3][1], "pause", 16, "device busy\n", pid=victim.pid)
        with_error = None
        try:
            await self.control().quiesce(base)
        except QuiesceError as e:
            with_error = e
        assert with_error is not None, "no QuiesceError"
        ((dp, err),) = with_error.failures
        self.assertEqual((dp.driverDomid, dp.vdi), (3, "b0"))
        assert isinstance(err, TapCtlError)
        self.assertEqual((err.exitCode, err.stderr), (16, "device busy\n"))
        self.assertEqual(with_error.resumeFailures, [])
        unpauses = self.tapctlCalls("unpause")
        self.assertEqual(len(unpauses), 4)
        self.assertTrue(all("-a" not in argv for argv in unpauses))
        self.assertNothingPaused(await self.pausedState())
        await self.assertTreeIs(before)

    async def test_resumeFailureKeepsHandle(self) -> None:
        """
        An unpause that fails leaves that data path (only) in the handle,
        and ResumeError names it; resuming with the handle again finishes.
        """
        base, served = await self.sharedParent()
        control = self.control()
        handle = await control.quiesce(base)
        victim = await self.tapdisk(0, served[(0, "a1")])
        path = inject(self.taps[0][1], "unpause", 5, "stuck\n", pid=victim.pid)
        try:
            await control.resume(handle)
        except ResumeError as e:
            self.assertEqual([(d.driverDomid, d.vdi) for d, _ in e.failures], [(0, "a1")])
        else:
            self.fail("no ResumeError")
        self.assertEqual([d.vdi for d in handle.paused], ["a1"])
        self.assertEqual((await self.tapdisk(0, served[(0, "a1")])).paused, True)
        os.unlink(path)
        await control.resume(handle)
        self.assertEqual(handle.paused, [])
        self.assertNothingPaused(await self.pausedState())

    async def test_coalesceWithRealTapdisks(self) -> None:
        """
        coalesceQuiesced: the (stand-in) merge runs while every user of the
        base is paused, and all are resumed with reload afterwards, also
        when the merge fails (the failure is re-raised).
        """
        base, _ = await self.sharedParent()
        control = self.control()
        seen: list[int] = []

        async def merge(image: str) -> None:
            state = await self.pausedState()
            seen.append(sum(1 for paused, letter in state.values() if paused and letter == "T"))

        paused = await coalesceQuiesced(control, base, merge)
        self.assertEqual((seen, len(paused)), ([5], 5))
        self.assertNothingPaused(await self.pausedState())

        async def badMerge(image: str) -> None:
            raise OSError("vhd-util coalesce: exit 22")

        try:
            await coalesceQuiesced(control, base, badMerge)
        except OSError:
            pass
        else:
            self.fail("the merge failure was not re-raised")
        self.assertNothingPaused(await self.pausedState())
        reloads = [argv for argv in self.tapctlCalls("unpause") if "-a" in argv]
        self.assertEqual(len(reloads), 10)


class RealXenstoredTapDataPathTests(  # type: ignore[misc]
    TapDataPathSuite, RealXenstoredFixture, TestCase
):
    """Tapdisk data paths over the C xenstored."""


class EmbeddedXenstoredTapDataPathTests(  # type: ignore[misc]
    TapDataPathSuite, EmbeddedXenstoredFixture, TestCase
):
    """Tapdisk data paths over the embedded xenstored."""
