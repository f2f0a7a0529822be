"""
TLS and etcd's own authentication for the pool's etcd client (issue 14):
C{pool.ca_file}, C{cert_file}, C{key_file}, C{user}, C{password_file}.

  - the settings, checked together before anything connects, each refusal
    naming its field (and its line in the config file);
  - the token keeper (one authentication for every caller waiting, a
    rejected token dropped) and the typing of etcd's refusals, alone;
  - a real 3-member etcd 3.4 cluster serving its client URLs over TLS with
    C{--client-cert-auth} and authentication on (certificates made at test
    time, C{--auth-token-ttl 1}): keys, leases and watches with a user's
    token; an expired token renewed once, for calls and for watches; a
    restarted member (which forgot its tokens); a wrong CA, no client
    certificate, an address the certificate does not name, a wrong
    password, a user without permission, no user — each refused at once
    with a message saying what to change, and no password or token in any
    log line;
  - a daemon (C{twistd -n xenddev}) joining that pool from its config and
    taking an activation under its user.
"""

from __future__ import annotations

import atexit
import datetime
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.logger import LogEvent, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse
from zope.interface import implementer

from tests.support.certs import CertificateAuthority, writeSecret
from tests.support.etcdcluster import EtcdCluster, ServerTLS, report, skipUnlessEtcd
from tests.support.host import WatchedProcess, shortTempDir, spawnTwistd
from tests.test_cli import run
from tests.test_pool_daemon import GUEST, Host
from tests.test_xmlrpc import blockingCall
from xenddev.config import ConfigError, parseConfig
from xenddev.pool import etcdwire as wire
from xenddev.pool.errors import (
    EtcdAuthError,
    EtcdError,
    EtcdUnavailable,
    PoolSettingError,
    TokenRejected,
)
from xenddev.pool.etcd import EtcdClient
from xenddev.pool.etcdauth import NO_TOKEN, EtcdCredentials, TokenKeeper, classify
from xenddev.pool.etcdsecurity import EtcdSecurity, loadEtcdSecurity
from xenddev.pool.etcdtls import loadClientTLS
from xenddev.pool.etcdwatch import cancelError
from xenddev.pool.keys import activeKey
from xenddev.xenstore.connection import connectXenStore

ROOT_PASSWORD = "root-Secret-0c17"
#: The daemons' user: read-write on the pool's prefix only (docs/pool.md).
POOL_USER, POOL_PASSWORD = "xenddev", "pool-Secret-5b2e"
#: The tests' own user: read-write on their keys' prefix.
TEST_USER, TEST_PASSWORD = "tester", "test-Secret-91d4"
TEST_PREFIX = b"/tls-tests/"
#: etcd's --auth-token-ttl: a token unused this long is forgotten.
TOKEN_TTL = 1
HTTPS = ["https://127.0.0.1:2379"]


class _Daemon(WatchedProcess):
    """A daemon's output; C{ready} on its ready line."""

    readyLine = b"xenddev ready"


