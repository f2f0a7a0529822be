"""
Daemons as hosts of a pool (issue 14): several C{twistd -n xenddev} on
this machine, each with its own run directory and embedded xenstored
(SIMULATED backends and guests), all in one pool on a real 3-member etcd
cluster (tests/support/etcdcluster.py), driven through XML-RPC and the
CLI as a user would.

  - two hosts race to attach one image read-write: exactly one wins each
    time, the loser's store is untouched and its fault names the winner;
    C{pool-hosts} and C{vdi-where} say so;
  - the holder killed with SIGKILL: the other host is refused until the
    holder's lease expires (its TTL), then attaches;
  - the holder stopped with SIGSTOP past its self-fence deadline: on
    waking it pauses its data path (a qemu-storage-daemon) before its
    lease could expire, then recovers on the same lease;
  - all of etcd down: attaches are refused with fault 16 and nothing is
    written, the running device is untouched; attaches work again once
    etcd is back;
  - without C{pool:}: one host's guard (two guests writing one image
    refused, C{w!} allowed), C{pool-hosts} this host alone.

Timings: lease TTL 3 s, self-fence after 1 s, renewals every 0.25 s.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import xmlrpc.client
from typing import Any

import attrs
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, TestCase

from tests.support.etcdcluster import SHARED, EtcdCluster, freePorts, report, startCluster
from tests.support.host import WatchedProcess, shortTempDir, spawnTwistd
from tests.support.treedump import diffTrees, dumpTree
from tests.test_cli import run
from tests.test_xmlrpc import blockingCall
from xenddev.cli import EXIT_EXISTS
from xenddev.pool.etcd import EtcdClient
from xenddev.pool.keys import activeKey
from xenddev.xenbus import waitForState
from xenddev.xenstore.connection import connectXenStore

GUEST = 5
TTL = 3
#: The credentials daemons started with peers call one another with.
PEER_USER = "peer"
PEER_PASSWORD = "pool-secret"
FENCE_AFTER = 1.0
RENEW_EVERY = FENCE_AFTER / 4


class _Daemon(WatchedProcess):
    """A daemon's output; C{ready} on its ready line."""

    readyLine = b"xenddev ready"


@attrs.define
class Host:
    """A daemon started as a host: its name, run directory, process and connections."""

    name: str
    rundir: str
    proto: _Daemon
    process: Any
    xs: Any = None
    #: Its XML-RPC URL on loopback, when started with peers.
    url: str | None = None

    @property
    def socket(self) -> str:
        """Its XML-RPC socket."""
        return os.path.join(self.rundir, "run", "xenddev.sock")

    @property
    def store(self) -> str:
        """Its embedded xenstored's socket."""
        return os.path.join(self.rundir, "run", "xenstored", "socket")

    @property
    def output(self) -> str:
        """What it logged so far."""
        return self.proto.output.decode(errors="replace")


def _image(directory: str, name: str, size: int = 1 << 20) -> str:
    """A sparse raw image."""
    path = os.path.join(directory, name)
    with open(path, "wb") as f:
        f.truncate(size)
    return path


