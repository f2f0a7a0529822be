"""
The fence watchdog (xenddev.fencewatchdog, xenddev.poolwatchdog): a
process beside a pool host's daemon that pauses the host's data paths
when the daemon dies or stalls past its lease.

  - its logic on a L{Clock} with stand-in pausers: the daemon's pipe
    closing pauses every data path and writes what was paused; a deadline
    passed kills the stalled daemon first; a daemon that fenced itself
    makes it stand down; a disarm ends it without a pause; one pause
    failing or hanging leaves none of the others running;
  - the takeover: what a dead predecessor's watchdog paused is resumed
    only where the target is held here again and the process is the one
    paused;
  - a daemon (C{twistd -n xenddev}) serving a qcow2 image through a
    qemu-storage-daemon, on a xenstored of its own (which outlives it),
    killed with SIGKILL: the export is gone at the watchdog's deadline,
    before the daemon's lease expires (its activation key still under the
    same lease); the daemon started again once that lease expired joins
    anew, takes the target back and its takeover exports the image again
    (a restart before then adopts the lease: tests.test_pool_restart).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import StringTransport
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from tests.support.etcdcluster import SHARED, report
from tests.support.host import WatchedProcess, shortTempDir, spawnTwistd
from tests.test_pool_daemon import GUEST
from tests.test_xmlrpc import blockingCall
from xenddev.backendctrl.records import DataPath
from xenddev.fencewatchdog import (
    FenceWatchdog,
    WatchdogInput,
    dataPathFromJSON,
    dataPathToJSON,
    readState,
)
from xenddev.pool.etcd import EtcdClient
from xenddev.pool.keys import activeKey
from xenddev.poolwatchdog import STATE_FILE, WatchdogLink
from xenddev.qmp import connectQMP
from xenddev.xenbus import waitForState
from xenddev.xenstore.connection import connectXenStore

TTL = 3
FENCE_AFTER = 1.0
RENEW_EVERY = FENCE_AFTER / 4


def _dp(vdi: str, kind: str = "qemu", image: str = "/srv/a.qcow2", **kw: Any) -> DataPath:
    """A data path record."""
    values: dict[str, Any] = {"pid": 40, "qmp": f"/run/{vdi}.qmp"} if kind == "qemu" else {}
    if kind == "tap":
        values = {"pid": 41, "minor": 3}
    values.update(kw)
    return DataPath(0, vdi, kind, "h", image, "qcow2", (image,), extra={"x": "1"}, **values)


class _Pauser:
    """Records pauses; a vdi in C{fail} fails, one in C{hang} never answers."""

    def __init__(self, fail: set[str] | None = None, hang: set[str] | None = None) -> None:
        self.paused: list[str] = []
        self.fail = fail or set()
        self.hang = hang or set()

    def pause(self, dp: DataPath) -> Deferred[None]:
        """Pause (or fail, or hang)."""
        if dp.vdi in self.fail:
            raise RuntimeError(f"QMP socket of {dp.vdi} refused")
        if dp.vdi in self.hang:
            return Deferred()
        self.paused.append(dp.vdi)
        d: Deferred[None] = Deferred()
        d.callback(None)
        return d

    def resume(self, dp: DataPath, reload: bool) -> None:
        """Not used by the watchdog."""


class WatchdogLogicTests(SynchronousTestCase):
    """L{FenceWatchdog} on a clock, with stand-in pausers and kill."""

    def setUp(self) -> None:
        """A watchdog whose state file is in the test's directory."""
        self.clock = Clock()
        self.clock.advance(1000)
        self.kills: list[tuple[int, int]] = []
        self.qemu, self.tap = _Pauser(), _Pauser()
        os.makedirs(self.mktemp())
        self.state = os.path.join(self.mktemp(), "state.json")
        os.makedirs(os.path.dirname(self.state))
        self.watchdog = FenceWatchdog(
            self.clock,
            {"qemu": self.qemu, "tap": self.tap},
            self.state,
            4242,
            kill=lambda pid, sig: self.kills.append((pid, sig)),
            monotonic=self.clock.seconds,
            pauseTimeout=2.0,
        )
        self.paths = [_dp("a"), _dp("b", "tap", "/srv/b.vhd")]
        self.watchdog.message(
            {
                "paths": [dataPathToJSON(dp) for dp in self.paths],
                "paused": [dataPathToJSON(_dp("old"))],
            }
        )

    def test_roundTrip(self) -> None:
        """A data path's record survives the pipe's JSON."""
        for dp in self.paths:
            self.assertEqual(dataPathFromJSON(json.loads(json.dumps(dataPathToJSON(dp)))), dp)

    def test_pipeClosed(self) -> None:
        """
        The daemon's pipe closes (it stopped or died): the deadline still
        stands (nothing paused before it: a successor may adopt the lease);
        at the deadline every data path is paused, the state file lists
        them with those already paused, and the watchdog is done; nobody is
        killed (the daemon is gone).
        """
        self.watchdog.message({"until": self.clock.seconds() + 5})
        self.watchdog.inputClosed()
        self.clock.advance(4.9)
        self.assertEqual((self.qemu.paused, self.tap.paused), ([], []))
        self.assertFalse(self.watchdog.done.called)
        self.clock.advance(0.1)
        self.assertEqual((self.qemu.paused, self.tap.paused), (["a"], ["b"]))
        self.assertTrue(self.watchdog.done.called)
        state = readState(self.state)
        assert state is not None
        self.assertEqual([dp.vdi for dp in state["paused"]], ["old", "a", "b"])
        self.assertEqual(state["paused"][1], self.paths[0])
        self.assertIn("none adopted it", state["reason"])
        self.assertEqual(self.kills, [])
        self.clock.advance(10)
        self.assertEqual(self.qemu.paused, ["a"])

    def test_deadlineKillsThenPauses(self) -> None:
        """
        Nothing from the daemon past C{until}: it is stalled; killed with
        SIGKILL first, then the data paths are paused — not a moment before.
        """
        self.watchdog.message({"until": self.clock.seconds() + 2})
        self.clock.advance(1.9)
        self.assertEqual((self.kills, self.qemu.paused), ([], []))
        self.watchdog.message({"until": self.clock.seconds() + 2})  # a renewal
        self.clock.advance(1.9)
        self.assertEqual(self.kills, [])
        self.clock.advance(0.2)
        self.assertEqual(self.kills, [(4242, signal.SIGKILL)])
        self.assertEqual((self.qemu.paused, self.tap.paused), (["a"], ["b"]))
        self.assertTrue(self.watchdog.done.called)

    def test_fencedStandsDown(self) -> None:
        """
        A daemon that fenced itself (its own fence pauses) stops the
        deadline until it reports a renewal again.
        """
        self.watchdog.message({"until": self.clock.seconds() + 2})
        self.watchdog.message({"fenced": True})
        self.clock.advance(60)
        self.assertEqual((self.kills, self.qemu.paused), ([], []))
        self.watchdog.message({"until": self.clock.seconds() + 2})
        self.clock.advance(2)
        self.assertEqual(len(self.kills), 1)

    def test_disarmed(self) -> None:
        """Disarmed (the daemon left holding nothing): its pipe closing pauses nothing."""
        self.watchdog.message({"until": self.clock.seconds() + 2})
        self.watchdog.message({"disarm": True})
        self.clock.advance(5)
        self.watchdog.inputClosed()
        self.assertTrue(self.watchdog.done.called)
        self.assertEqual((self.kills, self.qemu.paused, self.tap.paused), ([], [], []))
        self.assertIsNone(readState(self.state))

    def test_failuresEachOnTheirOwn(self) -> None:
        """
        One pause failing and one hanging (cut at the pause timeout) leave
        the others paused; the state says which failed and why.
        """
        self.qemu.fail = {"a"}
        self.tap.hang = {"b"}
        c = _dp("c", image="/srv/c.qcow2", pid=50, qmp="/run/c.qmp")
        self.watchdog.message(
            {"paths": [dataPathToJSON(dp) for dp in (*self.paths, c)], "paused": []}
        )
        self.watchdog.inputClosed()
        self.assertEqual(self.qemu.paused, ["c"])
        self.assertFalse(self.watchdog.done.called)
        self.clock.advance(2.0)
        self.assertTrue(self.watchdog.done.called)
        state = readState(self.state)
        assert state is not None
        self.assertEqual([dp.vdi for dp in state["paused"]], ["c"])
        self.assertEqual(set(state["failed"]), {"a", "b"})
        self.assertIn("refused", state["failed"]["a"])

    def test_input(self) -> None:
        """Lines of JSON reach the watchdog; a bad one is skipped; the end closes it."""
        protocol = WatchdogInput(self.watchdog)
        protocol.makeConnection(StringTransport())
        protocol.dataReceived(b"not json\n")
        self.flushLoggedErrors()
        protocol.dataReceived(b'{"until": %f}\n' % (self.clock.seconds() + 1))
        protocol.connectionLost()
        self.assertEqual(self.qemu.paused, [])
        self.clock.advance(1)
        self.assertEqual(self.qemu.paused, ["a"])


