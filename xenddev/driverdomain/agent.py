# -*- test-case-name: tests.test_driverdomain,tests.test_driverdomain_completion -*-
"""
The driver-domain side of the backendctrl protocol.

L{BackendCtrlAgent} watches C{/local/domain/<self>/backendctrl} and answers
each request: the L{RequestExecutor} performs it through a driver-domain
kind, the L{CompletionTransaction} writes C{state}, C{result} and
C{result_msg} in the same transaction in which it deletes C{request}, and
the L{HotplugDispatcher} runs the hotplug scripts of the devices it
created (the job of xl devd or xenbackendd). What each request does is its
rule in L{xenddev.backendctrl.requests}.

Everything it needs after a restart is in XenStore: the requests
themselves, and its records (L{xenddev.driverdomain.objects}).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from xenddev.backendctrl.protocol import OBJECT_CLASSES, ControlPaths, ObjectClass, kindsPath
from xenddev.backendctrl.requests import HOTPLUG_ADD, HOTPLUG_READD, PLUGS, UNPLUGS
from xenddev.driverdomain.completion import COMPLETION_TIMEOUT, Answer, CompletionTransaction
from xenddev.driverdomain.executor import RequestExecutor
from xenddev.driverdomain.hotplugdispatch import HotplugDispatcher
from xenddev.driverdomain.jobs import Serialiser
from xenddev.driverdomain.objects import AgentRecords, ServedObjects, objectKey
from xenddev.interfaces import IDriverDomainKind, IHotplugRunner, ITransaction, IXenStore
from xenddev.xenstore.errors import AccessDeniedError
from xenddev.xenstore.paths import validateDomid

#: How many times a request whose completion could not commit before its
#: deadline is executed again from its journal before it is answered with
#: C{EAGAIN}.
REEXECUTIONS = 1


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
    @param reactor: the clock of the completions' deadline (default: the
        connection's).
    @param completionTimeout: seconds a completion transaction is retried
        on conflicts before the request is executed again from its journal.
    @param reexecutions: how many times, before it is answered with C{EAGAIN}.
    """

    log = Logger()

    def __init__(
        self,
        xs: IXenStore,
        domid: int,
        kinds: Sequence[IDriverDomainKind],
        hotplug: IHotplugRunner | None = None,
        pausers: Mapping[str, Any] | None = None,
        *,
        reactor: IReactorTime | None = None,
        completionTimeout: float = COMPLETION_TIMEOUT,
        reexecutions: int = REEXECUTIONS,
    ) -> None:
        self.xs = xs
        self.pausers = dict(pausers or {})
        self.domid = validateDomid(domid)
        self.hotplug = hotplug
        self.home = f"/local/domain/{self.domid}"
        self.reexecutions = reexecutions
        self.records = AgentRecords(self.domid)
        self.objects = ServedObjects(xs, self.records, kinds)
        self.kinds = self.objects.kinds
        self.dispatcher = HotplugDispatcher(xs, self.records, self.objects, hotplug)
        self.executor = RequestExecutor(
            xs, self.records, self.objects, self.dispatcher, self.pausers
        )
        self.completion = CompletionTransaction(
            xs, self.records, reactor or xs.reactor, completionTimeout
        )
        self._requests = Serialiser()
        #: Objects whose last request this agent answered (and deleted): the
        #: next event is most likely that deletion's. Safe: it only makes
        #: the next look at the object read its request alone first.
        self._answered: set[tuple[str, str]] = set()
        self._handles: list[Any] = []

    @property
    def requestsExecuted(self) -> int:
        """Requests executed so far (again after an interruption too)."""
        return self.executor.executed

    @property
    def hotplugRuns(self) -> int:
        """Hotplug scripts run so far."""
        return self.dispatcher.runs

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
        self._handles.append(await self.dispatcher.watch())

    async def _advertiseKinds(self) -> None:
        """
        Tell the toolstack which kinds serve here (L{kindsPath}: their names,
        space-separated, in the order they are tried), rewritten at every
        start, so it can decide per driver domain (e.g. tap2 or blktap1).
        """
        await self.xs.write(kindsPath(self.domid), " ".join(k.name for k in self.objects.order))

    async def _createRecordDirs(self, tx: ITransaction) -> None:
        for path in self.records.skeleton:
            await tx.mkdir(path)

    async def stop(self) -> None:
        """Stop watching, then let running jobs finish."""
        handles, self._handles = self._handles, []
        await gatherResults([h.stop() for h in handles], consumeErrors=True)
        await self._requests.whenIdle()
        await self.dispatcher.whenIdle()

    def whenIdle(self) -> Deferred[None]:
        """Fire once no request or hotplug job is running (for tests)."""

        async def wait() -> None:
            while self._requests.busy or self.dispatcher.busy:
                await self._requests.whenIdle()
                await self.dispatcher.whenIdle()

        return Deferred.fromCoroutine(wait())

    # Requests

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
            self._requests.poke("scan", self._scan, self.log)

    async def _scan(self) -> None:
        for cls in OBJECT_CLASSES.values():
            classDir = f"{self.home}/backendctrl/{cls.name}"
            for name in await self.xs.ls(classDir, missingOk=True):
                self._pokeObject(cls, name)

    def _pokeObject(self, cls: ObjectClass, name: str) -> None:
        try:
            paths = ControlPaths(cls, self.domid, name)
        except ValueError:
            return  # not a name the protocol allows: nothing we can answer
        self._requests.poke(objectKey(paths), lambda: self._serviceObject(paths), self.log)

    async def _serviceObject(self, paths: ControlPaths) -> None:
        key = objectKey(paths)
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
                self.xs.readOrNone(self.records.journal(paths)),
                self.xs.readOrNone(paths.state),
            ],
            consumeErrors=True,
        )
        if text is None:
            return  # no request: changes to the object are ignored
        answer = await self._answer(paths, text, state, journaled == text)
        self._answered.add(key)
        await self._completed(answer, state)

    async def _answer(
        self, paths: ControlPaths, text: str, state: str | None, recovering: bool
    ) -> Answer:
        """
        Execute the request and complete it: a request accepted here is
        always answered (issue 13). A completion that cannot commit before
        its deadline wrote nothing, so the request is executed again from
        its journal (as after a crash); after L{reexecutions} more, it is
        answered with C{EAGAIN}.
        """
        executions = 0
        while True:
            answer = await self.executor.execute(paths, text, state, recovering)
            executions += 1
            committed = await self.completion.complete(answer)
            if committed is not None:
                return committed
            if executions > self.reexecutions:
                self.log.error(
                    "Completion of {request!r} on {path} could not commit "
                    "in {n} attempt(s) of {timeout:g} s: answered EAGAIN",
                    request=text,
                    path=paths.base,
                    n=executions,
                    timeout=self.completion.timeout,
                )
                return await self.completion.giveUp(
                    answer,
                    "EAGAIN",
                    f"its completion could not commit in {self.completion.timeout:g} s "
                    f"(XenStore conflicts), {executions} time(s)",
                )
            self.log.warn(
                "Completion of {request!r} on {path} could not commit in {timeout:g} s: "
                "executing it again from its journal",
                request=text,
                path=paths.base,
                timeout=self.completion.timeout,
            )
            recovering = True

    async def _completed(self, answer: Answer, state: str | None) -> None:
        """After the completion: the agent's records and hotplug dispatch follow."""
        paths = answer.paths
        rule = answer.request.rule if answer.request is not None else None
        after = rule.after(state) if answer.ok and rule is not None else state
        if answer.ok and rule is not None and rule.input is not None and answer.kindName:
            self.objects.remember(paths, answer.kindName, answer.target or {})
        if after is None:
            # The object is gone: its journal entry and records go too,
            # outside the transaction (see CompletionTransaction._write).
            self.objects.forget(paths)
            await gatherResults(
                [
                    self.xs.rm(self.records.journal(paths), missingOk=True),
                    self.xs.rm(self.records.objectRecords(paths), missingOk=True),
                ],
                consumeErrors=True,
            )
        self.log.info(
            "{request!r} on {path}: result {result}{msg}",
            request=answer.text,
            path=paths.base,
            result=answer.result,
            msg=f" ({answer.message})" if answer.message else "",
        )
        if not answer.ok or rule is None:
            return
        outcome = answer.outcome
        assert outcome is not None and answer.request is not None
        if rule.plugEffect == PLUGS and outcome.backend is not None:
            assert answer.request.plug is not None
            backend = paths.absolute(outcome.backend)
            self.dispatcher.plugged(paths, answer.request.plug, backend)
        elif rule.plugEffect == UNPLUGS and answer.plugSpec is not None:
            self.dispatcher.unplugged(answer.plugSpec)
        if rule.hotplug == HOTPLUG_ADD:
            self.dispatcher.activated(paths)
        elif rule.hotplug == HOTPLUG_READD:
            self.dispatcher.targetChanged(paths)
