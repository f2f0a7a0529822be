"""
The protocol's requests as one table (L{xenddev.backendctrl.requests}):
parsing, the rules' facts, and the preconditions read from the table,
which must give exactly the answers the if-ladder they replaced gave.
"""

from __future__ import annotations

import itertools

from twisted.trial.unittest import SynchronousTestCase

from xenddev.backendctrl import protocol
from xenddev.backendctrl.requests import (
    ABSENT,
    ANY_STATE,
    PLUGS,
    REQUESTS,
    UNPLUGS,
    ObjectSnapshot,
    Request,
    RequestRule,
    checkPreconditions,
)
from xenddev.datapath.quiesce import IDataPathPauser
from xenddev.interfaces import IDriverDomainKind, IMediumChanger

NAMES = (
    protocol.PREPARE,
    protocol.ACTIVATE,
    protocol.DEACTIVATE,
    protocol.UNPREPARE,
    protocol.PLUG,
    protocol.UNPLUG,
    protocol.CHANGE,
    protocol.PAUSE,
    protocol.RESUME,
    protocol.RELOAD,
)


def ladder(request: Request, snap: ObjectSnapshot, takeover: bool) -> tuple[str, str] | None:
    """
    The preconditions as they were written before the table (commit
    6915d36), request by request: the oracle the table must agree with.
    """
    if snap.request is not None:
        return "EBUSY", f"request {snap.request!r} is still being performed"
    op = request.op
    if op == "prepare":
        if snap.state is not None:
            return "EEXIST", f"already prepared (state {snap.state})"
        return None
    if snap.state is None:
        return "ENOENT", "not prepared"
    if op == "activate" and snap.state != "inactive":
        return "EISCONN", f"cannot activate in state {snap.state}"
    if op == "deactivate" and snap.state != "active":
        return "ENOTCONN", f"cannot deactivate in state {snap.state}"
    if op in ("pause", "resume", "reload") and snap.state != "active":
        return "ENOTCONN", f"cannot {op} in state {snap.state}: only an active data path"
    if op == "unprepare" and snap.plugCount:
        return "EBUSY", f"{snap.plugCount} plug(s) still present: unplug them first"
    if op == "plug":
        if snap.plugState is not None:
            return "EEXIST", f"{request.plug} is already plugged"
        if snap.frontendExists and not takeover:
            return "EEXIST", "the frontend directory already exists"
    if op == "unplug":
        if snap.plugState != "ok":
            return "ENOENT", f"{request.plug} is not plugged"
        if snap.frontendExists:
            return "EBUSY", "the frontend directory still exists: remove it first"
    return None


class TableTests(SynchronousTestCase):
    """The table's rows."""

    def test_everyRequest(self) -> None:
        """The table has a row for each of the ten requests, and no other."""
        self.assertEqual(sorted(REQUESTS), sorted(NAMES))
        for name, rule in REQUESTS.items():
            self.assertEqual(rule.name, name)

    def test_stateAfter(self) -> None:
        """prepare, activate, deactivate and unprepare set the state; the others keep it."""
        after = {n: r.after("inactive") for n, r in REQUESTS.items()}
        self.assertEqual(
            after,
            {
                "prepare": "inactive",
                "activate": "active",
                "deactivate": "inactive",
                "unprepare": None,
                "plug": "inactive",
                "unplug": "inactive",
                "change": "inactive",
                "pause": "inactive",
                "resume": "inactive",
                "reload": "inactive",
            },
        )

    def test_objectLifetime(self) -> None:
        """Only prepare creates an object and only unprepare removes it."""
        self.assertEqual([n for n, r in REQUESTS.items() if r.createsObject], ["prepare"])
        self.assertEqual([n for n, r in REQUESTS.items() if r.removesObject], ["unprepare"])

    def test_plugs(self) -> None:
        """plug plugs and unplug unplugs; they alone name a plug."""
        effects = {n: r.plugEffect for n, r in REQUESTS.items() if r.plugEffect}
        self.assertEqual(effects, {"plug": PLUGS, "unplug": UNPLUGS})
        self.assertEqual([n for n, r in REQUESTS.items() if r.takesPlug], ["plug", "unplug"])

    def test_kindMethods(self) -> None:
        """
        Each request is performed by a method of the kind or by a data-path
        pauser, never both; a method outside IDriverDomainKind is one an
        optional interface declares, with the refusal's words.
        """
        for name, rule in REQUESTS.items():
            self.assertNotEqual(rule.kindMethod is None, rule.dataPath is None, name)
            if rule.kindMethod is not None and rule.kindMethod not in IDriverDomainKind:
                self.assertIn(rule.kindMethod, IMediumChanger)
                self.assertTrue(rule.kindLacks, name)
            if rule.dataPath is not None:
                self.assertIn(rule.dataPath, IDataPathPauser)
        self.assertTrue(REQUESTS["reload"].reopensImage)
        self.assertFalse(REQUESTS["resume"].reopensImage)

    def test_implied(self) -> None:
        """unprepare deactivates an active object first, and only an active one."""
        self.assertEqual(REQUESTS["unprepare"].implies, "deactivate")
        implied = REQUESTS["deactivate"]
        self.assertEqual([s for s in ("inactive", "active") if implied.accepts(s)], ["active"])

    def test_inputs(self) -> None:
        """prepare's input is the target, change's its replacement (consumed)."""
        inputs = {n: (r.input, r.replacesTarget) for n, r in REQUESTS.items() if r.input}
        self.assertEqual(inputs, {"prepare": ("t", False), "change": ("n", True)})

    def test_refusalMustBeSaid(self) -> None:
        """A rule that refuses some prepared state without saying how is an error."""
        self.assertRaises(ValueError, RequestRule, "x", frozenset({"active"}))
        RequestRule("x", frozenset({ANY_STATE}))
        self.assertTrue(RequestRule("x", frozenset({ABSENT}), ("EEXIST", "")).accepts(None))


class ParseTests(SynchronousTestCase):
    """L{Request.parse}."""

    def test_roundTrip(self) -> None:
        """Every request parses, a plug request with its plug, and prints as written."""
        for name in NAMES:
            text = f"{name} xvda" if REQUESTS[name].takesPlug else name
            request = Request.parse(text)
            self.assertEqual((request.op, str(request)), (name, text))
            self.assertIs(request.rule, REQUESTS[name])

    def test_refused(self) -> None:
        """Unknown requests, missing or extra arguments, bad plug names: ValueError."""
        for text in ("explode", "plug", "unplug ", "activate now", "plug a/b", "plug a b", ""):
            self.assertRaises(ValueError, Request.parse, text)


class PreconditionTests(SynchronousTestCase):
    """L{checkPreconditions} reads the table and agrees with the old ladder."""

    def test_sameAsLadder(self) -> None:
        """Every request on every combination of inputs gets the old answer."""
        states = (None, "inactive", "active", "garbage", ANY_STATE)
        both = (False, True)
        grid = itertools.product(
            NAMES, states, (None, "plug x"), (None, "ok", "odd"), both, (0, 2), both
        )
        for name, state, pending, plugState, front, count, takeover in grid:
            request = Request(name, "xvda" if REQUESTS[name].takesPlug else None)
            snap = ObjectSnapshot(state, pending, plugState, front, count)
            self.assertEqual(
                checkPreconditions(request, snap, takeover),
                ladder(request, snap, takeover),
                (name, snap, takeover),
            )
