# -*- test-case-name: tests.test_localguard -*-
"""
One host's activation guard (L{IActivationGuard}): the same image attached
read-write to two guests is refused before anything is written (issue 13,
finding 9), as the block script refuses it on a real host, with xend's
C{w!} as the explicit override.

The rules are the block script's (C{check_sharing}), per guest:

  - a guest never conflicts with itself (the script's C{same_vm});
  - read-write (C{w}) is refused while another guest uses the target in
    any mode;
  - read-only (C{r}) is refused while another guest has it read-write;
  - shared write (C{w!}) is never refused, and counts as a user for a
    later read-write attach.

The state is what the toolstack's records hold: each device's record keeps
its grant (L{xenddev.toolstack.activation}), read back at start
(L{LocalGuard.start}), so a restarted daemon refuses what it refused
before. In between, the grants are kept in memory, so an attach costs no
XenStore round trip here, and are taken and given back with the attaches
and detaches (rollbacks included: they go through the detach). A holder
whose guest is gone (its home removed by C{xl destroy} or a crash, with no
detach) does not count: a conflict is checked against XenStore before it
is reported, by the reaper's rule for a dead guest.

A target is named by what it is (L{normaliseTarget}: a block device by
its numbers, a file by its real path) when the driver domain is dom0 and
the path exists; otherwise as written (a driver domain's paths are its
own to resolve, and a missing path is refused by the driver domain).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.logger import Logger
from zope.interface import implementer

from xenddev.interfaces import IActivationGuard, IXenStoreOps
from xenddev.pool.errors import ActivationConflict, InvalidTarget
from xenddev.pool.keys import checkTarget, normaliseTarget
from xenddev.toolstack.activation import (
    RO,
    RW,
    SHARED,
    Claim,
    Grant,
    Mode,
    hostDevices,
    recordedGrants,
)
from xenddev.xenbus import domainPath

__all__ = ["LocalActivationConflict", "LocalGuard", "excludes", "targetIdentity"]

_WORDS = {RW: "read-write", RO: "read-only", SHARED: "shared-write (w!)"}


def targetIdentity(
    path: str, local: bool = True, normalise: Callable[[str], str] = normaliseTarget
) -> str:
    """
    The identity of the target C{path} names (a path, C{file:PATH} or
    C{dev:MAJOR:MINOR}): what it is when C{local} and it exists, else the
    path as written, normalised. A relative path names a device under
    C{/dev/}, as in xl's disk specs.

    @raise InvalidTarget: for what can name nothing (C{dev:x}, a NUL).
    """
    if path.startswith("dev:") or "\0" in path:
        return checkTarget(path)
    bare = path.removeprefix("file:")
    if not os.path.isabs(bare):
        bare = "/dev/" + bare
    bare = os.path.normpath(bare)
    if local:
        try:
            return normalise(bare)
        except InvalidTarget:
            pass  # missing (or neither file nor device): named as written
    return checkTarget("file:" + bare)


def excludes(wanted: Mode, domid: int, held: Grant) -> bool:
    """Whether C{held} (a grant of another guest or this one) refuses C{wanted} for C{domid}."""
    if held.domid == domid or wanted == SHARED:
        return False
    return wanted == RW or held.mode == RW


class LocalActivationConflict(ActivationConflict):
    """
    The target is attached on this host to another guest in a mode that
    excludes the request.

    @ivar holders: the grants in the way.
    """

    def __init__(self, target: str, host: str, wanted: Mode, holders: Sequence[Grant]) -> None:
        writing = any(g.mode == RW for g in holders)
        super().__init__(target, host if writing else None, () if writing else (host,), 0)
        self.holders = tuple(holders)
        users = "; ".join(
            f"domain {g.domid} ({g.device}, {_WORDS[g.mode]})"
            for g in sorted(holders, key=lambda g: (g.domid, g.record))
        )
        advice = (
            "attach it read-only, or with mode w! to share it writable"
            if wanted == RW
            else "attach it with mode w! to share it anyway"
        )
        self.args = (
            f"{target} is in use on host {host} by {users}: a {_WORDS[wanted]} attach "
            f"is refused ({advice})",
        )


@implementer(IActivationGuard)
class LocalGuard:
    """
    The activation guard of one host (see the module docstring).

    @param xs: the toolstack's XenStore connection (its records).
    @param host: this host's name, for messages and C{where}.
    @param normalise: names an existing path by what it is (tests inject one).
    """

    log = Logger()

    def __init__(
        self,
        xs: IXenStoreOps,
        host: str,
        normalise: Callable[[str], str] = normaliseTarget,
    ) -> None:
        self.xs = xs
        self.host = host
        self._normalise = normalise
        #: target -> record -> grant
        self._grants: dict[str, dict[str, Grant]] = {}

    def identify(self, path: str, backendDomid: int = 0) -> str:
        """The identity of a target path served by C{backendDomid}."""
        return targetIdentity(path, backendDomid == 0, self._normalise)

    def grants(self, target: str | None = None) -> list[Grant]:
        """The grants held (of C{target} only, if given), by target, guest and record."""
        chosen = [target] if target is not None else sorted(self._grants)
        return [
            grant
            for t in chosen
            for grant in sorted(self._grants.get(t, {}).values(), key=lambda g: (g.domid, g.record))
        ]

    def start(self) -> Deferred[int]:
        """
        Take the grants the toolstack's records hold (at start, before the
        rollbacks, which give back theirs); fires with how many.
        """

        async def start() -> int:
            found = await recordedGrants(self.xs)
            for grant in found:
                self.hold(grant)
            self.log.info(
                "Activations: {n} held by the devices in the toolstack's records", n=len(found)
            )
            return len(found)

        return Deferred.fromCoroutine(start())

    def acquire(self, claim: Claim) -> Deferred[Grant]:
        """
        Grant C{claim} unless another guest's use of its target excludes
        it (L{LocalActivationConflict}, naming them).
        """
        try:
            target = self.identify(claim.path, claim.backendDomid)
        except InvalidTarget as e:
            d: Deferred[Grant] = Deferred()
            d.errback(e)
            return d
        return Deferred.fromCoroutine(self._acquire(claim, target))

    async def _acquire(self, claim: Claim, target: str) -> Grant:
        checked: set[int] = set()
        while True:
            # Decided and taken in one reactor turn: two attaches racing for
            # one target cannot both find it free.
            blocking = [g for g in self.grants(target) if excludes(claim.mode, claim.domid, g)]
            if not blocking:
                grant = Grant(target, claim.mode, claim.domid, claim.record, claim.device)
                self.hold(grant)
                return grant
            unchecked = sorted({g.domid for g in blocking} - checked)
            if not unchecked:
                raise LocalActivationConflict(target, self.host, claim.mode, blocking)
            alive = await gatherResults(
                [self.xs.exists(domainPath(d)) for d in unchecked], consumeErrors=True
            )
            for domid, there in zip(unchecked, alive, strict=True):
                checked.add(domid)
                if not there:
                    self._dropGuest(domid)

    def release(self, grant: Grant) -> Deferred[None]:
        """Forget the grant of C{grant}'s device (nothing if it holds none)."""
        held = self._grants.get(grant.target, {})
        held.pop(grant.record, None)
        if not held:
            self._grants.pop(grant.target, None)
        return succeed(None)

    def where(self, target: str) -> Deferred[dict[str, Any]]:
        """Who holds C{target} on this host, as plain data."""
        try:
            identity = self.identify(target)
        except InvalidTarget as e:
            d: Deferred[dict[str, Any]] = Deferred()
            d.errback(e)
            return d
        grants = self.grants(identity)
        me = {"host": self.host, "token": 0}
        return succeed(
            {
                "target": identity,
                "writer": {**me, "mode": RW} if any(g.mode == RW for g in grants) else None,
                "readers": [{**me, "mode": RO}] if any(g.mode == RO for g in grants) else [],
                "devices": self.devices(identity),
            }
        )

    def devices(self, target: str) -> list[dict[str, Any]]:
        """This host's devices holding C{target}, as plain data."""
        return [
            {
                "host": self.host,
                "domain": g.domid,
                "device": g.device,
                "mode": g.mode,
                "token": g.token,
            }
            for g in self.grants(target)
        ]

    def hosts(self) -> Deferred[list[dict[str, Any]]]:
        """This host alone (there is no pool), with its guests' devices."""

        async def hosts() -> list[dict[str, Any]]:
            devices = await hostDevices(self.xs, self.grants())
            return [
                {"name": self.host, "state": "single host", "pid": os.getpid(), "devices": devices}
            ]

        return Deferred.fromCoroutine(hosts())

    def hold(self, grant: Grant) -> None:
        """Keep C{grant} as its device's (replacing what that device held of its target)."""
        self._grants.setdefault(grant.target, {})[grant.record] = grant

    def _dropGuest(self, domid: int) -> None:
        """Forget the grants of a guest whose home is gone."""
        for grant in [g for g in self.grants() if g.domid == domid]:
            self.log.info(
                "Activation of {target} by domain {domid} ({device}) dropped: the domain is gone",
                target=grant.target,
                domid=domid,
                device=grant.device,
            )
            self.release(grant)
