"""
The agent's completion transaction under conflicts (issue 13, finding 1,
"orphans under load"): with 1000 concurrent attaches a completion gave up
after 32 EAGAINs and its request was never answered, so the vdi stayed at
C{request = "plug p0"} for ever. A request the agent accepted is now
always answered: the completion is retried until a deadline, then the
request is executed again from its journal, then answered with C{EAGAIN};
a completion XenStore refuses is answered with C{EIO}.

The storm is injected in the agent's connection (L{ConflictStorm}), over
the C xenstored and the embedded one.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from tests.support.fixtures import EmbeddedXenstoredFixture, RealXenstoredFixture
from tests.support.host import HostSuite
from tests.support.treedump import dumpTree
from tests.test_driverdomain import DD, FRONT, TARGET, RecordingKind
from xenddev.backendctrl.errors import DriverDomainError, DriverDomainTimeout
from xenddev.backendctrl.protocol import VDI, ControlPaths, privateDir
from xenddev.driverdomain.agent import BackendCtrlAgent
from xenddev.toolstack.client import DriverDomainClient
from xenddev.xenstore.errors import AccessDeniedError, ConflictError, InvalidPathError


class ConflictStorm:
    """
    The agent's connection, whose completion transactions (those that write
    an object's C{result}) fail with EAGAIN while C{raging(value)} says so
    for the result C{value} they write: a stand-in for thousands of
    concurrent attaches conflicting with every commit.

    @ivar conflicts: how many transactions it failed.
    """

    def __init__(
        self, xs: Any, raging: Callable[[str], bool], refused: frozenset[str] = frozenset()
    ) -> None:
        self._xs = xs
        self._raging = raging
        self._refused = refused
        self.conflicts = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._xs, name)

    def transact(self, fn: Callable[[Any], Any], maxAttempts: int | None = None) -> Any:
        """The store's C{transact}, with the storm's conflicts at the end of C{fn}."""

        async def attempt(tx: Any) -> Any:
            watched = _ResultWatch(tx, self._refused)
            value = fn(watched)
            if isinstance(value, Awaitable):
                value = await value
            if watched.result is not None and self._raging(watched.result):
                self.conflicts += 1
                raise ConflictError("EAGAIN", "TRANSACTION_END")
            return value

        return self._xs.transact(attempt, maxAttempts)


class _ResultWatch:
    """
    A transaction that notes the C{result} it writes, and whose writes of
    the C{refused} paths fail as xenstored refuses them (EACCES).
    """

    def __init__(self, tx: Any, refused: frozenset[str]) -> None:
        self._tx = tx
        self._refused = refused
        self.result: str | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tx, name)

    def write(self, path: str, value: str) -> Any:
        """Write, noting an object's C{result}."""
        if path.endswith("/result"):
            self.result = value
        if path in self._refused:
            return deferLater(reactor, 0, _refuse, path)
        return self._tx.write(path, value)


def _refuse(path: str) -> None:
    raise AccessDeniedError("EACCES", "WRITE", path)