class PoolHostsMixin:
    """Starts daemons as hosts of a pool and calls them; mixed with TestCase."""

    addCleanup: Any
    assertEqual: Any
    assertIn: Any
    fail: Any

    async def startHost(
        self, name: str, endpoints: list[str] | None, peers: bool = False, **extra: Any
    ) -> Host:
        """
        A daemon with C{pool:} on C{endpoints} (None: no pool), ready;
        stopped at cleanup. With C{peers}, it listens on a loopback TCP
        port with HTTP Basic (L{PEER_USER}:L{PEER_PASSWORD}), advertises it,
        and calls the other hosts with the same credentials. C{extra}:
        more top-level configuration.
        """
        rundir = shortTempDir(self, f"xp{name[-1]}-")
        config: dict[str, Any] = {
            "rundir": os.path.join(rundir, "run"),
            "xenstore": "embedded",
            "timeouts": {"shutdown": 2, "connect": 3, "create": 10},
            **extra,
        }
        url = None
        if endpoints is not None:
            config["pool"] = {
                "endpoints": endpoints,
                "host": name,
                "ttl": TTL,
                "fence_after": FENCE_AFTER,
                "timeout": 0.5,
            }
            if peers:
                (port,) = freePorts(1)
                url = f"http://127.0.0.1:{port}/RPC2"
                passwords = os.path.join(rundir, "passwords")
                fd = os.open(passwords, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "w") as f:
                    f.write(f"{PEER_USER}:{PEER_PASSWORD}\n")
                config["xmlrpc"] = {"tcp": f"tcp:{port}", "password_file": passwords}
                config["pool"].update(advertise=url, peer_password_file=passwords)
        path = os.path.join(rundir, "xenddev.yaml")
        with open(path, "w") as f:
            json.dump(config, f)  # JSON is YAML
        proto = _Daemon()
        process = spawnTwistd(self, proto, rundir, "xenddev", "--config", path)
        await proto.ready
        host = Host(name, rundir, proto, process, url=url)
        host.xs = await connectXenStore(reactor, endpoint=UNIXClientEndpoint(reactor, host.store))
        self.addCleanup(host.xs.disconnect)
        return host

    def call(self, host: Host, method: str, *args: Any) -> Any:
        """An XML-RPC call to C{host} (in a thread)."""
        return deferToThread(blockingCall, host.socket, method, *args)

    async def fault(self, host: Host, method: str, *args: Any) -> xmlrpc.client.Fault:
        """The call fails; its fault."""
        try:
            result = await self.call(host, method, *args)
        except xmlrpc.client.Fault as f:
            return f
        self.fail(f"{method}{args!r} on {host.name} returned {result!r}")
        raise AssertionError("unreachable")

    def cli(self, host: Host, *argv: str) -> Any:
        """The command-line client against C{host}: (exit code, stdout, stderr)."""
        return deferToThread(run, [*argv, "--socket", host.socket])

    async def attach(self, host: Host, image: str, vdev: str, mode: str = "rw") -> Any:
        """device.attach of a raw image to the guest; its answer (or the Fault)."""
        spec = {"spec": f"format=raw, vdev={vdev}, access={mode}, target={image}"}
        try:
            return await self.call(host, "device.attach", GUEST, "vbd", spec)
        except xmlrpc.client.Fault as f:
            return f

    async def connected(self, host: Host, devid: int) -> None:
        """Wait until the simulated guest has connected the device."""
        await waitForState(host.xs, f"/local/domain/{GUEST}/device/vbd/{devid}", 4, 10)

    async def waitOutput(self, host: Host, text: str, timeout: float = 10.0) -> float:
        """Wait until C{host} logged C{text}; the time it was seen."""
        deadline = time.monotonic() + timeout
        while text not in host.output:
            if time.monotonic() > deadline:
                self.fail(f"{host.name} did not log {text!r}:\n{host.output[-3000:]}")
            await deferLater(reactor, 0.01, lambda: None)
        return time.monotonic()


