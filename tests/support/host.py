"""
A driver domain and its guests for the end-to-end tests, and the assertions
those tests share.

Without a hypervisor a test plays every party of a Xen host on one store: the
toolstack (the test's own connection, C{self.xs}), the driver domain's agent
(L{BackendCtrlAgent} with real kinds, optionally with the real hotplug
scripts through L{HotplugRunner}), and the SIMULATED kernel backends and
guest frontends (L{xenddev.simulator}). L{startDriverDomain} starts such a
driver domain the same way for every suite; L{HostSuite} holds the
whole-tree comparison ("a failed operation leaves XenStore as it was") and
C{assertFails}.

The suites are mixins run over both stores; the test case they are mixed
into provides C{connect()} and C{socketPath} (L{tests.support.fixtures}).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol

import attrs
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.interfaces import IProcessTransport
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import deferLater
from twisted.python.failure import Failure

from tests.support.treedump import Tree, diffTrees, dumpTree
from tests.support.xenstoresuite import FailureAssertions
from xenddev.backendctrl.protocol import ObjectClass
from xenddev.driverdomain.agent import BackendCtrlAgent
from xenddev.driverdomain.hotplug import HotplugRunner
from xenddev.interfaces import IDriverDomainKind
from xenddev.simulator import BackendSimulator, FrontendSimulator
from xenddev.toolstack.client import DriverDomainClient, PlugResult, populateFrontend
from xenddev.xenbus import waitForState
from xenddev.xenstore.client import XenStoreClient

#: The checkout (for C{PYTHONPATH} of the Python subprocesses tests start).
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

#: The device classes the simulated kernel backend serves unless told otherwise.
DEFAULT_BACKEND_CLASSES = ("vbd", "vif")


class Cleanups(Protocol):
    """A test case, as far as cleanups go."""

    def addCleanup(self, f: Callable[..., object], *args: Any, **kwargs: Any) -> None:
        """Run C{f} when the test ends."""


class HostTestCase(Cleanups, Protocol):
    """What L{startDriverDomain} needs of a test case (a fixture mixed with TestCase)."""

    socketPath: str

    def connect(self, **clientArgs: Any) -> Awaitable[XenStoreClient]:
        """A new connection to the test's store, disconnected at cleanup."""


@attrs.frozen
class DriverDomain:
    """
    A driver domain started by L{startDriverDomain}.

    @ivar domid: its domain id.
    @ivar agent: its agent (started; stopped at cleanup).
    @ivar xs: the agent's own connection (the hotplug runner and the
        simulated backend use it too).
    @ivar backend: the simulated kernel backend, or None.
    @ivar frontends: the simulated guest frontends started with it.
    @ivar runner: the hotplug runner, or None (no scripts run).
    """

    domid: int
    agent: BackendCtrlAgent
    xs: XenStoreClient
    backend: BackendSimulator | None
    frontends: tuple[FrontendSimulator, ...]
    runner: HotplugRunner | None


async def startFrontend(
    testCase: HostTestCase, guest: int, *, refuseToClose: bool = False
) -> FrontendSimulator:
    """
    Start a SIMULATED frontend of guest C{guest} on a connection of its own;
    it is stopped at cleanup.
    """
    frontend = FrontendSimulator(await testCase.connect(), guest, refuseToClose=refuseToClose)
    await frontend.start()
    testCase.addCleanup(frontend.stop)
    return frontend


