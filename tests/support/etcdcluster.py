"""
A real etcd cluster on loopback ports, for the pool's tests.

L{EtcdCluster} starts Debian's C{etcd} (package C{etcd-server}, 3.4) as
C{size} members, each with its own data directory, free client and peer
ports on 127.0.0.1 and a log file, waits until every member answers
C{GET /health}, and can kill (SIGKILL), stop (SIGTERM), pause (SIGSTOP),
resume and restart any member. L{startCluster} starts one for a test and
registers the clean-up that kills whatever is left, so a failed test never
leaves an etcd behind.

The raft timings are shortened (heartbeat 50 ms, election 500 ms) so a
killed leader is replaced in about a second; the election timeout stays
ten heartbeats so two busy cores do not start spurious elections.

Optionally (never by default) the members serve their client URLs over
TLS (L{ServerTLS}: C{--cert-file}, C{--key-file}, C{--trusted-ca-file},
C{--client-cert-auth}), with a short C{--auth-token-ttl}, and
L{EtcdCluster.enableAuth} turns etcd's authentication on through the
gateway (the root user, then users with read-write on key prefixes).
"""

from __future__ import annotations

import atexit
import base64
import ctypes
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import unittest
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, FileBodyProducer, HTTPConnectionPool, ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IPolicyForHTTPS, IResponse
from zope.interface import implementer

#: Set to C{"1"} to turn "etcd unavailable" skips into failures.
REQUIRE_ENV = "XENDDEV_REQUIRE_ETCD"

#: How long a start (or restart) may take before the test fails.
START_TIMEOUT = 20.0


def etcdBinary() -> str | None:
    """The path of C{etcd}, or None when it is not installed."""
    return shutil.which("etcd")


def skipUnlessEtcd(testcase: unittest.TestCase) -> str:
    """
    The path of C{etcd}; otherwise skip the test (or fail it when
    C{XENDDEV_REQUIRE_ETCD=1}: a CI machine that should have it).
    """
    binary = etcdBinary()
    if binary is None:
        reason = "etcd is not installed (Debian: apt-get install etcd-server)"
        if os.environ.get(REQUIRE_ENV) == "1":
            testcase.fail(f"etcd required ({REQUIRE_ENV}=1): {reason}")
        raise unittest.SkipTest(reason)
    return binary


def freePorts(count: int) -> list[int]:
    """
    C{count} distinct TCP ports free on 127.0.0.1 now. Every socket stays
    bound until all are chosen, so no port is handed out twice.
    """
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@attrs.define
class EtcdMember:
    """One member: its name, ports, data directory, log file and process."""

    name: str
    clientPort: int
    peerPort: int
    dataDir: str
    logPath: str
    process: subprocess.Popen[bytes] | None = None
    paused: bool = False
    scheme: str = "http"

    @property
    def clientURL(self) -> str:
        """The member's client URL (where the v3 JSON gateway answers)."""
        return f"{self.scheme}://127.0.0.1:{self.clientPort}"

    @property
    def peerURL(self) -> str:
        """The member's peer URL (raft)."""
        return f"http://127.0.0.1:{self.peerPort}"

    @property
    def running(self) -> bool:
        """Whether its process is alive (a paused member counts as running)."""
        return self.process is not None and self.process.poll() is None


def _dieWithParent() -> None:
    """
    In the child, before etcd runs: be SIGKILLed when the test process
    dies (Linux's PR_SET_PDEATHSIG), so a killed trial leaves no etcd.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


@attrs.frozen
class ServerTLS:
    """
    TLS on the members' client URLs: their certificate and key, the CA
    their clients' certificates must chain to, and whether one is required.
    """

    certFile: str
    keyFile: str
    caFile: str
    clientCertAuth: bool = True


@implementer(IPolicyForHTTPS)
class _ClientPolicy:
    """The cluster's own HTTPS connections (health, status) with a client's TLS."""

    def __init__(self, tls: Any) -> None:
        self._tls = tls

    def creatorForNetloc(self, hostname: bytes, port: int) -> Any:
        """The client's TLS settings for C{hostname}."""
        return self._tls.creatorFor(hostname.decode("ascii"))


