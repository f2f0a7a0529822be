# -*- test-case-name: tests.test_hotplug -*-
"""
Running hotplug scripts (the real ones from C{/etc/xen/scripts}) as child
processes, the way libxl does, on Twisted.

L{HotplugRunner} implements L{IHotplugRunner}: an argument list (never a
shell), stdin C{/dev/null}, a minimal explicit environment, the child in a
session and process group of its own, a timeout (40 s, as libxl) after which
the whole group is killed, bounded capture of stdout and stderr, and typed
failures (L{HotplugScriptError}, L{HotplugTimeout}).

L{blockEnvironment} and L{vifEnvironment} build the argument lists and
environments libxl hands to C{block} and C{vif-*} scripts.

Facts about the scripts this module relies on (Debian C{xen-utils-common},
Xen 4.17):

  - C{xen-hotplug-common.sh} redirects the script's stderr to
    C{/var/log/xen/xen-hotplug.log} almost at once, so the stderr captured
    here is usually empty; the useful error text is the backend's
    C{hotplug-error} node, which the scripts' C{fatal}/C{ebusy} helpers
    write together with C{hotplug-status=error|busy}.  This is why a failure
    carries that node's value.
  - The scripts reach XenStore through C{xenstore-read}/C{-write}/C{-list}
    (libxenstore), which honours C{XENSTORED_PATH}.
  - They serialise on lock files under C{/var/run/xen-hotplug} (created on
    demand with C{mkdir -p}).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import stat
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
from twisted.internet.defer import Deferred, fail
from twisted.internet.defer import TimeoutError as DeferredTimeout
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from xenddev.errors import XenddevError
from xenddev.interfaces import IBuiltinScript, IHotplugRunner, IXenStore
from xenddev.xenstore.paths import validatePath

__all__ = [
    "BASE_PATH",
    "DEFAULT_MAX_OUTPUT",
    "DEFAULT_SCRIPT_DIR",
    "DEFAULT_TIMEOUT",
    "HotplugArgumentError",
    "HotplugError",
    "HotplugResult",
    "HotplugRunner",
    "HotplugScriptError",
    "HotplugTimeout",
    "InvalidScriptError",
    "blockEnvironment",
    "vifEnvironment",
]

log = Logger()

#: Where Debian (and upstream Xen) install the hotplug scripts.
DEFAULT_SCRIPT_DIR = "/etc/xen/scripts"

#: libxl gives a hotplug script 40 s, then kills it with SIGKILL.
DEFAULT_TIMEOUT = 40.0

#: The runner's own PATH; the scripts prepend Xen's directories themselves.
BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

#: Bytes of stdout and of stderr kept per run (the last ones: a script's
#: final words are the informative ones).
DEFAULT_MAX_OUTPUT = 64 * 1024

#: After the child has exited, how long to wait for descendants that still
#: hold its stdout/stderr pipes (a daemon it started) before closing them.
PIPE_DRAIN_GRACE = 2.0

#: After SIGKILL, how long to wait for the child to be reaped before the
#: timeout is reported anyway (a process stuck in uninterruptible sleep, e.g.
#: in losetup on a hung device, cannot die until the kernel lets it).
KILL_GRACE = 5.0


# -- errors and results -----------------------------------------------------


class HotplugError(XenddevError):
    """
    Base class of the failures L{HotplugRunner.run} reports after spawning.
    """


class HotplugArgumentError(XenddevError, ValueError):
    """
    Bad input to this module (a script name, an action, a backend path, an
    environment entry), refused before anything was run.
    """


class InvalidScriptError(HotplugArgumentError):
    """
    A script name that does not name an executable file inside the script
    directory; refused before anything was run.

    @ivar script: the name as given.
    @ivar reason: why it was refused.
    """

    def __init__(self, script: object, reason: str) -> None:
        self.script = script
        self.reason = reason
        super().__init__(f"hotplug script {script!r} refused: {reason}")


@attrs.frozen
class HotplugResult:
    """
    A hotplug script run that exited with status 0.

    @ivar script: absolute path of the script that ran.
    @ivar args: its arguments (without the script itself).
    @ivar exitCode: always 0.
    @ivar stdout: what it wrote on stdout (the last L{DEFAULT_MAX_OUTPUT}
        bytes by default, decoded as UTF-8 with replacement characters).
    @ivar stderr: likewise for stderr.
    @ivar duration: seconds from spawn to exit.
    """

    script: str
    args: tuple[str, ...]
    exitCode: int
    stdout: str
    stderr: str
    duration: float


class HotplugScriptError(HotplugError):
    """
    A hotplug script exited with a non-zero status or was killed by a signal
    (other than by our timeout).

    @ivar command: the argument vector exactly as spawned.
    @ivar script: absolute path of the script.
    @ivar scriptArgs: the script's arguments (C{args} is the exception's
        own tuple, as for every exception).
    @ivar exitCode: its exit status, or L{None} if a signal killed it.
    @ivar signalNumber: the signal that killed it, or L{None}.
    @ivar stdout: captured stdout (bounded).
    @ivar stderr: captured stderr (bounded).
    @ivar hotplugError: the value of C{<XENBUS_PATH>/hotplug-error} read
        after exit, if the runner has a XenStore client and the environment
        named C{XENBUS_PATH}; else L{None}.  The scripts do not clear it, so
        a caller that retries should remove it (and C{hotplug-status})
        before running a script again.
    @ivar hotplugStatus: C{<XENBUS_PATH>/hotplug-status} read likewise
        (C{error} after a fatal failure, C{busy} after a sharing conflict).
    @ivar duration: seconds from spawn to exit.
    """

    def __init__(
        self,
        command: Sequence[str],
        script: str,
        args: Sequence[str],
        exitCode: int | None,
        signalNumber: int | None,
        stdout: str,
        stderr: str,
        hotplugError: str | None,
        duration: float,
        *,
        hotplugStatus: str | None = None,
    ) -> None:
        self.command = tuple(command)
        self.script = script
        self.scriptArgs = tuple(args)
        self.exitCode = exitCode
        self.signalNumber = signalNumber
        self.stdout = stdout
        self.stderr = stderr
        self.hotplugError = hotplugError
        self.hotplugStatus = hotplugStatus
        self.duration = duration
        how = f"exit code {exitCode}" if exitCode is not None else f"signal {signalNumber}"
        detail = hotplugError or stderr.strip()
        msg = f"hotplug script {script} {' '.join(self.scriptArgs)} failed with {how}"
        if detail:
            msg += f": {detail[-2000:]}"
        super().__init__(msg)


class HotplugTimeout(HotplugError):
    """
    A hotplug script ran longer than its timeout; its whole process group was
    killed with SIGKILL.

    @ivar command: the argument vector exactly as spawned.
    @ivar script: absolute path of the script.
    @ivar scriptArgs: the script's arguments.
    @ivar timeout: the limit in seconds.
    @ivar stdout: stdout captured before the kill (bounded).
    @ivar stderr: stderr captured before the kill (bounded).
    @ivar reaped: whether the killed child was reaped before this was
        reported (false only if it did not die within L{KILL_GRACE}).
    """

    def __init__(
        self,
        command: Sequence[str],
        script: str,
        args: Sequence[str],
        timeout: float,
        stdout: str,
        stderr: str,
        reaped: bool,
    ) -> None:
        self.command = tuple(command)
        self.script = script
        self.scriptArgs = tuple(args)
        self.timeout = timeout
        self.stdout = stdout
        self.stderr = stderr
        self.reaped = reaped
        super().__init__(
            f"hotplug script {script} {' '.join(self.scriptArgs)} timed out after "
            f"{timeout:g}s; process group killed"
        )


# -- the process protocol -------------------------------------------------------


class _BoundedBuffer:
    """Keeps the last C{limit} bytes written to it."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._data = bytearray()
        self.truncated = False

    def write(self, data: bytes) -> None:
        self._data += data
        if len(self._data) > 2 * self._limit:
            self._trim()

    def _trim(self) -> None:
        if len(self._data) > self._limit:
            del self._data[: len(self._data) - self._limit]
            self.truncated = True

    def text(self) -> str:
        self._trim()
        return self._data.decode("utf-8", "replace")


