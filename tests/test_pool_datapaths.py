"""
The pool-wide data-path registry with daemons as hosts (issue 14, seed
002): two C{twistd -n xenddev} of one pool on the shared etcd cluster,
each calling the other over the peer channel, each serving a qcow2 leaf
through a qemu-storage-daemon; both leaves share a backing chain (leaf ->
mid -> base).

  - C{datapath.find(mid)} from either host lists both data paths, each
    naming its host; C{datapath.list(host)} one host's;
  - a pool-wide C{datapath.quiesce(mid)} pauses both (their NBD exports
    gone, checked over QMP), the other host holding its own handle;
    C{datapath.resume} resumes both;
  - C{datapath.coalesce(mid)} from the other host merges mid into base
    while both are quiesced, and both serve again;
  - a host killed with SIGKILL: a pool-wide quiesce fails naming it (fault
    16) with this host's data path resumed; its entries vanish once its
    lease has expired (its TTL), and the quiesce works again.

Timings as in C{tests.test_pool_daemon}: lease TTL 3 s, self-fence 1 s.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
import xmlrpc.client
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, TestCase

from tests.support.etcdcluster import SHARED, report
from tests.support.host import shortTempDir
from tests.test_pool_daemon import GUEST, RENEW_EVERY, TTL, Host, PoolHostsMixin
from xenddev.datapath import qemu as graph
from xenddev.qmp import connectQMP

PATTERN = "0x5a"


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    """A tool's run (no shell), its output as text."""
    return subprocess.run(argv, capture_output=True, text=True, check=False)


