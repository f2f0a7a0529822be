# -*- test-case-name: tests.test_datapath -*-
"""
Quiesce and resume every data path that reads an image (seed 002).

L{DataPathControl} finds the data paths in the registry and pauses each
through the L{IDataPathPauser} registered for its kind: L{QemuPauser}
(QMP; see L{xenddev.datapath.qemu} for what "pause" means for a
qemu-storage-daemon) for C{qemu}, L{TapPauser} (C{tap-ctl pause} /
C{unpause -a} through an C{ITapCtl}) for C{tap}; L{standardPausers} builds
both. Pausers are injected, so tests can use stand-ins.

All data paths are paused concurrently. If any pause fails, every one that
was paused is resumed (without reload: nothing changed) before
L{QuiesceError} is raised, so a failed quiesce leaves nothing paused.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from inspect import isawaitable
from typing import Any

import attrs
from twisted.internet.defer import Deferred, gatherResults
from twisted.logger import Logger
from zope.interface import Interface, implementer

from xenddev.backendctrl.records import DataPath, findDataPaths, holdPath
from xenddev.datapath import qemu as graph
from xenddev.errors import FaultCode, XenddevError
from xenddev.interfaces import ITapCtl
from xenddev.qmp import connectQMP


class IDataPathPauser(Interface):
    """Pauses and resumes the data paths of one kind."""

    def pause(dataPath):  # noqa: N805 (zope.interface: no self)
        """Stop all I/O of C{dataPath} (a L{DataPath}); fires when stopped."""

    def resume(dataPath, reload):  # noqa: N805
        """Let I/O flow again; with C{reload}, re-read the image chain first."""


class QuiesceError(XenddevError):
    """
    A quiesce failed; everything it had paused was resumed.

    @ivar failures: (data path, exception) for each pause that failed.
    @ivar resumeFailures: (data path, exception) for each undo that failed
        (those data paths may still be paused).
    """

    faultCode = FaultCode.DATAPATH_FAILED

    def __init__(
        self,
        failures: list[tuple[DataPath, BaseException]],
        resumeFailures: list[tuple[DataPath, BaseException]],
    ) -> None:
        self.failures = failures
        self.resumeFailures = resumeFailures
        text = "; ".join(f"{dp.driverDomid}/{dp.vdi}: {e}" for dp, e in failures)
        super().__init__(f"quiesce failed: {text}")


class ResumeError(XenddevError):
    """
    Some data paths could not be resumed; L{handle} lists them, so the
    caller may retry with it.
    """

    faultCode = FaultCode.DATAPATH_FAILED

    def __init__(self, handle: QuiesceHandle, failures: list[tuple[DataPath, BaseException]]):
        self.handle = handle
        self.failures = failures
        text = "; ".join(f"{dp.driverDomid}/{dp.vdi}: {e}" for dp, e in failures)
        super().__init__(f"resume failed: {text}")


@attrs.define
class QuiesceHandle:
    """The data paths a quiesce paused (and that resume must unpause)."""

    target: str
    paused: list[DataPath]


class NoPauserError(XenddevError):
    """A data path's kind has no pauser registered."""

    faultCode = FaultCode.UNSUPPORTED


