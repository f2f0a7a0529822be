# -*- test-case-name: tests.test_driverdomain_completion,tests.test_driverdomain -*-
"""
The completion transaction: in one transaction, a request's effects (the
kind's L{Outcome} and what the request's rule in
L{xenddev.backendctrl.requests} says it writes or removes), the object's
state, C{result} and C{result_msg}, the journal entry emptied and the
request deleted.

A request the agent accepted is always answered (issue 13: under a storm
of concurrent attaches a completion gave up after 32 conflicts, and its
request stayed pending for ever). The completion is retried until a
deadline rather than for a number of attempts; one that cannot commit by
then is reported to the agent, which executes the request again from its
journal and, failing that, answers it with C{EAGAIN} (L{giveUp}). One
that XenStore refuses outright is answered with C{EIO}.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import attrs
from twisted.internet.defer import Deferred, FirstError, gatherResults
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger

from xenddev.backendctrl.protocol import PLUGGED, XEN_ERRNO, ControlPaths
from xenddev.backendctrl.requests import PLUGS, UNPLUGS, Request
from xenddev.driverdomain.kinds.base import DeviceRef, Outcome, PlugSpec
from xenddev.driverdomain.objects import AgentRecords, hotplugRef
from xenddev.errors import XenddevError
from xenddev.interfaces import ITransaction, IXenStore
from xenddev.xenstore.errors import TransactionRetriesExhausted, XenStoreError

#: Seconds a completion is retried before the agent is told it could not
#: commit: a toolstack waits 30 s for an answer by default.
COMPLETION_TIMEOUT = 30.0
#: The backoff between attempts, as the client's C{transact}: full jitter,
#: doubling from 1 ms, capped at 200 ms.
_BACKOFF_BASE = 0.001
_BACKOFF_CAP = 0.2


@attrs.frozen
class Answer:
    """
    What a request came to, for its completion transaction.

    @ivar paths: the object's control paths.
    @ivar text: the request as written.
    @ivar request: the parsed request (None: not one the protocol defines).
    @ivar result: the Xen errno of the result (0: success).
    @ivar message: C{result_msg} (empty on success).
    @ivar outcome: on success, what the kind wants written with the result.
    @ivar kindName: the kind that performed it.
    @ivar plugSpec: for a plug or unplug, the plug.
    @ivar target: for a request that gives the object its target (prepare,
        change), that target.
    """

    paths: ControlPaths
    text: str
    request: Request | None
    result: int
    message: str = ""
    outcome: Outcome | None = None
    kindName: str | None = None
    plugSpec: PlugSpec | None = None
    target: Mapping[str, str] | None = None

    @property
    def ok(self) -> bool:
        """Whether the request succeeded (its effects are written)."""
        return self.result == 0 and self.request is not None and self.outcome is not None

    def failed(self, errname: str, message: str) -> Answer:
        """The same request answered with C{errname}, no effect written."""
        return Answer(self.paths, self.text, self.request, XEN_ERRNO[errname], message)


class CompletionTransaction:
    """
    Writes requests' answers for the agent of one driver domain.

    @param xs: the agent's connection.
    @param records: where the agent's records are.
    @param reactor: the clock of the deadline and the backoff.
    @param timeout: seconds a completion is retried (L{COMPLETION_TIMEOUT}).
    @param random: the jitter's source (tests).
    """

    log = Logger()

    def __init__(
        self,
        xs: IXenStore,
        records: AgentRecords,
        reactor: IReactorTime,
        timeout: float = COMPLETION_TIMEOUT,
        random: Callable[[], float] = random.random,
    ) -> None:
        self.xs = xs
        self.records = records
        self.reactor = reactor
        self.timeout = timeout
        self._random = random

    async def complete(self, answer: Answer) -> Answer | None:
        """
        Commit C{answer}, retrying conflicts until the deadline.

        @return: the answer committed: C{answer}, or an C{EIO} failure if
            XenStore refused its writes; None if it could not commit before
            the deadline (nothing written: the request and its journal
            entry are as they were).
        """
        try:
            committed = await self._commit(answer, self.reactor.seconds() + self.timeout)
        except (XenStoreError, ValueError) as e:
            # Refused (a kind's outcome XenStore will not take): retrying
            # cannot help, and a request left pending blocks its object.
            self.log.failure(
                "Completion of {request!r} on {path} refused",
                request=answer.text,
                path=answer.paths.base,
            )
            return await self.giveUp(answer, "EIO", f"completion refused: {type(e).__name__}: {e}")
        return answer if committed else None

    async def giveUp(self, answer: Answer, errname: str, message: str) -> Answer:
        """
        Answer the request with C{errname} instead: no effect, only the
        result (a transaction on the object's own nodes: retried until it
        commits). What the kind did outside XenStore is not undone.
        """
        failure = answer.failed(errname, message)
        await self._commit(failure, None)
        return failure

    async def _commit(self, answer: Answer, deadline: float | None) -> bool:
        """Whether C{answer} committed before C{deadline} (None: none)."""
        keepRequest = False
        attempt = 0
        while True:
            try:
                # One attempt per call: the deadline, not a count, decides
                # when to stop (issue 13).
                await self.xs.transact(partial(self._write, answer=answer, keep=keepRequest), 1)
                return True
            except _RequestReplaced:
                keepRequest = True
                continue  # not a conflict: again at once
            except _RequestWithdrawn:
                # The toolstack gave up and removed the object (abandon):
                # an answer now would make its directory again, an orphan
                # nobody waits for. Only the journal entry is ours to end.
                self.log.warn(
                    "{request} of {path} answered after the toolstack withdrew it; "
                    "its result is dropped",
                    request=answer.text,
                    path=answer.paths.base,
                )
                paths = answer.paths
                if await self.xs.exists(paths.base):
                    await self.xs.write(self.records.journal(paths), "")
                else:
                    # Gone with its directory: its records go too.
                    await gatherResults(
                        [
                            self.xs.rm(self.records.journal(paths), missingOk=True),
                            self.xs.rm(self.records.objectRecords(paths), missingOk=True),
                        ],
                        consumeErrors=True,
                    )
                return True
            except TransactionRetriesExhausted:
                pass
            now = self.reactor.seconds()
            if deadline is not None and now >= deadline:
                return False
            delay = self._random() * min(_BACKOFF_CAP, _BACKOFF_BASE * 2 ** min(attempt, 16))
            attempt += 1
            if deadline is not None:
                delay = min(delay, deadline - now)
            await deferLater(self.reactor, delay)

    async def _write(self, tx: ITransaction, answer: Answer, keep: bool) -> None:
        """
        The transaction: effects, state, result, journal emptied, request
        deleted.

        Everything independent goes out at once (xenstored runs one
        connection's requests in order). The journal entry is emptied, not
        removed, and the object's records directory is created before and
        removed after it (by the agent): a transaction that adds or removes
        a child of a directory shared by all objects (C{inflight/<class>},
        C{objects/<class>}) conflicts with every concurrent one that does.
        """
        paths = answer.paths
        records = self.records
        ops: list[Deferred[Any]] = []
        chains: list[Deferred[Any]] = []
        if answer.ok:
            assert answer.request is not None and answer.outcome is not None
            rule = answer.request.rule
            outcome = answer.outcome
            ops += _applyOps(tx, outcome)
            if rule.setsState:
                if rule.stateAfter is None:
                    ops.append(tx.rm(paths.state, missingOk=True))
                else:
                    ops.append(tx.write(paths.state, rule.stateAfter))
            if rule.createsObject:
                ops.append(tx.write(records.kind(paths), answer.kindName or ""))
            if rule.removesObject:
                ops.append(tx.rm(records.kind(paths), missingOk=True))
                ops.append(tx.rm(records.kindData(paths), missingOk=True))
            plug = answer.request.plug
            if rule.plugEffect == PLUGS:
                # The executor checked that the kind named its backend.
                assert plug is not None and outcome.backend is not None
                pp = paths.plug(plug)
                ops.append(tx.write(pp.state, PLUGGED))
                ops.append(tx.write(pp.backend, outcome.backend))
                ops += [tx.write(f"{pp.bcopy}/{k}", v) for k, v in outcome.bcopy.items()]
                ref = DeviceRef.fromBackendPath(paths.absolute(outcome.backend))
                owner = f"{paths.objectClass.name}/{paths.name}/{plug}"
                ops.append(tx.write(records.device(ref), owner))
            elif rule.plugEffect == UNPLUGS:
                assert plug is not None and answer.plugSpec is not None
                pp = paths.plug(plug)
                ops += [
                    tx.rm(pp.state, missingOk=True),
                    tx.rm(pp.backend, missingOk=True),
                    tx.rm(pp.bcopy, missingOk=True),
                ]
                backend = answer.plugSpec.backend
                if backend is not None:
                    # An empty backend/<class>/<domu> would leak quota
                    # (libxl c992efd06a).
                    home = paths.home
                    chains.append(_rmWithEmptyParents(tx, backend, f"{home}/backend"))
                record = records.device(hotplugRef(answer.plugSpec))
                chains.append(_rmWithEmptyParents(tx, record, records.devices))
        if answer.request is not None and answer.request.rule.fenced:
            # The request's token is consumed with it, answered either way.
            ops.append(tx.rm(paths.token, missingOk=True))
        ops.append(tx.write(paths.result, str(answer.result)))
        if answer.message:
            ops.append(tx.write(paths.resultMsg, answer.message))
        else:
            ops.append(tx.rm(paths.resultMsg, missingOk=True))
        ops.append(tx.write(records.journal(paths), ""))
        # The request is deleted in the same batch, then checked: if the
        # toolstack replaced it meanwhile (it must not), the transaction is
        # aborted and redone without deleting the new one.
        current = tx.readOrNone(paths.request)
        if not keep:
            ops.append(tx.rm(paths.request, missingOk=True))
        try:
            await _all(ops + chains)
        except BaseException:
            current.addErrback(lambda _: None)
            raise
        found = await current
        if found is None and not keep:
            raise _RequestWithdrawn()
        if not keep and found != answer.text:
            raise _RequestReplaced()


class _RequestReplaced(XenddevError):
    """The request changed while it was executed: complete without deleting it."""


class _RequestWithdrawn(XenddevError):
    """The request is gone (the toolstack abandoned the object): write nothing."""


async def _all(ds: list[Deferred[Any]]) -> None:
    """
    Wait for every one of C{ds}; raise the first failure itself, not
    wrapped in L{FirstError} (so C{transact} retries a conflict and
    L{CompletionTransaction.complete} sees a refusal), the others consumed.
    """
    try:
        await gatherResults(ds, consumeErrors=True)
    except FirstError as e:
        e.subFailure.raiseException()


def _applyOps(tx: ITransaction, outcome: Outcome) -> list[Deferred[Any]]:
    """Send a kind's outcome, in order, without waiting for the replies."""
    ops: list[Deferred[Any]] = [tx.rm(path, missingOk=True) for path in outcome.removes]
    for path, perms in outcome.mkdirs.items():
        ops += [tx.mkdir(path), tx.setPerms(path, perms)]
    ops += [tx.write(p, v) for p, v in outcome.writes.items()]
    return ops


def _rmWithEmptyParents(tx: ITransaction, path: str, stop: str) -> Deferred[None]:
    """
    Remove C{path}, then its now-empty ancestors up to (not including)
    C{stop}: one round trip for the removal plus one per emptied level.
    """

    async def remove() -> None:
        removed = tx.rm(path, missingOk=True)
        parent = path.rsplit("/", 1)[0]
        while parent.startswith(stop + "/"):
            if await tx.ls(parent, missingOk=True):
                break
            await tx.rm(parent, missingOk=True)
            parent = parent.rsplit("/", 1)[0]
        await removed

    return Deferred.fromCoroutine(remove())
