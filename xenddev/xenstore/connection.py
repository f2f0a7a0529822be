# -*- test-case-name: tests.test_xenstore_connection -*-
"""
Opening XenStore connections: once (L{connectXenStore}) or kept open across
xenstored restarts (L{ReconnectingXenStore}).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from typing import Any, TypeVar, overload

from twisted.application.internet import ClientService, backoffPolicy
from twisted.internet.defer import Deferred, DeferredList, fail, succeed
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint
from twisted.logger import Logger
from zope.interface import implementer

from xenddev.xenstore.client import WatchCallback, XenStoreClient, newToken
from xenddev.xenstore.endpoints import XenStoreAddress, endpointFor
from xenddev.xenstore.interfaces import ITransaction, IWatchHandle, IXenStore
from xenddev.xenstore.paths import (
    Perm,
    parsePerms,
    validatePath,
    validateToken,
    validateWatchPath,
)
from xenddev.xenstore.protocol import XenStoreClientFactory, XenStoreProtocol

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
    """

    log = Logger()

    def __init__(
        self,
        endpoint: IStreamClientEndpoint,
        reactor: Any = None,
        retryPolicy: Callable[[int], float] | None = None,
        maxInFlight: int | None = None,
        **clientArgs: Any,
    ) -> None:
        self.reactor: IReactorTime = reactor if reactor is not None else _defaultReactor()
        self._clientArgs = clientArgs
        self._watches: dict[str, tuple[str, WatchCallback]] = {}
        self._handles: dict[str, IWatchHandle] = {}
        self._client: XenStoreClient | None = None
        self.connections = 0
        self._service = ClientService(
            endpoint,
            XenStoreClientFactory(maxInFlight, attach=self._attach),
            retryPolicy=retryPolicy or backoffPolicy(initialDelay=0.05, maxDelay=2.0),
            clock=self.reactor,
            prepareConnection=self._prepare,  # type: ignore[arg-type]
        )

    # Lifecycle

    def start(self) -> None:
        """Start connecting (and reconnecting)."""
        self._service.startService()

    def stop(self) -> Deferred[None]:
        """Close the connection and stop reconnecting."""
        self._client = None
        return self._service.stopService()

    def whenConnected(self, failAfterFailures: int | None = None) -> Deferred[XenStoreClient]:
        """Fire with the client of the current (or next) connection."""
        if self._client is not None and self._client.connected:
            # Also keeps us from re-entering ClientService's state machine,
            # which refuses calls made from its own callbacks.
            return succeed(self._client)
        d: Deferred[Any] = self._service.whenConnected(failAfterFailures=failAfterFailures)
        return d.addCallback(lambda proto: proto.xenstoreClient)

    @property
    def connected(self) -> bool:
        """Whether a connection is currently open."""
        return self._client is not None and self._client.connected

    def _attach(self, protocol: XenStoreProtocol) -> None:
        protocol.xenstoreClient = XenStoreClient(  # type: ignore[attr-defined]
            protocol, self.reactor, **self._clientArgs
        )

    def _prepare(self, protocol: XenStoreProtocol) -> Deferred[None]:
        # ``protocol`` is ClientService's proxy; attributes read through it
        # come from the real protocol, which _attach gave its client.
        client: XenStoreClient = protocol.xenstoreClient  # type: ignore[attr-defined]
        self._handles = {}
        self.connections += 1
        if self.connections > 1:
            self.log.info(
                "Reconnected to xenstored; re-registering {n} watches", n=len(self._watches)
            )
        ds = [self._register(client, token) for token in list(self._watches)]

        def ready(_: object) -> None:
            self._client = client

        return DeferredList(ds, consumeErrors=True).addCallback(ready)

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
