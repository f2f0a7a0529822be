# -*- test-case-name: tests.test_driverdomain,tests.test_driverdomain_kinds -*-
"""
The driver-domain side of the backendctrl protocol.

L{BackendCtrlAgent} watches C{/local/domain/<self>/backendctrl}, executes each
request through a driver-domain kind, and writes C{state}, C{result} and
C{result_msg} in the same transaction in which it deletes C{request}. It also
dispatches hotplug scripts for the devices it created (the job of xl devd or
xenbackendd): the add script once the object is active and the backend is in
InitWait, the remove script once the backend is Closed with C{online=0}.

Everything it needs after a restart is in XenStore: the requests themselves,
and its records under C{/local/domain/<self>/private/xenddev/}:

  - C{inflight/<class>/<name>}: the request being executed (a journal entry
    written before executing and deleted with the result), so a request
    interrupted by a crash is executed again with C{recovering} set;
  - C{objects/<class>/<name>/kind}: which kind serves the object, and
    C{objects/<class>/<name>/data/*} for the kind's own records;
  - C{devices/<devclass>/<domu>/<devid>}: C{<class>/<name>/<plug>} of a
    backend this agent created, with C{hotplug} = C{added}|C{removed}.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.logger import Logger

from xenddev.backendctrl.protocol import (
    ACTIVATE,
    ACTIVE,
    CHANGE,
    DEACTIVATE,
    INACTIVE,
    OBJECT_CLASSES,
    PAUSE,
    PLUG,
    PLUGGED,
    PREPARE,
    RELOAD,
    RESUME,
    UNPLUG,
    UNPREPARE,
    XEN_ERRNO,
    ControlPaths,
    ObjectClass,
    ObjectSnapshot,
    Request,
    checkPreconditions,
    kindsPath,
    privateDir,
    validateName,
    validateTarget,
)
from xenddev.backendctrl.records import readRecord
from xenddev.driverdomain.kinds.base import (
    DeviceRef,
    KindContext,
    KindError,
    Outcome,
    PlugSpec,
)
from xenddev.errors import XenddevError
from xenddev.interfaces import (
    IDriverDomainKind,
    IHotplugRunner,
    IMediumChanger,
    ITransaction,
    IXenStore,
)
from xenddev.xenstore.errors import AccessDeniedError, NoEntryError
from xenddev.xenstore.paths import Perm, validateDomid

HOTPLUG_ADDED = "added"
HOTPLUG_REMOVED = "removed"
INIT_WAIT = "2"
CLOSED = "6"


class _Serialiser:
    """
    Runs at most one job per key at a time; a poke during a run schedules
    exactly one more run afterwards (events are level-triggered: each run
    re-reads the store).
    """

    def __init__(self) -> None:
        self._running: dict[Any, bool] = {}  # key -> poked again while running
        self._idle: list[Deferred[None]] = []

    def poke(self, key: Any, job: Callable[[], Awaitable[None]], log: Logger) -> None:
        if key in self._running:
            self._running[key] = True
            return
        self._running[key] = False

        async def loop() -> None:
            while True:
                try:
                    await job()
                except Exception:
                    log.failure("Driver-domain agent job {key} failed", key=key)
                if not self._running[key]:
                    break
                self._running[key] = False
            del self._running[key]
            if not self._running:
                idle, self._idle = self._idle, []
                for d in idle:
                    d.callback(None)

        Deferred.fromCoroutine(loop())

    def whenIdle(self) -> Deferred[None]:
        if not self._running:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._idle.append(d)
        return d

    @property
    def busy(self) -> bool:
        return bool(self._running)


class BackendCtrlAgent:
    """
    Serves the backendctrl protocol for driver domain C{domid}.

    @param xs: a XenStore connection with the driver domain's rights.
    @param kinds: the driver-domain kinds, tried in order for a prepare.
    @param hotplug: runs hotplug scripts; with None no script runs and a
        device counts as connected once its object is active and its
        backend is in InitWait.
    @param pausers: data-path kind (C{tap}, C{qemu}) -> the
        L{xenddev.datapath.IDataPathPauser} serving C{pause}, C{resume} and
        C{reload} requests for the data paths registered here; without one
        those requests get C{EOPNOTSUPP}.
    """

    log = Logger()

    def __init__(
        self,
        xs: IXenStore,
        domid: int,
        kinds: Sequence[IDriverDomainKind],
        hotplug: IHotplugRunner | None = None,
        pausers: Mapping[str, Any] | None = None,
    ) -> None:
        self.xs = xs
        self.pausers = dict(pausers or {})
        self.domid = validateDomid(domid)
        self.kinds = {k.name: k for k in kinds}
        self._kindOrder = list(kinds)
        self.hotplug = hotplug
        self.home = f"/local/domain/{self.domid}"
        self.private = privateDir(self.domid)
        self._objects = _Serialiser()
        self._devices = _Serialiser()
        self._hotplugJobs: dict[tuple[str, int, int], Deferred[None]] = {}
        #: The backends this agent created: device -> (object, plug, absolute
        #: backend), so hotplug dispatch need not look them up in the store
        #: on every event. Rebuilt from the records (by reading) after a restart.
        self._owners: dict[DeviceRef, tuple[ControlPaths, str, str]] = {}
        #: Objects whose last request this agent answered (and deleted).
        self._answered: set[tuple[str, str]] = set()
        #: (class, name) -> state, as this agent last left it (hotplug
        #: dispatch reads it on every backend event); read when unknown.
        self._states: dict[tuple[str, str], str] = {}
        self._handles: list[Any] = []
        #: (class, name) -> (kind name, target) of the objects this agent
        #: prepared: t/* cannot change while an object exists, so there is
        #: no need to read them for every request. Rebuilt from the store
        #: (by reading) after a restart.
        self._known: dict[tuple[str, str], tuple[str, dict[str, str]]] = {}
        self._lastTarget: dict[tuple[str, str], dict[str, str]] = {}
        self.requestsExecuted = 0
        self.hotplugRuns = 0

    # Lifecycle

    async def start(self) -> None:
        """
        Watch the control area (and the backend tree, for hotplug); the
        watches fire once at registration, which scans everything present.
        """
        self.log.info("Driver-domain agent for domain {domid} starting", domid=self.domid)
        try:
            await self.xs.transact(self._createRecordDirs)
        except AccessDeniedError:
            # A guest driver domain cannot create nodes in its own home: the
            # toolstack makes its control area (DriverDomainClient.ensureArea),
            # at the latest with its first request. Real xenstored.
            self.log.info(
                "Driver-domain agent for domain {domid} waiting for its control area",
                domid=self.domid,
            )
            await self.xs.waitFor(f"{self.home}/private", lambda v: v is not None)
            await self.xs.transact(self._createRecordDirs)
        await self._advertiseKinds()
        self._handles.append(await self.xs.watch(f"{self.home}/backendctrl", self._controlChanged))
        self._handles.append(await self.xs.watch(f"{self.home}/backend", self._backendChanged))

    async def _advertiseKinds(self) -> None:
        """
        Tell the toolstack which kinds serve here (L{kindsPath}: their names,
        space-separated, in the order they are tried), rewritten at every
        start, so it can decide per driver domain (e.g. tap2 or blktap1).
        """
        await self.xs.write(kindsPath(self.domid), " ".join(k.name for k in self._kindOrder))

    async def _createRecordDirs(self, tx: ITransaction) -> None:
        # Fixed skeleton, so per-object records come and go as leaves and a
        # failed request leaves no empty directory behind.
        for top in ("inflight", "objects"):
            for cls in OBJECT_CLASSES:
                await tx.mkdir(f"{self.private}/{top}/{cls}")
        await tx.mkdir(f"{self.private}/devices")
        await tx.mkdir(f"{self.private}/datapath")  # the data-path registry (seed 002)
        await tx.mkdir(f"{self.private}/quiesced")  # data paths a quiesce holds paused

    async def stop(self) -> None:
        """Stop watching, then let running jobs finish."""
        handles, self._handles = self._handles, []
        await gatherResults([h.stop() for h in handles])
        await self._objects.whenIdle()
        await self._devices.whenIdle()

    def whenIdle(self) -> Deferred[None]:
        """Fire once no request or hotplug job is running (for tests)."""

        async def wait() -> None:
            while self._objects.busy or self._devices.busy:
                await self._objects.whenIdle()
                await self._devices.whenIdle()

        return Deferred.fromCoroutine(wait())

    # Request handling

    def _controlChanged(self, path: str) -> None:
        rest = path[len(self.home) + len("/backendctrl") :].strip("/").split("/")
        if len(rest) >= 2 and rest[0] in OBJECT_CLASSES:
            # Only the request node can need an answer (a write always fires
            # for the node written); every other node changes because a
            # request is being made or answered, and re-reading the request
            # for each of those events is wasted work.
            if rest[2:] == ["request"]:
                self._pokeObject(OBJECT_CLASSES[rest[0]], rest[1])
        else:
            # Tracked like any job, so stop() waits for it too.
            self._objects.poke("scan", self._scan, self.log)

    async def _scan(self) -> None:
        for cls in OBJECT_CLASSES.values():
            classDir = f"{self.home}/backendctrl/{cls.name}"
            for name in await self._lsOrEmpty(classDir):
                self._pokeObject(cls, name)

    def _pokeObject(self, cls: ObjectClass, name: str) -> None:
        try:
            paths = ControlPaths(cls, self.domid, name)
        except ValueError:
            return  # not a name the protocol allows: nothing we can answer
        self._objects.poke((cls.name, name), lambda: self._serviceObject(paths), self.log)

    async def _serviceObject(self, paths: ControlPaths) -> None:
        key = (paths.objectClass.name, paths.name)
        if key in self._answered:
            # Most likely the event of our own deletion of the request: look
            # at the request alone first (an event cannot be skipped: a new
            # request's may have been merged with it).
            self._answered.discard(key)
            if await self.xs.readOrNone(paths.request) is None:
                return
        # The request, the journal and the state in one round trip.
        text, journaled, state = await gatherResults(
            [
                self.xs.readOrNone(paths.request),
                self.xs.readOrNone(self._journal(paths)),
                self.xs.readOrNone(paths.state),
            ]
        )
        if text is None:
            return  # no request: changes to the object are ignored
        await self._execute(paths, text, journaled == text, state)

    def _journal(self, paths: ControlPaths) -> str:
        return f"{self.private}/inflight/{paths.objectClass.name}/{paths.name}"

    async def _execute(
        self, paths: ControlPaths, text: str, recovering: bool, state: str | None
    ) -> None:
        journal = self._journal(paths)
        if recovering:
            self.log.warn(
                "Re-executing {request!r} on {path}, interrupted by a restart",
                request=text,
                path=paths.base,
            )
        self.requestsExecuted += 1
        outcome: Outcome | None = None
        kindName: str | None = None
        plugSpec: PlugSpec | None = None
        request: Request | None = None
        try:
            request = Request.parse(text)
        except ValueError as e:
            result, message = XEN_ERRNO["EBADRQC"], str(e)
            if not recovering:
                await self.xs.write(journal, text)
        else:
            # The journal write goes out with the reads the request needs;
            # the kind runs only once it is acknowledged.
            journaled = succeed(None) if recovering else self.xs.write(journal, text)
            if request.op == PREPARE:
                # Created outside the completion transaction, so that
                # concurrent prepares' completions do not all modify
                # objects/<class> (and conflict); removed below if the
                # prepare fails.
                journaled = gatherResults([journaled, self.xs.mkdir(self._objectRecords(paths))])
            gathered = Deferred.fromCoroutine(self._gather(paths, request, state))
            try:
                await journaled
            except BaseException:
                gathered.addErrback(lambda _: None)
                raise
            try:
                outcome, kindName, plugSpec = await self._perform(
                    paths, request, recovering, state, await gathered
                )
                result, message = 0, ""
            except KindError as e:
                result, message = XEN_ERRNO[e.errname], e.message
            except Exception as e:
                self.log.failure(
                    "Request {request!r} on {path} failed", request=text, path=paths.base
                )
                result, message = XEN_ERRNO["EIO"], f"{type(e).__name__}: {e}"
        ok = result == 0 and request is not None
        key = (paths.objectClass.name, paths.name)

        def complete(tx: ITransaction, keepRequest: bool = False) -> Awaitable[None]:
            return self._complete(
                tx,
                paths,
                text,
                request,
                result,
                message,
                outcome,
                kindName,
                plugSpec,
                journal,
                keepRequest,
            )

        try:
            await self.xs.transact(complete)
            self._answered.add(key)
        except _RequestReplaced:
            await self.xs.transact(lambda tx: complete(tx, keepRequest=True))
        newState = state
        if ok and request is not None:
            newState = _STATE_AFTER.get(request.op, state)
        if newState is None:
            self._states.pop(key, None)
        else:
            self._states[key] = newState
        exists = state is not None
        if ok and request is not None:
            if request.op == PREPARE:
                exists = True
            elif request.op == UNPREPARE:
                exists = False
        if ok and request is not None and request.op in (PREPARE, CHANGE) and kindName:
            self._known[key] = (kindName, self._lastTarget.pop(key, {}))
        if not exists:
            # The object is gone: its journal entry and records go too,
            # outside the transaction (see _complete).
            self._known.pop(key, None)
            await gatherResults(
                [
                    self.xs.rm(journal, missingOk=True),
                    self.xs.rm(self._objectRecords(paths), missingOk=True),
                ]
            )
        self._lastTarget.pop(key, None)
        self.log.info(
            "{request!r} on {path}: result {result}{msg}",
            request=text,
            path=paths.base,
            result=result,
            msg=f" ({message})" if message else "",
        )
        if ok and request is not None:
            if request.op == PLUG and outcome is not None and outcome.backend is not None:
                assert request.plug is not None
                backend = paths.absolute(outcome.backend)
                dev = backendRef(backend)
                self._owners[dev] = (paths, request.plug, backend)
                self._pokeDevice(dev.deviceClass, dev.frontendDomid, dev.devid)
            elif request.op == UNPLUG and plugSpec is not None:
                self._owners.pop(self._hotplugRef(plugSpec), None)
            elif request.op == ACTIVATE:
                # Not awaited here, so the object's next request need not
                # wait for it; tracked, so whenIdle() still covers it.
                self._devices.poke(("plugs", *key), lambda: self._reconsiderPlugs(paths), self.log)
            elif request.op == CHANGE:
                self._devices.poke(("plugs", *key), lambda: self._readd(paths), self.log)

    async def _gather(
        self, paths: ControlPaths, request: Request, state: str | None
    ) -> tuple[ObjectSnapshot, PlugSpec | None, bool, Any, dict[str, str]]:
        """
        Everything a request needs from the store, read with as few round
        trips as possible: the preconditions' inputs, the plug, and (unless
        remembered since the prepare) the target and the kind.
        """
        xs = self.xs
        known = self._known.get((paths.objectClass.name, paths.name))
        reads: list[Deferred[Any]] = []
        if known is None:
            reads += [
                _lsOrNone(xs, paths.targetDir),
                xs.readOrNone(f"{self._objectRecords(paths)}/kind"),
            ]
        else:
            reads += [succeed(None), succeed(known[0])]
        pp = paths.plug(request.plug) if request.plug is not None else None
        if pp is not None:
            reads += [
                xs.readOrNone(pp.state),
                xs.readOrNone(pp.frontend),
                xs.readOrNone(pp.takeover),
                xs.readOrNone(pp.backend),
            ]
        elif request.op == UNPREPARE:
            reads.append(Deferred.fromCoroutine(self._plugged(paths)))
        keys, kindName, *rest = await gatherResults(reads)
        targetReads = gatherResults([xs.read(paths.target(k)) for k in keys or []])
        snap = ObjectSnapshot(state, None)
        plugSpec: PlugSpec | None = None
        takeover = False
        if pp is not None:
            plugState, frontend, takeoverFlag, backend = rest
            if frontend is None:
                targetReads.addErrback(lambda _: None)
                raise KindError("EINVAL", f"{pp.frontend} is missing")
            takeover = takeoverFlag == "1"
            assert request.plug is not None
            try:
                ref = DeviceRef.fromFrontendPath(frontend)
            except KindError:
                targetReads.addErrback(lambda _: None)
                raise
            snap = ObjectSnapshot(state, None, plugState, await _frontendVisible(xs, frontend))
            plugSpec = PlugSpec(
                request.plug, frontend, ref, takeover, paths.absolute(backend) if backend else None
            )
        elif request.op == UNPREPARE:
            snap = ObjectSnapshot(state, None, plugCount=len(rest[0]))
        values = await targetReads
        target = known[1] if known is not None else dict(zip(keys or [], values, strict=True))
        return snap, plugSpec, takeover, kindName, target

    async def _perform(
        self,
        paths: ControlPaths,
        request: Request,
        recovering: bool,
        state: str | None,
        gathered: tuple[ObjectSnapshot, PlugSpec | None, bool, Any, dict[str, str]],
    ) -> tuple[Outcome, str, PlugSpec | None]:
        # Preconditions are evaluated exactly as on the first attempt even
        # when recovering: every XenStore effect of a request is applied in
        # its completion transaction, so an interrupted request left none.
        snap, plugSpec, takeover, kindName, target = gathered
        problem = checkPreconditions(request, snap, takeover)
        if problem is not None:
            raise KindError(*problem)
        if request.op == PREPARE:
            kind = self._chooseKind(paths.objectClass, target)
            self._lastTarget[(paths.objectClass.name, paths.name)] = target
        else:
            if kindName is None or kindName not in self.kinds:
                raise KindError("ENODEV", f"object served by unknown kind {kindName!r}")
            kind = self.kinds[kindName]
        ctx = self._context(paths, target, recovering)
        op = request.op
        if op == PREPARE:
            return await kind.prepare(ctx), kind.name, None
        if op == ACTIVATE:
            return await kind.activate(ctx), kind.name, None
        if op == DEACTIVATE:
            return await kind.deactivate(ctx), kind.name, None
        if op == UNPREPARE:
            # Decision 5: an active object is deactivated first, and that
            # deactivation's effects go into the same completion.
            first = await kind.deactivate(ctx) if state == ACTIVE else None
            outcome = await kind.unprepare(ctx)
            return _then(first, outcome) if first else outcome, kind.name, None
        if op == CHANGE:
            return await self._change(kind, ctx), kind.name, None
        if op in (PAUSE, RESUME, RELOAD):
            await self._pauseOrResume(paths, op)
            return Outcome(), kind.name, None
        assert plugSpec is not None
        if op == PLUG:
            return await kind.plug(ctx, plugSpec), kind.name, plugSpec
        await self._removeHotplug(kind, ctx, plugSpec)
        return await kind.unplug(ctx, plugSpec), kind.name, plugSpec

    async def _pauseOrResume(self, paths: ControlPaths, op: str) -> None:
        """A data path paused or resumed by the pauser of its registered kind."""
        record = await readRecord(self.xs, self.domid, paths.name)
        if record is None:
            raise KindError("ENOENT", f"no data path of {paths.name} is registered here")
        pauser = self.pausers.get(record.kind)
        if pauser is None:
            raise KindError("EOPNOTSUPP", f"no pauser here for {record.kind} data paths")
        try:
            if op == PAUSE:
                await pauser.pause(record)
            else:
                await pauser.resume(record, op == RELOAD)
        except Exception as e:
            raise KindError("EIO", f"{op} of the {record.kind} data path failed: {e}") from e

    async def _change(self, kind: Any, ctx: KindContext) -> Outcome:
        """
        A C{change}: the kind checks the new target and says what changes
        in the backends; the old medium's remove scripts run now, the new
        one's add scripts once the completion transaction has replaced
        C{t/*} and cleared the devices' hotplug records and status.
        """
        paths = ctx.paths
        if not IMediumChanger.providedBy(kind):
            raise KindError("EOPNOTSUPP", f"the {kind.name} kind cannot change a target in place")
        keys = await _lsOrNone(self.xs, paths.newTargetDir) or []
        values = await gatherResults([self.xs.read(paths.newTarget(k)) for k in keys])
        try:
            target = validateTarget(dict(zip(keys, values, strict=True)))
        except ValueError as e:
            raise KindError("EINVAL", f"the new target (n/*): {e}") from None
        plugs = await self._pluggedSpecs(paths)
        outcome: Outcome = await kind.change(ctx, target, plugs)
        resets: list[str] = []
        for spec in plugs:
            await self._removeHotplug(kind, ctx, spec)
            assert spec.backend is not None
            resets += [
                f"{spec.backend}/hotplug-status",
                f"{spec.backend}/hotplug-error",
                f"{self._deviceRecord(self._hotplugRef(spec))}/hotplug",
            ]
        self._lastTarget[(paths.objectClass.name, paths.name)] = target
        return Outcome(
            mkdirs=outcome.mkdirs,
            writes={**{paths.target(k): v for k, v in target.items()}, **outcome.writes},
            removes=(paths.targetDir, paths.newTargetDir, *resets, *outcome.removes),
        )

    def _context(
        self, paths: ControlPaths, target: dict[str, str], recovering: bool = False
    ) -> KindContext:
        return KindContext(self.xs, paths, target, recovering, f"{self._objectRecords(paths)}/data")

    def _chooseKind(self, cls: ObjectClass, target: dict[str, str]) -> Any:
        for kind in self._kindOrder:
            if cls.name in kind.objectClasses and kind.accepts(cls.name, target):
                return kind
        raise KindError(
            "ENODEV",
            f"no driver-domain kind here serves this target (kinds: "
            f"{', '.join(self.kinds) or 'none'})",
        )

    async def _recordedKind(self, paths: ControlPaths) -> Any:
        known = self._known.get((paths.objectClass.name, paths.name))
        if known is not None:
            return self.kinds[known[0]]
        name = await self.xs.readOrNone(f"{self._objectRecords(paths)}/kind")
        if name is None or name not in self.kinds:
            raise KindError("ENODEV", f"object served by unknown kind {name!r}")
        return self.kinds[name]

    def _objectRecords(self, paths: ControlPaths) -> str:
        return f"{self.private}/objects/{paths.objectClass.name}/{paths.name}"

    async def _readTarget(self, paths: ControlPaths) -> dict[str, str]:
        known = self._known.get((paths.objectClass.name, paths.name))
        if known is not None:
            return dict(known[1])
        keys = await _lsOrNone(self.xs, paths.targetDir) or []
        values = await gatherResults([self.xs.read(paths.target(k)) for k in keys])
        return dict(zip(keys, values, strict=True))

    async def _lsOrEmpty(self, path: str) -> list[str]:
        # One request, and no window between an exists and the listing in
        # which the directory can go.
        return await _lsOrNone(self.xs, path) or []

    async def _plugged(self, paths: ControlPaths) -> list[str]:
        names = [n for n in await self._lsOrEmpty(paths.plugsDir) if _validName(n)]
        states = await gatherResults([self.xs.readOrNone(paths.plug(n).state) for n in names])
        return [n for n, s in zip(names, states, strict=True) if s == PLUGGED]

    async def _complete(
        self,
        tx: ITransaction,
        paths: ControlPaths,
        text: str,
        request: Request | None,
        result: int,
        message: str,
        outcome: Outcome | None,
        kindName: str | None,
        plugSpec: PlugSpec | None,
        journal: str,
        keepRequest: bool = False,
    ) -> None:
        """
        The completion transaction: effects, state, result, request deleted.

        Everything independent goes out at once (xenstored runs one
        connection's requests in order). The journal entry is emptied, not
        removed, and the object's records directory is created before and
        removed after it (L{_execute}): a transaction that adds or removes a
        child of a directory shared by all objects (C{inflight/<class>},
        C{objects/<class>}) conflicts with every concurrent one that does.
        """
        records = self._objectRecords(paths)
        ops: list[Deferred[Any]] = []
        chains: list[Deferred[Any]] = []
        if result == 0 and request is not None and outcome is not None:
            ops += _applyOps(tx, outcome)
            op = request.op
            if op == PREPARE:
                ops.append(tx.write(paths.state, INACTIVE))
                ops.append(tx.write(f"{records}/kind", kindName or ""))
            elif op == ACTIVATE:
                ops.append(tx.write(paths.state, ACTIVE))
            elif op == DEACTIVATE:
                ops.append(tx.write(paths.state, INACTIVE))
            elif op == UNPREPARE:
                ops.append(tx.rm(paths.state, missingOk=True))
                ops += [tx.rm(f"{records}/{n}", missingOk=True) for n in ("kind", "data")]
            elif op == PLUG:
                assert request.plug is not None and outcome.backend is not None
                assert plugSpec is not None
                pp = paths.plug(request.plug)
                ops.append(tx.write(pp.state, PLUGGED))
                ops.append(tx.write(pp.backend, outcome.backend))
                ops += [tx.write(f"{pp.bcopy}/{k}", v) for k, v in outcome.bcopy.items()]
                ops.append(
                    tx.write(
                        self._deviceRecord(backendRef(paths.absolute(outcome.backend))),
                        f"{paths.objectClass.name}/{paths.name}/{request.plug}",
                    )
                )
            elif op == UNPLUG:
                assert request.plug is not None and plugSpec is not None
                pp = paths.plug(request.plug)
                ops += [
                    tx.rm(pp.state, missingOk=True),
                    tx.rm(pp.backend, missingOk=True),
                    tx.rm(pp.bcopy, missingOk=True),
                ]
                if plugSpec.backend is not None:
                    # An empty backend/<class>/<domu> would leak quota
                    # (libxl c992efd06a).
                    chains.append(
                        Deferred.fromCoroutine(
                            _rmWithEmptyParents(tx, plugSpec.backend, f"{self.home}/backend")
                        )
                    )
                record = self._deviceRecord(self._hotplugRef(plugSpec))
                chains.append(
                    Deferred.fromCoroutine(
                        _rmWithEmptyParents(tx, record, f"{self.private}/devices")
                    )
                )
        ops.append(tx.write(paths.result, str(result)))
        if message:
            ops.append(tx.write(paths.resultMsg, message))
        else:
            ops.append(tx.rm(paths.resultMsg, missingOk=True))
        ops.append(tx.write(journal, ""))
        # The request is deleted in the same batch, then checked: if the
        # toolstack replaced it meanwhile (it must not), the transaction is
        # aborted and redone without deleting the new one.
        current = tx.readOrNone(paths.request)
        if not keepRequest:
            ops.append(tx.rm(paths.request, missingOk=True))
        await gatherResults(ops + chains)
        if not keepRequest and await current != text:
            raise _RequestReplaced()

    def _deviceRecord(self, ref: DeviceRef) -> str:
        return f"{self.private}/devices/{ref.deviceClass}/{ref.frontendDomid}/{ref.devid}"

    # Hotplug dispatch

    def _backendChanged(self, path: str) -> None:
        rest = path[len(self.home) + len("/backend") :].strip("/").split("/")
        if len(rest) >= 3 and rest[1].isdigit() and rest[2].isdigit():
            # Hotplug depends on the backend's state and online only (and on
            # the directory coming or going); the many other keys a backend
            # publishes cannot change what to do.
            if len(rest) == 3 or rest[3:] in (["state"], ["online"]):
                self._pokeDevice(rest[0], int(rest[1]), int(rest[2]))
        elif len(rest) < 3:
            self._devices.poke("scan", self._scanDevices, self.log)

    async def _scanDevices(self) -> None:
        base = f"{self.private}/devices"
        for devclass in await self._lsOrEmpty(base):
            for domu in await self._lsOrEmpty(f"{base}/{devclass}"):
                for devid in await self._lsOrEmpty(f"{base}/{devclass}/{domu}"):
                    if domu.isdigit() and devid.isdigit():
                        self._pokeDevice(devclass, int(domu), int(devid))

    async def _pluggedSpecs(self, paths: ControlPaths) -> list[PlugSpec]:
        """
        The object's plugs in state C{ok} that have a backend, each with its
        device keyed by the backend directory (as hotplug jobs are).
        """
        specs = []
        for name in await self._plugged(paths):
            pp = paths.plug(name)
            frontend, relative = await gatherResults(
                [self.xs.readOrNone(pp.frontend), self.xs.readOrNone(pp.backend)]
            )
            if relative is not None:
                backend = paths.absolute(relative)
                specs.append(PlugSpec(name, frontend or "", backendRef(backend), False, backend))
        return specs

    async def _reconsiderPlugs(self, paths: ControlPaths) -> None:
        for spec in await self._pluggedSpecs(paths):
            ref = spec.device
            self._pokeDevice(ref.deviceClass, ref.frontendDomid, ref.devid)

    async def _readd(self, paths: ControlPaths) -> None:
        """
        After a change, the add script for the new medium on each plugged
        device of an active object, whatever the backend's state (a backend
        that raced back to Connected would otherwise never get one); an
        inactive object's devices get theirs at activation.
        """
        key = (paths.objectClass.name, paths.name)
        state = self._states.get(key) or await self.xs.readOrNone(paths.state)
        if state != ACTIVE:
            return
        kind = await self._recordedKind(paths)
        ctx = self._context(paths, await self._readTarget(paths))
        for spec in await self._pluggedSpecs(paths):
            await self._addHotplug(kind, ctx, spec)

    @staticmethod
    def _hotplugRef(spec: PlugSpec) -> DeviceRef:
        # Device records and hotplug jobs are keyed by the *backend*
        # directory (backend/<class>/<domu>/<devid>): its class may differ
        # from the frontend's (blktap1 serves device/vbd from backend/tap).
        return backendRef(spec.backend) if spec.backend is not None else spec.device

    def _pokeDevice(self, devclass: str, domu: int, devid: int) -> None:
        key = (devclass, domu, devid)
        self._devices.poke(key, lambda: self._serviceDevice(DeviceRef(*key)), self.log)

    async def _owner(self, ref: DeviceRef) -> tuple[ControlPaths, str] | None:
        record = await self.xs.readOrNone(self._deviceRecord(ref))
        if record is None:
            return None
        cls, _, rest = record.partition("/")
        name, _, plug = rest.partition("/")
        if cls not in OBJECT_CLASSES:
            return None
        return ControlPaths(OBJECT_CLASSES[cls], self.domid, name), plug

    async def _serviceDevice(self, ref: DeviceRef) -> None:
        known = self._owners.get(ref)
        if known is not None:
            paths, plug, backend = known
        else:
            owner = await self._owner(ref)
            if owner is None:
                return  # not a device this agent created
            paths, plug = owner
            relative = await self.xs.readOrNone(paths.plug(plug).backend)
            if relative is None:
                return
            backend = paths.absolute(relative)
            self._owners[ref] = (paths, plug, backend)
        lastState = self._states.get((paths.objectClass.name, paths.name))
        state, online, objState, done = await gatherResults(
            [
                self.xs.readOrNone(f"{backend}/state"),
                self.xs.readOrNone(f"{backend}/online"),
                succeed(lastState) if lastState else self.xs.readOrNone(paths.state),
                self.xs.readOrNone(f"{self._deviceRecord(ref)}/hotplug"),
            ]
        )
        kind = await self._recordedKind(paths)
        ctx = self._context(paths, await self._readTarget(paths))
        spec = PlugSpec(plug, "", ref, False, backend)
        if state == INIT_WAIT and objState == ACTIVE and done is None:
            await self._addHotplug(kind, ctx, spec)
        elif state == CLOSED and online == "0" and done == HOTPLUG_ADDED:
            await self._removeHotplug(kind, ctx, spec)

    def _hotplugJob(self, ref: DeviceRef, job: Callable[[], Awaitable[None]]) -> Deferred[None]:
        """
        Run C{job} after any hotplug job already running for the device, so
        an add and a remove never overlap (a remove asked for while the add
        script still runs must wait for it, then see its record).
        """
        key = (ref.deviceClass, ref.frontendDomid, ref.devid)
        previous = self._hotplugJobs.get(key)

        async def run() -> None:
            if previous is not None:
                try:
                    await previous
                except Exception:
                    pass  # already logged by whoever waited for it
            await job()

        d = Deferred.fromCoroutine(run())
        self._hotplugJobs[key] = d

        def forget(result: object) -> object:
            if self._hotplugJobs.get(key) is d:
                del self._hotplugJobs[key]
            return result

        d.addBoth(forget)
        return d

    async def _addHotplug(self, kind: Any, ctx: KindContext, spec: PlugSpec) -> None:
        """Run the add script unless it already ran for this device."""
        record = f"{self._deviceRecord(self._hotplugRef(spec))}/hotplug"

        async def addOnce() -> None:
            if await self.xs.readOrNone(record) is None:
                await self._runHotplug(kind, ctx, spec, "add")

        await self._hotplugJob(self._hotplugRef(spec), addOnce)

    async def _removeHotplug(self, kind: Any, ctx: KindContext, spec: PlugSpec) -> None:
        """
        Run the remove script at most once per device, whoever asks first
        (the dispatcher on Closed, or an unplug), and only after the add.
        """
        record = f"{self._deviceRecord(self._hotplugRef(spec))}/hotplug"

        async def removeOnce() -> None:
            if await self.xs.readOrNone(record) == HOTPLUG_ADDED:
                await self._runHotplug(kind, ctx, spec, "remove")

        await self._hotplugJob(self._hotplugRef(spec), removeOnce)

    async def _runHotplug(self, kind: Any, ctx: KindContext, spec: PlugSpec, action: str) -> None:
        assert spec.backend is not None
        command = None if self.hotplug is None else kind.hotplugCommand(ctx, spec, action)
        if command is None:
            # No script to wait for (none configured, or the kind needs
            # none): the device is as ready as it will get.
            if action == "add":
                await self._reportHotplugStatus(spec.backend, "connected")
            await self._markHotplug(
                self._hotplugRef(spec), HOTPLUG_ADDED if action == "add" else HOTPLUG_REMOVED
            )
            return
        assert self.hotplug is not None
        script, args, env = command
        self.hotplugRuns += 1
        try:
            await self.hotplug.run(script, args, env)
        except Exception as e:
            self.log.warn(
                "Hotplug {script} {action} for {backend} failed: {error}",
                script=script,
                action=action,
                backend=spec.backend,
                error=e,
            )
            if action == "add":
                await self._reportHotplugFailure(spec.backend, str(e))
                await self._markHotplug(
                    self._hotplugRef(spec), HOTPLUG_ADDED
                )  # so remove still runs
                return
        await self._markHotplug(
            self._hotplugRef(spec), HOTPLUG_ADDED if action == "add" else HOTPLUG_REMOVED
        )

    async def _markHotplug(self, ref: DeviceRef, value: str) -> None:
        """
        Record that a script ran, unless the device was unplugged meanwhile
        (its record is gone): never resurrect a removed record.
        """
        device = self._deviceRecord(ref)

        async def mark(tx: ITransaction) -> None:
            if await tx.exists(device):
                await tx.write(f"{device}/hotplug", value)

        await self.xs.transact(mark)

    async def _reportHotplugStatus(self, backend: str, status: str) -> None:
        async def report(tx: ITransaction) -> None:
            if (
                await tx.exists(backend)
                and await tx.readOrNone(f"{backend}/hotplug-status") is None
            ):
                await tx.write(f"{backend}/hotplug-status", status)

        await self.xs.transact(report)

    async def _reportHotplugFailure(self, backend: str, message: str) -> None:
        async def report(tx: ITransaction) -> None:
            # Never resurrect a backend removed meanwhile; keep what the
            # script itself reported.
            if not await tx.exists(backend):
                return
            if await tx.readOrNone(f"{backend}/hotplug-status") != "error":
                await tx.write(f"{backend}/hotplug-error", message[:1024])
                await tx.write(f"{backend}/hotplug-status", "error")

        await self.xs.transact(report)


async def _rmWithEmptyParents(tx: ITransaction, path: str, stop: str) -> None:
    """
    Remove C{path}, then its now-empty ancestors up to (not including)
    C{stop}: one round trip for the removal plus one per emptied level.
    """
    removed = tx.rm(path, missingOk=True)
    parent = path.rsplit("/", 1)[0]
    while parent.startswith(stop + "/"):
        left = await _lsOrNone(tx, parent)
        if left is None or left:
            break
        await tx.rm(parent)
        parent = parent.rsplit("/", 1)[0]
    await removed


def _then(first: Outcome, second: Outcome) -> Outcome:
    """Two outcomes as one: the second's removals win over the first's writes."""

    def removed(path: str) -> bool:
        return any(path == r or path.startswith(r + "/") for r in second.removes)

    return Outcome(
        mkdirs={p: v for p, v in first.mkdirs.items() if not removed(p)} | dict(second.mkdirs),
        writes={p: v for p, v in first.writes.items() if not removed(p)} | dict(second.writes),
        removes=(*first.removes, *second.removes),
    )


#: An object's state after a successful request (absent: unchanged).
_STATE_AFTER: dict[str, str | None] = {
    PREPARE: INACTIVE,
    ACTIVATE: ACTIVE,
    DEACTIVATE: INACTIVE,
    UNPREPARE: None,
}


def _lsOrNone(ops: Any, path: str) -> Deferred[list[str] | None]:
    """C{ls}, or None if C{path} does not exist (one request, not two)."""
    d: Deferred[Any] = ops.ls(path)
    return d.addErrback(lambda f: f.trap(NoEntryError) and None)


async def _frontendVisible(xs: Any, frontend: str) -> bool:
    """
    Whether C{frontend} exists for this driver domain. Real xenstored
    answers EACCES, not ENOENT, for a missing node under a home the reader
    may not read (a guest's, read from a driver domain), so C{exists} says
    yes to every frontend path there; a frontend made for this driver
    domain is readable by it (the toolstack grants that), so one it may
    not read is not there for it.
    """
    try:
        return await xs.readOrNone(frontend) is not None
    except AccessDeniedError:
        return False


_BACKEND = re.compile(r"/local/domain/\d+/backend/([a-z0-9]+)/(\d+)/(\d+)\Z")


def backendRef(path: str) -> DeviceRef:
    """The device of an absolute backend directory (class = backend class)."""
    m = _BACKEND.match(path)
    if m is None:
        raise KindError("EINVAL", f"{path!r} is not a backend directory")
    return DeviceRef(m.group(1), int(m.group(2)), int(m.group(3)))


def _validName(name: str) -> bool:
    try:
        validateName(name, "plug")
    except ValueError:
        return False
    return True


class _RequestReplaced(XenddevError):
    """The request changed while it was executed: complete without deleting it."""


def _applyOps(tx: ITransaction, outcome: Outcome) -> list[Deferred[Any]]:
    """Send a kind's outcome, in order, without waiting for the replies."""
    ops: list[Deferred[Any]] = [tx.rm(path, missingOk=True) for path in outcome.removes]
    for path, perms in outcome.mkdirs.items():
        ops += [tx.mkdir(path), tx.setPerms(path, perms)]
    ops += [tx.write(p, v) for p, v in outcome.writes.items()]
    return ops


def guestReadable(driverDomid: int, guestDomid: int) -> list[Perm]:
    """Backend directory permissions: owned by the driver domain, guest may read."""
    return [Perm("n", driverDomid), Perm("r", guestDomid)]