class EtcdCluster:
    """
    A real etcd cluster of C{size} members on loopback.

    @param tls: serve the client URLs over TLS (default: plain http).
    @param clientTLS: the L{xenddev.pool.etcdtls.ClientTLS} the cluster's
        own requests use (needed with C{tls}).
    @param authTokenTTL: etcd's C{--auth-token-ttl} (seconds), when given.
    @ivar members: the members, in start order.
    """

    def __init__(
        self,
        reactor: Any,
        baseDir: str | None = None,
        size: int = 3,
        binary: str = "etcd",
        tls: ServerTLS | None = None,
        clientTLS: Any = None,
        authTokenTTL: int | None = None,
    ) -> None:
        self._reactor = reactor
        self._binary = binary
        self.tls = tls
        self._authTokenTTL = authTokenTTL
        self._ownsBase = baseDir is None
        self.baseDir = baseDir or tempfile.mkdtemp(prefix="xenddev-etcd-")
        os.makedirs(self.baseDir, exist_ok=True)
        ports = freePorts(2 * size)
        # A token per cluster: members of two test clusters can never join
        # each other even if a port were reused between them.
        self.token = f"xenddev-test-{os.getpid()}-{ports[0]}"
        self.members = [
            EtcdMember(
                name=f"m{i}",
                clientPort=ports[2 * i],
                peerPort=ports[2 * i + 1],
                dataDir=os.path.join(self.baseDir, f"m{i}.etcd"),
                logPath=os.path.join(self.baseDir, f"m{i}.log"),
                scheme="https" if tls is not None else "http",
            )
            for i in range(size)
        ]
        self._pool = HTTPConnectionPool(reactor, persistent=False)
        if tls is not None:
            assert clientTLS is not None, "a TLS cluster needs the client TLS its helpers use"
            self._agent = Agent(
                reactor, _ClientPolicy(clientTLS), connectTimeout=1, pool=self._pool
            )
        else:
            self._agent = Agent(reactor, connectTimeout=1, pool=self._pool)

    @property
    def endpoints(self) -> list[str]:
        """Every member's client URL."""
        return [m.clientURL for m in self.members]

    def _command(self, member: EtcdMember) -> list[str]:
        """The command line of one member."""
        initial = ",".join(f"{m.name}={m.peerURL}" for m in self.members)
        return [
            self._binary,
            "--name",
            member.name,
            "--data-dir",
            member.dataDir,
            "--listen-client-urls",
            member.clientURL,
            "--advertise-client-urls",
            member.clientURL,
            "--listen-peer-urls",
            member.peerURL,
            "--initial-advertise-peer-urls",
            member.peerURL,
            "--initial-cluster",
            initial,
            "--initial-cluster-token",
            self.token,
            "--initial-cluster-state",
            "new",
            "--heartbeat-interval",
            "50",
            "--election-timeout",
            "500",
            "--log-level",
            "warn",
            *self._securityFlags(),
        ]

    def _securityFlags(self) -> list[str]:
        """The TLS and authentication flags, when asked for."""
        flags = []
        if self.tls is not None:
            flags += [
                "--cert-file",
                self.tls.certFile,
                "--key-file",
                self.tls.keyFile,
                "--trusted-ca-file",
                self.tls.caFile,
            ]
            if self.tls.clientCertAuth:
                flags.append("--client-cert-auth")
        if self._authTokenTTL is not None:
            flags += ["--auth-token-ttl", str(self._authTokenTTL)]
        return flags

    def _spawn(self, member: EtcdMember) -> None:
        """Start one member's process (its log appended to its log file)."""
        with open(member.logPath, "ab") as log:
            member.process = subprocess.Popen(
                self._command(member),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_dieWithParent,
            )
        member.paused = False

    async def start(self) -> None:
        """Start every member and wait until each answers healthy."""
        for member in self.members:
            self._spawn(member)
        await self.waitHealthy()

    async def health(self, member: EtcdMember) -> bool:
        """Whether C{member} answers C{GET /health} with C{"health": "true"}."""
        try:
            d = self._agent.request(b"GET", (member.clientURL + "/health").encode())
            d.addTimeout(1.0, self._reactor)
            response = await d
            body = await readBody(response)
        except Exception:
            return False
        try:
            return bool(json.loads(body).get("health") == "true")
        except ValueError:
            return False

    async def waitHealthy(
        self, members: list[EtcdMember] | None = None, timeout: float = START_TIMEOUT
    ) -> None:
        """Wait until each of C{members} (default: every running one) is healthy."""
        chosen = members if members is not None else [m for m in self.members if m.running]
        deadline = time.monotonic() + timeout
        for member in chosen:
            while not await self.health(member):
                if not member.running:
                    raise RuntimeError(f"etcd member {member.name} exited: {self.log(member)}")
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"etcd member {member.name} not healthy after {timeout}s: "
                        f"{self.log(member)}"
                    )
                await sleep(self._reactor, 0.05)

    async def status(self, member: EtcdMember) -> dict[str, Any]:
        """C{member}'s C{/v3/maintenance/status} answer (its id, the leader's id)."""
        d = self._agent.request(
            b"POST",
            (member.clientURL + "/v3/maintenance/status").encode(),
            bodyProducer=FileBodyProducer(io.BytesIO(b"{}")),
        )
        d.addTimeout(2.0, self._reactor)
        response = await d
        answer: dict[str, Any] = json.loads(await readBody(response))
        return answer

    async def post(self, path: str, body: Mapping[str, Any], token: str = "") -> dict[str, Any]:
        """
        POST C{body} to the gateway's C{path} (C{/v3/...}) on the first
        running member; its JSON answer (an C{error} in it is raised).
        """
        member = next(m for m in self.members if m.running and not m.paused)
        headers = Headers({b"content-type": [b"application/json"]})
        if token:
            headers.addRawHeader(b"authorization", token.encode("ascii"))
        d = self._agent.request(
            b"POST",
            (member.clientURL + path).encode(),
            headers,
            FileBodyProducer(io.BytesIO(json.dumps(body).encode())),
        )
        d.addTimeout(10.0, self._reactor)
        response = await d
        answer: dict[str, Any] = json.loads(await readBody(response))
        if "error" in answer:
            raise RuntimeError(f"etcd {path}: {answer}")
        return answer

    async def enableAuth(
        self, rootPassword: str, users: Mapping[str, tuple[str, Sequence[bytes]]] | None = None
    ) -> None:
        """
        Turn etcd's authentication on: each of C{users} (name -> password,
        key prefixes) with a role of its own granting read-write on each
        prefix, the C{root} user with the C{root} role, then C{auth/enable}.
        """

        def b64(data: bytes) -> str:
            return base64.b64encode(data).decode("ascii")

        for name, (password, prefixes) in (users or {}).items():
            await self.post("/v3/auth/user/add", {"name": name, "password": password})
            await self.post("/v3/auth/role/add", {"name": name})
            for prefix in prefixes:
                end = prefix[:-1] + bytes([prefix[-1] + 1])
                perm = {"permType": "READWRITE", "key": b64(prefix), "range_end": b64(end)}
                await self.post("/v3/auth/role/grant", {"name": name, "perm": perm})
            await self.post("/v3/auth/user/grant", {"user": name, "role": name})
        await self.post("/v3/auth/user/add", {"name": "root", "password": rootPassword})
        await self.post("/v3/auth/user/grant", {"user": "root", "role": "root"})
        await self.post("/v3/auth/enable", {})

    async def leader(self, timeout: float = 10.0) -> EtcdMember:
        """
        The member that is the raft leader, once the running members agree
        on one (waits through an election).
        """
        deadline = time.monotonic() + timeout
        while True:
            ids: dict[str, EtcdMember] = {}
            leaders = set()
            for member in self.members:
                if not member.running or member.paused:
                    continue
                try:
                    status = await self.status(member)
                except Exception:
                    continue
                ids[status["header"]["member_id"]] = member
                leaders.add(status.get("leader"))
            if len(leaders) == 1:
                (leaderId,) = leaders
                if leaderId in ids:
                    return ids[leaderId]
            if time.monotonic() > deadline:
                raise RuntimeError(f"the members name no single running leader: {leaders}")
            await sleep(self._reactor, 0.05)

    def kill(self, member: EtcdMember) -> None:
        """SIGKILL C{member} and reap it."""
        self._signal(member, signal.SIGKILL)
        self._reap(member)

    def stop(self, member: EtcdMember) -> None:
        """SIGTERM C{member}, wait for it to exit (SIGKILL after 5 s)."""
        self._signal(member, signal.SIGTERM)
        self._reap(member, 5.0)

    def pause(self, member: EtcdMember) -> None:
        """SIGSTOP C{member}: it holds its sockets but answers nothing."""
        self._signal(member, signal.SIGSTOP)
        member.paused = True

    def resume(self, member: EtcdMember) -> None:
        """SIGCONT a paused member."""
        self._signal(member, signal.SIGCONT)
        member.paused = False

    async def restart(self, member: EtcdMember) -> None:
        """Start a stopped or killed member again on its data and wait until healthy."""
        if member.running:
            self.stop(member)
        self._spawn(member)
        await self.waitHealthy([member])

    async def restartAll(self) -> None:
        """Start every stopped member again on its data and wait until all are healthy."""
        for member in self.members:
            if not member.running:
                self._spawn(member)
        await self.waitHealthy()

    def stopAll(self) -> None:
        """SIGKILL every member (a test cluster keeps no data worth a clean stop)."""
        for member in self.members:
            if member.running:
                self.kill(member)

    async def cleanup(self) -> None:
        """Kill everything, close the health checker's connections, remove the data."""
        self.stopAll()
        await self._pool.closeCachedConnections()
        if self._ownsBase:
            shutil.rmtree(self.baseDir, ignore_errors=True)

    def log(self, member: EtcdMember, tail: int = 2000) -> str:
        """The end of C{member}'s log (for failure messages)."""
        try:
            with open(member.logPath, "rb") as f:
                return f.read().decode("utf-8", "replace")[-tail:]
        except OSError:
            return ""

    def _signal(self, member: EtcdMember, signum: int) -> None:
        """Send C{signum} to a running member (a paused one is woken before it dies)."""
        if member.process is None or member.process.poll() is not None:
            return
        member.process.send_signal(signum)
        if signum in (signal.SIGKILL, signal.SIGTERM) and member.paused:
            member.process.send_signal(signal.SIGCONT)

    def _reap(self, member: EtcdMember, timeout: float = 5.0) -> None:
        """Wait for C{member}'s process to exit (SIGKILL it if it does not in time)."""
        assert member.process is not None
        try:
            member.process.wait(timeout)
        except subprocess.TimeoutExpired:
            member.process.kill()
            member.process.wait()
        member.paused = False


