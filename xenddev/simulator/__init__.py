"""
SIMULATED xenbus drivers: stand-ins for what cannot exist without a
hypervisor.

A real Xen host has kernel backend drivers (blkback, netback) in its driver
domains and frontend drivers (blkfront, netfront) in its guests; they answer
the toolstack through XenStore. Where xenddev is developed and tested there
is no hypervisor, so neither exists. These classes play their parts of the
xenbus state machine in XenStore, so that the toolstack (and its tests) can
run the whole device life cycle against a real xenstored:

  - L{BackendSimulator}: the kernel backends of one driver domain;
  - L{FrontendSimulator}: the frontends of one guest;
  - L{SimulatedHost}: one backend simulator and several guests together.

Each logs a line saying that it is a simulation when it starts. Nothing
here touches a device, a ring or an event channel: the values written
(ring references, event channels) are made up.
"""

from xenddev.simulator.backend import BACKEND_FEATURES, BackendSimulator, decideBackend
from xenddev.simulator.base import (
    DeviceView,
    Transition,
    XenbusEndSimulator,
    settleSimulators,
)
from xenddev.simulator.frontend import (
    FRONTEND_RINGS,
    FrontendSimulator,
    SimulatedDeviceNotFound,
    decideFrontend,
)
from xenddev.simulator.host import SimulatedHost

__all__ = [
    "BACKEND_FEATURES",
    "FRONTEND_RINGS",
    "BackendSimulator",
    "DeviceView",
    "FrontendSimulator",
    "SimulatedDeviceNotFound",
    "SimulatedHost",
    "Transition",
    "XenbusEndSimulator",
    "decideBackend",
    "decideFrontend",
    "settleSimulators",
]
