"""
The FLOOR of bench/attach.py: a vbd attached and detached with the bare
XenStore client, no framework.

Both sides of the backendctrl protocol are played here with nothing but
L{XenStoreClient} calls and a little in-memory bookkeeping:

  - L{FloorToolstack} (the bench process) does, per device, the steps of
    C{DevController.createDevice} and C{destroyDevice};
  - L{FloorAgent} (a process of its own, as the real agent) answers the
    requests and reports C{hotplug-status} the way C{BackendCtrlAgent} does
    without a hotplug runner.

The simulated backend and frontends are the same in both runs.

What "the same XenStore operations" means here: the same protocol steps,
each in the same transaction as in the framework, with the same writes,
removes, C{mkdir}s and permissions in the guest's, the toolstack's and the
protocol's nodes (the benchmark checks that the whole tree after an attach
is the framework's, and after a detach as before), and the same waits on
the same nodes. The floor agent is minimal: it keeps no journal and no
records of its own (the framework's agent keeps both under
C{/local/domain/0/private}, for its restarts; the tree check leaves that
directory out). Reads are only those a step needs the answer of: the
duplicate check of the reservation, each answer's C{result}, the plug's
C{backend} and C{b-copy}, the target (once, at prepare), the plug's
C{frontend}, and the node a wait is about, once per watch event for it
(the request node until it is gone, C{hotplug-status}, the backend
C{state} until InitWait or Closed), the record's C{backend} at detach, and
a listing wherever a now-empty parent directory is pruned. Not done:
precondition snapshots, re-reading what was written, per-wait watches
(each side keeps one standing watch per tree and dispatches its events by
path).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs
from twisted.internet.defer import Deferred, gatherResults
from twisted.logger import Logger

from xenddev.diskspec import numberToVdev
from xenddev.interfaces import ITransaction
from xenddev.xenstore.client import XenStoreClient
from xenddev.xenstore.paths import Perm

log = Logger()

DRIVER_DOMID = 0
HOME = f"/local/domain/{DRIVER_DOMID}"
CONTROL = f"{HOME}/backendctrl/vdi"
BACKENDS = f"{HOME}/backend"
#: The agent's own records: the framework's agent keeps some, the floor's none.
PRIVATE = f"{HOME}/private"
PLUG = "p0"

#: vbd target keys, in the order the toolstack writes them.
TARGET_KEYS = ("type", "params", "format", "mode", "devtype")


class FloorError(Exception):
    """A floor step failed (a bug in the benchmark, or a store problem)."""


def vdevLetters(index: int) -> str:
    """Bijective base-26 drive letters: 0 -> a, 1 -> b, 26 -> aa."""
    letters = []
    n = index + 1
    while n > 0:
        n, rest = divmod(n - 1, 26)
        letters.append(chr(ord("a") + rest))
    return "".join(reversed(letters))


def vdevNumber(index: int) -> int:
    """The xvd device number of disk C{index} (no partition)."""
    if index < 16:
        return (202 << 8) | (index << 4)
    return (1 << 28) | (index << 8)


@attrs.frozen
class Disk:
    """One vbd of the benchmark: guest, disk index, image."""

    domid: int
    index: int
    image: str

    @property
    def vdev(self) -> str:
        return f"xvd{vdevLetters(self.index)}"

    @property
    def devid(self) -> int:
        return vdevNumber(self.index)

    @property
    def spec(self) -> str:
        """The xl disk spec the framework is given."""
        return f"{self.image},raw,{self.vdev},r"

    @property
    def name(self) -> str:
        """The vdi's name in the driver domain's control area."""
        return f"vbd-{self.domid}-{self.devid}"

    @property
    def frontend(self) -> str:
        return f"/local/domain/{self.domid}/device/vbd/{self.devid}"


def diskTarget(disk: Disk) -> dict[str, str]:
    """The C{t/*} the framework derives from the disk's spec (checked by the benchmark)."""
    return {"type": "file", "params": disk.image, "format": "raw", "mode": "r", "devtype": "disk"}


def recordConfig(disk: Disk) -> dict[str, str]:
    """The C{config/*} the framework records (checked by the benchmark)."""
    return {
        "dev": disk.vdev,
        "uname": f"file:{disk.image}",
        "mode": "r",
        "format": "raw",
        "backend": str(DRIVER_DOMID),
        "backend-kind": "tapdisk2",  # the seed-003 choice; the driver domain uses blkback
    }


def _parent(path: str) -> str:
    return path.rsplit("/", 1)[0]


async def _pruned(tx: ITransaction, path: str) -> None:
    """Remove C{path}; remove its parent too if that is left empty."""
    parent = _parent(path)
    await tx.rm(path, missingOk=True)
    if not await tx.ls(parent):
        await tx.rm(parent)


class _Dispatch:
    """
    One standing watch on a tree; a wait registers for one exact path and
    reads the node on each event for it (level-triggered: xenstored drops
    an event identical to one still queued for the connection, so events
    cannot be counted), until the value satisfies the wait.
    """

    def __init__(self, xs: XenStoreClient) -> None:
        self.xs = xs
        self._waits: dict[str, Callable[[], None]] = {}

    def event(self, path: str) -> None:
        check = self._waits.get(path)
        if check is not None:
            check()

    def until(self, path: str, predicate: Callable[[str | None], bool]) -> Deferred[str | None]:
        """
        Fires with the value of C{path} once an event for it is followed by a
        read satisfying C{predicate}. Register before the change is made.
        """
        if path in self._waits:
            raise FloorError(f"two waits on {path}")

        def cancel(_: Deferred[str | None]) -> None:
            self._waits.pop(path, None)

        d: Deferred[str | None] = Deferred(cancel)

        def check() -> None:
            def value(v: str | None) -> None:
                if not d.called and predicate(v):
                    self._waits.pop(path, None)
                    d.callback(v)

            def failed(f: Any) -> None:
                if not d.called:
                    self._waits.pop(path, None)
                    d.errback(f)

            self.xs.readOrNone(path).addCallbacks(value, failed)

        self._waits[path] = check
        return d


class FloorToolstack:
    """
    The toolstack's half of the floor.

    @param xs: the toolstack's connection.
    @param vmPaths: each guest's C{/vm/<uuid>} (the bare script registered
        the guests, so it knows them).
    """

    def __init__(self, xs: XenStoreClient, vmPaths: Mapping[int, str]) -> None:
        self.xs = xs
        self.vmPaths = vmPaths
        self._control = _Dispatch(xs)
        self._backends = _Dispatch(xs)

    async def start(self) -> None:
        """The two standing watches (their registration events are ignored)."""
        await self.xs.watch(CONTROL, self._control.event)
        await self.xs.watch(BACKENDS, self._backends.event)

    def _record(self, disk: Disk) -> str:
        return f"{self.vmPaths[disk.domid]}/device/vbd/{disk.devid}"

    async def _request(
        self,
        disk: Disk,
        request: str,
        writes: Mapping[str, str] | None = None,
        reads: Sequence[str] = (),
        removeObject: bool = False,
    ) -> list[str | None]:
        """
        Write C{request} (and C{writes}) in one transaction, wait for the
        agent to delete it, then read and remove C{result} in one
        transaction, with C{reads} in the same round. Returns the values of
        C{reads}.
        """
        base = f"{CONTROL}/{disk.name}"
        node = f"{base}/request"
        answered = self._control.until(node, lambda v: v is None)
        items = [*(writes or {}).items(), (node, request)]
        # The object's directory is made before, and removed after, the
        # transactions, as the framework makes it: a transaction adding or
        # removing a child of backendctrl/vdi conflicts with every other one
        # that does (the framework removes it inside its last collect
        # transaction; see the benchmark's report).
        made = self.xs.mkdir(base) if request == "prepare" else None

        def submit(tx: ITransaction) -> Deferred[Any]:
            return gatherResults([tx.write(p, v) for p, v in items])

        try:
            await self.xs.transact(submit)
            await answered
        finally:
            if not answered.called:
                answered.cancel()
            if made is not None:
                await made

        async def collect(tx: ITransaction) -> list[str | None]:
            # Sent in this order: the read is answered before the remove runs.
            result = tx.read(f"{base}/result")
            remove = tx.rm(f"{base}/result")
            values = await gatherResults([result, remove, *[tx.readOrNone(p) for p in reads]])
            if values[0] != "0":
                raise FloorError(f"{request} on {base}: result {values[0]}")
            return list(values[2:])

        out: list[str | None] = await self.xs.transact(collect)
        if removeObject:
            await self.xs.rm(base)
        return out

    async def attach(self, disk: Disk) -> str:
        """Create the vbd; fires with its backend path once connected."""
        xs = self.xs
        record = self._record(disk)
        values = {
            "frontend": disk.frontend,
            "frontend-id": str(disk.domid),
            "backend-id": str(DRIVER_DOMID),
            "vdi": disk.name,
            **{f"config/{k}": v for k, v in recordConfig(disk).items()},
        }

        async def reserve(tx: ITransaction) -> None:
            if await tx.exists(record):
                raise FloorError(f"{record} exists")
            await gatherResults([tx.write(f"{record}/{k}", v) for k, v in values.items()])

        await xs.transact(reserve)
        base = f"{CONTROL}/{disk.name}"
        target = diskTarget(disk)
        await self._request(disk, "prepare", {f"{base}/t/{k}": target[k] for k in TARGET_KEYS})
        plug = f"{base}/vbd/{PLUG}"
        relative, _bcopy = await self._request(
            disk,
            f"plug {PLUG}",
            {f"{plug}/frontend": disk.frontend},
            reads=(f"{plug}/backend", f"{plug}/b-copy"),
        )
        if relative is None:
            raise FloorError(f"no backend for {plug}")
        backend = f"{HOME}/{relative}"
        front = disk.frontend
        frontValues = {
            "backend": backend,
            "backend-id": str(DRIVER_DOMID),
            "state": "1",
            "virtual-device": str(disk.devid),
            "device-type": "disk",
            "trusted": "1",
        }

        def frontend(tx: ITransaction) -> Deferred[Any]:
            return gatherResults(
                [
                    tx.mkdir(front),
                    tx.setPerms(front, [Perm("n", disk.domid), Perm("r", DRIVER_DOMID)]),
                    *[tx.write(f"{front}/{k}", v) for k, v in frontValues.items()],
                    tx.write(f"{record}/backend", backend),
                    # The change that binds a kernel backend, made while the
                    # frontend exists (docs/protocol.md).
                    tx.write(f"{backend}/frontend", front),
                ]
            )

        await xs.transact(frontend)
        status = f"{backend}/hotplug-status"
        reported = self._backends.until(status, lambda v: v is not None)
        try:
            await self._request(disk, "activate")
            value = await reported
        finally:
            if not reported.called:
                reported.cancel()
        if value != "connected":
            raise FloorError(f"{status} = {value!r}")
        return backend

    async def detach(self, disk: Disk) -> None:
        """Destroy the vbd (the guest closes it)."""
        xs = self.xs
        record = self._record(disk)
        backend = await xs.read(f"{record}/backend")
        closed = self._backends.until(f"{backend}/state", lambda v: v == "6")

        def close(tx: ITransaction) -> Deferred[Any]:
            return gatherResults(
                [tx.write(f"{backend}/online", "0"), tx.write(f"{backend}/state", "5")]
            )

        try:
            await xs.transact(close)
            await closed
        finally:
            if not closed.called:
                closed.cancel()
        await xs.transact(lambda tx: _pruned(tx, disk.frontend))
        await self._request(disk, f"unplug {PLUG}")
        await self._request(disk, "deactivate")
        await self._request(disk, "unprepare", removeObject=True)
        # The record, its class directory and <vm>/device while empty, as
        # the framework's _removeRecord does.
        await xs.transact(lambda tx: _prunedTwice(tx, record))


@attrs.define
class _Object:
    """What the floor agent remembers of one vdi."""

    target: dict[str, str]
    backend: str | None = None
    active: bool = False
    reported: bool = False
    reporting: bool = False
    again: bool = False


class FloorAgent:
    """
    The driver domain's half of the floor, a minimal agent: it answers each
    request with one completion transaction (the request's effects, C{state},
    C{result}, the request deleted) and reports C{hotplug-status=connected}
    once an active object's backend is in InitWait. It keeps what it needs
    in memory: no journal and no records of its own in XenStore (the
    framework's agent keeps both, for its restarts).
    """

    def __init__(self, xs: XenStoreClient) -> None:
        self.xs = xs
        self._objects: dict[str, _Object] = {}
        self._byBackend: dict[str, str] = {}
        self._serving: dict[str, bool] = {}
        self._pending: set[Deferred[Any]] = set()
        self.served = 0

    async def start(self) -> None:
        await self.xs.watch(CONTROL, self._controlEvent)
        await self.xs.watch(BACKENDS, self._backendEvent)

    def idle(self) -> bool:
        return not self._pending

    def _spawn(self, coro: Any, what: str) -> None:
        d: Deferred[Any] = Deferred.fromCoroutine(coro)
        self._pending.add(d)

        def failed(f: Any) -> None:
            log.failure("floor agent: {what} failed", f, what=what)

        d.addErrback(failed)
        d.addBoth(lambda _: self._pending.discard(d))

    # Requests

    def _controlEvent(self, path: str) -> None:
        # Level-triggered: every event on a request node means "read it
        # again"; one reader per object at a time, and one more read if an
        # event came meanwhile (so a request is never executed twice).
        if not path.endswith("/request"):
            return
        if path in self._serving:
            self._serving[path] = True
            return
        self._serving[path] = False
        self._spawn(self._serveLoop(path), path)

    async def _serveLoop(self, node: str) -> None:
        try:
            while True:
                try:
                    await self._serve(node)
                except Exception:
                    log.failure("floor agent: {node} failed", node=node)
                    await self._fail(node)
                if not self._serving[node]:
                    return
                self._serving[node] = False
        finally:
            del self._serving[node]

    async def _fail(self, node: str) -> None:
        """Answer a request that could not be executed with EIO."""
        base = _parent(node)

        async def answer(tx: ITransaction) -> None:
            if await tx.readOrNone(node) is not None:
                await gatherResults([tx.write(f"{base}/result", "5"), tx.rm(node)])

        await self.xs.transact(answer)

    async def _serve(self, node: str) -> None:
        xs = self.xs
        text = await xs.readOrNone(node)
        if text is None:
            return
        self.served += 1
        base = _parent(node)
        name = base.rsplit("/", 1)[1]
        obj = self._objects.get(name)
        writes: dict[str, str] = {}
        removes: list[str] = []
        prune: list[str] = []
        before: Callable[[ITransaction], list[Deferred[Any]]] = lambda tx: []  # noqa: E731
        if text == "prepare":
            read = await gatherResults([xs.read(f"{base}/t/{k}") for k in TARGET_KEYS])
            target = dict(zip(TARGET_KEYS, read, strict=True))
            _checkImage(target["params"])
            obj = self._objects[name] = _Object(target)
            writes = {f"{base}/state": "inactive"}
        elif obj is None:
            raise FloorError(f"{text!r} for unknown {name}")
        elif text == f"plug {PLUG}":
            front = await xs.read(f"{base}/vbd/{PLUG}/frontend")
            parts = front.split("/")  # /local/domain/<d>/device/vbd/<devid>
            domu, devid = int(parts[3]), int(parts[6])
            relative = f"backend/vbd/{domu}/{devid}"
            backend = obj.backend = f"{HOME}/{relative}"
            self._byBackend[backend] = name
            t = obj.target
            values = {
                "frontend-id": str(domu),
                "dev": numberToVdev(devid),
                "online": "1",
                "state": "1",
                "removable": "0",
                "bootable": "1",
                "type": t["type"],
                "params": t["params"],
                "mode": t["mode"],
                "device-type": t["devtype"],
                "script": "block",
            }
            perms = [Perm("n", DRIVER_DOMID), Perm("r", domu)]

            def before(tx: ITransaction) -> list[Deferred[Any]]:
                return [tx.mkdir(backend), tx.setPerms(backend, perms)]

            writes = {f"{backend}/{k}": v for k, v in values.items()}
            writes[f"{base}/vbd/{PLUG}/state"] = "ok"
            writes[f"{base}/vbd/{PLUG}/backend"] = relative
        elif text == "activate":
            writes = {f"{base}/state": "active"}
        elif text == "deactivate":
            writes = {f"{base}/state": "inactive"}
        elif text == f"unplug {PLUG}":
            assert obj.backend is not None
            removes = [f"{base}/vbd/{PLUG}/state", f"{base}/vbd/{PLUG}/backend"]
            prune = [obj.backend]
            self._byBackend.pop(obj.backend, None)
        elif text == "unprepare":
            removes = [f"{base}/state"]
            del self._objects[name]
        else:
            raise FloorError(f"unexpected request {text!r}")
        writes[f"{base}/result"] = "0"

        async def complete(tx: ITransaction) -> None:
            await gatherResults(
                [
                    *before(tx),
                    *[tx.write(p, v) for p, v in writes.items()],
                    *[tx.rm(p, missingOk=True) for p in removes],
                    tx.rm(node),
                    *[Deferred.fromCoroutine(_prunedTwice(tx, p)) for p in prune],
                ]
            )

        await xs.transact(complete)
        if text == "activate":
            obj.active = True
            self._spawn(self._maybeReport(name), f"hotplug of {name}")

    # Hotplug-status without a hotplug runner

    def _backendEvent(self, path: str) -> None:
        if not path.endswith("/state"):
            return
        name = self._byBackend.get(_parent(path))
        if name is not None:
            obj = self._objects[name]
            if obj.active and not obj.reported:
                self._spawn(self._maybeReport(name), path)

    async def _maybeReport(self, name: str) -> None:
        obj = self._objects.get(name)
        if obj is None or obj.reported or obj.backend is None:
            return
        if obj.reporting:
            obj.again = True  # look once more when the running check ends
            return
        obj.reporting = True
        try:
            backend = obj.backend
            while True:
                obj.again = False
                if await self.xs.readOrNone(f"{backend}/state") == "2":
                    await self.xs.transact(
                        lambda tx: tx.write(f"{backend}/hotplug-status", "connected")
                    )
                    obj.reported = True
                    return
                if not obj.again:
                    return
        finally:
            obj.reporting = False


async def _prunedTwice(tx: ITransaction, path: str) -> None:
    """Remove C{path}, then its parent and grandparent while they are empty."""
    await tx.rm(path, missingOk=True)
    parent = _parent(path)
    for _ in range(2):
        if await tx.ls(parent):
            return
        await tx.rm(parent)
        parent = _parent(parent)


def _checkImage(path: str) -> None:
    """What blkback's prepare checks: the target is a regular file."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise FloorError(f"{path}: {e}") from None
    if not stat.S_ISREG(st.st_mode):
        raise FloorError(f"{path} is not a regular file")
