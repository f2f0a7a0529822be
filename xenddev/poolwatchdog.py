# -*- test-case-name: tests.test_pool_fencewatchdog -*-
"""
The daemon's side of the fence watchdog (L{xenddev.fencewatchdog}): the
part C{fence watchdog} of a pool host, after the pool session.

At start, when the session adopted its predecessor's lease (a restart
within the fence deadline), it first asks the previous daemon's watchdog,
if it still waits for that deadline, to watch this daemon instead (its
C{--handover} socket, C{<rundir>/fence-watchdog.sock}: the lease and this
daemon's first deadline; the answer lists what earlier watchdogs paused):
nothing is paused, and that watchdog is released (C{disarm}) once this
daemon's own watchdog says it waits for the lock. Otherwise (a join, or
the old watchdog has acted or gone) it reads what the previous daemon's
watchdog paused (its state file, C{<rundir>/fence-watchdog.json}, once
that watchdog has let go of its lock). Then it starts a watchdog of its
own (C{python -m xenddev.fencewatchdog}, no shell, its standard input a
pipe from this process) and keeps it told:

  - the self-fence deadline of each renewal, as C{until} on the machine's
    monotonic clock, plus half of what is left of the lease after the
    deadline (C{(ttl - fence_after) / 2}): a daemon that runs fences itself
    first, the watchdog acts only for one that cannot;
  - C{fenced} when the session fences itself (its renewals fail: the
    daemon's own fence pauses the data paths and the watchdog stands
    down until renewals work again);
  - the data paths it can reach: the registry of each driver domain on
    this machine (the local agent's), read again when a XenStore watch on
    it fires. A remote driver domain's data paths are paused only through
    its agent: the watchdog cannot reach them;
  - the lease (a successor must name it to adopt it).

L{takeOver}, once the activation guard has taken this host's targets
back, resumes each data path the previous watchdog paused whose target
this host holds again and whose process is the one that was paused; the
others stay paused (another host may hold their target now), said in the
log, and are handed to the new watchdog as paused.

At stop: holding no activation (the lease is about to be revoked), the
watchdog is disarmed; holding some, the lease is kept and so are the
data paths: the watchdog is told the latest deadline and the pipe is
closed, and it pauses them at that deadline unless the next daemon
adopted the lease by then (it outlives this daemon until one or the
other). The watchdog is started again if it ends while the daemon runs.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import sys
import time
from collections.abc import Callable, Collection, Sequence
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import UNIXClientEndpoint, connectProtocol
from twisted.internet.error import ConnectError, ProcessExitedAlready
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger
from twisted.protocols.basic import LineOnlyReceiver
from twisted.python.failure import Failure

from xenddev.backendctrl.records import DataPath, registryDir, scanDriverDomain
from xenddev.datapath.quiesce import DataPathControl, QuiesceHandle
from xenddev.fencewatchdog import LOCKING, dataPathFromJSON, dataPathToJSON, readState
from xenddev.pool.errors import InvalidTarget
from xenddev.pool.keys import normaliseTarget
from xenddev.pool.session import LIVE, HostSession

__all__ = ["HANDOVER_SOCKET", "STATE_FILE", "WATCHDOG_HOLD", "WatchdogLink"]

#: The watchdog's state file, in the daemon's run directory.
STATE_FILE = "fence-watchdog.json"
#: Where a watchdog whose daemon went waits for a successor, in the run directory.
HANDOVER_SOCKET = "fence-watchdog.sock"
#: Seconds the previous watchdog has to answer an adoption.
HANDOVER_TIMEOUT = 5.0
#: The hold value of a resume after a watchdog's pause (for the log).
WATCHDOG_HOLD = "(fence watchdog)"
#: Seconds between two starts of a watchdog that keeps ending.
RESTART_DELAY = 1.0


def _identity(dp: DataPath) -> tuple[Any, ...]:
    """What makes a data path the same process: a record of another one is not."""
    return (dp.driverDomid, dp.vdi, dp.kind, dp.pid, dp.minor, dp.qmp)


def targetOf(dp: DataPath) -> str | None:
    """The pool target a data path serves (None when its image cannot be named)."""
    try:
        return normaliseTarget(dp.image)
    except InvalidTarget:
        return None


class _WatchdogProcess(ProcessProtocol):
    """
    The watchdog's process: its stderr logged, its end reported, its
    C{locking} line (on stdout) fires C{locking}.
    """

    log = Logger()

    def __init__(self, ended: Callable[[Failure], None]) -> None:
        self._ended = ended
        self._buffer = b""
        self._out = b""
        self.locking: Deferred[None] = Deferred()

    def outReceived(self, data: bytes) -> None:
        """Its standard output: the line it writes before it waits for its lock."""
        if self.locking.called:
            return
        self._out += data
        if LOCKING + b"\n" in self._out:
            self.locking.callback(None)

    def errReceived(self, data: bytes) -> None:
        """Log the watchdog's lines as the daemon's."""
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            if line.strip():
                self.log.info("{line}", line=line.decode("utf-8", "replace"))

    def processEnded(self, reason: Failure) -> None:
        """The watchdog exited."""
        self._ended(reason)


class _PredecessorLink(LineOnlyReceiver):
    """
    The connection to the previous daemon's watchdog (its C{--handover}
    socket): C{answer} fires with its answer to the adoption.
    """

    delimiter = b"\n"
    MAX_LENGTH = 16 * 1024 * 1024

    def __init__(self) -> None:
        self.answer: Deferred[dict[str, Any]] = Deferred()
        self.closed = False

    def lineReceived(self, line: bytes) -> None:
        """Its answer (the only line it sends)."""
        if self.answer.called:
            return
        try:
            answer = json.loads(line)
            if not isinstance(answer, dict):
                raise ValueError("not an object")
        except ValueError as e:
            self.answer.errback(e)
            return
        self.answer.callback(answer)

    def close(self, disarm: bool = False) -> None:
        """Close the connection (after a C{disarm}: it exits without pausing)."""
        if self.closed or self.transport is None:
            return
        if disarm:
            self.sendLine(b'{"disarm": true}')
        self.transport.loseConnection()

    def connectionLost(self, reason: Failure | None = None) -> None:
        """It closed: no answer, or it went after adopting us."""
        self.closed = True
        if not self.answer.called:
            self.answer.errback(ConnectionError("the previous fence watchdog closed"))


class WatchdogLink:
    """
    Starts this daemon's fence watchdog and keeps it told (see the
    module's doc).

    @param reactor: time and processes.
    @param xs: the toolstack's XenStore connection (reads the registries).
    @param session: this host's pool session.
    @param control: the daemon's data-path control (resumes at takeover).
    @param rundir: the daemon's run directory (the state file, its lock).
    @param domids: the driver domains on this machine.
    @param pauseTimeout: seconds the watchdog gives each pause.
    @param python: the interpreter the watchdog runs in.
    @ivar inherited: what the previous watchdog paused that is still paused.
    @ivar process: the watchdog's process transport (None when not running).
    @ivar handedOver: whether the previous daemon's watchdog took this
        daemon on (an adopted lease: nothing was paused).
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        xs: Any,
        session: HostSession,
        control: DataPathControl,
        rundir: str,
        domids: Sequence[int],
        pauseTimeout: float | None = None,
        python: str = sys.executable,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.reactor = reactor
        self.xs = xs
        self.session = session
        self.control = control
        self.statePath = os.path.join(rundir, STATE_FILE)
        self.handoverPath = os.path.join(rundir, HANDOVER_SOCKET)
        self.domids = tuple(domids)
        self.python = python
        self._monotonic = monotonic
        self.grace = (session.ttl - session.fenceAfter) / 2
        self.pauseTimeout = pauseTimeout if pauseTimeout is not None else self.grace
        self.inherited: list[DataPath] = []
        self.paths: list[DataPath] = []
        self.process: Any = None
        #: The previous daemon's watchdog while it watches this daemon.
        self.predecessor: _PredecessorLink | None = None
        self._sentUntil: float | None = None
        self._sentLease = 0
        self._fencedSent = False
        self._stopping = False
        self._loop: LoopingCall | None = None
        self._watches: list[Any] = []
        self._exited: Deferred[None] | None = None
        self._restart: IDelayedCall | None = None
        self.handedOver = False

    # --- start and stop -----------------------------------------------------------

    async def start(self) -> None:
        """
        Take the previous watchdog over (an adopted lease) or read what it
        paused, start ours, tell it everything.
        """
        handed = await self._handOver() if self.session.adopted else None
        self.inherited = handed if handed is not None else await self._inherit()
        await self._rescan()
        self._spawn()
        for register in (self.session.onRecover, self.session.onRejoin):
            register(self._tick)
        self.session.onFence(self._fenced)
        self.session.onLost(lambda keys: self._fenced())
        self._loop = LoopingCall(self._tick)
        self._loop.clock = self.reactor
        self._loop.start(self.session.renewEvery, now=True)
        for domid in self.domids:
            # The watch fires once as it is registered: a first read.
            self._watches.append(
                await self.xs.watch(registryDir(domid), lambda _path: self._poke())
            )

    async def stop(self) -> None:
        """Disarm the watchdog (nothing held) or hand over (see the module's doc)."""
        self._stopping = True
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        if self._restart is not None and self._restart.active():
            self._restart.cancel()
        for watch in self._watches:
            await watch.stop()
        self._watches = []
        process, exited = self.process, self._exited
        held = self.session.held
        if held:
            self._tick()  # the latest deadline
            predecessor, self.predecessor = self.predecessor, None
            if predecessor is not None:
                # Ours never had the lock (it has not said so): the old one
                # goes on waiting for the deadline, ours goes.
                predecessor.close()
                if process is not None:
                    try:
                        process.signalProcess("KILL")
                    except ProcessExitedAlready:
                        pass
            until = self.session.safeUntil
            self.log.warn(
                "Stopping with {n} pool activation(s) held: the lease and the data paths "
                "are left running; the fence watchdog pauses them {left:.1f} s from now "
                "unless the next daemon has adopted the lease by then",
                n=len(held),
                left=(until - self.reactor.seconds() + self.grace) if until else 0.0,
            )
            if process is not None and predecessor is None:
                # It outlives this daemon, until the deadline or a successor.
                process.closeStdin()
            return
        self._send({"disarm": True})
        self._releasePredecessor()
        if process is None or exited is None:
            return
        process.closeStdin()
        timeout = self.pauseTimeout + 5.0
        exited.addTimeout(timeout, self.reactor)
        try:
            await exited
        except Exception:
            self.log.error("The fence watchdog did not end within {t:g} s", t=timeout)

    async def _inherit(self) -> list[DataPath]:
        """
        What the previous watchdog paused (waiting, a few seconds at most,
        until it has let go of its lock); the state file is then removed.
        """
        lockPath = self.statePath + ".lock"
        fd = os.open(lockPath, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            for _ in range(int(max(self.pauseTimeout, 1.0) * 20) + 20):
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as e:
                    if e.errno not in (errno.EAGAIN, errno.EACCES):
                        raise
                await deferLater(self.reactor, 0.05, lambda: None)
            else:
                self.log.error(
                    "A fence watchdog still holds {lock}: reading its state as it is",
                    lock=lockPath,
                )
            try:
                state = readState(self.statePath)
            except ValueError as e:
                self.log.error("Ignoring the fence watchdog's state: {e}", e=e)
                state = None
            if state is None:
                return []
            os.unlink(self.statePath)
        finally:
            os.close(fd)
        paused: list[DataPath] = state["paused"]
        self.log.warn(
            "The previous daemon's fence watchdog paused {n} data path(s) ({reason}): {names}",
            n=len(paused),
            reason=state.get("reason"),
            names=", ".join(dp.vdi for dp in paused) or "none",
        )
        return paused

    async def _handOver(self) -> list[DataPath] | None:
        """
        Ask the previous daemon's watchdog, waiting for its deadline, to
        watch this daemon (which adopted the lease) until ours takes
        over; what earlier watchdogs paused, or None (no such watchdog,
        or it refused: it has acted).
        """
        if self.session.safeUntil is None:
            return None  # no renewal to vouch for: nothing to hand over to
        endpoint = UNIXClientEndpoint(self.reactor, self.handoverPath, timeout=HANDOVER_TIMEOUT)
        try:
            link = await connectProtocol(endpoint, _PredecessorLink())
        except (ConnectError, OSError):
            return None  # none waits: it acted, or there was none
        until = self._until()
        lease = self.session.lease
        link.sendLine(json.dumps({"adopt": lease, "until": until}).encode("utf-8"))
        answer: Deferred[dict[str, Any]] = link.answer
        answer.addTimeout(HANDOVER_TIMEOUT, self.reactor)
        try:
            reply = await answer
            paused = [dataPathFromJSON(d) for d in reply.get("paused", ())]
        except Exception as e:
            reply, paused = {"refused": str(e) or type(e).__name__}, []
        if not reply.get("adopted"):
            link.close()
            self.log.warn(
                "The previous daemon's fence watchdog did not take this daemon on: {why}",
                why=reply.get("refused"),
            )
            return None
        self.predecessor = link
        self.handedOver = True
        self.log.warn(
            "Fence watchdog handover: the previous daemon's watchdog watches this daemon "
            "(lease {lease:x} adopted, nothing paused) until ours takes over",
            lease=lease,
        )
        return paused

    def _releasePredecessor(self) -> None:
        """Our watchdog waits for the lock: the previous one may go (without pausing)."""
        link, self.predecessor = self.predecessor, None
        if link is not None:
            link.close(disarm=True)

    # --- the takeover -------------------------------------------------------------

    async def takeOver(self, held: Collection[str]) -> None:
        """
        Resume what the previous watchdog paused whose target this host
        holds again (C{held}: the guard's targets) and whose process is
        the one paused; keep the rest paused, and say which.
        """
        if not self.inherited:
            return
        current = {_identity(dp): dp for dp in await self._scan()}
        resumed, kept, gone = [], [], []
        for dp in self.inherited:
            now = current.get(_identity(dp))
            if now is None:
                gone.append(dp)
                continue
            if targetOf(now) not in held:
                kept.append(dp)
                continue
            try:
                await self.control.resume(QuiesceHandle(WATCHDOG_HOLD, [now]), reload=False)
            except Exception as e:
                self.log.error("Could not resume {vdi}: {e}", vdi=dp.vdi, e=e)
                kept.append(dp)
                continue
            resumed.append(dp)
        self.inherited = kept
        self._sendPaths()
        self.log.warn(
            "Fence watchdog takeover: {r} data path(s) resumed ({resumed}); {k} kept paused, "
            "their targets not held here ({kept}: detach their devices); {g} gone",
            r=len(resumed),
            resumed=", ".join(dp.vdi for dp in resumed) or "none",
            k=len(kept),
            kept=", ".join(dp.vdi for dp in kept) or "none",
            g=len(gone),
        )

    # --- the watchdog's process -----------------------------------------------------

    def _spawn(self) -> None:
        """Start a watchdog and tell it what it must know."""
        self._restart = None
        self._exited = Deferred()
        protocol = _WatchdogProcess(self._ended)
        protocol.locking.addCallback(lambda _: self._releasePredecessor())
        self.process = self.reactor.spawnProcess(
            protocol,
            self.python,
            [
                self.python,
                "-m",
                "xenddev.fencewatchdog",
                "--state",
                self.statePath,
                "--daemon-pid",
                str(os.getpid()),
                "--pause-timeout",
                f"{self.pauseTimeout:g}",
                "--handover",
                self.handoverPath,
            ],
            env=dict(os.environ),
            childFDs={0: "w", 1: "r", 2: "r"},
        )
        self._sentUntil = None
        self._sentLease = 0
        self._fencedSent = False
        self._sendPaths()
        self._tick()

    def _ended(self, reason: Failure) -> None:
        """The watchdog exited: expected at stop; otherwise started again."""
        self.process = None
        exited, self._exited = self._exited, None
        if exited is not None:
            exited.callback(None)
        if self._stopping:
            return
        self.log.error(
            "The fence watchdog ended ({reason}); starting it again",
            reason=reason.getErrorMessage(),
        )
        # What it paused (if it acted) is this daemon's to resume, as at start.
        Deferred.fromCoroutine(self._reinherit())

    async def _reinherit(self) -> None:
        """Read the state of a watchdog that ended, then start one again."""
        await deferLater(self.reactor, RESTART_DELAY, lambda: None)
        if self._stopping:
            return
        self.inherited += await self._inherit()
        self._spawn()

    def _send(self, message: dict[str, Any]) -> None:
        """
        One message to the watchdog (dropped when it is not running), and
        to the previous one while it watches this daemon.
        """
        line = json.dumps(message).encode("utf-8")
        if self.process is not None:
            self.process.write(line + b"\n")
        if self.predecessor is not None and not self.predecessor.closed:
            self.predecessor.sendLine(line)

    def _sendPaths(self) -> None:
        """The data paths to pause, and those already paused."""
        self._send(
            {
                "paths": [dataPathToJSON(dp) for dp in self.paths],
                "paused": [dataPathToJSON(dp) for dp in self.inherited],
            }
        )

    # --- what the watchdog is told ---------------------------------------------------

    def _until(self) -> float:
        """The session's deadline for the watchdog: on the monotonic clock, plus the grace."""
        until = self.session.safeUntil
        remaining = (until if until is not None else 0.0) - self.reactor.seconds()
        return self._monotonic() + remaining + self.grace

    def _tick(self) -> None:
        """Tell the watchdog the lease and the deadline of the latest renewal (when they moved)."""
        session = self.session
        if session.lease != self._sentLease:
            self._sentLease = session.lease
            self._send({"lease": session.lease})
        until = session.safeUntil
        if session.state != LIVE or until is None or until == self._sentUntil:
            return
        self._sentUntil = until
        self._fencedSent = False
        self._send({"until": self._until()})

    def _fenced(self) -> None:
        """The session fenced itself: the daemon's fence acts, the watchdog stands down."""
        if not self._fencedSent:
            self._fencedSent = True
            self._sentUntil = None
            self._send({"fenced": True})

    def _poke(self) -> None:
        """A registry changed: read the data paths again."""
        Deferred.fromCoroutine(self._rescan()).addErrback(
            lambda f: self.log.warn(
                "Could not read the data-path registry for the fence watchdog: {e}",
                e=f.value,
            )
        )

    async def _rescan(self) -> None:
        """Read the registries and tell the watchdog."""
        self.paths = await self._scan()
        self._sendPaths()

    async def _scan(self) -> list[DataPath]:
        """The data paths of the driver domains on this machine."""
        found: list[DataPath] = []
        for domid in self.domids:
            found += await scanDriverDomain(self.xs, domid)
        return found
