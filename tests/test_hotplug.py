"""
Tests for L{xenddev.driverdomain.hotplug}.

Unit tests run small C{#!/bin/sh} scripts written into a temporary script
directory.  Integration tests run the real C{block} and C{vif-bridge}
scripts (Debian C{xen-utils-common}) against a real store: the C xenstored
(under the test shim) and the embedded one, with real loop devices and a
bridge plus tap inside a private network namespace.
"""

from __future__ import annotations

import os
import shutil
import signal
import stat
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, cast

from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.task import deferLater
from twisted.logger import ILogObserver, Logger
from twisted.trial.unittest import SkipTest, TestCase
from zope.interface.verify import verifyObject

from tests.support.fixtures import EmbeddedXenstoredFixture, RealXenstoredFixture
from tests.support.loopdev import (
    acquireLoopTestLock,
    attachLoop,
    detachLoopsFor,
    loopDevicesFor,
    makeImage,
    requireLoopDevices,
)
from tests.support.netns import NetNamespace, requireNetns
from tests.support.realxenstored import CLI_TOOLS, requireRealXenstored
from xenddev.driverdomain import hotplug
from xenddev.driverdomain.hotplug import (
    BASE_PATH,
    DEFAULT_SCRIPT_DIR,
    HotplugArgumentError,
    HotplugResult,
    HotplugRunner,
    HotplugScriptError,
    HotplugTimeout,
    InvalidScriptError,
    blockEnvironment,
    vifEnvironment,
)
from xenddev.interfaces import IHotplugRunner, ITransaction

# -- helpers ------------------------------------------------------------------


def isAlive(pid: int) -> bool:
    """
    Whether process C{pid} exists and is not a zombie.  (PID 1 here may not
    reap orphans promptly; a zombie has already been killed.)
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except FileNotFoundError:
        return False
    return data.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def groupMembers(pgid: int) -> list[int]:
    """Live (non-zombie) processes whose process group is C{pgid}."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            members.append(int(entry))
    return members


async def waitUntil(predicate: Any, timeout: float = 5.0, step: float = 0.02) -> bool:
    """Poll C{predicate()} on the reactor until true or C{timeout}."""
    deadline = reactor.seconds() + timeout
    while not predicate():
        if reactor.seconds() >= deadline:
            return False
        await deferLater(reactor, step)
    return True


class SpyReactor:
    """The real reactor, recording every C{spawnProcess} argv."""

    def __init__(self) -> None:
        self.spawned: list[list[str]] = []

    def spawnProcess(self, proto: Any, executable: str, args: list[str], **kw: Any) -> Any:
        """Record C{args}, then spawn for real."""
        self.spawned.append(list(args))
        return reactor.spawnProcess(proto, executable, args, **kw)

    def __getattr__(self, name: str) -> Any:
        return getattr(reactor, name)


class FakeStore:
    """Just enough of an IXenStore for reading C{hotplug-error}."""

    def __init__(self, values: dict[str, str] | None = None, broken: bool = False) -> None:
        self.values = values or {}
        self.broken = broken
        self.reads: list[str] = []

    def readOrNone(self, path: str) -> Deferred[str | None]:
        """Record the read; answer from C{values} (or raise if broken)."""
        self.reads.append(path)
        if self.broken:
            raise ConnectionError("store gone")
        return succeed(self.values.get(path))


class ScriptDirMixin:
    """A temporary script directory with helpers to write fake scripts."""

    def makeScriptDir(self) -> None:
        """Create C{self.scriptDir} (inside C{self.workDir})."""
        self.workDir = os.path.abspath(self.mktemp())  # type: ignore[attr-defined]
        self.scriptDir = os.path.join(self.workDir, "scripts")
        os.makedirs(self.scriptDir)

    def writeScript(self, name: str, body: str, mode: int = 0o755, where: str | None = None) -> str:
        """Write C{#!/bin/sh} + C{body} as C{name}; return its path."""
        path = os.path.join(where or self.scriptDir, name)
        with open(path, "w") as f:
            f.write("#!/bin/sh\n" + body)
        os.chmod(path, mode)
        return path

    def runner(self, **kw: Any) -> HotplugRunner:
        """A runner on the real reactor for C{self.scriptDir}."""
        kw.setdefault("reactor", reactor)
        return HotplugRunner(self.scriptDir, **kw)


# -- unit tests with fake scripts ----------------------------------------------


