# -*- test-case-name: tests.test_xenstore_client -*-
"""
The Deferred API over one XenStore connection.

L{XenStoreClient} offers the XenStore operations as methods returning
Deferreds, watches with handles, transactions (L{XenStoreClient.transact}
retries conflicts with jittered backoff) and L{waitFor}. Every argument is
validated before anything is sent, so a bad path raises at once and the
store never sees it.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Protocol, TypeVar, overload

from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from xenddev.xenstore.errors import (
    ConflictError,
    InvalidArgumentError,
    InvalidPayloadError,
    NoEntryError,
    QuotaError,
    TransactionRetriesExhausted,
    XenStoreConnectionLost,
    XenStoreTimeout,
)
from xenddev.xenstore.interfaces import ITransaction, IWatchHandle, IXenStore
from xenddev.xenstore.paths import (
    VALID_PATHS,
    Perm,
    parsePerms,
    pathArgument,
    validateDomid,
    validatePath,
    validateToken,
    validateWatchPath,
)
from xenddev.xenstore.protocol import (
    Answers,
    Convert,
    XenStoreProtocol,
    addConversion,
    discard,
)
from xenddev.xenstore.wire import PAYLOAD_MAX, Op, joinStrings, splitStrings

T = TypeVar("T")

# The operations of the hot paths as module globals: reading a member off
# the enum class costs more (about 90 ns on Python 3.11) than a global.
_READ = Op.READ
_WRITE = Op.WRITE
_MKDIR = Op.MKDIR
_RM = Op.RM
_DIRECTORY = Op.DIRECTORY
_GET_PERMS = Op.GET_PERMS
_SET_PERMS = Op.SET_PERMS
_TRANSACTION_START = Op.TRANSACTION_START
_TRANSACTION_END = Op.TRANSACTION_END

WatchCallback = Callable[[str], object]


def _value(value: str | bytes) -> bytes:
    if isinstance(value, str):
        return value.encode("utf-8", "surrogateescape")
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    raise InvalidArgumentError(f"a XenStore value is text or bytes, not {type(value).__name__}")


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def _names(raw: bytes) -> list[str]:
    # Decoding once and splitting the text gives what splitting and then
    # decoding each name gives: a NUL is never part of a UTF-8 sequence.
    text = raw.decode("utf-8", "surrogateescape")
    if not text:
        return []
    if text.endswith("\0"):
        text = text[:-1]
    return text.split("\0")


def _true(raw: bytes) -> bool:
    return True


def _stripText(raw: bytes) -> str:
    return raw.rstrip(b"\0").decode("utf-8", "surrogateescape")


def _isTrue(raw: bytes) -> bool:
    return raw.rstrip(b"\0") == b"T"


def _perms(raw: bytes) -> list[Perm]:
    return [Perm.parse(s) for s in splitStrings(raw)]


#: Error replies that are answers (see L{XenStoreProtocol.send}).
_MISSING_IS_NONE = {"ENOENT": None}
#: A node you may not read exists too.
_EXISTS = {"ENOENT": False, "EACCES": True}


def _noneAsEmpty(names: list[str] | None) -> list[str]:
    return [] if names is None else names


def _checkSize(payload: bytes, what: str) -> bytes:
    if len(payload) > PAYLOAD_MAX:
        raise InvalidPayloadError(
            f"{what}: request payload of {len(payload)} bytes exceeds "
            f"XENSTORE_PAYLOAD_MAX ({PAYLOAD_MAX})"
        )
    return payload


class _Sender(Protocol):
    """Where L{_Operations} send their requests: a L{XenStoreProtocol}."""

    def send(
        self,
        op: int,
        payload: bytes,
        txId: int,
        context: str | None,
        convert: Convert,
        answers: Answers,
    ) -> Deferred[Any]: ...


class _RequestSender:
    """
    The sender for a protocol that is not a L{XenStoreProtocol} (a test
    double, a wrapper): every request goes through its C{request(op,
    payload, txId, context)}, as it always did, and the conversion is added
    as callbacks.
    """

    def __init__(self, protocol: Any) -> None:
        self._protocol = protocol

    def send(
        self,
        op: int,
        payload: bytes,
        txId: int,
        context: str | None,
        convert: Convert,
        answers: Answers,
    ) -> Deferred[Any]:
        return addConversion(self._protocol.request(op, payload, txId, context), convert, answers)


class _NoSender:
    """The sender of L{_Operations} itself, which subclasses replace."""

    def send(self, *args: object) -> Deferred[Any]:
        raise NotImplementedError("_Operations needs a subclass that sets _sender")


class _EndedTransaction:
    """
    The sender of every transaction after its commit or abort: it refuses
    (so a live transaction's requests need no check of their own).
    """

    def send(self, op: int, payload: bytes, txId: int, *args: object) -> Deferred[Any]:
        raise InvalidArgumentError(f"transaction {txId} has already ended")


_ENDED = _EndedTransaction()


class _Operations:
    """
    The node operations, shared by the client (tx_id 0) and transactions.

    Subclasses set L{_sender} (and L{_txId}).
    """

    _txId = 0
    _sender: _Sender = _NoSender()

    def _pathRequest(
        self,
        op: Op,
        path: str,
        extra: bytes = b"",
        convert: Convert = None,
        answers: Answers = None,
    ) -> Deferred[Any]:
        # A path used before was valid and its argument is cached.
        arg = VALID_PATHS.get(path) if type(path) is str else None
        if arg is None:
            path, arg = pathArgument(path)
        if extra:
            arg += extra
            if len(arg) > PAYLOAD_MAX:
                _checkSize(arg, f"{op.name} {path}")  # raises, naming the request
        return self._sender.send(op, arg, self._txId, path, convert, answers)

    def readBytes(self, path: str) -> Deferred[bytes]:
        """Read a node's value as bytes (ENOENT if it does not exist)."""
        return self._pathRequest(_READ, path)

    def read(self, path: str) -> Deferred[str]:
        """Read a node's value as text (UTF-8; undecodable bytes are escaped)."""
        return self._pathRequest(_READ, path, b"", _text)

    def readOrNone(self, path: str) -> Deferred[str | None]:
        """Read a node's value, or C{None} if it does not exist."""
        return self._pathRequest(_READ, path, b"", _text, _MISSING_IS_NONE)

    def write(self, path: str, value: str | bytes) -> Deferred[None]:
        """Write a node, creating it and any missing parents."""
        if type(value) is str:
            raw = value.encode("utf-8", "surrogateescape")
        elif type(value) is bytes:
            raw = value
        else:
            raw = _value(value)
        return self._pathRequest(_WRITE, path, raw, discard)

    def mkdir(self, path: str) -> Deferred[None]:
        """Create a node with an empty value (no error if it exists)."""
        return self._pathRequest(_MKDIR, path, b"", discard)

    def rm(self, path: str, missingOk: bool = False) -> Deferred[None]:
        """
        Remove a node and its subtree. Removing a missing node is not an
        error, but (as in xenstored) a missing parent is ENOENT — unless
        C{missingOk}, which makes "ensure it is gone" a single call.
        """
        return self._pathRequest(_RM, path, b"", discard, _MISSING_IS_NONE if missingOk else None)

    def ls(self, path: str, missingOk: bool = False) -> Deferred[list[str]]:
        """
        List a node's children (names only). A listing too large for one
        reply (E2BIG) is fetched in parts with DIRECTORY_PART. A missing
        node is ENOENT, unless C{missingOk}: then it lists as empty (one
        round trip, no exception raised and caught).
        """
        p = validatePath(path)
        if missingOk:
            # ENOENT answers None; a fresh list each time, as callers may change it.
            d: Deferred[Any] = self._pathRequest(_DIRECTORY, p, b"", _names, _MISSING_IS_NONE)
            return d.addCallbacks(_noneAsEmpty, self._tooBig, errbackArgs=(p,))
        d = self._pathRequest(_DIRECTORY, p, b"", _names)
        return d.addErrback(self._tooBig, p)

    def _tooBig(self, f: Failure, path: str) -> Any:
        # A reply over XENSTORE_PAYLOAD_MAX is refused with E2BIG.
        if isinstance(f.value, QuotaError) and f.value.errname == "E2BIG":
            return self._lsInParts(path)
        return f

    def _lsInParts(self, path: str, restarts: int = 8) -> Deferred[list[str]]:
        async def fetch() -> list[str]:
            for _ in range(restarts):
                names: list[bytes] = []
                offset = 0
                generation: bytes | None = None
                while True:
                    raw = await self._pathRequest(Op.DIRECTORY_PART, path, b"%d\0" % offset)
                    gen, _, rest = raw.partition(b"\0")
                    if generation is None:
                        generation = gen
                    elif gen != generation:
                        break  # the node changed between parts: start again
                    final = rest.endswith(b"\0\0") or rest == b"\0" or not rest
                    chunk = rest[:-1] if final else rest
                    names.extend(splitStrings(chunk))
                    offset += len(chunk)
                    if final:
                        return [_text(n) for n in names]
            raise ConflictError("EAGAIN", "DIRECTORY_PART", path)

        return Deferred.fromCoroutine(fetch())

    def exists(self, path: str) -> Deferred[bool]:
        """Whether a node exists (a node you may not read exists too)."""
        return self._pathRequest(_READ, path, b"", _true, _EXISTS)

    def getPerms(self, path: str) -> Deferred[list[Perm]]:
        """A node's permissions: the owner entry first."""
        return self._pathRequest(_GET_PERMS, path, b"", _perms)

    def setPerms(self, path: str, perms: Iterable[Perm | str]) -> Deferred[None]:
        """Replace a node's permissions (owner entry first)."""
        entries = parsePerms(perms)
        extra = joinStrings(str(p).encode("ascii") for p in entries)
        return self._pathRequest(_SET_PERMS, path, extra, discard)


@implementer(ITransaction)
class Transaction(_Operations):
    """
    An open XenStore transaction: the node operations run inside it, and
    L{commit} or L{abort} ends it. Use L{XenStoreClient.transact} unless you
    must drive the transaction yourself.
    """

    def __init__(self, client: XenStoreClient, txId: int) -> None:
        self._client = client
        self._txId = txId
        self._sender = client._sender
        self.ended = False

    @property
    def txId(self) -> int:
        """The transaction id xenstored allocated."""
        return self._txId

    def _end(self, commit: bool) -> Deferred[None]:
        txId = self._txId
        d = self._sender.send(
            _TRANSACTION_END, b"T\0" if commit else b"F\0", txId, f"tx {txId}", discard, None
        )
        self.ended = True
        self._sender = _ENDED
        return d

    def commit(self) -> Deferred[None]:
        """Commit; fails with L{ConflictError} (EAGAIN) if another commit interfered."""
        return self._end(True)

    def abort(self) -> Deferred[None]:
        """Discard every change made in the transaction."""
        return self._end(False)


@implementer(IWatchHandle)
class WatchHandle:
    """A registered watch; L{stop} removes it."""

    def __init__(self, client: XenStoreClient, path: str, token: str) -> None:
        self._client = client
        self.path = path
        self.token = token
        self.active = True

    def stop(self) -> Deferred[None]:
        """Remove the watch. Idempotent; succeeds if the connection is gone."""
        if not self.active:
            return succeed(None)
        self.active = False
        return self._client._unwatch(self.path, self.token)


_tokens = itertools.count(1)


def newToken() -> str:
    """A process-unique watch token."""
    return f"xenddev-{next(_tokens)}"


@implementer(IXenStore)
class XenStoreClient(_Operations):
    """
    The Deferred XenStore API over one L{XenStoreProtocol} connection.

    @param protocol: a connected L{XenStoreProtocol}.
    @param reactor: provides time for transaction backoff and L{waitFor}
        timeouts; the global reactor if not given.
    @param maxAttempts: default retry budget of L{transact}.
    """

    log = Logger()

    #: L{IXenStore.connections}: this client has its one connection.
    connections = 1

    def __init__(
        self,
        protocol: XenStoreProtocol,
        reactor: IReactorTime | None = None,
        maxAttempts: int = 32,
        backoffBase: float = 0.001,
        backoffCap: float = 0.2,
        random: Callable[[], float] = random.random,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as _reactor

            reactor = _reactor
        self.protocol = protocol
        self.reactor: IReactorTime = reactor
        self.maxAttempts = maxAttempts
        self.backoffBase = backoffBase
        self.backoffCap = backoffCap
        self._random = random
        self._watches: dict[str, tuple[str, WatchCallback]] = {}
        protocol.eventReceived = self._eventReceived

    # Plumbing

    @property
    def protocol(self) -> XenStoreProtocol:
        """The connection's L{XenStoreProtocol}."""
        return self._protocol

    @protocol.setter
    def protocol(self, protocol: XenStoreProtocol) -> None:
        self._protocol = protocol
        self._sender = (
            protocol if isinstance(protocol, XenStoreProtocol) else _RequestSender(protocol)
        )

    def _send(
        self,
        op: int,
        payload: bytes,
        context: str | None,
        convert: Convert = None,
        answers: Answers = None,
    ) -> Deferred[Any]:
        return self._sender.send(op, payload, 0, context, convert, answers)

    @property
    def connected(self) -> bool:
        """Whether the underlying connection is open."""
        return bool(self._protocol.connected)

    def disconnect(self) -> Deferred[None]:
        """Close the connection; pending requests fail with connection lost."""
        d = self.protocol.whenConnectionLost()
        if self.protocol.transport is not None and self.protocol.connected:
            self.protocol.transport.loseConnection()
        return d

    # Domains

    def _domidRequest(self, op: Op, *args: object, convert: Convert = discard) -> Deferred[Any]:
        payload = joinStrings(str(a).encode("ascii") for a in args)
        return self._send(op, payload, " ".join(str(a) for a in args), convert)

    def getDomainPath(self, domid: int) -> Deferred[str]:
        """C{/local/domain/<domid>}, as xenstored computes it."""
        return self._domidRequest(Op.GET_DOMAIN_PATH, validateDomid(domid), convert=_stripText)

    def introduceDomain(self, domid: int, mfn: int, port: int) -> Deferred[None]:
        """Tell xenstored to serve a domain's ring (page C{mfn}, event channel C{port})."""
        if not isinstance(mfn, int) or not isinstance(port, int):
            raise InvalidArgumentError("mfn and port must be integers")
        return self._domidRequest(Op.INTRODUCE, validateDomid(domid), mfn, port)

    def releaseDomain(self, domid: int) -> Deferred[None]:
        """Tell xenstored to stop serving a domain (fires @releaseDomain)."""
        return self._domidRequest(Op.RELEASE, validateDomid(domid))

    def resumeDomain(self, domid: int) -> Deferred[None]:
        """Re-arm @releaseDomain for a domain (XS_RESUME)."""
        return self._domidRequest(Op.RESUME, validateDomid(domid))

    def isDomainIntroduced(self, domid: int) -> Deferred[bool]:
        """Whether xenstored is serving the domain."""
        return self._domidRequest(Op.IS_DOMAIN_INTRODUCED, validateDomid(domid), convert=_isTrue)

    def setTarget(self, domid: int, target: int) -> Deferred[None]:
        """Give C{domid} the rights of C{target} over C{target}'s nodes."""
        return self._domidRequest(Op.SET_TARGET, validateDomid(domid), validateDomid(target))

    # Watches

    def watch(
        self, path: str, callback: WatchCallback, token: str | None = None
    ) -> Deferred[IWatchHandle]:
        """
        Watch C{path} and its descendants; C{callback(eventPath)} runs for every
        change, and once at registration (as xenstored fires it). The Deferred
        fires with a L{WatchHandle} once xenstored has accepted the watch.
        """
        p = validateWatchPath(path)
        tok = validateToken(token) if token is not None else newToken()
        if tok in self._watches:
            raise InvalidArgumentError(f"watch token {tok!r} already in use on this connection")
        payload = _checkSize(p.encode("ascii") + b"\0" + tok.encode("utf-8") + b"\0", f"WATCH {p}")
        # Route events before sending: the registration event may arrive
        # right behind the ack.
        self._watches[tok] = (p, callback)

        def failed(f: Failure) -> Failure:
            self._watches.pop(tok, None)
            return f

        d = self._send(Op.WATCH, payload, p)
        d.addCallbacks(lambda _: WatchHandle(self, p, tok), failed)
        return d

    def _unwatch(self, path: str, token: str) -> Deferred[None]:
        if self._watches.pop(token, None) is None or not self.protocol.connected:
            # Already removed (resetWatches) or gone with the connection.
            return succeed(None)
        payload = path.encode("ascii") + b"\0" + token.encode("utf-8") + b"\0"
        d: Deferred[Any] = self._send(Op.UNWATCH, payload, path, discard)
        # The watch dies with the connection anyway.
        # ENOENT: xenstored no longer has it (a RESET_WATCHES overtook us).
        d.addErrback(lambda f: f.trap(XenStoreConnectionLost, NoEntryError) and None)
        return d

    def resetWatches(self) -> Deferred[None]:
        """Remove every watch (and transaction) of this connection (XS_RESET_WATCHES)."""
        tokens = list(self._watches)
        d = self._send(Op.RESET_WATCHES, b"", None)
        return d.addCallback(self._forgetWatches, tokens)

    def _forgetWatches(self, _: object, tokens: list[str]) -> None:
        # Only the watches registered before RESET_WATCHES was sent: a
        # WATCH sent after it is still registered in xenstored.
        for token in tokens:
            self._watches.pop(token, None)

    def hasWatch(self, token: str) -> bool:
        """Whether a watch with this token is registered on this connection."""
        return token in self._watches

    @property
    def watchCount(self) -> int:
        """Watches registered on this connection."""
        return len(self._watches)

    def _eventReceived(self, path: bytes, token: bytes) -> None:
        entry = self._watches.get(token.decode("utf-8", "replace"))
        if entry is None:
            self.log.debug("Event for unknown token {token!r}", token=token)
            return
        try:
            entry[1](path.decode("ascii", "replace"))
        except Exception:
            self.log.failure("Watch callback for {path} raised", path=entry[0])

    # Transactions

    def startTransaction(self) -> Deferred[ITransaction]:
        """Start a transaction; end it with its C{commit()} or C{abort()}."""
        return self._send(_TRANSACTION_START, b"\0", None, self._transaction)

    def _transaction(self, raw: bytes) -> Transaction:
        return Transaction(self, int(raw.rstrip(b"\0")))

    @overload
    def transact(
        self, fn: Callable[[ITransaction], Awaitable[T]], maxAttempts: int | None = None
    ) -> Deferred[T]: ...

    @overload
    def transact(
        self, fn: Callable[[ITransaction], T], maxAttempts: int | None = None
    ) -> Deferred[T]: ...

    def transact(
        self,
        fn: Callable[[ITransaction], Any],
        maxAttempts: int | None = None,
    ) -> Deferred[Any]:
        """
        Run C{fn(tx)} in a transaction and commit it, retrying on EAGAIN (from
        the commit or any operation inside) with jittered exponential backoff.

        C{fn} may return a value or an awaitable (e.g. a Deferred); the result
        is the Deferred's result. Any other error aborts and is raised.

        @raise TransactionRetriesExhausted: after C{maxAttempts} conflicts.
        """
        attempts = maxAttempts if maxAttempts is not None else self.maxAttempts
        return Deferred.fromCoroutine(self._transact(fn, attempts))

    async def _transact(self, fn: Callable[[ITransaction], Any], attempts: int) -> Any:
        for attempt in range(attempts):
            tx = await self.startTransaction()
            try:
                result = fn(tx)
                if isinstance(result, Awaitable):
                    result = await result
                await tx.commit()
                return result
            except ConflictError:
                if not tx.ended:  # type: ignore[attr-defined]
                    await _quietly(tx.abort())
            except BaseException:
                if not tx.ended:  # type: ignore[attr-defined]
                    await _quietly(tx.abort())
                raise
            if attempt + 1 < attempts:
                delay = self._random() * min(self.backoffCap, self.backoffBase * 2**attempt)
                await deferLater(self.reactor, delay)
        raise TransactionRetriesExhausted(attempts)

    # Waiting

    def waitFor(
        self,
        path: str,
        predicate: Callable[[str | None], bool] = lambda v: v is not None,
        timeout: float | None = None,
    ) -> Deferred[str | None]:
        """
        Fire with the value of C{path} (C{None} if absent) as soon as
        C{predicate(value)} is true, checking at registration and on every
        change. Fails with L{XenStoreTimeout} after C{timeout} seconds.

        Whatever happens — success, error, timeout or C{cancel()} — the watch
        and the timer are removed.
        """
        return _Waiter(self, validatePath(path), predicate, timeout).start()


async def _quietly(d: Deferred[Any]) -> None:
    try:
        await d
    except Exception:
        pass


class _Waiter:
    """One L{XenStoreClient.waitFor} in progress."""

    def __init__(
        self,
        client: XenStoreClient,
        path: str,
        predicate: Callable[[str | None], bool],
        timeout: float | None,
    ) -> None:
        self.client = client
        self.path = path
        self.predicate = predicate
        self.timeout = timeout
        self.done = False
        self.last: str | None = None
        self.handle: IWatchHandle | None = None
        self.timer: Any = None
        self.result: Deferred[str | None] = Deferred(self._cancel)

    def start(self) -> Deferred[str | None]:
        if self.timeout is not None:
            self.timer = self.client.reactor.callLater(self.timeout, self._timedOut)
        d = self.client.watch(self.path, self._changed)
        d.addCallbacks(self._registered, self._finishFailure)
        return self.result

    def _registered(self, handle: IWatchHandle) -> None:
        if self.done:
            handle.stop()
        else:
            self.handle = handle

    def _changed(self, eventPath: str) -> None:
        if self.done:
            return
        d = self.client.readOrNone(self.path)
        d.addCallback(self._check)
        d.addErrback(self._finishFailure)

    def _check(self, value: str | None) -> None:
        if self.done:
            return
        self.last = value
        if self.predicate(value):
            self._cleanup()
            self.result.callback(value)

    def _timedOut(self) -> None:
        self.timer = None
        if not self.done:
            self._finishFailure(Failure(XenStoreTimeout(self.path, self.timeout or 0, self.last)))

    def _finishFailure(self, f: Failure) -> None:
        if self.done:
            return
        self._cleanup()
        self.result.errback(f)

    def _cancel(self, d: Deferred[str | None]) -> None:
        # Deferred delivers CancelledError itself after this returns.
        self._cleanup()

    def _cleanup(self) -> None:
        self.done = True
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None
        if self.handle is not None:
            self.handle.stop()
            self.handle = None


__all__ = [
    "CancelledError",
    "Transaction",
    "WatchHandle",
    "XenStoreClient",
    "newToken",
]
