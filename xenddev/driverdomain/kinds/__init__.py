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


#: Kind factories by the name used in configuration.
KIND_FACTORIES: dict[str, Callable[[], IDriverDomainKind]] = {
    "blkback": _blkback,
    "netback": _netback,
    "tap": _tap,
    "qemu": _qemu,
}


def kindsByName(names: Iterable[str]) -> list[IDriverDomainKind]:
    """
    Instantiate the named kinds, in order.

    @raise ValueError: naming an unknown kind and listing the known ones.
    """
    kinds = []
    for name in names:
        factory = KIND_FACTORIES.get(name)
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

#: The order in which C{auto} asks the kinds to serve a target: the kernel
#: backends first (raw images), then the formats only userspace serves.
AUTO_ORDER = ("blkback", "netback", "qemu", "tap")


def availableKinds(
    which: Callable[[str], str | None] = shutil.which,
) -> tuple[list[str], dict[str, str]]:
    """
    The kinds whose tools are present (C{driver_domain.kinds: auto}), in
    L{AUTO_ORDER}, and why each other one is left out (kind → the missing
    program).
    """
    present: list[str] = []
    missing: dict[str, str] = {}
    for name in AUTO_ORDER:
        absent = [tool for tool in KIND_TOOLS[name] if which(tool) is None]
        if absent:
            missing[name] = f"no {', '.join(absent)}"
        else:
            present.append(name)
    return present, missing


def resolveKinds(
    names: Iterable[str], which: Callable[[str], str | None] = shutil.which
) -> tuple[list[str], dict[str, str]]:
    """
    The configured kinds, with C{auto} (alone) standing for
    L{availableKinds}; the second item says why kinds were left out.
    """
    names = list(names)
    if names == ["auto"]:
        return availableKinds(which)
    return names, {}