class RunnerTests(ScriptDirMixin, TestCase):
    """L{HotplugRunner.run} with fake scripts."""

    def setUp(self) -> None:
        """A fresh script directory."""
        self.makeScriptDir()

    def test_interface(self) -> None:
        """HotplugRunner provides IHotplugRunner."""
        self.assertTrue(verifyObject(IHotplugRunner, self.runner()))

    async def test_success(self) -> None:
        """Exit status 0 fires with a HotplugResult holding stdout and stderr."""
        path = self.writeScript("ok", 'echo "hello $1"\necho warn >&2\nexit 0\n')
        result = await self.runner().run("ok", ["world"], {})
        self.assertIsInstance(result, HotplugResult)
        self.assertEqual(result.script, path)
        self.assertEqual(result.args, ("world",))
        self.assertEqual(result.exitCode, 0)
        self.assertEqual(result.stdout, "hello world\n")
        self.assertEqual(result.stderr, "warn\n")
        self.assertGreater(result.duration, 0)
        self.assertLess(result.duration, 10)

    async def test_failure(self) -> None:
        """
        A non-zero exit fails with HotplugScriptError carrying the command,
        exit code and stderr.
        """
        path = self.writeScript("bad", "echo out\necho 'it broke' >&2\nexit 3\n")
        runner = self.runner()
        with self.assertRaises(HotplugScriptError) as cm:
            await runner.run("bad", ["add"], {})
        e = cm.exception
        self.assertEqual(e.exitCode, 3)
        self.assertIsNone(e.signalNumber)
        self.assertEqual(e.stderr, "it broke\n")
        self.assertEqual(e.stdout, "out\n")
        self.assertEqual(e.command, (runner.setsid, "--wait", path, "add"))
        self.assertEqual(e.script, path)
        self.assertEqual(e.scriptArgs, ("add",))
        self.assertIsNone(e.hotplugError)
        self.assertIn("exit code 3", str(e))
        self.assertIn("it broke", str(e))

    async def test_killedBySignal(self) -> None:
        """A script killed by a signal fails with its signal number, no exit code."""
        self.writeScript("suicide", "kill -9 $$\n")
        with self.assertRaises(HotplugScriptError) as cm:
            await self.runner().run("suicide", [], {})
        self.assertIsNone(cm.exception.exitCode)
        self.assertEqual(cm.exception.signalNumber, signal.SIGKILL)
        self.assertIn("signal 9", str(cm.exception))

    async def test_timeoutKillsProcessGroup(self) -> None:
        """
        A script that outlives its timeout fails with HotplugTimeout, and
        both the script and the child it started are gone.
        """
        pidfile = os.path.join(self.workDir, "pids")
        self.writeScript("slow", f"sleep 100 &\necho $$ $! > {pidfile}\necho started\nwait\n")
        start = reactor.seconds()
        with self.assertRaises(HotplugTimeout) as cm:
            await self.runner(timeout=0.5).run("slow", ["add"], {})
        elapsed = reactor.seconds() - start
        self.assertGreaterEqual(elapsed, 0.5)
        self.assertLess(elapsed, 5)
        e = cm.exception
        self.assertEqual(e.timeout, 0.5)
        self.assertTrue(e.reaped)
        self.assertEqual(e.stdout, "started\n")
        with open(pidfile) as f:
            scriptPid, childPid = (int(p) for p in f.read().split())
        self.assertTrue(
            await waitUntil(lambda: not isAlive(scriptPid) and not isAlive(childPid)),
            f"script {scriptPid} or its child {childPid} survived the timeout",
        )
        self.assertEqual(groupMembers(scriptPid), [])

    async def test_timeoutPerRun(self) -> None:
        """run(timeout=...) overrides the runner's timeout."""
        self.writeScript("slow", "sleep 100\n")
        with self.assertRaises(HotplugTimeout) as cm:
            await self.runner(timeout=100).run("slow", [], {}, timeout=0.2)
        self.assertEqual(cm.exception.timeout, 0.2)

    async def test_ownSession(self) -> None:
        """
        The script leads its own session and process group (so a kill of the
        group cannot hit the daemon, and reaches everything it started).
        """
        self.writeScript("session", "cat /proc/$$/stat\n")
        result = await self.runner().run("session", [], {})
        fields = result.stdout.rsplit(")", 1)[1].split()
        pid = int(result.stdout.split()[0])
        pgrp, session = int(fields[2]), int(fields[3])
        self.assertEqual((pgrp, session), (pid, pid))
        self.assertNotEqual(pgrp, os.getpgrp())

    async def test_environmentExact(self) -> None:
        """
        The script's initial environment is exactly PATH, XENSTORED_PATH and
        the caller's variables (nothing inherited from the daemon).
        """
        self.writeScript("env", "cat /proc/$$/environ\n")
        os.environ["XENDDEV_SHOULD_NOT_LEAK"] = "1"
        self.addCleanup(os.environ.pop, "XENDDEV_SHOULD_NOT_LEAK", None)
        result = await self.runner(xenstoredPath="/x/socket").run(
            "env", [], {"XENBUS_PATH": "backend/vbd/1/2", "ODD": "a b=c;d"}
        )
        entries = [e for e in result.stdout.split("\0") if e]
        env = dict(e.split("=", 1) for e in entries)
        self.assertEqual(len(entries), len(env))
        self.assertEqual(
            env,
            {
                "PATH": BASE_PATH,
                "XENSTORED_PATH": "/x/socket",
                "XENBUS_PATH": "backend/vbd/1/2",
                "ODD": "a b=c;d",
            },
        )

    async def test_environmentNoStore(self) -> None:
        """Without xenstoredPath, XENSTORED_PATH is not set; the caller may override PATH."""
        self.writeScript("env", "cat /proc/$$/environ\n")
        result = await self.runner().run("env", [], {"PATH": "/bin"})
        self.assertEqual(result.stdout.split("\0")[:-1], ["PATH=/bin"])

    async def test_argumentsVerbatim(self) -> None:
        """
        Arguments reach the script unchanged, including spaces, quotes, ';',
        '$(...)', globs and empty strings: no shell is involved.
        """
        marker = os.path.join(self.workDir, "pwned")
        args = ["a b", "x;y", f"$(touch {marker})", "`id`", "*", "", "'\"", "-n", "--"]
        self.writeScript("args", "printf '%s\\0' \"$@\"\n")
        result = await self.runner().run("args", args, {})
        self.assertEqual(result.stdout.split("\0")[:-1], args)
        self.assertEqual(result.args, tuple(args))
        self.assertFalse(os.path.exists(marker))

    async def test_stdinIsDevNull(self) -> None:
        """The script's stdin is /dev/null: reading it gives EOF at once."""
        self.writeScript("stdin", "readlink /proc/$$/fd/0\ncat\necho end\n")
        result = await self.runner().run("stdin", [], {})
        self.assertEqual(result.stdout, "/dev/null\nend\n")

    async def test_outputBounded(self) -> None:
        """Only the last maxOutput bytes of stdout and stderr are kept."""
        self.writeScript(
            "chatty",
            "i=0\nwhile [ $i -lt 2000 ]; do echo line$i; echo err$i >&2; i=$((i+1)); done\n",
        )
        result = await self.runner(maxOutput=100).run("chatty", [], {})
        self.assertEqual(len(result.stdout.encode()), 100)
        self.assertTrue(result.stdout.endswith("line1999\n"))
        self.assertEqual(len(result.stderr.encode()), 100)
        self.assertTrue(result.stderr.endswith("err1999\n"))

    async def test_descendantHoldingPipes(self) -> None:
        """
        A background process that keeps stdout open does not hold up the
        result: the pipes are closed shortly after the script exits.
        """
        self.patch(hotplug, "PIPE_DRAIN_GRACE", 0.2)
        pidfile = os.path.join(self.workDir, "daemon")
        self.writeScript("daemon", f"sleep 30 &\necho $! > {pidfile}\necho done\n")

        def killDaemon() -> None:
            with open(pidfile) as f:
                pid = int(f.read())
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

        self.addCleanup(killDaemon)
        start = reactor.seconds()
        result = await self.runner().run("daemon", [], {})
        self.assertLess(reactor.seconds() - start, 5)
        self.assertEqual(result.stdout, "done\n")

    async def test_cancelKillsGroup(self) -> None:
        """Cancelling the Deferred kills the script's process group."""
        pidfile = os.path.join(self.workDir, "pid")
        self.writeScript("slow", f"sleep 100 &\necho $$ $! > {pidfile}\nwait\n")
        d = self.runner().run("slow", [], {})
        self.assertTrue(await waitUntil(lambda: os.path.exists(pidfile)))
        self.assertTrue(await waitUntil(lambda: os.path.getsize(pidfile) > 0))
        with open(pidfile) as f:
            pids = [int(p) for p in f.read().split()]
        d.cancel()
        with self.assertRaises(CancelledError):
            await d
        self.assertTrue(await waitUntil(lambda: not any(isAlive(p) for p in pids)))

    async def test_hotplugErrorRead(self) -> None:
        """
        With a XenStore client and XENBUS_PATH, a failure carries the value
        of <XENBUS_PATH>/hotplug-error read after the exit.
        """
        self.writeScript("fatal", "exit 1\n")
        store = FakeStore(
            {
                "backend/vbd/5/51712/hotplug-error": "disk gone",
                "backend/vbd/5/51712/hotplug-status": "error",
            }
        )
        with self.assertRaises(HotplugScriptError) as cm:
            await self.runner(xenstore=store).run(
                "fatal", ["add"], {"XENBUS_PATH": "backend/vbd/5/51712"}
            )
        self.assertEqual(cm.exception.hotplugError, "disk gone")
        self.assertEqual(cm.exception.hotplugStatus, "error")
        self.assertIn("disk gone", str(cm.exception))
        self.assertEqual(
            store.reads,
            ["backend/vbd/5/51712/hotplug-error", "backend/vbd/5/51712/hotplug-status"],
        )

    async def test_hotplugErrorNotReadWithoutPath(self) -> None:
        """Without XENBUS_PATH in the environment the store is not asked."""
        self.writeScript("fatal", "exit 1\n")
        store = FakeStore({"x": "y"})
        with self.assertRaises(HotplugScriptError) as cm:
            await self.runner(xenstore=store).run("fatal", [], {})
        self.assertIsNone(cm.exception.hotplugError)
        self.assertEqual(store.reads, [])

    async def test_hotplugErrorNotReadOnSuccess(self) -> None:
        """A successful run does not read hotplug-error."""
        self.writeScript("ok", "exit 0\n")
        store = FakeStore()
        await self.runner(xenstore=store).run("ok", [], {"XENBUS_PATH": "backend/vbd/5/1"})
        self.assertEqual(store.reads, [])

    async def test_hotplugErrorReadFails(self) -> None:
        """If reading hotplug-error fails, the script's failure is still reported."""
        self.writeScript("fatal", "exit 4\n")
        store = FakeStore(broken=True)
        with self.assertRaises(HotplugScriptError) as cm:
            await self.runner(xenstore=store).run("fatal", [], {"XENBUS_PATH": "backend/vbd/5/1"})
        self.assertEqual(cm.exception.exitCode, 4)
        self.assertIsNone(cm.exception.hotplugError)
        self.flushLoggedErrors()

    async def test_logsOneLine(self) -> None:
        """Each run logs one event with script, action, exit code and duration."""
        events: list[dict[str, Any]] = []
        self.patch(hotplug, "log", Logger(observer=cast(ILogObserver, events.append)))
        self.writeScript("ok", "exit 0\n")
        self.writeScript("bad", "exit 2\n")
        self.writeScript("slow", "sleep 10\n")
        await self.runner().run("ok", ["add"], {})
        with self.assertRaises(HotplugScriptError):
            await self.runner().run("bad", ["remove"], {})
        with self.assertRaises(HotplugTimeout):
            await self.runner().run("slow", ["online"], {"XENBUS_PATH": "b/vif/1/0"}, timeout=0.1)
        self.assertEqual(
            [(e["script"], e["action"], e["exitCode"], e["xenbusPath"]) for e in events],
            [
                ("ok", "add", 0, "-"),
                ("bad", "remove", 2, "-"),
                ("slow", "online", None, "b/vif/1/0"),
            ],
        )
        for e in events:
            self.assertIsInstance(e["duration"], float)

    async def test_absoluteAllowed(self) -> None:
        """With allowAbsolute, an absolute path outside the script directory runs."""
        other = os.path.join(self.workDir, "elsewhere")
        os.makedirs(other)
        path = self.writeScript("tool", "echo ran\n", where=other)
        result = await self.runner(allowAbsolute=True).run(path, [], {})
        self.assertEqual((result.script, result.stdout), (path, "ran\n"))

    async def test_scriptDirSymlinkFollowed(self) -> None:
        """A symbolic link inside the script directory is trusted and followed."""
        other = os.path.join(self.workDir, "elsewhere")
        os.makedirs(other)
        target = self.writeScript("real", "echo linked\n", where=other)
        os.symlink(target, os.path.join(self.scriptDir, "alias"))
        result = await self.runner().run("alias", [], {})
        self.assertEqual(result.stdout, "linked\n")


