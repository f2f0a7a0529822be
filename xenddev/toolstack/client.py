# -*- test-case-name: tests.test_driverdomain -*-
"""
The toolstack side of the backendctrl protocol.

L{DriverDomainClient} is bound to one driver domain. Each request checks the
seed's preconditions and writes C{request} (plus C{t/*} or the plug's
C{frontend}) in one transaction, waits with a watch until the driver domain
deletes C{request}, then reads and removes C{result}/C{result_msg} and any
nodes left by a failed request, so that a failure leaves the tree as it was.
"""

from __future__ import annotations

import builtins
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

import attrs
from twisted.internet.defer import Deferred, gatherResults
from twisted.logger import Logger
from twisted.python.failure import Failure

from xenddev.backendctrl.errors import (
    DriverDomainError,
    DriverDomainTimeout,
    NoAgentError,
    PreconditionError,
    StaleTokenError,
)
from xenddev.backendctrl.protocol import (
    ACTIVATE,
    ACTIVE,
    CHANGE,
    DEACTIVATE,
    PAUSE,
    PLUG,
    PLUGGED,
    PREPARE,
    RELOAD,
    RESUME,
    STALE_TOKEN,
    UNPLUG,
    UNPREPARE,
    VDI,
    XEN_ERRNO,
    XEN_ERRNO_NAME,
    ControlPaths,
    ObjectClass,
    PlugPaths,
    checkTransactionSize,
    kindsPath,
    privateDir,
    validateName,
    validateTarget,
    validateToken,
)
from xenddev.backendctrl.requests import ObjectSnapshot, Request, checkPreconditions
from xenddev.interfaces import ITransaction, IXenStore
from xenddev.keyedlocks import KeyedLocks
from xenddev.xenbus import Waiting, domainPath
from xenddev.xenstore.dispatch import PendingWait, WatchDispatch
from xenddev.xenstore.errors import XenStoreTimeout
from xenddev.xenstore.paths import Perm, validateDomid, validatePath

T = TypeVar("T")

#: Retry budget of the protocol's transactions: objects of one driver domain
#: are siblings, so many concurrent requests conflict on the shared parent
#: by design; giving up on a tidy-up would leave nodes behind.
TRANSACT_ATTEMPTS = 500


@attrs.frozen
class PlugResult:
    """
    What a successful plug tells the toolstack.

    @ivar backendPath: the absolute backend directory the driver domain chose.
    @ivar bcopy: C{b-copy/*} values to copy into the backend (deprecated
        mechanism; usually empty).
    @ivar frontendPath: the frontend directory the plug serves.
    @ivar driverDomid: the driver domain.
    """

    backendPath: str
    bcopy: Mapping[str, str]
    frontendPath: str
    driverDomid: int


@attrs.frozen
class PlugInfo:
    """One plug of an object, as listed."""

    name: str
    state: str | None
    frontend: str | None
    backend: str | None


@attrs.frozen
class ObjectInfo:
    """One vdi (or vif) of a driver domain, as listed."""

    objectClass: str
    name: str
    state: str | None
    request: str | None
    target: Mapping[str, str]
    plugs: tuple[PlugInfo, ...]