class DataPathControl:
    """
    Finds data paths and pauses/resumes them.

    @param xs: a XenStore connection that can read every driver domain's
        registry (dom0's).
    @param pausers: kind name -> L{IDataPathPauser}.
    @param host: only data paths on this host (None: all).
    """

    log = Logger()

    def __init__(
        self, xs: Any, pausers: Mapping[str, IDataPathPauser], host: str | None = None
    ) -> None:
        self.xs = xs
        self.pausers = dict(pausers)
        self.host = host

    def register(self, kind: str, pauser: IDataPathPauser) -> None:
        """Register (or replace) the pauser of a kind."""
        self.pausers[kind] = pauser

    def find(self, target: str) -> Deferred[list[DataPath]]:
        """Every data path serving C{target} or reading it in a chain."""
        return Deferred.fromCoroutine(findDataPaths(self.xs, target, self.host))

    def _pauser(self, dp: DataPath) -> IDataPathPauser:
        pauser = self.pausers.get(dp.kind)
        if pauser is None:
            raise NoPauserError(f"no pauser for data paths of kind {dp.kind!r}")
        return pauser

    def quiesce(self, target: str) -> Deferred[QuiesceHandle]:
        """Pause every data path using C{target}; fire with the handle."""

        async def run() -> QuiesceHandle:
            found = await findDataPaths(self.xs, target, self.host)
            return await self.pauseAll(target, found)

        return Deferred.fromCoroutine(run())

    async def pauseAll(self, target: str, dataPaths: Sequence[DataPath]) -> QuiesceHandle:
        """Pause the given data paths (all or, on failure, none)."""
        for dp in dataPaths:
            self._pauser(dp)  # refuse before pausing anything

        # Held before pausing, so that a reactivation racing with the pause
        # (a domain unpause) leaves the data path paused.
        await self._hold(dataPaths, target)
        results = await gatherResults([_settle(self._pauser(dp).pause, dp) for dp in dataPaths])
        paused = [dp for dp, (ok, _) in zip(dataPaths, results, strict=True) if ok]
        failures = [(dp, err) for dp, (ok, err) in zip(dataPaths, results, strict=True) if not ok]
        if not failures:
            return QuiesceHandle(target, paused)
        await self._release([dp for dp, _ in failures])
        self.log.warn(
            "Quiesce of {target} failed on {n} data path(s); resuming {m}",
            target=target,
            n=len(failures),
            m=len(paused),
        )
        undo = await gatherResults([_settle(self._pauser(dp).resume, dp, False) for dp in paused])
        resumeFailures = [(dp, err) for dp, (ok, err) in zip(paused, undo, strict=True) if not ok]
        await self._release([dp for dp, (ok, _) in zip(paused, undo, strict=True) if ok])
        raise QuiesceError(failures, resumeFailures)

    def _hold(self, dataPaths: Sequence[DataPath], target: str) -> Deferred[Any]:
        return gatherResults(
            [self.xs.write(holdPath(dp.driverDomid, dp.vdi), target) for dp in dataPaths]
        )

    def _release(self, dataPaths: Sequence[DataPath]) -> Deferred[Any]:
        return gatherResults(
            [self.xs.rm(holdPath(dp.driverDomid, dp.vdi), missingOk=True) for dp in dataPaths]
        )

    def resume(self, handle: QuiesceHandle, reload: bool = True) -> Deferred[None]:
        """
        Resume everything the handle paused (concurrently). On failure the
        handle keeps only those that failed, and L{ResumeError} says which.
        """

        async def run() -> None:
            paused = list(handle.paused)
            results = await gatherResults(
                [_settle(self._pauser(dp).resume, dp, reload) for dp in paused]
            )
            failures = [(dp, err) for dp, (ok, err) in zip(paused, results, strict=True) if not ok]
            await self._release([dp for dp, (ok, _) in zip(paused, results, strict=True) if ok])
            handle.paused = [dp for dp, _ in failures]
            if failures:
                raise ResumeError(handle, failures)

        return Deferred.fromCoroutine(run())


def _settle(fn: Any, *args: Any) -> Deferred[tuple[bool, Any]]:
    """
    Call C{fn(*args)}: (True, result) or (False, exception), whether it
    raises, returns a failed Deferred or an awaitable; never fails.
    """

    async def call() -> Any:
        result = fn(*args)
        return await result if isawaitable(result) else result

    return Deferred.fromCoroutine(call()).addCallbacks(
        lambda r: (True, r), lambda f: (False, f.value)
    )


