"""
The xenddev daemon in the real-Xen lane's dom0, started as an operator
would (C{twistd -n xenddev}, no simulation: it finds the host's xenstored
on a Xen host), and its command-line client there. Shared by the lane's
tests and C{bench/realxen.py}.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence

import attrs

from tests.support.realxen.vm import BackgroundProcess, CommandResult, RealXenHost

__all__ = ["CLI_ENV", "ROOT", "RUNDIR", "SOCKET", "VENV_BIN", "XenddevInDom0", "startXenddev"]

#: The checkout and its virtualenv, seen the same from dom0 (its root is
#: this machine's, read-only with a tmpfs over it).
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
VENV_BIN = os.path.dirname(sys.executable)
RUNDIR = "/run/xenddev"
SOCKET = f"{RUNDIR}/xenddev.sock"
CLI_ENV: Mapping[str, str] = {"XENDDEV_SOCKET": SOCKET}

#: Generous for TCG: xl's own hot attach takes 3.5-6 s on a quiet machine
#: and the block script alone several times that on a busy one (libxl's 40 s
#: hotplug timeout was hit once under load).
CONFIG = """\
rundir: {rundir}
timeouts: {{create: 120, destroy: 60, request: 120, shutdown: 30}}
driver_domain: {{hotplug_timeout: 120, builtin_scripts: [{builtin}]}}
logging: {{file: {log}, level: {level}}}
"""


@attrs.define
class XenddevInDom0:
    """
    The daemon running in dom0.

    @ivar host: the machine.
    @ivar process: the daemon's process in dom0.
    @ivar logPath: its log file, on this machine.
    """

    host: RealXenHost
    process: BackgroundProcess
    logPath: str

    async def run(self, *args: str, timeout: float = 180) -> CommandResult:
        """Run the C{xenddev} client in dom0 (any exit status)."""
        argv = [f"{VENV_BIN}/xenddev", *args]
        return await self.host.run(argv, env=CLI_ENV, cwd=ROOT, timeout=timeout)

    def log(self, lines: int = 60) -> str:
        """The end of the daemon's log."""
        try:
            with open(self.logPath, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError as e:
            return f"(no daemon log: {e})"


#: The daemon started on each machine, with its built-in scripts, while it
#: runs: the lane's modules share one machine and one daemon socket.
_started: dict[int, tuple[tuple[str, ...], XenddevInDom0]] = {}


async def startXenddev(
    host: RealXenHost, level: str = "debug", builtinScripts: Sequence[str] = ()
) -> XenddevInDom0:
    """
    Start C{twistd -n xenddev} in dom0 with the lane's configuration
    (L{CONFIG}, its log in the share, the hotplug scripts C{builtinScripts}
    built in) and wait until it answers; or return the one started here
    with the same scripts, if it still runs.

    @raise CommandFailed: it did not answer within two minutes.
    """
    running = _started.get(id(host))
    if running is not None and running[0] == tuple(builtinScripts):
        daemon = running[1]
        if daemon.host is host and not daemon.process.ended():
            return daemon
    log = host.sharePath / "xenddev.log"
    config = host.sharePath / "xenddev.yaml"
    config.write_text(
        CONFIG.format(
            rundir=RUNDIR, log=host.inDom0(log), level=level, builtin=", ".join(builtinScripts)
        )
    )
    process = await host.spawn(
        [f"{VENV_BIN}/twistd", "-n", "--pidfile=", "xenddev", "--config", host.inDom0(config)],
        cwd=ROOT,
    )
    await host.check([f"{VENV_BIN}/xenddev", "status", "--wait", "120"], env=CLI_ENV, timeout=150)
    started = XenddevInDom0(host, process, str(log))
    _started[id(host)] = (tuple(builtinScripts), started)
    return started