class RefusalTests(ScriptDirMixin, TestCase):
    """Bad script names and arguments are refused before anything runs."""

    def setUp(self) -> None:
        """A fresh script directory."""
        self.makeScriptDir()
        self.marker = os.path.join(self.workDir, "ran")
        touch = f"touch {self.marker}\n"
        # ../x: an executable just outside the script directory
        self.writeScript("x", touch, where=self.workDir)
        os.makedirs(os.path.join(self.scriptDir, "a"))
        self.writeScript("b", touch, where=os.path.join(self.scriptDir, "a"))
        self.writeScript("noexec", touch, mode=0o644)
        os.makedirs(os.path.join(self.scriptDir, "subdir"))
        self.spy = SpyReactor()
        self.runner_ = HotplugRunner(self.scriptDir, reactor=self.spy)

    async def assertRefused(
        self, script: Any, why: str, runner: HotplugRunner | None = None
    ) -> None:
        """run() fails with InvalidScriptError mentioning C{why}; nothing ran."""
        runner = runner or self.runner_
        with self.assertRaises(InvalidScriptError) as cm:
            await runner.run(script, ["add"], {})
        self.assertIsInstance(cm.exception, ValueError)
        self.assertIn(why, cm.exception.reason)
        self.assertEqual(cm.exception.script, script)
        self.assertEqual(self.spy.spawned, [])
        self.assertFalse(os.path.exists(self.marker))
        with self.assertRaises(InvalidScriptError):
            runner.resolveScript(script)

    async def test_parentDirectory(self) -> None:
        """'../x' is refused even though it exists and is executable."""
        await self.assertRefused("../x", "contains '/'")

    async def test_absolute(self) -> None:
        """'/bin/sh' is refused unless absolute paths are allowed."""
        await self.assertRefused("/bin/sh", "absolute paths are not allowed")

    async def test_slash(self) -> None:
        """'a/b' is refused even though it exists in a subdirectory."""
        await self.assertRefused("a/b", "contains '/'")

    async def test_missing(self) -> None:
        """A name that does not exist is refused."""
        await self.assertRefused("missing", "does not exist")

    async def test_notExecutable(self) -> None:
        """A file without execute permission is refused."""
        if os.geteuid() == 0:
            # root has X_OK on files with any x bit; 0644 has none.
            self.assertEqual(stat.S_IMODE(os.stat(self.scriptDir + "/noexec").st_mode), 0o644)
        await self.assertRefused("noexec", "not executable")

    async def test_directory(self) -> None:
        """A directory is refused."""
        await self.assertRefused("subdir", "not a regular file")

    async def test_dots(self) -> None:
        """'.', '..' and the empty name are refused."""
        await self.assertRefused(".", "not a script name")
        await self.assertRefused("..", "not a script name")
        await self.assertRefused("", "empty")

    async def test_notText(self) -> None:
        """A script name that is not a str is refused."""
        await self.assertRefused(b"block", "not a str")

    async def test_absoluteMissing(self) -> None:
        """With allowAbsolute, a missing absolute path is still refused."""
        runner = HotplugRunner(self.scriptDir, reactor=self.spy, allowAbsolute=True)
        await self.assertRefused(os.path.join(self.workDir, "nope"), "does not exist", runner)

    async def test_badArguments(self) -> None:
        """Arguments and environment entries that cannot be passed are refused."""
        self.writeScript("ok", f"touch {self.marker}\n")
        for args, env in [
            (["a\0b"], {}),
            ("add", {}),
            ([1], {}),
            ([], {"A=B": "x"}),
            ([], {"": "x"}),
            ([], {"A": "x\0"}),
            ([], {"A": 1}),
        ]:
            with self.assertRaises(HotplugArgumentError):
                await self.runner_.run("ok", args, env)  # type: ignore[arg-type]
        with self.assertRaises(HotplugArgumentError):
            await self.runner_.run("ok", [], {}, timeout=0)
        self.assertEqual(self.spy.spawned, [])
        self.assertFalse(os.path.exists(self.marker))

    def test_constructorChecks(self) -> None:
        """Bad constructor parameters raise HotplugArgumentError."""
        with self.assertRaises(HotplugArgumentError):
            HotplugRunner(self.scriptDir, reactor=reactor, timeout=0)
        with self.assertRaises(HotplugArgumentError):
            HotplugRunner(self.scriptDir, reactor=reactor, maxOutput=0)
        with self.assertRaises(HotplugArgumentError):
            HotplugRunner(self.scriptDir, reactor=reactor, setsid="/nonexistent/setsid")

    def test_defaults(self) -> None:
        """The defaults are libxl's: /etc/xen/scripts and 40 s."""
        runner = HotplugRunner(reactor=reactor)
        self.assertEqual(runner.scriptDir, DEFAULT_SCRIPT_DIR)
        self.assertEqual(runner.timeout, 40.0)
        self.assertEqual(runner.wrapper, ())

    async def test_wrapperPrefix(self) -> None:
        """The wrapper argv goes between setsid and the script, without a shell."""
        self.writeScript("ok", "echo ok\n")
        runner = HotplugRunner(self.scriptDir, reactor=self.spy, wrapper=["env", "A=1"])
        self.writeScript("showenv", "echo $A\n")
        result = await runner.run("showenv", ["x y"], {})
        self.assertEqual(result.stdout, "1\n")
        self.assertEqual(
            self.spy.spawned,
            [
                [
                    runner.setsid,
                    "--wait",
                    runner.wrapper[0],
                    "A=1",
                    self.scriptDir + "/showenv",
                    "x y",
                ]
            ],
        )
        self.assertEqual(runner.wrapper[0], shutil.which("env", path=BASE_PATH))

    def test_wrapperChecks(self) -> None:
        """A wrapper given as a string or naming an unknown command is refused."""
        with self.assertRaises(HotplugArgumentError):
            HotplugRunner(self.scriptDir, reactor=reactor, wrapper="ip netns exec x")
        with self.assertRaises(HotplugArgumentError):
            HotplugRunner(self.scriptDir, reactor=reactor, wrapper=["no-such-command-xd"])


