"""
The QEMU machine running Xen and dom0, and the host's end of the command
channel (L{RealXenHost}).

Use L{tests.support.realxen.realXenHost} in tests: it boots one machine per
test process. This module boots and drives one; it holds no global state.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from tests.support.realxen import channel
from tests.support.realxen.image import BootImages

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorTime

    from tests.support.realxen.guest import Guest

__all__ = [
    "ACCEL_ENV",
    "DOM0_SHARE",
    "NICE_ENV",
    "BackgroundProcess",
    "CommandFailed",
    "CommandResult",
    "RealXenError",
    "RealXenHost",
    "qemuCommand",
]

#: C{tcg} (default) or C{kvm} (needs real nested SVM/VMX, see real-xen.md).
ACCEL_ENV = "XENDDEV_REALXEN_ACCEL"

#: A nice value for QEMU (e.g. C{-5}: ahead of other work on a busy
#: machine; lowering it needs root). Default: not changed.
NICE_ENV = "XENDDEV_REALXEN_NICE"

#: Where dom0 mounts the share.
DOM0_SHARE = "/mnt/share"

#: The bridge dom0 makes, its address, and the guests' network.
BRIDGE = "xenbr0"
DOM0_IP = "169.254.99.1"
GUEST_NET = "169.254.99."

#: Seconds between two looks at a result file.
POLL_SECONDS = 0.05

#: How long past a command's own timeout the host waits for its result.
RESULT_GRACE_SECONDS = 60.0

#: Xen's command line. bootscrub=0: otherwise Xen scrubs ~2 GB in the
#: background and C{xl create} takes ~80 s instead of ~15 s.
XEN_ARGS = (
    "console=com1 com1=115200,8n1 dom0_mem=2048M,max:2048M dom0_max_vcpus=2"
    " loglvl=all guest_loglvl=all bootscrub=0"
)


class RealXenError(RuntimeError):
    """
    The machine failed: it did not boot, it died, or dom0 did not answer.
    """


@attrs.frozen
class CommandResult:
    """
    How a command run in dom0 ended.

    @ivar rc: its exit status; negative: killed by that signal; 127/126:
        it could not be started.
    @ivar stdout: its standard output (UTF-8, undecodable bytes replaced).
    @ivar stderr: its standard error.
    @ivar seconds: how long it ran, measured in dom0.
    @ivar timedout: it was killed (SIGKILL to its process group) because
        it outlived its timeout.
    @ivar argv: the command.
    """

    rc: int
    stdout: str
    stderr: str
    seconds: float
    timedout: bool = False
    argv: tuple[str, ...] = ()

    def describe(self) -> str:
        """
        The command, how it ended and its output, for failure messages.
        """
        how = "timed out" if self.timedout else f"exited with {self.rc}"
        return (
            f"{list(self.argv)} {how} after {self.seconds:.1f}s\n"
            f"--- stdout:\n{self.stdout}--- stderr:\n{self.stderr}"
        )


class CommandFailed(Exception):
    """
    L{RealXenHost.check}: the command did not exit with status 0.

    @ivar result: its L{CommandResult}.
    """

    def __init__(self, result: CommandResult) -> None:
        super().__init__(result.describe())
        self.result = result


def _escapeComma(value: str) -> str:
    """
    C{value} inside a QEMU option, where a comma is written twice.
    """
    return value.replace(",", ",,")


def _requirePlain(what: str, value: str) -> str:
    """
    Refuse a path that cannot go on a kernel command line.
    """
    if re.search(r"[\s\"']", value):
        raise RealXenError(f"{what} {value!r} contains blanks or quotes")
    return value


def qemuCommand(images: BootImages, runDir: Path, python: str, accel: str = "tcg") -> list[str]:
    """
    QEMU's command line for Xen and dom0.

    @param images: the boot images.
    @param runDir: the run folder; C{runDir/share} is dom0's
        C{/mnt/share}, C{runDir/serial.log} gets the serial console.
    @param python: the interpreter (a path on this machine) dom0 runs the
        channel with.
    @param accel: C{tcg} or C{kvm}.
    """
    dom0Args = " ".join(
        [
            "console=hvc0 earlyprintk=xen rdinit=/init",
            f"xenddev.root={_requirePlain('the cache', str(images.root))}",
            f"xenddev.python={_requirePlain('the interpreter', python)}",
        ]
    )
    if accel == "kvm":
        accelArgs = ["-accel", "kvm", "-cpu", "host,-arch-capabilities"]
    elif accel == "tcg":
        # -cpu max makes dom0 fault at its first instruction.
        accelArgs = ["-accel", "tcg,thread=multi", "-cpu", "qemu64"]
    else:
        raise RealXenError(f"{ACCEL_ENV}={accel!r}: tcg or kvm")
    modules = (
        f"{_escapeComma(str(images.kernel))} {_escapeComma(dom0Args)},"
        f"{_escapeComma(str(images.dom0Initrd))}"
    )
    share = _escapeComma(str(runDir / "share"))
    return [
        "qemu-system-x86_64",
        "-machine",
        "pc",
        *accelArgs,
        "-smp",
        "2",
        "-m",
        "4096",
        "-display",
        "none",
        "-monitor",
        "none",
        "-no-reboot",
        "-net",
        "none",
        "-serial",
        f"file:{_escapeComma(str(runDir / 'serial.log'))}",
        "-kernel",
        str(images.xen),
        "-append",
        XEN_ARGS,
        "-initrd",
        modules,
        "-fsdev",
        "local,id=hostroot,path=/,security_model=none,readonly=on,multidevs=remap",
        "-device",
        "virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot",
        "-fsdev",
        f"local,id=share,path={share},security_model=none",
        "-device",
        "virtio-9p-pci,fsdev=share,mount_tag=share",
    ]


def _newRunDir(runDir: Path | None = None) -> Path:
    """
    C{runDir}, or a fresh run folder under C{/tmp}, with the share's
    directories made.
    """
    if runDir is None:
        base = tempfile.gettempdir()
        if re.search(r"[\s,]", base):
            base = "/tmp"
        runDir = Path(tempfile.mkdtemp(prefix="xenddev-realxen-", dir=base))
    _requirePlain("the run folder", str(runDir))
    for sub in ("share", f"share/{channel.REQUESTS}", f"share/{channel.RESULTS}", "share/console"):
        (runDir / sub).mkdir(parents=True, exist_ok=True)
    return runDir


def _reactor(reactor: IReactorTime | None) -> IReactorTime:
    """
    C{reactor}, or the global reactor (imported only now).
    """
    if reactor is None:
        from twisted.internet import reactor as defaultReactor  # noqa: N812

        return defaultReactor
    return reactor


async def sleep(reactor: IReactorTime, seconds: float) -> None:
    """
    Wait C{seconds} on C{reactor}.
    """
    from twisted.internet.task import deferLater

    await deferLater(reactor, seconds, lambda: None)


class BackgroundProcess:
    """
    A process started in dom0 with L{RealXenHost.spawn}.

    @ivar pid: its pid in dom0.
    @ivar argv: its command.
    """

    def __init__(self, host: RealXenHost, rid: str, pid: int, argv: Sequence[str]) -> None:
        self._host = host
        self._rid = rid
        self.pid = pid
        self.argv = tuple(argv)

    def stdout(self) -> str:
        """
        Its standard output so far (read from the share).
        """
        return self._host._readResult(self._rid, ".out")

    def stderr(self) -> str:
        """
        Its standard error so far.
        """
        return self._host._readResult(self._rid, ".err")

    def ended(self) -> bool:
        """
        Whether it has ended.
        """
        return self._host._resultPath(self._rid, ".rc").exists()

    async def signal(self, signum: int = signal.SIGTERM, group: bool = False) -> None:
        """
        Send it signal C{signum} (to its process group with C{group}: it runs
        in a session of its own). Raises L{CommandFailed} if that fails (it
        has ended and been reaped).
        """
        await self._host.kill(self.pid, signum, group=group)

    async def wait(self, timeout: float = 120) -> CommandResult:
        """
        Wait until it ends (at most C{timeout} seconds: L{RealXenError}).
        """
        return await self._host._waitResult(self._rid, self.argv, timeout)


class RealXenHost:
    """
    Xen and dom0 in QEMU, and the command channel to dom0.

    Commands run in dom0 as root, without a shell (pass C{["sh", "-c", ...]}
    for one), in dom0's view of this machine's file system: this machine's
    C{/} read-only (cached: files that change during the run may be seen
    stale), with a tmpfs over it for writes, and C{/var/lib/realxen} for disk
    images. Files to share both ways go in L{sharePath} (here), which dom0
    sees as L{shareInDom0}.

    @ivar images: the boot images.
    @ivar runDir: the run folder (kept after the run): C{serial.log} (Xen's
        and dom0's console), C{qemu.log}, C{qemu-command.txt} and C{share/}
        (C{dom0-setup.log}, C{channel.log}, the guests' consoles in
        C{console/}, the requests and results in C{req/} and C{res/}).
    @ivar sharePath: the share, on this machine.
    @ivar shareInDom0: the share, in dom0.
    @ivar python: the interpreter running the channel in dom0 (this
        process's own, from the same path).
    @ivar accel: C{tcg} or C{kvm}.
    @ivar bootSeconds: from QEMU's start until the channel answered.
    @ivar readyInfo: what the channel wrote in C{ready}.
    @ivar guests: the guests made with L{createGuest} and not destroyed,
        by name.
    """

    def __init__(
        self,
        images: BootImages,
        *,
        reactor: IReactorTime | None = None,
        runDir: Path | None = None,
        accel: str | None = None,
        python: str | None = None,
    ) -> None:
        self.images = images
        self._reactor = _reactor(reactor)
        self.runDir = _newRunDir(runDir)
        self.sharePath = self.runDir / "share"
        self.shareInDom0 = DOM0_SHARE
        self.accel = accel or os.environ.get(ACCEL_ENV, "tcg")
        self.python = python or sys.executable
        self.bootSeconds = 0.0
        self.readyInfo: dict[str, Any] = {}
        self._process: subprocess.Popen[bytes] | None = None
        self._counter = itertools.count(1)
        self._guestAddresses = itertools.count(2)
        self.guests: dict[str, Guest] = {}

    # Paths.

    @property
    def serialLog(self) -> Path:
        """
        Xen's and dom0's console (the serial port).
        """
        return self.runDir / "serial.log"

    def inDom0(self, path: str | Path) -> str:
        """
        The path in dom0 of C{path}, a path inside L{sharePath}.
        """
        relative = Path(path).resolve().relative_to(self.sharePath.resolve())
        return f"{self.shareInDom0}/{relative}" if str(relative) != "." else self.shareInDom0

    def _resultPath(self, rid: str, suffix: str) -> Path:
        """
        Where the channel writes a result file of request C{rid}.
        """
        return self.sharePath / channel.RESULTS / (rid + suffix)

    def _readResult(self, rid: str, suffix: str) -> str:
        """
        A result file's text so far ("" if it is not there).
        """
        try:
            return self._resultPath(rid, suffix).read_text(errors="replace")
        except FileNotFoundError:
            return ""

    # The machine.

    @property
    def alive(self) -> bool:
        """
        Whether QEMU is running.
        """
        return self._process is not None and self._process.poll() is None

    def serial(self, tail: int | None = None) -> str:
        """
        The serial console so far (its last C{tail} lines).
        """
        try:
            text = self.serialLog.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        if tail is not None:
            text = "\n".join(text.splitlines()[-tail:])
        return text

    def _diagnosis(self) -> str:
        """
        Where to look, and the end of the consoles and logs.
        """
        parts = [f"run folder: {self.runDir}"]
        if self._process is not None and self._process.poll() is not None:
            parts.append(f"QEMU exited with {self._process.returncode}")
        for name, path in (
            ("qemu.log", self.runDir / "qemu.log"),
            ("dom0-setup.log", self.sharePath / "dom0-setup.log"),
            ("channel.log", self.sharePath / "channel.log"),
        ):
            if path.exists():
                lines = path.read_text(errors="replace").splitlines()[-15:]
                if lines:
                    parts.append(f"--- {name} (end):\n" + "\n".join(lines))
        parts.append("--- serial.log (end):\n" + self.serial(tail=25))
        return "\n".join(parts)

    async def boot(self, timeout: float = 300) -> None:
        """
        Start QEMU and wait until the channel in dom0 is ready.

        QEMU is started with C{subprocess} (not the reactor: it outlives
        tests), from the calling thread; C{setpriv --pdeathsig KILL} ends it
        if this process dies without calling L{stop}.

        @raise RealXenError: QEMU exited, dom0's set-up failed, or the
            channel was not ready after C{timeout} seconds.
        """
        argv = qemuCommand(self.images, self.runDir, self.python, self.accel)
        (self.runDir / "qemu-command.txt").write_text(json.dumps(argv, indent=1) + "\n")
        if os.path.exists("/usr/bin/setpriv"):
            argv = ["/usr/bin/setpriv", "--pdeathsig", "KILL", *argv]
        nice = int(os.environ.get(NICE_ENV) or 0)
        if nice:
            # Before exec: every QEMU thread inherits it.
            argv = ["nice", "-n", str(nice), *argv]
        started = time.monotonic()
        with open(self.runDir / "qemu.log", "wb") as qemuLog:
            self._process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=qemuLog, stderr=subprocess.STDOUT
            )
        ready = self.sharePath / channel.READY
        while not ready.exists():
            if not self.alive:
                raise RealXenError(f"QEMU exited during boot\n{self._diagnosis()}")
            if time.monotonic() - started > timeout:
                self.stop(graceful=False)
                raise RealXenError(f"dom0 not ready after {timeout}s\n{self._diagnosis()}")
            await sleep(self._reactor, 0.2)
        self.bootSeconds = time.monotonic() - started
        self.readyInfo = json.loads(ready.read_text())
        failures = self.readyInfo.get("setupFailures")
        if failures:
            raise RealXenError(f"dom0 set-up failed: {failures}\n{self._diagnosis()}")

    def stop(self, graceful: bool = True, timeout: float = 30) -> int | None:
        """
        Stop the machine (blocking; for C{atexit}): with C{graceful}, a
        shutdown request, then up to C{timeout} seconds for QEMU to exit;
        then SIGTERM, then SIGKILL.

        @return: QEMU's exit status, or None if it was not started.
        """
        process = self._process
        if process is None:
            return None
        if process.poll() is None and graceful:
            try:
                self._submit({"shutdown": True})
                process.wait(timeout)
            except (OSError, subprocess.TimeoutExpired):
                pass
        for how in (process.terminate, process.kill):
            if process.poll() is not None:
                break
            how()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                pass
        return process.returncode

    async def shutdown(self, timeout: float = 60) -> int | None:
        """
        Stop the machine with a shutdown request; wait up to C{timeout}
        seconds for QEMU to exit (then kill it).

        @return: QEMU's exit status (0 after a clean shutdown).
        """
        process = self._process
        if process is None:
            return None
        if process.poll() is None:
            self._submit({"shutdown": True})
            started = time.monotonic()
            while process.poll() is None and time.monotonic() - started < timeout:
                await sleep(self._reactor, 0.2)
        return self.stop(graceful=False)

    # The channel.

    def _submit(self, request: Mapping[str, Any]) -> str:
        """
        Drop a request into the share; its id.
        """
        rid = f"{next(self._counter):05d}-{uuid.uuid4().hex[:8]}"
        channel.publish(str(self.sharePath / channel.REQUESTS / f"{rid}.json"), dict(request))
        return rid

    async def _waitFile(self, path: Path, timeout: float, what: str) -> None:
        """
        Wait until C{path} exists.
        """
        started = time.monotonic()
        while not path.exists():
            if not self.alive:
                raise RealXenError(f"QEMU exited while waiting for {what}\n{self._diagnosis()}")
            if time.monotonic() - started > timeout:
                raise RealXenError(f"no answer from dom0 for {what} after {timeout:.0f}s")
            await sleep(self._reactor, POLL_SECONDS)

    async def _waitResult(self, rid: str, argv: Sequence[str], timeout: float) -> CommandResult:
        """
        Wait for request C{rid}'s result.
        """
        rcPath = self._resultPath(rid, ".rc")
        await self._waitFile(rcPath, timeout, f"{list(argv)} (request {rid})")
        status = json.loads(rcPath.read_text())
        return CommandResult(
            rc=int(status["rc"]),
            stdout=self._readResult(rid, ".out"),
            stderr=self._readResult(rid, ".err"),
            seconds=float(status.get("seconds", 0.0)),
            timedout=bool(status.get("timedout")),
            argv=tuple(argv),
        )

    def _commandRequest(
        self,
        argv: Sequence[str],
        env: Mapping[str, str] | None,
        cwd: str | None,
        stdin: str | None,
    ) -> dict[str, Any]:
        """
        The request to run C{argv} (see C{channel.py}).
        """
        if isinstance(argv, str):
            raise TypeError("argv must be a list of strings, not a string")
        request: dict[str, Any] = {"argv": [str(a) for a in argv], "env": dict(env or {})}
        if cwd is not None:
            request["cwd"] = cwd
        if stdin is not None:
            request["stdin"] = stdin
        return request

    async def run(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        stdin: str | None = None,
        timeout: float = 120,
    ) -> CommandResult:
        """
        Run C{argv} in dom0 and wait until it ends.

        @param env: variables added to dom0's environment (C{PATH} is the
            usual sbin and bin directories, C{HOME=/root}).
        @param cwd: its working directory (default C{/}).
        @param stdin: its standard input (default: empty).
        @param timeout: seconds after which its process group is killed
            (the result then says C{timedout}).
        @raise RealXenError: the machine died, or dom0 did not answer.
        """
        request = self._commandRequest(argv, env, cwd, stdin)
        request["timeout"] = timeout
        rid = self._submit(request)
        return await self._waitResult(rid, request["argv"], timeout + RESULT_GRACE_SECONDS)

    async def check(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        stdin: str | None = None,
        timeout: float = 120,
    ) -> CommandResult:
        """
        L{run}, raising L{CommandFailed} (its message has the output)
        unless the command exits with status 0.
        """
        result = await self.run(argv, env=env, cwd=cwd, stdin=stdin, timeout=timeout)
        if result.rc != 0 or result.timedout:
            raise CommandFailed(result)
        return result

    async def spawn(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        stdin: str | None = None,
    ) -> BackgroundProcess:
        """
        Start C{argv} in dom0 in the background, in a session of its own;
        its output goes to files in the share (L{BackgroundProcess.stdout}).
        Nothing stops it when the test ends: signal it at cleanup.

        @raise CommandFailed: it could not be started.
        """
        request = self._commandRequest(argv, env, cwd, stdin)
        request["background"] = True
        rid = self._submit(request)
        pidPath = self._resultPath(rid, ".pid")
        rcPath = self._resultPath(rid, ".rc")
        started = time.monotonic()
        while not pidPath.exists():
            if rcPath.exists():
                raise CommandFailed(await self._waitResult(rid, request["argv"], 0))
            if not self.alive:
                raise RealXenError(f"QEMU exited while starting {argv}\n{self._diagnosis()}")
            if time.monotonic() - started > RESULT_GRACE_SECONDS:
                raise RealXenError(f"no answer from dom0 for {argv} (request {rid})")
            await sleep(self._reactor, POLL_SECONDS)
        pid = int(json.loads(pidPath.read_text())["pid"])
        return BackgroundProcess(self, rid, pid, request["argv"])

    async def kill(self, pid: int, signum: int = signal.SIGTERM, group: bool = False) -> None:
        """
        Send signal C{signum} to process C{pid} in dom0 (or to its process
        group). Raises L{CommandFailed} if that fails.
        """
        request = {"kill": pid, "signal": int(signum), "group": group}
        rid = self._submit(request)
        argv = ("kill", f"-{int(signum)}", f"{'-' if group else ''}{pid}")
        result = await self._waitResult(rid, argv, RESULT_GRACE_SECONDS)
        if result.rc != 0:
            raise CommandFailed(result)

    # Guests.

    def nextGuestAddress(self) -> str:
        """
        A guest address not given out before (169.254.99.2, .3, ...).
        """
        n = next(self._guestAddresses)
        if n > 254:
            raise RealXenError("out of guest addresses")
        return f"{GUEST_NET}{n}"

    async def createGuest(
        self,
        name: str,
        *,
        disks: Sequence[str] = (),
        vifs: Sequence[str] = (),
        memory: int = 256,
        vcpus: int = 1,
        ip: str | None = None,
        extra: str = "",
        config: Mapping[str, str] | None = None,
        ramdisk: str | None = None,
        timeout: float = 180,
    ) -> Guest:
        """
        Create a PV guest with C{xl create} (the lane's kernel and guest
        initramfs, see C{files/domu-init}); returns when C{xl create} has
        (its hotplug scripts have run), not when the guest is up: wait for
        C{GUEST: ready} on its console for that.

        @param disks: C{xl} disk specifications.
        @param vifs: C{xl} vif specifications (C{bridge=xenbr0} for the
            lane's network).
        @param ip: the guest's eth0 address (default L{nextGuestAddress}).
        @param extra: more kernel parameters.
        @param config: more C{xl} config lines, C{key -> value} written as
            is (C{{"on_crash": '"preserve"'}}).
        @param ramdisk: another initramfs (default: the guests', running
            C{files/domu-init}; L{BootImages.ddInitrd} makes a driver domain).
        @raise CommandFailed: C{xl create} failed.
        """
        from tests.support.realxen.guest import Guest

        guest = Guest(
            self,
            name,
            ip=ip or self.nextGuestAddress(),
            disks=disks,
            vifs=vifs,
            memory=memory,
            vcpus=vcpus,
            extra=extra,
            config=config,
            ramdisk=ramdisk,
        )
        await guest.create(timeout)
        self.guests[name] = guest
        return guest