class CompletionSuite(HostSuite):
    """The completion under conflicts; mixed with a server fixture and TestCase."""

    async def setUp(self) -> None:
        self.startServer()
        self.xs = await self.connect()
        self.agentXs = await self.connect()
        self.kind = RecordingKind()
        self.client = DriverDomainClient(self.xs, DD, timeout=10.0)
        await self.client.ensureArea()

    async def startAgent(
        self, raging: Callable[[str], bool], refused: frozenset[str] = frozenset(), **options: Any
    ) -> tuple[BackendCtrlAgent, ConflictStorm]:
        """
        An agent whose completions meet a storm while C{raging(result)},
        and whose writes of C{refused} paths xenstored refuses.
        """
        storm = ConflictStorm(self.agentXs, raging, refused)
        agent = BackendCtrlAgent(storm, DD, [self.kind], **options)  # type: ignore[arg-type]
        await agent.start()
        self.addCleanup(agent.stop)
        return agent, storm

    def paths(self, name: str = "disk0") -> ControlPaths:
        """The object's control paths."""
        return ControlPaths(VDI, DD, name)

    async def test_plugThroughConflictStorm(self) -> None:
        """
        A plug whose completion meets 40 conflicts (more than the 32
        attempts a transaction used to get) completes: the vdi is not left
        at C{request = "plug xvda"} (every later request refused with
        EBUSY), the journal entry is emptied, and unplug and unprepare then
        leave the tree as it began.
        """
        raging = {"on": False, "left": 40}

        def storm(result: str) -> bool:
            if not raging["on"] or raging["left"] == 0:
                return False
            raging["left"] -= 1
            return True

        agent, conflicts = await self.startAgent(storm)
        before = await dumpTree(self.xs)
        await self.client.prepare("disk0", TARGET)
        raging["on"] = True
        result = await self.client.plug("disk0", "xvda", FRONT)
        self.assertEqual(conflicts.conflicts, 40)
        p = self.paths()
        self.assertIsNone(await self.xs.readOrNone(p.request))
        self.assertEqual(await self.xs.read(p.plug("xvda").state), "ok")
        self.assertTrue(await self.xs.exists(result.backendPath))
        self.assertEqual(await self.xs.read(f"{privateDir(DD)}/inflight/vdi/disk0"), "")
        await self.client.unplug("disk0", "xvda")
        await self.client.unprepare("disk0")
        await self.assertTreeIs(before, agent)

    async def test_stormPastTheDeadlineReexecutes(self) -> None:
        """
        A completion that cannot commit before its deadline wrote nothing:
        the request is executed again from its journal (the kind is told it
        is recovering) and that execution's completion commits.
        """

        def storm(result: str) -> bool:
            # Until the request is executed again.
            return not any(recovering for _, _, recovering in self.kind.calls)

        await self.startAgent(storm, completionTimeout=0.2)
        await self.client.prepare("disk0", TARGET)
        self.assertEqual(self.kind.calls, [("prepare", "disk0", False), ("prepare", "disk0", True)])
        self.assertEqual(await self.xs.read(self.paths().state), "inactive")

    async def test_endlessStormAnsweredEAGAIN(self) -> None:
        """
        A completion that never commits (every successful result conflicts)
        is answered with EAGAIN after the re-execution's completion failed
        too: the toolstack gets an answer, the failed prepare leaves the
        tree as it was, and the next request is served.
        """
        raging = {"on": True}
        agent, _ = await self.startAgent(
            lambda result: raging["on"] and result == "0", completionTimeout=0.2
        )
        before = await dumpTree(self.xs)
        e = await self.assertFails(self.client.prepare("disk0", TARGET), DriverDomainError)
        self.assertEqual((e.errname, e.request), ("EAGAIN", "prepare"))
        self.assertIn("could not commit", e.message)
        self.assertEqual(self.kind.calls, [("prepare", "disk0", False), ("prepare", "disk0", True)])
        await self.assertTreeIs(before, agent)
        raging["on"] = False
        await self.client.prepare("disk0", TARGET)
        self.assertEqual(await self.xs.read(self.paths().state), "inactive")

    async def test_refusedCompletionAnsweredEIO(self) -> None:
        """
        A completion XenStore refuses (here a kind's outcome with a path it
        will not take) is answered with EIO at once instead of being left
        pending; the object stays as it was and takes the next request.
        """
        await self.startAgent(lambda result: False)
        await self.client.prepare("disk0", TARGET)
        await self.client.activate("disk0")
        self.kind.deactivateWrites = {f"{privateDir(DD)}/bad node": "x"}
        e = await self.assertFails(self.client.deactivate("disk0"), DriverDomainError)
        self.assertEqual((e.errname, e.request), ("EIO", "deactivate"))
        self.assertIn("completion refused", e.message)
        self.assertEqual(len(self.flushLoggedErrors(InvalidPathError)), 1)
        self.assertEqual(await self.xs.read(self.paths().state), "active")
        self.kind.deactivateWrites = {}
        await self.client.deactivate("disk0")
        self.assertEqual(await self.xs.read(self.paths().state), "inactive")

    async def test_refusalByXenstoredAnsweredEIO(self) -> None:
        """
        A completion whose write xenstored refuses (EACCES, in its reply) is
        answered with EIO too: the refusal comes out of the batch of writes
        itself, not wrapped, and the request is not left pending.
        """
        marker = f"{privateDir(DD)}/refused"
        await self.startAgent(lambda result: False, frozenset({marker}))
        await self.client.prepare("disk0", TARGET)
        await self.client.activate("disk0")
        self.kind.deactivateWrites = {marker: "x"}
        e = await self.assertFails(self.client.deactivate("disk0"), DriverDomainError)
        self.assertEqual((e.errname, e.request), ("EIO", "deactivate"))
        self.assertIn("AccessDeniedError", e.message)
        self.assertEqual(len(self.flushLoggedErrors(AccessDeniedError)), 1)
        self.assertEqual(await self.xs.read(self.paths().state), "active")
        self.assertFalse(await self.xs.exists(marker))
        self.kind.deactivateWrites = {}
        await self.client.deactivate("disk0")

    async def test_answerAfterWithdrawalDropped(self) -> None:
        """
        A slow agent answering after the toolstack gave up: the toolstack
        abandoned the object (its directory removed); the late completion
        writes nothing, so no directory comes back that nobody waits for,
        and the tree is as it began.
        """
        agent, _ = await self.startAgent(lambda result: False)
        before = await dumpTree(self.xs)
        gate: Deferred[None] = Deferred()
        self.kind.gates["disk0"] = gate
        impatient = DriverDomainClient(self.xs, DD, timeout=0.2)
        await self.assertFails(impatient.prepare("disk0", TARGET), DriverDomainTimeout)
        await impatient.abandon("disk0")
        gate.callback(None)
        await agent.whenIdle()
        self.assertFalse(await self.xs.exists(self.paths().base))
        await self.assertTreeIs(before, agent)


class RealXenstoredCompletionTests(CompletionSuite, RealXenstoredFixture, TestCase):
    """The completion under conflicts, over the C xenstored."""


class EmbeddedXenstoredCompletionTests(CompletionSuite, EmbeddedXenstoredFixture, TestCase):
    """The completion under conflicts, over the embedded xenstored."""
