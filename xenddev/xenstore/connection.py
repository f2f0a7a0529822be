# -*- test-case-name: tests.test_xenstore_connection -*-
"""
Opening XenStore connections: once (L{connectXenStore}) or kept open across
xenstored restarts (L{ReconnectingXenStore}).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from typing import Any, TypeVar, overload

from twisted.application.internet import backoffPolicy
from twisted.internet.defer import CancelledError, Deferred, DeferredList, fail, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime, IStreamClientEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from xenddev.xenstore.client import WatchCallback, XenStoreClient, newToken
from xenddev.xenstore.endpoints import XenStoreAddress, endpointFor
from xenddev.xenstore.errors import XenStoreConnectionLost, XenStoreError
from xenddev.xenstore.interfaces import ITransaction, IWatchHandle, IXenStore
from xenddev.xenstore.paths import (
    Perm,
    parsePerms,
    validatePath,
    validateToken,
    validateWatchPath,
)
from xenddev.xenstore.protocol import XenStoreClientFactory, XenStoreProtocol
from xenddev.xenstore.stall import StallWatch

T = TypeVar("T")


def _defaultReactor() -> Any:
    from twisted.internet import reactor

    return reactor


def connectXenStore(
    reactor: Any = None,
    address: str | XenStoreAddress | None = None,
    endpoint: IStreamClientEndpoint | None = None,
    maxInFlight: int | None = None,
    **clientArgs: Any,
) -> Deferred[XenStoreClient]:
    """
    Connect once to XenStore and fire with a L{XenStoreClient}.

    @param address: C{auto} (default), C{unix:PATH} or C{xenbus:PATH}.
    @param endpoint: use this endpoint instead of C{address}.
    """
    reactor = reactor if reactor is not None else _defaultReactor()
    ep = endpoint if endpoint is not None else endpointFor(reactor, address)
    d: Deferred[Any] = ep.connect(XenStoreClientFactory(maxInFlight))  # type: ignore[attr-defined]
    return d.addCallback(lambda proto: XenStoreClient(proto, reactor, **clientArgs))


@implementer(IWatchHandle)
class _DurableWatchHandle:
    """A watch that L{ReconnectingXenStore} re-registers on every new connection."""

    def __init__(self, owner: ReconnectingXenStore, path: str, token: str) -> None:
        self._owner = owner
        self.path = path
        self.token = token
        self.active = True

    def stop(self) -> Deferred[None]:
        """Forget the watch and remove it from the current connection."""
        if not self.active:
            return succeed(None)
        self.active = False
        return self._owner._forgetWatch(self.token)


@implementer(IXenStore)
class ReconnectingXenStore:
    """
    A XenStore API that survives xenstored restarts and connection loss.

    Requests made while disconnected wait for the next connection. Requests
    in flight when a connection drops fail with L{XenStoreConnectionLost}
    (xenstored may or may not have executed them; only the caller can decide
    whether to repeat them). Watches are durable: after a reconnect they are
    registered again, and xenstored fires each once on registration — which
    tells its subscriber that events may have been missed, so it re-reads
    what it cares about.

    With C{stall} seconds, a store that stops answering while its
    connection stays open is treated as gone (L{xenddev.xenstore.stall}):
    the connection is aborted once requests have been outstanding that long
    with nothing received, its requests fail with L{XenStoreStalled}, and
    reconnecting takes over. A new connection is then only used once the
    store has answered on it (the watches' registrations, else a probe),
    each attempt bounded by the same rule: against a store that still does
    not answer, requests keep waiting for a connection (and are never
    written to a silent one), and attempts keep failing after C{stall}
    seconds each until it answers again. The stall is logged as an error
    once, and its end once.

    @param endpoint: where xenstored is.
    @param retryPolicy: seconds to wait before attempt I{n} (1, 2, ...) after
        a failure or a lost connection.
    @param stall: seconds a store may stay silent with requests outstanding
        (None: wait for ever).
    @param address: the store's address, for messages.
    """

    log = Logger()

    def __init__(
        self,
        endpoint: IStreamClientEndpoint,
        reactor: Any = None,
        retryPolicy: Callable[[int], float] | None = None,
        maxInFlight: int | None = None,
        stall: float | None = None,
        address: str = "xenstored",
        **clientArgs: Any,
    ) -> None:
        self.reactor: IReactorTime = reactor if reactor is not None else _defaultReactor()
        self._endpoint = endpoint
        self._maxInFlight = maxInFlight
        self._retryPolicy = retryPolicy or backoffPolicy(initialDelay=0.05, maxDelay=2.0)
        self.stall = stall
        self.address = address
        self._clientArgs = clientArgs
        self._watches: dict[str, tuple[str, WatchCallback]] = {}
        self._handles: dict[str, IWatchHandle] = {}
        #: The connection in use (the store answered on it), if any.
        self._client: XenStoreClient | None = None
        #: The connection being made or prepared, if any.
        self._attempt: Deferred[Any] | None = None
        self._preparing: XenStoreClient | None = None
        self._retry: IDelayedCall | None = None
        self._running = False
        self._stopped = False
        self._failures = 0
        #: Callers waiting for a connection: (Deferred, failures left or None).
        self._waiters: list[tuple[Deferred[XenStoreClient], int | None]] = []
        self.connections = 0
        #: When the store stopped answering (reactor time), while it has not
        #: answered on any connection since; None otherwise.
        self.stalledSince: float | None = None

    # Lifecycle

    def start(self) -> None:
        """Start connecting (and reconnecting)."""
        if self._running:
            return
        self._running = True
        self._stopped = False
        self._connect()

    def stop(self) -> Deferred[None]:
        """Close the connection and stop reconnecting."""
        self._running = False
        self._stopped = True
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        waiters, self._waiters = self._waiters, []
        for d, _ in waiters:
            if not d.called:
                d.errback(CancelledError("the XenStore connection was stopped"))
        closing = []
        for client in (self._client, self._preparing):
            if client is not None and client.connected:
                closing.append(client.disconnect())
        self._client = None
        if self._attempt is not None:
            self._attempt.cancel()
        return DeferredList(closing, consumeErrors=True).addCallback(lambda _: None)

    def whenConnected(self, failAfterFailures: int | None = None) -> Deferred[XenStoreClient]:
        """
        Fire with the client of the current (or next) connection; with
        C{failAfterFailures}, fail with the error of that many failed
        attempts in a row instead.
        """
        client = self._client
        if client is not None and client.connected:
            return succeed(client)
        if self._stopped:
            return fail(CancelledError("the XenStore connection was stopped"))

        def forget(d: Deferred[XenStoreClient]) -> None:
            self._waiters = [w for w in self._waiters if w[0] is not d]

        d: Deferred[XenStoreClient] = Deferred(forget)
        self._waiters.append((d, failAfterFailures))
        return d

    @property
    def connected(self) -> bool:
        """Whether a connection is currently open."""
        return self._client is not None and self._client.connected

    def _connect(self) -> None:
        self._retry = None
        if not self._running:
            return
        d: Deferred[Any] = self._endpoint.connect(XenStoreClientFactory(self._maxInFlight))
        self._attempt = d
        d.addCallback(self._prepare)
        d.addCallbacks(self._ready, self._failed)

    def _prepare(self, protocol: XenStoreProtocol) -> Deferred[XenStoreClient]:
        client = XenStoreClient(protocol, self.reactor, **self._clientArgs)
        self._preparing = client
        if self.stall is not None:
            StallWatch(protocol, self.reactor, self.stall, self.address, self._stalled)
        protocol.whenConnectionLost().addCallback(self._lost, client)
        # The handles of the previous connection's watches died with it.
        self._handles = {}
        self.connections += 1
        if self.connections > 1:
            self.log.info(
                "Reconnected to xenstored; re-registering {n} watches", n=len(self._watches)
            )
        answers: list[Deferred[Any]] = [self._register(client, t) for t in list(self._watches)]
        if self.stall is not None and not answers:
            # Nothing to register: ask something, so that the store shows
            # it answers before any caller's request is written here. Any
            # reply will do; only a lost (or aborted) connection fails.
            probe = client.getDomainPath(0)
            probe.addErrback(lambda f: f.trap(XenStoreError) and None)
            answers.append(probe)

        def answered(_: object) -> XenStoreClient:
            if not client.connected:
                raise XenStoreConnectionLost(
                    f"connection to XenStore at {self.address} lost while it was being prepared"
                )
            return client

        return DeferredList(answers, consumeErrors=True).addCallback(answered)

    def _ready(self, client: XenStoreClient) -> None:
        self._attempt = None
        self._preparing = None
        if not self._running:
            client.disconnect()
            return
        self._client = client
        self._failures = 0
        if self.stalledSince is not None:
            self.log.info(
                "XenStore at {address} answers again, after {seconds:.1f} s",
                address=self.address,
                seconds=self.reactor.seconds() - self.stalledSince,
            )
            self.stalledSince = None
        waiters, self._waiters = self._waiters, []
        for d, _ in waiters:
            if not d.called:
                d.callback(client)

    def _failed(self, f: Failure) -> None:
        self._attempt = None
        preparing, self._preparing = self._preparing, None
        if preparing is not None and preparing.connected:
            preparing.protocol.abort(XenStoreConnectionLost(f"not used: {f.getErrorMessage()}"))
        if not self._running:
            return
        self._failures += 1
        keep = []
        for d, left in self._waiters:
            if left is not None and left <= 1:
                if not d.called:
                    d.errback(f)
            else:
                keep.append((d, None if left is None else left - 1))
        self._waiters = keep
        self._scheduleRetry(f.getErrorMessage())

    def _lost(self, _: object, client: XenStoreClient) -> None:
        # A connection being prepared is retried by _failed.
        if client is not self._client:
            return
        self._client = None
        if self._running:
            self._failures = 1
            self._scheduleRetry("connection lost")

    def _scheduleRetry(self, why: str) -> None:
        delay = self._retryPolicy(self._failures)
        self.log.info(
            "XenStore at {address}: {why}; attempt {attempt} to connect in {delay:.2f} s",
            address=self.address,
            why=why,
            attempt=self._failures,
            delay=delay,
        )
        self._retry = self.reactor.callLater(delay, self._connect)

    def _stalled(self, outstanding: int, silent: float) -> None:
        if self.stalledSince is None:
            self.stalledSince = self.reactor.seconds() - silent
            self.log.error(
                "XenStore at {address} stopped answering: {outstanding} requests outstanding "
                "for {silent:.1f} s; the connection is aborted and its requests fail as on a "
                "lost connection, reconnecting",
                address=self.address,
                outstanding=outstanding,
                silent=silent,
            )
        else:
            self.log.info(
                "XenStore at {address} still not answering (since {seconds:.1f} s)",
                address=self.address,
                seconds=self.reactor.seconds() - self.stalledSince,
            )

    # Watches

    def _register(self, client: XenStoreClient, token: str) -> Deferred[None]:
        if token not in self._watches or client.hasWatch(token):
            return succeed(None)
        path, callback = self._watches[token]

        def registered(handle: IWatchHandle) -> None:
            if token in self._watches:
                self._handles[token] = handle
            else:
                handle.stop()

        d: Deferred[Any] = client.watch(path, callback, token)
        return d.addCallback(registered)

    def watch(
        self, path: str, callback: WatchCallback, token: str | None = None
    ) -> Deferred[IWatchHandle]:
        """
        Watch C{path} on this and every later connection; fires with a handle
        once the current connection has registered it.
        """
        p = validateWatchPath(path)
        tok = validateToken(token) if token is not None else newToken()
        self._watches[tok] = (p, callback)
        handle = _DurableWatchHandle(self, p, tok)
        d: Deferred[Any] = self.whenConnected()
        d.addCallback(self._register, tok)

        def failed(f: Any) -> Any:
            self._watches.pop(tok, None)
            return f

        d.addCallbacks(lambda _: handle, failed)
        return d

    def _forgetWatch(self, token: str) -> Deferred[None]:
        self._watches.pop(token, None)
        handle = self._handles.pop(token, None)
        if handle is None:
            return succeed(None)
        return handle.stop()

    @property
    def watchCount(self) -> int:
        """Durable watches registered through this object."""
        return len(self._watches)

    def resetWatches(self) -> Deferred[None]:
        """Forget every durable watch and reset the connection's watches."""
        self._watches.clear()
        self._handles.clear()
        return self._call("resetWatches")

    # Delegation

    def _call(self, name: str, *args: Any) -> Deferred[Any]:
        client = self._client
        if client is not None and client.connected:
            # The common case, without wrapping the client's Deferred in
            # another (that cost as much as the request itself). As before,
            # what the call raises comes back as a failed Deferred.
            try:
                return getattr(client, name)(*args)
            except BaseException:
                return fail()
        d: Deferred[Any] = self.whenConnected()
        return d.addCallback(lambda client: getattr(client, name)(*args))

    def _callPath(self, name: str, path: str, *args: Any) -> Deferred[Any]:
        # Validate now, so a bad path raises at the call as on XenStoreClient,
        # not later when a connection is available.
        return self._call(name, validatePath(path), *args)

    def read(self, path: str) -> Deferred[str]:
        """See L{XenStoreClient.read}."""
        return self._callPath("read", path)

    def readBytes(self, path: str) -> Deferred[bytes]:
        """See L{XenStoreClient.readBytes}."""
        return self._callPath("readBytes", path)

    def readOrNone(self, path: str) -> Deferred[str | None]:
        """See L{XenStoreClient.readOrNone}."""
        return self._callPath("readOrNone", path)

    def write(self, path: str, value: str | bytes) -> Deferred[None]:
        """See L{XenStoreClient.write}."""
        return self._callPath("write", path, value)

    def mkdir(self, path: str) -> Deferred[None]:
        """See L{XenStoreClient.mkdir}."""
        return self._callPath("mkdir", path)

    def rm(self, path: str, missingOk: bool = False) -> Deferred[None]:
        """See L{XenStoreClient.rm}."""
        return self._callPath("rm", path, missingOk)

    def ls(self, path: str, missingOk: bool = False) -> Deferred[list[str]]:
        """See L{XenStoreClient.ls}."""
        return self._callPath("ls", path, missingOk)

    def exists(self, path: str) -> Deferred[bool]:
        """See L{XenStoreClient.exists}."""
        return self._callPath("exists", path)

    def getPerms(self, path: str) -> Deferred[list[Perm]]:
        """See L{XenStoreClient.getPerms}."""
        return self._callPath("getPerms", path)

    def setPerms(self, path: str, perms: Iterable[Perm | str]) -> Deferred[None]:
        """See L{XenStoreClient.setPerms}."""
        return self._callPath("setPerms", path, parsePerms(perms))

    def startTransaction(self) -> Deferred[ITransaction]:
        """See L{XenStoreClient.startTransaction}."""
        return self._call("startTransaction")

    @overload
    def transact(
        self, fn: Callable[[ITransaction], Awaitable[T]], maxAttempts: int | None = None
    ) -> Deferred[T]: ...

    @overload
    def transact(
        self, fn: Callable[[ITransaction], T], maxAttempts: int | None = None
    ) -> Deferred[T]: ...

    def transact(
        self, fn: Callable[[ITransaction], Any], maxAttempts: int | None = None
    ) -> Deferred[Any]:
        """See L{XenStoreClient.transact}."""
        return self._call("transact", fn, maxAttempts)

    def waitFor(
        self,
        path: str,
        predicate: Callable[[str | None], bool] = lambda v: v is not None,
        timeout: float | None = None,
    ) -> Deferred[str | None]:
        """See L{XenStoreClient.waitFor} (bound to the current connection)."""
        return self._call("waitFor", path, predicate, timeout)

    def getDomainPath(self, domid: int) -> Deferred[str]:
        """See L{XenStoreClient.getDomainPath}."""
        return self._call("getDomainPath", domid)

    def introduceDomain(self, domid: int, mfn: int, port: int) -> Deferred[None]:
        """See L{XenStoreClient.introduceDomain}."""
        return self._call("introduceDomain", domid, mfn, port)

    def releaseDomain(self, domid: int) -> Deferred[None]:
        """See L{XenStoreClient.releaseDomain}."""
        return self._call("releaseDomain", domid)

    def resumeDomain(self, domid: int) -> Deferred[None]:
        """See L{XenStoreClient.resumeDomain}."""
        return self._call("resumeDomain", domid)

    def isDomainIntroduced(self, domid: int) -> Deferred[bool]:
        """See L{XenStoreClient.isDomainIntroduced}."""
        return self._call("isDomainIntroduced", domid)

    def setTarget(self, domid: int, target: int) -> Deferred[None]:
        """See L{XenStoreClient.setTarget}."""
        return self._call("setTarget", domid, target)
