"""
Benchmark: the backendctrl protocol (DriverDomainClient + BackendCtrlAgent).

In one run, against the real C xenstored (Xen 4.17 under the test shim) and
then against the embedded xenstored (C{python -m twisted xenstored}, its own
process), it measures:

  1. The round-trip time of each request type (prepare, activate,
     deactivate, unprepare, plug, unplug) made with L{DriverDomainClient}
     to an agent process (C{python -m xenddev.driverdomain.run}) serving a
     no-op kind (L{bench._noopkind.NoopKind}), against the FLOOR measured on
     the same store, interleaved with it: the bare client writes a request
     node in one transaction, an "agent" process sees the watch fire and
     deletes the node in one transaction, and the watch fires back at the
     requester (which has a standing watch and counts the two events of its
     node: its own write, then the delete). Target: mean <= 1.3x the floor.
     The XenStore requests each side sends per request type are counted in
     an untimed pass with the agent in this process (so both connections
     can be traced).
  2. 1000 vdis prepared and then activated across 10 agent processes
     (driver domains 1..10, control areas made with C{ensureArea()}), from
     one toolstack connection (10 clients on it), once with all 1000 vdis in
     flight and once with 100: total time, per-request mean/p50/p99 (failed
     calls included), transaction commits retried on EAGAIN by each side,
     XenStore requests per call, CPU seconds of toolstack, agents and store.

Agents run as processes, as driver domains would: each has its own
interpreter and connection, so the numbers are the system's (toolstack,
store, agents), not one GIL's. The embedded store runs as C{python -m
twisted xenstored --rundir DIR}: C{python -m twisted} is C{twist}, which
always runs in the foreground and has no C{-n}.

Run: C{.venv/bin/python bench/driverdomain.py [--iterations N] [--vdis N]
[--agents K] [--concurrency 0,100] [--store real|embedded|both]
[--parts 1,2] [--verbose]} (C{--verbose} prints every call's XenStore
requests, round by round).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

import attrs

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted.internet.defer import Deferred, gatherResults

from bench._common import (
    EmbeddedStore,
    RealStore,
    Stats,
    Store,
    benchEnv,
    chooseStores,
    cpuSeconds,
    runReactor,
    selfCpuSeconds,
    sleep,
    spawn,
    terminate,
    terminateAll,
)
from bench._wiretap import Counts, RequestCounter, Traced, Tracer
from xenddev.toolstack.client import DriverDomainClient
from xenddev.xenstore.client import XenStoreClient
from xenddev.xenstore.connection import connectXenStore
from xenddev.xenstore.errors import NoEntryError

#: The request types, in the order the table lists them.
REQUESTS = ("prepare", "activate", "deactivate", "unprepare", "plug", "unplug")
#: The order one lifecycle issues them in (unplug needs a plugged vbd, ...).
LIFECYCLE = ("prepare", "activate", "plug", "unplug", "deactivate", "unprepare")
TARGET_RATIO = 1.3

ROUNDTRIP_DOMID = 11  # the agent of part 1
ANATOMY_DOMID = 12  # the traced in-process agent
FLOOR_DOMID = 31  # the floor's "driver domain"
GUEST = 20  # the frontends' domain (never created: the no-op kind needs none)
TARGET = {"type": "file", "params": "/srv/bench.img", "mode": "w"}
FRONTEND = f"/local/domain/{GUEST}/device/vbd/51712"
EVENT_TIMEOUT = 30.0


# Agent processes


class AgentProcess:
    """
    C{python -m xenddev.driverdomain.run} with the no-op kind, for one domid.

    @param countsPath: if given, the agent counts its XenStore requests and
        transaction conflicts and writes them there when stopped
        (L{bench._noopkind.countingNoopKind}).
    """

    def __init__(
        self, socketPath: str, domid: int, logPath: str, countsPath: str | None = None
    ) -> None:
        self.domid = domid
        self.logPath = logPath
        self.countsPath = countsPath
        env = benchEnv()
        factory = "bench._noopkind:NoopKind"
        if countsPath is not None:
            env["XENDDEV_BENCH_COUNTS"] = countsPath
            factory = "bench._noopkind:countingNoopKind"
        with open(logPath, "wb") as log:
            self.proc = spawn(
                [
                    sys.executable,
                    *("-m", "xenddev.driverdomain.run"),
                    *("--xenstore", f"unix:{socketPath}", "--domid", str(domid)),
                    *("--kinds", "", "--kind-factory", factory, "--no-hotplug"),
                ],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    async def ready(self, timeout: float = 30.0) -> None:
        """Wait for the agent's "ready" log line (its watch is registered)."""
        marker = f"Agent for domain {self.domid} ready"
        deadline = time.monotonic() + timeout
        while True:
            with open(self.logPath, errors="replace") as f:
                if marker in f.read():
                    return
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"agent for domain {self.domid} did not start: {self.logPath}")
            await sleep(0.02)

    def cpu(self) -> float:
        return cpuSeconds(self.proc.pid)

    def stop(self) -> None:
        terminate(self.proc, 5.0)

    def counts(self) -> dict[str, int]:
        """After L{stop}: the agent's request and conflict counts (empty if none)."""
        if self.countsPath is None or not os.path.exists(self.countsPath):
            return {}
        with open(self.countsPath) as f:
            counts: dict[str, int] = json.load(f)
        return counts


