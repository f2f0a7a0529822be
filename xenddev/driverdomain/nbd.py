# -*- test-case-name: tests.test_nbd -*-
"""
The kernel's NBD client: connects an C{/dev/nbdN} to an NBD export, so that
blkback can serve what a userspace daemon (C{qemu-storage-daemon}) exports.

Linux has no userspace qdisk backend in a driver domain: its only block
backend is blkback, which serves block devices. An image format blkback
cannot read (qcow2) reaches it through the kernel's C{nbd} driver: the
daemon exports the image over NBD on a UNIX socket, C{nbd-client}
negotiates with it and hands the socket to the kernel (over netlink, so the
device stays connected after C{nbd-client} exits), and blkback opens
C{/dev/nbdN} like any disk.

C{nbd-client} is run with an argument list (no shell). A free device is the
first C{nbdN} with no C{pid} attribute in sysfs and not being connected by
this process; the kernel refuses a busy one, and the next is tried.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.utils import getProcessOutputAndValue
from twisted.logger import Logger
from zope.interface import implementer

from xenddev.errors import XenddevError
from xenddev.interfaces import INbdAttacher

#: The module's name, and the device names it creates.
MODULE = "nbd"


class NbdError(XenddevError):
    """A kernel NBD device could not be connected or disconnected."""


def moduleAvailable(
    release: str | None = None, sysModule: str = "/sys/module", libModules: str = "/lib/modules"
) -> bool:
    """
    Whether this kernel has the C{nbd} driver: loaded, built in, or a module
    C{modprobe} can load (named in C{modules.dep}).
    """
    if os.path.isdir(os.path.join(sysModule, MODULE)):
        return True
    base = os.path.join(libModules, release or platform.release())
    for listing in ("modules.dep", "modules.builtin"):
        try:
            with open(os.path.join(base, listing)) as f:
                for line in f:
                    name = line.split(":", 1)[0].rsplit("/", 1)[-1]
                    if name.split(".ko", 1)[0] == MODULE:
                        return True
        except OSError:
            continue
    return False


@implementer(INbdAttacher)
class KernelNbd:
    """
    Runs C{nbd-client} to connect and disconnect C{/dev/nbdN}.

    @param reactor: spawns the processes.
    @param client: the C{nbd-client} program.
    @param modprobe: loads the module when it is not loaded yet.
    @param sysBlock: sysfs' block directory (tests point it elsewhere).
    @param devDir: where the device nodes are.
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        client: str = "nbd-client",
        modprobe: str = "modprobe",
        sysBlock: str = "/sys/block",
        devDir: str = "/dev",
        moduleLoaded: Callable[[], bool] = lambda: os.path.isdir(f"/sys/module/{MODULE}"),
    ) -> None:
        self.reactor = reactor
        self.client = client
        self.modprobe = modprobe
        self.sysBlock = sysBlock
        self.devDir = devDir
        self._moduleLoaded = moduleLoaded
        self._connecting: set[str] = set()

    async def _run(self, argv: Sequence[str]) -> tuple[int, str]:
        env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "LC_ALL": "C"}
        try:
            out, err, code = await getProcessOutputAndValue(
                argv[0], list(argv[1:]), env=env, reactor=self.reactor
            )
        except OSError as e:
            raise NbdError(f"cannot run {argv[0]}: {e}") from None
        text = (err or out).decode("utf-8", "replace").strip()
        return code, text

    def _names(self) -> list[str]:
        try:
            names = [n for n in os.listdir(self.sysBlock) if n.startswith(MODULE)]
        except OSError:
            return []
        return sorted(
            (n for n in names if n[len(MODULE) :].isdigit()), key=lambda n: int(n[len(MODULE) :])
        )

    def attached(self, device: str) -> bool:
        """Connected: sysfs shows the C{pid} that configured it."""
        name = os.path.basename(device)
        return os.path.exists(os.path.join(self.sysBlock, name, "pid"))

    async def _ensureModule(self) -> None:
        if self._moduleLoaded():
            return
        code, text = await self._run([self.modprobe, MODULE])
        if code != 0:
            raise NbdError(f"cannot load the kernel's {MODULE} module: {text or code}")

    async def _attach(self, socketPath: str, export: str, readOnly: bool) -> str:
        await self._ensureModule()
        refused: list[str] = []
        for name in self._names():
            device = os.path.join(self.devDir, name)
            if name in self._connecting or self.attached(device):
                continue
            self._connecting.add(name)
            try:
                argv = [self.client, "-unix", socketPath, device, "-name", export, "-block-size"]
                argv += ["512", *(["-readonly"] if readOnly else [])]
                code, text = await self._run(argv)
            finally:
                self._connecting.discard(name)
            if code == 0:
                self.log.info(
                    "Connected {device} to NBD export {export} on {socket}",
                    device=device,
                    export=export,
                    socket=socketPath,
                )
                return device
            if self.attached(device):
                # Taken by someone else between our look and the kernel's.
                refused.append(f"{name}: {text}")
                continue
            raise NbdError(f"nbd-client could not connect {device} to {export}: {text or code}")
        raise NbdError(
            "no free nbd device"
            + (f" ({'; '.join(refused)})" if refused else f" among {len(self._names())}")
        )

    def attach(self, socketPath: str, export: str, readOnly: bool) -> Deferred[str]:
        """Connect a free C{/dev/nbdN} to the export; fire with its path."""
        return Deferred.fromCoroutine(self._attach(socketPath, export, readOnly))

    async def _detach(self, device: str) -> None:
        if not self.attached(device):
            return
        code, text = await self._run([self.client, "-d", device])
        if code != 0 and self.attached(device):
            raise NbdError(f"nbd-client could not disconnect {device}: {text or code}")
        self.log.info("Disconnected {device}", device=device)

    def detach(self, device: str) -> Deferred[None]:
        """Disconnect C{device} (C{nbd-client -d}); nothing if not connected."""
        return Deferred.fromCoroutine(self._detach(device))
