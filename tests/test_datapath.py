"""
The data-path registry, quiesce/resume and coalesce (L{xenddev.datapath}):
with a fake tapdisk pauser over registry records, and with real
qemu-storage-daemons served by two driver-domain agents (domids 0 and 3)
over one store. Run over the C xenstored and the embedded one.
"""

from __future__ import annotations

import os
import subprocess
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from tests.support.fixtures import EmbeddedXenstoredFixture, RealXenstoredFixture
from tests.support.treedump import dumpTree
from tests.support.xenstoresuite import deferredTest
from tests.test_qemu_kind import QEMU_IO, QemuFixtureMixin, qemuIO
from xenddev.datapath import (
    DataPath,
    DataPathControl,
    IDataPathPauser,
    QemuPauser,
    QuiesceError,
    coalesceQuiesced,
    findDataPaths,
    readRecord,
    registryDir,
    scanRegistry,
)
from xenddev.driverdomain.client import DriverDomainClient
from xenddev.driverdomain.kinds.qemu import nbdURI
from xenddev.driverdomain.protocol import ObjectClass

_VDI = ObjectClass("vdi", "vbd", "vbd")


@implementer(IDataPathPauser)
class FakeTapPauser:
    """
    A stand-in for the tap kind's pauser (tap-ctl pause / unpause -a):
    records who is paused; the C{failOn}-th pause fails.
    """

    def __init__(self, failOn: int | None = None) -> None:
        self.failOn = failOn
        self.calls = 0
        self.paused: set[tuple[int, str]] = set()
        self.log: list[tuple[str, int, str, bool | None]] = []

    def pause(self, dp: DataPath) -> Deferred[None]:
        self.calls += 1
        if self.calls == self.failOn:
            return Deferred.fromCoroutine(self._fail(dp))
        self.paused.add((dp.driverDomid, dp.vdi))
        self.log.append(("pause", dp.driverDomid, dp.vdi, None))
        return succeed(None)

    async def _fail(self, dp: DataPath) -> None:
        raise RuntimeError(f"tap-ctl pause -p {dp.pid} -m {dp.minor}: exit 1")

    def resume(self, dp: DataPath, reload: bool) -> Deferred[None]:
        self.paused.discard((dp.driverDomid, dp.vdi))
        self.log.append(("resume", dp.driverDomid, dp.vdi, reload))
        return succeed(None)


def tapRecord(dd: int, vdi: str, chain: tuple[str, ...], minor: int) -> DataPath:
    """A tapdisk data path as the tap kind registers it."""
    return DataPath(
        dd, vdi, "tap", "testhost", chain[0], "vhd", chain, pid=1000 + minor, minor=minor
    )


class RegistryUnitTests(TestCase):
    """L{DataPath} values without a store."""

    def test_roundTrip(self) -> None:
        """A record written as nodes and parsed back is equal to the original."""
        dp = DataPath(
            3, "v", "qemu", "h", "/a", "qcow2", ("/a", "/b"), pid=7, qmp="/s", extra={"export": "v"}
        )
        rel = {k[len(dp.path) + 1 :]: v for k, v in dp.nodes().items()}
        self.assertEqual(DataPath.fromNodes(3, "v", rel), dp)

    def test_usesCanonicalPaths(self) -> None:
        """uses() matches any image of the chain, through symlinks and '..'."""
        d = os.path.abspath(self.mktemp())
        os.makedirs(d)
        base = os.path.join(d, "base")
        open(base, "w").close()
        os.symlink(base, os.path.join(d, "link"))
        dp = tapRecord(0, "v", (os.path.join(d, "leaf"), base), 1)
        self.assertTrue(dp.uses(os.path.join(d, "link")))
        self.assertTrue(dp.uses(os.path.join(d, "x", "..", "leaf")))
        self.assertFalse(dp.uses(os.path.join(d, "other")))


