# -*- test-case-name: tests.test_poolguard -*-
"""
A pool host's self-fence, on the data paths it serves.

When the host's session can no longer vouch for its lease (its renewals
failed until the self-fence deadline, or the daemon stalled past it),
L{DataPathFence.fence} pauses every data path of the registry (seed 002:
a tapdisk through C{tap-ctl pause}, a qemu-storage-daemon's export
deleted and its graph closed), each on its own so one that fails leaves
none of the others running, before the lease can expire and another host
take their targets. Each pause writes its hold
(C{private/xenddev/quiesced/<vdi>}), so a reactivation does not unpause
it meanwhile.

When renewals work again on the same lease, nobody else can have taken
the targets: L{recover} resumes what the fence paused. When the lease was
lost, L{lost} keeps them paused — for good: a later fence skips them and
no recovery resumes them — and says which; they are given back by a
detach.

Devices with no registered data path (blkback over a file or a block
device: the kernel serves them, and there is no pause to ask it for)
cannot be fenced this way; each fence says so.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred, DeferredLock, gatherResults
from twisted.logger import Logger

from xenddev.backendctrl.records import DataPath, scanRegistry
from xenddev.datapath.quiesce import DataPathControl, QuiesceHandle

__all__ = ["FENCE_HOLD", "DataPathFence"]

#: The value of the holds the fence writes (who paused the data path).
FENCE_HOLD = "(pool self-fence)"

_Key = tuple[int, str]


def _key(dp: DataPath) -> _Key:
    return (dp.driverDomid, dp.vdi)


def _names(paths: list[DataPath]) -> str:
    return ", ".join(f"{dp.vdi} ({dp.kind}, domain {dp.driverDomid})" for dp in paths) or "none"


class DataPathFence:
    """
    Pauses and resumes the data paths of this host for its pool session
    (its C{onFence}, C{onRecover} and C{onLost} callbacks).

    @param control: finds, pauses and resumes data paths (the daemon's).
    @ivar paused: the data paths the fence holds paused now.
    @ivar kept: the data paths kept paused for good (their lease was lost).
    """

    log = Logger()

    def __init__(self, control: DataPathControl) -> None:
        self.control = control
        self._handles: dict[_Key, QuiesceHandle] = {}
        self._kept: dict[_Key, DataPath] = {}
        # Fence, recovery and loss follow each other; never interleaved.
        self._lock = DeferredLock()

    @property
    def paused(self) -> list[DataPath]:
        """The data paths this fence holds paused now."""
        return [dp for handle in self._handles.values() for dp in handle.paused]

    @property
    def kept(self) -> list[DataPath]:
        """The data paths kept paused because their lease was lost."""
        return list(self._kept.values())

    def fence(self) -> Deferred[None]:
        """Pause every registered data path not paused by the fence yet."""
        return self._lock.run(lambda: Deferred.fromCoroutine(self._fence()))

    def recover(self) -> Deferred[None]:
        """Resume what the fence paused (the lease survived)."""
        return self._lock.run(lambda: Deferred.fromCoroutine(self._recover()))

    def lost(self, keys: frozenset[bytes]) -> Deferred[None]:
        """Keep what the fence paused paused for good, and say so (the lease is gone)."""
        return self._lock.run(lambda: Deferred.fromCoroutine(self._lost(keys)))

    async def _fence(self) -> None:
        found = await scanRegistry(self.control.xs)
        # A kept data path whose device was detached since (its record is
        # gone, or another process serves its name now) is not kept any more.
        current = {_key(dp): dp for dp in found}
        self._kept = {k: dp for k, dp in self._kept.items() if current.get(k) == dp}
        todo = [dp for dp in found if _key(dp) not in self._handles and _key(dp) not in self._kept]
        outcomes = await gatherResults(
            [Deferred.fromCoroutine(self._pause(dp)) for dp in todo], consumeErrors=True
        )
        failed = [(dp, why) for dp, why in zip(todo, outcomes, strict=True) if why is not None]
        self.log.error(
            "Self-fence: {n} data path(s) paused ({names}){failures}; devices without a "
            "data path (blkback over a file or block device) cannot be paused and keep running",
            n=len(todo) - len(failed),
            names=_names([dp for dp in todo if _key(dp) in self._handles]),
            failures="".join(f"; {dp.vdi} NOT paused: {why}" for dp, why in failed),
        )

    async def _pause(self, dp: DataPath) -> str | None:
        """Pause one data path; None, or why it could not be."""
        try:
            self._handles[_key(dp)] = await self.control.pauseAll(FENCE_HOLD, [dp])
        except Exception as e:
            return str(e)
        return None

    async def _recover(self) -> None:
        handles, self._handles = self._handles, {}
        failed = []
        for key, handle in handles.items():
            try:
                await self.control.resume(handle, reload=False)
            except Exception as e:
                failed.append(f"{key[1]}: {e}")
        self.log.warn(
            "Self-fence lifted (the lease survived): {n} data path(s) resumed{failures}",
            n=len(handles) - len(failed),
            failures="".join(f"; NOT resumed: {f}" for f in failed),
        )

    async def _lost(self, keys: frozenset[bytes]) -> None:
        for key, handle in self._handles.items():
            for dp in handle.paused:
                self._kept[key] = dp
        self._handles = {}
        self.log.error(
            "Pool lease lost ({n} key(s)): the data paths the fence paused stay paused and "
            "are not resumed: {names}; detach their devices",
            n=len(keys),
            names=_names(self.kept),
        )