class DriverDomainClient:
    """
    Instructs one driver domain through C{/local/domain/<dd>/backendctrl}.

    Requests on one object are serialised (the protocol allows one
    outstanding request per object); requests on different objects run in
    parallel.

    @param xs: the XenStore connection (the toolstack is privileged).
    @param driverDomid: the driver domain's id.
    @param timeout: seconds to wait for the driver domain per request.
    """

    log = Logger()

    def __init__(self, xs: IXenStore, driverDomid: int, timeout: float = 30.0) -> None:
        self.xs = xs
        self.driverDomid = validateDomid(driverDomid)
        self.timeout = timeout
        self._locks: KeyedLocks[tuple[str, str]] = KeyedLocks()
        #: The connection (ReconnectingXenStore.connections) on which the
        #: control area was last made: a restarted xenstored may have lost it.
        self._areaMadeOn: int | None = None
        #: The callers waiting while the control area is offered to an agent
        #: that may be waiting for it (L{checkAgent}); None when no offer stands.
        self._offerWaiters: builtins.list[Deferred[None]] | None = None
        home = domainPath(self.driverDomid)
        # One standing watch each on the control area and the backends
        # instead of a watch per wait (only with a reactor to time waits).
        timed = getattr(xs, "reactor", None) is not None
        self._control = WatchDispatch(xs, f"{home}/backendctrl") if timed else None
        self._backends = WatchDispatch(xs, f"{home}/backend") if timed else None

    # Public API

    def prepare(
        self, name: str, target: Mapping[str, object], objectClass: ObjectClass = VDI
    ) -> Deferred[None]:
        """Create the object from C{target} (state becomes C{inactive})."""
        paths = self.paths(name, objectClass)
        clean = validateTarget(target)
        writes = {paths.target(k): v for k, v in clean.items()}
        checkTransactionSize(writes)
        return self._serialised(paths, lambda: self._simple(paths, Request(PREPARE), writes))

    def activate(self, name: str, objectClass: ObjectClass = VDI, token: int = 0) -> Deferred[None]:
        """
        Make the object active (I/O may flow).

        @param token: the fencing token of the target's activation (its
            grant's; 0: no pool vouches, none is sent). The driver domain
            refuses one lower than a token it served for the target
            (L{StaleTokenError}, fault 12); docs/protocol.md.
        """
        paths = self.paths(name, objectClass)
        writes = {paths.token: str(token)} if validateToken(token) else {}
        return self._serialised(paths, lambda: self._simple(paths, Request(ACTIVATE), writes))

    def deactivate(self, name: str, objectClass: ObjectClass = VDI) -> Deferred[None]:
        """Make the object inactive again."""
        paths = self.paths(name, objectClass)
        return self._serialised(paths, lambda: self._simple(paths, Request(DEACTIVATE)))

    def unprepare(self, name: str, objectClass: ObjectClass = VDI) -> Deferred[None]:
        """Destroy the object; its directory is removed afterwards."""
        paths = self.paths(name, objectClass)
        return self._serialised(paths, lambda: self._simple(paths, Request(UNPREPARE)))

    def change(
        self, name: str, target: Mapping[str, object], objectClass: ObjectClass = VDI
    ) -> Deferred[None]:
        """
        Replace the target of a prepared object (our extension, for a
        cdrom's medium): the driver domain's kind switches what it serves,
        or refuses with C{EOPNOTSUPP}; on failure nothing changed.
        """
        paths = self.paths(name, objectClass)
        clean = validateTarget(target)
        writes = {paths.newTarget(k): v for k, v in clean.items()}
        checkTransactionSize(writes)
        return self._serialised(paths, lambda: self._simple(paths, Request(CHANGE), writes))

    def pause(self, name: str, objectClass: ObjectClass = VDI) -> Deferred[None]:
        """Pause an active object's data path (our extension; seed 002)."""
        paths = self.paths(name, objectClass)
        return self._serialised(paths, lambda: self._simple(paths, Request(PAUSE)))

    def resume(
        self, name: str, reload: bool = True, objectClass: ObjectClass = VDI
    ) -> Deferred[None]:
        """Resume a paused data path, reopening its image first with C{reload}."""
        paths = self.paths(name, objectClass)
        request = Request(RELOAD if reload else RESUME)
        return self._serialised(paths, lambda: self._simple(paths, request))

    def plug(
        self,
        name: str,
        plug: str,
        frontendPath: str,
        objectClass: ObjectClass = VDI,
        takeover: bool = False,
    ) -> Deferred[PlugResult]:
        """
        Ask the driver domain to serve C{frontendPath} through the object.

        @param takeover: the frontend exists and is being moved to this
            driver domain (driver-domain restart); see docs/protocol.md.
        """
        paths = self.paths(name, objectClass)
        plugPaths = paths.plug(plug)
        front = validatePath(frontendPath)
        if not front.startswith("/"):
            raise ValueError(f"frontend path must be absolute: {frontendPath!r}")
        writes = {plugPaths.frontend: front}
        if takeover:
            writes[plugPaths.takeover] = "1"

        async def run() -> PlugResult:
            backend, bcopy = await self._request(
                paths, Request(PLUG, plug), writes, front, takeover
            )
            assert backend is not None
            return PlugResult(paths.absolute(backend), bcopy, front, self.driverDomid)

        return self._serialised(paths, lambda: Deferred.fromCoroutine(run()))

    def unplug(self, name: str, plug: str, objectClass: ObjectClass = VDI) -> Deferred[None]:
        """Stop serving the plug; its backend directory is removed by the driver domain."""
        paths = self.paths(name, objectClass)
        plugPaths = paths.plug(plug)

        async def run() -> None:
            front = await self.xs.readOrNone(plugPaths.frontend)
            # The result's transaction removes the unplugged vbd's directory.
            await self._request(paths, Request(UNPLUG, plug), {}, front)

        return self._serialised(paths, lambda: Deferred.fromCoroutine(run()))

    def teardown(self, name: str, objectClass: ObjectClass = VDI) -> Deferred[None]:
        """
        Take an object down from whatever state it is in, and remove every
        trace of it: wait out a pending request (one whose caller gave up),
        unplug its plugs (their frontends must be gone), deactivate,
        unprepare, and remove what is left of its directory.
        """
        paths = self.paths(name, objectClass)

        async def run() -> None:
            try:
                await self._requestGone(paths)
            except XenStoreTimeout:
                raise DriverDomainTimeout("(pending)", paths.base, self.timeout) from None
            # Only what the teardown needs (not the target), in one round.
            state, names = await gatherResults(
                [self.xs.readOrNone(paths.state), self.xs.ls(paths.plugsDir, missingOk=True)],
                consumeErrors=True,
            )
            if state is None and not names and not await self.xs.exists(paths.base):
                return
            for name in names:
                pp = paths.plug(name)
                plugState, frontend = await gatherResults(
                    [self.xs.readOrNone(pp.state), self.xs.readOrNone(pp.frontend)],
                    consumeErrors=True,
                )
                if plugState == PLUGGED:
                    await self._request(paths, Request(UNPLUG, name), {}, frontend)
            if state == ACTIVE:
                await self._request(paths, Request(DEACTIVATE), {}, None)
            if state is not None:
                await self._request(paths, Request(UNPREPARE), {}, None)
            # A failed request's leftovers (t/*, result, an unplugged vbd).
            await self.xs.rm(paths.base, missingOk=True)

        return self._serialised(paths, lambda: Deferred.fromCoroutine(run()))

    def abandon(self, name: str, objectClass: ObjectClass = VDI) -> Deferred[None]:
        """
        Give up on an object whose driver domain does not answer: remove
        its directory, a pending request included, so that nothing is left
        and the name can be used again (a failed creation's clean-up; see
        docs/protocol.md, decision 4). Unlike L{teardown} it asks the driver
        domain nothing.
        """
        paths = self.paths(name, objectClass)
        return self._serialised(paths, lambda: self.xs.rm(paths.base, missingOk=True))

    def list(self, objectClass: ObjectClass = VDI) -> Deferred[list[ObjectInfo]]:
        """Every object of the class in this driver domain, with its plugs."""
        return Deferred.fromCoroutine(self._list(objectClass))

    def describe(self, name: str, objectClass: ObjectClass = VDI) -> Deferred[ObjectInfo]:
        """One object: state, pending request, target and plugs."""
        return Deferred.fromCoroutine(self._describe(self.paths(name, objectClass)))

    def waits(self, path: str) -> Waiting:
        """
        What to wait on C{path} with (for L{xenddev.xenbus.waitForState} and
        friends): the standing watch on this driver domain's backends for a
        path under them, else the connection.
        """
        if self._backends is not None and path.startswith(self._backends.root + "/"):
            return self._backends
        return self.xs

    def stopWatching(self) -> Deferred[None]:
        """Remove the standing watches (pending waits still time out)."""
        stops = [w.stop() for w in (self._control, self._backends) if w is not None]
        return gatherResults(stops, consumeErrors=True).addCallback(lambda _: None)

    async def _requestGone(self, paths: ControlPaths) -> None:
        """Wait until C{request} is gone (one pending when we came)."""
        if self._control is None:
            await self.xs.waitFor(paths.request, lambda v: v is None, self.timeout)
        else:
            await self._control.ready()
            await self._control.until(paths.request, lambda v: v is None, self.timeout)

    def paths(self, name: str, objectClass: ObjectClass = VDI) -> ControlPaths:
        """The XenStore paths of an object (validates the name)."""
        return ControlPaths(objectClass, self.driverDomid, validateName(name, objectClass.name))

    # Machinery

    def _serialised(self, paths: ControlPaths, fn: Callable[[], Awaitable[T]]) -> Deferred[T]:
        return self._locks.run((paths.objectClass.name, paths.name), fn)

    def _simple(
        self, paths: ControlPaths, request: Request, writes: Mapping[str, str] | None = None
    ) -> Deferred[None]:
        async def run() -> None:
            await self._request(paths, request, writes or {}, None)

        return Deferred.fromCoroutine(run())

    async def ensureArea(self) -> None:
        """
        Create the driver domain's control directories, owned by it, if
        missing: C{backendctrl/vdi}, C{backendctrl/vif}, C{backend} and
        C{private}. The toolstack (privileged) must do this for a guest
        driver domain, which cannot create nodes in its own home.
        """
        connection = getattr(self.xs, "connections", 0)
        if self._areaMadeOn == connection:
            return
        await self._makeArea()
        self._areaMadeOn = connection

    async def _makeArea(self) -> builtins.list[str]:
        """Create the missing control directories; the ones created, parents first."""
        dd = self.driverDomid
        home = domainPath(dd)
        dirs = [
            f"{home}/backendctrl",
            f"{home}/backendctrl/vdi",
            f"{home}/backendctrl/vif",
            f"{home}/backend",
            f"{home}/private",
        ]

        async def create(tx: ITransaction) -> builtins.list[str]:
            present = await gatherResults([tx.exists(d) for d in dirs], consumeErrors=True)
            made = []
            for path, there in zip(dirs, present, strict=True):
                if not there:
                    await tx.mkdir(path)
                    await tx.setPerms(path, [Perm("n", dd)])
                    made.append(path)
            return made

        return await self.xs.transact(create, TRANSACT_ATTEMPTS)

    def checkAgent(self) -> Deferred[None]:
        """
        Make sure an agent serves this domain before anything is written
        for it (issue 13: a C{backend=} naming a domain without one left a
        control area and a pending request behind, and a retry failed with
        C{EBUSY}).

        A domain without a home is refused at once. An agent shows itself
        by its kinds (C{backendctrl/kinds}) or, if older than that
        advertisement, by its records (C{private/xenddev}): one round trip,
        made for every call (a domain may go away at any time, and a
        request written into a home that is gone would make it again).
        Failing both, an agent may be waiting for its control area (a
        guest driver domain cannot create it): the area is offered, and the
        agent must advertise its kinds within the request timeout; if it
        does not, the directories just made are removed again. Concurrent
        calls share that wait.

        @raise NoAgentError: the domain cannot serve; nothing is left written.
        """
        return Deferred.fromCoroutine(self._checkAgent())

    async def _checkAgent(self) -> None:
        dd = self.driverDomid
        home, kinds, records = await gatherResults(
            [
                self.xs.readOrNone(domainPath(dd)),
                self.xs.readOrNone(kindsPath(dd)),
                self.xs.readOrNone(privateDir(dd)),
            ],
            consumeErrors=True,
        )
        if home is None:
            raise NoAgentError(dd, f"it does not exist (no /local/domain/{dd})")
        if kinds is not None or records is not None:
            return
        # Each caller waits on a Deferred of its own: one caller's cancel
        # must not cancel the offer the others wait for.
        waiter: Deferred[None] = Deferred()
        if self._offerWaiters is not None:
            self._offerWaiters.append(waiter)
        else:
            waiters = self._offerWaiters = [waiter]

            def answer(result: object) -> None:
                self._offerWaiters = None
                for w in waiters:
                    if isinstance(result, Failure):
                        w.errback(result)
                    else:
                        w.callback(None)

            Deferred.fromCoroutine(self._offerArea()).addBoth(answer)
        await waiter

    async def _offerArea(self) -> None:
        """Make the control area; wait for an agent's kinds, else take it back."""
        dd = self.driverDomid
        made = await self._makeArea()
        try:
            await self.xs.waitFor(kindsPath(dd), lambda v: v is not None, self.timeout)
        except XenStoreTimeout:
            await self._removeArea(made)
            raise NoAgentError(
                dd,
                f"no agent runs there (none advertised its kinds in {kindsPath(dd)} "
                f"within {self.timeout:g} s of its control area being offered)",
            ) from None
        except BaseException:
            await self._removeArea(made)
            raise

    async def _removeArea(self, made: builtins.list[str]) -> None:
        """Remove the control directories C{made} (children first) if still empty."""

        async def remove(tx: ITransaction) -> None:
            for path in reversed(made):
                if not await tx.ls(path, missingOk=True):
                    await tx.rm(path, missingOk=True)

        try:
            await self.xs.transact(remove, TRANSACT_ATTEMPTS)
        except Exception:
            self.log.failure(
                "Could not remove the control area offered to domain {dd}", dd=self.driverDomid
            )
        self._areaMadeOn = None

    async def _snapshot(
        self, tx: ITransaction, paths: ControlPaths, request: Request, frontend: str | None
    ) -> ObjectSnapshot:
        reads: list[Deferred[Any]] = [tx.readOrNone(paths.state), tx.readOrNone(paths.request)]
        if request.plug is not None:
            reads.append(tx.readOrNone(paths.plug(request.plug).state))
            reads.append(tx.exists(frontend) if frontend else _resolved(False))
        state, pending, *rest = await gatherResults(reads, consumeErrors=True)
        plugCount = 0
        if request.rule.refusedWithPlugs:
            plugCount = len(await self._pluggedNames(tx, paths))
        return ObjectSnapshot(
            state,
            pending,
            rest[0] if rest else None,
            bool(rest[1]) if rest else False,
            plugCount,
        )

    async def _pluggedNames(self, tx: ITransaction, paths: ControlPaths) -> builtins.list[str]:
        names = await tx.ls(paths.plugsDir, missingOk=True)
        states = await gatherResults(
            [tx.readOrNone(paths.plug(n).state) for n in names], consumeErrors=True
        )
        return [n for n, s in zip(names, states, strict=True) if s == PLUGGED]

    async def _request(
        self,
        paths: ControlPaths,
        request: Request,
        writes: Mapping[str, str],
        frontend: str | None,
        takeover: bool = False,
    ) -> tuple[str | None, dict[str, str]]:
        """
        Perform one request; return, for a plug, the backend path (relative)
        and the b-copy values.
        """
        await self.ensureArea()
        rule = request.rule

        async def submit(tx: ITransaction) -> None:
            # The precondition reads and the writes go out together: xenstored
            # runs one connection's requests in order, so the reads see the
            # tree before the writes, and a failed precondition aborts the
            # transaction, writes unseen. One round trip instead of up to four.
            snapshot = Deferred.fromCoroutine(self._snapshot(tx, paths, request, frontend))
            ops: list[Deferred[None]] = []
            if rule.input is not None:
                # The request's input replaces whatever is there: t/* may
                # change only while neither state nor request exists, n/*
                # only while no change is pending.
                ops.append(tx.rm(paths.child(rule.input), missingOk=True))
            ops += [tx.write(p, v) for p, v in writes.items()]
            ops.append(tx.write(paths.request, str(request)))
            written = gatherResults(ops, consumeErrors=True)
            try:
                snap = await snapshot
                problem = checkPreconditions(request, snap, takeover)
            except BaseException:
                written.addErrback(lambda _: None)
                raise
            if problem is not None:
                written.addErrback(lambda _: None)
                errname, message = problem
                raise PreconditionError(
                    XEN_ERRNO[errname], errname, message, str(request), paths.base
                )
            await written

        answer: PendingWait | None = None
        if self._control is not None:
            # Registered before the request is written (so no event is
            # missed), armed once it is (so no earlier read counts).
            await self._control.ready()
            answer = self._control.expect(paths.request, lambda v: v is None, self.timeout)
        made: Deferred[None] = _resolved(None)
        if rule.createsObject:
            # Created outside the transaction: a transaction that creates the
            # object's directory modifies backendctrl/<class>, so concurrent
            # prepares in one driver domain conflicted with each other
            # (EAGAIN, retried until TransactionRetriesExhausted). Not awaited:
            # xenstored runs it before the transaction starts. An empty object
            # directory means nothing to the agent; a failed prepare's is
            # removed by _collect, a failed submission's below.
            made = self.xs.mkdir(paths.base)
        try:
            await self.xs.transact(submit, TRANSACT_ATTEMPTS)
            await made
        except BaseException as e:
            made.addErrback(lambda _: None)
            if answer is not None:
                answer.result.addErrback(lambda _: None)
                answer.result.cancel()
            if rule.createsObject and not isinstance(e, PreconditionError):
                await _rmIfEmpty(self.xs, paths.base)
            raise
        try:
            if answer is None:
                await self.xs.waitFor(paths.request, lambda v: v is None, self.timeout)
            else:
                answer.arm()
                await answer.result
        except XenStoreTimeout:
            raise DriverDomainTimeout(str(request), paths.base, self.timeout) from None
        fenced = paths.token in writes
        result, message, backend, bcopy, gone = await self._collect(self.xs, paths, request, fenced)
        if gone:
            await self.xs.rm(paths.base, missingOk=True)
        if result != 0:
            stale = fenced and result == XEN_ERRNO[STALE_TOKEN]
            raise (StaleTokenError if stale else DriverDomainError)(
                result, XEN_ERRNO_NAME.get(result, "E?"), message, str(request), paths.base
            )
        return backend, bcopy

    async def _collect(
        self, tx: IXenStore, paths: ControlPaths, request: Request, fenced: bool = False
    ) -> tuple[int, str, str | None, dict[str, str], bool]:
        """
        Read C{result}/C{result_msg} and tidy up: remove them, a failed
        plug's directory and (C{fenced}: one was sent) the token, which an
        agent older than tokens leaves; say whether the whole object no
        longer exists (failed prepare, successful unprepare), for the
        caller to remove — so the tree is as before. For a plug, also read what the toolstack
        needs (backend, b-copy).

        No transaction: once the request is answered, only this object's
        next request (queued behind this one in this client) touches these
        nodes, and xenstored runs one connection's requests in order, so the
        reads, sent first, see the values before the removals, sent with
        them. A transaction would cost two more round trips per request and
        conflict (the object's directory's removal modifies
        C{backendctrl/<class>}, as every concurrent prepare does).
        """
        reads: list[Deferred[Any]] = [
            tx.readOrNone(paths.result),
            tx.readOrNone(paths.resultMsg),
            tx.readOrNone(paths.state),
        ]
        plugPaths = paths.plug(request.plug) if request.plug is not None else None
        if plugPaths is not None:
            reads += [
                tx.readOrNone(plugPaths.state),
                tx.readOrNone(plugPaths.backend),
                tx.ls(plugPaths.bcopy, missingOk=True),
            ]
        removals = [tx.rm(paths.result, missingOk=True), tx.rm(paths.resultMsg, missingOk=True)]
        if request.rule.replacesTarget:
            # The agent consumes n/* on success; a refused change leaves it.
            removals.append(tx.rm(paths.newTargetDir, missingOk=True))
        if fenced:
            removals.append(tx.rm(paths.token, missingOk=True))
        raw, message, state, *plugReads = await gatherResults(reads, consumeErrors=True)
        await gatherResults(removals, consumeErrors=True)
        try:
            result = int(raw) if raw is not None else XEN_ERRNO["EIO"]
        except ValueError:
            result, message = XEN_ERRNO["EIO"], f"malformed result {raw!r}"
        backend: str | None = None
        bcopy: dict[str, str] = {}
        if state is not None and plugPaths is not None:
            plugState, backend, keys = plugReads
            if plugState is None:
                await _rmPlug(tx, paths, plugPaths)
            else:
                removed = tx.rm(plugPaths.takeover, missingOk=True)
                values = await gatherResults(
                    [tx.read(f"{plugPaths.bcopy}/{k}") for k in keys], consumeErrors=True
                )
                bcopy = dict(zip(keys, values, strict=True))
                await removed
        return result, message or "", backend, bcopy, state is None

    async def _list(self, objectClass: ObjectClass) -> builtins.list[ObjectInfo]:
        classDir = f"{domainPath(self.driverDomid)}/backendctrl/{objectClass.name}"
        infos = []
        for name in sorted(await self.xs.ls(classDir, missingOk=True)):
            try:
                paths = self.paths(name, objectClass)
            except ValueError:
                continue  # not ours to interpret
            infos.append(await self._describe(paths))
        return infos

    async def _describe(self, paths: ControlPaths) -> ObjectInfo:
        xs = self.xs
        state, request = await gatherResults(
            [xs.readOrNone(paths.state), xs.readOrNone(paths.request)],
            consumeErrors=True,
        )
        keys = await xs.ls(paths.targetDir, missingOk=True)
        values = await gatherResults([xs.read(paths.target(k)) for k in keys], consumeErrors=True)
        target = dict(zip(keys, values, strict=True))
        plugs = []
        for plug in sorted(await xs.ls(paths.plugsDir, missingOk=True)):
            pp = paths.plug(plug)
            pstate, front, back = await gatherResults(
                [
                    xs.readOrNone(pp.state),
                    xs.readOrNone(pp.frontend),
                    xs.readOrNone(pp.backend),
                ],
                consumeErrors=True,
            )
            plugs.append(PlugInfo(plug, pstate, front, paths.absolute(back) if back else None))
        return ObjectInfo(paths.objectClass.name, paths.name, state, request, target, tuple(plugs))


