# -*- test-case-name: tests.test_driverdomain,tests.test_driverdomain_kinds -*-
"""
The request executor: one request performed through the object's
driver-domain kind (or the data-path pauser), as its rule in
L{xenddev.backendctrl.requests} says, after its journal entry is written.
It writes nothing else to XenStore — every effect is in the L{Answer} it
returns, for the completion transaction — but the highest fencing token
of a target, recorded before the kind activates it
(L{xenddev.driverdomain.fencing}).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs
from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.logger import Logger
from zope.interface import providedBy

from xenddev.backendctrl.protocol import XEN_ERRNO, ControlPaths, validateTarget
from xenddev.backendctrl.records import readRecord
from xenddev.backendctrl.requests import (
    HOTPLUG_REMOVE,
    PAUSER_PAUSE,
    PLUGS,
    REQUESTS,
    ObjectSnapshot,
    Request,
    RequestRule,
    checkPreconditions,
)
from xenddev.driverdomain.completion import Answer
from xenddev.driverdomain.fencing import FencingTokens
from xenddev.driverdomain.hotplugdispatch import HotplugDispatcher
from xenddev.driverdomain.kinds.base import DeviceRef, KindContext, KindError, Outcome, PlugSpec
from xenddev.driverdomain.objects import AgentRecords, ServedObjects, hotplugRef, readTarget
from xenddev.interfaces import IXenStore
from xenddev.xenstore.errors import AccessDeniedError


@attrs.frozen
class _Inputs:
    """What a request needs from the store, read before it is performed."""

    snapshot: ObjectSnapshot
    plugSpec: PlugSpec | None
    takeover: bool
    kindName: str | None
    target: dict[str, str]
    #: The C{token} node of a fenced request (None: absent).
    token: str | None = None


class RequestExecutor:
    """
    Performs requests for the agent of one driver domain.

    @param xs: the agent's connection.
    @param records: where the agent's records are (the journal).
    @param objects: the objects served (kinds, targets, plugs).
    @param hotplug: runs the remove scripts an unplug or a change waits for.
    @param pausers: data-path kind -> the pauser serving C{pause},
        C{resume} and C{reload}.
    @param fencing: the fencing tokens served (default: this agent's,
        read from and kept in its records).
    """

    log = Logger()

    def __init__(
        self,
        xs: IXenStore,
        records: AgentRecords,
        objects: ServedObjects,
        hotplug: HotplugDispatcher,
        pausers: Mapping[str, Any],
        fencing: FencingTokens | None = None,
    ) -> None:
        self.xs = xs
        self.records = records
        self.objects = objects
        self.hotplug = hotplug
        self.pausers = pausers
        self.fencing = fencing if fencing is not None else FencingTokens(xs, records.domid)
        self.executed = 0

    async def execute(
        self, paths: ControlPaths, text: str, state: str | None, recovering: bool
    ) -> Answer:
        """
        Journal the request C{text} (unless C{recovering}: its entry is
        there), check its preconditions and perform it.

        @param state: the object's state when the request was read.
        @param recovering: the journal holds this very request: it was
            interrupted (by a crash, or a completion that could not
            commit) and is performed again; the kind may find what it had
            started.
        """
        journal = self.records.journal(paths)
        if recovering:
            self.log.warn(
                "Re-executing {request!r} on {path}, interrupted",
                request=text,
                path=paths.base,
            )
        self.executed += 1
        try:
            request = Request.parse(text)
        except ValueError as e:
            if not recovering:
                await self.xs.write(journal, text)
            return Answer(paths, text, None, XEN_ERRNO["EBADRQC"], str(e))
        # The journal write goes out with the reads the request needs;
        # the kind runs only once it is acknowledged.
        journaled = succeed(None) if recovering else self.xs.write(journal, text)
        if request.rule.createsObject:
            # Created outside the completion transaction, so that
            # concurrent prepares' completions do not all modify
            # objects/<class> (and conflict); removed by the agent if the
            # prepare fails.
            journaled = gatherResults(
                [journaled, self.xs.mkdir(self.records.objectRecords(paths))], consumeErrors=True
            )
        gathered = Deferred.fromCoroutine(self._gather(paths, request, state))
        try:
            await journaled
        except BaseException:
            gathered.addErrback(lambda _: None)
            raise
        try:
            return await self._perform(paths, text, request, recovering, state, await gathered)
        except KindError as e:
            return Answer(paths, text, request, XEN_ERRNO[e.errname], e.message)
        except Exception as e:
            self.log.failure("Request {request!r} on {path} failed", request=text, path=paths.base)
            return Answer(paths, text, request, XEN_ERRNO["EIO"], f"{type(e).__name__}: {e}")

    async def _gather(self, paths: ControlPaths, request: Request, state: str | None) -> _Inputs:
        """
        Everything a request needs from the store, read with as few round
        trips as possible: the preconditions' inputs, the plug, and (unless
        remembered since the prepare) the target and the kind.
        """
        xs = self.xs
        rule = request.rule
        # A prepare reads its target: a name the toolstack abandoned and
        # prepared again must not be served with what was remembered.
        known = None if rule.createsObject else self.objects.remembered(paths)
        reads: list[Deferred[Any]] = []
        if known is None:
            reads += [
                Deferred.fromCoroutine(readTarget(xs, paths.targetDir)),
                xs.readOrNone(self.records.kind(paths)),
            ]
        else:
            reads += [succeed(dict(known[1])), succeed(known[0])]
        pp = paths.plug(request.plug) if request.plug is not None else None
        if pp is not None:
            reads += [
                xs.readOrNone(pp.state),
                xs.readOrNone(pp.frontend),
                xs.readOrNone(pp.takeover),
                xs.readOrNone(pp.backend),
            ]
        elif rule.refusedWithPlugs:
            reads.append(Deferred.fromCoroutine(self.objects.plugged(paths)))
        # In the same round trip as the rest.
        reads.append(xs.readOrNone(paths.token) if rule.fenced else succeed(None))
        target, kindName, *rest, token = await gatherResults(reads, consumeErrors=True)
        snap = ObjectSnapshot(state, None)
        plugSpec: PlugSpec | None = None
        takeover = False
        if pp is not None:
            plugState, frontend, takeoverFlag, backend = rest
            if frontend is None:
                raise KindError("EINVAL", f"{pp.frontend} is missing")
            takeover = takeoverFlag == "1"
            assert request.plug is not None
            ref = DeviceRef.fromFrontendPath(frontend)
            snap = ObjectSnapshot(state, None, plugState, await _frontendVisible(xs, frontend))
            plugSpec = PlugSpec(
                request.plug, frontend, ref, takeover, paths.absolute(backend) if backend else None
            )
        elif rule.refusedWithPlugs:
            snap = ObjectSnapshot(state, None, plugCount=len(rest[0]))
        return _Inputs(snap, plugSpec, takeover, kindName, target, token)

    async def _perform(
        self,
        paths: ControlPaths,
        text: str,
        request: Request,
        recovering: bool,
        state: str | None,
        inputs: _Inputs,
    ) -> Answer:
        # Preconditions are evaluated exactly as on the first attempt even
        # when recovering: every XenStore effect of a request is applied in
        # its completion transaction, so an interrupted request left none.
        problem = checkPreconditions(request, inputs.snapshot, inputs.takeover)
        if problem is not None:
            raise KindError(*problem)
        rule = request.rule
        if rule.createsObject:
            kind = self.objects.choose(paths, inputs.target)
        else:
            kind = self.objects.kindNamed(inputs.kindName)
        ctx = self.objects.context(paths, inputs.target, recovering)
        if rule.fenced:
            # Before the kind: a stale token touches nothing.
            await self.fencing.admit(paths, inputs.target, inputs.token)
        target: Mapping[str, str] | None = inputs.target if rule.input is not None else None
        plugSpec = inputs.plugSpec
        if rule.dataPath is not None:
            await self._pauseOrResume(paths, rule)
            outcome = Outcome()
        elif rule.kindLacks and not _offers(kind, rule.kindMethod):
            raise KindError("EOPNOTSUPP", f"the {kind.name} kind {rule.kindLacks}")
        elif rule.replacesTarget:
            outcome, target = await self._change(kind, ctx)
        else:
            first = None
            implied = REQUESTS[rule.implies] if rule.implies is not None else None
            if implied is not None and implied.accepts(state):
                # Decision 5: its effects go into the same completion.
                first = await _callKind(kind, implied, ctx, plugSpec)
            if rule.hotplug == HOTPLUG_REMOVE:
                assert plugSpec is not None
                await self.hotplug.remove(kind, ctx, plugSpec)
            outcome = await _callKind(kind, rule, ctx, plugSpec)
            if first is not None:
                outcome = _then(first, outcome)
        if rule.plugEffect == PLUGS:
            _checkBackend(paths, outcome)
        return Answer(paths, text, request, 0, "", outcome, kind.name, plugSpec, target)

    async def _pauseOrResume(self, paths: ControlPaths, rule: RequestRule) -> None:
        """A data path paused or resumed by the pauser of its registered kind."""
        record = await readRecord(self.xs, self.records.domid, paths.name)
        if record is None:
            raise KindError("ENOENT", f"no data path of {paths.name} is registered here")
        pauser = self.pausers.get(record.kind)
        if pauser is None:
            raise KindError("EOPNOTSUPP", f"no pauser here for {record.kind} data paths")
        try:
            if rule.dataPath == PAUSER_PAUSE:
                await pauser.pause(record)
            else:
                await pauser.resume(record, rule.reopensImage)
        except Exception as e:
            raise KindError("EIO", f"{rule.name} of the {record.kind} data path failed: {e}") from e

    async def _change(self, kind: Any, ctx: KindContext) -> tuple[Outcome, dict[str, str]]:
        """
        A C{change}: the kind checks the new target and says what changes
        in the backends; the old medium's remove scripts run now, the new
        one's add scripts once the completion transaction has replaced
        C{t/*} and cleared the devices' hotplug records and status.
        """
        paths = ctx.paths
        try:
            target = validateTarget(await readTarget(self.xs, paths.newTargetDir))
        except ValueError as e:
            raise KindError("EINVAL", f"the new target (n/*): {e}") from None
        plugs = await self.objects.pluggedSpecs(paths)
        outcome: Outcome = await kind.change(ctx, target, plugs)
        resets: list[str] = []
        for spec in plugs:
            await self.hotplug.remove(kind, ctx, spec)
            assert spec.backend is not None
            resets += [
                f"{spec.backend}/hotplug-status",
                f"{spec.backend}/hotplug-error",
                self.records.hotplug(hotplugRef(spec)),
            ]
        return Outcome(
            mkdirs=outcome.mkdirs,
            writes={**{paths.target(k): v for k, v in target.items()}, **outcome.writes},
            removes=(paths.targetDir, paths.newTargetDir, *resets, *outcome.removes),
        ), target


def _callKind(
    kind: Any, rule: RequestRule, ctx: KindContext, plugSpec: PlugSpec | None
) -> Deferred[Outcome]:
    """The kind's method for C{rule}, with the plug if the request names one."""
    assert rule.kindMethod is not None
    method = getattr(kind, rule.kindMethod)
    if rule.takesPlug:
        assert plugSpec is not None
        return method(ctx, plugSpec)
    return method(ctx)


def _offers(kind: Any, method: str | None) -> bool:
    """Whether the kind provides an interface declaring C{method} (e.g. IMediumChanger)."""
    return method is not None and any(method in iface for iface in providedBy(kind).flattened())


def _checkBackend(paths: ControlPaths, outcome: Outcome) -> None:
    """A plug's outcome names a backend directory the completion can record."""
    if outcome.backend is None:
        raise KindError("EIO", "the kind's plug named no backend directory")
    DeviceRef.fromBackendPath(paths.absolute(outcome.backend))


def _then(first: Outcome, second: Outcome) -> Outcome:
    """Two outcomes as one: the second's removals win over the first's writes."""

    def removed(path: str) -> bool:
        return any(path == r or path.startswith(r + "/") for r in second.removes)

    return Outcome(
        mkdirs={p: v for p, v in first.mkdirs.items() if not removed(p)} | dict(second.mkdirs),
        writes={p: v for p, v in first.writes.items() if not removed(p)} | dict(second.writes),
        removes=(*first.removes, *second.removes),
    )


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
