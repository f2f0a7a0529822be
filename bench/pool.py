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

Run: C{.venv/bin/python bench/pool.py [--samples N] [--warmup N] [--quick]}.
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

from bench._common import Stats, runReactor
from tests.support.etcdcluster import EtcdCluster, etcdBinary
from xenddev.config import Config, PoolConfig, TimeoutsConfig
from xenddev.pool.activation import Activations
from xenddev.pool.etcd import EtcdClient
from xenddev.pool.session import HostSession
from xenddev.service import XenddevService

GUEST = 5
TARGET = 1.2


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


async def run(samples: int, warmup: int) -> dict[str, object]:
    """Start the cluster and both services, measure, stop everything."""
    from twisted.internet import reactor

    binary = etcdBinary()
    if binary is None:
        raise SystemExit("etcd is not installed (Debian: apt-get install etcd-server)")
    workdir = tempfile.mkdtemp(prefix="xenddev-bench-pool-")
    cluster = EtcdCluster(reactor, os.path.join(workdir, "etcd"), size=3, binary=binary)
    services: list[XenddevService] = []
    try:
        await cluster.start()
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
        await cluster.cleanup()
        shutil.rmtree(workdir, ignore_errors=True)
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
    """Parse the arguments, run, print the table (and the JSON)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="20 samples, 5 warm-up")
    opts = parser.parse_args()
    if opts.quick:
        opts.samples, opts.warmup = 20, 5
    result = runReactor(lambda: run(opts.samples, opts.warmup))
    if result is None:
        raise SystemExit("interrupted")
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
    print(json.dumps(result))


if __name__ == "__main__":
    main()
