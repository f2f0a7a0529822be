# -*- test-case-name: tests.test_xenstore_dispatch -*-
"""
Many waits on one standing watch.

L{IXenStore.waitFor} registers a watch per wait: WATCH, a read at
registration, a read per event, UNWATCH. A toolstack waiting on thousands of
nodes under one subtree (the requests and backends of a driver domain) does
better with one watch on the subtree for good, dispatching each event to the
waits on exactly that node: a wait then costs one read per event for its
node, plus one read at registration unless the caller registers it before
making the change it waits for (L{WatchDispatch.until}).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

from xenddev.xenstore.errors import XenStoreTimeout
from xenddev.xenstore.interfaces import IWatchHandle, IXenStore
from xenddev.xenstore.paths import validatePath

Predicate = Callable[[str | None], bool]


class PendingWait:
    """
    One wait: a node, a predicate, its Deferred (L{result}) and its timer.

    An unarmed wait only notes events; L{arm} it once the change it waits
    for has been made, so that no read issued before the change can satisfy
    it (a request not yet written looks exactly like one already answered).
    """

    def __init__(
        self, dispatch: WatchDispatch, path: str, predicate: Predicate, armed: bool
    ) -> None:
        self.dispatch = dispatch
        self.path = path
        self.predicate = predicate
        self.armed = armed
        self._dirty = False
        self.last: str | None = None
        self.timer: Any = None
        self.result: Deferred[str | None] = Deferred(lambda _: self._forget())

    def arm(self) -> None:
        """Start acting on events; look now if one came while unarmed."""
        self.armed = True
        if self._dirty:
            self.check()

    def check(self) -> None:
        """Read the node; fire if the predicate holds."""
        if self.result.called:
            return
        if not self.armed:
            self._dirty = True
            return
        d = self.dispatch.xs.readOrNone(self.path)
        d.addCallbacks(self._value, self._failed)

    def _value(self, value: str | None) -> None:
        if self.result.called:
            return
        self.last = value
        if self.predicate(value):
            self._forget()
            self.result.callback(value)

    def _failed(self, failure: Any) -> None:
        if not self.result.called:
            self._forget()
            self.result.errback(failure)

    def timedOut(self, timeout: float) -> None:
        self.timer = None
        if not self.result.called:
            self._forget()
            self.result.errback(XenStoreTimeout(self.path, timeout, self.last))

    def _forget(self) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None
        self.dispatch._remove(self)


class WatchDispatch:
    """
    One standing watch on C{root}, shared by any number of waits on nodes
    under it.

    @param xs: the connection (its C{reactor} times the waits).
    @param root: the subtree watched.
    """

    log = Logger()

    def __init__(self, xs: IXenStore, root: str) -> None:
        self.xs = xs
        self.root = validatePath(root)
        #: node -> its waits; ancestor -> waits below it (a removal fires
        #: one event, for the node removed, not for each node below it).
        self._waits: dict[str, list[PendingWait]] = {}
        self._below: dict[str, list[PendingWait]] = {}
        self._handle: IWatchHandle | None = None
        self._registering: list[Deferred[None]] | None = None

    def ready(self) -> Deferred[None]:
        """Fires once the standing watch is registered (at the first call)."""
        if self._handle is not None:
            return succeed(None)
        d: Deferred[None] = Deferred()
        if self._registering is not None:
            self._registering.append(d)
            return d
        self._registering = [d]

        def registered(handle: IWatchHandle) -> None:
            waiting, self._registering = self._registering or [], None
            self._handle = handle
            for w in waiting:
                w.callback(None)

        def failed(f: Any) -> None:
            waiting, self._registering = self._registering or [], None
            for w in waiting:  # the next call tries again
                w.errback(f)

        self.xs.watch(self.root, self._event).addCallbacks(registered, failed)
        return d

    def stop(self) -> Deferred[None]:
        """Remove the standing watch (pending waits still time out)."""
        handle, self._handle = self._handle, None
        return succeed(None) if handle is None else handle.stop()

    def until(
        self, path: str, predicate: Predicate, timeout: float | None = None
    ) -> Deferred[str | None]:
        """
        Fire with the value of C{path} once it satisfies C{predicate},
        checked at once and on every event for C{path} (or for a directory
        above it). Fails with L{XenStoreTimeout} after C{timeout} seconds;
        cancellable. Call after L{ready}.
        """
        wait = self.expect(path, predicate, timeout, armed=True)
        wait.check()
        return wait.result

    def expect(
        self, path: str, predicate: Predicate, timeout: float | None = None, armed: bool = False
    ) -> PendingWait:
        """
        Register a wait, unarmed by default, before making the change it
        waits for (after L{ready}); L{PendingWait.arm} it once the change is
        made. Its C{result} fires as L{until}'s does.
        """
        node = validatePath(path)
        if node != self.root and not node.startswith(self.root + "/"):
            raise ValueError(f"{node} is not under {self.root}")
        wait = PendingWait(self, node, predicate, armed)
        self._waits.setdefault(node, []).append(wait)
        for ancestor in _ancestors(node, self.root):
            self._below.setdefault(ancestor, []).append(wait)
        if timeout is not None:
            wait.timer = self.xs.reactor.callLater(timeout, wait.timedOut, timeout)
        return wait

    def waitFor(
        self, path: str, predicate: Predicate, timeout: float | None = None
    ) -> Deferred[str | None]:
        """L{IXenStore.waitFor}'s contract (checked at once) on the standing watch."""
        d = self.ready()
        return d.addCallback(lambda _: self.until(path, predicate, timeout))

    def readOrNone(self, path: str) -> Deferred[str | None]:
        """The connection's C{readOrNone} (so this can stand in for it in waits)."""
        return self.xs.readOrNone(path)

    @property
    def pending(self) -> int:
        """Waits not yet fired."""
        return sum(len(w) for w in self._waits.values())

    def _remove(self, wait: PendingWait) -> None:
        _discard(self._waits, wait.path, wait)
        for ancestor in _ancestors(wait.path, self.root):
            _discard(self._below, ancestor, wait)

    def _event(self, path: str) -> None:
        if path == self.root:
            # The registration event (again after a reconnection, when
            # changes may have been missed): look at every node waited on.
            for waits in list(self._waits.values()):
                for wait in list(waits):
                    wait.check()
            return
        for wait in [*self._waits.get(path, ()), *self._below.get(path, ())]:
            wait.check()


def _ancestors(node: str, root: str) -> list[str]:
    """The directories strictly between C{root} and C{node}."""
    out = []
    parent = node.rsplit("/", 1)[0]
    while len(parent) > len(root):
        out.append(parent)
        parent = parent.rsplit("/", 1)[0]
    return out


def _discard(index: dict[str, list[PendingWait]], key: str, wait: PendingWait) -> None:
    waits = index.get(key)
    if waits is not None and wait in waits:
        waits.remove(wait)
        if not waits:
            del index[key]
