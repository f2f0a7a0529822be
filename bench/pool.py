# -*- test-case-name: tests.test_pool_daemon -*-
"""
Benchmark: a device's attach + detach in pool mode against single-host
mode (issue 14).

Two daemons' services in this process (L{XenddevService}, no listener),
each on an embedded xenstored of its own with SIMULATED backends and
guests: one without C{pool:} (one host's guard: a claim checked in memory,
the grant written with the device's record), one in a pool on a real
3-member etcd 3.4 cluster on loopback (tests/support/etcdcluster.py; one
etcd call is one round trip to the member the client uses, which forwards
writes to the leader). Each sample is one read-write attach of a raw image
to a guest, connected, then its detach, through the service's
L{DeviceManager<xenddev.toolstack.manager.DeviceManager>}; the modes
alternate sample by sample, after C{--warmup} untimed pairs, so the host's
other load falls on both alike.

Target: pool mode's mean attach + detach <= 1.2x single-host mode's. Also
reported: the etcd round trips the pool adds, measured alone (the pool's
C{Activations.activate} + C{deactivate} of a target).

Two more parts (issue 14's storage side of migration):

  - B{handover}: the window of a migration's commit between two pooled
    services of this process (hosts C{bench-src} and C{bench-dst}, each its
    own embedded store with SIMULATED ends, the peer channel in-process: a
    call runs the other service's C{migrate.*} directly, no HTTP). Each
    sample attaches a raw image read-write to the guest on the source,
    prepares it on the destination (not timed), then commits: the source
    deactivates its vdi, the activation key moves in one etcd transaction,
    the destination activates its vdi and its backend connects. Reported:
    the window and its three phases, as the coordinator times them.
    Target: window <= 50 ms (plus the data path's own pause: none for a
    raw image served by blkback). The floor is the same three steps' etcd
    part alone: one handover transaction.
  - B{activations}: throughput with 3 hosts x N activations in flight (each
    host its own client and session; distinct targets), against the floor
    of 3 clients x N plain etcd puts in flight (no lease, no transaction).

Run: C{.venv/bin/python bench/pool.py [--part attach|handover|activations|all]
[--samples N] [--warmup N] [--handovers N] [--inflight N] [--quick]}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from typing import Any

from twisted.internet.defer import Deferred, gatherResults, maybeDeferred, succeed
from zope.interface import implementer

from bench._common import Stats, runReactor
from tests.support.etcdcluster import EtcdCluster, etcdBinary
from xenddev.config import Config, PoolConfig, TimeoutsConfig
from xenddev.interfaces import IPoolPeers
from xenddev.pool.activation import Activations
from xenddev.pool.etcd import EtcdClient
from xenddev.pool.migration import Migrations
from xenddev.pool.session import HostSession
from xenddev.service import XenddevService

GUEST = 5
TARGET = 1.2
#: The handover window's target (ms), on the simulator, without a data path's pause.
WINDOW_TARGET_MS = 50.0


def _service(workdir: str, name: str, pool: PoolConfig | None) -> XenddevService:
    """A daemon's service on its own embedded store (simulated ends, no listener)."""
    from twisted.internet import reactor

    config = Config(
        rundir=os.path.join(workdir, name),
        xenstore="embedded",
        timeouts=TimeoutsConfig(shutdown=2.0),
        pool=pool,
    )
    return XenddevService(config, reactor=reactor, listen=False)


async def _timed(fn: Callable[[], Awaitable[object]]) -> float:
    began = time.perf_counter()
    await fn()
    return time.perf_counter() - began


async def _cycle(service: XenddevService, image: str) -> None:
    """One read-write attach, connected, then its detach."""
    manager = service.manager
    assert manager is not None
    devid = await manager.createDevice(GUEST, "vbd", {"spec": f"{image},raw,xvdb,w"})
    await manager.destroyDevice(GUEST, "vbd", devid)


async def _etcdAlone(cluster: EtcdCluster, image: str, samples: int) -> Stats:
    """The pool's own round trips: activate + deactivate of a target."""
    from twisted.internet import reactor

    etcd = EtcdClient(reactor, cluster.endpoints, timeout=2)
    session = HostSession(etcd, reactor, "bench-alone", ttl=10, fenceAfter=5)
    await session.start()
    activations = Activations(etcd, session, reactor)
    target = f"file:{os.path.realpath(image)}-alone"
    times = []
    try:
        for _ in range(samples):

            async def pair() -> None:
                await activations.activate(target)
                await activations.deactivate(target)

            times.append(await _timed(pair))
    finally:
        await session.stop()
        await etcd.close()
    return Stats(tuple(times))


