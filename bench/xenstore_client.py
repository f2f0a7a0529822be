"""
Benchmark: the xenddev XenStore client against pyxs and the C floor.

In one run, against one real C xenstored (Xen 4.17 under the test shim), it
measures ops/s and mean/p99 latency for:

  (a) pyxs 0.4.1, sequential (one request at a time; its router thread),
  (b) xenddev, sequential (await each reply before the next request),
  (c) xenddev with 100 requests in flight,

for read, write, directory, empty transaction and read-modify-write
transaction, plus the C floor: Debian's C{test-xenstore} (libxenstore) run
against the same daemon. Targets: (c) >= 5x (a) throughput on read and write;
(b) latency <= 1.5x (a).

Each row also gives this process's CPU time per operation (user + system,
pyxs's thread included): the client's own cost per request, which stays
comparable when other work on the machine makes ops/s and latencies wander
(it excludes the time spent waiting for xenstored or for a CPU). The header
gives the load average before and after the run.

Run: C{.venv/bin/python bench/xenstore_client.py [--ops N] [--inflight K]
[--repeat R] [--quick]}; with C{--repeat} every cell (pyxs's too) is the
best of R runs.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet.defer import Deferred

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._common import OPS, VALUE, clientWorkload, runReactor, selfCpuSeconds
from tests.support.realxenstored import RealXenstored, unavailableReason


@attrs.frozen
class Result:
    """Timings of one (client mode, operation) cell."""

    count: int
    seconds: float
    latencies: tuple[float, ...]
    #: CPU time (user + system) this process spent on the cell.
    cpuSeconds: float = 0.0

    @property
    def opsPerSecond(self) -> float:
        return self.count / self.seconds if self.seconds else 0.0

    @property
    def cpuUsPerOp(self) -> float:
        return self.cpuSeconds / self.count * 1e6 if self.count else 0.0

    @property
    def meanUs(self) -> float:
        return statistics.fmean(self.latencies) * 1e6

    @property
    def p99Us(self) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1e6


def prepare(socketPath: str) -> None:
    """Create the nodes every workload reads (with pyxs, before timing)."""
    from pyxs import Client

    with Client(unix_socket_path=socketPath) as c:
        c.write(b"/bench/key", VALUE)
        for i in range(10):
            c.write(b"/bench/dir/child-%d" % i, VALUE)
        for i in range(200):
            c.write(b"/bench/ctr/%d" % i, b"0")


def timeSequential(n: int, op: Callable[[int], object]) -> Result:
    """Run C{op(i)} n times, one after another, timing each."""
    lat: list[float] = []
    clock = time.perf_counter
    cpu = selfCpuSeconds()
    start = clock()
    for i in range(n):
        t = clock()
        op(i)
        lat.append(clock() - t)
    return Result(n, clock() - start, tuple(lat), selfCpuSeconds() - cpu)


def benchPyxs(socketPath: str, n: int) -> dict[str, Result]:
    """(a): pyxs's blocking Client, sequential."""
    from pyxs import Client

    results: dict[str, Result] = {}
    with Client(unix_socket_path=socketPath) as c:

        def txEmpty(i: int) -> None:
            c.transaction()
            c.commit()

        def txRmw(i: int) -> None:
            path = b"/bench/ctr/%d" % (i % 100)
            c.transaction()
            c.write(path, b"%d" % (int(c.read(path)) + 1))
            c.commit()

        ops: dict[str, Callable[[int], object]] = {
            "read": lambda i: c.read(b"/bench/key"),
            "write": lambda i: c.write(b"/bench/w/%d" % (i % 100), VALUE),
            "directory": lambda i: c.list(b"/bench/dir"),
            "tx empty": txEmpty,
            "tx rmw": txRmw,
        }
        for name in OPS:
            results[name] = timeSequential(n, ops[name])
    return results


def xenddevOps(client: Any) -> dict[str, Callable[[int], Deferred[Any]]]:
    """
    The five workloads as Deferred factories on a XenStoreClient (the
    shared workload; its counters are /bench/ctr/100..199, pyxs uses 0..99).
    """
    ops = clientWorkload(client, counterBase=100)
    txEmpty = ops["tx empty"]
    ops["tx empty"] = lambda i: Deferred.fromCoroutine(txEmpty(i))
    return ops


def timeAsync(n: int, inflight: int, op: Callable[[int], Deferred[Any]]) -> Deferred[Result]:
    """
    Run C{op(i)} n times keeping C{inflight} calls outstanding, chaining
    plain Deferred callbacks (as a Twisted program would), timing each call.
    """
    lat: list[float] = []
    clock = time.perf_counter
    done: Deferred[Result] = Deferred()
    counters = {"next": 0, "finished": 0}
    cpu = selfCpuSeconds()
    start = clock()

    def launch() -> None:
        i = counters["next"]
        counters["next"] += 1
        t = clock()
        op(i).addCallbacks(finished, done.errback, callbackArgs=(t,))

    def finished(_: object, t: float) -> None:
        lat.append(clock() - t)
        counters["finished"] += 1
        if counters["next"] < n:
            launch()
        elif counters["finished"] == n:
            done.callback(Result(n, clock() - start, tuple(lat), selfCpuSeconds() - cpu))

    for _ in range(min(inflight, n)):
        launch()
    return done


