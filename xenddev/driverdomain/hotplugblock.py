# -*- test-case-name: tests.test_hotplugblock -*-
"""
The C{block} hotplug script's work done in process (C{driver_domain.
builtin_scripts: [block]}): the same checks, the same nodes, the same lock,
without a shell.

Why: the script forks some forty processes per disk (C{xenstore-*},
C{losetup}, C{stat}, C{sed}...) and holds a global lock while it does, so
disks attached together wait for each other, and each fork is dear in a
driver domain (under emulation, seconds per disk). The built-in does what
the script does for C{phy} and C{file} backends:

  - C{add}: nothing if C{physical-device} is already there; a C{phy}
    device must exist and be a block device; a C{file} must exist, the
    backend must still be in InitWait (2), a C{w} mode needs a writable
    file; unless the mode is C{w!}, the sharing check (the file's loop
    devices, or the device, neither mounted here — read-write mounts only
    for a read-only disk — nor used by another VM's backend, read-write or
    at all as the script decides); a file is attached to a free loop device
    (read-only for C{r}); then C{node} (files), C{physical-device}
    (C{%x:%x}), C{physical-device-path} and C{hotplug-status=connected} are
    written in one transaction;
  - C{remove}: a file's loop device (C{node}) is detached.

Both hold the script's own lock (C{/var/run/xen-hotplug/block}, flock, the
same unlink-on-release protocol as locking.sh), so the built-in and the
real script (run by C{xl} beside us) exclude each other. Failures write
C{hotplug-error} and C{hotplug-status} (C{error}, or C{busy} for a sharing
conflict) with the script's messages, and raise L{BlockScriptError}.
"""

from __future__ import annotations

import fcntl
import os
import stat
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from zope.interface import implementer

from xenddev.driverdomain import loopctl
from xenddev.errors import XenddevError
from xenddev.interfaces import IBuiltinScript, IXenStore, IXenStoreOps

log = Logger()

#: The lock locking.sh's claim_lock "block" takes.
LOCK_FILE = "/var/run/xen-hotplug/block"


class BlockScriptError(XenddevError):
    """
    The built-in block script failed; C{status} is what it wrote to
    C{hotplug-status} (C{error} or C{busy}).
    """

    def __init__(self, message: str, status: str = "error") -> None:
        super().__init__(message)
        self.message = message
        self.status = status


def canonicalMode(mode: str) -> str:
    """The script's canonicalise_mode: C{r}, C{w}, or C{!} (no checks)."""
    if "w" not in mode:
        return "r"
    return "!" if "!" in mode else "w"