@implementer(IPoolPeers)
class _InProcessPeers:
    """The peer channel between this process's services: a call runs C{migrate.*} directly."""

    timeout = 30.0

    def __init__(self, services: dict[str, XenddevService]) -> None:
        self.services = services

    def address(self, host: str) -> Deferred[str]:
        """A made-up address of a service of this process."""
        return succeed(f"inprocess://{host}")

    def call(self, host: str, method: str, *args: Any) -> Deferred[Any]:
        """Run C{migrate.<name>} on C{host}'s coordinator."""
        coordinator = self.services[host].migrations
        return maybeDeferred(getattr(coordinator, method.removeprefix("migrate.")), *args)


async def _handovers(cluster: EtcdCluster, workdir: str, samples: int) -> dict[str, Stats]:
    """
    Migrate a guest's disk between two pooled services C{samples} times;
    the commit's phases, and the floor (one handover transaction alone).
    """
    endpoints = tuple(cluster.endpoints)
    hosts = {
        name: _service(workdir, name, PoolConfig(endpoints, name, 10, 5.0, 2.0))
        for name in ("bench-src", "bench-dst")
    }
    peers = _InProcessPeers(hosts)
    phases: dict[str, list[float]] = {"release": [], "handover": [], "activate": [], "window": []}
    floor: list[float] = []
    try:
        for service in hosts.values():
            service.startService()
            await service.ready
            service.migrations.peers = peers
        src, dst = hosts["bench-src"], hosts["bench-dst"]
        assert src.manager is not None and dst.manager is not None
        # The guest exists on the destination (its SIMULATED frontends too).
        await dst.manager.createDevice(GUEST, "vif", {})
        image = os.path.join(workdir, "migrating.img")
        with open(image, "wb") as f:
            f.truncate(1 << 20)
        for _ in range(samples):
            devid = await src.manager.createDevice(GUEST, "vbd", {"spec": f"{image},raw,xvdb,w"})
            await dst.migrations.prepare("bench-src", GUEST, GUEST)
            committed = await dst.migrations.commit(GUEST)
            for phase, ms in committed["timings-ms"].items():
                phases[phase].append(ms / 1000)
            await dst.migrations.finish(GUEST)
            await dst.manager.destroyDevice(GUEST, "vbd", devid)
            await src.manager.destroyDevice(GUEST, "vbd", devid)
        floor = await _handoverFloor(cluster, samples)
    finally:
        for service in hosts.values():
            await service.stopService()
    return {
        **{phase: Stats(tuple(times)) for phase, times in phases.items()},
        "floor": Stats(tuple(floor)),
    }


async def _handoverFloor(cluster: EtcdCluster, samples: int) -> list[float]:
    """One handover transaction alone (the intent made beforehand, not timed)."""
    from twisted.internet import reactor

    clients, sessions = [], []
    try:
        for name in ("floor-src", "floor-dst"):
            etcd = EtcdClient(reactor, cluster.endpoints, timeout=2)
            session = HostSession(etcd, reactor, name, ttl=10, fenceAfter=5)
            clients.append(etcd)
            await session.start()
            sessions.append(session)
        src = Activations(clients[0], sessions[0], reactor)
        dst = Migrations(clients[1], sessions[1], reactor)
        times = []
        for i in range(samples):
            target = f"file:/bench/handover/{i}"
            await src.activate(target)
            await dst.intend(target, "floor-src", str(GUEST))
            began = time.perf_counter()
            await dst.handover(target, "floor-src", "floor-dst")
            times.append(time.perf_counter() - began)
        return times
    finally:
        for session in sessions:
            await session.stop()
        for etcd in clients:
            await etcd.close()