async def benchXenddev(
    reactor: Any, socketPath: str, n: int, inflight: int, repeat: int = 1
) -> tuple[dict[str, Result], dict[str, Result]]:
    """
    (b) and (c): our client, sequential and with C{inflight} in flight;
    each cell the best of C{repeat} runs.
    """
    from xenddev.xenstore import connectXenStore

    client = await connectXenStore(reactor, f"unix:{socketPath}")
    ops = xenddevOps(client)
    seq: dict[str, Result] = {}
    par: dict[str, Result] = {}
    for _ in range(repeat):
        seq = best(seq, {name: await timeAsync(n, 1, ops[name]) for name in OPS})
        par = best(par, {name: await timeAsync(n * 5, inflight, ops[name]) for name in OPS})
    await client.disconnect()
    return seq, par


def best(old: dict[str, Result], new: dict[str, Result]) -> dict[str, Result]:
    """Per cell, the result with more ops/s."""
    return {
        name: r if name not in old or r.opsPerSecond > old[name].opsPerSecond else old[name]
        for name, r in new.items()
    }


def runTestXenstore(env: dict[str, str], iterations: int) -> dict[str, float]:
    """The C floor: test-xenstore's average ns per test, by test name."""
    exe = "/usr/lib/xen-4.17/bin/test-xenstore"
    if not os.path.exists(exe):
        return {}
    out = subprocess.run(
        [exe, "-i", str(iterations)], env=env, capture_output=True, text=True, timeout=600
    ).stdout
    floor: dict[str, float] = {}
    for line in out.splitlines():
        m = re.match(r"(.+?)\s*: avg: (\d+) ns", line)
        if m:
            floor[m.group(1).strip()] = int(m.group(2)) / 1000.0
    return floor


#: Our operation names and the test-xenstore test closest to each.
FLOOR_TEST = {
    "read": "read 1",
    "write": "write 1",
    "directory": "dir",
    "tx empty": "ta empty",
    "tx rmw": "ta rmw",
}


def printTable(
    a: dict[str, Result],
    b: dict[str, Result],
    c: dict[str, Result],
    floor: dict[str, float],
    inflight: int,
) -> list[str]:
    """Print the comparison table; return the lines that missed a target."""
    misses: list[str] = []
    head = (
        f"{'operation':<10} {'mode':<26} {'ops/s':>10} {'mean us':>9} {'p99 us':>9}  vs pyxs"
        f"  {'cpu us/op':>9}"
    )
    print(head)
    print("-" * len(head))
    for name in OPS:
        rows = [
            ("(a) pyxs sequential", a[name]),
            ("(b) xenddev sequential", b[name]),
            (f"(c) xenddev {inflight} in flight", c[name]),
        ]
        for label, r in rows:
            ratio = r.opsPerSecond / a[name].opsPerSecond
            print(
                f"{name:<10} {label:<26} {r.opsPerSecond:>10.0f} {r.meanUs:>9.1f} "
                f"{r.p99Us:>9.1f}  {ratio:5.2f}x  {r.cpuUsPerOp:>9.1f}"
            )
        test = FLOOR_TEST[name]
        if test in floor:
            us = floor[test]
            print(f"{name:<10} {'C floor: test-xenstore':<26} {1e6 / us:>10.0f} {us:>9.1f}")
        if name in ("read", "write"):
            speedup = c[name].opsPerSecond / a[name].opsPerSecond
            if speedup < 5:
                misses.append(f"{name}: (c) is {speedup:.1f}x pyxs throughput (target >= 5x)")
        latency = b[name].meanUs / a[name].meanUs
        if latency > 1.5:
            misses.append(f"{name}: (b) mean latency {latency:.2f}x pyxs (target <= 1.5x)")
        print()
    return misses


def main(argv: list[str] | None = None) -> int:
    """Start a real xenstored, run every workload, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--ops", type=int, default=None, help="operations per sequential cell")
    parser.add_argument("--inflight", type=int, default=100, help="requests in flight for (c)")
    parser.add_argument("--floor-iterations", type=int, default=None)
    parser.add_argument(
        "--repeat", type=int, default=1, help="run every cell this often, keep the best"
    )
    parser.add_argument(
        "--quick", action="store_true", help="500 ops per sequential cell, 500 floor iterations"
    )
    args = parser.parse_args(argv)
    if args.ops is None:
        args.ops = 500 if args.quick else 2000
    if args.floor_iterations is None:
        args.floor_iterations = 500 if args.quick else 2000

    reason = unavailableReason()
    if reason is not None:
        print(f"cannot run the real xenstored here: {reason}", file=sys.stderr)
        return 2
    workdir = tempfile.mkdtemp(prefix="xenddev-bench-")
    daemon = RealXenstored(workdir)
    loadBefore = os.getloadavg()[0]
    daemon.start()
    try:
        prepare(daemon.socketPath)
        a: dict[str, Result] = {}
        for _ in range(args.repeat):
            a = best(a, benchPyxs(daemon.socketPath, args.ops))
        floor = runTestXenstore(daemon.env(), args.floor_iterations)

        from twisted.internet import reactor

        b, c = runReactor(
            lambda: benchXenddev(reactor, daemon.socketPath, args.ops, args.inflight, args.repeat)
        )
    finally:
        daemon.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    print(
        f"xenddev XenStore client benchmark: {args.ops} ops per sequential cell, "
        f"{args.ops * 5} per pipelined cell, best of {args.repeat}; one C xenstored 4.17 "
        f"(shim), this machine: {os.cpu_count()} CPUs, 1-min load average "
        f"{loadBefore:.2f} before, {os.getloadavg()[0]:.2f} after\n"
    )
    misses = printTable(a, b, c, floor, args.inflight)
    print("targets: " + ("all met" if not misses else "MISSED: " + "; ".join(misses)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