class PoolDaemonTests(PoolHostsMixin, TestCase):
    """Daemons as hosts on the shared etcd cluster (tests use keys of their own)."""

    async def setUp(self) -> None:
        """The shared cluster; a directory for images."""
        self.cluster = await SHARED.get(self)
        self.images = os.path.realpath(shortTempDir(self, "xpimg-"))

    async def hosts(self, *names: str) -> list[Host]:
        """Start the named hosts together; each attaches a vif first (the guest exists)."""
        started: list[Host] = await gatherResults(
            [Deferred.fromCoroutine(self.startHost(n, self.cluster.endpoints)) for n in names],
            consumeErrors=True,
        )
        for host in started:
            await self.call(host, "device.attach", GUEST, "vif", {})
        return started

    async def test_raceOneWins(self) -> None:
        """
        Two hosts attach one image read-write at once, five times (a new
        image each time): exactly one wins, the loser's fault (12) names the
        winner and its store is untouched; pool-hosts lists both, vdi-where
        names the writer.
        """
        a, b = await self.hosts("race-a", "race-b")
        byName = {a.name: a, b.name: b}
        for n, vdev in enumerate(("xvdb", "xvdc", "xvdd", "xvde", "xvdf")):
            image = _image(self.images, f"race{n}.img")
            before = {h.name: await dumpTree(h.xs) for h in (a, b)}
            results = await gatherResults(
                [Deferred.fromCoroutine(self.attach(h, image, vdev)) for h in (a, b)]
            )
            won = [h for h, r in zip((a, b), results, strict=True) if isinstance(r, dict)]
            lost = [
                (h, r) for h, r in zip((a, b), results, strict=True) if isinstance(r, Exception)
            ]
            self.assertEqual((len(won), len(lost)), (1, 1), results)
            (loser, f), winner = lost[0], won[0]
            self.assertEqual(f.faultCode, 12, f.faultString)
            self.assertIn(f"read-write on host {winner.name}", f.faultString)
            self.assertEqual(diffTrees(before[loser.name], await dumpTree(loser.xs)), [])
        code, out, err = await self.cli(a, "pool-hosts")
        self.assertEqual(code, 0, err)
        # Hosts of other tests may be listed too (their leases expiring).
        listed = {line.split()[0]: line for line in out.splitlines()[1:]}
        self.assertIn("race-a *", listed["race-a"])
        self.assertIn("live", listed["race-b"])
        # Each host's devices, as it published them: its vif and the disks it
        # won, the five targets once each across the two.
        deadline = time.monotonic() + 5
        while True:
            hosts = {h["name"]: h for h in await self.call(b, "pool.hosts")}
            devices = [d for n in byName for d in hosts[n]["devices"] or []]
            targets = sorted(d["target"] for d in devices if "target" in d)
            if len(targets) == 5 or time.monotonic() > deadline:
                break
            await deferLater(reactor, 0.1, lambda: None)
        self.assertEqual(len(set(targets)), 5, devices)
        for name in byName:
            self.assertIn("vif", {d["class"] for d in hosts[name]["devices"]})
        self.assertTrue(all(d["mode"] == "rw" and d["token"] > 0 for d in devices if "target" in d))
        code, out, err = await self.cli(b, "vdi-where", image, "--json")
        where = json.loads(out)
        self.assertEqual(where["target"], f"file:{image}")
        self.assertIn(where["writer"]["host"], byName)
        self.assertGreater(where["writer"]["token"], 0)
        holder = byName[where["writer"]["host"]]
        (device,) = (await self.call(holder, "pool.where", image))["devices"]
        self.assertEqual((device["domain"], device["mode"]), (GUEST, "rw"))
        self.assertEqual(device["token"], where["writer"]["token"])

    async def test_killedHolderTakenAfterTtl(self) -> None:
        """
        The holder is killed (SIGKILL: no revoke): the other host is refused,
        naming it, until its lease has expired — not before — then attaches.
        """
        a, b = await self.hosts("kill-a", "kill-b")
        image = _image(self.images, "kill.img")
        self.assertIsInstance(await self.attach(a, image, "xvdb"), dict)
        await self.connected(a, 51728)
        before = await dumpTree(b.xs)
        killed = time.monotonic()
        a.process.signalProcess("KILL")
        refusals = 0
        while True:
            answer = await self.attach(b, image, "xvdb")
            if isinstance(answer, dict):
                break
            self.assertEqual(answer.faultCode, 12, answer.faultString)
            self.assertIn("on host kill-a", answer.faultString)
            if not refusals:
                self.assertEqual(diffTrees(before, await dumpTree(b.xs)), [])
            refusals += 1
            await deferLater(reactor, 0.1, lambda: None)
            self.assertLess(time.monotonic() - killed, TTL + 3)
        took = time.monotonic() - killed
        report("kill -9 of the holder to the other host's attach", took)
        self.assertGreater(refusals, 0)
        # The lease lived at least TTL after its last renewal, sent at most
        # one renewal interval before the kill.
        self.assertGreaterEqual(took, TTL - RENEW_EVERY - 0.05)
        await self.connected(b, 51728)

    async def test_stalledHolderFencesBeforeExpiry(self) -> None:
        """
        The holder, SIGSTOPped past its self-fence deadline, pauses its data
        path (a qemu-storage-daemon serving a qcow2 image) as soon as it
        wakes — while its activation key still stands under its lease —
        then renews the same lease and resumes it.
        """
        if shutil.which("qemu-storage-daemon") is None or shutil.which("qemu-img") is None:
            raise SkipTest("qemu-storage-daemon/qemu-img (qemu-system-common, qemu-utils) missing")
        (a,) = await self.hosts("stop-a")
        image = os.path.join(self.images, "stop.qcow2")
        proc = await deferToThread(
            subprocess.run,
            ["qemu-img", "create", "-q", "-f", "qcow2", image, "16M"],
            capture_output=True,
        )
        self.assertEqual(proc.returncode, 0, proc.stderr)
        spec = {"spec": f"format=qcow2, vdev=xvdb, access=rw, target={image}"}
        await self.call(a, "device.attach", GUEST, "vbd", spec)
        await self.connected(a, 51728)
        (dp,) = await self.call(a, "datapath.list")
        self.assertEqual(dp["kind"], "qemu")
        observer = EtcdClient(reactor, self.cluster.endpoints, timeout=2)
        self.addCleanup(observer.close)
        key = activeKey(f"file:{image}")
        lease = (await observer.get(key)).lease
        stopped = time.monotonic()
        os.kill(a.process.pid, signal.SIGSTOP)
        await deferLater(reactor, FENCE_AFTER + 0.4, lambda: None)
        os.kill(a.process.pid, signal.SIGCONT)
        paused = await self.waitOutput(a, "Self-fence: 1 data path(s) paused")
        kv = await observer.get(key)
        self.assertIsNotNone(kv, "the key expired before the data path was paused")
        self.assertEqual(kv.lease, lease)
        report("SIGSTOP to the data path paused", paused - stopped)
        self.assertLess(paused - stopped, TTL - RENEW_EVERY)
        self.assertIn("fences itself", a.output)
        await self.waitOutput(a, "Self-fence lifted (the lease survived): 1 data path(s) resumed")
        self.assertEqual((await observer.get(key)).lease, lease)
        # Detached: its qemu-storage-daemon (which would outlive the daemon,
        # as data paths do) ends, and its key goes.
        self.assertTrue(await self.call(a, "device.detach", GUEST, "vbd", "xvdb"))
        self.assertEqual(await self.call(a, "datapath.list"), [])
        self.assertIsNone(await observer.get(key))

    async def test_singleHost(self) -> None:
        """
        Without C{pool:}: two guests writing one image are refused (fault 12,
        nothing written), C{w!} overrides, pool-hosts lists this host alone.
        """
        host = await self.startHost("solo-a", None)
        image = _image(self.images, "solo.img")
        self.assertIsInstance(await self.attach(host, image, "xvdb"), dict)
        await self.connected(host, 51728)
        await self.call(host, "device.attach", 6, "vif", {})
        before = await dumpTree(host.xs)
        spec = {"spec": f"format=raw, vdev=xvdb, access=rw, target={image}"}
        f = await self.fault(host, "device.attach", 6, "vbd", spec)
        self.assertEqual(f.faultCode, 12)
        self.assertIn(f"file:{image} is in use on host", f.faultString)
        self.assertEqual(diffTrees(before, await dumpTree(host.xs)), [])
        code, _, err = await self.cli(host, "block-attach", "6", f"{image},raw,xvdc,rw")
        self.assertEqual(code, EXIT_EXISTS, err)
        code, out, err = await self.cli(host, "block-attach", "6", f"file:{image}", "xvdc", "w!")
        self.assertEqual((code, err), (0, ""))
        code, out, err = await self.cli(host, "pool-hosts", "--json")
        (me,) = json.loads(out)
        self.assertEqual(me["state"], "single host")
        shared = [d for d in me["devices"] if d["domain"] == 6 and d["class"] == "vbd"]
        self.assertEqual([(d["target"], d["mode"]) for d in shared], [(f"file:{image}", "w!")])
        code, out, err = await self.cli(host, "vdi-where", image)
        self.assertIn(f"writer   {me['name']}", out)
        self.assertIn("domain 6 xvdc (vbd 51744) w!", out)


