"""
Benchmark: quiesce and resume through the data-path registry.

  1. 100 tapdisks, each serving a differencing VHD over one shared parent,
     served by two driver-domain agents (domains 0 and 3, 50 each) with the
     C{tap} kind, which registers them; paused with the real L{TapPauser}
     (C{tap-ctl pause}, C{tap-ctl unpause -a vhd:<leaf>}). blktap is not
     packaged for Debian, so C{tap-ctl} is the test suite's STAND-IN
     (tests/support/fake-tap-ctl, one state per driver domain): each
     tapdisk is a real idle process, paused with SIGSTOP and resumed with
     SIGCONT, but each command costs a Python start-up, and the stand-in
     runs one command at a time per state (a lock).
  2. 10 qemu exports: 10 real C{qemu-storage-daemon}s, each serving a qcow2
     overlay of one shared parent over NBD; paused with L{QemuPauser}
     (export deleted, graph closed; reopened and re-exported on resume).

For each, the time of C{DataPathControl.quiesce(parent)} +
C{resume(handle)} (registry scan of XenStore included, everything in
parallel) against the FLOOR: the same pause/unpause commands issued
directly, in parallel, to processes/sockets already known (no registry):
for the tapdisks the same C{tap-ctl pause} and C{unpause -a} commands.

Run: C{.venv/bin/python bench/datapath.py [--iterations N] [--taps N]
[--qemus N] [--quick]}. Store: the embedded xenstored on its own thread.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import deferLater

from bench._common import REPO, Stats
from tests.support.faketapctl import STATE_ENV, killAll
from tests.support.vhd import makeBase, makeChild
from xenddev.backendctrl.protocol import VDI
from xenddev.datapath import DataPath, DataPathControl, QemuPauser, TapPauser, registryDir
from xenddev.datapath import qemu as graph
from xenddev.driverdomain.agent import BackendCtrlAgent
from xenddev.driverdomain.kinds.tap import TapKind
from xenddev.qmp import connectQMP
from xenddev.tapctl import TapCtl
from xenddev.toolstack.client import DriverDomainClient
from xenddev.xenstore.connection import connectXenStore

#: The test suite's STAND-IN tap-ctl (blktap is not packaged for Debian).
STAND_IN_TAPCTL = os.path.join(REPO, "tests", "support", "fake-tap-ctl")


def summary(samples: list[float]) -> str:
    """Mean, median and maximum, in milliseconds."""
    stats = Stats(tuple(samples))
    return f"{stats.meanMs:8.2f} {stats.p50Ms:8.2f} {stats.maxMs:8.2f}"


async def bench(reactor: Any, args: argparse.Namespace, workdir: str) -> list[tuple[str, ...]]:
    from xenddev.xenstore.server.threaded import ThreadedXenstored

    sock = os.path.join(workdir, "xs")
    store = ThreadedXenstored(sock)
    store.start()
    procs: list[subprocess.Popen[bytes]] = []
    xs: Any = None
    agents: list[BackendCtrlAgent] = []
    states = {dd: os.path.join(workdir, f"ftc-{dd}") for dd in (0, 3)}
    try:
        from twisted.internet.endpoints import UNIXClientEndpoint

        def connect() -> Deferred[Any]:
            return connectXenStore(reactor, endpoint=UNIXClientEndpoint(reactor, sock))

        xs = await connect()
        for dd in (0, 3):
            await xs.mkdir(registryDir(dd))
        rows: list[tuple[str, ...]] = []
        parent = os.path.join(workdir, "parent.qcow2")
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", parent, "64M"], check=True)

        # 1. Tapdisks served by two agents (stand-in tap-ctl), real pauser.
        tapctls = {
            dd: TapCtl([sys.executable, STAND_IN_TAPCTL], reactor, {STATE_ENV: state})
            for dd, state in states.items()
        }
        for dd, tapctl in tapctls.items():
            agent = BackendCtrlAgent(await connect(), dd, [TapKind(tapctl, host="h")], None)
            await DriverDomainClient(xs, dd).ensureArea()
            await agent.start()
            agents.append(agent)
        ddClients = {dd: DriverDomainClient(xs, dd, 120.0) for dd in tapctls}
        vhdParent = makeBase(os.path.join(workdir, "parent.vhd"))
        leaves = {}
        for i in range(args.taps):
            dd = 0 if i % 2 == 0 else 3
            leaves[(dd, f"t{i}")] = makeChild(os.path.join(workdir, f"t{i}.vhd"), vhdParent)

        async def serve(dd: int, name: str, leaf: str) -> None:
            target = {"type": "file", "format": "vhd", "params": leaf}
            await ddClients[dd].prepare(name, target, VDI)
            await ddClients[dd].activate(name, VDI)

        await gatherResults(
            [Deferred.fromCoroutine(serve(dd, n, leaf)) for (dd, n), leaf in leaves.items()]
        )
        # What the floor needs to know already: (tap-ctl, pid, minor, args).
        known: list[tuple[TapCtl, int, int, str | None]] = []
        for tapctl in tapctls.values():
            for row in await tapctl.list():
                assert row.pid is not None and row.minor is not None
                known.append((tapctl, row.pid, row.minor, row.args))
        assert len(known) == args.taps
        control = DataPathControl(xs, {"tap": TapPauser(tapctls[0], tapctls)})
        timed, floor = [], []
        for _ in range(args.iterations):
            t0 = time.perf_counter()
            handle = await control.quiesce(vhdParent)
            assert len(handle.paused) == args.taps
            await control.resume(handle, reload=True)
            timed.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            await gatherResults([t.pause(pid, minor) for t, pid, minor, _ in known])
            await gatherResults([t.unpause(p, m, a) for t, p, m, a in known])
            floor.append(time.perf_counter() - t0)
        for tapctl in tapctls.values():
            assert not any(row.paused for row in await tapctl.list())
        rows.append((f"{args.taps} tapdisks (stand-in tap-ctl)", summary(timed), summary(floor)))
        await gatherResults(
            [ddClients[dd].unprepare(name, VDI) for dd, name in leaves], consumeErrors=True
        )

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
        for agent in agents:
            await agent.stop()
        for state in states.values():
            killAll(state)
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").strip().splitlines()[0])
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--taps", type=int, default=100)
    parser.add_argument("--qemus", type=int, default=10)
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: 2 iterations, 20 tapdisks, 2 qemus"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.iterations, args.taps, args.qemus = 2, 20, 2
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