class _Session:
    """What the link reads of a session."""

    ttl, fenceAfter, renewEvery = 3, 1.0, 0.25
    state = "live"
    held: frozenset[bytes] = frozenset()
    safeUntil = None


class _Control:
    """Records resumes."""

    def __init__(self) -> None:
        self.resumed: list[str] = []

    def resume(self, handle: Any, reload: bool = True) -> Deferred[None]:
        """Resume (what the handle paused)."""
        self.resumed += [dp.vdi for dp in handle.paused]
        d: Deferred[None] = Deferred()
        d.callback(None)
        return d


class TakeoverTests(TestCase):
    """L{WatchdogLink.takeOver}: what a dead predecessor's watchdog paused."""

    async def test_takeOver(self) -> None:
        """
        Resumed: the data path whose target is held here again and whose
        process is the one paused. Kept paused: one whose target is not
        held here. Dropped: one whose process changed or went.
        """
        images = shortTempDir(self, "wdimg-")
        paths = {}
        for name in ("held", "other", "moved", "gone"):
            image = os.path.join(images, f"{name}.qcow2")
            open(image, "wb").close()
            paths[name] = _dp(name, image=image, pid=100 + len(paths))
        control = _Control()
        link = WatchdogLink(reactor, None, _Session(), control, images, [0])  # type: ignore[arg-type]
        current = [paths["held"], paths["other"], _dp("moved", image=paths["moved"].image, pid=9)]

        async def scan() -> list[DataPath]:
            return current

        link._scan = scan  # type: ignore[method-assign]
        link.inherited = list(paths.values())
        held = {f"file:{os.path.realpath(paths[n].image)}" for n in ("held", "moved", "gone")}
        await link.takeOver(held)
        self.assertEqual(control.resumed, ["held"])
        self.assertEqual([dp.vdi for dp in link.inherited], ["other"])