async def _rmPlug(tx: ITransaction | IXenStore, paths: ControlPaths, plugPaths: PlugPaths) -> None:
    """Remove a plug's directory, and the plugs directory if it is now empty."""
    removed = tx.rm(plugPaths.base, missingOk=True)
    # Sent behind the removal, so it lists what is left.
    left = tx.ls(paths.plugsDir, missingOk=True)
    await removed
    if not await left:
        await tx.rm(paths.plugsDir, missingOk=True)


async def _rmIfEmpty(xs: IXenStore, path: str) -> None:
    """Remove C{path} if it has no children."""
    try:
        if not await xs.ls(path, missingOk=True):
            await xs.rm(path, missingOk=True)
    except Exception:
        pass  # the caller is already reporting a failure


def _resolved(value: T) -> Deferred[T]:
    d: Deferred[T] = Deferred()
    d.callback(value)
    return d


async def populateFrontend(
    tx: ITransaction,
    plug: PlugResult,
    guestDomid: int,
    frontend: Mapping[str, str],
    backend: Mapping[str, str] | None = None,
    backendReady: bool = False,
) -> None:
    """
    The toolstack's step after a plug, inside the caller's transaction (so a
    controller can add its own records to the same one): create
    C{<frontend>} owned by the guest and readable by the driver domain, with
    C{backend}/C{backend-id} and the given keys; copy C{b-copy/*} (and
    C{backend} extras) into the backend; set C{<backend>/frontend} unless
    the driver domain already did.

    @param backendReady: the caller saw (see L{backendReady}) that the
        driver domain made the backend complete, so the transaction need not
        read it: a read of a backend the kernel is filling in makes the
        transaction conflict (EAGAIN) over and over.
    """
    guest = validateDomid(guestDomid)
    dd = plug.driverDomid
    front = plug.frontendPath
    values = {"backend": plug.backendPath, "backend-id": str(dd), **frontend}
    await tx.mkdir(front)
    await tx.setPerms(front, [Perm("n", guest), Perm("r", dd)])
    await gatherResults(
        [tx.write(f"{front}/{k}", str(v)) for k, v in values.items()], consumeErrors=True
    )
    extras = {**plug.bcopy, **(backend or {})}
    if backendReady and not extras:
        return
    if extras or not await tx.exists(plug.backendPath):
        if not await tx.exists(plug.backendPath):
            await tx.mkdir(plug.backendPath)
            await tx.setPerms(plug.backendPath, [Perm("n", dd), Perm("r", guest)])
        await gatherResults(
            [tx.write(f"{plug.backendPath}/{k}", str(v)) for k, v in extras.items()],
            consumeErrors=True,
        )
    if await tx.readOrNone(f"{plug.backendPath}/frontend") is None:
        await tx.write(f"{plug.backendPath}/frontend", front)


async def backendReady(xs: IXenStore, plug: PlugResult) -> bool:
    """
    Whether the driver domain created the plug's backend complete, with
    C{frontend} set, read outside any transaction: that key is never
    removed while plugged. Our kinds leave C{frontend} to L{populateFrontend}
    (a Linux backend completed before its frontend exists is never bound),
    so this is for driver domains of other makes.
    """
    if plug.bcopy:
        return False
    return await xs.readOrNone(f"{plug.backendPath}/frontend") is not None
