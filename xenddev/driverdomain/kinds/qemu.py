# -*- test-case-name: tests.test_qemu_kind -*-
"""
The C{qemu} driver-domain kind: qcow/qcow2 (and, if asked, raw) images
served by a C{qemu-storage-daemon} per VDI, exported over NBD on a UNIX
socket and controlled over QMP (seed 003: qcow/qcow2 go to qemu).

Target keys (C{t/*}):

  - C{type}: C{file} or C{qdisk} (C{qdisk} asks for this kind explicitly,
    and is the only way to have a C{raw} image served by qemu);
  - C{params}: the image path (absolute, required);
  - C{format}: C{qcow}, C{qcow2}, or C{raw} with C{type=qdisk};
  - C{mode}: C{r} or C{w} (default C{w}; C{w!} is taken as C{w});
  - C{devtype}: C{disk} or C{cdrom}.

Life cycle:

  - prepare checks the image with C{qemu-img info} (it must exist and be in
    the declared format), then starts C{qemu-storage-daemon} in a private
    runtime directory C{<runtimeDir>/<dd>-<vdi>/} (mode 700) with the image's
    blockdev graph (format node over file node; the chain opens from the
    headers), two QMP monitors on UNIX sockets (C{qmp}, the kind's own;
    C{ctl}, the storage control path's — a QEMU chardev server talks to one
    client at a time) and a pid file. Sockets are chmod 600. The pid and
    sockets are recorded in the kind's records (C{ctx.records}).
  - activate starts the daemon's NBD server on C{<rundir>/nbd} and adds a
    writable (per mode) NBD export named after the VDI; it registers the
    data path (L{xenddev.backendctrl.records}).
  - deactivate deletes the export and the NBD server, and the registration.
  - unprepare asks the daemon to C{quit}, waits for it to exit (reaping it
    when it is our child; SIGKILL after the timeout) and removes the
    runtime directory.
  - plug creates C{backend/vbd/<domu>/<devid>} with qdisk-like keys,
    C{params} being the NBD URI C{nbd+unix:///<vdi>?socket=<rundir>/nbd}.

Served by the kernel (C{nbd} given: what a Linux driver domain needs, whose
only block backend is blkback — nothing there serves a C{qdisk} backend):

  - prepare also starts the NBD server and the export, and connects a
    kernel C{/dev/nbdN} to it (L{xenddev.driverdomain.nbd}), recorded as
    C{nbd-device}: blkback needs the block device when the backend is
    plugged, which comes before activate;
  - activate and deactivate only register and unregister the data path (the
    kernel's connection holds the export);
  - plug creates a blkback backend (C{type=phy}, C{params=/dev/nbdN}) run
    by the C{block} hotplug script, like the C{blkback} kind's;
  - unprepare disconnects the device before the daemon quits.

After an agent crash (C{recovering}, or simply a new kind instance), the
daemon is found from the records (or the pid file in its runtime
directory): if the pid is alive and its command line names our QMP socket
it is reused through a new QMP connection; otherwise a new one is started.

A daemon that dies (its process exits, or its QMP connection reaches EOF)
is detected at once and reported: the kind logs an error and writes
C{hotplug-error} (naming the daemon, pid and exit status) and
C{hotplug-status=error} on every backend it serves, where the toolstack's
C{waitForHotplugStatus} sees it. Afterwards activate and plug fail with
EIO naming the death; deactivate, unplug and unprepare succeed (there is
nothing left to stop), so the toolstack can still tear the VDI down.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from collections.abc import Mapping
from typing import Any

from twisted.internet import error as ierror
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from xenddev.backendctrl.records import DataPath, recordPath, registryDir, thisHost
from xenddev.datapath import qemu as graph
from xenddev.datapath.images import ImageError, imageChain
from xenddev.diskspec import numberToVdev
from xenddev.driverdomain.kinds.base import KindContext, KindError, Outcome, PlugSpec, done
from xenddev.driverdomain.kinds.blkback import blockBackend
from xenddev.driverdomain.nbd import NbdError
from xenddev.interfaces import IDriverDomainKind, INbdAttacher
from xenddev.qmp import QMPClient, QMPError, connectQMP
from xenddev.xenstore.paths import Perm

QCOW_FORMATS = ("qcow", "qcow2")
DEFAULT_RUNTIME_DIR = "/run/xenddev/qemu"


def nbdURI(export: str, socketPath: str) -> str:
    """The NBD URI of an export on a UNIX socket (what C{qemu-io} takes)."""
    return f"nbd+unix:///{export}?socket={socketPath}"


class _DaemonProcess(ProcessProtocol):
    """A daemon we spawned: keeps its stderr tail, fires C{ended} with the status."""

    def __init__(self) -> None:
        self.ended: Deferred[str] = Deferred()
        self.stderr = b""
        self.exited = False

    def errReceived(self, data: bytes) -> None:
        self.stderr = (self.stderr + data)[-4096:]

    def outReceived(self, data: bytes) -> None:
        self.stderr = (self.stderr + data)[-4096:]

    def processEnded(self, reason: Failure) -> None:
        self.exited = True
        value = reason.value
        if isinstance(value, ierror.ProcessDone):
            status = "exit status 0"
        elif isinstance(value, ierror.ProcessTerminated):
            status = (
                f"killed by signal {value.signal}"
                if value.signal is not None
                else f"exit status {value.exitCode}"
            )
        else:
            status = str(value)
        self.ended.callback(status)


class _Daemon:
    """What the kind knows about one VDI's daemon."""

    def __init__(self, vdi: str, rundir: str, pid: int, process: _DaemonProcess | None) -> None:
        self.vdi = vdi
        self.rundir = rundir
        self.pid = pid
        self.process = process
        self.qmp: QMPClient | None = None
        self.dead: str | None = None  # why, once dead
        self.stopping = False
        self.backends: dict[str, Any] = {}  # backend path -> xs to report on

    @property
    def qmpPath(self) -> str:
        return os.path.join(self.rundir, "qmp")

    @property
    def ctlPath(self) -> str:
        return os.path.join(self.rundir, "ctl")

    @property
    def nbdPath(self) -> str:
        return os.path.join(self.rundir, "nbd")


