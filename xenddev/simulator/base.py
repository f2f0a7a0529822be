# -*- test-case-name: tests.test_simulator -*-
"""
The engine shared by the SIMULATED backend and frontend drivers.

There is no hypervisor on the machines xenddev is developed and tested on,
so no kernel backend (blkback, netback) and no guest frontend exists to
answer the toolstack in XenStore. The simulators play those parts. This
module holds what both ends do alike:

  - one watch on the tree of device directories of one domain, plus, per
    device, one watch on the other end's C{state} node (as a real driver
    watches its "otherend");
  - steps: every event only I{pokes} a device; a step reads the device and
    the other end's state in one transaction, lets the subclass decide on
    at most one transition from what it read and from what the driver
    remembers of the device (its I{memory}: a kernel driver keeps its own
    state in C{struct xenbus_device}), and writes it in the same
    transaction; the memory is kept only once the transaction committed.
    At most one step per device runs at a time; a poke during a step makes
    exactly one more step follow, and so does a step that changed
    something;
  - no resurrection: a step first checks that the device directory exists,
    inside the transaction. If the directory is removed before the commit,
    xenstored refuses the commit (EAGAIN), the step is retried, finds the
    directory gone and writes nothing;
  - a full rescan at start and whenever an event concerns something above
    the device level (the registration event of the watch, the removal of a
    whole class or domain directory), so a restarted simulator carries on
    from what XenStore says.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar

import attrs
from twisted.internet.defer import Deferred, DeferredList, gatherResults
from twisted.logger import Logger
from twisted.python.failure import Failure

from xenddev.interfaces import ITransaction, IWatchHandle, IXenStore
from xenddev.xenbus import XenbusPathError, XenbusState
from xenddev.xenstore.errors import InvalidPathError, XenStoreConnectionLost
from xenddev.xenstore.paths import joinPath, validateNodeName, validatePath

__all__ = [
    "DeviceView",
    "Transition",
    "XenbusEndSimulator",
    "settleSimulators",
]


@attrs.frozen
class DeviceView:
    """
    What one step of a simulated driver sees of one device, read in one
    transaction.

    @ivar path: the device directory.
    @ivar devclass: its device class (C{vbd}, C{vif}, ...).
    @ivar values: the device's own keys that were read (C{None}: absent).
    @ivar state: the device's own C{state}, parsed (C{None}: absent/garbage).
    @ivar otherendPath: the other end's directory as named by the device
        (C{frontend} or C{backend} key), if it names a valid path.
    @ivar otherendState: the other end's C{state}, parsed.
    @ivar otherendSeen: whether this simulator has seen the other end's
        C{state} exist since the device was (re)initialised; lets "absent"
        be told apart from "not written yet".
    @ivar otherendExists: whether the other end's directory exists (read in
        the same transaction).
    """

    path: str
    devclass: str
    values: Mapping[str, str | None]
    state: XenbusState | None
    otherendPath: str | None
    otherendState: XenbusState | None
    otherendSeen: bool = False
    otherendExists: bool = False

    def get(self, key: str) -> str | None:
        """The value of one of the device's own keys, or C{None}."""
        return self.values.get(key)


@attrs.frozen
class Transition:
    """
    A decision to write C{state} into the device's C{state} node (C{None}:
    leave it alone), writing C{writes} (keys of the device directory) and
    C{elsewhere} (absolute paths: what a kernel driver writes outside its
    device, e.g. C{xenbus_dev_error}'s error node) and removing C{removes}
    (keys of the device directory) in the same transaction.
    """

    state: XenbusState | None
    reason: str
    writes: Mapping[str, str] = attrs.field(factory=dict)
    elsewhere: Mapping[str, str] = attrs.field(factory=dict)
    removes: Sequence[str] = ()


@attrs.frozen
class _StepResult:
    gone: bool
    view: DeviceView | None = None
    transition: Transition | None = None
    memory: Any = None


