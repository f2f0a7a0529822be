"""
A driver-domain kind that does nothing, for bench/driverdomain.py.

Every operation succeeds at once with an empty outcome; plug names the
backend directory the real kinds would use (C{backend/<class>/<domu>/<devid>})
without creating it. What is left to measure is the protocol machinery of
the agent and the client, not a backend.

Used as C{python -m xenddev.driverdomain.run --kinds "" --kind-factory
bench._noopkind:NoopKind --no-hotplug} (with the project on C{PYTHONPATH}),
or with C{bench._noopkind:countingNoopKind} to have the agent process count
its XenStore requests and transaction conflicts.
"""

from __future__ import annotations

from collections.abc import Mapping

from twisted.internet.defer import Deferred
from zope.interface import implementer

from xenddev.driverdomain.kinds.base import KindContext, Outcome, PlugSpec, done
from xenddev.interfaces import IDriverDomainKind


@implementer(IDriverDomainKind)
class NoopKind:
    """Serves every vdi and vif target; every operation is an immediate success."""

    name = "noop"
    objectClasses = ("vdi", "vif")

    def accepts(self, objectClass: str, target: Mapping[str, str]) -> bool:
        return True

    def prepare(self, ctx: KindContext) -> Deferred[Outcome]:
        return done()

    def activate(self, ctx: KindContext) -> Deferred[Outcome]:
        return done()

    def deactivate(self, ctx: KindContext) -> Deferred[Outcome]:
        return done()

    def unprepare(self, ctx: KindContext) -> Deferred[Outcome]:
        return done()

    def plug(self, ctx: KindContext, plug: PlugSpec) -> Deferred[Outcome]:
        return done(Outcome(backend=plug.device.backendRelative()))

    def unplug(self, ctx: KindContext, plug: PlugSpec) -> Deferred[Outcome]:
        return done()

    def hotplugCommand(self, ctx: KindContext, plug: PlugSpec, action: str) -> None:
        return None


def countingNoopKind() -> NoopKind:
    """
    A L{NoopKind} for an agent process whose XenStore traffic the benchmark
    wants counted: every request this process sends, and every transaction
    commit that failed with EAGAIN (a conflict, which the client retries).

    The counts are written as JSON to C{$XENDDEV_BENCH_COUNTS} when the
    reactor shuts down (the agent's SIGTERM). Benchmark instrumentation only:
    it taps every XenStore connection of the process (L{bench._wiretap}).
    """
    import json
    import os

    from twisted.internet import reactor

    from bench._wiretap import Counts, RequestCounter, tapEveryConnection

    counts = Counts()
    tapEveryConnection(lambda: RequestCounter(counts))
    path = os.environ["XENDDEV_BENCH_COUNTS"]

    def dump() -> None:
        with open(path, "w") as f:
            json.dump({"requests": counts.requests, "conflicts": counts.conflicts}, f)

    reactor.addSystemEventTrigger("after", "shutdown", dump)
    return NoopKind()
