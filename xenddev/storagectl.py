# -*- test-case-name: tests.test_storagectl -*-
"""
The daemon's storage control (seed 002) for remote callers: the data paths
of L{xenddev.datapath} found, quiesced and resumed through I{handles} the
daemon keeps, and live coalesce where the data path's kind offers it.

A quiesce through XML-RPC spans two calls (C{datapath.quiesce}, then
C{datapath.resume}), and the client may die in between. So every handle
has a deadline (C{timeouts.quiesce}, 60 s by default): a handle not
resumed by then is resumed by the daemon (with reload: re-reading the
image chain is right whether or not the client merged anything) and a
warning is logged. A resume that fails keeps the handle with the data
paths still paused and arms the deadline again, so the daemon retries
until they are resumed or gone (a data path whose registry record has
disappeared — its VDI deactivated — is dropped, there is nothing left to
resume). At shutdown every handle is resumed.

Two quiesces may not hold the same data path: the second is refused
(L{QuiesceBusyError}) before anything is paused. Nor may more than
C{maxHandles} handles (C{limits.quiesce_handles}) be held, or being made,
at once: each costs the daemon a timer and a record until it is resumed
or its deadline passes (an unused image's quiesce pauses nothing but still
gets one), so one more is refused (L{TooManyHandlesError}) before anything
is looked up or paused.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from zope.interface import Attribute, Interface, implementer

from xenddev.backendctrl.records import DataPath, readRecord, scanRegistry
from xenddev.datapath.quiesce import DataPathControl, QuiesceHandle
from xenddev.errors import FaultCode, XenddevError

__all__ = [
    "DEFAULT_MAX_HANDLES",
    "DEFAULT_QUIESCE_BOUND",
    "HeldQuiesce",
    "IStorageControl",
    "NoCoalesceError",
    "NoSuchDataPathError",
    "NothingToMergeError",
    "QuiesceBusyError",
    "StorageControl",
    "TooManyHandlesError",
    "UnknownHandleError",
]

#: Seconds a quiesce handle may stay unresumed (config C{timeouts.quiesce}).
DEFAULT_QUIESCE_BOUND = 60.0
#: Quiesce handles held at once (config C{limits.quiesce_handles}).
DEFAULT_MAX_HANDLES = 64


class UnknownHandleError(XenddevError, LookupError):
    """No quiesce handle with that id (never issued, or already resumed)."""

    faultCode = FaultCode.NOT_FOUND


class NoSuchDataPathError(XenddevError, LookupError):
    """No data path is registered for that driver domain and VDI."""

    faultCode = FaultCode.NOT_FOUND


class QuiesceBusyError(XenddevError):
    """A data path the quiesce would pause is already held by another handle."""

    faultCode = FaultCode.DEVICE_EXISTS


class TooManyHandlesError(XenddevError):
    """As many quiesce handles as allowed are held already; resume one first."""

    faultCode = FaultCode.DEVICE_EXISTS


class NoCoalesceError(XenddevError):
    """The data path's kind cannot merge its chain live (quiesce, merge, resume instead)."""

    faultCode = FaultCode.UNSUPPORTED


class NothingToMergeError(XenddevError, ValueError):
    """The data path's image has no parent to merge into."""

    faultCode = FaultCode.BAD_CONFIG


@attrs.define
class HeldQuiesce:
    """
    A quiesce handle the daemon keeps for a client.

    @ivar id: the handle id given to the client.
    @ivar handle: the lower layer's handle (the data paths still paused).
    @ivar deadline: when (clock seconds) it is resumed automatically.
    @ivar resumeFailures: failed resumes so far (client's or automatic).
    """

    id: str
    image: str
    handle: QuiesceHandle
    created: float
    deadline: float
    call: IDelayedCall | None = None
    resuming: bool = False
    resumeFailures: int = 0

    @property
    def paused(self) -> list[DataPath]:
        """The data paths this handle still holds paused."""
        return list(self.handle.paused)


class IStorageControl(Interface):
    """Data-path operations offered to remote callers."""

    clock = Attribute("The IReactorTime the handles' deadlines are measured on.")

    def scan():
        """Fire with every registered data path."""

    def find(image):  # noqa: N805
        """Fire with the data paths serving C{image} or reading it in a chain."""

    def get(driverDomid, vdi):  # noqa: N805
        """Fire with one data path; L{NoSuchDataPathError} if none."""

    def quiesce(image):  # noqa: N805
        """Pause every data path using C{image}; fire with a L{HeldQuiesce}."""

    def resume(handleId, reload):  # noqa: N805
        """Resume a handle's data paths; L{UnknownHandleError} if no such handle."""

    def handles():
        """The handles held now (a list of L{HeldQuiesce})."""

    def coalesce(driverDomid, vdi):  # noqa: N805
        """Merge the top of a data path's chain into its parent, live."""

    def resumeAll():
        """Resume every handle (at shutdown)."""