class _FileLock:
    """
    locking.sh's protocol: flock the file, check it is still linked, unlink
    to release. Taken in a thread (it may wait for a script); a waiter
    given up on (its run cancelled) releases it as soon as it gets it.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd: int | None = None
        self._mutex = threading.Lock()
        self._abandoned = False

    def acquire(self) -> None:
        """Wait for the lock (in a thread)."""
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX)
            mine = os.fstat(fd)
            try:
                linked = os.stat(self.path)
            except FileNotFoundError:
                os.close(fd)
                continue
            if (mine.st_dev, mine.st_ino) == (linked.st_dev, linked.st_ino):
                break
            os.close(fd)  # released (unlinked) by its holder meanwhile
        with self._mutex:
            self.fd = fd
            abandoned = self._abandoned
        if abandoned:
            self.release()

    def abandon(self) -> None:
        """The waiter is gone: release the lock now if held, or once acquired."""
        with self._mutex:
            self._abandoned = True
            held = self.fd is not None
        if held:
            self.release()

    def release(self) -> None:
        """Unlink the lock file, then close it (the order locking.sh relies on)."""
        with self._mutex:
            fd, self.fd = self.fd, None
        if fd is None:
            return
        try:
            os.unlink(self.path)
        finally:
            os.close(fd)


@implementer(IBuiltinScript)
class BuiltinBlockScript:
    """
    The C{block} script, built in (see the module docstring).

    @param xs: the driver domain's XenStore connection.
    @param domid: the driver domain (relative C{XENBUS_PATH}s are resolved
        against its home, as xenstored does for the script).
    @param reactor: provides the thread pool blocking system calls run in.
    @param lockFile: the script's lock.
    @param mounts: the mount table.
    @param attachLoop: attaches an image (path, read-only) → device.
    @param detachLoop: detaches a loop device.
    @param loopsBacking: the loop devices backing a file.
    """

    def __init__(
        self,
        xs: IXenStore,
        domid: int,
        reactor: Any,
        lockFile: str = LOCK_FILE,
        mounts: str = "/proc/mounts",
        attachLoop: Callable[[str, bool], str] = loopctl.attachLoop,
        detachLoop: Callable[[str], None] = loopctl.detachLoop,
        loopsBacking: Callable[[str], list[str]] = loopctl.loopsBacking,
    ) -> None:
        self.xs = xs
        self.domid = domid
        self.reactor = reactor
        self.lockFile = lockFile
        self.mounts = mounts
        self._attachLoop = attachLoop
        self._detachLoop = detachLoop
        self._loopsBacking = loopsBacking

    def _inThread(self, fn: Callable[..., Any], *args: Any) -> Any:
        return deferToThreadPool(self.reactor, self.reactor.getThreadPool(), fn, *args)

    def run(self, args: Sequence[str], env: Mapping[str, str]) -> Deferred[None]:
        """
        C{block add} or C{block remove} for the backend C{XENBUS_PATH}.

        @raise BlockScriptError: (in the Deferred) after writing
            C{hotplug-error}/C{-status}.
        """
        return Deferred.fromCoroutine(self._run(args, env))

    async def _run(self, args: Sequence[str], env: Mapping[str, str]) -> None:
        path = shown = env["XENBUS_PATH"]
        if not path.startswith("/"):
            path = f"/local/domain/{self.domid}/{path}"
        action = args[0] if args else ""
        try:
            if action == "add":
                await self._add(path, shown, env)
            elif action == "remove":
                await self._remove(path)
            else:
                raise BlockScriptError(f"unknown action {action!r}")
        except BlockScriptError as e:
            await self._report(path, e)
            raise

    def _basePath(self, env: Mapping[str, str]) -> str:
        """This domain's backends of the type: C{<XENBUS_BASE_PATH>/<XENBUS_TYPE>}."""
        base = env.get("XENBUS_BASE_PATH", "backend")
        if not base.startswith("/"):
            base = f"/local/domain/{self.domid}/{base}"
        return f"{base}/{env.get('XENBUS_TYPE', 'vbd')}"

    async def _report(self, path: str, error: BlockScriptError) -> None:
        async def write(tx: Any) -> None:
            if await tx.exists(path):
                await tx.write(f"{path}/hotplug-error", error.message)
                await tx.write(f"{path}/hotplug-status", error.status)

        await self.xs.transact(write)

    async def _add(self, path: str, shown: str, env: Mapping[str, str]) -> None:
        xs = self.xs
        if await xs.readOrNone(f"{path}/physical-device") is not None:
            return
        params = await _required(xs, f"{path}/params")
        mode = await _required(xs, f"{path}/mode")
        frontendId = await _required(xs, f"{path}/frontend-id")
        frontendVm = await xs.readOrNone(f"/local/domain/{frontendId}/vm") or "unknown"
        truetype, real = _trueType(params)
        base = self._basePath(env)
        if truetype == "phy":
            async with _Locked(self):
                if canonicalMode(mode) != "!":
                    conflict = await self._sharing([real], mode, base, frontendId, frontendVm)
                    if conflict is not None:
                        raise BlockScriptError(
                            _ebusy(f"Device {real} is mounted ", canonicalMode(mode), conflict),
                            "busy",
                        )
                await self._connected(path, real, None)
            return
        if truetype != "file":
            # The script reports success here and then fails for want of a
            # block-<type> helper; say what is wrong instead.
            raise BlockScriptError(f"{params} is neither a block device nor a file")
        mode = canonicalMode(mode)
        async with _Locked(self):
            state = await xs.readOrNone(f"{path}/state") or "unknown"
            if state != "2":
                raise BlockScriptError(
                    f"Path closed or removed during hotplug add: {shown} state: {state}"
                )
            # The script looks at the permission bits (root may write anyway).
            if mode == "w" and not os.stat(real).st_mode & 0o222:
                raise BlockScriptError(
                    f"File {real} is read-only, and so I will not\n"
                    "mount it read-write in a guest domain.",
                    "busy",
                )
            if mode != "!":
                loops = await self._inThread(self._loopsBacking, real)
                conflict = (
                    await self._sharing(loops, mode, base, frontendId, frontendVm)
                    if loops
                    else None
                )
                if conflict is not None:
                    prefix = (
                        f"File {real} is loopback-mounted through {conflict[1]},\nwhich is mounted "
                    )
                    raise BlockScriptError(_ebusy(prefix, mode, conflict), "busy")
            try:
                device = await self._inThread(self._attachLoop, real, mode == "r")
            except OSError as e:
                raise BlockScriptError(f"Failed to attach {real} to a loop device: {e}") from None
            try:
                await self._connected(path, device, device)
            except BaseException:
                await self._inThread(self._detachLoop, device)
                raise

    async def _connected(self, path: str, device: str | None, node: str | None) -> None:
        numbers = None
        if device is not None:
            try:
                numbers = await self._inThread(loopctl.majorMinor, device)
            except OSError:
                raise BlockScriptError("Backend device does not exist") from None

        async def write(tx: Any) -> None:
            if not await tx.exists(path):
                raise BlockScriptError(f"{path} was removed during hotplug add")
            if node is not None:
                await tx.write(f"{path}/node", node)
            if device is not None:
                await tx.write(f"{path}/physical-device", numbers)
                await tx.write(f"{path}/physical-device-path", device)
            await tx.write(f"{path}/hotplug-status", "connected")

        await self.xs.transact(write)

    async def _sharing(
        self, devices: Sequence[str], mode: str, base: str, frontendId: str, frontendVm: str
    ) -> tuple[str, str] | None:
        """
        The script's check_sharing: C{("local"|"guest", numbers)} of the
        first conflicting use of C{devices}, or None.
        """
        wanted = {}
        for device in devices:
            try:
                wanted[loopctl.majorMinor(device)] = device
            except OSError:
                continue
        for numbers in self._mountedNumbers(readWriteOnly=mode != "w"):
            if numbers in wanted:
                return ("local", numbers)
        for dom in await self.xs.ls(base, missingOk=True):
            for dev in await self.xs.ls(f"{base}/{dom}", missingOk=True):
                other = await self.xs.readOrNone(f"{base}/{dom}/{dev}/physical-device")
                if other is None or other not in wanted:
                    continue
                if mode != "w":
                    otherMode = await self.xs.readOrNone(f"{base}/{dom}/{dev}/mode") or ""
                    if canonicalMode(otherMode) != "w":
                        continue
                if not await self._sameVm(dom, frontendId, frontendVm):
                    return ("guest", other)
        return None

    def _mountedNumbers(self, readWriteOnly: bool) -> list[str]:
        found = []
        try:
            with open(self.mounts) as f:
                lines = f.read().splitlines()
        except OSError:
            return []
        for line in lines:
            fields = line.split()
            if len(fields) < 4:
                continue
            if readWriteOnly and "ro" in fields[3].split(","):
                continue
            source = fields[0].replace("\\040", " ")
            try:
                if stat.S_ISBLK(os.stat(source).st_mode):
                    found.append(loopctl.majorMinor(source))
            except OSError:
                continue
        return found

    async def _sameVm(self, otherDom: str, frontendId: str, frontendVm: str) -> bool:
        """The script's same_vm: the other backend's guest is this VM (or its target)."""
        xs = self.xs
        otherVm = await xs.readOrNone(f"/local/domain/{otherDom}/vm") or frontendVm
        target = await xs.readOrNone(f"/local/domain/{frontendId}/target") or "-1"
        targetVm = await xs.readOrNone(f"/local/domain/{target}/vm") or "No Target"
        otherTarget = await xs.readOrNone(f"/local/domain/{otherDom}/target") or "-1"
        otherTargetVm = await xs.readOrNone(f"/local/domain/{otherTarget}/vm") or "No Other Target"
        mine = frontendVm.removesuffix("-1")
        return mine in (otherVm, otherTargetVm) or targetVm in (otherVm, otherTargetVm)

    async def _remove(self, path: str) -> None:
        params = await self.xs.readOrNone(f"{path}/params") or ""
        truetype, _ = _trueType(params)
        if truetype != "file":
            return
        async with _Locked(self):
            node = await self.xs.readOrNone(f"{path}/node")
            if node is None:
                raise BlockScriptError(f"{path}/node is missing: no loop device to detach")
            try:
                await self._inThread(self._detachLoop, node)
            except OSError as e:
                raise BlockScriptError(f"losetup -d {node} failed: {e}") from None


