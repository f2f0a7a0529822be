"""
The backendctrl protocol end to end: the toolstack client against the
driver-domain agent, over a real XenStore (the C xenstored; the embedded
one where available), with a recording fake kind so every protocol path can
be driven. The real kinds and hotplug scripts are tested in
test_driverdomain_kinds.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.trial.unittest import TestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from tests.support.fixtures import EmbeddedXenstoredFixture, RealXenstoredFixture
from tests.support.host import HostSuite
from tests.support.treedump import dumpTree
from xenddev.backendctrl.errors import (
    DriverDomainError,
    DriverDomainTimeout,
    InvalidNameError,
    PreconditionError,
    StaleTokenError,
)
from xenddev.backendctrl.protocol import VDI, VIF, ControlPaths
from xenddev.driverdomain.agent import BackendCtrlAgent
from xenddev.driverdomain.fencing import FencingTokens
from xenddev.driverdomain.kinds.base import KindContext, KindError, Outcome, PlugSpec
from xenddev.errors import FaultCode
from xenddev.interfaces import IDriverDomainKind, IMediumChanger
from xenddev.toolstack.client import DriverDomainClient, populateFrontend
from xenddev.xenstore.paths import Perm

DD = 0  # the driver domain: dom0, where the agent runs in these tests
GUEST = 5


@implementer(IDriverDomainKind)
class RecordingKind:
    """
    A fake kind: records each call, fails on demand, creates a backend
    directory at plug (and asks for a b-copy when told to).
    """

    name = "recording"
    objectClasses = ("vdi", "vif")

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, bool]] = []
        self.failures: dict[str, KindError] = {}
        self.bcopy: dict[str, str] = {}
        self.gates: dict[str, Deferred[None]] = {}
        self.deactivateWrites: dict[str, str] = {}

    def accepts(self, objectClass: str, target: Any) -> bool:
        return target.get("type") != "unservable"

    def _op(self, op: str, ctx: KindContext) -> Deferred[Outcome]:
        self.calls.append((op, ctx.paths.name, ctx.recovering))
        if op in self.failures:
            raise self.failures[op]
        gate = self.gates.pop(ctx.paths.name, None)
        if gate is not None:
            return gate.addCallback(lambda _: Outcome())
        return succeed(Outcome())

    def prepare(self, ctx: KindContext) -> Deferred[Outcome]:
        return self._op("prepare", ctx)

    def activate(self, ctx: KindContext) -> Deferred[Outcome]:
        return self._op("activate", ctx)

    def deactivate(self, ctx: KindContext) -> Deferred[Outcome]:
        d = self._op("deactivate", ctx)
        return d.addCallback(lambda _: Outcome(writes=dict(self.deactivateWrites)))

    def unprepare(self, ctx: KindContext) -> Deferred[Outcome]:
        return self._op("unprepare", ctx)

    def plug(self, ctx: KindContext, plug: PlugSpec) -> Deferred[Outcome]:
        self.calls.append(("plug", ctx.paths.name, ctx.recovering))
        if "plug" in self.failures:
            raise self.failures["plug"]
        rel = plug.device.backendRelative()
        backend = ctx.paths.absolute(rel)
        if self.bcopy:
            return succeed(Outcome(backend=rel, bcopy=dict(self.bcopy)))
        return succeed(
            Outcome(
                backend=rel,
                mkdirs={
                    backend: [Perm("n", ctx.driverDomid), Perm("r", plug.device.frontendDomid)]
                },
                writes={f"{backend}/state": "1", f"{backend}/frontend": plug.frontend},
            )
        )

    def unplug(self, ctx: KindContext, plug: PlugSpec) -> Deferred[Outcome]:
        return self._op("unplug", ctx)

    def hotplugCommand(self, ctx: KindContext, plug: PlugSpec, action: str) -> None:
        return None


@implementer(IMediumChanger)
class ChangingKind(RecordingKind):
    """A fake kind that can change its target in place, recording each change."""

    def __init__(self) -> None:
        super().__init__()
        self.changes: list[tuple[str, str]] = []
        self.activatedWith: list[str] = []

    def change(self, ctx: KindContext, target: Any, plugs: Any) -> Deferred[Outcome]:
        self.changes.append((ctx.target["params"], target["params"]))
        return succeed(Outcome())

    def activate(self, ctx: KindContext) -> Deferred[Outcome]:
        self.activatedWith.append(ctx.target["params"])
        return super().activate(ctx)


FRONT = f"/local/domain/{GUEST}/device/vbd/51712"
TARGET = {"type": "file", "params": "/srv/a.img", "mode": "w"}


class DriverDomainSuite(HostSuite):
    """The protocol tests; mixed with a server fixture and TestCase."""

    assertNoResult: Any

    async def setUp(self) -> None:
        self.startServer()
        self.xs = await self.connect()
        self.agentXs = await self.connect()
        self.kind = RecordingKind()
        self.agent = BackendCtrlAgent(self.agentXs, DD, [self.kind])
        self.client = DriverDomainClient(self.xs, DD, timeout=5.0)
        await self.client.ensureArea()
        await self.agent.start()
        self.addCleanup(self.agent.stop)

    async def assertTreeUnchanged(self, before: dict[str, Any]) -> None:
        """The tree is C{before} once the agent of the moment is idle."""
        await self.assertTreeIs(before, self.agent)

    def paths(self, name: str = "disk0") -> ControlPaths:
        return ControlPaths(VDI, DD, name)

    # Object lifecycle

    async def test_prepare(self) -> None:
        """prepare writes t/*, the agent answers, the vdi is inactive; result is tidied."""
        await self.client.prepare("disk0", TARGET)
        p = self.paths()
        self.assertEqual(await self.xs.read(p.state), "inactive")
        self.assertEqual(await self.xs.read(p.target("params")), "/srv/a.img")
        self.assertFalse(await self.xs.exists(p.request))
        self.assertFalse(await self.xs.exists(p.result))
        self.assertEqual(self.kind.calls, [("prepare", "disk0", False)])

    async def test_fullLifecycleLeavesNoTrace(self) -> None:
        """prepare, activate, deactivate, unprepare: the tree ends as it began."""
        before = await dumpTree(self.xs)
        await self.client.prepare("disk0", TARGET)
        await self.client.activate("disk0")
        self.assertEqual(await self.xs.read(self.paths().state), "active")
        await self.client.deactivate("disk0")
        self.assertEqual(await self.xs.read(self.paths().state), "inactive")
        await self.client.unprepare("disk0")
        await self.assertTreeUnchanged(before)
        self.assertEqual(
            [c[0] for c in self.kind.calls], ["prepare", "activate", "deactivate", "unprepare"]
        )

    async def test_unprepareActiveDeactivatesFirst(self) -> None:
        """Unpreparing an active vdi deactivates it in the kind first."""
        await self.client.prepare("disk0", TARGET)
        await self.client.activate("disk0")
        await self.client.unprepare("disk0")
        self.assertEqual([c[0] for c in self.kind.calls][-2:], ["deactivate", "unprepare"])

    async def test_unprepareActiveAppliesDeactivation(self) -> None:
        """
        The implicit deactivation of an unprepare has its effects applied
        (with the unprepare's, in one completion): a kind that records
        something at deactivate sees it written.
        """
        marker = f"/local/domain/{DD}/private/xenddev/deactivated"
        self.kind.deactivateWrites = {marker: "disk0"}
        await self.client.prepare("disk0", TARGET)
        await self.client.activate("disk0")
        self.assertFalse(await self.xs.exists(marker))
        await self.client.unprepare("disk0")
        self.assertEqual(await self.xs.read(marker), "disk0")

    async def test_areaMadeAgainOnANewConnection(self) -> None:
        """
        The control area is made once per connection: a reconnected store
        (a restarted xenstored may have lost it) gets it made again.
        """

        class Reconnecting:
            """The suite's connection, with ReconnectingXenStore's counter."""

            connections = 1

            def __init__(self, xs: Any) -> None:
                self._xs = xs

            def __getattr__(self, name: str) -> Any:
                return getattr(self._xs, name)

        store = Reconnecting(self.xs)
        client = DriverDomainClient(store, 7)  # type: ignore[arg-type]
        await client.ensureArea()
        await self.xs.rm("/local/domain/7/backendctrl")
        await client.ensureArea()
        self.assertFalse(await self.xs.exists("/local/domain/7/backendctrl"))
        store.connections = 2
        await client.ensureArea()
        self.assertTrue(await self.xs.exists("/local/domain/7/backendctrl/vdi"))

    # Preconditions, checked by the toolstack before writing

    async def test_prepareTwice(self) -> None:
        """A second prepare is refused locally with EEXIST; nothing is written."""
        await self.client.prepare("disk0", TARGET)
        before = await dumpTree(self.xs)
        e = await self.assertFails(self.client.prepare("disk0", TARGET), PreconditionError)
        self.assertEqual((e.errname, e.errno), ("EEXIST", 17))
        await self.assertTreeUnchanged(before)

    async def test_activateUnprepared(self) -> None:
        """activate of a vdi that does not exist: ENOENT, nothing written."""
        before = await dumpTree(self.xs)
        e = await self.assertFails(self.client.activate("nope"), PreconditionError)
        self.assertEqual(e.errname, "ENOENT")
        await self.assertTreeUnchanged(before)

    async def test_activateTwice(self) -> None:
        """activate of an active vdi: EISCONN; deactivate of an inactive one: ENOTCONN."""
        await self.client.prepare("disk0", TARGET)
        e = await self.assertFails(self.client.deactivate("disk0"), PreconditionError)
        self.assertEqual(e.errname, "ENOTCONN")
        await self.client.activate("disk0")
        e = await self.assertFails(self.client.activate("disk0"), PreconditionError)
        self.assertEqual(e.errname, "EISCONN")

    async def test_invalidNamesRefusedBeforeWriting(self) -> None:
        """Bad vdi/vbd names and targets raise InvalidNameError and write nothing."""
        before = await dumpTree(self.xs)
        for bad in ("", "a/b", "../x", "a b", "x" * 65, "é"):
            self.assertRaises(InvalidNameError, self.client.prepare, bad, TARGET)
        self.assertRaises(InvalidNameError, self.client.prepare, "d", {"bad/key": "v"})
        self.assertRaises(InvalidNameError, self.client.prepare, "d", {"k": "a\nb"})
        self.assertRaises(InvalidNameError, self.client.prepare, "d", {})
        self.assertRaises(InvalidNameError, self.client.prepare, "d", {"k": "x" * 2000})
        self.assertRaises(InvalidNameError, self.client.plug, "d", "v/1", FRONT)
        await self.assertTreeUnchanged(before)

    # Results from the driver domain

    async def test_kindFailureLeavesNoTrace(self) -> None:
        """A failed prepare carries the kind's errno and message; the tree is as before."""
        self.kind.failures["prepare"] = KindError("ENOENT", "/srv/a.img does not exist")
        before = await dumpTree(self.xs)
        e = await self.assertFails(self.client.prepare("disk0", TARGET), DriverDomainError)
        self.assertEqual((e.errno, e.errname, e.request), (2, "ENOENT", "prepare"))
        self.assertEqual(e.message, "/srv/a.img does not exist")
        self.assertIn("ENOENT", str(e))
        await self.assertTreeUnchanged(before)

    async def test_failedActivateKeepsState(self) -> None:
        """A failed activate leaves the vdi inactive and the tree as before."""
        await self.client.prepare("disk0", TARGET)
        self.kind.failures["activate"] = KindError("EIO", "device busy")
        before = await dumpTree(self.xs)
        e = await self.assertFails(self.client.activate("disk0"), DriverDomainError)
        self.assertEqual(e.errname, "EIO")
        await self.assertTreeUnchanged(before)

    async def test_noKindAccepts(self) -> None:
        """A target no kind serves gets ENODEV."""
        e = await self.assertFails(
            self.client.prepare("disk0", {"type": "unservable"}), DriverDomainError
        )
        self.assertEqual(e.errname, "ENODEV")

    # change (our extension: a target replaced in place)

    async def test_changeRefusedByKindWithoutIt(self) -> None:
        """
        A kind that does not provide IMediumChanger answers change with
        EOPNOTSUPP; t/* is unchanged and n/* tidied away.
        """
        await self.client.prepare("disk0", TARGET)
        before = await dumpTree(self.xs)
        e = await self.assertFails(
            self.client.change("disk0", {**TARGET, "params": "/srv/b.img"}), DriverDomainError
        )
        self.assertEqual((e.errname, e.request), ("EOPNOTSUPP", "change"))
        await self.assertTreeUnchanged(before)

    async def test_changeReplacesTarget(self) -> None:
        """
        change on a kind that provides IMediumChanger: the kind sees the old
        and new targets, t/* is replaced (a key dropped disappears), and the
        next request's context carries the new target.
        """
        kind = ChangingKind()
        await self.agent.stop()
        self.agent = BackendCtrlAgent(self.agentXs, DD, [kind])
        await self.agent.start()
        await self.client.prepare("disk0", {**TARGET, "extra": "1"})
        await self.client.change("disk0", {**TARGET, "params": "/srv/b.img"})
        p = self.paths()
        self.assertEqual(sorted(await self.xs.ls(p.targetDir)), ["mode", "params", "type"])
        self.assertEqual(await self.xs.read(p.target("params")), "/srv/b.img")
        self.assertFalse(await self.xs.exists(p.newTargetDir))
        self.assertEqual(kind.changes, [("/srv/a.img", "/srv/b.img")])
        await self.client.activate("disk0")
        self.assertEqual(kind.activatedWith, ["/srv/b.img"])

    async def test_changePreconditions(self) -> None:
        """change of an unprepared object is ENOENT locally; a bad target is refused unwritten."""
        before = await dumpTree(self.xs)
        e = await self.assertFails(self.client.change("nope", TARGET), PreconditionError)
        self.assertEqual(e.errname, "ENOENT")
        self.assertRaises(InvalidNameError, self.client.change, "nope", {"k": "a\nb"})
        await self.assertTreeUnchanged(before)

    async def test_agentEnforcesPreconditions(self) -> None:
        """
        A request written past the client (another toolstack) that violates
        a precondition gets an errno result from the agent, not an action.
        """
        p = self.paths("raw")
        await self.xs.write(p.request, "activate")
        await self.xs.waitFor(p.request, lambda v: v is None, 5)
        self.assertEqual(await self.xs.read(p.result), "2")
        self.assertEqual(await self.xs.read(p.resultMsg), "not prepared")
        self.assertEqual(self.kind.calls, [])

    async def test_unknownRequest(self) -> None:
        """A request the protocol does not define gets EBADRQC (56)."""
        p = self.paths("raw")
        await self.xs.write(p.request, "explode")
        await self.xs.waitFor(p.request, lambda v: v is None, 5)
        self.assertEqual(await self.xs.read(p.result), "56")

    async def test_changesWithoutRequestIgnored(self) -> None:
        """Changes to an unprepared vdi that create neither state nor request get no answer."""
        p = self.paths("quiet")
        await self.xs.write(p.target("type"), "file")
        await self.xs.write(p.target("params"), "/x")
        await self.agent.whenIdle()
        self.assertFalse(await self.xs.exists(p.result))
        self.assertEqual(self.kind.calls, [])

    async def test_timeoutLeavesRequest(self) -> None:
        """With no agent answering, the call times out and the request stays for later."""
        await self.agent.stop()
        client = DriverDomainClient(self.xs, DD, timeout=0.2)
        e = await self.assertFails(client.prepare("late", TARGET), DriverDomainTimeout)
        self.assertIn("left for the driver domain", str(e))
        self.assertEqual(await self.xs.read(self.paths("late").request), "prepare")
        # A new agent (restart) picks it up from the scan at start.
        agent = BackendCtrlAgent(self.agentXs, DD, [self.kind])
        await agent.start()
        self.addCleanup(agent.stop)
        await self.xs.waitFor(self.paths("late").state, lambda v: v == "inactive", 5)

    async def test_interruptedRequestExecutedOnceOnRestart(self) -> None:
        """
        A journal entry for the pending request (the agent died executing it)
        makes the restarted agent run it again with recovering set, once, and
        answer exactly once.
        """
        await self.agent.stop()
        p = self.paths("crash")
        await self.xs.write(p.target("type"), "file")
        await self.xs.write(f"/local/domain/{DD}/private/xenddev/inflight/vdi/crash", "prepare")
        await self.xs.write(p.request, "prepare")
        agent = BackendCtrlAgent(self.agentXs, DD, [self.kind])
        await agent.start()
        self.addCleanup(agent.stop)
        await self.xs.waitFor(p.request, lambda v: v is None, 5)
        await agent.whenIdle()
        self.assertEqual(self.kind.calls, [("prepare", "crash", True)])
        self.assertEqual(await self.xs.read(p.state), "inactive")
        # Emptied (not removed) by the completion while the object exists.
        self.assertFalse(
            await self.xs.readOrNone(f"/local/domain/{DD}/private/xenddev/inflight/vdi/crash")
        )

    # Fencing tokens (docs/protocol.md, "Fencing tokens")

    def fencing(self) -> FencingTokens:
        """A reader of the agent's fencing records (as the agent keeps them)."""
        return FencingTokens(self.xs, DD)

    async def test_tokenRecordedAndConsumed(self) -> None:
        """
        An activate's token is recorded for its target in the agent's
        private area, and the request's token node goes with its answer.
        """
        await self.client.prepare("disk0", TARGET)
        await self.client.activate("disk0", token=7)
        fencing = self.fencing()
        self.assertEqual(await self.xs.read(fencing.record("file:/srv/a.img")), "7 file:/srv/a.img")
        self.assertEqual(await fencing.served("file:/srv/a.img"), 7)
        self.assertFalse(await self.xs.exists(self.paths().token))
        self.assertEqual(await self.xs.read(self.paths().state), "active")

    async def test_staleTokenRefused(self) -> None:
        """
        A second object of the same target activated with a lower token is
        refused (EACCES, StaleTokenError, fault 12) before the kind is
        called; the tree is as it was. An equal or higher token is accepted
        and a higher one recorded.
        """
        await self.client.prepare("disk0", TARGET)
        await self.client.prepare("disk1", TARGET)
        await self.client.activate("disk0", token=9)
        before = await dumpTree(self.xs)
        calls = len(self.kind.calls)
        e = await self.assertFails(self.client.activate("disk1", token=5), StaleTokenError)
        self.assertEqual((e.errname, e.errno, e.request), ("EACCES", 13, "activate"))
        self.assertEqual(e.faultCode, FaultCode.DEVICE_EXISTS)
        self.assertIn("stale fencing token 5 for file:/srv/a.img: token 9", e.message)
        self.assertEqual(len(self.kind.calls), calls)
        await self.assertTreeUnchanged(before)
        await self.client.activate("disk1", token=9)
        await self.client.deactivate("disk1")
        await self.client.activate("disk1", token=12)
        self.assertEqual(await self.fencing().served("file:/srv/a.img"), 12)

    async def test_noTokenAcceptedAfterOne(self) -> None:
        """
        Token 0 (no pool vouches: one host, or w!) is accepted after a
        non-zero one and leaves the record as it was; a token of another
        target is not compared.
        """
        await self.client.prepare("disk0", TARGET)
        await self.client.prepare("other", {**TARGET, "params": "/srv/b.img"})
        await self.client.activate("disk0", token=30)
        await self.client.deactivate("disk0")
        await self.client.activate("disk0")
        await self.client.activate("other", token=2)
        self.assertEqual(await self.fencing().served("file:/srv/a.img"), 30)
        self.assertEqual(await self.fencing().served("file:/srv/b.img"), 2)

    async def test_tokenSurvivesAgentRestart(self) -> None:
        """The highest token is read from XenStore: a restarted agent refuses a lower one."""
        await self.client.prepare("disk0", TARGET)
        await self.client.prepare("disk1", TARGET)
        await self.client.activate("disk0", token=40)
        await self.agent.stop()
        self.kind = RecordingKind()
        self.agent = BackendCtrlAgent(self.agentXs, DD, [self.kind])
        await self.agent.start()
        before = await dumpTree(self.xs)
        await self.assertFails(self.client.activate("disk1", token=39), StaleTokenError)
        self.assertEqual(self.kind.calls, [])
        await self.assertTreeUnchanged(before)

    async def test_agentChecksTokenWrittenPastClient(self) -> None:
        """
        The check is the agent's: a token written past the client (another
        toolstack) is refused with result 13, a malformed one with EINVAL;
        the token node goes with the answer either way.
        """
        await self.client.prepare("disk0", TARGET)
        await self.client.prepare("disk1", TARGET)
        await self.client.activate("disk0", token=100)
        p = self.paths("disk1")
        for token, result in (("99", "13"), ("ten", "22"), ("-1", "22")):
            await self.xs.transact(
                lambda tx, token=token: gatherResults(
                    [tx.write(p.token, token), tx.write(p.request, "activate")]
                )
            )
            await self.xs.waitFor(p.request, lambda v: v is None, 5)
            self.assertEqual(await self.xs.read(p.result), result, token)
            self.assertFalse(await self.xs.exists(p.token))
            self.assertEqual(await self.xs.read(p.state), "inactive")
        self.assertNotIn(("activate", "disk1", False), self.kind.calls)

    async def test_badTokenRefusedBeforeWriting(self) -> None:
        """A token that is not an integer in 0..2**63-1 is refused by the client, unwritten."""
        await self.client.prepare("disk0", TARGET)
        before = await dumpTree(self.xs)
        for bad in (-1, 2**63, True, "5", 1.0):
            self.assertRaises(InvalidNameError, self.client.activate, "disk0", VDI, bad)
        await self.assertTreeUnchanged(before)

    async def test_vifTokenIgnored(self) -> None:
        """An object naming no storage (a vif) has nothing to fence: its token is accepted."""
        await self.client.prepare("nic0", {"mac": "00:16:3e:00:00:01"}, objectClass=VIF)
        await self.client.activate("nic0", VIF, token=3)
        self.assertEqual(await self.xs.ls(self.fencing().directory, missingOk=True), [])

    # Plugs

    async def _plugged(self) -> Any:
        await self.client.prepare("disk0", TARGET)
        result = await self.client.plug("disk0", "xvda", FRONT)
        return result

    async def test_plug(self) -> None:
        """plug names an absolute backend path; the vbd is ok; the backend exists."""
        result = await self._plugged()
        self.assertEqual(result.backendPath, f"/local/domain/{DD}/backend/vbd/{GUEST}/51712")
        self.assertEqual(dict(result.bcopy), {})
        pp = self.paths().plug("xvda")
        self.assertEqual(await self.xs.read(pp.state), "ok")
        self.assertEqual(await self.xs.read(pp.backend), f"backend/vbd/{GUEST}/51712")
        self.assertEqual(
            [str(x) for x in await self.xs.getPerms(result.backendPath)], [f"n{DD}", f"r{GUEST}"]
        )

    async def test_populateFrontend(self) -> None:
        """The frontend is created owned by the guest, readable by the driver domain."""
        result = await self._plugged()
        await self.xs.transact(
            lambda tx: populateFrontend(
                tx, result, GUEST, {"state": "1", "virtual-device": "51712"}
            )
        )
        self.assertEqual(await self.xs.read(f"{FRONT}/backend"), result.backendPath)
        self.assertEqual(await self.xs.read(f"{FRONT}/backend-id"), str(DD))
        self.assertEqual([str(x) for x in await self.xs.getPerms(FRONT)], [f"n{GUEST}", f"r{DD}"])
        self.assertEqual(await self.xs.read(f"{result.backendPath}/frontend"), FRONT)

    async def test_bcopy(self) -> None:
        """b-copy values reach the toolstack and are copied into the backend it creates."""
        self.kind.bcopy = {"params": "/srv/a.img", "mode": "w"}
        result = await self._plugged()
        self.assertEqual(dict(result.bcopy), {"params": "/srv/a.img", "mode": "w"})
        self.assertFalse(await self.xs.exists(result.backendPath))
        await self.xs.transact(lambda tx: populateFrontend(tx, result, GUEST, {"state": "1"}))
        self.assertEqual(await self.xs.read(f"{result.backendPath}/params"), "/srv/a.img")
        self.assertEqual(await self.xs.read(f"{result.backendPath}/frontend"), FRONT)
        self.assertEqual(
            [str(x) for x in await self.xs.getPerms(result.backendPath)], [f"n{DD}", f"r{GUEST}"]
        )

    async def test_plugPreconditions(self) -> None:
        """Plug: unprepared vdi ENOENT, existing frontend EEXIST, duplicate vbd EEXIST."""
        e = await self.assertFails(self.client.plug("disk0", "xvda", FRONT), PreconditionError)
        self.assertEqual(e.errname, "ENOENT")
        await self.client.prepare("disk0", TARGET)
        await self.xs.write(f"{FRONT}/state", "1")
        e = await self.assertFails(self.client.plug("disk0", "xvda", FRONT), PreconditionError)
        self.assertEqual(e.errname, "EEXIST")
        await self.xs.rm(FRONT)
        await self.client.plug("disk0", "xvda", FRONT)
        e = await self.assertFails(
            self.client.plug("disk0", "xvda", FRONT.replace("51712", "51728")), PreconditionError
        )
        self.assertEqual(e.errname, "EEXIST")

    async def test_unplug(self) -> None:
        """unplug (frontend gone) removes the backend and the vbd; then unprepare restores all."""
        before = await dumpTree(self.xs)
        result = await self._plugged()
        await self.xs.transact(lambda tx: populateFrontend(tx, result, GUEST, {"state": "1"}))
        e = await self.assertFails(self.client.unplug("disk0", "xvda"), PreconditionError)
        self.assertEqual(e.errname, "EBUSY")
        await self.xs.rm(FRONT)
        await self.client.unplug("disk0", "xvda")
        self.assertFalse(await self.xs.exists(result.backendPath))
        self.assertFalse(await self.xs.exists(self.paths().plug("xvda").base))
        await self.client.unprepare("disk0")
        await self.xs.rm(f"/local/domain/{GUEST}")
        await self.assertTreeUnchanged(before)

    async def test_unprepareWithPlugs(self) -> None:
        """unprepare while a vbd is plugged: EBUSY."""
        await self._plugged()
        e = await self.assertFails(self.client.unprepare("disk0"), PreconditionError)
        self.assertEqual(e.errname, "EBUSY")

    async def test_failedPlugLeavesNoTrace(self) -> None:
        """A plug the kind refuses leaves neither the vbd directory nor a backend."""
        await self.client.prepare("disk0", TARGET)
        before = await dumpTree(self.xs)
        self.kind.failures["plug"] = KindError("ENOSPC", "no free minors")
        e = await self.assertFails(self.client.plug("disk0", "xvda", FRONT), DriverDomainError)
        self.assertEqual(e.errname, "ENOSPC")
        await self.assertTreeUnchanged(before)

    # Concurrency and listing

    async def test_sameVdiQueues(self) -> None:
        """Calls on one vdi issued together run one after another, in order."""
        await gatherResults(
            [
                self.client.prepare("disk0", TARGET),
                self.client.activate("disk0"),
                self.client.deactivate("disk0"),
            ]
        )
        self.assertEqual([c[0] for c in self.kind.calls], ["prepare", "activate", "deactivate"])

    async def test_differentVdisInParallel(self) -> None:
        """Requests on different vdis are outstanding at the same time."""
        self.kind.gates["slow"] = gate = Deferred()
        self.addCleanup(lambda: gate.called or gate.callback(None))
        first = self.client.prepare("slow", TARGET)
        await self.client.prepare("fast", TARGET)  # completes while "slow" is held
        self.assertNoResult(first)
        gate.callback(None)
        await first

    async def test_list(self) -> None:
        """list() enumerates vdis with state, target and plugs; vifs separately."""
        await self._plugged()
        await self.client.prepare("nic0", {"mac": "00:16:3e:00:00:01"}, objectClass=VIF)
        (info,) = await self.client.list()
        self.assertEqual((info.name, info.state, info.request), ("disk0", "inactive", None))
        self.assertEqual(dict(info.target), TARGET)
        (plug,) = info.plugs
        self.assertEqual((plug.name, plug.state, plug.frontend), ("xvda", "ok", FRONT))
        self.assertEqual(plug.backend, f"/local/domain/{DD}/backend/vbd/{GUEST}/51712")
        (vif,) = await self.client.list(VIF)
        self.assertEqual((vif.objectClass, vif.name), ("vif", "nic0"))

    def test_kindProvidesInterface(self) -> None:
        """The fake kind really provides IDriverDomainKind (so the agent's use is honest)."""
        self.assertTrue(verifyObject(IDriverDomainKind, RecordingKind()))


class RealXenstoredDriverDomainTests(DriverDomainSuite, RealXenstoredFixture, TestCase):
    """The protocol over the C xenstored."""


class EmbeddedXenstoredDriverDomainTests(DriverDomainSuite, EmbeddedXenstoredFixture, TestCase):
    """The protocol over the embedded xenstored."""