@implementer(IStorageControl)
class StorageControl:
    """
    Data paths for remote callers, over a L{DataPathControl}.

    @param control: finds and pauses/resumes data paths (its pausers).
    @param reactor: for the QMP connections of a coalesce.
    @param bound: seconds before an unresumed handle is resumed.
    @param clock: schedules the deadlines (default: C{reactor}).
    @param timeout: seconds a coalesce may take.
    @param maxHandles: quiesce handles held (or being made) at once.
    """

    log = Logger()

    def __init__(
        self,
        control: DataPathControl,
        reactor: Any,
        bound: float = DEFAULT_QUIESCE_BOUND,
        clock: IReactorTime | None = None,
        timeout: float = 60.0,
        maxHandles: int = DEFAULT_MAX_HANDLES,
    ) -> None:
        self.control = control
        self.reactor = reactor
        self.bound = bound
        self.clock: IReactorTime = clock if clock is not None else reactor
        self.timeout = timeout
        self.maxHandles = maxHandles
        self._held: dict[str, HeldQuiesce] = {}
        #: Quiesces under way (counted against L{maxHandles} with the handles held).
        self._making = 0
        #: (driver domain, vdi) -> handle id, for every data path held or being paused.
        self._owners: dict[tuple[int, str], str] = {}

    # Finding

    def scan(self) -> Deferred[list[DataPath]]:
        """Every registered data path, in every driver domain."""
        return Deferred.fromCoroutine(scanRegistry(self.control.xs))

    def find(self, image: str) -> Deferred[list[DataPath]]:
        """The data paths serving C{image} or reading it in a backing chain."""
        return self.control.find(image)

    def get(self, driverDomid: int, vdi: str) -> Deferred[DataPath]:
        """One data path; L{NoSuchDataPathError} if that VDI has none."""

        async def read() -> DataPath:
            dp = await readRecord(self.control.xs, driverDomid, vdi)
            if dp is None:
                raise NoSuchDataPathError(
                    f"no data path registered for vdi {vdi!r} in domain {driverDomid} "
                    "(not active, or served by a kind without a data-path record)"
                )
            return dp

        return Deferred.fromCoroutine(read())

    # Quiesce handles

    def handles(self) -> list[HeldQuiesce]:
        """The handles held now, oldest first."""
        return sorted(self._held.values(), key=lambda h: h.created)

    def quiesce(self, image: str) -> Deferred[HeldQuiesce]:
        """
        Pause every data path using C{image} (all or none) and hold them
        under a new handle, resumed automatically after L{bound} seconds.

        @raise QuiesceBusyError: a data path is held by another handle.
        @raise TooManyHandlesError: L{maxHandles} are held or being made.
        """
        if len(self._held) + self._making >= self.maxHandles:
            return _failed(
                TooManyHandlesError(
                    f"{len(self._held) + self._making} quiesce handles are held or being made: "
                    f"the limit is {self.maxHandles} (limits.quiesce_handles); "
                    "resume one first (datapath.handles lists them)"
                )
            )

        async def run() -> HeldQuiesce:
            try:
                return await self._quiesce(image)
            finally:
                self._making -= 1

        self._making += 1
        return Deferred.fromCoroutine(run())

    async def _quiesce(self, image: str) -> HeldQuiesce:
        found = await self.control.find(image)
        hid = uuid.uuid4().hex
        keys = [(dp.driverDomid, dp.vdi) for dp in found]
        for key in keys:
            other = self._owners.get(key)
            if other is not None:
                raise QuiesceBusyError(
                    f"vdi {key[1]!r} of domain {key[0]} is already quiesced "
                    f"by handle {other}; resume that first"
                )
        for key in keys:
            self._owners[key] = hid
        try:
            handle = await self.control.pauseAll(image, found)
        except BaseException:
            for key in keys:
                self._owners.pop(key, None)
            raise
        now = self.clock.seconds()
        held = HeldQuiesce(hid, image, handle, now, now + self.bound)
        self._held[hid] = held
        self._arm(held)
        self.log.info(
            "Quiesced {image}: {n} data path(s) paused under handle {handle} "
            "(resumed automatically after {bound:g}s)",
            image=image,
            n=len(handle.paused),
            handle=hid,
            bound=self.bound,
        )
        return held

    def resume(self, handleId: str, reload: bool = True) -> Deferred[HeldQuiesce]:
        """
        Resume the data paths of a handle (with C{reload}: re-read their
        image chains) and forget it; fire with it.

        @raise UnknownHandleError: no such handle.
        @raise QuiesceBusyError: it is being resumed already.
        @raise ResumeError: some could not be resumed; the handle is kept
            with those (retry), and resumed automatically again later.
        """
        held = self._held.get(handleId)
        if held is None:
            return _failed(
                UnknownHandleError(f"no quiesce handle {handleId!r} (never issued, or resumed)")
            )
        if held.resuming:
            return _failed(QuiesceBusyError(f"quiesce handle {handleId} is being resumed"))
        return Deferred.fromCoroutine(self._resume(held, reload))

    async def _resume(self, held: HeldQuiesce, reload: bool) -> HeldQuiesce:
        held.resuming = True
        if held.call is not None and held.call.active():
            held.call.cancel()
        held.call = None
        try:
            await self._dropVanished(held)
            await self.control.resume(held.handle, reload)
        except BaseException as e:
            held.resumeFailures += 1
            held.deadline = self.clock.seconds() + self.bound
            self._arm(held)
            self._release(held, keep=held.handle.paused)
            self.log.error(
                "Resume of quiesce handle {handle} ({image}) failed: {error}; "
                "{n} data path(s) still paused, retried in {bound:g}s",
                handle=held.id,
                image=held.image,
                error=e,
                n=len(held.handle.paused),
                bound=self.bound,
            )
            raise
        finally:
            held.resuming = False
        self._release(held, keep=[])
        del self._held[held.id]
        return held

    async def _dropVanished(self, held: HeldQuiesce) -> None:
        """Forget data paths whose record is gone (their VDI was deactivated)."""
        kept = []
        for dp in held.handle.paused:
            current = await readRecord(self.control.xs, dp.driverDomid, dp.vdi)
            if current is None or current.pid != dp.pid:
                self.log.info(
                    "Data path {vdi} of domain {domid} is gone; nothing to resume",
                    vdi=dp.vdi,
                    domid=dp.driverDomid,
                )
            else:
                kept.append(dp)
        held.handle.paused = kept

    def _release(self, held: HeldQuiesce, keep: Sequence[DataPath]) -> None:
        kept = {(dp.driverDomid, dp.vdi) for dp in keep}
        for key, owner in list(self._owners.items()):
            if owner == held.id and key not in kept:
                del self._owners[key]

    def _arm(self, held: HeldQuiesce) -> None:
        delay = max(0.0, held.deadline - self.clock.seconds())
        held.call = self.clock.callLater(delay, self._expire, held.id)

    def _expire(self, handleId: str) -> None:
        held = self._held.get(handleId)
        if held is None or held.resuming:
            return
        held.call = None
        self.log.warn(
            "Quiesce handle {handle} of {image} was not resumed within {bound:g}s "
            "(did the client die?); resuming its {n} data path(s) now",
            handle=handleId,
            image=held.image,
            bound=self.bound,
            n=len(held.handle.paused),
        )
        d = Deferred.fromCoroutine(self._resume(held, True))
        d.addErrback(lambda f: None)  # logged by _resume, retried later

    def resumeAll(self) -> Deferred[None]:
        """Resume every handle now (at shutdown); failures are logged."""

        async def run() -> None:
            for held in self.handles():
                if held.resuming:
                    continue
                try:
                    await self._resume(held, True)
                except Exception:
                    pass  # logged by _resume
                if held.call is not None and held.call.active():
                    held.call.cancel()  # no retry after shutdown

        return Deferred.fromCoroutine(run())

    # Coalesce

    def coalesce(self, driverDomid: int, vdi: str) -> Deferred[DataPath]:
        """
        Merge the top image of a data path's chain into its parent while
        it keeps serving (qemu data paths: QMP block-commit); fire with the
        updated record.

        @raise NoSuchDataPathError: no data path for that VDI.
        @raise NoCoalesceError: its kind cannot merge live.
        @raise QuiesceBusyError: it is held by a quiesce handle.
        @raise NothingToMergeError: its image has no parent.
        @raise CoalesceError: the merge failed (the chain is still served unmerged).
        """
        from xenddev.datapath.coalesce import coalesceQemu

        async def run() -> DataPath:
            dp = await self.get(driverDomid, vdi)
            if dp.qmp is None:
                raise NoCoalesceError(
                    f"data path {vdi!r} of domain {driverDomid} is served by kind "
                    f"{dp.kind!r}, which cannot merge its chain live; quiesce the image, "
                    "merge it offline (e.g. vhd-util coalesce) and resume"
                )
            owner = self._owners.get((driverDomid, vdi))
            if owner is not None:
                raise QuiesceBusyError(f"vdi {vdi!r} is quiesced by handle {owner}")
            if len(dp.chain) < 2:
                raise NothingToMergeError(
                    f"data path {vdi!r} of domain {driverDomid}: {dp.image} has no parent "
                    "to merge into"
                )
            return await coalesceQemu(self.reactor, self.control.xs, dp, self.timeout)

        return Deferred.fromCoroutine(run())


def _failed(error: BaseException) -> Deferred[Any]:
    d: Deferred[Any] = Deferred()
    d.errback(error)
    return d