async def _throughput(cluster: EtcdCluster, inflight: int, hosts: int = 3) -> dict[str, Any]:
    """
    Activations of distinct targets, C{inflight} at once on each of C{hosts}
    hosts, then their deactivations; against plain puts and deletes of as
    many keys by as many clients (the floor).
    """
    from twisted.internet import reactor

    clients: list[EtcdClient] = []
    sessions: list[HostSession] = []
    try:
        for h in range(hosts):
            etcd = EtcdClient(reactor, cluster.endpoints, timeout=10)
            clients.append(etcd)
            session = HostSession(etcd, reactor, f"bench-tp-{h}", ttl=10, fenceAfter=5)
            await session.start()
            sessions.append(session)
        activations = [Activations(c, s, reactor) for c, s in zip(clients, sessions, strict=True)]
        targets = [
            [f"file:/bench/throughput/{h}/{i}" for i in range(inflight)] for h in range(hosts)
        ]

        async def timed(d: Deferred[Any], into: list[float]) -> None:
            began = time.perf_counter()
            await d
            into.append(time.perf_counter() - began)

        async def burst(make: Any) -> tuple[float, list[float]]:
            latencies: list[float] = []
            began = time.perf_counter()
            await gatherResults(
                [
                    Deferred.fromCoroutine(timed(make(h, t), latencies))
                    for h in range(hosts)
                    for t in targets[h]
                ],
                consumeErrors=True,
            )
            return time.perf_counter() - began, latencies

        taken, takeLat = await burst(lambda h, t: activations[h].activate(t))
        given, giveLat = await burst(lambda h, t: activations[h].deactivate(t))
        put, putLat = await burst(lambda h, t: clients[h].put(f"/bench-floor{t}".encode(), b"x"))
        deleted, _ = await burst(lambda h, t: clients[h].delete(f"/bench-floor{t}".encode()))
    finally:
        for session in sessions:
            await session.stop()
        for etcd in clients:
            await etcd.close()
    n = hosts * inflight
    return {
        "hosts": hosts,
        "in_flight": inflight,
        "activate_per_s": round(n / taken, 1),
        "deactivate_per_s": round(n / given, 1),
        "put_per_s": round(n / put, 1),
        "delete_per_s": round(n / deleted, 1),
        "activate_ms": _summary(Stats(tuple(takeLat))),
        "deactivate_ms": _summary(Stats(tuple(giveLat))),
        "put_ms": _summary(Stats(tuple(putLat))),
    }


async def run(
    samples: int, warmup: int, parts: set[str], handovers: int, inflight: int
) -> dict[str, object]:
    """Start the cluster and the services, measure the parts asked for, stop everything."""
    from twisted.internet import reactor

    binary = etcdBinary()
    if binary is None:
        raise SystemExit("etcd is not installed (Debian: apt-get install etcd-server)")
    workdir = tempfile.mkdtemp(prefix="xenddev-bench-pool-")
    cluster = EtcdCluster(reactor, os.path.join(workdir, "etcd"), size=3, binary=binary)
    result: dict[str, object] = {}
    try:
        await cluster.start()
        if "attach" in parts:
            result.update(await _attachPart(cluster, workdir, samples, warmup))
        if "handover" in parts:
            stats = await _handovers(cluster, workdir, handovers)
            result["handover_samples"] = handovers
            result["handover_ms"] = {phase: _summary(s) for phase, s in stats.items()}
            result["window_target_ms"] = WINDOW_TARGET_MS
            result["window_met"] = stats["window"].meanMs <= WINDOW_TARGET_MS
        if "activations" in parts:
            result["throughput"] = await _throughput(cluster, inflight)
    finally:
        await cluster.cleanup()
        shutil.rmtree(workdir, ignore_errors=True)
    return result


