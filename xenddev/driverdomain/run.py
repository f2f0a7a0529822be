# -*- test-case-name: tests.test_driverdomain_process -*-
"""
Run a driver-domain agent as a process of its own:

    python -m xenddev.driverdomain.run --xenstore unix:/var/run/xenstored/socket \\
        --domid 0 --kinds blkback,netback

In a driver domain, C{--xenstore auto --domid auto} finds xenstored through
C{/dev/xen/xenbus} and the domain's id in its own C{domid} node.

This is what a driver domain runs (and what the tests kill with SIGKILL to
check that requests survive an agent crash). It keeps its connection across
xenstored restarts and stops cleanly on SIGTERM/SIGINT.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger, globalLogBeginner, textFileLogObserver
from twisted.python import usage

from xenddev.driverdomain.agent import BackendCtrlAgent
from xenddev.driverdomain.kinds import kindsByName
from xenddev.interfaces import IDriverDomainKind

log = Logger()


class Options(usage.Options):
    """Command-line options of the agent."""

    optParameters = [
        ["xenstore", None, "auto", "XenStore address: auto, unix:PATH or xenbus:PATH."],
        [
            "domid",
            None,
            "0",
            "The driver domain this agent serves; auto: its own (XenStore's domid).",
        ],
        ["kinds", None, "blkback,netback", "Driver-domain kinds, in the order to try."],
        ["script-dir", None, "/etc/xen/scripts", "Directory of the hotplug scripts."],
        ["hotplug-timeout", None, "40", "Seconds before a hotplug script is killed."],
        [
            "xenstore-stall",
            None,
            "10",
            "Seconds XenStore may leave requests unanswered before the connection is"
            " treated as lost (aborted and made again).",
        ],
    ]
    optFlags = [
        ["no-hotplug", None, "Do not run hotplug scripts."],
        ["simulate-backends", None, "Run the xenbus backend simulator (no hypervisor)."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["kind-factory"] = []

    def opt_kind_factory(self, spec: str) -> None:
        """A kind from code: MODULE:CALLABLE returning an IDriverDomainKind (repeatable)."""
        self["kind-factory"].append(spec)

    def postOptions(self) -> None:
        """Validate numbers and names now, naming the bad option."""
        try:
            if self["domid"] != "auto":
                self["domid"] = int(self["domid"])
            self["hotplug-timeout"] = float(self["hotplug-timeout"])
            self["xenstore-stall"] = float(self["xenstore-stall"])
        except ValueError as e:
            raise usage.UsageError(f"--domid/--hotplug-timeout/--xenstore-stall: {e}") from None
        if not self["xenstore-stall"] > 0:
            raise usage.UsageError("--xenstore-stall: a positive number of seconds")
        names = [k for k in self["kinds"].split(",") if k]
        try:
            self["kindObjects"] = kindsByName(names) + [
                _loadKind(spec) for spec in self["kind-factory"]
            ]
        except ValueError as e:
            raise usage.UsageError(f"--kinds: {e}") from None


def _loadKind(spec: str) -> IDriverDomainKind:
    module, _, name = spec.partition(":")
    if not module or not name:
        raise ValueError(f"kind factory {spec!r} is not MODULE:CALLABLE")
    factory = getattr(importlib.import_module(module), name)
    kind = factory()
    if not IDriverDomainKind.providedBy(kind):
        raise ValueError(f"{spec} did not return an IDriverDomainKind")
    return kind


async def runAgent(reactor: Any, options: Options) -> None:
    """Connect, start the agent (and simulator), run until stopped."""
    from twisted.internet.endpoints import UNIXClientEndpoint

    from xenddev.xenstore.connection import ReconnectingXenStore
    from xenddev.xenstore.endpoints import XenbusEndpoint, parseAddress

    address = parseAddress(options["xenstore"])
    endpoint: Any = (
        XenbusEndpoint(reactor, address.path)
        if address.kind == "xenbus"
        else UNIXClientEndpoint(reactor, address.path)
    )
    xs = ReconnectingXenStore(
        endpoint, reactor, stall=options["xenstore-stall"], address=options["xenstore"]
    )
    xs.start()
    await xs.whenConnected()
    if options["domid"] == "auto":
        # A relative path: the connection's own domain's home.
        options["domid"] = int(await xs.read("domid"))
    hotplug = None
    if not options["no-hotplug"]:
        from xenddev.driverdomain.hotplug import HotplugRunner

        hotplug = HotplugRunner(
            options["script-dir"],
            xenstore=xs,
            timeout=options["hotplug-timeout"],
            xenstoredPath=address.path if address.kind == "unix" else None,
            reactor=reactor,
        )
    from xenddev.datapath import standardPausers

    agent = BackendCtrlAgent(
        xs, options["domid"], options["kindObjects"], hotplug, standardPausers(reactor)
    )
    simulator = None
    if options["simulate-backends"]:
        from xenddev.simulator import BackendSimulator

        simulator = BackendSimulator(xs, options["domid"])
        await simulator.start()
    await agent.start()
    log.info("Agent for domain {domid} ready", domid=options["domid"])
    stopped: Deferred[None] = Deferred()

    async def shutdown() -> None:
        await agent.stop()
        if simulator is not None:
            await simulator.stop()
        await xs.stop()

    reactor.addSystemEventTrigger("before", "shutdown", lambda: Deferred.fromCoroutine(shutdown()))
    await stopped  # until the reactor stops


def main(argv: list[str] | None = None) -> None:
    """Parse options and run the agent under the reactor."""
    from twisted.internet import task

    options = Options()
    try:
        options.parseOptions(argv if argv is not None else sys.argv[1:])
    except usage.UsageError as e:
        print(f"{sys.argv[0]}: {e}", file=sys.stderr)
        sys.exit(2)
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)])
    task.react(lambda reactor: Deferred.fromCoroutine(runAgent(reactor, options)))


if __name__ == "__main__":
    main()