class _ScriptProcess(ProcessProtocol):
    """
    One run: collects output, enforces the timeout, reports once.

    C{done} fires with C{(reason, timedOut, reaped)} where C{reason} is the
    C{processExited} Failure (or L{None} if the child was never reaped).
    """

    def __init__(self, reactor: Any, timeout: float, maxOutput: int) -> None:
        self._reactor = reactor
        self._timeout = timeout
        self.stdout = _BoundedBuffer(maxOutput)
        self.stderr = _BoundedBuffer(maxOutput)
        self.done: Deferred[tuple[Failure | None, bool, bool]] = Deferred()
        self.pid: int | None = None
        self.exitReason: Failure | None = None
        self.timedOut = False
        self.cancelled = False
        self._finished = False
        self._timer: Any = None
        self._drainTimer: Any = None
        self._killTimer: Any = None

    # ProcessProtocol

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.pid = self.transport.pid
        self._timer = self._reactor.callLater(self._timeout, self._timedOut)

    def outReceived(self, data: bytes) -> None:
        self.stdout.write(data)

    def errReceived(self, data: bytes) -> None:
        self.stderr.write(data)

    def processExited(self, reason: Failure) -> None:
        self.exitReason = reason
        self._cancel("_timer")
        self._cancel("_killTimer")
        if not self._finished:
            # Descendants may still hold the pipes; give them a moment,
            # then stop reading so that the run can be reported.
            self._drainTimer = self._reactor.callLater(PIPE_DRAIN_GRACE, self._closePipes)

    def processEnded(self, reason: Failure) -> None:
        if self.exitReason is None:
            self.exitReason = reason
        self._finish(reaped=True)

    # helpers

    def _cancel(self, name: str) -> None:
        call = getattr(self, name)
        setattr(self, name, None)
        if call is not None and call.active():
            call.cancel()

    def _closePipes(self) -> None:
        self._drainTimer = None
        if self.transport is not None:
            self.transport.loseConnection()
        # loseConnection leads to processEnded; finish here regardless.
        self._finish(reaped=True)

    def killGroup(self) -> None:
        """
        SIGKILL the child's process group (and the child itself, in case it
        had not yet become a group leader).
        """
        if self.pid is None or self.exitReason is not None:
            return
        for kill, target in ((os.killpg, self.pid), (os.kill, self.pid)):
            try:
                kill(target, signal.SIGKILL)
            except ProcessLookupError:
                pass
            except OSError as e:  # pragma: no cover - EPERM is not expected
                log.warn("hotplug: cannot kill {target}: {error}", target=target, error=e)

    def _timedOut(self) -> None:
        self._timer = None
        self.timedOut = True
        self.killGroup()
        if self.exitReason is None:
            self._killTimer = self._reactor.callLater(KILL_GRACE, self._finish, False)

    def _finish(self, reaped: bool) -> None:
        if self._finished:
            return
        self._finished = True
        for name in ("_timer", "_drainTimer", "_killTimer"):
            self._cancel(name)
        self.done.callback((self.exitReason, self.timedOut, reaped))


