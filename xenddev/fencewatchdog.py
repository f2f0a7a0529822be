# -*- test-case-name: tests.test_pool_fencewatchdog -*-
"""
The fence watchdog: a small process beside a pool host's daemon that
pauses the host's data paths when the daemon can no longer do it.

The daemon's own self-fence (L{xenddev.poolfence}) needs a running
daemon. Killed (SIGKILL, a crash, the OOM killer) or stalled past its
lease, it renews nothing and pauses nothing, while its data paths
(qemu-storage-daemons, tapdisks) go on serving; once its lease expires
another host may activate the same targets. This process, started by the
daemon (C{python -m xenddev.fencewatchdog}, no shell; the daemon's side is
L{xenddev.poolwatchdog}), is told over its standard input, one JSON object
a line:

  - C{{"until": T}}: act at C{T} (C{CLOCK_MONOTONIC} seconds) unless told
    more: the daemon's last renewal plus its self-fence deadline plus half
    of what is left of the lease, so a live daemon always fences first;
  - C{{"fenced": true}}: the daemon fenced itself (its renewals fail, its
    own fence pauses the data paths): no deadline until the next C{until};
  - C{{"paths": [...], "paused": [...]}}: the data paths to pause (the
    registry's records of the driver domains on this machine) and those
    already paused that a later daemon must resume (they go in the state
    file as if paused here);
  - C{{"lease": L}}: the lease the daemon renews (a successor must name it);
  - C{{"disarm": true}}: the daemon leaves the pool cleanly, holding
    nothing (or a successor's own watchdog has taken over): exit without
    pausing.

When C{until} passes the daemon is stalled: it is killed first with
SIGKILL, so it cannot wake and write after its data paths were paused,
and the watchdog acts. When its input closes without C{disarm} (the
daemon stopped holding activations, or died) nobody renews the lease any
more, but it still stands until then: the watchdog B{keeps the deadline}
and listens on C{--handover} (a UNIX socket, mode 0600) for the next
daemon of the host. A successor that adopted the lease
(L{xenddev.pool.session}) sends C{{"adopt": L, "until": T}} there (one
JSON object a line, the same lease, its own first deadline); the watchdog
answers C{{"adopted": true, "paused": [...]}} (what earlier watchdogs
paused, for the successor to carry on), watches that daemon from then on
(its pid from the socket's credentials; its messages as above), and
exits without pausing on its C{disarm} — sent once the successor's own
watchdog is waiting for the lock. A successor that goes without C{disarm}
leaves it waiting again. It acts at the deadline if no successor took
over (killing nobody: the daemon is gone), or at once when its input
closes with no deadline known (the daemon had fenced itself). So a
daemon restarted within the deadline stops no data path, and data paths
never run past the moment another host could take their targets.

Acting: every data path is paused at once, each on its own (a failure
leaves none of the others running), each within C{--pause-timeout}:
qemu-storage-daemons through their QMP socket (export deleted, graph
closed: L{xenddev.datapath.qemu}), tapdisks with C{tap-ctl pause}. What
was paused is written to the state file (atomically), which the next
daemon reads to resume what the pool lets it take back; then the process
exits.

While it lives it holds an exclusive lock on C{<state>.lock}, so the next
daemon reads the state file only once it is complete; it says
C{locking} on its standard output before it waits for that lock (a
successor releases its predecessor's watchdog only then). A state file
it finds once it has the lock (a watchdog acted and nobody read it yet)
is carried into the one it writes.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import signal
import socket
import struct
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.interfaces import IDelayedCall, IListeningPort
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols.basic import LineOnlyReceiver
from twisted.python.failure import Failure

from xenddev.backendctrl.records import DataPath
from xenddev.datapath.quiesce import IDataPathPauser

__all__ = [
    "LOCKING",
    "FenceWatchdog",
    "SuccessorConnection",
    "WatchdogInput",
    "dataPathFromJSON",
    "dataPathToJSON",
    "main",
    "readState",
]

#: Seconds one data path's pause may take before it counts as failed.
DEFAULT_PAUSE_TIMEOUT = 5.0
#: The line a watchdog writes on its standard output before it waits for its lock.
LOCKING = b"locking"


def dataPathToJSON(dp: DataPath) -> dict[str, Any]:
    """A data path's record as plain JSON data."""
    data = attrs.asdict(dp)
    data["chain"] = list(dp.chain)
    data["extra"] = dict(dp.extra)
    return data