class PKI:
    """Certificates for one test run: a CA, another CA, a server, clients."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.ca = CertificateAuthority(directory, "ca")
        self.otherCA = CertificateAuthority(directory, "other-ca")
        # The members' certificate names their IP address only, so a member
        # reached as "localhost" must be refused.
        self.server = self.ca.issue("server", addresses=["127.0.0.1"], server=True, client=True)
        # etcd 3.4's gateway refuses a client certificate with a CN once
        # authentication is on: the clients' have none.
        self.client = self.ca.issue("client")

    def password(self, name: str, text: str, mode: int = 0o600) -> str:
        """A password file."""
        return writeSecret(os.path.join(self.directory, name), text, mode)


@contextmanager
def capturedLog() -> Iterator[list[str]]:
    """Every log line (formatted, with any failure) emitted while inside."""
    lines: list[str] = []

    def observe(event: LogEvent) -> None:
        text = formatEvent(event) or ""
        failure = event.get("log_failure")
        if isinstance(failure, Failure):
            text += "\n" + failure.getTraceback()
        lines.append(text)

    globalLogPublisher.addObserver(observe)
    try:
        yield lines
    finally:
        globalLogPublisher.removeObserver(observe)


# --- the settings, alone -------------------------------------------------------


class SettingsTests(SynchronousTestCase):
    """L{loadEtcdSecurity}: the rules, each refusal naming its field."""

    def setUp(self) -> None:
        """Certificates and password files in a directory of the test's own."""
        self.pki = PKI(os.path.abspath(self.mktemp()))
        self.passwordFile = self.pki.password("password", POOL_PASSWORD + "\n")

    def refused(self, field: str, words: str, **settings: Any) -> PoolSettingError:
        """The settings are refused, naming C{field}, saying C{words}."""
        endpoints = settings.pop("endpoints", HTTPS)
        with self.assertRaises(PoolSettingError) as cm:
            loadEtcdSecurity(endpoints, **settings)
        self.assertEqual(cm.exception.field, field, str(cm.exception))
        self.assertIn(words, str(cm.exception))
        self.assertTrue(str(cm.exception).startswith(f"pool.{field} = "), str(cm.exception))
        return cm.exception

    def test_loaded(self) -> None:
        """
        Good settings load: TLS with the CA and the client certificate, the
        credentials (whose repr hides the password); without a CA file the
        system's trust store; plain http needs nothing.
        """
        client = self.pki.client
        security = loadEtcdSecurity(
            HTTPS,
            caFile=self.pki.ca.certFile,
            certFile=client.certFile,
            keyFile=client.keyFile,
            user=POOL_USER,
            passwordFile=self.passwordFile,
        )
        assert security.tls is not None and security.credentials is not None
        self.assertFalse(security.tls.systemTrust)
        self.assertIsNone(security.tls.clientCommonName)
        self.assertEqual(security.credentials, EtcdCredentials(POOL_USER, POOL_PASSWORD))
        self.assertNotIn(POOL_PASSWORD, repr(security.credentials))
        self.assertNotIn(POOL_PASSWORD, repr(security))
        system = loadEtcdSecurity(HTTPS)
        assert system.tls is not None
        self.assertTrue(system.tls.systemTrust)
        self.assertEqual(loadEtcdSecurity(["http://e:1", "e:2"]), EtcdSecurity())

    def test_schemes(self) -> None:
        """
        Endpoints are all http or all https; the TLS files and a user need
        https (a user over http would send the password in clear).
        """
        self.refused("endpoints", "mixes http:// and https://", endpoints=["e:1", "https://f:2"])
        http = ["http://e:1"]
        self.refused("ca_file", "needs https://", endpoints=http, caFile=self.pki.ca.certFile)
        self.refused("cert_file", "needs https://", endpoints=http, certFile="/c")
        self.refused("key_file", "needs https://", endpoints=http, keyFile="/k")
        self.refused("user", "in clear", endpoints=http, user="u", passwordFile=self.passwordFile)

    def test_pairs(self) -> None:
        """A certificate needs its key and the reverse; a user its password and the reverse."""
        client = self.pki.client
        self.refused("cert_file", "needs pool.key_file", certFile=client.certFile)
        self.refused("key_file", "needs pool.cert_file", keyFile=client.keyFile)
        self.refused("user", "needs pool.password_file", user="u")
        self.refused("password_file", "needs pool.user", passwordFile=self.passwordFile)

    def test_files(self) -> None:
        """
        Each file is checked: present, PEM, a key its owner's alone, not
        encrypted, matching its certificate, certificates within their
        dates; a password file its owner's alone, one line, not empty.
        """
        pki, client = self.pki, self.pki.client
        self.refused("ca_file", "cannot open it: No such file", caFile="/nonexistent/ca.pem")
        self.refused("ca_file", "not a regular file", caFile=pki.directory)
        self.refused("ca_file", "holds no PEM certificate", caFile=self.passwordFile)
        os.chmod(client.keyFile, 0o644)
        self.refused(
            "key_file",
            "readable by others (mode 644): chmod 600 it",
            certFile=client.certFile,
            keyFile=client.keyFile,
        )
        os.chmod(client.keyFile, 0o600)
        other = pki.ca.issue("other")
        self.refused(
            "key_file",
            f"not the key of the certificate in pool.cert_file ({client.certFile})",
            certFile=client.certFile,
            keyFile=other.keyFile,
        )
        self.refused(
            "key_file", "not a PEM private key", certFile=client.certFile, keyFile=self.passwordFile
        )
        locked = pki.ca.issue("locked", passphrase=b"pass phrase")
        self.refused("key_file", "encrypted", certFile=locked.certFile, keyFile=locked.keyFile)
        now = datetime.datetime.now(datetime.UTC)
        old = pki.ca.issue(
            "old", notBefore=now - datetime.timedelta(days=3), notAfter=now - datetime.timedelta(1)
        )
        self.refused("cert_file", "expired on", certFile=old.certFile, keyFile=old.keyFile)
        early = pki.ca.issue(
            "early",
            notBefore=now + datetime.timedelta(days=1),
            notAfter=now + datetime.timedelta(days=2),
        )
        self.refused(
            "cert_file", "not valid before", certFile=early.certFile, keyFile=early.keyFile
        )
        for name, text, mode, words in (
            ("shared", "pw\n", 0o640, "readable by others (mode 640)"),
            ("empty", "\n", 0o600, "is empty"),
            ("twolines", "a\nb\n", 0o600, "more than one line"),
        ):
            self.refused(
                "password_file", words, user="u", passwordFile=pki.password(name, text, mode)
            )

    def test_commonNameWithUser(self) -> None:
        """
        A client certificate with a CN is refused with a user (etcd 3.4's
        gateway refuses it once authentication is on), accepted without.
        """
        named = self.pki.ca.issue("named", commonName="host-a")
        tls = loadClientTLS(None, named.certFile, named.keyFile)
        self.assertEqual(tls.clientCommonName, "host-a")
        self.refused(
            "cert_file",
            "has a Common Name (host-a)",
            certFile=named.certFile,
            keyFile=named.keyFile,
            user="u",
            passwordFile=self.passwordFile,
        )

    def test_config(self) -> None:
        """
        C{pool:} takes the keys (relative paths from the config's
        directory) and refuses a bad one naming file, line, key and value.
        """
        directory = self.pki.directory
        os.rename(self.passwordFile, os.path.join(directory, "pw"))
        base = (
            "pool:\n"
            "  endpoints: [https://127.0.0.1:2379]\n"
            "  ca_file: ca.pem\n"
            "  cert_file: client.pem\n"
            "  key_file: client.key\n"
            "  user: xenddev\n"
            "  password_file: pw\n"
        )
        pool = parseConfig(base, "f.yaml", cwd=directory).pool
        assert pool is not None
        self.assertEqual(
            (pool.ca_file, pool.key_file, pool.user, pool.password_file),
            (self.pki.ca.certFile, self.pki.client.keyFile, "xenddev", f"{directory}/pw"),
        )
        os.chmod(self.pki.client.keyFile, 0o640)
        with self.assertRaises(ConfigError) as cm:
            parseConfig(base, "f.yaml", cwd=directory)
        self.assertIn(
            f"f.yaml:5: pool.key_file = '{self.pki.client.keyFile}': readable by others",
            str(cm.exception),
        )
        with self.assertRaises(ConfigError) as cm:
            parseConfig(base.replace("user: xenddev", "user: 'a b'"), "f.yaml", cwd=directory)
        self.assertIn("f.yaml:6: pool.user = 'a b': must be an etcd user name", str(cm.exception))