class _Body(Protocol):
    """Collects a response body (Twisted's readBody warns on these transports)."""

    def __init__(self) -> None:
        self.data = b""
        self.done: defer.Deferred[bytes] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        """Keep it."""
        self.data += data

    def connectionLost(self, reason: Failure = Failure(ResponseDone())) -> None:  # noqa: B008
        """The whole body, or why it broke."""
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(self.data)
        else:
            self.done.errback(reason)


def readBody(response: IResponse) -> defer.Deferred[bytes]:
    """The body of C{response}."""
    body = _Body()
    response.deliverBody(body)
    return body.done


def report(what: str, seconds: float) -> None:
    """Log a time the pool's tests measured (trial keeps it in its test.log)."""
    Logger().info("pool measure: {what} {ms:.1f} ms", what=what, ms=seconds * 1000)


def sleep(reactor: IReactorTime, seconds: float) -> defer.Deferred[None]:
    """A Deferred that fires after C{seconds} on C{reactor}."""
    return task.deferLater(reactor, seconds, lambda: None)


async def startCluster(testcase: TestCase, size: int = 3) -> EtcdCluster:
    """
    Start a real etcd cluster for C{testcase} (skipped without etcd) in the
    test's temporary directory; its clean-up kills every member.
    """
    from twisted.internet import reactor

    binary = skipUnlessEtcd(testcase)
    cluster = EtcdCluster(reactor, testcase.mktemp(), size=size, binary=binary)
    testcase.addCleanup(cluster.cleanup)
    await cluster.start()
    return cluster


class SharedCluster:
    """
    One cluster for the tests of a module that do not break it (starting
    one costs about two seconds): started by the first test that asks,
    started again if a test left it broken, killed when the test process
    exits (trial has no per-class tear-down; the members also die with the
    process that started them). Tests sharing it use keys of their own.
    """

    def __init__(self) -> None:
        self.cluster: EtcdCluster | None = None
        self._registered = False

    async def get(self, testcase: TestCase) -> EtcdCluster:
        """The running shared cluster (skipped without etcd)."""
        from twisted.internet import reactor

        binary = skipUnlessEtcd(testcase)
        cluster = self.cluster
        if cluster is not None and all(m.running and not m.paused for m in cluster.members):
            return cluster
        if self.cluster is None and not self._registered:
            atexit.register(self.stop)
            self._registered = True
        self.stop()
        cluster = self.cluster = EtcdCluster(reactor, size=3, binary=binary)
        await cluster.start()
        return cluster

    def stop(self) -> None:
        """Kill the shared cluster and remove its data."""
        cluster, self.cluster = self.cluster, None
        if cluster is not None:
            cluster.stopAll()
            shutil.rmtree(cluster.baseDir, ignore_errors=True)


#: The cluster the pool's test modules share.
SHARED = SharedCluster()
