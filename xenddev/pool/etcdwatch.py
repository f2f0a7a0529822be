# -*- test-case-name: tests.test_pool_etcd -*-
"""
etcd watches over the gateway's streaming C{POST /v3/watch}.

The gateway answers a watch with one HTTP response that never ends: a
line of JSON per C{WatchResponse} (C{{"result": {...}}}), the first with
C{"created": true}. L{Watch} reads the lines as they come, hands each
event to its callback and remembers the revision after the last one it
delivered; when the stream breaks (the member died, the connection
dropped) it opens a new one, through the client's failover, from that
revision, so no event is lost or seen twice. A watch etcd cancels because
its revisions were compacted cannot resume: it ends with
L{WatchCompacted}.

With etcd's authentication on, a watch is checked when it is created
(with the token its stream carried; it goes on after the token expires).
etcd refuses one by answering C{created} and C{canceled} together, the
reason a gRPC error's text (C{rpc error: code = Unauthenticated desc =
etcdserver: invalid auth token}). The client's C{refusal} types it: a
rejected token is dropped (C{tokenRejected}) and the watch opened again
with a new one, once until a stream is created; any other refusal of the
credentials (permission denied, no user) ends the watch with it.

This module knows nothing of the client: it is handed an I{opener}, a
function that sends one streaming request with failover and fires with
the response once a member accepted it.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from typing import Any, cast

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IResponse
from zope.interface import implementer

from xenddev.pool.errors import EtcdAuthError, EtcdError, TokenRejected, WatchCompacted
from xenddev.pool.etcdwire import WatchEvent, WatchResponse, decodeJSON, watchRequest
from xenddev.pool.interfaces import IWatch

__all__ = ["LineStream", "Opener", "Watch", "cancelError"]

#: Sends a streaming request (gateway path, JSON body) with failover.
Opener = Callable[[str, dict[str, Any]], Awaitable[IResponse]]

#: The longest line a stream may send before it is cut (a watch response
#: carries the events of one revision; 64 MiB is far past etcd's 1.5 MiB
#: request limit).
MAX_LINE = 64 * 1024 * 1024

#: Seconds between a broken stream and the attempt to resume it, so a
#: member that drops every stream at once is not hammered.
RESUME_DELAY = 0.05

#: gRPC's code names, as a cancel reason spells them, and their numbers.
_GRPC_CODES = {
    "InvalidArgument": 3,
    "PermissionDenied": 7,
    "FailedPrecondition": 9,
    "Unauthenticated": 16,
}
_RPC_ERROR = re.compile(r"rpc error: code = (\w+) desc = (.*)", re.DOTALL)


def cancelError(reason: str) -> EtcdError | None:
    """
    The error in a watch's cancel reason (C{rpc error: code = NAME desc =
    MESSAGE}), or None when the reason is not one.
    """
    match = _RPC_ERROR.search(reason)
    if match is None:
        return None
    return EtcdError(_GRPC_CODES.get(match.group(1), -1), match.group(2), 200)


class LineStream(Protocol):
    """
    A response body read as lines: C{onLine} for each complete one,
    C{onEnd} with the reason when the body ends.
    """

    def __init__(self, onLine: Callable[[bytes], None], onEnd: Callable[[Failure], None]) -> None:
        self._onLine = onLine
        self._onEnd = onEnd
        self._buffer = b""
        self._stopped = False

    def dataReceived(self, data: bytes) -> None:
        """Hand on every complete line; cut a stream whose line would not end."""
        self._buffer += data
        while not self._stopped:
            line, sep, rest = self._buffer.partition(b"\n")
            if not sep:
                break
            self._buffer = rest
            if line.strip():
                self._onLine(line)
        if len(self._buffer) > MAX_LINE:
            self._buffer = b""
            self.stop()

    def connectionLost(self, reason: Failure = Failure(CancelledError())) -> None:  # noqa: B008
        """The body ended: a last line without its newline still counts."""
        if self._buffer.strip() and not self._stopped:
            self._onLine(self._buffer)
        self._buffer = b""
        self._onEnd(reason)

    def stop(self) -> None:
        """Close the stream (its connection is aborted, never reused)."""
        self._stopped = True
        if self.transport is not None:
            cast(IPushProducer, self.transport).stopProducing()


@implementer(IWatch)
class Watch:
    """
    One watch of a key or range, resumed across members until cancelled.

    @ivar nextRevision: the revision the watch would resume from (0 until
        it is created, when it watches "from now").
    """

    log = Logger()

    def __init__(
        self,
        reactor: IReactorTime,
        opener: Opener,
        key: bytes,
        callback: Callable[[WatchEvent], object],
        rangeEnd: bytes = b"",
        startRevision: int = 0,
        prevKv: bool = False,
        refusal: Callable[[EtcdError], EtcdError] | None = None,
        tokenRejected: Callable[[], object] | None = None,
    ) -> None:
        self._reactor = reactor
        self._refusal = refusal
        self._tokenRejected = tokenRejected
        #: A stream was refused for its token since the last one created.
        self._renewed = False
        self._opener = opener
        self._key = key
        self._rangeEnd = rangeEnd
        self._prevKv = prevKv
        self._callback = callback
        self.nextRevision = startRevision
        self._createdAt: int | None = None
        self._result: Failure | None = None
        self._finished = False
        self._createdWaiters: list[Deferred[int]] = []
        self._doneWaiters: list[Deferred[None]] = []
        self._opening: Deferred[IResponse] | None = None
        self._stream: LineStream | None = None
        self._resume: IDelayedCall | None = None

    def start(self) -> None:
        """Open the first stream."""
        self._open()

    def whenCreated(self) -> Deferred[int]:
        """
        Fires with the revision the watch was created at, or fails as the
        watch ended if it ended first (each caller gets its own Deferred,
        so nobody is left holding an unhandled failure).
        """
        if self._createdAt is not None:
            return _fired(self._createdAt)
        if self._finished:
            return _failed(self._result)
        d: Deferred[int] = Deferred()
        self._createdWaiters.append(d)
        return d

    def whenDone(self) -> Deferred[None]:
        """Fires with None when cancelled, or fails with why the watch could not go on."""
        if self._finished:
            return _failed(self._result) if self._result is not None else _fired(None)
        d: Deferred[None] = Deferred()
        self._doneWaiters.append(d)
        return d

    def cancel(self) -> None:
        """Stop watching: no callback is made after this; C{whenDone} fires."""
        self._finish(None)

    # --- the stream -------------------------------------------------------

    def _request(self) -> dict[str, Any]:
        """The watch request, from the revision after the last one seen."""
        return watchRequest(self._key, self._rangeEnd, self.nextRevision, self._prevKv)

    def _open(self) -> None:
        """Send the watch request through the opener (which fails over)."""
        self._resume = None
        d = Deferred.fromCoroutine(_awaited(self._opener("/watch", self._request())))
        self._opening = d
        d.addCallbacks(self._opened, self._openFailed)

    def _opened(self, response: IResponse) -> None:
        """A member accepted the watch: read its stream."""
        self._opening = None
        if self._finished:
            response.deliverBody(_Discard())
            return
        self._stream = LineStream(self._line, self._ended)
        response.deliverBody(self._stream)

    def _openFailed(self, failure: Failure) -> None:
        """No member took the watch within the client's timeout: it ends."""
        self._opening = None
        if not self._finished:
            self._finish(failure)

    def _line(self, line: bytes) -> None:
        """One C{WatchResponse}: deliver its events, note how far the watch got."""
        if self._finished:
            return
        try:
            response = WatchResponse.fromJSON(decodeJSON(line))
        except Exception:
            self._finish(Failure())
            return
        if response.canceled:
            if response.created and self._refused(response.cancelReason):
                return
            if response.compactRevision:
                self._finish(Failure(WatchCompacted(response.compactRevision)))
            else:
                # etcd cancelled the watch for another reason (the member
                # is shutting down, ...): drop this stream and resume.
                self.log.info(
                    "etcd cancelled a watch ({reason}); resuming", reason=response.cancelReason
                )
                self._dropStream()
            return
        if response.created:
            self._renewed = False
            if not self.nextRevision:
                # A watch "from now" resumes after what existed at creation.
                self.nextRevision = response.revision + 1
            if self._createdAt is None:
                self._createdAt = response.revision
                waiters, self._createdWaiters = self._createdWaiters, []
                for d in waiters:
                    d.callback(response.revision)
            return
        for event in response.events:
            self.nextRevision = max(self.nextRevision, event.kv.modRevision + 1)
            try:
                self._callback(event)
            except Exception:
                self.log.failure("a watch callback failed on {key!r}", key=event.kv.key)
            if self._finished:
                return
        if not response.events:
            # A progress notification: everything up to its revision was sent.
            self.nextRevision = max(self.nextRevision, response.revision + 1)

    def _refused(self, reason: str) -> bool:
        """
        Whether etcd refused to create the watch for its credentials (see
        the module's doc); if so, the watch is opened again with a new
        token, or ends.
        """
        error = cancelError(reason)
        if error is None or self._refusal is None:
            return False
        typed = self._refusal(error)
        if isinstance(typed, TokenRejected) and not self._renewed:
            self._renewed = True
            if self._tokenRejected is not None:
                self._tokenRejected()
            self.log.info("etcd refused a watch's token ({why}); renewing it", why=error.message)
            self._dropStream()
            return True
        if isinstance(typed, EtcdAuthError):
            self._finish(Failure(typed))
            return True
        return False

    def _ended(self, reason: Failure) -> None:
        """The stream broke: resume on whichever member answers, unless finished."""
        self._stream = None
        if self._finished:
            return
        self.log.info(
            "a watch stream ended ({reason}); resuming at revision {revision}",
            reason=reason.getErrorMessage(),
            revision=self.nextRevision,
        )
        self._resume = self._reactor.callLater(RESUME_DELAY, self._open)

    def _dropStream(self) -> None:
        """Close the current stream (its end resumes the watch)."""
        if self._stream is not None:
            self._stream.stop()

    def _finish(self, result: Failure | None) -> None:
        """End the watch once: stop everything, tell the waiters."""
        if self._finished:
            return
        self._finished = True
        self._result = result
        if self._resume is not None and self._resume.active():
            self._resume.cancel()
        if self._opening is not None:
            self._opening.cancel()
        self._dropStream()
        created, self._createdWaiters = self._createdWaiters, []
        done, self._doneWaiters = self._doneWaiters, []
        failure = result if result is not None else Failure(CancelledError("watch cancelled"))
        for c in created:
            c.errback(failure)
        for d in done:
            if result is None:
                d.callback(None)
            else:
                d.errback(result)
        if result is not None and not done:
            self.log.failure("a watch of {key!r} ended", result, key=self._key)


class _Discard(Protocol):
    """Reads a stream nobody wants any more, and closes it."""

    def connectionMade(self) -> None:
        """Close at once."""
        assert self.transport is not None
        cast(IPushProducer, self.transport).stopProducing()


async def _awaited(value: Awaitable[IResponse]) -> IResponse:
    """Await C{value} (so any awaitable the opener returns becomes a Deferred)."""
    return await value


def _fired(value: Any) -> Deferred[Any]:
    """A Deferred that has fired with C{value}."""
    d: Deferred[Any] = Deferred()
    d.callback(value)
    return d


def _failed(result: Failure | None) -> Deferred[Any]:
    """A Deferred that has failed with C{result} (a cancelled watch: CancelledError)."""
    d: Deferred[Any] = Deferred()
    d.errback(result if result is not None else Failure(CancelledError("watch cancelled")))
    return d
