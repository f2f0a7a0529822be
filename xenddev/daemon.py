# -*- test-case-name: tests.test_daemon -*-
"""
C{twistd xenddev}: the daemon.

    twistd -n xenddev --config /etc/xenddev.yaml --rundir DIR --xenstore ADDRESS \
        --simulate auto|on|off

Flags override the file. Without C{--config} every option has its default
(see C{docs/config.md}): run directory C{/var/run/xenddev} as root, else
C{./run}; XenStore C{auto} (the local xenstored, else the embedded one with
SIMULATED backends and frontends).
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import IService
from twisted.python import usage

from xenddev.config import Config, ConfigError, loadConfig

__all__ = ["Options", "configFromOptions", "makeService"]


class Options(usage.Options):
    """Command-line options of C{twistd xenddev}."""

    synopsis = "[--config FILE] [--rundir DIR] [--xenstore ADDRESS] [--simulate auto|on|off]"
    longdesc = (
        "The xenddev daemon: Xen device controllers (vbd, vif) with an XML-RPC API on "
        "RUNDIR/xenddev.sock. Without a reachable xenstored it runs an embedded one on "
        "RUNDIR/xenstored/socket and SIMULATES kernel backends and guest frontends."
    )
    optParameters = [
        ["config", "c", None, "YAML configuration file (see docs/config.md)."],
        ["rundir", "r", None, "Run directory (default /var/run/xenddev as root, else ./run)."],
        ["xenstore", "x", None, "XenStore: auto, embedded, unix:PATH or xenbus:PATH."],
        [
            "simulate",
            None,
            None,
            "SIMULATED backends and frontends: auto (only on the embedded xenstored), "
            "on (with any xenstored; refused on a Xen host) or off.",
        ],
    ]

    def postOptions(self) -> None:
        """Load and check the configuration now, so errors stop twistd at once."""
        try:
            self["configObject"] = configFromOptions(self)
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None


def configFromOptions(options: Any) -> Config:
    """The L{Config}: the file (or defaults), then the flags."""
    config = loadConfig(options["config"]) if options["config"] else Config()
    return config.withOverrides(
        rundir=options["rundir"], xenstore=options["xenstore"], simulate=options.get("simulate")
    )


def makeService(options: Any) -> IService:
    """Build the daemon's service (imports the heavy parts only now)."""
    from xenddev.service import XenddevService

    config = options.get("configObject") or configFromOptions(options)
    return XenddevService(config, stopReactorOnFailure=True)