# --- a daemon killed ------------------------------------------------------------------


class _Daemon(WatchedProcess):
    """A daemon's output; C{ready} on its ready line."""

    readyLine = b"xenddev ready"


class _Xenstored(WatchedProcess):
    """The xenstored's output."""


class KilledDaemonTests(TestCase):
    """A daemon serving a qemu data path, killed with SIGKILL, then started again."""

    async def startDaemon(self, rundir: str, config: str) -> _Daemon:
        """C{twistd -n xenddev --config}, ready."""
        proto = _Daemon()
        self.process = spawnTwistd(self, proto, rundir, "xenddev", "--config", config)
        await proto.ready
        return proto

    async def exports(self, qmp: str) -> list[Any]:
        """The qemu-storage-daemon's exports."""
        client = await connectQMP(reactor, qmp, 5.0)
        try:
            return list(await client.execute("query-block-exports"))
        finally:
            await client.close()

    async def test_killedWhileServing(self) -> None:
        """
        SIGKILL of a daemon serving a qcow2 image through a
        qemu-storage-daemon: the watchdog deletes the export at its
        deadline, before the daemon's lease can expire (its key still
        there, same lease); the daemon started again after the lease
        expired joins anew and resumes it once it took the target back.
        """
        if shutil.which("qemu-storage-daemon") is None or shutil.which("qemu-img") is None:
            raise SkipTest("qemu-storage-daemon/qemu-img (qemu-system-common, qemu-utils) missing")
        cluster = await SHARED.get(self)
        base = shortTempDir(self, "xpwd-")
        storeDir = os.path.join(base, "xs")
        os.makedirs(storeDir)
        spawnTwistd(self, _Xenstored(), storeDir, "xenstored", "--rundir", storeDir)
        socket = os.path.join(storeDir, "socket")
        deadline = time.monotonic() + 10
        while not os.path.exists(socket):
            self.assertLess(time.monotonic(), deadline, "xenstored did not start")
            await deferLater(reactor, 0.05, lambda: None)
        run = os.path.join(base, "run")
        config = os.path.join(base, "xenddev.yaml")
        with open(config, "w") as f:
            json.dump(
                {
                    "rundir": run,
                    "xenstore": f"unix:{socket}",
                    "driver_domain": {"simulate": "on"},
                    "timeouts": {"shutdown": 2, "connect": 3, "create": 10},
                    "pool": {
                        "endpoints": cluster.endpoints,
                        "host": "wd-a",
                        "ttl": TTL,
                        "fence_after": FENCE_AFTER,
                        "timeout": 0.5,
                    },
                },
                f,
            )
        proto = await self.startDaemon(base, config)
        rpc = os.path.join(run, "xenddev.sock")
        image = os.path.join(os.path.realpath(base), "wd.qcow2")
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
        qmp = dp["qmp"]
        self.assertEqual(len(await self.exports(qmp)), 1)
        observer = EtcdClient(reactor, cluster.endpoints, timeout=2)
        self.addCleanup(observer.close)
        key = activeKey(f"file:{image}")
        lease = (await observer.get(key)).lease

        killed = time.monotonic()
        os.kill(self.process.pid, signal.SIGKILL)
        while await self.exports(qmp):
            self.assertLess(time.monotonic() - killed, TTL, "not paused before the TTL")
            await deferLater(reactor, 0.01, lambda: None)
        paused = time.monotonic() - killed
        kv = await observer.get(key)
        self.assertIsNotNone(kv, "the key expired before the data path was paused")
        self.assertEqual(kv.lease, lease)
        report("SIGKILL of the daemon to its qemu data path paused", paused)
        self.assertLess(paused, TTL - RENEW_EVERY)
        await proto.ended
        while await observer.get(key) is not None:
            # The lease expires: the next daemon cannot adopt it, it joins anew.
            self.assertLess(time.monotonic() - killed, TTL + 2, "the lease did not expire")
            await deferLater(reactor, 0.05, lambda: None)
        state = readState(os.path.join(run, STATE_FILE))
        assert state is not None
        self.assertEqual([p.vdi for p in state["paused"]], [dp["vdi"]])

        began = time.monotonic()
        proto = await self.startDaemon(base, config)
        report("restart to ready (waiting out the old lease)", time.monotonic() - began)
        self.assertIn(b"Fence watchdog takeover: 1 data path(s) resumed", proto.output)
        self.assertEqual(len(await self.exports(qmp)), 1)
        self.assertFalse(os.path.exists(os.path.join(run, STATE_FILE)))
        self.assertNotEqual((await observer.get(key)).lease, lease)
        # Detached: its qemu-storage-daemon ends, its key goes; the daemon
        # then stops holding nothing, its watchdog disarmed.
        self.assertTrue(
            await deferToThread(blockingCall, rpc, "device.detach", GUEST, "vbd", "xvdb")
        )
        self.assertIsNone(await observer.get(key))