async def startDriverDomain(
    testCase: HostTestCase,
    xs: XenStoreClient,
    domid: int,
    kinds: Sequence[IDriverDomainKind],
    *,
    hotplug: Mapping[str, Any] | None = None,
    pausers: Mapping[str, Any] | None = None,
    backendClasses: Sequence[str] | None = DEFAULT_BACKEND_CLASSES,
    guests: Iterable[int] = (),
    refuseToClose: bool = False,
    mkdirs: Iterable[str] = (),
) -> DriverDomain:
    """
    Start driver domain C{domid}, as a toolstack and a driver domain would:

      1. a connection of the driver domain's own, for the agent, the
         hotplug runner and the simulated backend;
      2. with C{hotplug} (L{HotplugRunner}'s keyword arguments, C{scriptDir}
         included; default directory C{/etc/xen/scripts}), a runner of the
         real scripts; None: no hotplug scripts run;
      3. the agent, serving C{kinds} in that order, and pause/resume
         requests with C{pausers} (kind name -> pauser) if given;
      4. the toolstack (C{xs}) makes the driver domain's control area
         (L{DriverDomainClient.ensureArea}), then the directories C{mkdirs};
      5. unless C{backendClasses} is None, the SIMULATED kernel backend for
         those device classes, started;
      6. a SIMULATED frontend for each of C{guests}, each on a connection of
         its own (L{startFrontend}; C{refuseToClose} as there), started;
      7. the agent started.

    Everything started is stopped at cleanup, in the reverse order. The
    driver domain is also appended to C{testCase.driverDomains} (made if
    missing), whose agents L{HostSuite} waits for.
    """
    agentXs = await testCase.connect()
    runner = None
    if hotplug is not None:
        options = dict(hotplug)
        scriptDir = options.pop("scriptDir", "/etc/xen/scripts")
        runner = HotplugRunner(
            scriptDir, xenstore=agentXs, xenstoredPath=testCase.socketPath, **options
        )
    agent = BackendCtrlAgent(agentXs, domid, list(kinds), runner, pausers)
    await DriverDomainClient(xs, domid).ensureArea()
    for path in mkdirs:
        await xs.mkdir(path)
    backend = None
    if backendClasses is not None:
        backend = BackendSimulator(agentXs, domid, classes=tuple(backendClasses))
        await backend.start()
        testCase.addCleanup(backend.stop)
    frontends = tuple(
        [await startFrontend(testCase, guest, refuseToClose=refuseToClose) for guest in guests]
    )
    await agent.start()
    testCase.addCleanup(agent.stop)
    started = DriverDomain(domid, agent, agentXs, backend, frontends, runner)
    if not hasattr(testCase, "driverDomains"):
        testCase.driverDomains = []  # type: ignore[attr-defined]
    testCase.driverDomains.append(started)  # type: ignore[attr-defined]
    return started


class HostSuite(FailureAssertions):
    """
    Base of the end-to-end suites (mixins combined with a server fixture and
    TestCase): the assertions they share, C{assertFails} included.
    C{self.xs} is the toolstack's connection; the agents waited for are
    those started with L{startDriverDomain} for this test, unless named.
    """

    xs: XenStoreClient
    driverDomains: list[DriverDomain]

    # Provided by the fixture and TestCase the suite is combined with.
    startServer: Any
    connect: Any
    socketPath: str
    addCleanup: Any
    mktemp: Any
    skipTest: Any
    fail: Any
    assertEqual: Any
    assertNotEqual: Any
    assertIn: Any
    assertNotIn: Any
    assertTrue: Any
    assertFalse: Any
    assertRaises: Any
    assertIsInstance: Any

    async def agentsIdle(self, *agents: BackendCtrlAgent) -> None:
        """
        Wait until C{agents} (default: every agent started with
        L{startDriverDomain} for this test) have nothing to do.
        """
        for agent in agents or [dd.agent for dd in getattr(self, "driverDomains", ())]:
            await agent.whenIdle()

    async def tree(self, *agents: BackendCtrlAgent) -> Tree:
        """The whole store (L{dumpTree}), once the agents are idle (see L{agentsIdle})."""
        await self.agentsIdle(*agents)
        return await dumpTree(self.xs)

    async def assertTreeIs(self, before: Tree, *agents: BackendCtrlAgent) -> None:
        """
        Once the agents are idle (see L{agentsIdle}), the store is exactly
        C{before}: no node added, removed or changed, permissions included.
        """
        self.assertEqual(diffTrees(before, await self.tree(*agents)), [])


