# -*- test-case-name: tests.test_daemon -*-
"""
A small Prometheus text-format endpoint (C{metrics.enabled: true}): device
operations by operation, class and outcome, their total duration, the
operations in flight, the XenStore round trips of the process by
operation (L{xenddev.xenstore.protocol.ROUND_TRIPS}: every request any of
its connections sent — the toolstack's, the local agent's and the
simulator's), and whether the xenbus ends are simulated. Written
here (a few lines of the text exposition format) rather than adding
C{prometheus_client} as a dependency.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from xenddev.xenstore.protocol import ROUND_TRIPS
from xenddev.xenstore.wire import opName

__all__ = ["MetricsResource", "metricsSite", "renderMetrics"]


def _label(value: object) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def renderMetrics(service: Any, roundTrips: Mapping[int, int] | None = None) -> str:
    """
    The metrics of a L{xenddev.service.XenddevService} in the text format.

    @param roundTrips: XenStore requests by operation number (default: the
        process-wide L{xenddev.xenstore.protocol.ROUND_TRIPS}).
    """
    lines = [
        "# HELP xenddev_device_operations_total Device operations by outcome.",
        "# TYPE xenddev_device_operations_total counter",
    ]
    manager = service.manager
    counts = manager.counts if manager is not None else {}
    durations = manager.durations if manager is not None else {}
    for (op, devclass, outcome), n in sorted(counts.items()):
        lines.append(
            f'xenddev_device_operations_total{{operation="{_label(op)}",'
            f'class="{_label(devclass)}",outcome="{_label(outcome)}"}} {n}'
        )
    lines += [
        "# HELP xenddev_device_operation_seconds_total Time spent in device operations.",
        "# TYPE xenddev_device_operation_seconds_total counter",
    ]
    for (op, devclass), secs in sorted(durations.items()):
        lines.append(
            f'xenddev_device_operation_seconds_total{{operation="{_label(op)}",'
            f'class="{_label(devclass)}"}} {secs:.6f}'
        )
    inflight = len(manager.operations) if manager is not None else 0
    lines += [
        "# HELP xenddev_device_operations_in_flight Device operations running now.",
        "# TYPE xenddev_device_operations_in_flight gauge",
        f"xenddev_device_operations_in_flight {inflight}",
        "# HELP xenddev_simulated 1 if backends and frontends are simulated.",
        "# TYPE xenddev_simulated gauge",
        f"xenddev_simulated {1 if service.simulated else 0}",
        "# HELP xenddev_xenstore_requests_total XenStore round trips by operation.",
        "# TYPE xenddev_xenstore_requests_total counter",
    ]
    trips = dict(ROUND_TRIPS if roundTrips is None else roundTrips)
    byName: dict[str, int] = {}
    for op, n in trips.items():
        byName[opName(op)] = byName.get(opName(op), 0) + n
    for name, n in sorted(byName.items()):
        lines.append(f'xenddev_xenstore_requests_total{{operation="{_label(name)}"}} {n}')
    return "\n".join(lines) + "\n"


class MetricsResource(Resource):
    """Serves L{renderMetrics} at any path."""

    isLeaf = True

    def __init__(self, service: Any) -> None:
        super().__init__()
        self.service = service

    def render_GET(self, request: Request) -> bytes:
        """The metrics, as C{text/plain; version=0.0.4}."""
        request.setHeader(b"content-type", b"text/plain; version=0.0.4; charset=utf-8")
        return renderMetrics(self.service).encode("utf-8")


def metricsSite(service: Any) -> Site:
    """A web site serving the metrics of C{service}."""
    return Site(MetricsResource(service))