# --- tokens and refusals, alone ---------------------------------------------------


class TokenKeeperTests(SynchronousTestCase):
    """L{TokenKeeper} with an authentication the test answers."""

    def setUp(self) -> None:
        """A keeper whose authentications wait for the test."""
        self.asked: list[Deferred[str]] = []

        def authenticate() -> Deferred[str]:
            d: Deferred[str] = Deferred()
            self.asked.append(d)
            return d

        self.keeper = TokenKeeper("u", authenticate)

    def test_oneAuthenticationForAll(self) -> None:
        """Callers waiting at once share one authentication; later ones get the token at once."""
        first, second = self.keeper.token(), self.keeper.token()
        self.assertEqual(len(self.asked), 1)
        self.asked[0].callback("t1")
        self.assertEqual((self.successResultOf(first), self.successResultOf(second)), ("t1", "t1"))
        self.assertEqual(self.successResultOf(self.keeper.token()), "t1")
        self.assertEqual(self.keeper.authentications, 1)

    def test_rejected(self) -> None:
        """
        A rejected token is dropped and the next caller makes a new one; a
        rejection of an older token leaves the new one alone.
        """
        d = self.keeper.token()
        self.asked[0].callback("t1")
        self.successResultOf(d)
        self.keeper.rejected("t1")
        d = self.keeper.token()
        self.asked[1].callback("t2")
        self.assertEqual(self.successResultOf(d), "t2")
        self.keeper.rejected("t1")
        self.assertEqual(self.keeper.current, "t2")
        self.assertEqual(len(self.asked), 2)

    def test_failureToAll(self) -> None:
        """A failed authentication fails every waiter; the next call tries again."""
        first, second = self.keeper.token(), self.keeper.token()
        self.asked[0].errback(EtcdAuthError(3, "etcdserver: authentication failed"))
        self.failureResultOf(first, EtcdAuthError)
        self.failureResultOf(second, EtcdAuthError)
        self.keeper.token()
        self.assertEqual(len(self.asked), 2)

    def test_cancelledWaiter(self) -> None:
        """A caller that gives up does not stop the authentication the others wait for."""
        first, second = self.keeper.token(), self.keeper.token()
        first.cancel()
        self.failureResultOf(first, CancelledError)
        self.asked[0].callback("t1")
        self.assertEqual(self.successResultOf(second), "t1")

    def test_authenticationOff(self) -> None:
        """With etcd's authentication off: no token, said once in the log."""
        with capturedLog() as lines:
            d = self.keeper.token()
            self.asked[0].callback(NO_TOKEN)
            self.assertEqual(self.successResultOf(d), NO_TOKEN)
            self.keeper.rejected(NO_TOKEN)
            d = self.keeper.token()
            self.asked[1].callback(NO_TOKEN)
        self.assertEqual(sum("authentication off" in line for line in lines), 1)