class EnvironmentHelperTests(TestCase):
    """L{blockEnvironment} and L{vifEnvironment} build libxl's arguments."""

    def test_blockRelative(self) -> None:
        """A relative backend path gives libxl's exact environment."""
        args, env = blockEnvironment("add", "backend/vbd/5/51712")
        self.assertEqual(args, ["add"])
        self.assertEqual(
            env,
            {
                "script": "/etc/xen/scripts/block",
                "XENBUS_TYPE": "vbd",
                "XENBUS_PATH": "backend/vbd/5/51712",
                "XENBUS_BASE_PATH": "backend",
            },
        )

    def test_blockAbsolute(self) -> None:
        """An absolute backend path keeps its prefix in XENBUS_BASE_PATH."""
        args, env = blockEnvironment(
            "remove", "/local/domain/3/backend/vbd/5/768", script="block-iscsi", scriptDir="/s"
        )
        self.assertEqual(args, ["remove"])
        self.assertEqual(env["XENBUS_PATH"], "/local/domain/3/backend/vbd/5/768")
        self.assertEqual(env["XENBUS_BASE_PATH"], "/local/domain/3/backend")
        self.assertEqual(env["script"], "/s/block-iscsi")

    def test_blockErrors(self) -> None:
        """Bad actions and paths are refused with HotplugArgumentError (a ValueError)."""
        for action, path in [
            ("online", "backend/vbd/5/51712"),
            ("add", "backend/vif/5/0"),
            ("add", "backend/vbd/5"),
            ("add", "frontend/vbd/5/51712"),
            ("add", "backend/vbd/x/51712"),
            ("add", "backend/vbd/5/51712/"),
            ("add", "backend/vbd/5/5 1"),
            ("add", ""),
        ]:
            with self.assertRaises(ValueError, msg=(action, path)):
                blockEnvironment(action, path)

    def test_vif(self) -> None:
        """A PV vif gets online/offline, type_if=vif, vif and netdev."""
        args, env = vifEnvironment("online", "backend/vif/5/0")
        self.assertEqual(args, ["online", "type_if=vif"])
        self.assertEqual(
            env,
            {
                "script": "/etc/xen/scripts/vif-bridge",
                "XENBUS_TYPE": "vif",
                "XENBUS_PATH": "backend/vif/5/0",
                "XENBUS_BASE_PATH": "backend",
                "netdev": "",
                "vif": "vif5.0",
            },
        )

    def test_vifDeviceActions(self) -> None:
        """The device actions add/remove map to online/offline as libxl does."""
        self.assertEqual(vifEnvironment("add", "backend/vif/5/1")[0][0], "online")
        self.assertEqual(vifEnvironment("remove", "backend/vif/5/1")[0][0], "offline")
        self.assertEqual(vifEnvironment("offline", "backend/vif/5/1")[0][0], "offline")

    def test_vifOptions(self) -> None:
        """vifName, bridge, netdev and script are passed through."""
        args, env = vifEnvironment(
            "offline",
            "/local/domain/2/backend/vif/7/3",
            "myvif",
            bridge="xenbr0",
            netdev="eth1",
            script="vif-route",
        )
        self.assertEqual(args, ["offline", "type_if=vif"])
        self.assertEqual(env["vif"], "myvif")
        self.assertEqual(env["bridge"], "xenbr0")
        self.assertEqual(env["netdev"], "eth1")
        self.assertEqual(env["script"], "/etc/xen/scripts/vif-route")
        self.assertEqual(env["XENBUS_BASE_PATH"], "/local/domain/2/backend")

    def test_tap(self) -> None:
        """An emulated NIC's tap gets add/remove, type_if=tap, INTERFACE and vif."""
        args, env = vifEnvironment("add", "backend/vif/5/0", typeIf="tap")
        self.assertEqual(args, ["add", "type_if=tap"])
        self.assertEqual(env["INTERFACE"], "vif5.0-emu")
        self.assertEqual(env["vif"], "vif5.0")

    def test_vifErrors(self) -> None:
        """Bad actions, paths, names and types are refused."""
        for kw in [
            {"action": "up", "backendPath": "backend/vif/5/0"},
            {"action": "online", "backendPath": "backend/vbd/5/0"},
            {"action": "online", "backendPath": "backend/vif/5/0", "vifName": "x" * 16},
            {"action": "online", "backendPath": "backend/vif/5/0", "vifName": "a/b"},
            {"action": "online", "backendPath": "backend/vif/5/0", "vifName": ""},
            {"action": "online", "backendPath": "backend/vif/5/0", "typeIf": "tap"},
            {"action": "add", "backendPath": "backend/vif/5/0", "typeIf": "ioemu"},
            {"action": "online", "backendPath": "backend/vif/5/0", "netdev": 3},
        ]:
            with self.assertRaises(HotplugArgumentError, msg=kw):
                vifEnvironment(**kw)  # type: ignore[arg-type]

    def test_runnerEnvironment(self) -> None:
        """The runner's environment: PATH, XENSTORED_PATH, then the caller's."""
        runner = HotplugRunner(reactor=reactor, xenstoredPath="/run/xs")
        self.assertEqual(
            runner.environment({"vif": "vif1.0"}),
            {"PATH": BASE_PATH, "XENSTORED_PATH": "/run/xs", "vif": "vif1.0"},
        )


