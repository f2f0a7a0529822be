"""
Driver-domain kinds: how a driver domain serves a target.

Each kind provides L{xenddev.interfaces.IDriverDomainKind}. The agent is
given a list of kinds (by name, from config) and asks each in turn whether
it accepts a target at prepare time.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterable

from xenddev.interfaces import IDriverDomainKind


def _blkback() -> IDriverDomainKind:
    from xenddev.driverdomain.kinds.blkback import BlkbackKind

    return BlkbackKind()


def _netback() -> IDriverDomainKind:
    from xenddev.driverdomain.kinds.netback import NetbackKind

    return NetbackKind()


def _tap() -> IDriverDomainKind:
    from xenddev.driverdomain.kinds.tap import TapKind

    return TapKind()


def _qemu() -> IDriverDomainKind:
    from xenddev.driverdomain.kinds.qemu import QemuKind

    return QemuKind()


def _qemuThroughKernel() -> IDriverDomainKind:
    from xenddev.driverdomain.kinds.qemu import QemuKind
    from xenddev.driverdomain.nbd import KernelNbd

    kind = QemuKind()
    kind.nbd = KernelNbd(kind.reactor)
    return kind


#: Kind factories by the name used in configuration.
KIND_FACTORIES: dict[str, Callable[[], IDriverDomainKind]] = {
    "blkback": _blkback,
    "netback": _netback,
    "tap": _tap,
    "qemu": _qemu,
}


#: The factories that differ when the kernel's backends serve the
#: devices: Linux has no qdisk backend, so qemu's exports reach blkback
#: through the kernel's NBD client.
KERNEL_KIND_FACTORIES: dict[str, Callable[[], IDriverDomainKind]] = {
    **KIND_FACTORIES,
    "qemu": _qemuThroughKernel,
}


def kindsByName(names: Iterable[str], kernel: bool = False) -> list[IDriverDomainKind]:
    """
    Instantiate the named kinds, in order.

    @param kernel: the kernel's backends serve the devices (a real Xen
        host), rather than the simulator.
    @raise ValueError: naming an unknown kind and listing the known ones.
    """
    factories = KERNEL_KIND_FACTORIES if kernel else KIND_FACTORIES
    kinds = []
    for name in names:
        factory = factories.get(name)
        if factory is None:
            raise ValueError(
                f"unknown driver-domain kind {name!r} (known: {', '.join(sorted(KIND_FACTORIES))})"
            )
        kinds.append(factory())
    return kinds


#: What each kind runs in the driver domain besides the hotplug scripts.
KIND_TOOLS: dict[str, tuple[str, ...]] = {
    "blkback": (),
    "netback": (),
    "tap": ("tap-ctl",),
    "qemu": ("qemu-storage-daemon", "qemu-img"),
}

#: What each kind needs besides when the kernel's backends serve.
KERNEL_KIND_TOOLS: dict[str, tuple[str, ...]] = {"qemu": ("nbd-client",)}

#: The order in which C{auto} asks the kinds to serve a target: the kernel
#: backends first (raw images), then the formats only userspace serves.
AUTO_ORDER = ("blkback", "netback", "qemu", "tap")


def availableKinds(
    which: Callable[[str], str | None] = shutil.which,
    kernel: bool = False,
    kernelHasNbd: Callable[[], bool] | None = None,
) -> tuple[list[str], dict[str, str]]:
    """
    The kinds whose tools are present (C{driver_domain.kinds: auto}), in
    L{AUTO_ORDER}, and why each other one is left out (kind → the missing
    program).

    @param kernel: as for L{kindsByName}; C{qemu} then also needs
        C{nbd-client} and the kernel's C{nbd} driver.
    @param kernelHasNbd: whether the kernel has it (default: looks).
    """
    present: list[str] = []
    missing: dict[str, str] = {}
    for name in AUTO_ORDER:
        tools = KIND_TOOLS[name] + (KERNEL_KIND_TOOLS.get(name, ()) if kernel else ())
        absent = [tool for tool in tools if which(tool) is None]
        if kernel and name == "qemu" and not absent:
            if kernelHasNbd is None:
                from xenddev.driverdomain.nbd import moduleAvailable

                kernelHasNbd = moduleAvailable
            if not kernelHasNbd():
                absent.append("nbd driver in this kernel")
        if absent:
            missing[name] = f"no {', '.join(absent)}"
        else:
            present.append(name)
    return present, missing


def resolveKinds(
    names: Iterable[str],
    which: Callable[[str], str | None] = shutil.which,
    kernel: bool = False,
) -> tuple[list[str], dict[str, str]]:
    """
    The configured kinds, with C{auto} (alone) standing for
    L{availableKinds}; the second item says why kinds were left out.
    """
    names = list(names)
    if names == ["auto"]:
        return availableKinds(which, kernel)
    return names, {}