# -- the runner ---------------------------------------------------------------


def _checkText(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise HotplugArgumentError(f"{what} must be a str, not {type(value).__name__}")
    if "\0" in value:
        raise HotplugArgumentError(f"{what} contains a NUL character: {value!r}")
    return value


def _resolveWrapper(wrapper: Sequence[str]) -> tuple[str, ...]:
    """Check a wrapper argv and make its command an absolute path."""
    if isinstance(wrapper, str):
        raise HotplugArgumentError("wrapper must be a sequence of arguments, not a str")
    argv = [_checkText(w, "wrapper element") for w in wrapper]
    if argv and "/" not in argv[0]:
        found = shutil.which(argv[0], path=BASE_PATH)
        if found is None:
            raise HotplugArgumentError(f"wrapper command {argv[0]!r} not found in {BASE_PATH}")
        argv[0] = found
    return tuple(argv)


def _defaultReactor() -> Any:
    from twisted.internet import reactor

    return reactor


@implementer(IHotplugRunner)
class HotplugRunner:
    """
    Runs hotplug scripts from a script directory as child processes.

    Each run is spawned as C{[setsid, --wait, *wrapper, <script>, *args]}:
    an argument vector, never a shell; stdin is C{/dev/null}; stdout and
    stderr are captured (bounded); the environment is L{BASE_PATH} as
    C{PATH}, C{XENSTORED_PATH} if given, then the caller's C{env}.
    """

    def __init__(
        self,
        scriptDir: str = DEFAULT_SCRIPT_DIR,
        *,
        reactor: Any = None,
        xenstore: IXenStore | None = None,
        xenstoredPath: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        wrapper: Sequence[str] = (),
        allowAbsolute: bool = False,
        maxOutput: int = DEFAULT_MAX_OUTPUT,
        setsid: str | None = None,
        builtins: Mapping[str, IBuiltinScript] | None = None,
    ) -> None:
        """
        @param scriptDir: directory script names are resolved in.
        @param reactor: provides C{IReactorProcess} and C{IReactorTime};
            default the global reactor.
        @param xenstore: if given, a failed run reads
            C{<XENBUS_PATH>/hotplug-error} through it.
        @param xenstoredPath: socket of the xenstored the scripts must use,
            passed to them as C{XENSTORED_PATH}; L{None} lets libxenstore
            pick its default.
        @param timeout: default seconds a script may run (libxl: 40).
        @param wrapper: argv prefix placed before the script, e.g.
            C{["ip", "netns", "exec", "NAME"]} to run inside a network
            namespace; still no shell.  A bare command name as first
            element is resolved in L{BASE_PATH} here, once.
        @param allowAbsolute: accept absolute script paths (outside
            C{scriptDir}); names with C{/} are refused otherwise.
        @param maxOutput: bytes of stdout and of stderr kept per run.
        @param setsid: path of util-linux's C{setsid(1)}; default: looked
            up in L{BASE_PATH}.
        @param builtins: scripts done in process instead (name → an
            L{IBuiltinScript}), e.g. C{block} (L{xenddev.driverdomain.hotplugblock}):
            the same arguments, environment, timeout and errors.
        @raise HotplugArgumentError: bad parameters, or no C{setsid} binary.
        """
        if timeout <= 0:
            raise HotplugArgumentError(f"timeout must be positive, not {timeout!r}")
        if maxOutput <= 0:
            raise HotplugArgumentError(f"maxOutput must be positive, not {maxOutput!r}")
        self.scriptDir = os.path.abspath(scriptDir)
        self.timeout = float(timeout)
        self.wrapper = _resolveWrapper(wrapper)
        self.allowAbsolute = allowAbsolute
        self.maxOutput = maxOutput
        self.xenstore = xenstore
        self.builtins = dict(builtins or {})
        self.xenstoredPath = (
            _checkText(xenstoredPath, "xenstoredPath") if xenstoredPath is not None else None
        )
        self._reactor = reactor if reactor is not None else _defaultReactor()
        # Why setsid(1): a timeout must kill the script *and* everything it
        # started (xenstore-* tools, losetup, ip, sleeping children), which
        # needs the script in a process group of its own.  Twisted's
        # spawnProcess (posix_spawnp, or fork+exec) has no hook to call
        # setsid()/setpgid() in the child.  setsid(1) calls setsid(2) and
        # execs the rest of its argv; it only forks when it is already a
        # process-group leader, which a freshly spawned child never is (its
        # pid cannot equal an existing group id), so the pid Twisted reports
        # is the new session and group id and killpg(pid) reaches all of it.
        # --wait makes even the forking case safe: setsid then waits and
        # relays the exit status instead of returning 0 at once.
        found = setsid if setsid is not None else shutil.which("setsid", path=BASE_PATH)
        if not found or not os.access(found, os.X_OK):
            raise HotplugArgumentError(
                "setsid(1) not found (Debian package util-linux); it is needed to "
                "run hotplug scripts in their own process group"
            )
        self.setsid = found

    def __repr__(self) -> str:
        return f"<HotplugRunner scriptDir={self.scriptDir!r} wrapper={list(self.wrapper)!r}>"

    # -- validation ------------------------------------------------------

    def resolveScript(self, script: str) -> str:
        """
        Resolve a script name to the absolute path that would run.

        A plain name (no C{/}, not C{.} or C{..}) is looked up in the script
        directory; an absolute path is accepted only with C{allowAbsolute}.
        The result must be an existing regular file with execute permission.
        Symbolic links inside the script directory are followed: the
        directory belongs to the administrator, like libxl's.

        @raise InvalidScriptError: otherwise.
        """
        if not isinstance(script, str):
            raise InvalidScriptError(script, f"not a str but {type(script).__name__}")
        if not script or "\0" in script:
            raise InvalidScriptError(script, "empty or contains NUL")
        if os.path.isabs(script):
            if not self.allowAbsolute:
                raise InvalidScriptError(script, "absolute paths are not allowed")
            path = os.path.normpath(script)
        elif "/" in script:
            raise InvalidScriptError(script, "contains '/'; give a name in the script directory")
        elif script in (".", ".."):
            raise InvalidScriptError(script, "not a script name")
        else:
            path = os.path.join(self.scriptDir, script)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise InvalidScriptError(script, f"{path} does not exist") from None
        except OSError as e:
            raise InvalidScriptError(script, f"{path}: {e.strerror}") from None
        if not stat.S_ISREG(st.st_mode):
            raise InvalidScriptError(script, f"{path} is not a regular file")
        if not os.access(path, os.X_OK):
            raise InvalidScriptError(script, f"{path} is not executable")
        return path

    def environment(self, env: Mapping[str, str] | None = None) -> dict[str, str]:
        """
        The complete environment a run gets: C{PATH}=L{BASE_PATH},
        C{XENSTORED_PATH} (if configured), then C{env} (which wins).

        @raise HotplugArgumentError: a name or value that is not text, has
            NUL, or a name with C{=} or empty.
        """
        result = {"PATH": BASE_PATH}
        if self.xenstoredPath is not None:
            result["XENSTORED_PATH"] = self.xenstoredPath
        for name, value in (env or {}).items():
            _checkText(name, "environment name")
            if not name or "=" in name:
                raise HotplugArgumentError(f"bad environment variable name {name!r}")
            result[name] = _checkText(value, f"environment value of {name}")
        return result

    # -- running -----------------------------------------------------------

    def run(
        self,
        script: str,
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        *,
        timeout: float | None = None,
    ) -> Deferred[HotplugResult]:
        """
        Run C{script} with C{args} and extra environment C{env}.

        @param script: a name in the script directory (or an absolute path
            if C{allowAbsolute}).
        @param args: the argument list, passed verbatim.
        @param env: added to the base environment (see L{environment}).
        @param timeout: override the runner's timeout for this run.
        @return: a Deferred firing with a L{HotplugResult} on exit status
            0, or failing with L{HotplugScriptError}, L{HotplugTimeout},
            L{InvalidScriptError}/L{HotplugArgumentError} (nothing was
            run), or C{OSError} (the spawn failed).  Cancelling it kills the
            process group.
        """
        builtin = self.builtins.get(script)
        try:
            path = f"builtin:{script}" if builtin is not None else self.resolveScript(script)
            argList, fullEnv, limit = self._checkRun(args, env, timeout)
        except HotplugArgumentError:
            return fail()
        if builtin is not None:
            return self._runBuiltin(builtin, path, argList, fullEnv, limit)
        command = (self.setsid, "--wait", *self.wrapper, path, *argList)
        proto = _ScriptProcess(self._reactor, limit, self.maxOutput)
        run = _Run(command, path, argList, fullEnv, limit, self._reactor.seconds(), proto)
        devnull = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        try:
            self._reactor.spawnProcess(
                proto,
                self.setsid,
                list(command),
                env=fullEnv,
                path=None,
                usePTY=False,
                childFDs={0: devnull, 1: "r", 2: "r"},
            )
        except OSError:
            return fail()
        finally:
            os.close(devnull)

        def cancel(_: Deferred[HotplugResult]) -> None:
            proto.cancelled = True
            proto.killGroup()

        result: Deferred[HotplugResult] = Deferred(cancel)

        def completed(outcome: tuple[Failure | None, bool, bool]) -> Deferred[HotplugResult]:
            return Deferred.fromCoroutine(self._complete(run, *outcome))

        def deliver(value: HotplugResult | Failure) -> None:
            if result.called:  # cancelled; the process group was killed
                return
            if isinstance(value, Failure):
                result.errback(value)
            else:
                result.callback(value)

        proto.done.addCallback(completed).addBoth(deliver)
        return result

    def _checkRun(
        self, args: Sequence[str], env: Mapping[str, str] | None, timeout: float | None
    ) -> tuple[tuple[str, ...], dict[str, str], float]:
        """A run's checked arguments, full environment and time limit."""
        if isinstance(args, str | bytes):
            raise HotplugArgumentError(f"args must be a sequence of str, not {args!r}")
        argList = tuple(_checkText(a, "argument") for a in args)
        limit = self.timeout if timeout is None else float(timeout)
        if limit <= 0:
            raise HotplugArgumentError(f"timeout must be positive, not {timeout!r}")
        return argList, self.environment(env), limit

    def _runBuiltin(
        self,
        builtin: IBuiltinScript,
        name: str,
        argList: tuple[str, ...],
        fullEnv: dict[str, str],
        limit: float,
    ) -> Deferred[HotplugResult]:
        """A built-in script's run, with a script's timeout, errors and log line."""
        command = (name, *argList)
        start = self._reactor.seconds()
        xenbusPath = fullEnv.get("XENBUS_PATH", "?")
        action = argList[0] if argList else ""

        def logged(outcome: str, ok: bool) -> None:
            emit = log.info if ok else log.warn
            emit(
                "hotplug {script} {action} {xenbusPath}: {outcome} in {duration:.3f}s",
                script=name,
                action=action,
                xenbusPath=xenbusPath,
                outcome=outcome,
                duration=self._reactor.seconds() - start,
            )

        def done(_: object) -> HotplugResult:
            logged("done", True)
            return HotplugResult(name, argList, 0, "", "", self._reactor.seconds() - start)

        def failed(failure: Failure) -> Failure:
            duration = self._reactor.seconds() - start
            if failure.check(DeferredTimeout):
                logged(f"timed out after {limit:g}s", False)
                return Failure(HotplugTimeout(command, name, argList, limit, "", "", True))
            message = getattr(failure.value, "message", None) or str(failure.value)
            status = getattr(failure.value, "status", "error")
            logged(f"failed: {message}", False)
            return Failure(
                HotplugScriptError(
                    command,
                    name,
                    argList,
                    1,
                    None,
                    "",
                    "",
                    message,
                    duration,
                    hotplugStatus=status,
                )
            )

        d = builtin.run(argList, fullEnv)
        d.addTimeout(limit, self._reactor)
        return d.addCallbacks(done, failed)

    async def _complete(
        self, run: _Run, reason: Failure | None, timedOut: bool, reaped: bool
    ) -> HotplugResult:
        """
        Turn the end of a process into a result or a typed failure, and log
        one line about it.
        """
        duration = self._reactor.seconds() - run.start
        stdout = run.proto.stdout.text()
        stderr = run.proto.stderr.text()
        if timedOut:
            self._log(run, duration, None, f"timed out after {run.timeout:g}s, group killed")
            raise HotplugTimeout(
                run.command, run.path, run.args, run.timeout, stdout, stderr, reaped
            )
        exitCode: int | None = None
        signalNumber: int | None = None
        if reason is not None and isinstance(reason.value, ProcessTerminated):
            exitCode = reason.value.exitCode
            signalNumber = reason.value.signal
        elif reason is not None and isinstance(reason.value, ProcessDone):
            exitCode = 0
        if exitCode == 0:
            self._log(run, duration, 0, "exit 0")
            return HotplugResult(run.path, run.args, 0, stdout, stderr, duration)
        hotplugError, hotplugStatus = await self._readHotplugNodes(run.env)
        how = f"exit {exitCode}" if exitCode is not None else f"killed by signal {signalNumber}"
        if run.proto.cancelled:
            how += " (cancelled)"
        if hotplugError:
            how += f": {hotplugError}"
        self._log(run, duration, exitCode, how)
        raise HotplugScriptError(
            run.command,
            run.path,
            run.args,
            exitCode,
            signalNumber,
            stdout,
            stderr,
            hotplugError,
            duration,
            hotplugStatus=hotplugStatus,
        )

    def _log(self, run: _Run, duration: float, exitCode: int | None, outcome: str) -> None:
        """The one log line per run."""
        emit = log.info if exitCode == 0 else log.warn
        emit(
            "hotplug {script} {action} {xenbusPath}: {outcome} in {duration:.3f}s",
            script=os.path.basename(run.path),
            action=run.args[0] if run.args else "",
            xenbusPath=run.env.get("XENBUS_PATH", "-"),
            exitCode=exitCode,
            outcome=outcome,
            duration=duration,
        )

    async def _readHotplugNodes(self, env: Mapping[str, str]) -> tuple[str | None, str | None]:
        """
        The backend's C{hotplug-error} and C{hotplug-status} nodes, if they
        can be known.  A read failure is logged and gives L{None}s: the
        script's failure matters more than its diagnosis.
        """
        base = env.get("XENBUS_PATH")
        if self.xenstore is None or not base:
            return None, None
        values: list[str | None] = []
        for node in ("hotplug-error", "hotplug-status"):
            try:
                path = validatePath(f"{base.rstrip('/')}/{node}")
                values.append(await self.xenstore.readOrNone(path))
            except Exception as e:
                log.warn(
                    "hotplug: cannot read {base}/{node}: {error}", base=base, node=node, error=e
                )
                return None, None
        return values[0], values[1]


@attrs.frozen
class _Run:
    """What L{HotplugRunner._complete} needs to know about one run."""

    command: tuple[str, ...]
    path: str
    args: tuple[str, ...]
    env: dict[str, str]
    timeout: float
    start: float
    proto: _ScriptProcess


# -- libxl's argument lists and environments -----------------------------------

_DEVID = re.compile(r"[0-9]{1,10}\Z")
_IFNAME = re.compile(r"[A-Za-z0-9_.:@+-]{1,15}\Z")  # IFNAMSIZ is 16 with the NUL


def _parseBackendPath(backendPath: str, kind: str) -> tuple[str, str, int, int]:
    """
    Split C{[<prefix>/]backend/<kind>/<domid>/<devid>} into C{(path, base,
    domid, devid)}; C{base} is everything up to and including C{backend}.
    """
    _checkText(backendPath, "backendPath")
    try:
        path = validatePath(backendPath)
    except ValueError as e:
        raise HotplugArgumentError(f"bad backend path {backendPath!r}: {e}") from None
    parts = path.split("/")
    if (
        len(parts) < 4
        or parts[-4] != "backend"
        or not _DEVID.match(parts[-2])
        or not _DEVID.match(parts[-1])
    ):
        raise HotplugArgumentError(
            f"backend path {backendPath!r} is not [<prefix>/]backend/<kind>/<domid>/<devid>"
        )
    if parts[-3] != kind:
        raise HotplugArgumentError(
            f"backend path {backendPath!r} is of kind {parts[-3]!r}, expected {kind!r}"
        )
    base = "/".join(parts[:-3])
    return path, base, int(parts[-2]), int(parts[-1])


def _scriptEnvValue(script: str, scriptDir: str) -> str:
    _checkText(script, "script")
    if not script:
        raise HotplugArgumentError("empty script name")
    return script if "/" in script else os.path.join(scriptDir, script)


def _commonEnvironment(
    kind: str, path: str, base: str, script: str, scriptDir: str
) -> dict[str, str]:
    return {
        # libxl passes the script's own path as "script" (the value of the
        # backend's script node).  The Linux scripts do not read it, except
        # vif-setup, which execs "$script".
        "script": _scriptEnvValue(script, scriptDir),
        # The backend kind: "vbd" or "vif".  block-common.sh combines it
        # with XENBUS_BASE_PATH to scan other backends of the same kind for
        # sharing conflicts.
        "XENBUS_TYPE": kind,
        # The backend directory; every script reads and writes its nodes
        # ("$XENBUS_PATH/params", ".../hotplug-status", ...) and dies
        # ("${XENBUS_PATH:?}") without it.  libxl passes the relative form
        # backend/<kind>/<domid>/<devid>, which xenstored resolves against
        # the home of the domain the script runs in (/local/domain/<self>),
        # so the same value works in dom0 and in a driver domain; an
        # absolute path works as well, the scripts only append /<node>.
        "XENBUS_PATH": path,
        # Where the backends of this domain live: libxl passes "backend".
        "XENBUS_BASE_PATH": base,
    }


def blockEnvironment(
    action: str,
    backendPath: str,
    script: str = "block",
    *,
    scriptDir: str = DEFAULT_SCRIPT_DIR,
) -> tuple[list[str], dict[str, str]]:
    """
    The arguments and environment libxl gives a vbd hotplug script.

    libxl runs C{<script> add} after the backend reached InitWait and
    C{<script> remove} after it reached Closed.  C{block} reads C{params},
    C{mode}, C{type}, C{frontend-id} and C{state} (a file add is refused
    unless it is 2) from the backend directory and writes
    C{physical-device}, C{physical-device-path}, C{node} (the loop device)
    and C{hotplug-status}.

    @param action: C{"add"} or C{"remove"}.
    @param backendPath: C{backend/vbd/<domid>/<devid>} (libxl's relative
        form) or an absolute C{/local/domain/<dd>/backend/vbd/<domid>/<devid>}.
    @param script: the script name, for the C{script} variable.
    @param scriptDir: directory a plain C{script} name lives in.
    @return: C{(args, env)} for L{HotplugRunner.run}.
    @raise HotplugArgumentError: bad action or path.
    """
    if action not in ("add", "remove"):
        raise HotplugArgumentError(f"block hotplug action must be add or remove, not {action!r}")
    path, base, _, _ = _parseBackendPath(backendPath, "vbd")
    # The block scripts take the action as their only argument.
    return [action], _commonEnvironment("vbd", path, base, script, scriptDir)


def vifEnvironment(
    action: str,
    backendPath: str,
    vifName: str | None = None,
    *,
    bridge: str | None = None,
    netdev: str = "",
    typeIf: str = "vif",
    script: str = "vif-bridge",
    scriptDir: str = DEFAULT_SCRIPT_DIR,
) -> tuple[list[str], dict[str, str]]:
    """
    The arguments and environment libxl gives a vif hotplug script.

    For a PV interface (C{typeIf="vif"}) libxl runs C{<script> online
    type_if=vif} after the backend reached InitWait and C{<script> offline
    type_if=vif} on removal; the device actions C{add}/C{remove} are
    accepted here and mapped to those.  For an emulated interface's tap
    (C{typeIf="tap"}) it runs C{<script> add|remove type_if=tap}.
    C{vif-bridge} reads C{bridge}, C{vifname}, C{mtu} and C{ip} from the
    backend directory, writes C{hotplug-status=connected} after C{online}
    and writes the bridge's MTU to the frontend's C{mtu} node.

    @param action: C{online}/C{offline} (or C{add}/C{remove}).
    @param backendPath: C{backend/vif/<domid>/<devid>} or an absolute path.
    @param vifName: the backend network interface; default
        C{vif<domid>.<devid>} (C{...-emu} for a tap), as the kernel's
        netback names it.
    @param bridge: a fallback bridge for C{vif-bridge}, used only if the
        backend has no C{bridge} node (libxl does not pass one).
    @param netdev: the gateway device for C{vif-nat}/C{vif-route}; libxl
        passes the backend's C{gatewaydev} or an empty string.
    @param typeIf: C{"vif"} or C{"tap"}.
    @param script: the script name, for the C{script} variable.
    @param scriptDir: directory a plain C{script} name lives in.
    @return: C{(args, env)} for L{HotplugRunner.run}.
    @raise HotplugArgumentError: bad action, path, name or type.
    """
    path, base, domid, devid = _parseBackendPath(backendPath, "vif")
    if typeIf == "vif":
        mapped = {"add": "online", "remove": "offline"}.get(action, action)
        if mapped not in ("online", "offline"):
            raise HotplugArgumentError(
                f"vif hotplug action must be online/offline (or add/remove), not {action!r}"
            )
        defaultName = f"vif{domid}.{devid}"
    elif typeIf == "tap":
        mapped = action
        if mapped not in ("add", "remove"):
            raise HotplugArgumentError(f"tap hotplug action must be add or remove, not {action!r}")
        defaultName = f"vif{domid}.{devid}-emu"
    else:
        raise HotplugArgumentError(f"typeIf must be 'vif' or 'tap', not {typeIf!r}")
    name = defaultName if vifName is None else _checkText(vifName, "vifName")
    if not _IFNAME.match(name):
        raise HotplugArgumentError(f"bad network interface name {name!r}")
    env = _commonEnvironment("vif", path, base, script, scriptDir)
    # The gateway device vif-nat/vif-route use (dom0_ip); libxl passes the
    # backend's gatewaydev node or "".
    env["netdev"] = _checkText(netdev, "netdev")
    if typeIf == "vif":
        # vif-common.sh takes the interface to configure from $vif when
        # type_if=vif (and renames it if the backend has a vifname node).
        env["vif"] = name
    else:
        # With type_if=tap it takes it from $INTERFACE; libxl passes both
        # variables for an emulated NIC (vif is the PV name).
        env["INTERFACE"] = name
        env["vif"] = f"vif{domid}.{devid}"
    if bridge is not None:
        # vif-bridge starts from ${bridge:-} and lets the backend's bridge
        # node override it.
        env["bridge"] = _checkText(bridge, "bridge")
    # vif-common.sh evaluates name=value arguments as shell variables;
    # type_if selects the vif or tap personality.
    return [mapped, f"type_if={typeIf}"], env
