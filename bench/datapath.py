"""
Benchmark: quiesce and resume through the data-path registry.

  1. 100 tapdisk data paths sharing one parent, registered in driver
     domains 0 and 3 (50 each). The tapdisks are STAND-INS: 100 real idle
     child processes (C{sleep}); the pauser sends real signals (SIGSTOP to
     pause, SIGCONT to resume) and waits until C{/proc/<pid>/stat} shows the
     process stopped / running again.
  2. 10 qemu exports: 10 real C{qemu-storage-daemon}s, each serving a qcow2
     overlay of one shared parent over NBD; paused with L{QemuPauser}
     (export deleted, graph closed; reopened and re-exported on resume).

For each, the time of C{DataPathControl.quiesce(parent)} +
C{resume(handle)} (registry scan of XenStore included, everything in
parallel) against the FLOOR: the same pause/unpause commands issued
directly, in parallel, to processes/sockets already known (no registry).

Run: C{.venv/bin/python bench/datapath.py [--iterations N] [--taps N]
[--qemus N]}. Store: the embedded xenstored on its own thread.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import deferLater
from zope.interface import implementer

from xenddev.datapath import (
    DataPath,
    DataPathControl,
    IDataPathPauser,
    QemuPauser,
    registryDir,
)
from xenddev.datapath import qemu as graph
from xenddev.qmp import connectQMP
from xenddev.xenstore.connection import connectXenStore


def procState(pid: int) -> bytes:
    """The one-letter state of a process."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        return f.read().rsplit(b")", 1)[1].split()[0]


async def waitState(reactor: Any, pid: int, stopped: bool) -> None:
    """Until the process is stopped (T) or no longer stopped."""
    while (procState(pid) == b"T") != stopped:
        await deferLater(reactor, 0.0005, lambda: None)


def signalAndWait(reactor: Any, pid: int, stop: bool) -> Deferred[None]:
    """SIGSTOP/SIGCONT, then wait for the state change: one pause/unpause."""
    os.kill(pid, signal.SIGSTOP if stop else signal.SIGCONT)
    return Deferred.fromCoroutine(waitState(reactor, pid, stop))


@implementer(IDataPathPauser)
class SignalPauser:
    """STAND-IN tap pauser: SIGSTOP/SIGCONT to the recorded pid."""

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor

    def pause(self, dp: DataPath) -> Deferred[None]:
        assert dp.pid is not None
        return signalAndWait(self.reactor, dp.pid, True)

    def resume(self, dp: DataPath, reload: bool) -> Deferred[None]:
        assert dp.pid is not None
        return signalAndWait(self.reactor, dp.pid, False)


def summary(samples: list[float]) -> str:
    ms = sorted(s * 1000 for s in samples)
    return f"{statistics.mean(ms):8.2f} {ms[len(ms) // 2]:8.2f} {ms[-1]:8.2f}"


