# -*- test-case-name: tests.test_backendctrl_requests,tests.test_driverdomain -*-
"""
The protocol's requests as one table (L{REQUESTS}): for each request, the
object states it is accepted in, the state after it, what its completion
writes or removes, whether it plugs or unplugs, which method of the
driver-domain kind performs it, and what it means for hotplug scripts.

Both sides read it: the toolstack client (what to write with a request and
tidy after it), the agent's request executor (how to perform it) and its
completion transaction (what to write with the result). L{checkPreconditions}
reads it too, so the two sides check the same rules (docs/protocol.md).
"""

from __future__ import annotations

from collections.abc import Mapping

import attrs

from xenddev.backendctrl.protocol import (
    ACTIVATE,
    ACTIVE,
    CHANGE,
    DEACTIVATE,
    INACTIVE,
    NAME_SYNTAX,
    NEW_TARGET_DIR,
    PAUSE,
    PLUG,
    PLUGGED,
    PREPARE,
    RELOAD,
    RESUME,
    TARGET_DIR,
    UNPLUG,
    UNPREPARE,
)

#: In L{RequestRule.acceptedIn}: the object is not prepared (no C{state}).
ABSENT = None
#: In L{RequestRule.acceptedIn}: any state of a prepared object.
ANY_STATE = "*"

#: L{RequestRule.plugEffect}: the completion makes the plug (C{state} =
#: C{ok}, C{backend}, C{b-copy/*}, the agent's device record).
PLUGS = "plugs"
#: L{RequestRule.plugEffect}: the completion removes the plug, its backend
#: directory and the agent's device record.
UNPLUGS = "unplugs"

#: L{RequestRule.hotplug}: once it succeeded, the add scripts of the
#: object's plugged devices may run (the object is active).
HOTPLUG_ADD = "add"
#: L{RequestRule.hotplug}: first the remove scripts of the object's plugged
#: devices; the completion clears their hotplug status and records; once it
#: succeeded, their add scripts run again (a new medium).
HOTPLUG_READD = "readd"
#: L{RequestRule.hotplug}: first the plug's remove script, so nothing is
#: removed from XenStore before it has run (seed 004's shutdown race).
HOTPLUG_REMOVE = "remove"

#: L{RequestRule.dataPath}: the data-path pauser's C{pause(dataPath)}.
PAUSER_PAUSE = "pause"
#: L{RequestRule.dataPath}: the data-path pauser's C{resume(dataPath, reload)}.
PAUSER_RESUME = "resume"

#: The refusal of a request on an object that is not prepared.
NOT_PREPARED = ("ENOENT", "not prepared")


