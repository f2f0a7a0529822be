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

In a pool (L{IPoolDataPaths}, given by the daemon's wiring with C{pool:}),
the same operations span the hosts: C{find} and C{scan} add what the other
hosts publish in etcd (each data path names its host), C{quiesce} pauses
this host's users of the image and then every other host's, through that
host's daemon (its local-only C{quiesceLocal}, so it never recurses), and
the one handle holds the peers' handles (L{RemoteHold}): resumed with it,
at its deadline too. A host failing in the middle fails the quiesce with
everything already paused resumed (the pool's error names the host). Each
peer's handle also expires on that peer, so a coordinator that dies leaves
nothing paused for longer than the peer's own C{timeouts.quiesce}.
C{coalesceImage} merges an image into its parent while every user of it,
on every host, is quiesced, and resumes them (with reload) whatever the
merge did.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Awaitable, Callable, Sequence
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
    "IPoolDataPaths",
    "IStorageControl",
    "MergeConflictError",
    "NoCoalesceError",
    "NoSuchDataPathError",
    "NothingToMergeError",
    "QuiesceBusyError",
    "RemoteHold",
    "RemoteResumeError",
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


class MergeConflictError(XenddevError):
    """
    The parent of the image to merge is also read by data paths that do
    not go through the image: merging would change what they read.
    """

    faultCode = FaultCode.DEVICE_EXISTS


class RemoteResumeError(XenddevError):
    """
    Other hosts' data paths of a handle could not be resumed (yet): the
    handle keeps them and is retried; each peer's own deadline resumes
    them too.
    """

    faultCode = FaultCode.DATAPATH_FAILED


@attrs.define
class RemoteHold:
    """
    Another host's quiesce handle, held by a pool-wide handle here.

    @ivar host: the host whose daemon holds it.
    @ivar handle: its handle id there.
    @ivar paused: the data paths it paused (each naming C{host}).
    @ivar deadline: when (this clock's seconds) that host resumes it by
        itself (its own C{timeouts.quiesce}).
    """

    host: str
    handle: str
    paused: list[DataPath]
    deadline: float


@attrs.define
class HeldQuiesce:
    """
    A quiesce handle the daemon keeps for a client.

    @ivar id: the handle id given to the client.
    @ivar handle: the lower layer's handle (the data paths still paused).
    @ivar deadline: when (clock seconds) it is resumed automatically.
    @ivar resumeFailures: failed resumes so far (client's or automatic).
    @ivar remote: the other hosts' handles it holds (a pool-wide quiesce).
    """

    id: str
    image: str
    handle: QuiesceHandle
    created: float
    deadline: float
    call: IDelayedCall | None = None
    resuming: bool = False
    resumeFailures: int = 0
    remote: list[RemoteHold] = attrs.Factory(list)

    @property
    def paused(self) -> list[DataPath]:
        """The data paths this handle still holds paused (other hosts' too)."""
        return [*self.handle.paused, *(dp for r in self.remote for dp in r.paused)]


class IPoolDataPaths(Interface):
    """
    The other hosts of a pool, as the storage control sees them
    (L{xenddev.pooldatapaths.PoolDataPaths}).
    """

    host = Attribute("This host's name in the pool.")

    def others(image=None, host=None):  # noqa: N805
        """
        Fire with the data paths the other hosts publish (those using
        C{image}; only C{host}'s), each naming its host.
        """

    def quiesce(image):  # noqa: N805
        """
        Pause the other hosts' users of C{image} through their daemons;
        fire with a L{RemoteHold} per host. If one host fails, the others
        are resumed and the error names the host.
        """

    def resume(holds, reload):  # noqa: N805
        """
        Resume the holds; fire with those still paused (never fails: a
        hold that could not be resumed is kept and logged).
        """


class IStorageControl(Interface):
    """Data-path operations offered to remote callers."""

    clock = Attribute("The IReactorTime the handles' deadlines are measured on.")

    def scan(host=None):  # noqa: N805
        """Fire with every registered data path (only C{host}'s)."""

    def find(image):  # noqa: N805
        """Fire with the data paths serving C{image} or reading it in a chain."""

    def get(driverDomid, vdi):  # noqa: N805
        """Fire with one data path; L{NoSuchDataPathError} if none."""

    def quiesce(image):  # noqa: N805
        """Pause every data path using C{image}; fire with a L{HeldQuiesce}."""

    def quiesceLocal(image):  # noqa: N805
        """L{quiesce} on this host only (what another host's pool-wide quiesce asks)."""

    def resume(handleId, reload):  # noqa: N805
        """Resume a handle's data paths; L{UnknownHandleError} if no such handle."""

    def handles():
        """The handles held now (a list of L{HeldQuiesce})."""

    def coalesce(driverDomid, vdi):  # noqa: N805
        """Merge the top of a data path's chain into its parent, live."""

    def coalesceImage(image):  # noqa: N805
        """Quiesce every user of C{image}, merge it into its parent, resume them."""

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
    @param pool: the other hosts of the pool (None: this host alone).
    @param merge: merges an image into its parent (C{coalesceImage});
        L{mergeIntoParent<xenddev.datapath.coalesce.mergeIntoParent>} by default.
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
        pool: IPoolDataPaths | None = None,
        merge: Callable[[str], Awaitable[Any]] | None = None,
    ) -> None:
        self.control = control
        self.pool = pool
        self._merge = merge
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

    def _here(self, dataPaths: Sequence[DataPath]) -> list[DataPath]:
        """This host's data paths, named by its pool host name in a pool."""
        if self.pool is None:
            return list(dataPaths)
        host = self.pool.host
        return [dp if dp.host == host else attrs.evolve(dp, host=host) for dp in dataPaths]

    def scan(self, host: str | None = None) -> Deferred[list[DataPath]]:
        """
        Every registered data path, in every driver domain (only those of
        C{host}); in a pool, the other hosts' too.
        """

        async def run() -> list[DataPath]:
            pool = self.pool
            if pool is None or host in (None, pool.host):
                here = self._here(await scanRegistry(self.control.xs))
                here = [dp for dp in here if host is None or dp.host == host]
            else:
                here = []
            if pool is None or host == pool.host:
                return here
            return here + list(await pool.others(None, host))

        return Deferred.fromCoroutine(run())

    def find(self, image: str) -> Deferred[list[DataPath]]:
        """
        The data paths serving C{image} or reading it in a backing chain;
        in a pool, on every host.
        """

        async def run() -> list[DataPath]:
            here = self._here(await self.control.find(image))
            if self.pool is None:
                return here
            return here + list(await self.pool.others(image, None))

        return Deferred.fromCoroutine(run())

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
        under a new handle, resumed automatically after L{bound} seconds;
        in a pool, on every host (the other hosts' handles held by this one).

        @raise QuiesceBusyError: a data path is held by another handle.
        @raise TooManyHandlesError: L{maxHandles} are held or being made.
        """
        return self._quiesceWhere(image, everywhere=True)

    def quiesceLocal(self, image: str) -> Deferred[HeldQuiesce]:
        """L{quiesce} of this host's data paths only (another host's pool-wide quiesce asks it)."""
        return self._quiesceWhere(image, everywhere=False)

    def _quiesceWhere(self, image: str, everywhere: bool) -> Deferred[HeldQuiesce]:
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
                return await self._quiesce(image, everywhere)
            finally:
                self._making -= 1

        self._making += 1
        return Deferred.fromCoroutine(run())

    async def _quiesce(self, image: str, everywhere: bool) -> HeldQuiesce:
        found = self._here(await self.control.find(image))
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
        remote: list[RemoteHold] = []
        if everywhere and self.pool is not None:
            try:
                remote = list(await self.pool.quiesce(image))
            except BaseException:
                await self._undo(hid, image, handle)
                raise
        now = self.clock.seconds()
        held = HeldQuiesce(hid, image, handle, now, now + self.bound, remote=remote)
        self._held[hid] = held
        self._arm(held)
        self.log.info(
            "Quiesced {image}: {n} data path(s) paused under handle {handle}{hosts} "
            "(resumed automatically after {bound:g}s)",
            image=image,
            n=len(held.paused),
            handle=hid,
            hosts="".join(f", {len(r.paused)} on host {r.host}" for r in remote),
            bound=self.bound,
        )
        return held

    async def _undo(self, hid: str, image: str, handle: QuiesceHandle) -> None:
        """
        Resume what this host paused for a quiesce that failed elsewhere; what
        cannot be resumed now is kept under the handle (resumed at its deadline).
        """
        try:
            await self.control.resume(handle, reload=False)
        except Exception as e:
            now = self.clock.seconds()
            held = HeldQuiesce(hid, image, handle, now, now + self.bound, resumeFailures=1)
            self._held[hid] = held
            self._release(held, keep=handle.paused)
            self._arm(held)
            self.log.error(
                "Quiesce of {image} failed on another host and {n} data path(s) here could "
                "not be resumed ({error}); kept under handle {handle}, retried in {bound:g}s",
                image=image,
                n=len(handle.paused),
                error=e,
                handle=hid,
                bound=self.bound,
            )
            return
        self._release(HeldQuiesce(hid, image, handle, 0.0, 0.0), keep=[])

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
            failure: BaseException | None = None
            try:
                await self.control.resume(held.handle, reload)
            except Exception as e:
                failure = e
            if held.remote:
                # The other hosts' too, even if this host's failed.
                assert self.pool is not None
                held.remote = list(await self.pool.resume(held.remote, reload))
                if held.remote and failure is None:
                    failure = RemoteResumeError(
                        "resume failed on host(s) "
                        + ", ".join(sorted({r.host for r in held.remote}))
                        + " (retried; each host also resumes at its own deadline)"
                    )
            if failure is not None:
                raise failure
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
                n=len(held.paused),
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

    def coalesceImage(self, image: str) -> Deferred[list[DataPath]]:
        """
        Merge C{image} into its parent while every data path reading it (in
        a pool: on every host) is quiesced, then resume them all with reload
        — also when the merge fails. Fires with the data paths that were
        paused.

        @raise MergeConflictError: the parent is also read by data paths
            that do not go through C{image} (nothing paused).
        @raise QuiesceBusyError: a user is held by another handle.
        @raise CoalesceError: the merge failed (the users were resumed).
        @raise ResumeError: merged, but some users are still paused (the
            handle is kept and retried).
        """

        async def run() -> list[DataPath]:
            users = await self.find(image)
            parent = _parentOf(image, users)
            if parent is not None:
                bypass = [dp for dp in await self.find(parent) if not dp.uses(image)]
                if bypass:
                    raise MergeConflictError(
                        f"cannot merge {image} into {parent}: the parent is also read by "
                        + ", ".join(
                            f"{dp.vdi} (host {dp.host}, domain {dp.driverDomid})" for dp in bypass
                        )
                        + ", whose data would change"
                    )
            merge = self._merge
            if merge is None:
                from xenddev.datapath.coalesce import mergeIntoParent

                def merge(path: str) -> Awaitable[Any]:
                    return mergeIntoParent(self.reactor, path, self.timeout)

            held = await self.quiesce(image)
            paused = held.paused
            try:
                await merge(image)
            except BaseException:
                try:
                    await self.resume(held.id, True)
                except Exception:
                    pass  # logged by _resume, retried at the handle's deadline
                raise
            await self.resume(held.id, True)
            self.log.info(
                "Coalesced {image}: merged into its parent with {n} data path(s) quiesced",
                image=image,
                n=len(paused),
            )
            return paused

        return Deferred.fromCoroutine(run())


def _parentOf(image: str, users: Sequence[DataPath]) -> str | None:
    """The image after C{image} in a user's chain (its parent), if any says."""
    want = os.path.realpath(image)
    for dp in users:
        chain = [os.path.realpath(i) for i in dp.images]
        if want in chain and chain.index(want) + 1 < len(chain):
            return dp.images[chain.index(want) + 1]
    return None


def _failed(error: BaseException) -> Deferred[Any]:
    d: Deferred[Any] = Deferred()
    d.errback(error)
    return d