def _pidAlive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in (b"Z", b"X")


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode("utf-8", "replace") for a in f.read().split(b"\0")]
    except OSError:
        return []


@implementer(IDriverDomainKind)
class QemuKind:
    """
    Serves qcow/qcow2 (and explicitly asked raw) images with
    C{qemu-storage-daemon}.

    @param reactor: the reactor (spawns, connects, timers).
    @param runtimeDir: where the per-VDI runtime directories go; keep it
        short (UNIX socket paths are limited to 107 bytes).
    @param host: the host name recorded in the data-path registry.
    @param timeout: seconds allowed for the daemon to start, answer, quit.
    @param nbd: serve through the kernel's NBD client and blkback (see the
        module docstring); C{None}: write C{qdisk} backends (the simulator,
        or a userspace qdisk backend, serves them).
    """

    name = "qemu"
    objectClasses = ("vdi",)
    log = Logger()

    def __init__(
        self,
        reactor: Any = None,
        runtimeDir: str = DEFAULT_RUNTIME_DIR,
        daemon: str = "qemu-storage-daemon",
        qemuImg: str = "qemu-img",
        host: str | None = None,
        timeout: float = 30.0,
        nbd: INbdAttacher | None = None,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as installed

            reactor = installed
        self.reactor = reactor
        self.runtimeDir = runtimeDir
        self.daemonPath = daemon
        self.qemuImg = qemuImg
        self.host = host or thisHost()
        self.timeout = timeout
        self.nbd = nbd
        self._daemons: dict[tuple[int, str], _Daemon] = {}

    # Target

    def accepts(self, objectClass: str, target: Mapping[str, str]) -> bool:
        """qcow/qcow2 file or qdisk targets; raw only with C{type=qdisk}."""
        if objectClass != "vdi":
            return False
        kind, fmt = target.get("type"), target.get("format", "raw")
        if fmt in QCOW_FORMATS:
            return kind in ("file", "qdisk")
        return kind == "qdisk" and fmt == "raw"

    def _check(self, target: Mapping[str, str]) -> tuple[str, str, bool]:
        params = target.get("params", "")
        if not params.startswith("/"):
            raise KindError("EINVAL", f"params must be an absolute path, got {params!r}")
        mode = target.get("mode", "w")
        if mode not in ("r", "w", "w!"):
            raise KindError("EINVAL", "mode must be one of r, w, w!")
        if target.get("devtype", "disk") not in ("disk", "cdrom"):
            raise KindError("EINVAL", "devtype must be disk or cdrom")
        fmt = target.get("format", "raw")
        if fmt not in (*QCOW_FORMATS, "raw"):
            raise KindError("ENODEV", f"qemu does not serve format {fmt!r} here")
        return params, fmt, mode == "r"

    def _rundir(self, ctx: KindContext) -> str:
        return os.path.join(self.runtimeDir, f"{ctx.driverDomid}-{ctx.paths.name}")

    def daemonFor(self, driverDomid: int, vdi: str) -> _Daemon | None:
        """The daemon serving a VDI, if this kind instance knows one (tests)."""
        return self._daemons.get((driverDomid, vdi))

    # Operations

    async def _prepare(self, ctx: KindContext) -> Outcome:
        image, fmt, readOnly = self._check(ctx.target)
        if not os.path.exists(image):
            raise KindError("ENOENT", f"{image} does not exist in the driver domain")
        key = (ctx.driverDomid, ctx.paths.name)
        daemon = self._daemons.get(key)
        if daemon is None or daemon.dead is not None:
            daemon = await self._recover(ctx)
        if daemon is None:
            try:
                chain = await imageChain(self.reactor, image, qemuImg=self.qemuImg)
            except ImageError as e:
                raise KindError("EINVAL", f"qemu-img cannot read {image}: {e}") from None
            if chain[0].format != fmt:
                raise KindError(
                    "EINVAL", f"{image} is a {chain[0].format} image, not {fmt} as the target says"
                )
            daemon = await self._start(ctx, image, fmt, readOnly)
        self._daemons[key] = daemon
        writes = {
            f"{ctx.records}/pid": str(daemon.pid),
            f"{ctx.records}/qmp": daemon.qmpPath,
            f"{ctx.records}/ctl": daemon.ctlPath,
            f"{ctx.records}/rundir": daemon.rundir,
            f"{ctx.records}/image": image,
            f"{ctx.records}/format": fmt,
        }
        if self.nbd is not None:
            writes[f"{ctx.records}/nbd-device"] = await self._kernelDevice(
                ctx, daemon, image, fmt, readOnly
            )
        return Outcome(writes=writes)

    async def _kernelDevice(
        self, ctx: KindContext, daemon: _Daemon, image: str, fmt: str, readOnly: bool
    ) -> str:
        """The kernel device connected to the export (exported and connected if need be)."""
        assert self.nbd is not None
        device = await ctx.xs.readOrNone(f"{ctx.records}/nbd-device")
        await self._export(ctx, daemon, image, fmt, readOnly)
        if device is not None and self.nbd.attached(device):
            return device  # a restarted agent finds it connected
        try:
            return await self.nbd.attach(daemon.nbdPath, ctx.paths.name, readOnly)
        except NbdError as e:
            raise KindError("EIO", str(e)) from None

    def prepare(self, ctx: KindContext) -> Deferred[Outcome]:
        """Check the image, start (or find again) its daemon."""
        return Deferred.fromCoroutine(self._prepare(ctx))

    async def _start(self, ctx: KindContext, image: str, fmt: str, readOnly: bool) -> _Daemon:
        rundir = self._rundir(ctx)
        os.makedirs(self.runtimeDir, mode=0o700, exist_ok=True)
        shutil.rmtree(rundir, ignore_errors=True)
        os.mkdir(rundir, 0o700)
        os.chmod(rundir, 0o700)
        process = _DaemonProcess()
        daemon = _Daemon(ctx.paths.name, rundir, 0, process)
        args = [
            self.daemonPath,
            "--blockdev",
            json.dumps(graph.blockdevSpec(image, fmt, readOnly)),
            "--chardev",
            f"socket,id=xdd-qmp,path={daemon.qmpPath},server=on,wait=off",
            "--monitor",
            "chardev=xdd-qmp",
            "--chardev",
            f"socket,id=xdd-ctl,path={daemon.ctlPath},server=on,wait=off",
            "--monitor",
            "chardev=xdd-ctl",
            "--pidfile",
            os.path.join(rundir, "pid"),
        ]
        transport = self.reactor.spawnProcess(
            process,
            self.daemonPath,
            args,
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C"},
            childFDs={0: "w", 1: "r", 2: "r"},
        )
        transport.closeStdin()
        daemon.pid = transport.pid
        self.log.info(
            "Started qemu-storage-daemon pid {pid} for {vdi} ({image})",
            pid=daemon.pid,
            vdi=ctx.paths.name,
            image=image,
        )
        try:
            await self._connect(daemon, waitForSocket=True)
        except BaseException as e:
            await self._kill(daemon)
            shutil.rmtree(rundir, ignore_errors=True)
            detail = process.stderr.decode("utf-8", "replace").strip()
            raise KindError(
                "EIO", f"qemu-storage-daemon for {image} did not start: {detail or e}"
            ) from None
        for sock in (daemon.qmpPath, daemon.ctlPath):
            os.chmod(sock, 0o600)
        process.ended.addCallback(lambda status: self._died(daemon, status))
        return daemon

    async def _connect(self, daemon: _Daemon, waitForSocket: bool = False) -> None:
        waited = 0.0
        while True:
            if daemon.process is not None and daemon.process.exited:
                raise KindError("EIO", "qemu-storage-daemon exited at start")
            try:
                daemon.qmp = await connectQMP(self.reactor, daemon.qmpPath, self.timeout)
                break
            except (ierror.ConnectError, OSError):
                if not waitForSocket or waited >= self.timeout:
                    raise
                await deferLater(self.reactor, 0.02, lambda: None)
                waited += 0.02
        qmp = daemon.qmp

        def closed(_: object) -> None:
            if daemon.qmp is qmp and not daemon.stopping:
                self._died(daemon, "its QMP connection reached EOF")

        qmp.whenClosed().addCallback(closed)

    async def _recover(self, ctx: KindContext) -> _Daemon | None:
        """A daemon left by a previous agent (records or pid file), if alive and ours."""
        rundir = self._rundir(ctx)
        pidText = await ctx.xs.readOrNone(f"{ctx.records}/pid")
        if pidText is None:
            try:
                with open(os.path.join(rundir, "pid")) as f:
                    pidText = f.read().strip()
            except OSError:
                return None
        if not pidText.isdigit():
            return None
        pid = int(pidText)
        daemon = _Daemon(ctx.paths.name, rundir, pid, None)
        if not _pidAlive(pid) or not any(daemon.qmpPath in a for a in _cmdline(pid)):
            return None
        try:
            await self._connect(daemon)
        except Exception as e:
            self.log.warn("Cannot reconnect to daemon pid {pid}: {e}", pid=pid, e=e)
            return None
        # Its backends, from the plugs recorded in the control area.
        try:
            plugs = await ctx.xs.ls(ctx.paths.plugsDir)
        except Exception:
            plugs = []
        for p in plugs:
            backend = await ctx.xs.readOrNone(ctx.paths.plug(p).backend)
            if backend is not None:
                daemon.backends[ctx.paths.absolute(backend)] = ctx.xs
        self.log.info(
            "Reconnected to qemu-storage-daemon pid {pid} for {vdi}", pid=pid, vdi=daemon.vdi
        )
        return daemon

    async def _daemon(self, ctx: KindContext) -> _Daemon:
        key = (ctx.driverDomid, ctx.paths.name)
        daemon = self._daemons.get(key)
        if daemon is None:
            daemon = await self._recover(ctx)
            if daemon is None:
                raise KindError(
                    "EIO", f"the qemu-storage-daemon of {ctx.paths.name} is gone (not running)"
                )
            self._daemons[key] = daemon
        if daemon.dead is not None:
            raise KindError("EIO", f"the qemu-storage-daemon of {ctx.paths.name} {daemon.dead}")
        assert daemon.qmp is not None
        return daemon

    def _died(self, daemon: _Daemon, why: str) -> None:
        if daemon.stopping or daemon.dead is not None:
            return
        daemon.dead = f"died (pid {daemon.pid}): {why}"
        self.log.error(
            "qemu-storage-daemon pid {pid} serving {vdi} died: {why}",
            pid=daemon.pid,
            vdi=daemon.vdi,
            why=why,
        )
        message = f"qemu-storage-daemon (pid {daemon.pid}) serving {daemon.vdi} died: {why}"
        for backend, xs in list(daemon.backends.items()):

            async def report(tx: Any, backend: str = backend) -> None:
                if not await tx.exists(backend):
                    return
                await tx.write(f"{backend}/hotplug-error", message[:1024])
                await tx.write(f"{backend}/hotplug-status", "error")

            xs.transact(report).addErrback(
                lambda f, b=backend: self.log.failure("Cannot report on {b}", f, b=b)
            )

    async def _export(
        self, ctx: KindContext, daemon: _Daemon, image: str, fmt: str, readOnly: bool
    ) -> tuple[str, str]:
        """
        Start the NBD server and the VDI's export unless they run; the image
        and format served (the chain may have been committed meanwhile).
        """
        qmp = daemon.qmp
        assert qmp is not None
        try:
            await graph.ensureNbdServer(qmp, daemon.nbdPath)
            node = await graph.exportedNode(qmp)
            if node is None:
                if not await graph.hasNode(qmp, graph.ROOT_NODE):
                    await graph.openGraph(qmp, image, fmt, readOnly)
                node = graph.ROOT_NODE
                await graph.addExport(qmp, node, ctx.paths.name, not readOnly)
            served = await graph.nodeImage(qmp, node)
        except QMPError as e:
            raise KindError("EIO", f"qemu-storage-daemon refused to export: {e}") from None
        os.chmod(daemon.nbdPath, 0o600)
        return served if served is not None else (image, fmt)

    async def _activate(self, ctx: KindContext) -> Outcome:
        daemon = await self._daemon(ctx)
        image = await ctx.xs.read(f"{ctx.records}/image")
        fmt = await ctx.xs.read(f"{ctx.records}/format")
        readOnly = ctx.target.get("mode", "w") == "r"
        image, fmt = await self._export(ctx, daemon, image, fmt, readOnly)
        try:
            chain = await imageChain(self.reactor, image, fmt, self.qemuImg)
        except ImageError as e:
            raise KindError("EIO", f"qemu-img cannot read {image}: {e}") from None
        kernel = {}
        if self.nbd is not None:
            kernel["nbd-device"] = await ctx.xs.read(f"{ctx.records}/nbd-device")
        dp = DataPath(
            ctx.driverDomid,
            ctx.paths.name,
            self.name,
            self.host,
            image,
            fmt,
            tuple(i.filename for i in chain),
            pid=daemon.pid,
            qmp=daemon.ctlPath,
            extra={
                "export": ctx.paths.name,
                "export-id": graph.EXPORT_ID,
                "nbd": daemon.nbdPath,
                "uri": nbdURI(ctx.paths.name, daemon.nbdPath),
                "writable": "0" if readOnly else "1",
                **kernel,
            },
        )
        # The registry's directory is a fixed skeleton (like the agent's own
        # records): created outside the completion transaction, never removed.
        await ctx.xs.mkdir(registryDir(ctx.driverDomid))
        return Outcome(writes=dp.nodes())

    def activate(self, ctx: KindContext) -> Deferred[Outcome]:
        """Export the image over NBD and register the data path."""
        return Deferred.fromCoroutine(self._activate(ctx))

    async def _deactivate(self, ctx: KindContext) -> Outcome:
        record = recordPath(ctx.driverDomid, ctx.paths.name)
        try:
            daemon = await self._daemon(ctx)
        except KindError as e:
            self.log.warn("Deactivating {vdi}: {e}; nothing to stop", vdi=ctx.paths.name, e=e)
            return Outcome(removes=(record,))
        qmp = daemon.qmp
        assert qmp is not None
        writes: dict[str, str] = {}
        if self.nbd is not None:
            # The kernel's device holds the export until unprepare.
            return Outcome(removes=(record,))
        try:
            node = await graph.exportedNode(qmp)
            if node is not None and node != graph.ROOT_NODE:
                # The chain was committed into the parent meanwhile: the
                # parent is what this VDI now is; reopen that next time.
                served = await graph.nodeImage(qmp, node)
                if served is not None:
                    writes[f"{ctx.records}/image"] = served[0]
                    writes[f"{ctx.records}/format"] = served[1]
            await graph.deleteExport(qmp, self.timeout)
            await qmp.execute("nbd-server-stop")
        except QMPError as e:
            if e.errorClass != "GenericError" or "not running" not in e.desc:
                raise KindError("EIO", f"qemu-storage-daemon refused to unexport: {e}") from None
        return Outcome(writes=writes, removes=(record,))

    def deactivate(self, ctx: KindContext) -> Deferred[Outcome]:
        """Remove the export and the registration."""
        return Deferred.fromCoroutine(self._deactivate(ctx))

    async def _unprepare(self, ctx: KindContext) -> Outcome:
        key = (ctx.driverDomid, ctx.paths.name)
        daemon = self._daemons.pop(key, None)
        if daemon is None:
            daemon = await self._recover(ctx)
        device = None
        if self.nbd is not None:
            device = await ctx.xs.readOrNone(f"{ctx.records}/nbd-device")
        if self.nbd is not None and device is not None:
            try:
                await self.nbd.detach(device)
            except NbdError as e:
                if daemon is not None:
                    self._daemons[key] = daemon
                raise KindError("EBUSY", str(e)) from None
        if daemon is not None and daemon.dead is None:
            await self._quit(daemon)
        shutil.rmtree(self._rundir(ctx), ignore_errors=True)
        # Unprepared while active, the deactivate's outcome is not applied:
        # the registration goes here.
        return Outcome(removes=(recordPath(ctx.driverDomid, ctx.paths.name),))

    def unprepare(self, ctx: KindContext) -> Deferred[Outcome]:
        """Quit the daemon, reap it, remove its runtime directory."""
        return Deferred.fromCoroutine(self._unprepare(ctx))

    async def _quit(self, daemon: _Daemon) -> None:
        daemon.stopping = True
        if daemon.qmp is not None and daemon.qmp.connected:
            try:
                await daemon.qmp.execute("quit", timeout=self.timeout)
            except Exception as e:
                self.log.warn("quit failed for pid {pid}: {e}", pid=daemon.pid, e=e)
        if not await self._waitExit(daemon, self.timeout):
            await self._kill(daemon)

    async def _waitExit(self, daemon: _Daemon, timeout: float) -> bool:
        waited = 0.0
        while True:
            if daemon.process is not None:
                if daemon.process.exited:
                    return True
            elif not _pidAlive(daemon.pid):
                return True
            if waited >= timeout:
                return False
            await deferLater(self.reactor, 0.02, lambda: None)
            waited += 0.02

    async def _kill(self, daemon: _Daemon) -> None:
        daemon.stopping = True
        if daemon.pid:
            try:
                os.kill(daemon.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        await self._waitExit(daemon, self.timeout)
        if daemon.qmp is not None:
            await daemon.qmp.close()

    def plug(self, ctx: KindContext, plug: PlugSpec) -> Deferred[Outcome]:
        """Create C{backend/vbd/<domu>/<devid>} naming the NBD export."""

        async def run() -> Outcome:
            if plug.device.deviceClass != "vbd":
                raise KindError(
                    "EINVAL", f"qemu serves vbd frontends, not {plug.device.deviceClass}"
                )
            daemon = await self._daemon(ctx)
            dd, domu = ctx.driverDomid, plug.device.frontendDomid
            rel = plug.device.backendRelative("vbd")
            backend = ctx.paths.absolute(rel)
            mode = ctx.target.get("mode", "w")
            if self.nbd is not None:
                device = await ctx.xs.read(f"{ctx.records}/nbd-device")
                daemon.backends[backend] = ctx.xs
                medium = {"type": "phy", "params": device, "script": "block"}
                return blockBackend(ctx, plug, rel, {**medium, "mode": "r" if mode == "r" else "w"})
            values = {
                "frontend-id": str(domu),
                "online": "1",
                "state": "1",
                "removable": "1" if ctx.target.get("devtype") == "cdrom" else "0",
                "bootable": "1",
                "type": "qdisk",
                "params": nbdURI(ctx.paths.name, daemon.nbdPath),
                "mode": "r" if mode == "r" else "w",
                "device-type": ctx.target.get("devtype", "disk"),
                "dev": numberToVdev(plug.device.devid),
            }
            daemon.backends[backend] = ctx.xs
            return Outcome(
                backend=rel,
                mkdirs={backend: [Perm("n", dd), Perm("r", domu)]},
                writes={f"{backend}/{k}": v for k, v in values.items()},
            )

        return Deferred.fromCoroutine(run())

    def unplug(self, ctx: KindContext, plug: PlugSpec) -> Deferred[Outcome]:
        """Forget the backend (the agent removes its directory)."""
        daemon = self._daemons.get((ctx.driverDomid, ctx.paths.name))
        if daemon is not None and plug.backend is not None:
            daemon.backends.pop(plug.backend, None)
        return done()

    def hotplugCommand(
        self, ctx: KindContext, plug: PlugSpec, action: str
    ) -> tuple[str, list[str], dict[str, str]] | None:
        """
        Served by the kernel: the C{block} script (C{phy} on the nbd
        device); otherwise none (the daemon is the data path already).
        """
        if self.nbd is None:
            return None
        from xenddev.driverdomain.hotplug import blockEnvironment

        assert plug.backend is not None
        args, env = blockEnvironment(action, plug.backend, "block")
        return "block", args, env

    def disconnectAll(self) -> Deferred[None]:
        """
        Drop every QMP connection without stopping any daemon: what a crash
        of the agent does (tests simulate a restart with it).
        """

        async def run() -> None:
            daemons, self._daemons = list(self._daemons.values()), {}
            for daemon in daemons:
                daemon.stopping = True
                if daemon.qmp is not None:
                    await daemon.qmp.close()

        return Deferred.fromCoroutine(run())