async def _attachPart(
    cluster: EtcdCluster, workdir: str, samples: int, warmup: int
) -> dict[str, object]:
    """Attach + detach, single host against pool, and the etcd round trips alone."""
    services: list[XenddevService] = []
    try:
        pool = PoolConfig(tuple(cluster.endpoints), "bench-pool", 10, 5.0, 2.0)
        single, pooled = _service(workdir, "single", None), _service(workdir, "pool", pool)
        for service in (single, pooled):
            services.append(service)
            service.startService()
            await service.ready
        images = {}
        for name in ("single", "pool"):
            images[name] = os.path.join(workdir, f"{name}.img")
            with open(images[name], "wb") as f:
                f.truncate(1 << 20)
        modes = {"single": single, "pool": pooled}
        for _ in range(warmup):
            for name, service in modes.items():
                await _cycle(service, images[name])
        times: dict[str, list[float]] = {name: [] for name in modes}
        for i in range(samples):
            # Alternate who goes first, so neither always follows the other.
            order = list(modes) if i % 2 == 0 else list(reversed(modes))
            for name in order:
                service, image = modes[name], images[name]
                began = time.perf_counter()
                await _cycle(service, image)
                times[name].append(time.perf_counter() - began)
        alone = await _etcdAlone(cluster, images["pool"], samples)
    finally:
        for service in reversed(services):
            await service.stopService()
    stats = {name: Stats(tuple(t)) for name, t in times.items()}
    ratio = stats["pool"].meanMs / stats["single"].meanMs
    return {
        "samples": samples,
        "single_ms": _summary(stats["single"]),
        "pool_ms": _summary(stats["pool"]),
        "etcd_activate_deactivate_ms": _summary(alone),
        "ratio": round(ratio, 3),
        "target": TARGET,
        "met": ratio <= TARGET,
    }


def _summary(stats: Stats) -> dict[str, float]:
    return {
        "mean": round(stats.meanMs, 2),
        "p50": round(stats.p50Ms, 2),
        "p99": round(stats.p99Ms, 2),
    }


def main() -> None:
    """Parse the arguments, run, print the tables (and the JSON)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--part", choices=("attach", "handover", "activations", "all"), default="all"
    )
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--handovers", type=int, default=50, help="migrations timed")
    parser.add_argument("--inflight", type=int, default=100, help="activations per host at once")
    parser.add_argument(
        "--quick", action="store_true", help="20 samples, 5 warm-up, 10 handovers, 30 in flight"
    )
    opts = parser.parse_args()
    if opts.quick:
        opts.samples, opts.warmup, opts.handovers, opts.inflight = 20, 5, 10, 30
    parts = {"attach", "handover", "activations"} if opts.part == "all" else {opts.part}
    result = runReactor(
        lambda: run(opts.samples, opts.warmup, parts, opts.handovers, opts.inflight)
    )
    if result is None:
        raise SystemExit("interrupted")
    if "attach" in parts:
        print(f"attach + detach, {result['samples']} samples each (ms)")
        print(f"{'':34} {'mean':>8} {'p50':>8} {'p99':>8}")
        for label, key in (
            ("single host (local guard)", "single_ms"),
            ("pool (3-member etcd)", "pool_ms"),
            ("etcd alone: activate + deactivate", "etcd_activate_deactivate_ms"),
        ):
            s = result[key]
            print(f"{label:34} {s['mean']:8.2f} {s['p50']:8.2f} {s['p99']:8.2f}")
        verdict = "met" if result["met"] else "NOT met"
        print(f"pool / single-host: {result['ratio']:.3f} (target <= {TARGET}: {verdict})")
    if "handover" in parts:
        h = result["handover_ms"]
        print(f"\nhandover window, {result['handover_samples']} migrations (ms)")
        print(f"{'':34} {'mean':>8} {'p50':>8} {'p99':>8}")
        for label, key in (
            ("source deactivates (release)", "release"),
            ("keys move (etcd)", "handover"),
            ("destination activates", "activate"),
            ("window", "window"),
            ("floor: one handover txn alone", "floor"),
        ):
            s = h[key]
            print(f"{label:34} {s['mean']:8.2f} {s['p50']:8.2f} {s['p99']:8.2f}")
        verdict = "met" if result["window_met"] else "NOT met"
        print(
            f"window mean {h['window']['mean']:.2f} ms (target <= {WINDOW_TARGET_MS:g}: {verdict})"
        )
    if "activations" in parts:
        t = result["throughput"]
        print(f"\n{t['hosts']} hosts x {t['in_flight']} in flight (per second; latency ms)")
        print(f"{'':34} {'per s':>8} {'mean':>8} {'p50':>8} {'p99':>8}")
        for label, rate, lat in (
            ("activate", "activate_per_s", "activate_ms"),
            ("deactivate", "deactivate_per_s", "deactivate_ms"),
            ("floor: plain put", "put_per_s", "put_ms"),
        ):
            s = t[lat]
            print(f"{label:34} {t[rate]:8.1f} {s['mean']:8.2f} {s['p50']:8.2f} {s['p99']:8.2f}")
        print(f"activations / plain puts: {t['activate_per_s'] / t['put_per_s']:.2f}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