@attrs.frozen
class RequestRule:
    """
    One request of the protocol.

    @ivar name: the request's name (C{plug} and C{unplug} take a plug name).
    @ivar acceptedIn: the object states it is accepted in: states,
        L{ABSENT} or L{ANY_STATE}.
    @ivar wrongState: C{(errname, message)} when the object is prepared
        but in a state not accepted; the message may name C{{op}} and
        C{{state}}. (Not prepared is always L{NOT_PREPARED}.)
    @ivar setsState: whether the completion sets the state ...
    @ivar stateAfter: ... to this (L{ABSENT}: C{state} removed, the
        object gone).
    @ivar plugEffect: L{PLUGS}, L{UNPLUGS} or None; a request with one
        names its plug (C{plug <vbd>}).
    @ivar refusedWithPlugs: refused (C{EBUSY}) while a plug is in state
        C{ok}.
    @ivar kindMethod: the method of the object's driver-domain kind that
        performs it (its L{Outcome} is applied by the completion), or None.
    @ivar kindLacks: for a method outside L{IDriverDomainKind}, offered by
        the kinds that provide an interface declaring it: the
        C{EOPNOTSUPP} message for a kind that does not, after "the <kind>
        kind".
    @ivar implies: a request performed first, with its effects in the same
        completion, when the object is in a state that request accepts
        (decision 5: unprepare deactivates an active object).
    @ivar input: the object's directory the toolstack writes with the
        request (L{TARGET_DIR}, L{NEW_TARGET_DIR}), emptied first; the
        object is served with that target after it.
    @ivar dataPath: the data-path pauser's method that performs it
        (L{PAUSER_PAUSE}, L{PAUSER_RESUME}), or None.
    @ivar reopensImage: with C{resume}: reopen the image first.
    @ivar hotplug: what it means for hotplug scripts (L{HOTPLUG_ADD},
        L{HOTPLUG_READD}, L{HOTPLUG_REMOVE}) besides its plug's own.
    @ivar fenced: it carries the activation's fencing token
        (L{TOKEN<xenddev.backendctrl.protocol.TOKEN>}), written by the
        toolstack with the request when a pool vouches for it; the agent
        refuses a token lower than one it served for the object's storage
        target before the kind is called, and the answer's transaction
        removes the node.
    """

    name: str
    acceptedIn: frozenset[str | None]
    wrongState: tuple[str, str] | None = None
    setsState: bool = False
    stateAfter: str | None = None
    plugEffect: str | None = None
    refusedWithPlugs: bool = False
    kindMethod: str | None = None
    kindLacks: str = ""
    implies: str | None = None
    input: str | None = None
    dataPath: str | None = None
    reopensImage: bool = False
    hotplug: str | None = None
    fenced: bool = False

    def __attrs_post_init__(self) -> None:
        # A rule that refuses some prepared state must say how.
        if ANY_STATE not in self.acceptedIn and self.wrongState is None:
            raise ValueError(f"request {self.name!r} refuses a state without saying how")

    def accepts(self, state: str | None) -> bool:
        """Whether the request is accepted with the object in C{state}."""
        if state is None:
            return ABSENT in self.acceptedIn
        return ANY_STATE in self.acceptedIn or state in self.acceptedIn

    def after(self, state: str | None) -> str | None:
        """The object's state after the request succeeded in C{state}."""
        return self.stateAfter if self.setsState else state

    @property
    def takesPlug(self) -> bool:
        """Whether the request names a plug (C{plug <vbd>}, C{unplug <vbd>})."""
        return self.plugEffect is not None

    @property
    def createsObject(self) -> bool:
        """Accepted only for an object that does not exist yet (prepare)."""
        return self.acceptedIn == frozenset({ABSENT})

    @property
    def removesObject(self) -> bool:
        """The object no longer exists after it (unprepare)."""
        return self.setsState and self.stateAfter is ABSENT

    @property
    def replacesTarget(self) -> bool:
        """
        Its input replaces the target (C{change}): the agent consumes C{n/}
        on success; the toolstack removes what a refusal left.
        """
        return self.input == NEW_TARGET_DIR


_PREPARED = frozenset({ANY_STATE})
_DATA_PATH_STATE = ("ENOTCONN", "cannot {op} in state {state}: only an active data path")

#: Every request of the protocol, by name (docs/protocol.md, "Requests").
REQUESTS: Mapping[str, RequestRule] = {
    rule.name: rule
    for rule in (
        RequestRule(
            PREPARE,
            frozenset({ABSENT}),
            ("EEXIST", "already prepared (state {state})"),
            setsState=True,
            stateAfter=INACTIVE,
            kindMethod="prepare",
            input=TARGET_DIR,
        ),
        RequestRule(
            ACTIVATE,
            frozenset({INACTIVE}),
            ("EISCONN", "cannot activate in state {state}"),
            setsState=True,
            stateAfter=ACTIVE,
            kindMethod="activate",
            hotplug=HOTPLUG_ADD,
            fenced=True,
        ),
        RequestRule(
            DEACTIVATE,
            frozenset({ACTIVE}),
            ("ENOTCONN", "cannot deactivate in state {state}"),
            setsState=True,
            stateAfter=INACTIVE,
            kindMethod="deactivate",
        ),
        RequestRule(
            UNPREPARE,
            _PREPARED,
            setsState=True,
            stateAfter=ABSENT,
            refusedWithPlugs=True,
            kindMethod="unprepare",
            implies=DEACTIVATE,
        ),
        RequestRule(PLUG, _PREPARED, plugEffect=PLUGS, kindMethod="plug"),
        RequestRule(
            UNPLUG, _PREPARED, plugEffect=UNPLUGS, kindMethod="unplug", hotplug=HOTPLUG_REMOVE
        ),
        RequestRule(
            CHANGE,
            _PREPARED,
            kindMethod="change",
            kindLacks="cannot change a target in place",
            input=NEW_TARGET_DIR,
            hotplug=HOTPLUG_READD,
        ),
        RequestRule(PAUSE, frozenset({ACTIVE}), _DATA_PATH_STATE, dataPath=PAUSER_PAUSE),
        RequestRule(RESUME, frozenset({ACTIVE}), _DATA_PATH_STATE, dataPath=PAUSER_RESUME),
        RequestRule(
            RELOAD, frozenset({ACTIVE}), _DATA_PATH_STATE, dataPath=PAUSER_RESUME, reopensImage=True
        ),
    )
}