class _Locked:
    """Holds the script's lock (taken in a thread: it may wait for a script)."""

    def __init__(self, script: BuiltinBlockScript) -> None:
        self.script = script
        self.lock = _FileLock(script.lockFile)

    async def __aenter__(self) -> None:
        try:
            await self.script._inThread(self.lock.acquire)
        except CancelledError:
            self.lock.abandon()
            raise

    async def __aexit__(self, *exc: object) -> None:
        self.lock.release()


def _trueType(params: str) -> tuple[str, str]:
    """The script's truetype of C{params} (C{phy}, C{file} or C{""}) and its real path."""
    try:
        st = os.stat(params)
    except OSError:
        return "", params
    real = os.path.realpath(params)
    if stat.S_ISBLK(st.st_mode):
        return "phy", real
    if stat.S_ISREG(st.st_mode):
        return "file", real
    return "", params


def _ebusy(prefix: str, mode: str, conflict: tuple[str, str]) -> str:
    """The script's do_ebusy message."""
    where, when = (
        ("a guest ", "now") if conflict[0] == "guest" else ("the privileged ", "by a guest")
    )
    m1, m2 = ("", "") if mode == "w" else ("read-write ", "read-only ")
    return f"{prefix}{m1}in {where}domain,\nand so cannot be mounted {m2}{when}."


async def _required(xs: IXenStoreOps, path: str) -> str:
    value = await xs.readOrNone(path)
    if value is None:
        raise BlockScriptError(f"{path} is missing")
    return value
