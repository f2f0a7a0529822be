# -*- test-case-name: tests.test_blktap -*-
"""
The C{tap} driver-domain kind: disks served by a tapdisk (blktap2, through
C{tap-ctl}), with blkback on the tapdisk's block node; and, for the
deprecated blktap1 (xend's C{tap} class), a C{backend/tap} directory for
the blktap1 daemon.

Target keys (C{t/*}):

  - C{type}: C{tap} (sent by the tap/tap2 controllers), or C{file} with
    C{format} C{vhd} (any vbd whose format only tapdisk2 serves, seed 003),
    or - when the kind is configured with C{serveRawFiles} - a raw C{file}
    (seed 003: a raw file goes to tapdisk2 first);
  - C{params}: the image path (required, absolute);
  - C{taptype}: the tapdisk driver (C{aio}, C{vhd}, C{ram}, C{qcow},
    C{remus}; blktap1 also C{sync}, C{vmdk}, C{qcow2}, C{ioemu}); derived
    from C{format} if absent (raw -> C{aio});
  - C{driver}: C{tapdisk2} (default) or C{blktap1};
  - C{mode}, C{devtype}, C{script}: as for blkback.

The protocol maps onto tapdisk (tapdisk2):

  - prepare: C{spawn} + C{allocate} + C{attach}; pid, minor and device
    node recorded in the object's private records as each step succeeds, so
    a restarted agent (C{ctx.recovering}) finds the tapdisk and reuses it if
    its process is alive, or removes what is left and starts again;
  - activate: C{open -a <taptype>:<params>} (C{-R} for read-only), or
    C{unpause} if it is open and paused; registers the data path (seed 002,
    L{xenddev.backendctrl.records}): pid, minor, image and, for vhd, the
    backing chain read from the VHD headers (just the image if it cannot be
    read), with C{x/type} = the tapdisk type;
  - deactivate: C{pause} (the image stays open, so reactivation is quick);
    removes the registration;
  - unprepare: C{destroy} (close + detach + free; the process exits);
    removes the registration too (an unprepare of an active vdi skips the
    separate deactivate's outcome);
  - plug: C{backend/vbd/<domu>/<devid>}, blkback on the tapdisk's node
    (C{type=phy}, C{params=<node>}), with C{tapdisk-params} =
    C{<taptype>:<params>}.

A C{tap-ctl} failure becomes C{KindError("EIO", "<TapCtlError>")}, whose
text names the command, its exit code and its stderr; whatever the failed
operation had created is removed first.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Mapping
from typing import Any

from twisted.internet.defer import Deferred, gatherResults
from twisted.logger import Logger
from zope.interface import implementer

from xenddev.backendctrl.records import DataPath, holdPath, recordPath, thisHost
from xenddev.datapath.images import ImageError, vhdChain
from xenddev.driverdomain.kinds.base import KindContext, KindError, Outcome, PlugSpec, done
from xenddev.driverdomain.kinds.blkback import blockBackend
from xenddev.interfaces import IDriverDomainKind, ITapCtl
from xenddev.tapctl import TapCtl, TapCtlError, TapdiskInfo, minorOfDevice, pidAlive

TAPDISK2_TYPES = ("aio", "vhd", "ram", "qcow", "remus")
BLKTAP1_TYPES = ("aio", "sync", "vmdk", "ram", "qcow", "qcow2", "ioemu")
DRIVERS = ("tapdisk2", "blktap1")
MODES = ("r", "w", "w!")
_FORMAT_TYPES = {"raw": "aio", "vhd": "vhd", "qcow": "qcow", "qcow2": "qcow2", "vmdk": "vmdk"}
#: The image format a tapdisk type reads (recorded in the registry).
_TYPE_FORMATS = {"aio": "raw", "sync": "raw", **{t: t for t in ("vhd", "qcow", "ram", "remus")}}


def tapType(target: Mapping[str, str]) -> str:
    """The tapdisk driver type of a target (C{taptype}, else from C{format})."""
    explicit = target.get("taptype")
    if explicit:
        return explicit
    return _FORMAT_TYPES.get(target.get("format", "raw"), "")


def tapdiskParams(target: Mapping[str, str]) -> str:
    """C{<taptype>:<params>}, as given to C{tap-ctl open} and stored in the backend."""
    return f"{tapType(target)}:{target.get('params', '')}"


@implementer(IDriverDomainKind)
class TapKind:
    """
    Serves targets with tapdisk (see the module docstring).

    @param tapctl: the tapdisk control (L{TapCtl} running C{tap-ctl} by
        default).
    @param serveRawFiles: also accept raw C{file} targets (put this kind
        before C{blkback} in the agent's list to prefer tapdisk2 for them).
    @param isAlive: whether a pid is a live process (injected for tests).
    @param host: the host name registered with each data path.
    """

    name = "tap"
    objectClasses = ("vdi",)
    log = Logger()

    def __init__(
        self,
        tapctl: ITapCtl | None = None,
        serveRawFiles: bool = False,
        isAlive: Callable[[int], bool] = pidAlive,
        host: str | None = None,
    ) -> None:
        self.tapctl: Any = tapctl if tapctl is not None else TapCtl()
        self.serveRawFiles = serveRawFiles
        self.isAlive = isAlive
        self.host = host if host is not None else thisHost()

    # Target checks

    def accepts(self, objectClass: str, target: Mapping[str, str]) -> bool:
        """C{tap} targets, vhd files, and raw files if configured."""
        if objectClass != "vdi":
            return False
        typ, fmt = target.get("type"), target.get("format", "raw")
        if typ == "tap":
            return True
        if typ == "file" and fmt == "vhd":
            return True
        return typ == "file" and fmt == "raw" and self.serveRawFiles

    @staticmethod
    def _driver(target: Mapping[str, str]) -> str:
        return target.get("driver", "tapdisk2")

    def _check(self, target: Mapping[str, str]) -> None:
        driver = self._driver(target)
        if driver not in DRIVERS:
            raise KindError("EINVAL", f"driver must be one of {', '.join(DRIVERS)}")
        typ = tapType(target)
        allowed = TAPDISK2_TYPES if driver == "tapdisk2" else BLKTAP1_TYPES
        if typ not in allowed:
            raise KindError("ENODEV", f"{driver} does not serve {typ or 'this format'!r}")
        if target.get("mode", "w") not in MODES:
            raise KindError("EINVAL", f"mode must be one of {', '.join(MODES)}")
        params = target.get("params", "")
        if not params.startswith("/"):
            raise KindError("EINVAL", f"params must be an absolute path, got {params!r}")
        if typ != "ram" and not os.path.isfile(params):
            raise KindError("ENOENT", f"{params} does not exist in the driver domain")

    # Records

    async def _records(self, ctx: KindContext) -> dict[str, str]:
        xs = ctx.xs
        if not await xs.exists(ctx.records):
            return {}
        keys = list(await xs.ls(ctx.records))
        values = await gatherResults([xs.read(f"{ctx.records}/{k}") for k in keys])
        return dict(zip(keys, values, strict=True))

    def _record(self, ctx: KindContext, **values: object) -> Deferred[Any]:
        return gatherResults(
            [ctx.xs.write(f"{ctx.records}/{k}", str(v)) for k, v in values.items()]
        )

    async def _tapdisk(self, rec: Mapping[str, str]) -> TapdiskInfo | None:
        """The recorded tapdisk as tap-ctl lists it, or None if it is gone."""
        if "pid" not in rec or not self.isAlive(int(rec["pid"])):
            return None
        rows = await self.tapctl.list(pid=int(rec["pid"]))
        minor = int(rec["minor"]) if "minor" in rec else None
        for row in rows:
            if row.pid == int(rec["pid"]) and row.minor == minor:
                return row
        return None

    # Operations

    def prepare(self, ctx: KindContext) -> Deferred[Outcome]:
        """spawn + allocate + attach (tapdisk2); a check only for blktap1."""
        self._check(ctx.target)
        if self._driver(ctx.target) == "blktap1":
            return done()
        return Deferred.fromCoroutine(self._prepare(ctx))

    async def _prepare(self, ctx: KindContext) -> Outcome:
        if ctx.recovering:
            rec = await self._records(ctx)
            try:
                if rec.get("attached") == "1" and await self._tapdisk(rec) is not None:
                    return Outcome()  # the tapdisk started before the crash serves on
            except TapCtlError as e:
                raise KindError("EIO", str(e)) from None
            await self._undo(ctx, rec)
        rec = {}
        try:
            pid = await self.tapctl.spawn()
            rec["pid"] = str(pid)
            await self._record(ctx, pid=pid)
            device = await self.tapctl.allocate()
            minor = minorOfDevice(device)
            rec["minor"] = str(minor)
            await self._record(ctx, minor=minor, device=device)
            await self.tapctl.attach(pid, minor)
            await self._record(ctx, attached=1)
        except TapCtlError as e:
            await self._undo(ctx, rec)
            raise KindError("EIO", str(e)) from None
        return Outcome()

    async def _undo(self, ctx: KindContext, rec: Mapping[str, str]) -> None:
        """Remove a partly prepared tapdisk (best effort) and its records."""
        pid = int(rec["pid"]) if "pid" in rec else None
        minor = int(rec["minor"]) if "minor" in rec else None
        if pid is not None and self.isAlive(pid):
            try:
                if minor is not None and rec.get("attached") == "1":
                    await self.tapctl.detach(pid, minor)
                else:
                    os.kill(pid, signal.SIGTERM)  # spawned, never attached
            except (TapCtlError, OSError):
                pass
        if minor is not None:
            try:
                await self.tapctl.free(minor)
            except TapCtlError:
                pass
        await ctx.xs.rm(ctx.records, missingOk=True)

    async def _withTapdisk(self, ctx: KindContext) -> tuple[int, int, TapdiskInfo]:
        rec = await self._records(ctx)
        info = await self._tapdisk(rec)
        if info is None:
            raise KindError(
                "EIO", f"the tapdisk of {ctx.paths.base} is gone (pid {rec.get('pid')})"
            )
        return int(rec["pid"]), int(rec["minor"]), info

    def activate(self, ctx: KindContext) -> Deferred[Outcome]:
        """
        open the image, or unpause it (idempotent: looks at tap-ctl list);
        register the data path.
        """
        if self._driver(ctx.target) == "blktap1":
            return done()

        async def run() -> Outcome:
            try:
                pid, minor, info = await self._withTapdisk(ctx)
                if info.args is None:
                    readonly = ctx.target.get("mode", "w") == "r"
                    await self.tapctl.open(pid, minor, tapdiskParams(ctx.target), readonly)
                elif info.paused:
                    held = await ctx.xs.readOrNone(holdPath(ctx.driverDomid, ctx.paths.name))
                    if held is None:
                        await self.tapctl.unpause(pid, minor)
                    else:
                        # A quiesce (e.g. a coalesce of its chain) holds it
                        # paused; its resume will unpause it.
                        self.log.info(
                            "{vdi}: active again but left paused, held by a quiesce of {target}",
                            vdi=ctx.paths.name,
                            target=held,
                        )
            except TapCtlError as e:
                raise KindError("EIO", str(e)) from None
            return Outcome(writes=self.dataPath(ctx, pid, minor).nodes())

        return Deferred.fromCoroutine(run())

    def dataPath(self, ctx: KindContext, pid: int, minor: int) -> DataPath:
        """The registry record of an open tapdisk (seed 002)."""
        typ = tapType(ctx.target)
        image = ctx.target.get("params", "")
        chain: tuple[str, ...] = (image,)
        if typ == "vhd":
            try:
                chain = tuple(vhdChain(image))
            except ImageError as e:
                self.log.warn(
                    "Registering {vdi} without its VHD chain: {error}",
                    vdi=ctx.paths.name,
                    error=e,
                )
        return DataPath(
            ctx.driverDomid,
            ctx.paths.name,
            self.name,
            self.host,
            image,
            _TYPE_FORMATS.get(typ, typ),
            chain,
            pid=pid,
            minor=minor,
            extra={"type": typ},
        )

    def deactivate(self, ctx: KindContext) -> Deferred[Outcome]:
        """pause (idempotent); unregister the data path."""
        if self._driver(ctx.target) == "blktap1":
            return done()

        async def run() -> Outcome:
            try:
                pid, minor, info = await self._withTapdisk(ctx)
                if info.args is not None and not info.paused:
                    await self.tapctl.pause(pid, minor)
            except TapCtlError as e:
                raise KindError("EIO", str(e)) from None
            return self._unregister(ctx)

        return Deferred.fromCoroutine(run())

    @staticmethod
    def _unregister(ctx: KindContext) -> Outcome:
        return Outcome(removes=(recordPath(ctx.driverDomid, ctx.paths.name),))

    def unprepare(self, ctx: KindContext) -> Deferred[Outcome]:
        """destroy: close + detach + free; the tapdisk exits."""
        if self._driver(ctx.target) == "blktap1":
            return done()

        async def run() -> Outcome:
            rec = await self._records(ctx)
            try:
                info = await self._tapdisk(rec)
                if info is not None:
                    await self.tapctl.destroy(int(rec["pid"]), int(rec["minor"]))
                elif "minor" in rec:
                    # The process died: release what is left (idempotent).
                    left = await self.tapctl.list(minor=int(rec["minor"]))
                    if any(r.minor == int(rec["minor"]) for r in left):
                        await self.tapctl.free(int(rec["minor"]))
            except TapCtlError as e:
                raise KindError("EIO", str(e)) from None
            return self._unregister(ctx)

        return Deferred.fromCoroutine(run())

    def plug(self, ctx: KindContext, plug: PlugSpec) -> Deferred[Outcome]:
        """The backend directory: vbd on the tapdisk's node, or blktap1's tap."""
        if plug.device.deviceClass != "vbd":
            raise KindError("EINVAL", f"tap serves vbd frontends, not {plug.device.deviceClass}")
        return Deferred.fromCoroutine(self._plug(ctx, plug))

    async def _plug(self, ctx: KindContext, plug: PlugSpec) -> Outcome:
        target = ctx.target
        blktap1 = self._driver(target) == "blktap1"
        rel = plug.device.backendRelative("tap" if blktap1 else "vbd")
        if blktap1:
            return blockBackend(ctx, plug, rel, {"type": "tap", "params": tapdiskParams(target)})
        rec = await self._records(ctx)
        if "device" not in rec:
            raise KindError("EIO", f"no tapdisk recorded for {ctx.paths.base}")
        extra = {
            "type": "phy",
            "params": rec["device"],
            "tapdisk-params": tapdiskParams(target),
            "script": target.get("script", "block"),
        }
        return blockBackend(ctx, plug, rel, extra)

    def unplug(self, ctx: KindContext, plug: PlugSpec) -> Deferred[Outcome]:
        """The agent removes the backend directory after the remove script."""
        return done()

    def hotplugCommand(
        self, ctx: KindContext, plug: PlugSpec, action: str
    ) -> tuple[str, list[str], dict[str, str]] | None:
        """C{block} on the tapdisk's node for tapdisk2; none for blktap1."""
        if self._driver(ctx.target) == "blktap1":
            return None
        from xenddev.driverdomain.hotplug import blockEnvironment

        assert plug.backend is not None
        script = ctx.target.get("script", "block")
        args, env = blockEnvironment(action, plug.backend, script)
        return script, args, env