class ClassifyTests(SynchronousTestCase):
    """etcd's refusals (as 3.4.23 words them) typed, saying what to change."""

    def test_classify(self) -> None:
        """Each refusal gets its class and advice; others are left as they were."""
        for code, message, user, cls, words in (
            (16, "etcdserver: invalid auth token", "u", TokenRejected, ""),
            (3, "etcdserver: revision of auth store is old", "u", TokenRejected, ""),
            (3, "etcdserver: user name is empty", "u", TokenRejected, ""),
            (3, "etcdserver: user name is empty", None, EtcdAuthError, "set pool.user"),
            (
                3,
                "etcdserver: authentication failed, invalid user ID or password",
                "u",
                EtcdAuthError,
                "etcd refused user 'u': wrong user name or password",
            ),
            (7, "etcdserver: permission denied", "u", EtcdAuthError, "/xenddev/pool/"),
            (5, "etcdserver: requested lease not found", "u", EtcdError, ""),
        ):
            typed = classify(EtcdError(code, message), user)
            self.assertIs(type(typed), cls, message)
            self.assertIn(words, str(typed))
            self.assertEqual(typed.code, code)

    def test_cancelReason(self) -> None:
        """A watch's cancel reason is read as the gRPC error it spells."""
        error = cancelError(
            "rpc error: code = Unauthenticated desc = etcdserver: invalid auth token"
        )
        assert error is not None
        self.assertEqual((error.code, error.message), (16, "etcdserver: invalid auth token"))
        denied = cancelError(
            "rpc error: code = PermissionDenied desc = etcdserver: permission denied"
        )
        assert denied is not None
        self.assertEqual(denied.code, 7)
        self.assertIsNone(cancelError("mvcc: required revision has been compacted"))


@implementer(IResponse)
class _Answer:
    """A canned gateway answer (enough of L{IResponse} for the client)."""

    version = (b"HTTP", 1, 1)
    phrase = b"OK"
    headers = Headers()
    request = None
    previousResponse = None

    def __init__(self, code: int, body: dict[str, Any]) -> None:
        self.code = code
        self._body = json.dumps(body).encode()
        self.length = len(self._body)

    def deliverBody(self, protocol: Any) -> None:
        """The whole body at once."""
        from twisted.web.client import ResponseDone

        protocol.dataReceived(self._body)
        protocol.connectionLost(Failure(ResponseDone()))

    def setPreviousResponse(self, response: IResponse) -> None:
        """Not used."""


class _RejectingAgent:
    """An agent whose etcd authenticates anyone and then rejects every token."""

    def __init__(self) -> None:
        self.requests: list[tuple[bytes, list[bytes]]] = []

    def request(self, method: bytes, uri: bytes, headers: Any = None, body: Any = None) -> Any:
        """Answer: a token for C{authenticate}, "invalid auth token" for anything else."""
        self.requests.append((uri, (headers or Headers()).getRawHeaders(b"authorization", [])))
        if uri.endswith(b"/auth/authenticate"):
            return succeed(_Answer(200, {"token": f"tok{len(self.requests)}"}))
        error = "etcdserver: invalid auth token"
        return succeed(_Answer(401, {"error": error, "message": error, "code": 16}))


