# -*- test-case-name: tests.test_datapath_tap -*-
"""
Pausing data paths through their driver domain's agent.

The toolstack cannot run C{tap-ctl} in, or reach a QMP socket of, a remote
driver domain. L{ProtocolPauser} asks the agent instead, with the
backendctrl protocol's C{pause}, C{resume} and C{reload} requests (our
extension, docs/protocol.md); the agent pauses the data path it registered
with its own pauser (L{xenddev.datapath.quiesce.standardPausers}).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from twisted.internet.defer import Deferred
from zope.interface import implementer

from xenddev.backendctrl.records import DataPath
from xenddev.datapath.quiesce import IDataPathPauser
from xenddev.toolstack.client import DriverDomainClient


@implementer(IDataPathPauser)
class ProtocolPauser:
    """
    Pauses and resumes a data path by a request to the agent of its driver
    domain.

    @param clients: the protocol client of a driver domain (e.g.
        L{xenddev.toolstack.manager.DeviceManager.driverDomain}).
    """

    def __init__(self, clients: Callable[[int], DriverDomainClient]) -> None:
        self.clients = clients

    def pause(self, dataPath: DataPath) -> Deferred[None]:
        """The C{pause} request on the data path's vdi."""
        return self.clients(dataPath.driverDomid).pause(dataPath.vdi)

    def resume(self, dataPath: DataPath, reload: bool = True) -> Deferred[None]:
        """The C{reload} (or, without reload, C{resume}) request."""
        return self.clients(dataPath.driverDomid).resume(dataPath.vdi, reload)


def protocolPausers(
    clients: Callable[[int], DriverDomainClient], kinds: Iterable[str] = ("tap", "qemu")
) -> dict[str, IDataPathPauser]:
    """One L{ProtocolPauser} for the data paths of each of C{kinds}."""
    pauser = ProtocolPauser(clients)
    return dict.fromkeys(kinds, pauser)
