# -*- test-case-name: tests.test_poolpeers -*-
"""
The daemons of a pool calling one another (L{IPoolPeers}).

Some work of a pool spans hosts: a coalesce quiesces every user of a chain
on every host, a migration's handover deactivates on the source and
activates on the destination. Each host's daemon does its own part, asked
over its XML-RPC face by the daemon that coordinates.

Where a daemon is reached: its membership record in etcd
(C{/xenddev/pool/hosts/<host>}, under its session lease) carries the URL it
advertises (C{pool.advertise}: its own TCP or TLS listener) as
C{info["rpc"]}. The record exists exactly as long as the host's lease, so
one read says both where the host is and that it is alive; a host that is
not in the pool, or advertises nothing, is L{PeerUnavailable} (fault 16)
before anything is sent.

How: one XML-RPC call per request (Twisted's non-blocking
L{Proxy<twisted.web.xmlrpc.Proxy>}), HTTP Basic with the credentials of
C{pool.peer_password_file} (each daemon's C{xmlrpc.password_file} accepts
them), bounded by C{timeout} in all. A fault the peer answers comes back as
L{PeerFault} with the peer's code, so a caller can tell "the other host
refused" (its code) from "the other host could not be asked" (16).
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import urlsplit

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectError, ConnectionLost, TimeoutError
from twisted.logger import Logger
from twisted.web.xmlrpc import Fault, Proxy
from zope.interface import implementer

from xenddev.errors import FaultCode, XenddevError
from xenddev.interfaces import IPoolPeers
from xenddev.pool.interfaces import IEtcd
from xenddev.pool.keys import checkHostName, hostKey

__all__ = ["PeerFault", "PeerUnavailable", "PoolPeers", "checkAdvertise", "readPeerCredentials"]


class PeerUnavailable(XenddevError):
    """Another host's daemon cannot be asked (not in the pool, no address, unreachable)."""

    faultCode = FaultCode.UNAVAILABLE


class PeerFault(XenddevError):
    """
    Another host's daemon refused a request with an XML-RPC fault.

    @ivar host: the host that answered.
    @ivar faultCode: the peer's fault code (a known code is kept, so a
        caller's client sees the same code as the peer's would).
    @ivar faultString: the peer's message.
    """

    #: Narrowed per instance to the peer's code.
    faultCode = FaultCode.GENERIC

    def __init__(self, host: str, method: str, faultCode: int, faultString: str) -> None:
        super().__init__(f"host {host} ({method}): {faultString}")
        self.host = host
        self.method = method
        self.faultString = faultString
        try:
            self.faultCode = FaultCode(faultCode)
        except ValueError:
            self.faultCode = FaultCode.GENERIC


def checkAdvertise(url: str) -> str:
    """
    C{url} if it can be a peer's address (C{http[s]://HOST:PORT[/PATH]},
    no credentials in it); C{ValueError} naming what is wrong otherwise.
    """
    if not isinstance(url, str):
        raise ValueError(f"{url!r}: expected a URL")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"{url!r}: expected http:// or https://")
    if not parts.hostname:
        raise ValueError(f"{url!r}: no host")
    if parts.username is not None or parts.password is not None:
        raise ValueError(f"{url!r}: credentials belong in pool.peer_password_file, not the URL")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"{url!r}: the port is not a number 1..65535") from None
    if port is None:
        raise ValueError(f"{url!r}: no port")
    return url


def readPeerCredentials(path: str) -> tuple[str, str]:
    """
    The C{user:password} of the first non-empty line of C{path} (the
    format of C{xmlrpc.password_file}); C{ValueError} naming the file if it
    holds none.
    """
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\r\n")
            if not line or line.startswith("#"):
                continue
            user, sep, password = line.partition(":")
            if not sep or not user or not password:
                break
            return user, password
    raise ValueError(f"{path}: expected a line 'user:password'")


@implementer(IPoolPeers)
class PoolPeers:
    """
    Calls to the other hosts' daemons (see the module docstring).

    @param etcd: the pool's etcd client (the hosts' records).
    @param user: the user this daemon calls its peers as.
    @param password: its password (never logged).
    @param timeout: seconds one call may take in all.
    """

    log = Logger()

    def __init__(
        self, reactor: Any, etcd: IEtcd, user: str, password: str, timeout: float = 30.0
    ) -> None:
        self._reactor = reactor
        self._etcd = etcd
        self._user = user
        self._password = password
        self.timeout = timeout

    def address(self, host: str) -> Deferred[str]:
        """The URL C{host}'s daemon advertises; L{PeerUnavailable} if none (or not live)."""
        checkHostName(host)

        async def address() -> str:
            kv = await self._etcd.get(hostKey(host))
            if kv is None:
                raise PeerUnavailable(f"host {host} is not in the pool (no live session)")
            try:
                url = json.loads(kv.value)["info"]["rpc"]
                return checkAdvertise(url)
            except (ValueError, KeyError, TypeError):
                raise PeerUnavailable(
                    f"host {host} advertises no XML-RPC address (pool.advertise)"
                ) from None

        return Deferred.fromCoroutine(address())

    def call(self, host: str, method: str, *args: Any) -> Deferred[Any]:
        """
        Call C{method} on C{host}'s daemon; fires with its answer, or fails
        with L{PeerFault} (its refusal) or L{PeerUnavailable} (not asked,
        unreachable, or no answer within C{timeout}: it may have acted).
        """

        async def call() -> Any:
            url = await self.address(host)
            proxy = Proxy(
                url.encode("ascii"),
                user=self._user.encode("utf-8"),
                password=self._password.encode("utf-8"),
                allowNone=True,
                connectTimeout=self.timeout,
                reactor=self._reactor,
            )
            d = proxy.callRemote(method, *args)
            d.addTimeout(self.timeout, self._reactor)
            try:
                return await d
            except Fault as f:
                raise PeerFault(host, method, f.faultCode, str(f.faultString)) from None
            except (ConnectError, ConnectionLost, TimeoutError, defer.TimeoutError) as e:
                raise PeerUnavailable(f"host {host} ({method} at {url}): {e}") from None
            except Exception as e:
                # An HTTP error (401: the credentials), a garbled answer.
                raise PeerUnavailable(
                    f"host {host} ({method} at {url}): {type(e).__name__}: {e}"
                ) from None

        return Deferred.fromCoroutine(call())