async def attachByProtocol(
    xs: XenStoreClient,
    client: DriverDomainClient,
    name: str,
    target: Mapping[str, object],
    frontend: str,
    objectClass: ObjectClass,
    guest: int,
) -> PlugResult:
    """
    The toolstack's attach, step by step (the device controllers wrap
    these): prepare C{name}, plug it as C{p0} for C{frontend}, write the
    guest's frontend (state Initialising) in a transaction of C{xs},
    activate.
    """
    await client.prepare(name, target, objectClass)
    plug = await client.plug(name, "p0", frontend, objectClass)
    await xs.transact(lambda tx: populateFrontend(tx, plug, guest, {"state": "1"}))
    await client.activate(name, objectClass)
    return plug


async def closeBackend(xs: XenStoreClient, plug: PlugResult, timeout: float) -> None:
    """
    The toolstack closes the backend (online 0, Closing) and waits for
    Closed; asked again if the driver's late switch to Connected (its
    hotplug script reported after our write) overwrote the Closing, as
    L{DevController} does.
    """

    async def close(tx: Any) -> None:
        await tx.write(f"{plug.backendPath}/online", "0")
        await tx.write(f"{plug.backendPath}/state", "5")

    deadline = reactor.seconds() + timeout
    while True:
        await xs.transact(close)
        left = max(deadline - reactor.seconds(), 0.0)
        if await waitForState(xs, plug.backendPath, (4, 6), left) == 6:
            return


async def detachByProtocol(
    xs: XenStoreClient,
    client: DriverDomainClient,
    name: str,
    plug: PlugResult,
    objectClass: ObjectClass,
    timeout: float,
) -> None:
    """
    The toolstack's detach, step by step: close the backend (L{closeBackend}),
    remove the frontend, unplug, deactivate, unprepare.
    """
    await closeBackend(xs, plug, timeout)
    await xs.rm(plug.frontendPath)
    await client.unplug(name, "p0", objectClass)
    await client.deactivate(name, objectClass)
    await client.unprepare(name, objectClass)


async def pollUntil(condition: Callable[[], object], timeout: float = 20.0) -> None:
    """
    Poll a condition on the host every 20 ms (not in XenStore, so no watch
    can help); fail after C{timeout} seconds.
    """
    waited = 0.0
    while not condition():
        if waited >= timeout:
            raise AssertionError(f"condition not met within {timeout} s")
        await deferLater(reactor, 0.02, lambda: None)
        waited += 0.02


def shortTempDir(testCase: Cleanups, prefix: str) -> str:
    """
    A new temporary directory, removed at cleanup. Its path is short, unlike
    trial's C{mktemp()}: AF_UNIX socket paths must fit in 107 bytes.
    """
    path = tempfile.mkdtemp(prefix=prefix)
    testCase.addCleanup(shutil.rmtree, path, True)
    return path


def pythonEnv(**extra: str) -> dict[str, str]:
    """
    The environment for a Python subprocess of a test: this process's, with
    this checkout on C{PYTHONPATH} (where the twistd plugins and the
    C{tests} package are found) and C{extra} added.
    """
    return dict(os.environ, PYTHONPATH=ROOT, **extra)


