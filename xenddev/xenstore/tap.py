# -*- test-case-name: tests.test_xenstored_service -*-
"""
C{twistd xenstored}: the embedded xenstored on its own.

C{twistd -n xenstored --rundir DIR} serves C{DIR/socket}, so that
C{XENSTORED_RUNDIR=DIR xenstore-ls /} works.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.application.service import IService
from twisted.python import usage

from xenddev.xenstore.server.quota import Quotas

_D = Quotas()


def _domainSocket(spec: str) -> tuple[int, str]:
    domid, sep, path = spec.partition(":")
    if not sep or not domid.isdigit() or not path:
        raise usage.UsageError(f"--domain-socket wants DOMID:PATH, not {spec!r}")
    return int(domid), path


class Options(usage.Options):
    """Command-line options of C{twistd xenstored}."""

    optParameters = [
        ["rundir", "r", "/var/run/xenstored", "Directory of the socket (DIR/socket)."],
        ["socket", None, None, "Socket path (default: RUNDIR/socket)."],
        ["state", None, None, "Load the tree from FILE at start, save it there on stop."],
        ["trace", "T", None, "Append a line per request to FILE."],
        ["entry-nb", "E", _D.nodesPerDomain, "Nodes per domain.", int],
        ["watch-nb", "W", _D.watchesPerDomain, "Watches per domain.", int],
        ["entry-size", "S", _D.maxEntrySize, "Maximum node size.", int],
        ["transaction", "t", _D.transactionsPerConnection, "Transactions per connection.", int],
        ["perm-nb", "A", _D.permsPerNode, "Permission entries per node.", int],
        ["transaction-nodes", None, _D.nodesPerTransaction, "Nodes per transaction.", int],
        ["path-max", None, _D.maxPathLength, "Maximum relative path length.", int],
        ["outstanding", None, _D.requestsOutstanding, "Outstanding replies per domain.", int],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["domain-sockets"] = []

    def opt_domain_socket(self, spec: str) -> None:
        """DOMID:PATH — also serve PATH to clients acting as domain DOMID (repeatable)."""
        self["domain-sockets"].append(_domainSocket(spec))

    def quotas(self) -> Quotas:
        """The quotas the options ask for."""
        return Quotas(
            nodesPerDomain=self["entry-nb"],
            watchesPerDomain=self["watch-nb"],
            maxEntrySize=self["entry-size"],
            transactionsPerConnection=self["transaction"],
            permsPerNode=self["perm-nb"],
            nodesPerTransaction=self["transaction-nodes"],
            maxPathLength=self["path-max"],
            requestsOutstanding=self["outstanding"],
        )


def makeService(options: Any) -> IService:
    """Build the service C{twistd xenstored} runs."""
    from xenddev.xenstore.server.service import XenstoredService

    socketPath = options["socket"] or os.path.join(options["rundir"], "socket")
    os.makedirs(os.path.dirname(os.path.abspath(socketPath)), exist_ok=True)
    return XenstoredService(
        socketPath,
        domainSockets=options["domain-sockets"],
        quotas=options.quotas(),
        stateFile=options["state"],
        traceFile=options["trace"],
    )