@attrs.frozen
class Request:
    """
    A parsed C{request} value: C{prepare}, ..., or C{plug <vbd>}/C{unplug <vbd>}.
    """

    op: str
    plug: str | None = None

    @classmethod
    def parse(cls, text: str) -> Request:
        """
        Parse a request string.

        @raise ValueError: for anything that is not a known request.
        """
        op, _, arg = text.partition(" ")
        rule = REQUESTS.get(op)
        if rule is not None and not rule.takesPlug and not arg:
            return cls(op)
        if rule is not None and rule.takesPlug and arg and NAME_SYNTAX.match(arg):
            return cls(op, arg)
        raise ValueError(f"unknown request {text!r}")

    @property
    def rule(self) -> RequestRule:
        """What the request does (L{REQUESTS})."""
        return REQUESTS[self.op]

    def __str__(self) -> str:
        return self.op if self.plug is None else f"{self.op} {self.plug}"


@attrs.frozen
class ObjectSnapshot:
    """
    What the preconditions of a request look at, read in one transaction.

    @ivar state: the object's C{state}, or None (ENOENT).
    @ivar request: a pending C{request}, or None.
    @ivar plugState: for plug/unplug, C{<plug>/state} or None.
    @ivar frontendExists: for plug/unplug, whether C{<frontend>} exists.
    @ivar plugCount: how many plugs are in state C{ok}.
    """

    state: str | None
    request: str | None
    plugState: str | None = None
    frontendExists: bool = False
    plugCount: int = 0


def checkPreconditions(
    request: Request, snap: ObjectSnapshot, takeover: bool = False
) -> tuple[str, str] | None:
    """
    Check a request's preconditions (seed 000, with our decisions recorded
    in docs/protocol.md) by its rule. Both sides call this: the toolstack
    before writing anything, the agent before executing.

    @return: None if the request may proceed, else C{(errname, message)}.
    """
    if snap.request is not None:
        return "EBUSY", f"request {snap.request!r} is still being performed"
    rule = request.rule
    if not rule.accepts(snap.state):
        if snap.state is None:
            return NOT_PREPARED
        assert rule.wrongState is not None  # checked when the rule was made
        errname, message = rule.wrongState
        return errname, message.format(op=rule.name, state=snap.state)
    if rule.refusedWithPlugs and snap.plugCount:
        return "EBUSY", f"{snap.plugCount} plug(s) still present: unplug them first"
    if rule.plugEffect == PLUGS:
        if snap.plugState is not None:
            return "EEXIST", f"{request.plug} is already plugged"
        if snap.frontendExists and not takeover:
            return "EEXIST", "the frontend directory already exists"
    elif rule.plugEffect == UNPLUGS:
        if snap.plugState != PLUGGED:
            return "ENOENT", f"{request.plug} is not plugged"
        if snap.frontendExists:
            return "EBUSY", "the frontend directory still exists: remove it first"
    return None