# -- integration: the real scripts ---------------------------------------------

BLOCK_BACKEND = "/local/domain/0/backend/vbd/5/51712"
BLOCK_BACKEND_REL = "backend/vbd/5/51712"
VIF_BACKEND = "/local/domain/0/backend/vif/5/0"
VIF_BACKEND_REL = "backend/vif/5/0"


def requireHotplugScripts(testcase: TestCase, scripts: Iterable[str]) -> None:
    """
    Skip unless the real scripts and what they need outside XenStore exist.

    C{xen-hotplug-common.sh} starts with C{exec 2>>/var/log/xen/xen-hotplug.log}
    under C{set -e}: without that directory every script exits 1 at once,
    writing nothing.  Root (which these tests need anyway) creates it.
    """
    for name in scripts:
        path = os.path.join(DEFAULT_SCRIPT_DIR, name)
        if not os.access(path, os.X_OK):
            raise SkipTest(f"{path} not found (install the Debian package xen-utils-common)")
    if not os.path.isdir("/var/log/xen"):
        if os.geteuid() != 0:
            raise SkipTest("/var/log/xen is missing and only root may create it")
        os.makedirs("/var/log/xen", exist_ok=True)
    for tool in (*CLI_TOOLS, "xenstore-list"):
        if shutil.which(tool, path=BASE_PATH) is None:
            raise SkipTest(f"{tool} not found (install the Debian package xenstore-utils)")