class _Device:
    """What a simulator remembers of one device between steps."""

    def __init__(self, path: str, devclass: str) -> None:
        self.path = path
        self.devclass = devclass
        self.running: Deferred[None] | None = None
        self.again = False
        self.otherendPath: str | None = None
        self.otherendSeen = False
        self.watch: IWatchHandle | None = None
        self.watchPath: str | None = None
        #: What the driver remembers of the device after its last step
        #: (C{None}: no step yet); see L{XenbusEndSimulator.decideStep}.
        self.memory: Any = None
        #: Whether the scan at start found it (a restarted simulator
        #: adopts such devices: see L{XenbusEndSimulator.freshMemory}).
        self.adopt = False


class XenbusEndSimulator:
    """
    Base class of the SIMULATED xenbus drivers, stand-ins for kernel
    backends and guest frontends because no hypervisor is present (see the
    module docstring).

    Subclasses set L{role}, L{otherendKey}, L{depth}, L{triggerKeys}, and
    implement L{deviceClassOf}, L{readKeys}, L{banner} and either L{decide}
    (a driver whose only memory is the state it saw last) or
    L{decideStep} and L{freshMemory}.

    @ivar xs: the XenStore connection.
    @ivar root: the watched directory holding the device tree.
    @ivar classes: the device classes served.
    """

    log = Logger()

    #: "backend" or "frontend", for log messages.
    role: ClassVar[str] = "?"
    #: The key of a device directory naming the other end's directory.
    otherendKey: ClassVar[str] = "?"
    #: Path components from L{root} to a device directory.
    depth: ClassVar[int] = 0
    #: Keys of a device directory whose change may enable a transition;
    #: changes of other keys (features we write ourselves, ring
    #: references) cause no step.
    triggerKeys: ClassVar[frozenset[str]] = frozenset({"state"})

    def __init__(self, xs: IXenStore, root: str, classes: Iterable[str]) -> None:
        self.xs = xs
        self.root = validatePath(root)
        self.classes: tuple[str, ...] = tuple(validateNodeName(c) for c in classes)
        if not self.classes:
            raise ValueError("a simulator needs at least one device class")
        self._active = False
        self._watch: IWatchHandle | None = None
        self._devices: dict[str, _Device] = {}
        self._pending: set[Deferred[Any]] = set()
        self._rescanning: Deferred[None] | None = None
        self._rescanAgain = False
        # Whether the next scan is the first since start() (see freshMemory).
        self._adopting = False
        # Work done (steps, scans, watch changes), and how much of it the
        # last settle() had seen: see settle().
        self._work = 0
        self._workSettled = 0

    # Subclass interface

    def banner(self) -> str:
        """The line logged at start, saying clearly what is simulated."""
        raise NotImplementedError()

    def deviceClassOf(self, path: str) -> str | None:
        """The device class if C{path} is a device directory we serve, else C{None}."""
        raise NotImplementedError()

    def readKeys(self, devclass: str) -> tuple[str, ...]:
        """The device keys a step reads (C{state} and L{otherendKey} included)."""
        raise NotImplementedError()

    def decide(self, view: DeviceView) -> Transition | None:
        """The transition to make now, or C{None}. Must not touch the store."""
        raise NotImplementedError()

    def freshMemory(self, view: DeviceView, adopt: bool) -> Any:
        """
        The memory of a device before its first step. C{adopt}: the device
        was found by the scan at start, so a driver may have been serving
        it already (a restarted simulator carries on from XenStore). By
        default C{None}.
        """
        return None

    def decideStep(self, view: DeviceView, memory: Any) -> tuple[Transition | None, Any]:
        """
        The transition to make now (or C{None}) and the memory to keep if
        it commits, from C{view} and the device's C{memory} (as returned
        by the previous step, or L{freshMemory}). Must not touch the store.

        By default L{decide}, remembering the device's resulting state.
        """
        transition = self.decide(view)
        if transition is not None and transition.state is not None:
            return transition, transition.state
        return transition, view.state

    def reactsTo(self, memory: Any, key: Sequence[str]) -> bool:
        """
        Whether a change of C{key} (path components below the device
        directory; empty for the directory itself) makes a device whose
        memory is C{memory} (C{None}: never stepped) take a step. By
        default: the directory itself and the L{triggerKeys}.
        """
        return not key or (len(key) == 1 and key[0] in self.triggerKeys)

    def watchesOtherend(self, memory: Any) -> bool:
        """
        Whether a device whose memory is C{memory} watches its other end's
        C{state} (a real driver does once it is bound to the device).
        """
        return True

    # Life cycle

    @property
    def running(self) -> bool:
        """Whether the simulator is started (and not stopped)."""
        return self._active

    @property
    def devicePaths(self) -> list[str]:
        """The device directories currently tracked, sorted."""
        return sorted(self._devices)

    def start(self) -> Deferred[None]:
        """
        Register the tree watch and scan the devices already there; fires
        when the scan has poked every existing device (their first steps
        may still be running: see L{settle}).
        """
        if self._active:
            raise RuntimeError(f"{self!r} is already running")
        return Deferred.fromCoroutine(self._start())

    async def _start(self) -> None:
        self.log.info("{banner}", banner=self.banner())
        self._active = True
        try:
            handle = await self.xs.watch(self.root, self._treeEvent)
        except BaseException:
            self._active = False
            raise
        if not self._active:
            # stop() was called while the watch was being registered.
            await handle.stop()
            return
        self._watch = handle
        self._adopting = True
        self._requestRescan()
        if self._rescanning is not None:
            await self._rescanning

    def stop(self) -> Deferred[None]:
        """
        Stop reacting: remove every watch, then wait for the steps already
        running to finish (each is one transaction; none starts afterwards).
        Leaves no watch and no timer behind. Idempotent.
        """
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        wasActive = self._active
        self._active = False
        if self._watch is not None:
            self._track(self._watch.stop(), "removing the tree watch")
            self._watch = None
        for dev in list(self._devices.values()):
            self._dropWatch(dev)
        await self._drain()
        self._devices.clear()
        if wasActive:
            self.log.info("Simulated {role} for {root} stopped", role=self.role, root=self.root)

    async def _drain(self) -> None:
        while self._pending:
            await DeferredList(list(self._pending))

    def settle(self) -> Deferred[bool]:
        """
        Wait until this simulator has reacted to everything the store has
        told it so far: a round trip on its connection (xenstored queues
        the watch events of earlier changes before that reply), then every
        step, scan and watch registration started meanwhile.

        Fires with C{True} if this simulator did any work since the previous
        C{settle()}, so that callers running several simulators can repeat
        until a whole round is idle (see L{settleSimulators}).
        """
        return Deferred.fromCoroutine(self._settle())

    async def _settle(self) -> bool:
        await self.xs.exists("/")
        await self._drain()
        # Work finished since the last settle() counts too: it may have
        # written something another simulator has not reacted to yet.
        busy = self._work != self._workSettled
        self._workSettled = self._work
        return busy

    # Events

    def _treeEvent(self, path: str) -> None:
        if not self._active:
            return
        if path == self.root or not path.startswith(self.root + "/"):
            # Registration (or re-registration after a reconnect: events may
            # have been missed) or the whole tree went away.
            self._requestRescan()
            return
        rel = path[len(self.root) + 1 :].split("/")
        if rel[0] not in self.classes:
            return
        if len(rel) < self.depth:
            # A class or domain directory appeared or was removed.
            self._requestRescan()
            return
        devPath = "/".join([self.root, *rel[: self.depth]])
        devclass = self.deviceClassOf(devPath)
        if devclass is None:
            return
        key = rel[self.depth :]
        known = self._devices.get(devPath)
        if self.reactsTo(known.memory if known is not None else None, key):
            self.poke(devPath, devclass)

    def poke(self, path: str, devclass: str) -> None:
        """
        Make the device at C{path} take a step soon (or one more step after
        the running one). Does nothing unless started.
        """
        if not self._active:
            return
        dev = self._devices.get(path)
        if dev is None:
            dev = self._devices[path] = _Device(path, devclass)
        dev.again = True
        if dev.running is None:
            dev.running = self._track(Deferred.fromCoroutine(self._drive(dev)), f"driving {path}")

    async def _drive(self, dev: _Device) -> None:
        try:
            while dev.again and self._active:
                dev.again = False
                self._work += 1
                try:
                    result: _StepResult = await self.xs.transact(lambda tx: self._step(tx, dev))
                except XenStoreConnectionLost:
                    # Whether it committed is unknown. A reconnecting store
                    # fires our tree watch again, and the rescan pokes every
                    # device; a plain connection is dead anyway.
                    self.log.warn(
                        "Simulated {role}: connection lost during a step of {path}",
                        role=self.role,
                        path=dev.path,
                    )
                    return
                if result.gone:
                    if dev.again:
                        # Poked during the step: perhaps re-created already.
                        continue
                    self._forget(dev)
                    return
                changed = result.memory != dev.memory
                self._observe(dev, result)
                if result.transition is not None or changed:
                    # Take the next step at once instead of relying on the
                    # event of our own write: chains of skipped states then
                    # do not depend on event timing.
                    dev.again = True
        finally:
            dev.running = None

    async def _step(self, tx: ITransaction, dev: _Device) -> _StepResult:
        # Existence is checked inside the transaction: see the module
        # docstring on resurrection.
        if not await tx.exists(dev.path):
            return _StepResult(gone=True)
        keys = self.readKeys(dev.devclass)
        raw = await gatherResults(
            [tx.readOrNone(joinPath(dev.path, k)) for k in keys], consumeErrors=True
        )
        values = dict(zip(keys, raw, strict=True))
        otherend = _validAbsolutePath(values.get(self.otherendKey))
        otherState: XenbusState | None = None
        otherExists = False
        if otherend is not None:
            rawState = await tx.readOrNone(joinPath(otherend, "state"))
            otherState = XenbusState.parse(rawState)
            otherExists = rawState is not None or await tx.exists(otherend)
        view = DeviceView(
            path=dev.path,
            devclass=dev.devclass,
            values=values,
            state=XenbusState.parse(values.get("state")),
            otherendPath=otherend,
            otherendState=otherState,
            otherendSeen=dev.otherendSeen and otherend == dev.otherendPath,
            otherendExists=otherExists,
        )
        memory = dev.memory if dev.memory is not None else self.freshMemory(view, dev.adopt)
        transition, memory = self.decideStep(view, memory)
        if transition is not None:
            await self.applyTransition(tx, view, transition)
        return _StepResult(gone=False, view=view, transition=transition, memory=memory)

    async def applyTransition(
        self, tx: ITransaction, view: DeviceView, transition: Transition
    ) -> None:
        """
        Write a transition inside the step's transaction (keys first, then
        C{state}; the transaction makes them appear at once).
        """
        for key, value in transition.writes.items():
            await tx.write(joinPath(view.path, key), value)
        for path, value in transition.elsewhere.items():
            await tx.write(path, value)
        for key in transition.removes:
            await tx.rm(joinPath(view.path, key), missingOk=True)
        if transition.state is None:
            self.log.info(
                "Simulated {role} {path}: {reason}",
                role=self.role,
                path=view.path,
                reason=transition.reason,
            )
            return
        await tx.write(joinPath(view.path, "state"), str(int(transition.state)))
        self.log.info(
            "Simulated {role} {path}: {old} -> {new} ({reason})",
            role=self.role,
            path=view.path,
            old=view.state.name if view.state is not None else "absent",
            new=transition.state.name,
            reason=transition.reason,
        )

    def _observe(self, dev: _Device, result: _StepResult) -> None:
        view = result.view
        assert view is not None
        if view.state is XenbusState.Initialising or view.otherendPath != dev.otherendPath:
            # A (re)initialised device or a new other end: what we saw of
            # the old one says nothing about this one.
            dev.otherendSeen = False
        dev.otherendPath = view.otherendPath
        if view.otherendState is not None:
            dev.otherendSeen = True
        dev.memory = result.memory
        self._ensureOtherendWatch(dev)

    # Other-end watches

    def _ensureOtherendWatch(self, dev: _Device) -> None:
        want = None
        if dev.otherendPath and self.watchesOtherend(dev.memory):
            want = joinPath(dev.otherendPath, "state")
        if want == dev.watchPath:
            return
        self._dropWatch(dev)
        dev.watchPath = want
        if want is None or not self._active:
            return
        path, devclass = dev.path, dev.devclass

        def registered(handle: IWatchHandle) -> Deferred[None] | None:
            current = self._devices.get(path)
            if self._active and current is dev and dev.watchPath == want and dev.watch is None:
                dev.watch = handle
                return None
            return handle.stop()

        d: Deferred[Any] = self.xs.watch(want, lambda _event: self.poke(path, devclass))
        d.addCallback(registered)
        self._track(d, f"watching {want}")

    def _dropWatch(self, dev: _Device) -> None:
        if dev.watch is not None:
            self._track(dev.watch.stop(), f"removing the watch on {dev.watchPath}")
        dev.watch = None
        dev.watchPath = None

    def _forget(self, dev: _Device) -> None:
        self._dropWatch(dev)
        if self._devices.get(dev.path) is dev:
            del self._devices[dev.path]
        self.log.debug("Simulated {role}: {path} is gone", role=self.role, path=dev.path)

    # Scanning

    def _requestRescan(self) -> None:
        if not self._active:
            return
        self._rescanAgain = True
        if self._rescanning is None:
            self._rescanning = self._track(
                Deferred.fromCoroutine(self._rescanLoop()), f"scanning {self.root}"
            )

    async def _rescanLoop(self) -> None:
        try:
            while self._rescanAgain and self._active:
                self._rescanAgain = False
                found = await self._listDevices()
                if self._adopting:
                    self._adopting = False
                    for path, devclass in found.items():
                        if path not in self._devices:
                            self._devices[path] = _Device(path, devclass)
                            self._devices[path].adopt = True
                # Known devices too: those that vanished find out and are
                # forgotten by their next step.
                targets = dict(found)
                for path, dev in self._devices.items():
                    targets.setdefault(path, dev.devclass)
                for path, devclass in sorted(targets.items()):
                    self.poke(path, devclass)
        finally:
            self._rescanning = None

    async def _listDevices(self) -> dict[str, str]:
        found: dict[str, str] = {}
        for name in await self.xs.ls(self.root, missingOk=True):
            if name in self.classes:
                await self._walk(joinPath(self.root, name), self.depth - 1, found)
        return found

    async def _walk(self, path: str, remaining: int, found: dict[str, str]) -> None:
        if remaining == 0:
            devclass = self.deviceClassOf(path)
            if devclass is not None:
                found[path] = devclass
            return
        for name in await self.xs.ls(path, missingOk=True):
            try:
                child = joinPath(path, name)
            except InvalidPathError:
                continue
            await self._walk(child, remaining - 1, found)

    # Bookkeeping

    def _track(self, d: Deferred[Any], what: str) -> Deferred[Any]:
        """
        Remember C{d} until it fires, so that L{stop} and L{settle} can wait
        for it; log its failure (nobody else waits for it).
        """
        self._pending.add(d)
        self._work += 1

        def failed(f: Failure) -> None:
            self.log.failure("Simulated {role}: {what} failed", f, role=self.role, what=what)

        def done(result: object) -> object:
            self._pending.discard(d)
            return result

        d.addErrback(failed)
        d.addBoth(done)
        return d

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.root} classes={','.join(self.classes)}>"


def _validAbsolutePath(value: str | None) -> str | None:
    """C{value} if it is a valid absolute XenStore path, else C{None}."""
    if not value or not value.startswith("/") or value == "/":
        return None
    try:
        return validatePath(value)
    except (InvalidPathError, XenbusPathError):
        return None


async def _settleAll(simulators: Iterable[XenbusEndSimulator]) -> None:
    sims = list(simulators)
    while True:
        busy = False
        for sim in sims:
            if await sim.settle():
                busy = True
        if not busy:
            return


def settleSimulators(*simulators: XenbusEndSimulator) -> Deferred[None]:
    """
    Wait until none of C{simulators} has anything left to react to: repeat
    L{XenbusEndSimulator.settle} over all of them until one whole round
    found every one idle. One simulator's write is another's event, hence
    the rounds.

    Only meaningful while nothing else changes the store.
    """
    return Deferred.fromCoroutine(_settleAll(simulators))
