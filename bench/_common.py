"""
What the benchmarks share: the XenStore servers they start as processes of
their own (the C xenstored under the test shim, the embedded xenstored as
C{python -m twisted xenstored}), the processes they start and must not
leave behind, CPU accounting from C{/proc}, latency statistics, connecting
with retries, and running a coroutine under the global reactor.

Only the helpers live here; what each benchmark measures, and how, stays in
its own module.
"""

from __future__ import annotations

import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectError
from twisted.internet.task import deferLater
from twisted.python.failure import Failure

from tests.support.realxenstored import RealXenstored, rawRequest, unavailableReason
from xenddev.xenstore.client import XenStoreClient
from xenddev.xenstore.connection import connectXenStore
from xenddev.xenstore.wire import Op

#: The checkout: put on C{PYTHONPATH} of every Python process a benchmark starts.
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def benchEnv(**extra: str) -> dict[str, str]:
    """This process's environment with the checkout first on C{PYTHONPATH}, and C{extra}."""
    env = dict(os.environ, **extra)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))
    return env


# Statistics


@attrs.frozen
class Stats:
    """Latencies (seconds) of one kind of operation."""

    samples: tuple[float, ...]

    @property
    def meanMs(self) -> float:
        """The mean, in milliseconds (0 without samples)."""
        return statistics.fmean(self.samples) * 1e3 if self.samples else 0.0

    def percentileMs(self, p: float) -> float:
        """The C{p} (0..1) percentile, nearest rank, in milliseconds (0 without samples)."""
        if not self.samples:
            return 0.0
        ordered = sorted(self.samples)
        return ordered[min(len(ordered) - 1, int(len(ordered) * p))] * 1e3

    @property
    def p50Ms(self) -> float:
        """The median, in milliseconds."""
        return self.percentileMs(0.50)

    @property
    def p99Ms(self) -> float:
        """The 99th percentile, in milliseconds."""
        return self.percentileMs(0.99)

    @property
    def maxMs(self) -> float:
        """The slowest, in milliseconds (0 without samples)."""
        return max(self.samples) * 1e3 if self.samples else 0.0


# CPU time


_CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpuSeconds(pid: int | None) -> float:
    """User + system CPU time of a live process (Linux /proc, clock ticks); 0 if unknown."""
    if pid is None:
        return 0.0
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    # Fields 14 and 15 (utime, stime) are the 12th and 13th after ")".
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def selfCpuSeconds() -> float:
    """User + system CPU time of this process."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# The reactor


def sleep(seconds: float) -> Deferred[None]:
    """A Deferred that fires after C{seconds} on the global reactor."""
    from twisted.internet import reactor

    return deferLater(reactor, seconds, lambda: None)


async def awaited(awaitable: Awaitable[object]) -> object:
    """A coroutine awaiting C{awaitable} (for C{Deferred.fromCoroutine} of any awaitable)."""
    return await awaitable


def runReactor(main: Callable[[], Awaitable[object]]) -> Any:
    """
    Run C{main()} under the global reactor, which stops when it ends;
    return its result or raise its exception (None if the reactor was
    stopped otherwise, e.g. by SIGTERM).
    """
    from twisted.internet import reactor

    outcome: dict[str, Any] = {}

    def run() -> None:
        d: Deferred[object] = Deferred.fromCoroutine(awaited(main()))
        d.addCallbacks(lambda r: outcome.update(result=r), lambda f: outcome.update(error=f))
        d.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(run)
    reactor.run()
    if "error" in outcome:
        failure: Failure = outcome["error"]
        failure.raiseException()
    return outcome.get("result")


async def connect(socketPath: str, attempts: int = 100) -> XenStoreClient:
    """
    Connect to the store. The C xenstored listens with a backlog of 1, so a
    non-blocking connect made while an earlier one waits to be accepted can
    fail (ConnectError): try again shortly.
    """
    for attempt in range(attempts):
        try:
            client: XenStoreClient = await connectXenStore(None, f"unix:{socketPath}")
            return client
        except ConnectError:
            if attempt + 1 == attempts:
                raise
            await sleep(0.02)
    raise AssertionError("unreachable")


# Our client's workload (bench/xenstore_client.py, bench/xenstored.py)

#: The five operations of the workload, in the order the tables list them.
OPS = ("read", "write", "directory", "tx empty", "tx rmw")
#: The value written.
VALUE = b"v" * 32


def clientWorkload(client: Any, counterBase: int = 0) -> dict[str, Callable[[int], Any]]:
    """
    The five operations of the workload on a L{XenStoreClient}, by name;
    each C{op(i)} returns an awaitable (a Deferred, but for C{tx empty}'s
    coroutine). They use C{/bench/key}, C{/bench/dir} (ten children),
    C{/bench/w/0..99} and the counters C{/bench/ctr/<counterBase + 0..99>},
    which must hold integers.
    """

    async def txEmpty(i: int) -> None:
        tx = await client.startTransaction()
        await tx.commit()

    async def rmw(tx: Any, path: str) -> None:
        await tx.write(path, str(int(await tx.read(path)) + 1))

    def txRmw(i: int) -> Deferred[Any]:
        # One counter per in-flight slot: xenstored detects conflicts per
        # node, so this measures transactions (pipelined), not retries.
        path = f"/bench/ctr/{counterBase + i % 100}"
        return client.transact(lambda tx: rmw(tx, path))

    return {
        "read": lambda i: client.readBytes("/bench/key"),
        "write": lambda i: client.write(f"/bench/w/{i % 100}", VALUE),
        "directory": lambda i: client.ls("/bench/dir"),
        "tx empty": txEmpty,
        "tx rmw": txRmw,
    }


# Processes


#: Every process started with L{spawn}, so that L{terminateAll} leaves none behind.
_children: list[subprocess.Popen[bytes]] = []


def spawn(args: Sequence[str], **kwargs: Any) -> subprocess.Popen[bytes]:
    """C{subprocess.Popen} with stdin from /dev/null, remembered for L{terminateAll}."""
    proc = subprocess.Popen(list(args), stdin=subprocess.DEVNULL, **kwargs)
    _children.append(proc)
    return proc


def terminate(proc: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after C{grace} seconds; reap."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def terminateAll() -> None:
    """L{terminate} every process started with L{spawn} that still runs."""
    for proc in _children:
        terminate(proc)


# The stores


class Store:
    """A XenStore server in its own process."""

    name = "abstract"
    socketPath: str

    @property
    def pid(self) -> int | None:
        """The server's process id while it runs."""
        raise NotImplementedError()

    def stop(self) -> None:
        """Stop the server (idempotent)."""
        raise NotImplementedError()