def dataPathFromJSON(data: Mapping[str, Any]) -> DataPath:
    """The data path a L{dataPathToJSON} record describes."""
    fields = {f.name for f in attrs.fields(DataPath)}
    values = {k: v for k, v in data.items() if k in fields}
    values["chain"] = tuple(values.get("chain", ()))
    values["extra"] = dict(values.get("extra", {}))
    return DataPath(**values)


def readState(path: str) -> dict[str, Any] | None:
    """
    What a watchdog wrote (C{paused}: data paths; C{failed}: vdi -> why;
    C{reason}), or None when there is no state file.

    @raise ValueError: the file is not a watchdog's state.
    """
    try:
        with open(path, encoding="utf-8") as f:
            state = json.load(f)
    except FileNotFoundError:
        return None
    if not isinstance(state, dict) or not isinstance(state.get("paused"), list):
        raise ValueError(f"{path}: not a fence watchdog's state")
    state["paused"] = [dataPathFromJSON(d) for d in state["paused"]]
    return state


def _writeState(path: str, state: Mapping[str, Any]) -> None:
    """Write C{state} to C{path} atomically (a reader sees the old file or the new)."""
    tmp = f"{path}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, path)


class FenceWatchdog:
    """
    The watchdog's logic (the process is L{main}): the daemon's messages
    in, the pauses out, a successor's adoption (see the module's doc).

    @param reactor: time and the pausers' I/O.
    @param pausers: kind -> pauser (qemu, tap).
    @param statePath: where to write what was paused.
    @param daemonPid: the daemon, killed when it stalls past C{until}.
    @param kill: C{os.kill} (tests).
    @param monotonic: C{time.monotonic} (tests).
    @param pauseTimeout: seconds each pause may take.
    @param listen: starts listening for a successor (the C{--handover}
        socket) and returns the port; None: no successor can adopt.
    @ivar done: fires once the watchdog acted (or was disarmed): time to exit.
    @ivar reason: why it acted (None: disarmed, or not yet).
    @ivar lease: the lease the daemon renews (0: not told).
    @ivar orphaned: the daemon's pipe closed; the deadline still stands.
    @ivar successor: the pid of the daemon that adopted the lease (None: none).
    @ivar carried: what an earlier watchdog paused, found unread in the state file.
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        pausers: Mapping[str, IDataPathPauser],
        statePath: str,
        daemonPid: int,
        kill: Callable[[int, int], None] = os.kill,
        monotonic: Callable[[], float] = time.monotonic,
        pauseTimeout: float = DEFAULT_PAUSE_TIMEOUT,
        listen: Callable[[], IListeningPort] | None = None,
    ) -> None:
        self.reactor = reactor
        self.pausers = dict(pausers)
        self.statePath = statePath
        self.daemonPid = daemonPid
        self._kill = kill
        self._monotonic = monotonic
        self.pauseTimeout = pauseTimeout
        self.paths: list[DataPath] = []
        self.alreadyPaused: list[DataPath] = []
        self.carried: list[DataPath] = []
        self.reason: str | None = None
        self.lease = 0
        self.orphaned = False
        self.successor: int | None = None
        self.done: Deferred[None] = Deferred()
        self._timer: IDelayedCall | None = None
        self._disarmed = False
        self._acting = False
        self._listen = listen
        self._port: IListeningPort | None = None

    # --- the daemon's messages --------------------------------------------------

    def message(self, message: Mapping[str, Any]) -> None:
        """One message of the daemon (see the module's doc); unknown keys are ignored."""
        if self._acting:
            return
        if message.get("disarm"):
            self._disarmed = True
            self._cancelTimer()
            return
        if "lease" in message:
            self.lease = int(message["lease"])
        if "paths" in message:
            self.paths = [dataPathFromJSON(d) for d in message["paths"]]
            self.alreadyPaused = [dataPathFromJSON(d) for d in message.get("paused", ())]
        if message.get("fenced"):
            self._cancelTimer()
        if "until" in message:
            self._arm(float(message["until"]))

    def inputClosed(self) -> None:
        """
        The daemon's pipe closed: it left (disarmed: the end), or it
        stopped holding activations, or died: the deadline stands, a
        successor may adopt the lease until then (none known: act now).
        """
        if self._disarmed:
            self.log.info("fence watchdog disarmed: the daemon left the pool cleanly")
            self._finish()
            return
        self._orphan("the daemon's pipe closed (it stopped or died)")

    # --- a successor ----------------------------------------------------------------

    def adopt(self, lease: int, until: float, pid: int) -> dict[str, Any]:
        """
        A successor daemon (process C{pid}) adopted C{lease} and renewed
        it: watch it from now on, its deadline C{until}; the answer for it
        (C{adopted} and what earlier watchdogs paused, or C{refused} and why).
        """
        if self._acting or self.done.called:
            return {"refused": "the fence watchdog has acted: its data paths are paused"}
        if not self.orphaned or self.successor is not None:
            return {"refused": "the fence watchdog still watches a running daemon"}
        if self.lease and lease != self.lease:
            return {"refused": f"lease {lease:x} is not the one watched ({self.lease:x})"}
        self.lease = lease
        self.successor = self.daemonPid = pid
        self._arm(until)
        self.log.warn(
            "fence watchdog: daemon {pid} adopted lease {lease:x}: watching it, nothing paused",
            pid=pid,
            lease=lease,
        )
        return {
            "adopted": True,
            "paused": [dataPathToJSON(dp) for dp in _unique([*self.carried, *self.alreadyPaused])],
        }

    def successorGone(self) -> None:
        """The successor's connection closed: released (disarmed), or it died."""
        if self.successor is None:
            return
        self.successor = None
        if self._disarmed:
            self.log.info("fence watchdog released: the successor's own watchdog took over")
            self._finish()
            return
        self._orphan("the daemon that adopted the lease went")

    def _orphan(self, why: str) -> None:
        """Nobody renews the lease now: wait for its deadline (or act, none known)."""
        if self._acting:
            return
        if self._timer is None:
            self.act(f"{why}, no deadline known (it had fenced itself or never renewed)")
            return
        self.orphaned = True
        self.log.warn(
            "fence watchdog: {why}: the data paths keep running until the deadline, "
            "{left:.2f} s from now, and are paused then unless a successor adopts the lease",
            why=why,
            left=self._timer.getTime() - self.reactor.seconds(),
        )
        if self._listen is not None and self._port is None:
            try:
                self._port = self._listen()
            except Exception as e:
                self.log.error("fence watchdog: no successor can adopt the lease: {e}", e=e)

    # --- acting -----------------------------------------------------------------

    def _arm(self, until: float) -> None:
        """Act at C{until} (monotonic) unless told more before."""
        self._cancelTimer()
        self._timer = self.reactor.callLater(
            max(0.0, until - self._monotonic()), self._deadlinePassed
        )

    def _cancelTimer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _deadlinePassed(self) -> None:
        """
        Nothing renewed past the deadline: a daemon that is there is
        stalled (killed first); then pause.
        """
        self._timer = None
        if self.orphaned and self.successor is None:
            self.act("no daemon renewed the lease by the deadline (none adopted it)")
            return
        try:
            self._kill(self.daemonPid, signal.SIGKILL)
            killed = f"killed the daemon (pid {self.daemonPid})"
        except OSError as e:
            killed = f"could not kill the daemon (pid {self.daemonPid}): {e.strerror}"
        self.act(f"no renewal reported past the deadline; {killed}")

    def act(self, reason: str) -> Deferred[None]:
        """Pause every data path (once), write the state, then C{done}."""
        if self._acting:
            return self.done
        self._acting = True
        self._cancelTimer()
        self._stopListening()
        self.reason = reason
        self.log.error(
            "fence watchdog: {reason}: pausing {n} data path(s) before the lease can expire",
            reason=reason,
            n=len(self.paths),
        )
        return Deferred.fromCoroutine(self._act())

    async def _act(self) -> None:
        earlier = _unique([*self.carried, *self.alreadyPaused])
        seen = {(dp.driverDomid, dp.vdi) for dp in earlier}
        todo = [dp for dp in self.paths if (dp.driverDomid, dp.vdi) not in seen]
        outcomes = await gatherResults(
            [Deferred.fromCoroutine(self._pause(dp)) for dp in todo], consumeErrors=True
        )
        failed = {dp.vdi: why for dp, why in zip(todo, outcomes, strict=True) if why is not None}
        paused = [dp for dp in todo if dp.vdi not in failed]
        try:
            _writeState(
                self.statePath,
                {
                    "reason": self.reason,
                    "paused": [dataPathToJSON(dp) for dp in [*earlier, *paused]],
                    "failed": failed,
                },
            )
        except OSError as e:
            self.log.error("fence watchdog: cannot write {path}: {e}", path=self.statePath, e=e)
        self.log.error(
            "fence watchdog: {n} data path(s) paused ({names}){failures}",
            n=len(paused),
            names=", ".join(dp.vdi for dp in paused) or "none",
            failures="".join(f"; {vdi} NOT paused: {why}" for vdi, why in failed.items()),
        )
        self._finish()

    async def _pause(self, dp: DataPath) -> str | None:
        """Pause one data path within the timeout; None, or why it failed."""
        pauser = self.pausers.get(dp.kind)
        if pauser is None:
            return f"no pauser for {dp.kind} data paths"
        try:
            d = Deferred.fromCoroutine(_awaited(pauser.pause(dp)))
            d.addTimeout(self.pauseTimeout, self.reactor)
            await d
        except Exception as e:
            return str(e) or type(e).__name__
        return None

    def _stopListening(self) -> None:
        """No successor can adopt any more (the socket goes)."""
        port, self._port = self._port, None
        if port is not None:
            port.stopListening()

    def _finish(self) -> None:
        self._stopListening()
        if not self.done.called:
            self.done.callback(None)


def _unique(paths: Sequence[DataPath]) -> list[DataPath]:
    """C{paths} with each (driver domain, vdi) once, the first kept."""
    seen: dict[tuple[int, str], DataPath] = {}
    for dp in paths:
        seen.setdefault((dp.driverDomid, dp.vdi), dp)
    return list(seen.values())


async def _awaited(value: Any) -> Any:
    """Await C{value} (a Deferred or a coroutine)."""
    return await value


class WatchdogInput(LineOnlyReceiver):
    """The daemon's pipe: one JSON message a line to the watchdog."""

    delimiter = b"\n"
    MAX_LENGTH = 16 * 1024 * 1024

    def __init__(self, watchdog: FenceWatchdog) -> None:
        self.watchdog = watchdog

    def lineReceived(self, line: bytes) -> None:
        """Hand the message on (an unreadable one is logged and skipped)."""
        try:
            message = json.loads(line)
            if not isinstance(message, dict):
                raise ValueError("not an object")
            self.watchdog.message(message)
        except (ValueError, TypeError, KeyError) as e:
            Logger().error("fence watchdog: unreadable message from the daemon: {e}", e=e)

    def connectionLost(self, reason: Failure | None = None) -> None:
        """The daemon's end closed."""
        self.watchdog.inputClosed()


def peerCredentials(transport: Any) -> tuple[int, int]:
    """The pid and uid of the process at the other end of a UNIX socket."""
    raw = transport.getHandle().getsockopt(
        socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")
    )
    pid, uid, _gid = struct.unpack("3i", raw)
    return pid, uid


class SuccessorConnection(LineOnlyReceiver):
    """
    A successor daemon on the C{--handover} socket: its C{adopt} first
    (answered), then its messages as the daemon's pipe carries them.

    @param credentials: the peer's (pid, uid) from the transport (tests).
    """

    delimiter = b"\n"
    MAX_LENGTH = 16 * 1024 * 1024
    log = Logger()

    def __init__(
        self,
        watchdog: FenceWatchdog,
        credentials: Callable[[Any], tuple[int, int]] = peerCredentials,
    ) -> None:
        self.watchdog = watchdog
        self.adopted = False
        self._credentials = credentials

    def lineReceived(self, line: bytes) -> None:
        """The adoption, then the successor's messages."""
        try:
            message = json.loads(line)
            if not isinstance(message, dict):
                raise ValueError("not an object")
            if self.adopted:
                self.watchdog.message(message)
                return
            pid, uid = self._credentials(self.transport)
            if uid != os.geteuid():
                answer: dict[str, Any] = {"refused": f"uid {uid} is not this watchdog's"}
            else:
                answer = self.watchdog.adopt(int(message["adopt"]), float(message["until"]), pid)
        except (ValueError, TypeError, KeyError) as e:
            self.log.error("fence watchdog: unreadable message from a successor: {e}", e=e)
            answer = {"refused": f"unreadable message: {e}"}
            if self.adopted:
                return
        self.sendLine(json.dumps(answer).encode("utf-8"))
        if answer.get("adopted"):
            self.adopted = True
        elif self.transport is not None:
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure | None = None) -> None:
        """The successor closed (released us) or died."""
        if self.adopted:
            self.watchdog.successorGone()