class FloorAgentProcess:
    """This script in C{--floor-agent} mode: the floor's driver-domain side."""

    def __init__(self, socketPath: str, domid: int) -> None:
        self.proc = spawn(
            [sys.executable, os.path.abspath(__file__), "--floor-agent", socketPath, str(domid)],
            env=benchEnv(),
            stdout=subprocess.PIPE,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if line.strip() != b"ready":
            self.stop()
            raise RuntimeError(f"floor agent did not start: {line!r}")

    def stop(self) -> None:
        terminate(self.proc, 5.0)


def floorBase(domid: int) -> str:
    return f"/local/domain/{domid}/floor"


async def floorAgent(socketPath: str, domid: int) -> None:
    """
    The floor's driver-domain side: on each watch event for a C{request}
    node, delete it in one transaction. The event of its own delete is
    counted in advance (it may arrive before the commit's reply) and skipped.
    """
    xs = await connectXenStore(None, f"unix:{socketPath}")
    ownDeletes: collections.Counter[str] = collections.Counter()

    async def answer(path: str) -> None:
        tx = await xs.startTransaction()
        try:
            await tx.rm(path)
        except NoEntryError:
            await tx.abort()
            return
        ownDeletes[path] += 1
        try:
            await tx.commit()
        except Exception:
            ownDeletes[path] -= 1
            raise

    def changed(path: str) -> None:
        if not path.endswith("/request"):
            return
        if ownDeletes[path]:
            ownDeletes[path] -= 1
            return
        Deferred.fromCoroutine(answer(path))

    base = floorBase(domid)
    await xs.mkdir(base)
    await xs.watch(base, changed)
    print("ready", flush=True)
    await Deferred()  # until SIGTERM stops the reactor


class FloorRequester:
    """
    The floor's toolstack side: a standing watch on the floor area; a round
    trip writes C{request} in one transaction and waits for the second event
    on it (the first is its own write, the second the agent's delete).
    """

    def __init__(self, xs: XenStoreClient, domid: int) -> None:
        self.xs = xs
        self.base = floorBase(domid)
        self._waiting: dict[str, tuple[list[int], Deferred[None]]] = {}

    async def start(self) -> None:
        await self.xs.mkdir(self.base)
        await self.xs.watch(self.base, self._changed)

    def _changed(self, path: str) -> None:
        entry = self._waiting.get(path)
        if entry is None:
            return
        left, d = entry
        left[0] -= 1
        if left[0] == 0:
            del self._waiting[path]
            d.callback(None)

    async def roundTrip(self, name: str, request: str) -> None:
        from twisted.internet import reactor

        path = f"{self.base}/{name}/request"
        d: Deferred[None] = Deferred()
        self._waiting[path] = ([2], d)
        d.addTimeout(EVENT_TIMEOUT, reactor)
        await self.xs.transact(lambda tx: tx.write(path, request))
        await d


# Part 1: round trips against the floor


@attrs.frozen
class RoundTrips:
    floor: Stats
    requests: dict[str, Stats]


async def timed(call: Callable[[], Awaitable[object]]) -> float:
    clock = time.perf_counter
    t = clock()
    await call()
    return clock() - t


def lifecycle(client: DriverDomainClient, name: str) -> dict[str, Callable[[], Awaitable[object]]]:
    """The six calls of one vdi's life, by request type."""
    return {
        "prepare": lambda: client.prepare(name, TARGET),
        "activate": lambda: client.activate(name),
        "plug": lambda: client.plug(name, "xvda", FRONTEND),
        "unplug": lambda: client.unplug(name, "xvda"),
        "deactivate": lambda: client.deactivate(name),
        "unprepare": lambda: client.unprepare(name),
    }


async def measureRoundTrips(store: Store, workdir: str, iterations: int, warmup: int) -> RoundTrips:
    """One floor round trip, then one vdi lifecycle, C{warmup + iterations} times."""
    agent = AgentProcess(store.socketPath, ROUNDTRIP_DOMID, os.path.join(workdir, "agent-rt.log"))
    floorAgentProc = FloorAgentProcess(store.socketPath, FLOOR_DOMID)
    xs = await connectXenStore(None, f"unix:{store.socketPath}")
    try:
        client = DriverDomainClient(xs, ROUNDTRIP_DOMID)
        await client.ensureArea()
        await agent.ready()
        floor = FloorRequester(xs, FLOOR_DOMID)
        await floor.start()
        floorSamples: list[float] = []
        samples: dict[str, list[float]] = {r: [] for r in REQUESTS}
        for i in range(warmup + iterations):
            f = await timed(lambda: floor.roundTrip("obj", "activate"))
            calls = lifecycle(client, f"rt{i}")
            times = {r: await timed(calls[r]) for r in LIFECYCLE}
            if i >= warmup:
                floorSamples.append(f)
                for r in REQUESTS:
                    samples[r].append(times[r])
        return RoundTrips(
            Stats(tuple(floorSamples)), {r: Stats(tuple(s)) for r, s in samples.items()}
        )
    finally:
        await xs.disconnect()
        agent.stop()
        floorAgentProc.stop()


# Anatomy: which XenStore requests each side sends (untimed, traced)


@attrs.frozen
class Sent:
    """One XenStore request: who sent it, what, when, when answered."""

    side: str
    op: str
    path: str
    sent: float
    answered: float


def traceConnection(xs: XenStoreClient, side: str, log: list[Sent]) -> None:
    """Record every request C{xs} sends (and when its reply arrives), at its transport."""

    def record(t: Traced) -> None:
        log.append(Sent(side, t.op, t.path, t.sent, t.answered))

    Tracer(record).tap(xs.protocol)


def rounds(sent: Iterable[Sent]) -> list[list[Sent]]:
    """
    Group requests into sequential rounds: a new round starts when a request
    is sent after every earlier one was answered (pipelined requests share a
    round). Background requests overlapping a round join it.
    """
    groups: list[list[Sent]] = []
    busyUntil = -1.0
    for s in sorted(sent, key=lambda s: s.sent):
        if s.sent > busyUntil or not groups:
            groups.append([])
        groups[-1].append(s)
        busyUntil = max(busyUntil, s.answered)
    return groups


@attrs.frozen
class Anatomy:
    """Per request type: the client's and the agent's requests."""

    client: dict[str, list[Sent]]
    agent: dict[str, list[Sent]]


async def measureAnatomy(store: Store) -> Anatomy:
    """
    One lifecycle with the agent in this process, both connections traced
    (after an untraced one, to warm both sides). Each call is followed by a
    pause, so the agent's trailing work (answering the watch events of the
    client's tidy-up) is counted with the call that caused it.
    """
    from bench._noopkind import NoopKind
    from xenddev.driverdomain.agent import BackendCtrlAgent

    xs = await connectXenStore(None, f"unix:{store.socketPath}")
    agentXs = await connectXenStore(None, f"unix:{store.socketPath}")
    agent = BackendCtrlAgent(agentXs, ANATOMY_DOMID, [NoopKind()])
    try:
        client = DriverDomainClient(xs, ANATOMY_DOMID)
        await client.ensureArea()
        await agent.start()
        warm = lifecycle(client, "warm")
        for r in LIFECYCLE:
            await warm[r]()
        await agent.whenIdle()
        await sleep(0.1)  # the warm lifecycle's trailing events
        log: list[Sent] = []
        traceConnection(xs, "client", log)
        traceConnection(agentXs, "agent", log)
        calls = lifecycle(client, ANATOMY_NAME)
        result = Anatomy({}, {})
        for r in LIFECYCLE:
            del log[:]
            await calls[r]()
            await agent.whenIdle()
            await sleep(0.05)
            result.client[r] = [s for s in log if s.side == "client"]
            result.agent[r] = [s for s in log if s.side == "agent"]
        return result
    finally:
        await agent.stop()
        await xs.disconnect()
        await agentXs.disconnect()


ANATOMY_NAME = "d"


def describeRounds(sent: Sequence[Sent]) -> str:
    """C{TXSTART -> READ state + READ request -> ...}, paths shortened."""
    return " -> ".join(
        " + ".join(f"{_OP_SHORT.get(s.op, s.op)}{_shortPath(s.path)}" for s in group)
        for group in rounds(sent)
    )


_OP_SHORT = {
    "TRANSACTION_START": "TXSTART",
    "TRANSACTION_END": "TXEND",
    "DIRECTORY": "LS",
    "GET_PERMS": "GETPERMS",
    "SET_PERMS": "SETPERMS",
}


def _shortPath(path: str) -> str:
    """
    Paths relative to the object (C{state}, C{vbd/xvda/frontend}); the
    agent's records as C{priv:...}; others relative to the driver domain's
    home, or absolute. Reads include C{exists()}, which is a read.
    """
    if not path or path.startswith("tx "):
        return ""
    home = f"/local/domain/{ANATOMY_DOMID}/"
    obj = f"{home}backendctrl/vdi/{ANATOMY_NAME}"
    if path == obj:
        return " <vdi dir>"
    if path.startswith(obj + "/"):
        return " " + path[len(obj) + 1 :]
    if path.startswith(home + "private/xenddev/"):
        return " priv:" + path[len(home) + len("private/xenddev/") :]
    if path.startswith(home):
        return " ~/" + path[len(home) :]
    return " " + path


# Part 2: 1000 vdis across 10 agent processes


@attrs.frozen
class Scale:
    """One run of part 2: timings, failures and the work each party did."""

    vdis: int
    agents: int
    concurrency: int
    seconds: float
    prepare: Stats
    activate: Stats
    failures: dict[str, collections.Counter[str]]
    conflicts: int
    agentConflicts: int
    toolstackRequests: int
    agentRequests: int
    cpu: dict[str, float]


async def measureScale(
    store: Store, workdir: str, vdis: int, agents: int, concurrency: int
) -> Scale:
    """
    Prepare then activate C{vdis} vdis spread round-robin over C{agents}
    fresh agent processes, C{concurrency} vdis in flight (0: all at once).
    Every call's latency is recorded, failed ones included (a failed prepare
    is not followed by an activate). Afterwards the agents are stopped and
    their control areas removed, so the next run starts from the same tree.
    """
    domids = list(range(1, agents + 1))
    tag = f"c{concurrency}"
    procs = [
        AgentProcess(
            store.socketPath,
            d,
            os.path.join(workdir, f"agent-{tag}-{d}.log"),
            os.path.join(workdir, f"agent-{tag}-{d}.counts"),
        )
        for d in domids
    ]
    xs = await connectXenStore(None, f"unix:{store.socketPath}")
    toolstack = Counts()
    RequestCounter(toolstack).tap(xs.protocol)
    stopped = False
    try:
        clients = {d: DriverDomainClient(xs, d, timeout=120.0) for d in domids}
        await gatherResults([Deferred.fromCoroutine(c.ensureArea()) for c in clients.values()])
        await gatherResults([Deferred.fromCoroutine(p.ready()) for p in procs])
        latencies: dict[str, list[float]] = {"prepare": [], "activate": []}
        failures: dict[str, collections.Counter[str]] = {
            r: collections.Counter() for r in latencies
        }
        work = iter(range(vdis))

        async def call(request: str, fn: Callable[..., Awaitable[object]], *args: Any) -> bool:
            clock = time.perf_counter
            t = clock()
            try:
                await fn(*args)
                return True
            except Exception as e:
                failures[request][type(e).__name__] += 1
                return False
            finally:
                latencies[request].append(clock() - t)

        async def worker() -> None:
            for j in work:
                client = clients[domids[j % agents]]
                name = f"v{j}"
                if await call("prepare", client.prepare, name, TARGET):
                    await call("activate", client.activate, name)

        width = concurrency if concurrency > 0 else vdis
        sentBefore = xs.protocol.requestsSent
        cpuBefore = _cpuSnapshot(store, procs)
        start = time.perf_counter()
        await gatherResults([Deferred.fromCoroutine(worker()) for _ in range(width)])
        seconds = time.perf_counter() - start
        cpuAfter = _cpuSnapshot(store, procs)
        toolstackRequests = xs.protocol.requestsSent - sentBefore
        for p in procs:
            p.stop()
        stopped = True
        agentCounts = [p.counts() for p in procs]
        # Leave the tree as this run found it, for the next one.
        for d in domids:
            for top in ("backendctrl", "private", "backend"):
                await xs.rm(f"/local/domain/{d}/{top}", missingOk=True)
        return Scale(
            vdis,
            agents,
            width,
            seconds,
            Stats(tuple(latencies["prepare"])),
            Stats(tuple(latencies["activate"])),
            failures,
            toolstack.conflicts,
            sum(c.get("conflicts", 0) for c in agentCounts),
            toolstackRequests,
            sum(c.get("requests", 0) for c in agentCounts),
            {k: cpuAfter[k] - cpuBefore[k] for k in cpuAfter},
        )
    finally:
        await xs.disconnect()
        if not stopped:
            for p in procs:
                p.stop()


def _cpuSnapshot(store: Store, procs: Sequence[AgentProcess]) -> dict[str, float]:
    return {
        "toolstack": selfCpuSeconds(),
        f"{len(procs)} agents": sum(p.cpu() for p in procs),
        "xenstored": cpuSeconds(store.pid) if store.pid else 0.0,
    }


# Report


def printRoundTrips(rt: RoundTrips, anatomy: Anatomy, iterations: int) -> list[str]:
    """Print table 1; return the rows that missed the target."""
    print(
        f"1. Round trip per request: {iterations} lifecycles, one call at a time, to an "
        f"agent process\n   with a no-op kind; floor interleaved (one floor round trip "
        f"before each lifecycle).\n   xs req/rounds: XenStore requests each side sends for "
        f"one call, and in how many sequential rounds\n   (requests sent together count once; "
        f"the agent's includes answering the events of the client's tidy-up)."
    )
    head = (
        f"{'request':<11} {'mean ms':>8} {'p99 ms':>8} {'mean/floor':>11} {'p99/floor':>10}"
        f"  {'client xs req/rounds':>20} {'agent xs req/rounds':>19}  target"
    )
    print(head)
    print("-" * len(head))
    fl = rt.floor
    print(
        f"{'FLOOR':<11} {fl.meanMs:>8.3f} {fl.p99Ms:>8.3f} {1.0:>10.2f}x {1.0:>9.2f}x"
        f"  {'3/3':>20} {'3/3':>19}"
    )
    misses = []
    for r in REQUESTS:
        s = rt.requests[r]
        ratio = s.meanMs / fl.meanMs
        ok = ratio <= TARGET_RATIO
        if not ok:
            misses.append(f"{r} {ratio:.2f}x")
        c, a = anatomy.client[r], anatomy.agent[r]
        print(
            f"{r:<11} {s.meanMs:>8.3f} {s.p99Ms:>8.3f} {ratio:>10.2f}x "
            f"{s.p99Ms / fl.p99Ms:>9.2f}x  {f'{len(c)}/{len(rounds(c))}':>20} "
            f"{f'{len(a)}/{len(rounds(a))}':>19}  {'met' if ok else 'MISSED'}"
        )
    print()
    return misses


def printAnatomy(anatomy: Anatomy) -> None:
    print("   XenStore requests per call, in sequential rounds (' + ' = pipelined):")
    for r in REQUESTS:
        print(f"   {r}")
        print(f"     client: {describeRounds(anatomy.client[r])}")
        print(f"     agent:  {describeRounds(anatomy.agent[r])}")
    print()


def printScale(runs: Sequence[Scale]) -> None:
    """Print table 2: one row block per concurrency setting."""
    s0 = runs[0]
    print(
        f"2. {s0.vdis} vdis prepared then activated across {s0.agents} agent processes "
        f"(domids 1..{s0.agents}, no-op kind),\n   one toolstack connection; every call's "
        f"latency counted, failed ones included."
    )
    head = (
        f"{'in flight':>9} {'request':<9} {'calls':>6} {'failed':>6} {'mean ms':>9} "
        f"{'p50 ms':>9} {'p99 ms':>9} {'max ms':>9}"
    )
    print(head)
    print("-" * len(head))
    for s in runs:
        both = Stats(s.prepare.samples + s.activate.samples)
        rows = (("prepare", s.prepare), ("activate", s.activate), ("all", both))
        for label, st in rows:
            failed = sum(sum(c.values()) for r, c in s.failures.items() if label in (r, "all"))
            print(
                f"{s.concurrency:>9} {label:<9} {len(st.samples):>6} {failed:>6} "
                f"{st.meanMs:>9.1f} {st.p50Ms:>9.1f} {st.p99Ms:>9.1f} {st.maxMs:>9.1f}"
            )
        n = len(both.samples)
        done = s.vdis - sum(s.failures["prepare"].values()) - sum(s.failures["activate"].values())
        print(
            f"{s.concurrency:>9} total {s.seconds:.2f} s: {done} vdis active, "
            f"{done / s.seconds:.0f} vdis/s, {n / s.seconds:.0f} calls/s"
        )
        kinds = collections.Counter[str]()
        for c in s.failures.values():
            kinds.update(c)
        failures = ", ".join(f"{k} x{v}" for k, v in kinds.items()) or "none"
        print(f"{'':>9} failures: {failures}")
        print(
            f"{'':>9} commits retried on EAGAIN: toolstack {s.conflicts}, agents "
            f"{s.agentConflicts}; XenStore requests per call: toolstack "
            f"{s.toolstackRequests / max(1, n):.1f}, agents {s.agentRequests / max(1, n):.1f}"
        )
        cpu = ", ".join(f"{k} {v:.1f}" for k, v in s.cpu.items())
        print(f"{'':>9} CPU seconds: {cpu} ({os.cpu_count()} CPUs)")
    print()


# Main


async def benchStore(
    store: Store, workdir: str, args: argparse.Namespace
) -> tuple[RoundTrips | None, Anatomy | None, list[Scale]]:
    """The parts asked for, on one store."""
    rt, anatomy = None, None
    if 1 in args.parts:
        rt = await measureRoundTrips(store, workdir, args.iterations, args.warmup)
        anatomy = await measureAnatomy(store)
    scale = []
    if 2 in args.parts:
        scale = [
            await measureScale(store, workdir, args.vdis, args.agents, c) for c in args.concurrency
        ]
    return rt, anatomy, scale


def main(argv: list[str] | None = None) -> int:
    """Start each store in turn, run both parts, print the tables."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").strip().splitlines()[0])
    parser.add_argument("--iterations", type=int, default=300, help="timed lifecycles (part 1)")
    parser.add_argument("--warmup", type=int, default=20, help="untimed lifecycles first")
    parser.add_argument("--vdis", type=int, default=1000, help="vdis in part 2")
    parser.add_argument("--agents", type=int, default=10, help="agent processes in part 2")
    parser.add_argument(
        "--concurrency",
        type=lambda text: [int(c) for c in text.split(",")],
        default=[0, 100],
        help="comma-separated vdis in flight in part 2, one run each (0: all; default 0,100)",
    )
    parser.add_argument("--store", choices=("both", "real", "embedded"), default="both")
    parser.add_argument(
        "--parts",
        type=lambda text: {int(p) for p in text.split(",")},
        default={1, 2},
        help="which parts to run: 1 (round trips), 2 (1000 vdis); default 1,2",
    )
    parser.add_argument(
        "--verbose", action="store_true", help="print each call's XenStore requests"
    )
    parser.add_argument(
        "--floor-agent", nargs=2, metavar=("SOCKET", "DOMID"), help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)

    if args.floor_agent:
        socketPath, domid = args.floor_agent
        runReactor(lambda: floorAgent(socketPath, int(domid)))
        return 0
    if not 1 <= args.agents <= 10:
        parser.error("--agents must be 1..10 (domids 1..10)")

    kinds = chooseStores(
        args.store,
        lambda workdir: RealStore(workdir, domains=range(32)),
        lambda workdir: EmbeddedStore(workdir, ("--log-format", "text")),
    )
    if kinds is None:
        return 2

    workdir = tempfile.mkdtemp(prefix="xenddev-bench-dd-")
    results: list[tuple[str, tuple[RoundTrips | None, Anatomy | None, list[Scale]]]] = []

    stores: list[Store] = []

    async def everything() -> None:
        for kind in kinds:
            store = kind(workdir)
            stores.append(store)
            try:
                results.append((store.name, await benchStore(store, workdir, args)))
            finally:
                store.stop()

    try:
        runReactor(everything)
    finally:
        terminateAll()
        for store in stores:
            store.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    print(
        f"xenddev driver-domain protocol benchmark; this machine ({os.cpu_count()} CPUs); "
        f"target: each request's mean <= {TARGET_RATIO}x the floor\n"
    )
    allMisses: list[str] = []
    for name, (rt, anatomy, scale) in results:
        print(f"=== {name} ===\n")
        if rt is not None and anatomy is not None:
            misses = printRoundTrips(rt, anatomy, args.iterations)
            if args.verbose:
                printAnatomy(anatomy)
            allMisses += [f"{name}: {m}" for m in misses]
        if scale:
            printScale(scale)
    if 1 not in args.parts:
        print("targets: not checked (part 1 not run)")
    elif allMisses:
        print(f"targets: MISSED (> {TARGET_RATIO}x the floor): " + "; ".join(allMisses))
    else:
        print(f"targets: all met (every request's mean <= {TARGET_RATIO}x the floor)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
