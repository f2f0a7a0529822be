# -*- test-case-name: tests.test_pool_etcd,tests.test_pool_etcdwire -*-
"""
A Twisted-native etcd v3 client over etcd's JSON gateway.

Every call is one C{POST} of JSON to a member's client URL
(C{/v3/kv/range}, C{/v3/kv/txn}, C{/v3/lease/grant}, ...) through
Twisted's L{Agent} on a persistent L{HTTPConnectionPool}, so nothing
blocks the reactor and a busy daemon reuses its connections. Why this and
not an existing library is in docs/pool.md.

Failover. The client talks to one member at a time. It moves to the next
when the connection fails (refused, dropped, no answer within the
attempt's timeout) or when the member answers that it cannot serve now
(gRPC Unavailable: no leader, leader changed, request timed out; or a
deadline), and stays on the member that worked. A call is bounded by
C{timeout} in all: when every member refuses the connection the call
fails at once with L{EtcdUnavailable}, otherwise it goes round the members
(with a short backoff between rounds) until C{timeout}, then fails with
L{EtcdTimeout}. Each attempt is bounded by C{attemptTimeout}, shorter
than the call's, because a follower that lost its leader holds a request
for etcd's own request timeout (about 6 s) before saying so.

A request that failed after it was sent may still have been applied: a
put or a transaction can then run twice. The pool's callers are written
for that (a transaction that takes a key "if absent or already ours", a
delete "only if ours"), so repeating them is harmless.

The gateway's path prefix: etcd 3.4 serves C{/v3/} (and still
C{/v3beta/}), 3.3 only C{/v3beta/}, 3.2 C{/v3alpha/}. Unless told, the
client reads the cluster version (C{GET /version}) once and picks it.

Security (L{EtcdSecurity}): C{https://} members are reached over TLS
(L{xenddev.pool.etcdtls}: the members' certificates checked against the
CA file or the system's store, a client certificate shown when given); a
TLS handshake that fails counts as a refused connection (nothing was
sent), so a wrong CA is reported at once rather than after the timeout.
With an etcd user (L{xenddev.pool.etcdauth}) every request carries the
user's token; a token etcd no longer accepts is renewed once and the
request sent again, within the same call's C{timeout}.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar, cast
from urllib.parse import urlsplit

from twisted.internet import error as neterror
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    wrapClientTLS,
)
from twisted.internet.interfaces import (
    IConsumer,
    IDelayedCall,
    IPushProducer,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Protocol
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import (
    URI,
    Agent,
    HTTPConnectionPool,
    RequestNotSent,
    RequestTransmissionFailed,
    ResponseDone,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory, IBodyProducer, IResponse
from zope.interface import implementer

from xenddev.errors import FaultCode, XenddevError
from xenddev.pool import etcdwire as wire
from xenddev.pool.errors import (
    EtcdAuthError,
    EtcdBadAnswer,
    EtcdError,
    EtcdTimeout,
    EtcdUnavailable,
    LeaseNotFound,
    PoolConfigError,
    TokenRejected,
)
from xenddev.pool.etcdauth import NO_TOKEN, TokenKeeper, classify, isAuthOff
from xenddev.pool.etcdsecurity import EtcdSecurity
from xenddev.pool.etcdtls import ClientTLS
from xenddev.pool.etcdwatch import Watch
from xenddev.pool.interfaces import IEtcd

__all__ = ["DEFAULT_TIMEOUT", "EtcdClient", "apiPrefixFor", "normaliseEndpoint"]

T = TypeVar("T")

#: Seconds a call may take across all members.
DEFAULT_TIMEOUT = 5.0
#: The largest answer read (etcd's own request limit is 1.5 MiB; a range
#: of many keys can be larger, but not this).
MAX_ANSWER = 64 * 1024 * 1024
#: Idle connections kept per member.
PERSISTENT_PER_MEMBER = 8

_JSON = Headers({b"content-type": [b"application/json"]})

#: What etcd 3.4's gateway answers (HTTP 400, plain text) to a client
#: certificate with a Common Name once authentication is on.
_GATEWAY_CN = b"CommonName of client sending a request against gateway"

#: Errors of a connection that was never made: the member is down (or
#: not there), so the request was certainly not applied.
_REFUSED = (neterror.ConnectError, neterror.DNSLookupError)


def normaliseEndpoint(endpoint: str) -> str:
    """
    C{endpoint} as C{http://host:port} or C{https://host:port}
    (C{host:port} alone means http); L{PoolConfigError} for anything else.
    """
    url = endpoint if "://" in endpoint else "http://" + endpoint
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise PoolConfigError(f"etcd endpoint {endpoint!r}: only http:// and https:// are known")
    try:
        port = parts.port
    except ValueError as e:
        raise PoolConfigError(f"etcd endpoint {endpoint!r}: bad port") from e
    if not parts.hostname or port is None or parts.path not in ("", "/"):
        raise PoolConfigError(f"etcd endpoint {endpoint!r}: expected {parts.scheme}://HOST:PORT")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{parts.scheme}://{host}:{port}"


def apiPrefixFor(clusterVersion: str) -> str | None:
    """
    The gateway's path prefix for an C{etcdcluster} version (C{"3.4.0"}),
    or None when the version says nothing (a cluster still starting
    answers C{"not_decided"}).
    """
    try:
        major, minor = (int(p) for p in clusterVersion.split(".")[:2])
    except ValueError:
        return None
    if (major, minor) >= (3, 4):
        return "/v3"
    if (major, minor) == (3, 3):
        return "/v3beta"
    return "/v3alpha"


@implementer(IAgentEndpointFactory)
class _MemberEndpoints:
    """
    Connects to a member: an IP address directly, a name through
    L{HostnameEndpoint}. (Agent's default, L{HostnameEndpoint} for every
    host, reports a refused connection only at its next 0.3 s attempt
    tick, and "every member is down" should be said at once.) An
    C{https} member gets TLS over that connection.
    """

    def __init__(self, reactor: Any, connectTimeout: float, tls: ClientTLS | None) -> None:
        self._reactor = reactor
        self._timeout = connectTimeout
        self._tls = tls

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        """The endpoint of C{uri}'s host and port."""
        host = uri.host.decode("ascii").strip("[]")
        endpoint: IStreamClientEndpoint
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            endpoint = HostnameEndpoint(self._reactor, host, uri.port, timeout=self._timeout)
        else:
            tcp = TCP6ClientEndpoint if address.version == 6 else TCP4ClientEndpoint
            endpoint = tcp(self._reactor, host, uri.port, timeout=self._timeout)
        if uri.scheme == b"https":
            assert self._tls is not None, "the client makes TLS settings for https members"
            return wrapClientTLS(self._tls.creatorFor(host), endpoint)
        return endpoint


@implementer(IBodyProducer)
class _Body:
    """A request body known in full (Twisted's FileBodyProducer would
    schedule its writes on the global reactor's cooperator)."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self.length = len(data)

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        """Write it all at once."""
        consumer.write(self._data)
        return succeed(None)

    def pauseProducing(self) -> None:
        """Nothing left to pause."""

    def resumeProducing(self) -> None:
        """Nothing left to resume."""

    def stopProducing(self) -> None:
        """Nothing left to stop."""


class _Collect(Protocol):
    """Reads a whole answer body (cut at L{MAX_ANSWER})."""

    def __init__(self) -> None:
        self._chunks: list[bytes] = []
        self._size = 0
        self.finished: Deferred[bytes] = Deferred(self._cancel)

    def dataReceived(self, data: bytes) -> None:
        """Keep the chunk, unless the answer grew too large."""
        self._size += len(data)
        if self._size > MAX_ANSWER:
            self._chunks = []
            assert self.transport is not None
            cast(IPushProducer, self.transport).stopProducing()
            return
        self._chunks.append(data)

    def connectionLost(self, reason: Failure = Failure(ResponseDone())) -> None:  # noqa: B008
        """The body ended: the whole of it, or why it did not arrive."""
        if self.finished.called:
            return
        if self._size > MAX_ANSWER:
            self.finished.errback(EtcdBadAnswer(f"answer larger than {MAX_ANSWER} bytes"))
        elif reason.check(ResponseDone, PotentialDataLoss):
            self.finished.callback(b"".join(self._chunks))
        else:
            self.finished.errback(reason)

    def _cancel(self, d: Deferred[bytes]) -> None:
        """Give up reading: abort the connection."""
        if self.transport is not None:
            cast(IPushProducer, self.transport).stopProducing()


async def _readBody(response: IResponse) -> bytes:
    """The whole body of C{response}."""
    collector = _Collect()
    response.deliverBody(collector)
    return await collector.finished


class _Retry(XenddevError):
    """
    An attempt that another member (or a later round) may do better with:
    the client's control flow, never seen outside it (were it to escape,
    it would mean what L{EtcdUnavailable} does).
    """

    faultCode = FaultCode.UNAVAILABLE

    def __init__(self, reason: str, refused: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.refused = refused


@implementer(IEtcd)
class EtcdClient:
    """
    An etcd v3 client for C{endpoints} (the members' client URLs).

    @param reactor: the reactor (time, TCP) every request runs on.
    @param timeout: seconds a call may take in all, across members.
    @param attemptTimeout: seconds one member may take to answer; a third
        of C{timeout} unless given.
    @param apiPrefix: the gateway's path prefix (C{/v3}); read from the
        cluster's version unless given.
    @param agent: the HTTP agent (tests); a pooled L{Agent} unless given.
    @param security: TLS for C{https://} members (the system's trust store
        unless given) and the etcd user whose token every request carries.
    @ivar tokens: the user's tokens, with a user (None without).
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        endpoints: Sequence[str],
        *,
        timeout: float = DEFAULT_TIMEOUT,
        attemptTimeout: float | None = None,
        apiPrefix: str | None = None,
        agent: Any = None,
        security: EtcdSecurity | None = None,
    ) -> None:
        if isinstance(endpoints, str):
            raise PoolConfigError("etcd endpoints: expected a list of URLs, got one string")
        self.endpoints = tuple(normaliseEndpoint(e) for e in endpoints)
        if not self.endpoints:
            raise PoolConfigError("etcd endpoints: at least one is needed")
        if len(set(self.endpoints)) != len(self.endpoints):
            raise PoolConfigError(f"etcd endpoints: duplicates in {list(self.endpoints)}")
        if timeout <= 0:
            raise PoolConfigError(f"etcd timeout: {timeout} is not a positive number of seconds")
        self.timeout = float(timeout)
        self.attemptTimeout = float(attemptTimeout or timeout / 3)
        if not 0 < self.attemptTimeout <= self.timeout:
            raise PoolConfigError(
                f"etcd attempt timeout {self.attemptTimeout} must be in (0, timeout {timeout}]"
            )
        self._reactor = reactor
        self._apiPrefix = apiPrefix
        security = security or EtcdSecurity()
        tls = security.tls
        if any(e.startswith("https://") for e in self.endpoints):
            tls = tls or ClientTLS(None, ())
        elif tls is not None:
            raise PoolConfigError("etcd TLS settings given for http:// endpoints")
        credentials = security.credentials
        #: The etcd user requests are made as (None: none).
        self.user = credentials.user if credentials is not None else None
        self.tokens: TokenKeeper | None = None
        if credentials is not None:
            name, password = credentials.user, credentials.password

            async def authenticate() -> str:
                return await self._authenticate(name, password)

            self.tokens = TokenKeeper(name, authenticate)
        self._pool = HTTPConnectionPool(reactor, persistent=True)
        self._pool.maxPersistentPerHost = PERSISTENT_PER_MEMBER
        self._agent = agent or Agent.usingEndpointFactory(
            reactor, _MemberEndpoints(reactor, self.attemptTimeout, tls), pool=self._pool
        )
        self._current = 0
        self._watches: set[Watch] = set()

    @property
    def current(self) -> str:
        """The member the next call goes to first."""
        return self.endpoints[self._current]

    # --- the API ----------------------------------------------------------

    def range(self, request: wire.Range) -> Deferred[wire.RangeResult]:
        """Run a range request."""
        return self._op(request)

    def get(self, key: bytes) -> Deferred[wire.KeyValue | None]:
        """The key-value at C{key}, or None."""

        async def get() -> wire.KeyValue | None:
            result = await self._op(wire.Range(key))
            return result.kvs[0] if result.kvs else None

        return Deferred.fromCoroutine(get())

    def put(self, key: bytes, value: bytes, lease: int = 0) -> Deferred[wire.PutResult]:
        """Write C{value} at C{key}, under C{lease} when given."""
        return self._leaseOp(wire.Put(key, value, lease), lease)

    def delete(self, key: bytes, rangeEnd: bytes = b"") -> Deferred[wire.DeleteResult]:
        """Delete C{key}, or every key of [C{key}, C{rangeEnd})."""
        return self._op(wire.Delete(key, rangeEnd))

    def txn(self, request: wire.Txn) -> Deferred[wire.TxnResult]:
        """Run a transaction."""
        return self._op(request)

    def grantLease(self, ttl: int) -> Deferred[wire.Lease]:
        """A new lease of C{ttl} seconds (etcd may grant more: see its C{ttl})."""

        async def grant() -> wire.Lease:
            answer = await self._call("/lease/grant", {"TTL": str(int(ttl))})
            return wire.Lease.fromJSON(answer)

        return Deferred.fromCoroutine(grant())

    def keepAlive(self, lease: int) -> Deferred[int]:
        """Renew C{lease} once; its TTL, or L{LeaseNotFound}."""

        async def keepAlive() -> int:
            answer = await self._call("/lease/keepalive", {"ID": str(lease)}, lease=lease)
            return wire.keepAliveTTL(lease, answer)

        return Deferred.fromCoroutine(keepAlive())

    def revokeLease(self, lease: int) -> Deferred[None]:
        """Revoke C{lease} and delete its keys."""

        async def revoke() -> None:
            await self._call("/lease/revoke", {"ID": str(lease)}, lease=lease)

        return Deferred.fromCoroutine(revoke())

    def leaseTimeToLive(self, lease: int, keys: bool = False) -> Deferred[wire.LeaseInfo]:
        """The remaining TTL of C{lease} (-1 when it is gone), and its keys if asked."""

        async def ttl() -> wire.LeaseInfo:
            body: dict[str, Any] = {"ID": str(lease)}
            if keys:
                body["keys"] = True
            return wire.LeaseInfo.fromJSON(await self._call("/lease/timetolive", body))

        return Deferred.fromCoroutine(ttl())

    def status(self) -> Deferred[wire.MemberStatus]:
        """The status of the member that answers (its id, its leader's)."""

        async def status() -> wire.MemberStatus:
            return wire.MemberStatus.fromJSON(await self._call("/maintenance/status", {}))

        return Deferred.fromCoroutine(status())

    def watch(
        self,
        key: bytes,
        callback: Callable[[wire.WatchEvent], object],
        rangeEnd: bytes = b"",
        startRevision: int = 0,
        prevKv: bool = False,
    ) -> Watch:
        """
        Watch C{key} (or the range) from C{startRevision} (0: from now).
        Each of its streams is opened with the user's token; etcd checks it
        when the watch is created, and a rejected one is renewed once.
        """
        used = [NO_TOKEN]  # the token the watch's latest stream was opened with

        async def opener(path: str, body: dict[str, Any]) -> IResponse:
            response, token = await self._openStream(path, body)
            used[0] = token
            return response

        def tokenRejected() -> None:
            if self.tokens is not None:
                self.tokens.rejected(used[0])

        watch = Watch(
            self._reactor,
            opener,
            key,
            callback,
            rangeEnd,
            startRevision,
            prevKv,
            refusal=lambda error: classify(error, self.user),
            tokenRejected=tokenRejected,
        )
        self._watches.add(watch)
        watch.whenDone().addBoth(lambda _: self._watches.discard(watch))
        watch.start()
        return watch

    def close(self) -> Deferred[None]:
        """Cancel every watch and close the idle connections."""
        for watch in list(self._watches):
            watch.cancel()
        return self._pool.closeCachedConnections()

    # --- one call, with failover -------------------------------------------

    def _op(self, request: Any) -> Deferred[Any]:
        """Run a KV request (range, put, delete, txn) and read its result."""

        async def op() -> Any:
            return request.result(await self._call(request.path, request.toJSON()))

        return Deferred.fromCoroutine(op())

    def _leaseOp(self, request: Any, lease: int) -> Deferred[Any]:
        """Run a KV request that names a lease (an unknown one is L{LeaseNotFound})."""

        async def op() -> Any:
            answer = await self._call(request.path, request.toJSON(), lease=lease)
            return request.result(answer)

        return Deferred.fromCoroutine(op())

    async def _call(
        self, path: str, body: dict[str, Any], lease: int | None = None
    ) -> dict[str, Any]:
        """POST C{body} to the gateway's C{path}; the answer, or a typed error."""
        payload = json.dumps(body).encode("utf-8")
        deadline = self._reactor.seconds() + self.timeout

        async def send(headers: Headers) -> dict[str, Any]:
            async def attempt(endpoint: str, timeout: float) -> dict[str, Any]:
                prefix = await self._prefix(endpoint)
                response = await self._agent.request(
                    b"POST", (endpoint + prefix + path).encode("ascii"), headers, _Body(payload)
                )
                data = await _readBody(response)
                return self._answer(response.code, data, lease)

            return await self._failover(path, attempt, deadline)

        answer, _ = await self._withToken(path, send, deadline)
        return answer

    async def _openStream(self, path: str, body: dict[str, Any]) -> tuple[IResponse, str]:
        """
        POST a streaming request; the response once a member accepted it,
        and the token it carried.
        """
        payload = json.dumps(body).encode("utf-8")
        deadline = self._reactor.seconds() + self.timeout

        async def send(headers: Headers) -> IResponse:
            async def attempt(endpoint: str, timeout: float) -> IResponse:
                prefix = await self._prefix(endpoint)
                response: IResponse = await self._agent.request(
                    b"POST", (endpoint + prefix + path).encode("ascii"), headers, _Body(payload)
                )
                if response.code != 200:
                    self._answer(response.code, await _readBody(response), None)
                return response

            return await self._failover(path, attempt, deadline)

        return await self._withToken(path, send, deadline)

    async def _withToken(
        self, operation: str, send: Callable[[Headers], Awaitable[T]], deadline: float
    ) -> tuple[T, str]:
        """
        Run C{send} with the user's token in its headers (none without a
        user); when etcd rejects the token, renew it once and send again.
        The result, and the token it went with.
        """
        if self.tokens is None:
            return await send(_JSON), NO_TOKEN
        renewed = False
        while True:
            token = await self._beforeDeadline(self.tokens.token(), operation, deadline)
            try:
                return await send(_withAuthorization(token)), token
            except TokenRejected as e:
                self.tokens.rejected(token)
                if renewed:
                    raise
                renewed = True
                self.log.info(
                    "etcd no longer accepts user {user}'s token ({why}); renewing it",
                    user=self.user,
                    why=e.message,
                )

    async def _beforeDeadline(self, d: Deferred[T], operation: str, deadline: float) -> T:
        """What C{d} fires with, or L{EtcdTimeout} at the call's C{deadline}."""
        if d.called:
            return await d
        timedOut = False

        def expire() -> None:
            nonlocal timedOut
            timedOut = True
            d.cancel()

        timer = self._reactor.callLater(max(0.0, deadline - self._reactor.seconds()), expire)
        try:
            return await d
        except CancelledError:
            if timedOut:
                raise EtcdTimeout(
                    operation, self.timeout, {"authenticate": "no token in time"}
                ) from None
            raise
        finally:
            if timer.active():
                timer.cancel()

    async def _authenticate(self, user: str, password: str) -> str:
        """
        A new token for C{user} (L{NO_TOKEN} when etcd has authentication
        off). Neither the password nor the token goes into a message.
        """
        payload = json.dumps({"name": user, "password": password}).encode("utf-8")
        path = "/auth/authenticate"

        async def attempt(endpoint: str, timeout: float) -> dict[str, Any]:
            prefix = await self._prefix(endpoint)
            response = await self._agent.request(
                b"POST", (endpoint + prefix + path).encode("ascii"), _JSON, _Body(payload)
            )
            data = await _readBody(response)
            return self._answer(response.code, data, None, secret=True)

        try:
            answer = await self._failover(path, attempt, self._reactor.seconds() + self.timeout)
        except EtcdError as e:
            if isAuthOff(e):
                return NO_TOKEN
            raise
        token = answer.get("token")
        if not isinstance(token, str) or not token or not token.isascii():
            raise EtcdBadAnswer("authenticate answered without a usable token")
        return token

    def _answer(
        self, status: int, data: bytes, lease: int | None, secret: bool = False
    ) -> dict[str, Any]:
        """
        Read an answer: the JSON of a success; otherwise the error, as
        L{_Retry} when another member may serve it, typed when it is a
        refusal of this host's credentials (L{classify}). C{secret}: the
        answer may hold a token, so none of it goes into an error.
        """
        try:
            answer = dict(wire.decodeJSON(data.split(b"\n", 1)[0] if data else b""))
        except EtcdBadAnswer as e:
            if status == 400 and data.startswith(_GATEWAY_CN):
                raise EtcdAuthError(
                    -1,
                    data.decode("utf-8", "replace").strip(),
                    status,
                    "etcd's gateway refuses this host's client certificate (pool.cert_file): "
                    "it has a Common Name and authentication is on; issue it without a CN",
                ) from None
            shown = "(not shown: it may hold a token)" if secret else repr(data[:200])
            raise EtcdBadAnswer(f"HTTP {status}: {shown}", status) from e
        if status == 200 and not _isError(answer):
            return answer
        error = wire.errorFrom(status, answer)
        if wire.isUnavailable(error):
            raise _Retry(f"{error.message} (code {error.code})")
        if lease is not None and error.code == 5 and "lease not found" in error.message:
            raise LeaseNotFound(lease, error.message)
        raise classify(error, self.user)

    async def _prefix(self, endpoint: str) -> str:
        """The gateway's path prefix (read once from the cluster's version)."""
        if self._apiPrefix is not None:
            return self._apiPrefix
        response = await self._agent.request(b"GET", (endpoint + "/version").encode("ascii"))
        data = await _readBody(response)
        try:
            version = wire.decodeJSON(data).get("etcdcluster", "")
        except EtcdBadAnswer:
            version = ""
        prefix = apiPrefixFor(str(version))
        if prefix is None:
            return "/v3"
        self._apiPrefix = prefix
        return prefix

    async def _failover(
        self, operation: str, attempt: Callable[[str, float], Awaitable[T]], deadline: float
    ) -> T:
        """
        Run C{attempt} on the current member, then the next ones, in rounds
        until one answers or the call's C{deadline} passes (see the
        module's doc).
        """
        reasons: dict[str, str] = {}
        backoff = 0.05
        while True:
            everyRefused = True
            first = self._current
            for step in range(len(self.endpoints)):
                index = (first + step) % len(self.endpoints)
                endpoint = self.endpoints[index]
                remaining = deadline - self._reactor.seconds()
                if remaining <= 0:
                    raise EtcdTimeout(operation, self.timeout, reasons)
                try:
                    return await self._bounded(
                        attempt, endpoint, min(self.attemptTimeout, remaining)
                    )
                except _Retry as e:
                    reasons[endpoint] = e.reason
                    everyRefused = everyRefused and e.refused
                    self._moveOn(index, e.reason)
            if everyRefused:
                raise EtcdUnavailable(operation, reasons)
            remaining = deadline - self._reactor.seconds()
            if remaining <= 0:
                raise EtcdTimeout(operation, self.timeout, reasons)
            await deferLater(self._reactor, min(backoff, remaining), lambda: None)
            backoff = min(backoff * 2, 1.0)

    async def _bounded(
        self, attempt: Callable[[str, float], Awaitable[T]], endpoint: str, timeout: float
    ) -> T:
        """
        One attempt on C{endpoint}, cancelled after C{timeout}; a failure
        of the connection (or the timeout) is L{_Retry}.
        """
        d: Deferred[T] = Deferred.fromCoroutine(_awaited(attempt(endpoint, timeout)))
        timedOut = False

        def expire() -> None:
            nonlocal timedOut
            timedOut = True
            d.cancel()

        timer: IDelayedCall = self._reactor.callLater(timeout, expire)
        try:
            return await d
        except (_Retry, EtcdError):
            raise
        except _REFUSED as e:
            raise _Retry(_describe(e), refused=True) from e
        except CancelledError:
            if timedOut:
                raise _Retry(f"no answer within {timeout:g} s") from None
            raise
        except Exception as e:
            if timedOut:
                raise _Retry(f"no answer within {timeout:g} s") from e
            handshake = _tlsFailure(e)
            if handshake is not None:
                # The handshake failed: no request reached etcd.
                raise _Retry(handshake, refused=True) from e
            if _isConnectionFailure(e):
                raise _Retry(_describe(e)) from e
            raise
        finally:
            if timer.active():
                timer.cancel()

    def _moveOn(self, index: int, reason: str) -> None:
        """Make the member after C{index} the current one (if no other call did)."""
        if self._current == index:
            self._current = (index + 1) % len(self.endpoints)
            if len(self.endpoints) > 1:
                self.log.info(
                    "etcd member {failed} failed ({reason}); now using {member}",
                    failed=self.endpoints[index],
                    reason=reason,
                    member=self.endpoints[self._current],
                )