class EtcdDownTests(PoolHostsMixin, TestCase):
    """A host whose whole etcd cluster goes down (a cluster of the test's own)."""

    async def test_allDown(self) -> None:
        """
        With every member down an attach is refused with fault 16 (etcd
        unavailable, then: the host fenced) and nothing is written; the
        running device is untouched; once etcd is back, attaches work.
        """
        cluster: EtcdCluster = await startCluster(self)
        a = await self.startHost("down-a", cluster.endpoints)
        images = os.path.realpath(shortTempDir(self, "xpimg-"))
        first, second = _image(images, "one.img"), _image(images, "two.img")
        self.assertIsInstance(await self.attach(a, first, "xvdb"), dict)
        await self.connected(a, 51728)
        before = await dumpTree(a.xs)
        cluster.stopAll()
        began = time.monotonic()
        refused = await self.attach(a, second, "xvdc")
        report("attach refused with etcd down", time.monotonic() - began)
        self.assertEqual(refused.faultCode, 16, refused.faultString)
        self.assertIn("etcd", refused.faultString)
        await self.waitOutput(a, "fences itself")
        refused = await self.attach(a, second, "xvdc")
        self.assertEqual(refused.faultCode, 16, refused.faultString)
        self.assertIn("not live", refused.faultString)
        self.assertEqual(diffTrees(before, await dumpTree(a.xs)), [])
        self.assertEqual(await a.xs.read(f"/local/domain/{GUEST}/device/vbd/51728/state"), "4")
        await cluster.restartAll()
        deadline = time.monotonic() + 15
        while not isinstance(answer := await self.attach(a, second, "xvdc"), dict):
            self.assertEqual(answer.faultCode, 16, answer.faultString)
            self.assertLess(time.monotonic(), deadline, a.output[-3000:])
            await deferLater(reactor, 0.2, lambda: None)
        await self.connected(a, 51744)

    async def test_memberThenLeaderKilled(self) -> None:
        """
        A follower killed: quorum holds and the host notices nothing (no
        self-fence, attaches work). The leader killed (the follower back):
        after the election the host keeps its lease — its activation keys
        stand under the same lease, nothing is reported lost — and attaches
        work again.
        """
        cluster: EtcdCluster = await startCluster(self)
        a = await self.startHost("quorum-a", cluster.endpoints)
        images = os.path.realpath(shortTempDir(self, "xpimg-"))
        self.assertIsInstance(await self.attach(a, _image(images, "one.img"), "xvdb"), dict)
        observer = EtcdClient(reactor, cluster.endpoints, timeout=3)
        self.addCleanup(observer.close)
        key = activeKey(f"file:{os.path.join(images, 'one.img')}")
        lease = (await observer.get(key)).lease
        leader = await cluster.leader()
        follower = next(m for m in cluster.members if m is not leader)
        cluster.kill(follower)
        began = time.monotonic()
        self.assertIsInstance(await self.attach(a, _image(images, "two.img"), "xvdc"), dict)
        report("attach with a follower dead", time.monotonic() - began)
        await deferLater(reactor, TTL, lambda: None)
        self.assertNotIn("fences itself", a.output)
        await cluster.restart(follower)
        await cluster.waitHealthy()
        cluster.kill(leader)
        began = time.monotonic()
        deadline = began + 15
        while not isinstance(
            answer := await self.attach(a, _image(images, "three.img"), "xvdd"), dict
        ):
            # During the election: etcd unavailable (16) or too slow (13).
            self.assertIn(answer.faultCode, (13, 16), answer.faultString)
            self.assertLess(time.monotonic(), deadline, a.output[-3000:])
            await deferLater(reactor, 0.2, lambda: None)
        report("attach again after the leader was killed", time.monotonic() - began)
        self.assertEqual((await observer.get(key)).lease, lease)
        self.assertNotIn("lost its pool lease", a.output)
