"""
The daemons of a pool calling one another (L{xenddev.poolpeers}): the
address a host advertises in its membership, HTTP Basic with the pool's
peer credentials, the peer's faults kept with their codes, and a host that
cannot be asked refused with fault 16 — on a fake etcd, then between real
daemons on the shared etcd cluster.
"""

from __future__ import annotations

import json
import os

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from tests.support.etcdcluster import SHARED
from tests.support.fakeetcd import FakeEtcd
from tests.test_pool_daemon import PEER_PASSWORD, PEER_USER, PoolHostsMixin
from xenddev.config import ConfigError, parseConfig
from xenddev.errors import FaultCode
from xenddev.interfaces import IPoolPeers
from xenddev.pool.etcd import EtcdClient
from xenddev.pool.keys import hostKey
from xenddev.poolpeers import (
    PeerFault,
    PeerUnavailable,
    PoolPeers,
    checkAdvertise,
    readPeerCredentials,
)


class AddressTests(SynchronousTestCase):
    """What a host may advertise, and the credentials file."""

    def test_checkAdvertise(self) -> None:
        """http(s) URLs with a host and a port pass; everything else names its fault."""
        for url in ("http://10.0.0.5:8006/RPC2", "https://h.example:443/"):
            self.assertEqual(checkAdvertise(url), url)
        for url, why in (
            ("ftp://h:1/", "http"),
            ("http://:1/", "no host"),
            ("http://h/RPC2", "no port"),
            ("http://u:p@h:1/", "credentials"),
            ("http://h:99999/", "port"),
        ):
            e = self.assertRaises(ValueError, checkAdvertise, url)
            self.assertIn(why, str(e))

    def test_credentials(self) -> None:
        """The first user:password line, comments skipped; a file without one is refused."""
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("# the pool\n\npeer:s3cr:et\n")
        self.assertEqual(readPeerCredentials(path), ("peer", "s3cr:et"))
        with open(path, "w") as f:
            f.write("peer\n")
        self.assertIn(path, str(self.assertRaises(ValueError, readPeerCredentials, path)))

    def test_config(self) -> None:
        """pool.advertise needs a network listener and peer credentials, and a URL."""
        base = "pool: {endpoints: [http://127.0.0.1:2379], host: h1, %s}\n"
        good = (
            base % "advertise: 'http://127.0.0.1:8006/RPC2', peer_password_file: /p"
            + "xmlrpc: {tcp: 'tcp:8006', password_file: /p}\n"
        )
        cfg = parseConfig(good, "x.yaml", cwd="/")
        assert cfg.pool is not None
        self.assertEqual(cfg.pool.advertise, "http://127.0.0.1:8006/RPC2")
        self.assertEqual(cfg.pool.peer_password_file, "/p")
        for text, field in (
            (base % "advertise: 'http://127.0.0.1:8006/RPC2', peer_password_file: /p", "xmlrpc"),
            (
                base % "advertise: 'http://127.0.0.1:8006/RPC2'"
                + "xmlrpc: {tcp: 'tcp:8006', password_file: /p}\n",
                "peer_password_file",
            ),
            (base % "advertise: 'gopher://x:1/', peer_password_file: /p", "pool.advertise"),
        ):
            e = self.assertRaises(ConfigError, parseConfig, text, "x.yaml", cwd="/")
            self.assertIn(field, str(e))


class FakePoolTests(SynchronousTestCase):
    """Addresses read from the membership records (a fake etcd)."""

    def setUp(self) -> None:
        """A pool with host h1 advertising an address and h2 advertising none."""
        self.etcd = FakeEtcd()
        for host, info in (("h1", {"rpc": "http://127.0.0.1:1/RPC2"}), ("h2", {})):
            self.etcd.put(hostKey(host), json.dumps({"host": host, "info": info}).encode())
        self.peers = PoolPeers(reactor, self.etcd, "peer", "pw", timeout=1.0)

    def test_interface(self) -> None:
        """PoolPeers provides IPoolPeers."""
        self.assertTrue(verifyObject(IPoolPeers, self.peers))

    def test_address(self) -> None:
        """A host's advertised URL; none, or not in the pool: fault 16 naming the host."""
        self.assertEqual(self.successResultOf(self.peers.address("h1")), "http://127.0.0.1:1/RPC2")
        for host, why in (("h2", "advertises no"), ("h3", "not in the pool")):
            f = self.failureResultOf(self.peers.address(host), PeerUnavailable)
            self.assertIn(host, str(f.value))
            self.assertIn(why, str(f.value))
            self.assertEqual(f.value.faultCode, FaultCode.UNAVAILABLE)

    def test_faultCodes(self) -> None:
        """A peer's known fault code is kept; an unknown one reads as generic."""
        self.assertEqual(PeerFault("h", "m", 12, "busy").faultCode, FaultCode.DEVICE_EXISTS)
        unknown = PeerFault("h", "m", 8001, "no such method")
        self.assertEqual(unknown.faultCode, FaultCode.GENERIC)
        self.assertIn("host h (m): no such method", str(unknown))


class PeerDaemonTests(PoolHostsMixin, TestCase):
    """Daemons as hosts advertising their TCP listeners on the shared cluster."""

    async def test_calls(self) -> None:
        """
        A client with the pool's credentials calls each host by name; a
        peer's fault keeps its code; wrong credentials, a host not in the
        pool and a host that died are fault 16 naming the host.
        """
        cluster = await SHARED.get(self)
        a, b = await gatherResults(
            [
                Deferred.fromCoroutine(self.startHost(n, cluster.endpoints, peers=True))
                for n in ("peer-a", "peer-b")
            ],
            consumeErrors=True,
        )
        etcd = EtcdClient(reactor, cluster.endpoints, timeout=2.0)
        self.addCleanup(etcd.close)
        peers = PoolPeers(reactor, etcd, PEER_USER, PEER_PASSWORD, timeout=5.0)
        for host in (a, b):
            self.assertEqual(await peers.address(host.name), host.url)
            status = await peers.call(host.name, "daemon.status")
            self.assertIn("vbd", status["classes"])
        # Each daemon's own pool view names both, with their addresses.
        hosts = await peers.call(a.name, "pool.hosts")
        urls = {h["name"]: h["info"].get("rpc") for h in hosts}
        self.assertEqual(urls[a.name], a.url)
        self.assertEqual(urls[b.name], b.url)
        f = await self.assertFailure(peers.call(b.name, "device.list", 999999, "vbd"), PeerFault)
        self.assertEqual(f.faultCode, FaultCode.INVALID_DOMAIN)
        self.assertIn("peer-b", str(f))
        wrong = PoolPeers(reactor, etcd, PEER_USER, "wrong", timeout=5.0)
        e = await self.assertFailure(wrong.call(a.name, "daemon.status"), PeerUnavailable)
        self.assertIn("peer-a", str(e))
        await self.assertFailure(peers.call("peer-none", "daemon.status"), PeerUnavailable)
        # Killed: its record lives on for the TTL, but nobody answers.
        os.kill(b.process.pid, 9)
        await b.proto.ended
        e = await self.assertFailure(peers.call(b.name, "daemon.status"), PeerUnavailable)
        self.assertIn("peer-b", str(e))