class RenewOnceTests(TestCase):
    """The client renews a rejected token once per request, then gives up."""

    async def test_renewedOnce(self) -> None:
        """
        A request whose token is rejected is sent again with a new token;
        rejected again, it fails with L{TokenRejected}: two authentications,
        two sends, each with its own token.
        """
        agent = _RejectingAgent()
        etcd = EtcdClient(
            reactor,
            HTTPS,
            apiPrefix="/v3",
            agent=agent,
            security=EtcdSecurity(credentials=EtcdCredentials("u", "pw")),
        )
        with self.assertRaises(TokenRejected):
            await etcd.get(b"/k")
        sent = [(uri.rsplit(b"/", 1)[1], auth) for uri, auth in agent.requests]
        self.assertEqual(
            sent,
            [
                (b"authenticate", []),
                (b"range", [b"tok1"]),
                (b"authenticate", []),
                (b"range", [b"tok3"]),
            ],
        )


# --- a secured cluster ------------------------------------------------------------


class SecuredCluster:
    """
    One cluster for this module: TLS on the client URLs with client
    certificates required, authentication on, tokens forgotten after
    L{TOKEN_TTL} s unused. Started by the first test that asks, killed when
    the test process exits.
    """

    def __init__(self) -> None:
        self.cluster: EtcdCluster | None = None
        self.pki: PKI | None = None
        self._directory: str | None = None

    async def get(self, testcase: TestCase) -> tuple[EtcdCluster, PKI]:
        """The running cluster and its certificates (skipped without etcd)."""
        binary = skipUnlessEtcd(testcase)
        if (
            self.cluster is not None
            and self.pki is not None
            and all(m.running and not m.paused for m in self.cluster.members)
        ):
            return self.cluster, self.pki
        self.stop()
        if self._directory is None:
            atexit.register(self.stop)
        self._directory = tempfile.mkdtemp(prefix="xenddev-etcdtls-")
        pki = self.pki = PKI(os.path.join(self._directory, "pki"))
        tls = ServerTLS(pki.server.certFile, pki.server.keyFile, pki.ca.certFile)
        cluster = self.cluster = EtcdCluster(
            reactor,
            os.path.join(self._directory, "etcd"),
            binary=binary,
            tls=tls,
            clientTLS=loadClientTLS(pki.ca.certFile, pki.client.certFile, pki.client.keyFile),
            authTokenTTL=TOKEN_TTL,
        )
        began = time.monotonic()
        await cluster.start()
        await cluster.enableAuth(
            ROOT_PASSWORD,
            {
                POOL_USER: (POOL_PASSWORD, [b"/xenddev/pool/"]),
                TEST_USER: (TEST_PASSWORD, [TEST_PREFIX]),
            },
        )
        report("secured cluster started, authentication on", time.monotonic() - began)
        return cluster, pki

    def stop(self) -> None:
        """Kill the cluster, remove its files."""
        cluster, self.cluster = self.cluster, None
        if cluster is not None:
            cluster.stopAll()
        if self._directory is not None:
            shutil.rmtree(self._directory, ignore_errors=True)


SECURED = SecuredCluster()