def _lock(path: str) -> int:
    """Hold an exclusive lock on C{path} for the life of the process (waiting for it)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def main(argv: Sequence[str] | None = None) -> int:
    """C{python -m xenddev.fencewatchdog --state FILE --daemon-pid PID [--handover SOCKET]}."""
    parser = argparse.ArgumentParser(prog="python -m xenddev.fencewatchdog")
    parser.add_argument("--state", required=True, help="where to write what was paused")
    parser.add_argument("--daemon-pid", type=int, required=True)
    parser.add_argument("--pause-timeout", type=float, default=DEFAULT_PAUSE_TIMEOUT)
    parser.add_argument("--handover", help="the UNIX socket a successor adopts the lease on")
    args = parser.parse_args(argv)

    from twisted.internet import reactor
    from twisted.internet.stdio import StandardIO
    from twisted.logger import globalLogBeginner, textFileLogObserver

    from xenddev.datapath.quiesce import standardPausers

    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)], redirectStandardIO=False)
    try:
        # Not in the daemon's process group or session: a Ctrl-C or a
        # SIGTERM meant for the daemon does not take the watchdog with it.
        os.setsid()
    except OSError:
        pass
    try:
        sys.stdout.buffer.write(LOCKING + b"\n")
        sys.stdout.buffer.flush()
    except OSError:
        pass  # the daemon went already: its pipe's end is read below
    _lock(args.state + ".lock")

    def listen() -> IListeningPort:
        path = args.handover
        try:
            os.unlink(path)  # a watchdog killed before it could remove it (we hold the lock)
        except FileNotFoundError:
            pass
        port: IListeningPort = reactor.listenUNIX(  # type: ignore[attr-defined]
            path, Factory.forProtocol(lambda: SuccessorConnection(watchdog)), mode=0o600
        )
        return port

    watchdog = FenceWatchdog(
        reactor,
        standardPausers(reactor, timeout=args.pause_timeout),
        args.state,
        args.daemon_pid,
        pauseTimeout=args.pause_timeout,
        listen=listen if args.handover else None,
    )
    try:
        earlier = readState(args.state)
    except ValueError as e:
        watchdog.log.error("fence watchdog: ignoring {e}", e=e)
        earlier = None
    if earlier is not None:
        # An earlier watchdog acted and no daemon has read it yet.
        watchdog.carried = earlier["paused"]
    StandardIO(WatchdogInput(watchdog), reactor=reactor)
    watchdog.done.addBoth(lambda _: reactor.stop())

    def ignoreStops() -> None:
        # Twisted's handlers would stop the reactor: only the daemon's pipe
        # (or SIGKILL) ends this process. SIGCHLD stays Twisted's (tap-ctl).
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)

    reactor.callWhenRunning(ignoreStops)
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