class DataPathSuite(QemuFixtureMixin):
    """Registry and quiesce tests; the qemu ones reuse the kind suite's helpers."""

    async def register(self, *dps: DataPath) -> None:
        """Write records as the kinds would at activate."""

        async def write(tx: Any) -> None:
            for dp in dps:
                for path, value in dp.nodes().items():
                    await tx.write(path, value)

        for dd in {dp.driverDomid for dp in dps}:
            await self.xs.mkdir(registryDir(dd))
        await self.xs.transact(write)

    def sharedTaps(self) -> list[DataPath]:
        """Five tapdisks over /srv/parent.vhd in domains 0 and 3, one elsewhere."""
        parent = "/srv/parent.vhd"
        users = [
            tapRecord(dd, f"t{i}", (f"/srv/t{i}.vhd", parent), i)
            for i, dd in enumerate((0, 3, 0, 3, 3))
        ]
        return [*users, tapRecord(3, "other", ("/srv/o.vhd", "/srv/p2.vhd"), 9)]

    @deferredTest
    async def test_findAcrossDomains(self) -> None:
        """
        The registry is rebuilt from XenStore alone: every user of the
        shared parent in domains 0 and 3 is found, by the parent or by a
        leaf, and nothing else.
        """
        dps = self.sharedTaps()
        await self.register(*dps)
        self.assertEqual(
            sorted(await scanRegistry(self.xs), key=lambda d: d.vdi),
            sorted(dps, key=lambda d: d.vdi),
        )
        found = await findDataPaths(self.xs, "/srv/parent.vhd")
        self.assertEqual(
            {(d.driverDomid, d.vdi) for d in found},
            {(0, "t0"), (3, "t1"), (0, "t2"), (3, "t3"), (3, "t4")},
        )
        self.assertEqual([d.vdi for d in await findDataPaths(self.xs, "/srv/t3.vhd")], ["t3"])
        self.assertEqual(await readRecord(self.xs, 3, "nothing"), None)

    @deferredTest
    async def test_quiesceResume(self) -> None:
        """
        quiesce pauses every user of the parent (through the tap pauser),
        the handle lists them, resume(reload=True) unpauses each with reload.
        """
        await self.register(*self.sharedTaps())
        pauser = FakeTapPauser()
        control = DataPathControl(self.xs, {"tap": pauser})
        handle = await control.quiesce("/srv/parent.vhd")
        self.assertEqual(len(handle.paused), 5)
        self.assertEqual(len(pauser.paused), 5)
        await control.resume(handle)
        self.assertEqual(pauser.paused, set())
        self.assertEqual(handle.paused, [])
        self.assertEqual({r for op, _, _, r in pauser.log if op == "resume"}, {True})

    @deferredTest
    async def test_failureResumesEverything(self) -> None:
        """
        The third pause fails: QuiesceError names it, the others are
        resumed (without reload), nothing is left paused and the tree is as
        before.
        """
        await self.register(*self.sharedTaps())
        before = await dumpTree(self.xs)
        pauser = FakeTapPauser(failOn=3)
        control = DataPathControl(self.xs, {"tap": pauser})
        with self.assertRaises(QuiesceError) as cm:
            await control.quiesce("/srv/parent.vhd")
        self.assertEqual(len(cm.exception.failures), 1)
        self.assertEqual(cm.exception.resumeFailures, [])
        self.assertEqual(pauser.paused, set())
        self.assertEqual(sum(1 for e in pauser.log if e[0] == "resume"), 4)
        self.assertEqual({e[3] for e in pauser.log if e[0] == "resume"}, {False})
        await self.assertTreeIs(before)

    @deferredTest
    async def test_tapCoalesce(self) -> None:
        """
        A tapdisk coalesce: the (stand-in) merge runs while every user is
        paused; all are resumed with reload afterwards, also when the merge
        fails (the failure is re-raised).
        """
        await self.register(*self.sharedTaps())
        pauser = FakeTapPauser()
        control = DataPathControl(self.xs, {"tap": pauser})
        seen: list[int] = []

        async def merge(image: str) -> None:
            seen.append(len(pauser.paused))

        paused = await coalesceQuiesced(control, "/srv/parent.vhd", merge)
        self.assertEqual((seen, len(paused), pauser.paused), ([5], 5, set()))

        async def badMerge(image: str) -> None:
            raise OSError("vhd-util coalesce: exit 22")

        with self.assertRaises(OSError):
            await coalesceQuiesced(control, "/srv/parent.vhd", badMerge)
        self.assertEqual(pauser.paused, set())

    @deferredTest
    async def test_qemuQuiesceAcrossDomains(self) -> None:
        """
        Two real daemons, in driver domains 0 and 3, serve overlays of one
        parent; a tapdisk (fake pauser) uses it too. quiesce(parent) finds
        all three: the NBD exports stop answering and the images are
        released (the overlays open read-write without sharing); resume
        brings the exports back with the data intact; the tree is as before.
        """
        base, leaf0 = self.chain("leaf0")
        _, leaf3 = self.chain("leaf3", base)
        agent0, kind0 = await self.startDriverDomain(0)
        agent3, kind3 = await self.startDriverDomain(3)
        c0 = DriverDomainClient(self.xs, 0, 20.0)
        c3 = DriverDomainClient(self.xs, 3, 20.0)
        for c, name, leaf in ((c0, "a", leaf0), (c3, "b", leaf3)):
            await c.prepare(name, {"type": "file", "format": "qcow2", "params": leaf}, _VDI)
            await c.activate(name, _VDI)
        await self.register(tapRecord(3, "t", ("/srv/t.vhd", base), 4))
        d0, d3 = kind0.daemonFor(0, "a"), kind3.daemonFor(3, "b")
        assert d0 is not None and d3 is not None
        uri0, uri3 = nbdURI("a", d0.nbdPath), nbdURI("b", d3.nbdPath)
        qemuIO(uri0, "write -P 0x42 1M 1M")
        before = await dumpTree(self.xs)
        tap = FakeTapPauser()
        control = DataPathControl(self.xs, {"tap": tap, "qemu": QemuPauser(reactor, 20.0)})
        handle = await control.quiesce(base)
        self.assertEqual(
            sorted((d.driverDomid, d.vdi) for d in handle.paused), [(0, "a"), (3, "b"), (3, "t")]
        )
        for uri in (uri0, uri3):
            self.assertRaises(AssertionError, qemuIO, uri, "read 0 4k")
        for leaf in (leaf0, leaf3):
            check = subprocess.run(
                [QEMU_IO or "qemu-io", "-c", "read 0 4k", leaf], capture_output=True
            )
            self.assertEqual(check.returncode, 0, check.stderr)
        self.assertEqual(tap.paused, {(3, "t")})
        await control.resume(handle, reload=True)
        qemuIO(uri0, "read -P 0x42 1M 1M")
        qemuIO(uri3, "read -P 0x11 0 1M")
        self.assertEqual(tap.paused, set())
        await self.assertTreeIs(before, agent0, agent3)
        for c, name in ((c0, "a"), (c3, "b")):
            await c.unprepare(name, _VDI)


class RealXenstoredDataPathTests(DataPathSuite, RealXenstoredFixture, TestCase):
    """The data-path registry over the C xenstored."""


class EmbeddedXenstoredDataPathTests(DataPathSuite, EmbeddedXenstoredFixture, TestCase):
    """The data-path registry over the embedded xenstored."""