class PoolDataPathTests(PoolHostsMixin, TestCase):
    """Two daemons as hosts with a data path each on one chain."""

    async def setUp(self) -> None:  # type: ignore[override]
        """The shared cluster; base <- mid (holding a pattern) <- a leaf per host."""
        for tool in ("qemu-storage-daemon", "qemu-img", "qemu-io"):
            if shutil.which(tool) is None:
                raise SkipTest(f"{tool} missing (qemu-system-common, qemu-utils)")
        self.cluster = await SHARED.get(self)
        images = os.path.realpath(shortTempDir(self, "xdpimg-"))
        self.base = os.path.join(images, "base.qcow2")
        self.mid = os.path.join(images, "mid.qcow2")
        self.leaves = [os.path.join(images, f"leaf{n}.qcow2") for n in (0, 1)]

        def make() -> None:
            steps: list[tuple[str, ...]] = [
                ("qemu-img", "create", "-q", "-f", "qcow2", self.base, "16M")
            ]
            for image, parent in (
                (self.mid, self.base),
                *((leaf, self.mid) for leaf in self.leaves),
            ):
                steps.append(
                    ("qemu-img", "create", "-q", "-f", "qcow2", "-b", parent, "-F", "qcow2", image)
                )
            steps.append(("qemu-io", "-f", "qcow2", "-c", f"write -P {PATTERN} 0 64k", self.mid))
            for argv in steps:
                proc = _run(*argv)
                self.assertEqual(proc.returncode, 0, f"{argv}: {proc.stderr}")

        await deferToThread(make)

    async def twoHosts(self, prefix: str) -> tuple[Host, Host]:
        """
        Hosts C{<prefix>-a} and C{<prefix>-b} with peers, each serving its
        leaf (a: xvdb, b: xvdc, so their qemu runtime directories differ);
        the devices detached at cleanup (their daemons outlive the daemon).
        """
        started: list[Host] = await gatherResults(
            [
                Deferred.fromCoroutine(
                    self.startHost(f"{prefix}-{n}", self.cluster.endpoints, peers=True)
                )
                for n in ("a", "b")
            ],
            consumeErrors=True,
        )
        a, b = started
        for host, leaf, vdev in ((a, self.leaves[0], "xvdb"), (b, self.leaves[1], "xvdc")):
            await self.call(host, "device.attach", GUEST, "vif", {})
            spec = {"spec": f"format=qcow2, vdev={vdev}, access=rw, target={leaf}"}
            await self.call(host, "device.attach", GUEST, "vbd", spec)
            self.addCleanup(self.detach, host, vdev)
        return a, b

    async def detach(self, host: Host, vdev: str) -> None:
        """Detach (its qemu-storage-daemon ends); nothing if the daemon is gone."""
        if host.process.pid is None:
            return
        try:
            await self.call(host, "device.detach", GUEST, "vbd", vdev)
        except (xmlrpc.client.Fault, OSError):
            pass

    async def findBoth(self, host: Host, want: int = 2, timeout: float = 10.0) -> list[Any]:
        """C{datapath.find(mid)} on C{host} until it lists C{want} data paths (publishing lags)."""
        deadline = time.monotonic() + timeout
        while True:
            found: list[Any] = await self.call(host, "datapath.find", self.mid)
            if len(found) == want:
                return found
            if time.monotonic() > deadline:
                self.fail(f"find on {host.name} lists {found}, not {want}")
            await deferLater(reactor, 0.05, lambda: None)

    async def exported(self, dataPath: dict[str, Any]) -> bool:
        """Whether the data path's qemu-storage-daemon exports its disk (not paused)."""
        qmp = await connectQMP(reactor, dataPath["qmp"], 5)
        try:
            return await graph.exportedNode(qmp) is not None
        finally:
            await qmp.close()

    def inBase(self) -> Any:
        """Whether base holds mid's pattern (qemu-io's verified read)."""

        def read() -> bool:
            argv = ("qemu-io", "-r", "-U", "-f", "qcow2", "-c", f"read -P {PATTERN} 0 64k")
            return _run(*argv, self.base).returncode == 0

        return deferToThread(read)

    async def test_findQuiesceCoalesceAcrossHosts(self) -> None:
        """
        find from either host lists both data paths with their hosts; one
        quiesce pauses both, resume resumes both; a coalesce from the other
        host merges mid into base with both quiesced, and both serve again.
        """
        a, b = await self.twoHosts("dpq")
        began = time.monotonic()
        found = await self.findBoth(a)
        report("both hosts' data paths found after the attaches", time.monotonic() - began)
        self.assertEqual(sorted(dp["host"] for dp in found), [a.name, b.name])
        byHost = {dp["host"]: dp for dp in found}
        self.assertEqual(byHost[b.name]["chain"], [self.leaves[1], self.mid, self.base])
        self.assertGreater(byHost[b.name]["pid"], 0)
        self.assertEqual(sorted(dp["host"] for dp in await self.findBoth(b)), [a.name, b.name])
        (onlyB,) = await self.call(a, "datapath.list", b.name)
        self.assertEqual((onlyB["host"], onlyB["vdi"]), (b.name, "vbd-5-51744"))

        began = time.monotonic()
        held = await self.call(a, "datapath.quiesce", self.mid)
        report("pool-wide quiesce of two hosts", time.monotonic() - began)
        self.assertEqual(sorted(dp["host"] for dp in held["paused"]), [a.name, b.name])
        (peer,) = held["peers"]
        self.assertEqual(peer["host"], b.name)
        self.assertEqual(
            [h["handle"] for h in await self.call(b, "datapath.handles")], [peer["handle"]]
        )
        self.assertEqual([await self.exported(dp) for dp in found], [False, False])
        self.assertTrue(await self.call(a, "datapath.resume", held["handle"]))
        self.assertEqual([await self.exported(dp) for dp in found], [True, True])
        self.assertEqual(await self.call(b, "datapath.handles"), [])
        self.assertEqual(await self.call(a, "datapath.handles"), [])

        self.assertFalse(await self.inBase())
        began = time.monotonic()
        merged = await self.call(b, "datapath.coalesce", self.mid)
        report("pool-wide coalesce across two hosts", time.monotonic() - began)
        self.assertEqual(sorted(dp["host"] for dp in merged["paused"]), [a.name, b.name])
        self.assertTrue(await self.inBase())
        self.assertEqual([await self.exported(dp) for dp in found], [True, True])
        self.assertEqual(await self.call(a, "datapath.handles"), [])
        self.assertEqual(await self.call(b, "datapath.handles"), [])

        # The coordinator stops while it holds b's handle: its shutdown
        # resumes it (not b's deadline, timeouts.quiesce: 60 s).
        held = await self.call(a, "datapath.quiesce", self.mid)
        self.assertEqual([p["host"] for p in held["peers"]], [b.name])
        self.assertFalse(await self.exported(byHost[b.name]))
        mine = byHost[a.name]
        self.addCleanup(shutil.rmtree, os.path.dirname(mine["qmp"]), True)
        self.addCleanup(_kill, mine["pid"])
        stopped = time.monotonic()
        a.process.signalProcess("TERM")
        await a.proto.ended
        self.assertEqual(await self.call(b, "datapath.handles"), [])
        self.assertTrue(await self.exported(byHost[b.name]))
        report(
            "coordinator stopped, the other host's data path resumed", time.monotonic() - stopped
        )

    async def test_killedHost(self) -> None:
        """
        The other host is killed: a pool-wide quiesce fails naming it
        (fault 16) and this host's data path serves again; the killed
        host's entries vanish after its TTL, not before; then the quiesce
        works on this host alone.
        """
        a, b = await self.twoHosts("dpk")
        found = await self.findBoth(a)
        mine = next(dp for dp in found if dp["host"] == a.name)
        (theirs,) = await self.call(b, "datapath.list", b.name)
        # Data paths outlive their daemon: its qemu-storage-daemon (and its
        # runtime directory) are ours to end.
        self.addCleanup(shutil.rmtree, os.path.dirname(theirs["qmp"]), True)
        self.addCleanup(_kill, theirs["pid"])
        killed = time.monotonic()
        b.process.signalProcess("KILL")
        try:
            await self.call(a, "datapath.quiesce", self.mid)
        except xmlrpc.client.Fault as f:
            self.assertEqual(f.faultCode, 16, f.faultString)
            self.assertIn(f"failed on host {b.name}", f.faultString)
        else:
            self.fail("the quiesce reached a killed host")
        self.assertTrue(await self.exported(mine))
        self.assertEqual(await self.call(a, "datapath.handles"), [])
        await self.findBoth(a, want=1, timeout=TTL + 3)
        took = time.monotonic() - killed
        report("kill -9 of a host to its data paths gone from the pool", took)
        self.assertGreaterEqual(took, TTL - RENEW_EVERY - 0.05)
        held = await self.call(a, "datapath.quiesce", self.mid)
        self.assertEqual([dp["host"] for dp in held["paused"]], [a.name])
        self.assertEqual(held["peers"], [])
        self.assertTrue(await self.call(a, "datapath.resume", held["handle"], False))


def _kill(pid: int) -> None:
    """SIGKILL a process if it still runs."""
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