def _isError(answer: dict[str, Any]) -> bool:
    """Whether a 200 answer is an error (streams send theirs in the body)."""
    error = answer.get("error")
    return isinstance(error, dict) or (isinstance(error, str) and bool(error) and "code" in answer)


def _isConnectionFailure(e: Exception) -> bool:
    """Whether C{e} is the connection failing (rather than a bug or a refusal)."""
    return isinstance(
        e,
        (
            RequestNotSent,
            RequestTransmissionFailed,
            ResponseFailed,
            ResponseNeverReceived,
            neterror.ConnectionLost,
            neterror.ConnectionDone,
            neterror.ConnectingCancelledError,
            neterror.TimeoutError,
        ),
    )


def _withAuthorization(token: str) -> Headers:
    """The request headers, with C{token} when there is one."""
    if token == NO_TOKEN:
        return _JSON
    return Headers(
        {b"content-type": [b"application/json"], b"authorization": [token.encode("ascii")]}
    )


def _tlsFailure(e: Exception) -> str | None:
    """Why the TLS handshake failed, when that is why C{e} (a request's failure) happened."""
    for reason in getattr(e, "reasons", None) or ():
        if not isinstance(reason, Failure):
            continue
        if reason.check("service_identity.exceptions.VerificationError"):
            return f"TLS: the member's certificate does not name its address ({reason.value})"
        if reason.check("OpenSSL.SSL.Error") and reason.value is not None:
            return "TLS: " + _sslErrorText(reason.value)
    return None


def _sslErrorText(error: BaseException) -> str:
    """OpenSSL's reasons (C{[(library, function, reason), ...]}) as text."""
    parts = []
    for arg in error.args:
        if isinstance(arg, list):
            for item in arg:
                parts.append(str(item[-1]) if isinstance(item, tuple) and item else str(item))
        else:
            parts.append(str(arg))
    return ", ".join(p for p in parts if p) or type(error).__name__


def _describe(e: BaseException) -> str:
    """A short reason for the log and L{EtcdUnavailable}."""
    if isinstance(e, neterror.ConnectionRefusedError):
        return "connection refused"
    return f"{type(e).__name__}: {e}"


async def _awaited(value: Awaitable[T]) -> T:
    """Await C{value} (so any awaitable becomes a cancellable Deferred)."""
    return await value