@implementer(IDataPathPauser)
class QemuPauser:
    """
    Pauses a qemu-storage-daemon data path over its control QMP socket:
    export deleted and graph closed (I/O drained, images and locks
    released), then reopened from the image headers and exported again.
    """

    def __init__(self, reactor: Any, timeout: float = 30.0) -> None:
        self.reactor = reactor
        self.timeout = timeout
        self._closed: dict[tuple[int, str], tuple[str, str]] = {}

    def pause(self, dataPath: DataPath) -> Deferred[None]:
        """Delete the export and close the graph."""

        async def run() -> None:
            assert dataPath.qmp is not None, "a qemu data path records its QMP socket"
            qmp = await connectQMP(self.reactor, dataPath.qmp, self.timeout)
            try:
                served = await graph.closeGraph(qmp, self.timeout)
            finally:
                await qmp.close()
            key = (dataPath.driverDomid, dataPath.vdi)
            self._closed[key] = served or (dataPath.image, dataPath.format)

        return Deferred.fromCoroutine(run())

    def resume(self, dataPath: DataPath, reload: bool = True) -> Deferred[None]:
        """Reopen the graph (re-reading the chain) and export it again."""

        async def run() -> None:
            assert dataPath.qmp is not None
            key = (dataPath.driverDomid, dataPath.vdi)
            image, fmt = self._closed.get(key, (dataPath.image, dataPath.format))
            writable = dataPath.extra.get("writable", "1") == "1"
            qmp = await connectQMP(self.reactor, dataPath.qmp, self.timeout)
            try:
                if await graph.exportedNode(qmp) is None:
                    if not await graph.hasNode(qmp, graph.ROOT_NODE):
                        await graph.openGraph(qmp, image, fmt, not writable)
                    await graph.addExport(
                        qmp, graph.ROOT_NODE, dataPath.extra.get("export", dataPath.vdi), writable
                    )
            finally:
                await qmp.close()
            self._closed.pop(key, None)

        return Deferred.fromCoroutine(run())


@implementer(IDataPathPauser)
class TapPauser:
    """
    Pauses a tapdisk data path with C{tap-ctl}: C{pause -p <pid> -m <minor>}
    (tapdisk drains its in-flight requests and stops reading the ring);
    resume is C{unpause -p -m}, with reload C{unpause -a <type>:<image>},
    which makes tapdisk close and reopen the image (and so re-read its
    chain) before it serves again.

    @param tapctl: the tapdisk control for every driver domain not in
        C{byDomain}.
    @param byDomain: driver domain id -> its tapdisk control (tapdisks are
        reached through the C{tap-ctl} of the domain they run in).
    """

    def __init__(self, tapctl: ITapCtl, byDomain: Mapping[int, ITapCtl] | None = None) -> None:
        self.tapctl = tapctl
        self.byDomain = dict(byDomain or {})

    def _run(self, dataPath: DataPath, command: str, *args: Any) -> Deferred[None]:
        async def run() -> None:
            if dataPath.pid is None or dataPath.minor is None:
                raise ValueError(f"{dataPath.vdi}: a tap data path records its pid and minor")
            tapctl: Any = self.byDomain.get(dataPath.driverDomid, self.tapctl)
            await getattr(tapctl, command)(dataPath.pid, dataPath.minor, *args)

        return Deferred.fromCoroutine(run())

    def pause(self, dataPath: DataPath) -> Deferred[None]:
        """C{tap-ctl pause -p <pid> -m <minor>}."""
        return self._run(dataPath, "pause")

    def resume(self, dataPath: DataPath, reload: bool = True) -> Deferred[None]:
        """C{tap-ctl unpause -p <pid> -m <minor>} (with C{-a <type>:<image>} to reload)."""
        args = None
        if reload:
            args = f"{dataPath.extra.get('type', dataPath.format)}:{dataPath.image}"
        return self._run(dataPath, "unpause", args)


def standardPausers(
    reactor: Any, tapctl: ITapCtl | None = None, timeout: float = 30.0
) -> dict[str, IDataPathPauser]:
    """
    The pausers of the kinds that register data paths: C{qemu}
    (L{QemuPauser}) and C{tap} (L{TapPauser} over C{tapctl}, by default the
    C{tap-ctl} on the PATH).
    """
    if tapctl is None:
        from xenddev.tapctl import TapCtl

        tapctl = TapCtl(reactor=reactor)
    return {"qemu": QemuPauser(reactor, timeout), "tap": TapPauser(tapctl)}