async def bench(reactor: Any, args: argparse.Namespace, workdir: str) -> list[tuple[str, ...]]:
    from xenddev.xenstore.server.threaded import ThreadedXenstored

    sock = os.path.join(workdir, "xs")
    store = ThreadedXenstored(sock)
    store.start()
    procs: list[subprocess.Popen[bytes]] = []
    xs: Any = None
    try:
        from twisted.internet.endpoints import UNIXClientEndpoint

        xs = await connectXenStore(reactor, endpoint=UNIXClientEndpoint(reactor, sock))
        for dd in (0, 3):
            await xs.mkdir(registryDir(dd))
        rows: list[tuple[str, ...]] = []
        parent = os.path.join(workdir, "parent.qcow2")
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", parent, "64M"], check=True)

        # 1. Tapdisk stand-ins.
        taps = []
        for i in range(args.taps):
            p = subprocess.Popen(["sleep", "3600"])
            procs.append(p)
            dd = 0 if i % 2 == 0 else 3
            leaf = os.path.join(workdir, f"t{i}.vhd")
            taps.append(DataPath(dd, f"t{i}", "tap", "h", leaf, "vhd", (leaf, parent), p.pid, i))
        await registerAll(xs, taps)
        control = DataPathControl(xs, {"tap": SignalPauser(reactor)})
        timed, floor = [], []
        for _ in range(args.iterations):
            t0 = time.perf_counter()
            handle = await control.quiesce(parent)
            await control.resume(handle)
            timed.append(time.perf_counter() - t0)
            assert len(handle.paused) == 0
            t0 = time.perf_counter()
            await gatherResults([signalAndWait(reactor, d.pid or 0, True) for d in taps])
            await gatherResults([signalAndWait(reactor, d.pid or 0, False) for d in taps])
            floor.append(time.perf_counter() - t0)
        rows.append((f"{args.taps} tapdisks (stand-in)", summary(timed), summary(floor)))
        await unregisterAll(xs, taps)

        # 2. Real qemu-storage-daemons.
        qemus = []
        for i in range(args.qemus):
            leaf = os.path.join(workdir, f"q{i}.qcow2")
            subprocess.run(
                ["qemu-img", "create", "-q", "-f", "qcow2", "-b", parent, "-F", "qcow2", leaf],
                check=True,
            )
            ctl, nbd = os.path.join(workdir, f"q{i}.ctl"), os.path.join(workdir, f"q{i}.nbd")
            p = subprocess.Popen(
                [
                    "qemu-storage-daemon",
                    "--blockdev",
                    json.dumps(graph.blockdevSpec(leaf, "qcow2", False)),
                    "--chardev",
                    f"socket,id=c,path={ctl},server=on,wait=off",
                    "--monitor",
                    "chardev=c",
                    "--nbd-server",
                    f"addr.type=unix,addr.path={nbd}",
                    "--export",
                    f"type=nbd,id={graph.EXPORT_ID},node-name={graph.ROOT_NODE},"
                    f"name=q{i},writable=on",
                ]
            )
            procs.append(p)
            qemus.append(
                DataPath(
                    i % 2 * 3,
                    f"q{i}",
                    "qemu",
                    "h",
                    leaf,
                    "qcow2",
                    (leaf, parent),
                    p.pid,
                    None,
                    ctl,
                    {"export": f"q{i}", "writable": "1"},
                )
            )
        for dp in qemus:
            while not os.path.exists(dp.qmp or ""):
                await deferLater(reactor, 0.01, lambda: None)
        await registerAll(xs, qemus)
        control = DataPathControl(xs, {"qemu": QemuPauser(reactor)})
        timed, floor = [], []
        for _ in range(args.iterations):
            t0 = time.perf_counter()
            handle = await control.quiesce(parent)
            assert len(handle.paused) == args.qemus
            await control.resume(handle)
            timed.append(time.perf_counter() - t0)
        # Floor: the same QMP commands on connections already open.
        clients = [await connectQMP(reactor, dp.qmp or "") for dp in qemus]

        async def directPause(c: Any) -> None:
            await graph.deleteExport(c, 30)
            await c.execute("blockdev-del", {"node-name": graph.ROOT_NODE})

        async def directResume(c: Any, dp: DataPath) -> None:
            await graph.openGraph(c, dp.image, "qcow2", False)
            await graph.addExport(c, graph.ROOT_NODE, dp.vdi, True)

        for _ in range(args.iterations):
            t0 = time.perf_counter()
            await gatherResults([Deferred.fromCoroutine(directPause(c)) for c in clients])
            await gatherResults(
                [
                    Deferred.fromCoroutine(directResume(c, dp))
                    for c, dp in zip(clients, qemus, strict=True)
                ]
            )
            floor.append(time.perf_counter() - t0)
        for c in clients:
            await c.close()
        rows.append((f"{args.qemus} qemu exports (real)", summary(timed), summary(floor)))
        return rows
    finally:
        for p in procs:
            p.kill()
            p.wait()
        if xs is not None:
            await xs.disconnect()
        store.stop()


async def registerAll(xs: Any, dps: list[DataPath]) -> None:
    async def write(tx: Any) -> None:
        await gatherResults([tx.write(p, v) for dp in dps for p, v in dp.nodes().items()])

    await xs.transact(write)


async def unregisterAll(xs: Any, dps: list[DataPath]) -> None:
    await gatherResults([xs.rm(dp.path) for dp in dps])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").strip().splitlines()[0])
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--taps", type=int, default=100)
    parser.add_argument("--qemus", type=int, default=10)
    args = parser.parse_args(argv)
    for tool in ("qemu-storage-daemon", "qemu-img"):
        if shutil.which(tool) is None:
            print(f"{tool} not installed (Debian qemu-system-common / qemu-utils)")
            return 1
    from twisted.internet import reactor
    from twisted.internet.task import react

    workdir = tempfile.mkdtemp(prefix="dpb-")
    result: dict[str, Any] = {}

    async def run(r: Any) -> None:
        result["rows"] = await bench(r, args, workdir)

    try:
        react(lambda r: Deferred.fromCoroutine(run(r)), [])
    except SystemExit as e:
        if e.code:
            raise
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    del reactor
    print(f"quiesce + resume, {args.iterations} iterations, ms (mean / p50 / max)")
    print(f"{'data paths':32} {'registry (ours)':>26}   {'floor (direct)':>26}")
    for name, ours, floor in result["rows"]:
        print(f"{name:32} {ours}   {floor}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