class SecuredClientTests(TestCase):
    """The client on the secured cluster."""

    async def setUp(self) -> None:
        """The cluster; keys under a prefix of the test's own."""
        self.cluster, self.pki = await SECURED.get(self)
        self.prefix = TEST_PREFIX + self.id().rsplit(".", 1)[1].encode() + b"/"

    def client(
        self,
        user: str | None = TEST_USER,
        password: str = TEST_PASSWORD,
        endpoints: list[str] | None = None,
        caFile: str | None = "ca",
        withCertificate: bool = True,
        **kwargs: Any,
    ) -> EtcdClient:
        """A client of the cluster, closed at cleanup."""
        pki = self.pki
        tls = loadClientTLS(
            pki.ca.certFile if caFile == "ca" else caFile,
            pki.client.certFile if withCertificate else None,
            pki.client.keyFile if withCertificate else None,
        )
        credentials = EtcdCredentials(user, password) if user is not None else None
        etcd = EtcdClient(
            reactor,
            endpoints or self.cluster.endpoints,
            security=EtcdSecurity(tls, credentials),
            **kwargs,
        )
        self.addCleanup(etcd.close)
        return etcd

    async def test_keysLeasesWatches(self) -> None:
        """
        Over TLS with the user's token: put, get, a transaction, a lease
        (grant, key under it, keepalive, time to live, revoke) and a watch
        (created only with a token) that sees the changes.
        """
        etcd = self.client()
        key = self.prefix + b"k"
        seen: list[wire.WatchEvent] = []
        watch = etcd.watch(key, seen.append)
        await watch.whenCreated()
        began = time.monotonic()
        await etcd.put(key, b"v1")
        report("put over TLS with a token", time.monotonic() - began)
        kv = await etcd.get(key)
        assert kv is not None
        self.assertEqual(kv.value, b"v1")
        txn = await etcd.txn(wire.Txn([wire.Compare.valueIs(key, b"v1")], [wire.Put(key, b"v2")]))
        self.assertTrue(txn.succeeded)
        lease = await etcd.grantLease(5)
        await etcd.put(self.prefix + b"leased", b"x", lease.id)
        self.assertGreater(await etcd.keepAlive(lease.id), 0)
        info = await etcd.leaseTimeToLive(lease.id, keys=True)
        self.assertEqual(info.keys, (self.prefix + b"leased",))
        await etcd.revokeLease(lease.id)
        self.assertIsNone(await etcd.get(self.prefix + b"leased"))
        while len(seen) < 2:
            await deferLater(reactor, 0.01, lambda: None)
        self.assertEqual([e.kv.value for e in seen], [b"v1", b"v2"])
        assert etcd.tokens is not None
        # One token for all (two if the machine stalled past its TTL).
        self.assertLessEqual(etcd.tokens.authentications, 2)

    async def test_expiredTokenRenewed(self) -> None:
        """
        A token etcd forgot (unused past C{--auth-token-ttl}) is renewed
        once and the call goes through. Neither the password nor any token
        appears in the log.
        """
        etcd = self.client()
        assert etcd.tokens is not None
        tokens: set[str] = set()
        with capturedLog() as lines:
            await etcd.put(self.prefix + b"a", b"1")
            tokens.add(etcd.tokens.current or "")
            await deferLater(reactor, TOKEN_TTL + 1.5, lambda: None)
            began = time.monotonic()
            await etcd.put(self.prefix + b"a", b"2")
            report("a call with an expired token (renewed)", time.monotonic() - began)
            tokens.add(etcd.tokens.current or "")
        self.assertEqual(etcd.tokens.authentications, 2)
        self.assertEqual(len(tokens), 2)
        self.assertTrue(any("renewing it" in line for line in lines), lines)
        for secret in (TEST_PASSWORD, *tokens):
            self.assertFalse([line for line in lines if secret in line], secret)

    async def test_memberRestartedWatch(self) -> None:
        """
        A member restarted forgets the tokens it knew (etcd's simple tokens
        live in its memory): a watch opened on it is cancelled for its
        token at creation, renews it once, is created and sees the changes.
        """
        etcd = self.client(endpoints=[self.cluster.members[0].clientURL])
        assert etcd.tokens is not None
        await etcd.put(self.prefix + b"r", b"1")
        await self.cluster.restart(self.cluster.members[0])
        seen: list[wire.WatchEvent] = []
        watch = etcd.watch(self.prefix + b"r", seen.append)
        await watch.whenCreated()
        self.assertEqual(etcd.tokens.authentications, 2)
        await etcd.put(self.prefix + b"r", b"2")
        while not seen:
            await deferLater(reactor, 0.01, lambda: None)
        self.assertEqual(seen[0].kv.value, b"2")
        self.assertEqual(etcd.tokens.authentications, 2)

    async def test_refusals(self) -> None:
        """
        A wrong password, a user without permission on a key, no user: each
        refused with L{EtcdAuthError} (fault 14) saying what to change; the
        password is in no message and no log line.
        """
        with capturedLog() as lines:
            with self.assertRaises(EtcdAuthError) as cm:
                await self.client(password="wrong-Secret-e3").get(self.prefix + b"x")
        self.assertIn(
            f"etcd refused user '{TEST_USER}': wrong user name or password", str(cm.exception)
        )
        self.assertEqual(cm.exception.faultCode, 14)
        self.assertFalse([line for line in lines if "wrong-Secret-e3" in line])
        self.assertNotIn("wrong-Secret-e3", str(cm.exception))
        with self.assertRaises(EtcdAuthError) as cm:
            await self.client(POOL_USER, POOL_PASSWORD).put(self.prefix + b"x", b"1")
        self.assertIn(f"etcd refused user '{POOL_USER}' permission", str(cm.exception))
        self.assertIn("/xenddev/pool/", str(cm.exception))
        with self.assertRaises(EtcdAuthError) as cm:
            await self.client(user=None).get(self.prefix + b"x")
        self.assertIn("set pool.user and pool.password_file", str(cm.exception))
        watch = self.client(POOL_USER, POOL_PASSWORD).watch(self.prefix + b"x", lambda e: None)
        refused = await self.assertFailure(watch.whenDone(), EtcdAuthError)
        self.assertIn("permission", str(refused))

    async def test_tlsRefused(self) -> None:
        """
        A CA that did not sign the members', no client certificate, an
        address the members' certificate does not name: every member
        refuses at once (no timeout waited) and the error says why.
        """
        cases = [
            ("wrong CA", {"caFile": self.pki.otherCA.certFile}, "certificate verify failed"),
            ("no client certificate", {"withCertificate": False}, "TLS: "),
            (
                "not its name",
                {"endpoints": [f"https://localhost:{m.clientPort}" for m in self.cluster.members]},
                "does not name its address",
            ),
        ]
        for what, settings, words in cases:
            etcd = self.client(timeout=5.0, **settings)
            began = time.monotonic()
            with self.assertRaises(EtcdUnavailable, msg=what) as cm:
                await etcd.get(self.prefix + b"x")
            took = time.monotonic() - began
            report(f"TLS refused ({what})", took)
            self.assertLess(took, 2.0, what)
            self.assertEqual(len(cm.exception.reasons), 3, cm.exception.reasons)
            for reason in cm.exception.reasons.values():
                self.assertIn(words, reason, what)

    async def test_daemon(self) -> None:
        """
        A daemon given the TLS files and its user in C{pool:} joins the
        secured pool, is listed live, and takes an image's activation
        (its key written under its user, who may write only the pool's
        prefix); it never logs its password.
        """
        pki = self.pki
        rundir = shortTempDir(self, "xptls-")
        passwordFile = pki.password(f"pool-pw-{os.getpid()}", POOL_PASSWORD + "\n")
        config = {
            "rundir": os.path.join(rundir, "run"),
            "xenstore": "embedded",
            "timeouts": {"shutdown": 2, "connect": 3, "create": 10},
            "pool": {
                "endpoints": self.cluster.endpoints,
                "host": "tls-a",
                "ttl": 3,
                "fence_after": 1.5,
                "timeout": 1.0,
                "ca_file": pki.ca.certFile,
                "cert_file": pki.client.certFile,
                "key_file": pki.client.keyFile,
                "user": POOL_USER,
                "password_file": passwordFile,
            },
        }
        path = os.path.join(rundir, "xenddev.yaml")
        with open(path, "w") as f:
            json.dump(config, f)
        proto = _Daemon()
        process = spawnTwistd(self, proto, rundir, "xenddev", "--config", path)
        began = time.monotonic()
        await proto.ready
        report("daemon joined the secured pool", time.monotonic() - began)
        host = Host("tls-a", rundir, proto, process)
        host.xs = await connectXenStore(reactor, endpoint=UNIXClientEndpoint(reactor, host.store))
        self.addCleanup(host.xs.disconnect)
        await deferToThread(blockingCall, host.socket, "device.attach", GUEST, "vif", {})
        image = os.path.join(os.path.realpath(shortTempDir(self, "xptlsimg-")), "tls.img")
        with open(image, "wb") as f:
            f.truncate(1 << 20)
        spec = {"spec": f"format=raw, vdev=xvdb, access=rw, target={image}"}
        await deferToThread(blockingCall, host.socket, "device.attach", GUEST, "vbd", spec)
        code, out, err = await deferToThread(run, ["pool-hosts", "--socket", host.socket])
        self.assertEqual(code, 0, err)
        self.assertIn("tls-a", out)
        observer = self.client(POOL_USER, POOL_PASSWORD)
        kv = await observer.get(activeKey(f"file:{image}"))
        assert kv is not None
        self.assertEqual(json.loads(kv.value)["host"], "tls-a")
        self.assertNotIn(POOL_PASSWORD, host.output)
