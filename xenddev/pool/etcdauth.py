# -*- test-case-name: tests.test_pool_etcdtls -*-
"""
etcd's own authentication: a user and password exchanged for a token.

etcd (with C{auth enable}) answers C{POST /v3/auth/authenticate
{"name", "password"}} with a token, which every later request carries in
its C{Authorization} header (the bare token, no C{Bearer}). etcd stops
accepting a token when it expires (C{--auth-token-ttl}, 300 s after its
last use for the default C{simple} tokens; JWTs after their TTL), when
the member that knew it restarts (C{simple} tokens live in the members'
memory), or when users or roles changed since it was made; it then
answers code 16 C{invalid auth token} (or C{revision of auth store is
old}). L{TokenKeeper} holds the token: one authentication for every
caller waiting at once, and a rejected token dropped so that the next
caller makes a new one. The client renews once per request
(L{xenddev.pool.etcd}).

With authentication off, etcd answers C{authenticate} with code 9
(C{authentication is not enabled}) and refuses any token sent (code 16):
the keeper then hands out no token (requests go without the header) and
says so once; if etcd later turns it on, the first refusal (C{user name
is empty}) makes it authenticate.

L{classify} turns etcd's refusals into typed errors that say what to
change. Neither the password nor a token is ever put into a message or
the log.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import attrs
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from xenddev.pool.errors import EtcdAuthError, EtcdError, TokenRejected

__all__ = ["NO_TOKEN", "EtcdCredentials", "TokenKeeper", "classify"]

#: What the keeper hands out while etcd has authentication off.
NO_TOKEN = ""

#: gRPC codes: invalid argument, permission denied, failed precondition, unauthenticated.
_INVALID, _DENIED, _PRECONDITION, _UNAUTHENTICATED = 3, 7, 9, 16


@attrs.frozen(repr=False)
class EtcdCredentials:
    """An etcd user and its password (which no repr, message or log shows)."""

    user: str
    password: str

    def __repr__(self) -> str:
        """The user only."""
        return f"EtcdCredentials(user={self.user!r}, password=<hidden>)"


def isAuthOff(error: EtcdError) -> bool:
    """Whether C{error} is C{authenticate}'s answer when etcd has authentication off."""
    return error.code == _PRECONDITION and "authentication is not enabled" in error.message


def classify(error: EtcdError, user: str | None) -> EtcdError:
    """
    C{error} as the typed error it is: L{TokenRejected} for a token etcd
    no longer accepts (or none sent where one is now needed), an
    L{EtcdAuthError} saying what to change for a refused user or
    permission; anything else as it was.
    """
    message, code, status = error.message, error.code, error.status
    if code == _UNAUTHENTICATED or "revision of auth store is old" in message:
        return TokenRejected(code, message, status)
    if "user name is empty" in message:
        if user is not None:
            # Sent without a token while etcd had authentication off: it is on now.
            return TokenRejected(code, message, status)
        return EtcdAuthError(
            code,
            message,
            status,
            "etcd has authentication on: set pool.user and pool.password_file",
        )
    if "authentication failed" in message or "invalid user ID or password" in message:
        return EtcdAuthError(
            code,
            message,
            status,
            f"etcd refused user {user!r}: wrong user name or password (pool.password_file)",
        )
    if code == _DENIED or "permission denied" in message:
        if user is None:
            return EtcdAuthError(
                code,
                message,
                status,
                "etcd refused permission to this client, which has no etcd user: "
                "set pool.user and pool.password_file",
            )
        return EtcdAuthError(
            code,
            message,
            status,
            f"etcd refused user {user!r} permission: grant its role read-write on the "
            "prefix /xenddev/pool/ (docs/pool.md)",
        )
    return error


class TokenKeeper:
    """
    The current token of one user, made on demand and shared.

    @param user: the user (for messages).
    @param authenticate: asks etcd for a new token; fires with it, or with
        L{NO_TOKEN} when etcd has authentication off.
    @ivar authentications: how many tokens were asked for (a measure).
    """

    log = Logger()

    def __init__(self, user: str, authenticate: Callable[[], Awaitable[str]]) -> None:
        self.user = user
        self._authenticate = authenticate
        self._token: str | None = None
        self._fetching: Deferred[str] | None = None
        self._waiters: list[Deferred[str]] = []
        self._saidOff = False
        self.authentications = 0

    @property
    def current(self) -> str | None:
        """The token held now (None: none yet). Never log it."""
        return self._token

    def token(self) -> Deferred[str]:
        """The current token, or a new one (one authentication for all who wait)."""
        if self._token is not None:
            d: Deferred[str] = Deferred()
            d.callback(self._token)
            return d
        waiter: Deferred[str] = Deferred(self._forget)
        self._waiters.append(waiter)
        if self._fetching is None:
            self.authentications += 1
            self._fetching = Deferred.fromCoroutine(self._fetch())
            self._fetching.addBoth(self._fetched)
        return waiter

    def rejected(self, token: str) -> None:
        """etcd refused C{token}: the next caller makes a new one (unless one was made already)."""
        if self._token == token:
            self._token = None

    def _forget(self, waiter: Deferred[str]) -> None:
        """A caller stopped waiting (its call was cancelled); the authentication goes on."""
        if waiter in self._waiters:
            self._waiters.remove(waiter)

    async def _fetch(self) -> str:
        """One authentication."""
        return await self._authenticate()

    def _fetched(self, result: str | Failure) -> None:
        """Keep the new token and hand it (or the failure) to everyone waiting."""
        self._fetching = None
        waiters, self._waiters = self._waiters, []
        if isinstance(result, Failure):
            for waiter in waiters:
                waiter.errback(result)
            return
        if result == NO_TOKEN:
            if not self._saidOff:
                self._saidOff = True
                self.log.warn(
                    "etcd has authentication off: requests go without user {user!r}'s token "
                    "(turn it on: docs/pool.md)",
                    user=self.user,
                )
        else:
            self._saidOff = False
        self._token = result
        for waiter in waiters:
            waiter.callback(result)