if TYPE_CHECKING:
    from tests.support.fixtures import ServerFixture

    class _SuiteBase(TestCase, ServerFixture):
        """What the concrete test classes mix in (for type checkers only)."""

else:
    _SuiteBase = object


class RealScriptSuite(_SuiteBase):
    """
    Set-up shared by the real-script suites: a store (from the fixture
    mixin), a client connected to it and a runner pointing the scripts at it.
    """

    scripts: tuple[str, ...] = ()
    wrapper: list[str] = []

    async def setUpStore(self) -> None:
        """Start the store, connect, and build C{self.runner}."""
        requireHotplugScripts(self, self.scripts)
        self.startServer()
        self.store = await self.connect()
        self.runner = HotplugRunner(
            reactor=reactor,
            xenstore=self.store,
            xenstoredPath=self.socketPath,
            wrapper=self.wrapper,
        )

    async def writeNodes(self, base: str, nodes: dict[str, str]) -> None:
        """Write C{nodes} under C{base} in one transaction."""

        async def fill(tx: ITransaction) -> None:
            for name, value in nodes.items():
                await tx.write(f"{base}/{name}", value)

        await self.store.transact(fill)  # type: ignore[arg-type]  # mypy infers T=Never

    async def node(self, path: str) -> str | None:
        """Read a node, L{None} if missing."""
        value: str | None = await self.store.readOrNone(path)
        return value


def majorMinor(device: str) -> str:
    """C{physical-device} as the block script writes it: hex major:minor."""
    rdev = os.stat(device).st_rdev
    return f"{os.major(rdev):x}:{os.minor(rdev):x}"


