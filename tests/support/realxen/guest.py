"""
PV guests of the real-Xen lane, made with C{xl create} in dom0 and watched
through their console logs, which xenconsoled writes into the share.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from tests.support.realxen.vm import RealXenError, sleep

if TYPE_CHECKING:
    from tests.support.realxen.vm import RealXenHost

__all__ = ["GUEST_PREFIX", "Guest", "xlConfig"]

#: What the guest's init starts its report lines with (C{files/domu-init}).
GUEST_PREFIX = "GUEST: "

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _quoted(value: str) -> str:
    """
    C{value} as an C{xl} config string.
    """
    if any(c in value for c in "'\"\n\\"):
        raise ValueError(f"cannot quote {value!r} for xl")
    return f'"{value}"'


def xlConfig(
    name: str,
    *,
    kernel: str,
    ramdisk: str,
    ip: str,
    disks: Sequence[str] = (),
    vifs: Sequence[str] = (),
    memory: int = 256,
    vcpus: int = 1,
    extra: str = "",
    config: Mapping[str, str] | None = None,
) -> str:
    """
    The C{xl} configuration of a PV guest running the lane's guest init.
    """
    kernelArgs = " ".join(filter(None, ["console=hvc0 loglevel=4", f"xenddev.ip={ip}", extra]))
    lines = [
        f"name = {_quoted(name)}",
        'type = "pv"',
        f"kernel = {_quoted(kernel)}",
        f"ramdisk = {_quoted(ramdisk)}",
        f"extra = {_quoted(kernelArgs)}",
        f"memory = {int(memory)}",
        f"vcpus = {int(vcpus)}",
        f"disk = [ {', '.join(_quoted(d) for d in disks)} ]",
        f"vif = [ {', '.join(_quoted(v) for v in vifs)} ]",
    ]
    lines += [f"{key} = {value}" for key, value in (config or {}).items()]
    return "\n".join(lines) + "\n"


class Guest:
    """
    A PV guest (see L{RealXenHost.createGuest}).

    @ivar name: its name.
    @ivar ip: its eth0 address.
    @ivar domid: its domain id (set by C{xl create}).
    @ivar createSeconds: how long C{xl create} took, seen from this machine.
    @ivar configPath: its C{xl} config, on this machine (in the share).
    @ivar consolePath: its console log, on this machine.
    """

    def __init__(
        self,
        host: RealXenHost,
        name: str,
        *,
        ip: str,
        disks: Sequence[str] = (),
        vifs: Sequence[str] = (),
        memory: int = 256,
        vcpus: int = 1,
        extra: str = "",
        config: Mapping[str, str] | None = None,
        ramdisk: str | None = None,
    ) -> None:
        if not _NAME.match(name):
            raise ValueError(f"bad guest name {name!r}")
        self.host = host
        self.name = name
        self.ip = ip
        self.domid: int | None = None
        self.createSeconds: float | None = None
        images = host.images
        guests = host.sharePath / "guests"
        guests.mkdir(exist_ok=True)
        self.configPath = guests / f"{name}.cfg"
        self.configPath.write_text(
            xlConfig(
                name,
                kernel=str(images.kernel),
                ramdisk=ramdisk or str(images.domuInitrd),
                ip=ip,
                disks=disks,
                vifs=vifs,
                memory=memory,
                vcpus=vcpus,
                extra=extra,
                config=config,
            )
        )
        self.consolePath = host.sharePath / "console" / f"guest-{name}.log"
        # xenconsoled appends: an earlier guest of the same name wrote before.
        self._consoleStart = self.consolePath.stat().st_size if self.consolePath.exists() else 0

    async def create(self, timeout: float = 180) -> None:
        """
        C{xl create} it, then learn its domid.

        @raise CommandFailed: C{xl create} or C{xl domid} failed.
        """
        started = time.monotonic()
        await self.host.check(["xl", "create", self.host.inDom0(self.configPath)], timeout=timeout)
        self.createSeconds = time.monotonic() - started
        result = await self.host.check(["xl", "domid", self.name], timeout=60)
        self.domid = int(result.stdout.strip())

    def console(self) -> str:
        """
        What this guest wrote on its console so far.
        """
        try:
            with open(self.consolePath, "rb") as f:
                f.seek(self._consoleStart)
                return f.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def reports(self) -> list[str]:
        """
        The guest init's report lines so far, without the C{GUEST: } prefix.
        """
        return [
            line.split(GUEST_PREFIX, 1)[1].rstrip("\r")
            for line in self.console().splitlines()
            if GUEST_PREFIX in line
        ]

    async def waitConsole(
        self, pattern: str | re.Pattern[str], timeout: float = 120
    ) -> re.Match[str]:
        """
        Wait until C{pattern} (a regular expression, searched with
        C{re.MULTILINE}) matches this guest's console.

        @return: the match.
        @raise RealXenError: not within C{timeout} seconds (the message has
            the console), or the machine died.
        """
        regex = re.compile(pattern, re.MULTILINE) if isinstance(pattern, str) else pattern
        started = time.monotonic()
        while True:
            match = regex.search(self.console())
            if match is not None:
                return match
            if not self.host.alive:
                raise RealXenError(f"QEMU exited while waiting for {regex.pattern!r}")
            if time.monotonic() - started > timeout:
                raise RealXenError(
                    f"guest {self.name}: {regex.pattern!r} not on its console after"
                    f" {timeout:.0f}s; console:\n{self.console()[-3000:]}"
                )
            await sleep(self.host._reactor, 0.2)

    async def destroy(self, timeout: float = 120) -> None:
        """
        C{xl destroy} it (its devices' hotplug scripts run).

        @raise CommandFailed: C{xl destroy} failed.
        """
        await self.host.check(["xl", "destroy", self.name], timeout=timeout)
        self.host.guests.pop(self.name, None)
