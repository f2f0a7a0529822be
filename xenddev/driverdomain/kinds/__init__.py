"""
Driver-domain kinds: how a driver domain serves a target.

Each kind provides L{xenddev.interfaces.IDriverDomainKind}. The agent is
given a list of kinds (by name, from config) and asks each in turn whether
it accepts a target at prepare time.
"""

from __future__ import annotations

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