class BlockScriptSuite(RealScriptSuite):
    """The real C{block} script with real loop devices."""

    scripts = ("block",)

    async def setUp(self) -> None:  # type: ignore[override]
        """A store, a client, a runner and an 8 MiB image file."""
        # One loop-device test at a time, across trial -j workers (see
        # acquireLoopTestLock); the wait is short and cannot deadlock.
        self.addCleanup(os.close, acquireLoopTestLock())
        requireLoopDevices(self)
        await self.setUpStore()
        self.image = makeImage(os.path.join(self.mktemp() + "-disk.img"))
        self.addCleanup(detachLoopsFor, self.image)

    async def writeBackend(self, **overrides: str) -> None:
        """Write a vbd backend as libxl would, after the kernel's InitWait."""
        nodes = {
            "frontend": "/local/domain/5/device/vbd/51712",
            "frontend-id": "5",
            "online": "1",
            "removable": "0",
            "bootable": "1",
            "state": "2",
            "dev": "xvda",
            "type": "phy",
            "mode": "w",
            "device-type": "disk",
            "discard-enable": "1",
            "params": self.image,
            "script": "/etc/xen/scripts/block",
        }
        nodes.update(overrides)
        await self.writeNodes(BLOCK_BACKEND, nodes)

    async def test_fileAddRemove(self) -> None:
        """
        block add on a file sets up a loop device and reports it in the
        backend; block remove detaches it.
        """
        await self.writeBackend()
        result = await self.runner.run("block", *blockEnvironment("add", BLOCK_BACKEND_REL))
        self.assertEqual(result.exitCode, 0)
        self.assertEqual(await self.node(f"{BLOCK_BACKEND}/hotplug-status"), "connected")
        loops = loopDevicesFor(self.image)
        self.assertEqual(len(loops), 1, loops)
        self.assertEqual(await self.node(f"{BLOCK_BACKEND}/node"), loops[0])
        self.assertEqual(await self.node(f"{BLOCK_BACKEND}/physical-device-path"), loops[0])
        self.assertEqual(await self.node(f"{BLOCK_BACKEND}/physical-device"), majorMinor(loops[0]))

        await self.runner.run("block", *blockEnvironment("remove", BLOCK_BACKEND_REL))
        # losetup -d on a device someone else has open (another losetup
        # probing, blkid) only marks it for autoclear; the kernel detaches it
        # when the last opener closes.
        self.assertTrue(
            await waitUntil(lambda: loopDevicesFor(self.image) == [], step=0.05),
            f"{loops[0]} still attached to {self.image}",
        )

    async def test_phyAddRemove(self) -> None:
        """
        block add on a block device (an existing loop device, absolute
        XENBUS_PATH) records its numbers; remove leaves the device alone.
        """
        loop = attachLoop(self.image)
        self.addCleanup(detachLoopsFor, self.image)
        await self.writeBackend(params=loop)
        await self.runner.run("block", *blockEnvironment("add", BLOCK_BACKEND))
        self.assertEqual(await self.node(f"{BLOCK_BACKEND}/hotplug-status"), "connected")
        self.assertEqual(await self.node(f"{BLOCK_BACKEND}/physical-device"), majorMinor(loop))
        self.assertEqual(await self.node(f"{BLOCK_BACKEND}/physical-device-path"), loop)
        self.assertIsNone(await self.node(f"{BLOCK_BACKEND}/node"))
        await self.runner.run("block", *blockEnvironment("remove", BLOCK_BACKEND))
        self.assertEqual(loopDevicesFor(self.image), [loop])

    async def test_addTwiceIsNoop(self) -> None:
        """A second add (physical-device already present) exits 0 at once."""
        await self.writeBackend()
        env = blockEnvironment("add", BLOCK_BACKEND_REL)
        await self.runner.run("block", *env)
        await self.runner.run("block", *env)
        self.assertEqual(len(loopDevicesFor(self.image)), 1)

    async def test_fileAddWrongState(self) -> None:
        """
        A file add when the backend is not in InitWait (2) fails; the script
        writes hotplug-error, which the failure carries, and
        hotplug-status=error.
        """
        await self.writeBackend(state="1")
        with self.assertRaises(HotplugScriptError) as cm:
            await self.runner.run("block", *blockEnvironment("add", BLOCK_BACKEND_REL))
        e = cm.exception
        self.assertEqual(e.exitCode, 1)
        self.assertEqual(
            e.hotplugError,
            f"Path closed or removed during hotplug add: {BLOCK_BACKEND_REL} state: 1",
        )
        self.assertEqual(e.hotplugStatus, "error")
        self.assertEqual(await self.node(f"{BLOCK_BACKEND}/hotplug-status"), "error")
        self.assertEqual(loopDevicesFor(self.image), [])

    async def test_readOnlyFileBusy(self) -> None:
        """
        A read-only file asked for read-write: the script reports busy
        (hotplug-status=busy) with its reason in hotplug-error.
        """
        os.chmod(self.image, 0o444)
        await self.writeBackend()
        with self.assertRaises(HotplugScriptError) as cm:
            await self.runner.run("block", *blockEnvironment("add", BLOCK_BACKEND_REL))
        self.assertEqual(
            cm.exception.hotplugError,
            f"File {self.image} is read-only, and so I will not\n"
            "mount it read-write in a guest domain.",
        )
        self.assertEqual(cm.exception.hotplugStatus, "busy")
        self.assertEqual(await self.node(f"{BLOCK_BACKEND}/hotplug-status"), "busy")
        self.assertEqual(loopDevicesFor(self.image), [])

    async def shareWithSecondGuest(self, mode: str) -> tuple[str, str]:
        """
        Guest 5's backend connected read-write on the image (one loop
        device), and a backend for guest 6 (another VM) on the same image
        in C{mode}, not yet added; return the loop device and that backend.
        """
        await self.writeBackend()
        await self.writeNodes("/local/domain/5", {"vm": "/vm/five"})
        await self.writeNodes("/local/domain/6", {"vm": "/vm/six"})
        await self.runner.run("block", *blockEnvironment("add", BLOCK_BACKEND_REL))
        (loop,) = loopDevicesFor(self.image)
        other = "/local/domain/0/backend/vbd/6/51712"
        await self.writeNodes(
            other, {"frontend-id": "6", "state": "2", "mode": mode, "params": self.image}
        )
        return loop, other

    async def test_sharedWrite(self) -> None:
        """
        A file guest 5 uses read-write, asked read-write for guest 6: the
        real script (Xen 4.17) lets it through with a second loop device.
        Its sharing check compares the file's device number as C{losetup
        -a} prints it (decimal, util-linux 2.38) with C{stat -c %D}'s (hex)
        and so never finds the first loop device. (The built-in script
        refuses: L{tests.test_hotplugblock}.)
        """
        _, other = await self.shareWithSecondGuest("w")
        await self.runner.run("block", *blockEnvironment("add", "backend/vbd/6/51712"))
        self.assertEqual(await self.node(f"{other}/hotplug-status"), "connected")
        self.assertEqual(len(loopDevicesFor(self.image)), 2)

    async def test_missingNode(self) -> None:
        """
        A backend without mode: fatal.  The specific message ("xenstore-read
        .../mode failed.") is written from inside a command substitution;
        the ERR trap of the outer script then overwrites hotplug-error with
        its generic "<script> failed; error detected.".
        """
        await self.writeBackend()
        await self.store.rm(f"{BLOCK_BACKEND}/mode")
        with self.assertRaises(HotplugScriptError) as cm:
            await self.runner.run("block", *blockEnvironment("add", BLOCK_BACKEND_REL))
        self.assertEqual(
            cm.exception.hotplugError, f"{DEFAULT_SCRIPT_DIR}/block failed; error detected."
        )
        self.assertEqual(await self.node(f"{BLOCK_BACKEND}/hotplug-status"), "error")

    async def test_missingFile(self) -> None:
        """
        params naming a missing file: the add fails (exit 1) but the real
        script (Xen 4.17) writes no hotplug-error and even writes
        hotplug-status=connected first; it treats a target that is neither a
        block device nor a file as "someone else's", reports success, then
        exits 1 because no block-<type> helper exists.  Callers must trust
        the exit status, not hotplug-status alone.
        """
        missing = os.path.join(os.path.dirname(self.image), "missing.img")
        await self.writeBackend(params=missing)
        with self.assertRaises(HotplugScriptError) as cm:
            await self.runner.run("block", *blockEnvironment("add", BLOCK_BACKEND_REL))
        self.assertEqual(cm.exception.exitCode, 1)
        self.assertIsNone(cm.exception.hotplugError)
        self.assertEqual(cm.exception.hotplugStatus, "connected")
        self.assertEqual(loopDevicesFor(missing), [])