async def stopProcess(proc: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    """
    Stop a subprocess without blocking the reactor: SIGTERM, then SIGKILL if
    it still runs after C{grace} seconds; reap it. A process that ends on
    SIGTERM goes through its normal shutdown, so a Python process measured
    by coverage (C{make test}) saves its data; SIGKILL would lose it.
    """
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        waited = 0.0
        while proc.poll() is None and waited < grace:
            await deferLater(reactor, 0.02, lambda: None)
            waited += 0.02
        if proc.poll() is None:
            proc.kill()
    proc.wait()


#: Python code that runs C{twistd} from this checkout (C{sys.executable -c
#: TWISTD_LAUNCHER ARGS...}, or written to a file; the plugins are found
#: through C{PYTHONPATH}, see L{pythonEnv}). twistd ends a process that a
#: signal stopped by sending itself that signal again, with the default
#: handler, so no C{atexit} handler runs: this saves the data of a coverage
#: measurement (C{make test}) first.
TWISTD_LAUNCHER = """
import sys
from twisted.application import app
from twisted.scripts.twistd import run

_exitWithSignal = app._exitWithSignal


def exitWithSignal(sig):
    coverage = sys.modules.get("coverage")
    current = coverage.Coverage.current() if coverage is not None else None
    if current is not None:
        current.stop()
        current.save()
    _exitWithSignal(sig)


app._exitWithSignal = exitWithSignal
sys.argv[0] = "twistd"
run()
"""


class WatchedProcess(ProcessProtocol):
    """
    The protocol of a process a test starts with C{reactor.spawnProcess}:
    its output (stdout and stderr together) is collected in C{output};
    C{ready} fires once C{readyLine} appears in it (and fails with the
    output if the process ends first); C{ended} fires with
    L{endedWith}C{(reason.value)} when it ends.
    """

    readyLine = b""

    def __init__(self) -> None:
        self.ready: Deferred[None] = Deferred()
        self.ended: Deferred[Any] = Deferred()
        self.output = b""

    def outReceived(self, data: bytes) -> None:
        """Collect output and watch for the ready line."""
        self.output += data
        if self.readyLine in self.output and not self.ready.called:
            self.ready.callback(None)

    errReceived = outReceived

    def processEnded(self, reason: Failure) -> None:
        """Fail C{ready} if it has not fired; fire C{ended}."""
        if not self.ready.called:
            self.ready.errback(RuntimeError(self.output.decode(errors="replace")))
        self.ended.callback(self.endedWith(reason.value))

    def endedWith(self, end: Any) -> Any:
        """What C{ended} fires with, from C{ProcessDone}/C{ProcessTerminated}: the exit code."""
        return end.exitCode


def spawnTwistd(
    testCase: Cleanups, proto: WatchedProcess, rundir: str, *args: str
) -> IProcessTransport:
    """
    Start C{twistd -n ARGS...} from this checkout (L{TWISTD_LAUNCHER},
    written into C{rundir}, the process's working directory) with
    C{proto}; it is stopped at cleanup if still alive (L{stopSpawned}).
    The environment is L{pythonEnv}'s without C{XENSTORED_PATH}.
    """
    launcher = os.path.join(rundir, "launch.py")
    if not os.path.exists(launcher):
        with open(launcher, "w") as f:
            f.write(TWISTD_LAUNCHER)
    env = pythonEnv()
    env.pop("XENSTORED_PATH", None)
    process: IProcessTransport = reactor.spawnProcess(  # type: ignore[attr-defined]
        proto,
        sys.executable,
        [sys.executable, launcher, "-n", "--pidfile=", *args],
        env=env,
        path=rundir,
    )
    testCase.addCleanup(stopSpawned, process, proto.ended)
    return process


async def stopSpawned(
    transport: IProcessTransport, ended: Deferred[Any], grace: float = 10.0
) -> None:
    """
    Stop a process started with C{reactor.spawnProcess} unless C{ended}
    (fired by its protocol's C{processEnded}) says it has ended: SIGTERM,
    then SIGKILL if it still runs after C{grace} seconds; wait for its end.
    Ended by SIGTERM, a Python process saves its coverage data (see
    L{stopProcess}).
    """
    for sig in ("TERM", "KILL"):
        if ended.called:
            break
        try:
            transport.signalProcess(sig)
        except ProcessExitedAlready:
            pass
        waited = 0.0
        while not ended.called and waited < grace:
            await deferLater(reactor, 0.02, lambda: None)
            waited += 0.02
    await ended
