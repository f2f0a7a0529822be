"""
The data-path registry, quiesce/resume and coalesce (L{xenddev.datapath}):
the registry's search over records as the kinds write them, and real
qemu-storage-daemons served by two driver-domain agents (domids 0 and 3)
over one store. Run over the C xenstored and the embedded one. Tapdisks
served through agents, quiesced with the real tap pauser: test_datapath_tap.
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
from tests.test_qemu_kind import QEMU_IO, QemuFixtureMixin, qemuIO
from xenddev.backendctrl.protocol import ObjectClass
from xenddev.datapath import (
    DataPath,
    DataPathControl,
    IDataPathPauser,
    QemuPauser,
    findDataPaths,
    readRecord,
    registryDir,
    scanRegistry,
)
from xenddev.driverdomain.kinds.qemu import nbdURI
from xenddev.toolstack.client import DriverDomainClient

_VDI = ObjectClass("vdi", "vbd", "vbd")


@implementer(IDataPathPauser)
class FakeTapPauser:
    """
    A fake pauser for tests of what is built on L{DataPathControl} (the
    storage control): records who is paused; the C{failOn}-th pause fails.
    Tapdisks themselves are quiesced with the real L{TapPauser} in
    C{tests.test_datapath_tap}.
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
        dd,
        vdi,
        "tap",
        "testhost",
        chain[0],
        "vhd",
        chain,
        pid=1000 + minor,
        minor=minor,
        extra={"type": "vhd"},
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

    async def test_qemuUnprepareWhileActiveUnregisters(self) -> None:
        """
        A qemu vdi unprepared while active (no deactivate first) leaves no
        data-path record behind: the tree ends as it began.
        """
        _, leaf = self.chain("leaf")
        await self.startDriverDomain(0)
        before = await dumpTree(self.xs)
        client = DriverDomainClient(self.xs, 0, 20.0)
        await client.prepare("q", {"type": "file", "format": "qcow2", "params": leaf}, _VDI)
        await client.activate("q", _VDI)
        self.assertNotEqual(await readRecord(self.xs, 0, "q"), None)
        await client.unprepare("q", _VDI)
        self.assertEqual(await readRecord(self.xs, 0, "q"), None)
        await self.assertTreeIs(before)

    async def test_qemuQuiesceAcrossDomains(self) -> None:
        """
        Two real daemons, in driver domains 0 and 3, serve overlays of one
        parent. quiesce(parent) finds both: the NBD exports stop answering
        and the images are released (the overlays open read-write without
        sharing); resume brings the exports back with the data intact; the
        tree is as before.
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
        d0, d3 = kind0.daemonFor(0, "a"), kind3.daemonFor(3, "b")
        assert d0 is not None and d3 is not None
        uri0, uri3 = nbdURI("a", d0.nbdPath), nbdURI("b", d3.nbdPath)
        qemuIO(uri0, "write -P 0x42 1M 1M")
        before = await dumpTree(self.xs)
        control = DataPathControl(self.xs, {"qemu": QemuPauser(reactor, 20.0)})
        handle = await control.quiesce(base)
        self.assertEqual(
            sorted((d.driverDomid, d.vdi) for d in handle.paused), [(0, "a"), (3, "b")]
        )
        for uri in (uri0, uri3):
            self.assertRaises(AssertionError, qemuIO, uri, "read 0 4k")
        for leaf in (leaf0, leaf3):
            check = subprocess.run(
                [QEMU_IO or "qemu-io", "-c", "read 0 4k", leaf], capture_output=True
            )
            self.assertEqual(check.returncode, 0, check.stderr)
        await control.resume(handle, reload=True)
        qemuIO(uri0, "read -P 0x42 1M 1M")
        qemuIO(uri3, "read -P 0x11 0 1M")
        await self.assertTreeIs(before, agent0, agent3)
        for c, name in ((c0, "a"), (c3, "b")):
            await c.unprepare(name, _VDI)


class RealXenstoredDataPathTests(DataPathSuite, RealXenstoredFixture, TestCase):
    """The data-path registry over the C xenstored."""


class EmbeddedXenstoredDataPathTests(DataPathSuite, EmbeddedXenstoredFixture, TestCase):
    """The data-path registry over the embedded xenstored."""