class VifBridgeSuite(RealScriptSuite):
    """The real C{vif-bridge} script on a bridge and tap in a network namespace."""

    scripts = ("vif-bridge",)

    async def setUp(self) -> None:  # type: ignore[override]
        """A namespace with br-xd and vif5.0, a store, a client and a runner."""
        requireNetns(self)
        self.netns = NetNamespace()
        self.netns.create()
        self.addCleanup(self.netns.delete)
        self.netns.addBridge("br-xd")
        self.netns.addTap("vif5.0")
        self.wrapper = self.netns.wrapper
        await self.setUpStore()

    async def writeBackend(self, **overrides: str) -> None:
        """Write a vif backend as libxl would, after the kernel's InitWait."""
        nodes = {
            "frontend": "/local/domain/5/device/vif/0",
            "frontend-id": "5",
            "online": "1",
            "state": "2",
            "script": "/etc/xen/scripts/vif-bridge",
            "mac": "00:16:3e:5a:00:01",
            "bridge": "br-xd",
            "handle": "0",
            "type": "vif",
            "hotplug-status": "",
        }
        nodes.update(overrides)
        await self.writeNodes(VIF_BACKEND, nodes)

    async def test_onlineOffline(self) -> None:
        """
        online enslaves vif5.0 to the bridge, brings it up, copies the
        bridge MTU to the frontend and reports connected; offline takes it
        down and off the bridge.
        """
        await self.writeBackend()
        result = await self.runner.run("vif-bridge", *vifEnvironment("online", VIF_BACKEND_REL))
        self.assertEqual(result.exitCode, 0)
        link = self.netns.link("vif5.0")
        assert link is not None
        self.assertEqual(link.get("master"), "br-xd")
        self.assertIn("UP", link["flags"])
        self.assertEqual(link["address"], "fe:ff:ff:ff:ff:ff")
        self.assertEqual(await self.node(f"{VIF_BACKEND}/hotplug-status"), "connected")
        self.assertEqual(await self.node("/local/domain/5/device/vif/0/mtu"), "1500")

        await self.runner.run("vif-bridge", *vifEnvironment("offline", VIF_BACKEND_REL))
        link = self.netns.link("vif5.0")
        assert link is not None
        self.assertNotIn("master", link)
        self.assertNotIn("UP", link["flags"])

    async def test_missingBridge(self) -> None:
        """A bridge that does not exist: fatal, reason in hotplug-error."""
        await self.writeBackend(bridge="br-none")
        with self.assertRaises(HotplugScriptError) as cm:
            await self.runner.run("vif-bridge", *vifEnvironment("online", VIF_BACKEND))
        self.assertEqual(cm.exception.hotplugError, "Could not find bridge device br-none")
        self.assertEqual(await self.node(f"{VIF_BACKEND}/hotplug-status"), "error")
        link = self.netns.link("vif5.0")
        assert link is not None
        self.assertNotIn("master", link)

    async def test_bridgeFromEnvironment(self) -> None:
        """Without a bridge node, the bridge variable in the environment is used."""
        await self.writeBackend()
        await self.store.rm(f"{VIF_BACKEND}/bridge")
        args, env = vifEnvironment("online", VIF_BACKEND_REL, bridge="br-xd")
        await self.runner.run("vif-bridge", args, env)
        link = self.netns.link("vif5.0")
        assert link is not None
        self.assertEqual(link.get("master"), "br-xd")


class RealXenstoredHotplugFixture(RealXenstoredFixture):
    """The C xenstored; the scripts also need the xenstore-* tools."""

    def startServer(self) -> str:
        """Require the daemon and its CLI tools, then start it."""
        requireRealXenstored(self, cli=True)  # type: ignore[arg-type]
        return super().startServer()


class BlockScriptRealTests(BlockScriptSuite, RealXenstoredHotplugFixture, TestCase):
    """The real block script against the C xenstored."""


class BlockScriptEmbeddedTests(BlockScriptSuite, EmbeddedXenstoredFixture, TestCase):
    """The real block script against the embedded xenstored."""


class VifBridgeRealTests(VifBridgeSuite, RealXenstoredHotplugFixture, TestCase):
    """The real vif-bridge script against the C xenstored."""


class VifBridgeEmbeddedTests(VifBridgeSuite, EmbeddedXenstoredFixture, TestCase):
    """The real vif-bridge script against the embedded xenstored."""