class RealStore(Store):
    """The C xenstored (Xen 4.17) under the test shim, in C{workdir}/xenstored."""

    name = "C xenstored 4.17 (shim)"

    def __init__(self, workdir: str, domains: Iterable[int] = range(32)) -> None:
        """@param domains: the domains that exist for the shim's fake hypervisor."""
        self.daemon = RealXenstored(os.path.join(workdir, "xenstored"), domains=domains)
        self.daemon.start()
        self.socketPath = self.daemon.socketPath

    @property
    def pid(self) -> int | None:
        """The daemon's process id while it runs."""
        return self.daemon.pid

    def stop(self) -> None:
        """Stop the daemon."""
        self.daemon.stop()


def storeAnswers(socketPath: str, timeout: float = 0.5) -> bool:
    """Whether a store answers a DIRECTORY of / on C{socketPath} now."""
    try:
        reply, _ = rawRequest(socketPath, Op.DIRECTORY, b"/\0", timeout=timeout)
    except OSError:
        return False
    return bool(reply == Op.DIRECTORY)


class EmbeddedStore(Store):
    """
    The embedded xenstored as a process: C{python -m twisted [OPTIONS]
    xenstored --rundir DIR} (C{twist} runs in the foreground; it has no
    C{-n}), its log in C{workdir}/embedded-xenstored.log.
    """

    name = "embedded xenstored (python -m twisted xenstored)"

    def __init__(
        self, workdir: str, twistOptions: Sequence[str] = (), timeout: float = 30.0
    ) -> None:
        """
        @param twistOptions: options of C{twist} itself (log format, log file).
        @param timeout: seconds it may take to answer.
        """
        self.rundir = tempfile.mkdtemp(prefix="xsd-bench-")  # short: AF_UNIX paths
        self.socketPath = os.path.join(self.rundir, "socket")
        self.logPath = os.path.join(workdir, "embedded-xenstored.log")
        with open(self.logPath, "ab") as log:
            self.proc = spawn(
                [
                    sys.executable,
                    *("-m", "twisted", *twistOptions),
                    *("xenstored", "--rundir", self.rundir),
                ],
                env=benchEnv(),
                cwd=workdir,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        while not storeAnswers(self.socketPath):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"embedded xenstored did not start; see {self.logPath}")
            time.sleep(0.02)

    @property
    def pid(self) -> int | None:
        """The server's process id while it runs."""
        return self.proc.pid if self.proc.poll() is None else None

    def stop(self) -> None:
        """SIGTERM (then SIGKILL); remove its run directory."""
        terminate(self.proc)
        shutil.rmtree(self.rundir, ignore_errors=True)


StoreFactory = Callable[[str], Store]


def chooseStores(
    which: str, real: StoreFactory, embedded: StoreFactory
) -> list[StoreFactory] | None:
    """
    The store factories C{--store} asks for (C{real}, C{embedded} or
    C{both}, the real one first), each called with a work directory; None,
    after saying why on stderr, if the real xenstored is asked for but
    cannot run here.
    """
    stores: list[StoreFactory] = []
    if which in ("real", "both"):
        reason = unavailableReason()
        if reason is not None:
            print(f"cannot run the real xenstored here: {reason}", file=sys.stderr)
            return None
        stores.append(real)
    if which in ("embedded", "both"):
        stores.append(embedded)
    return stores
