"""
The toolstack side of seed 000 (dom0): xend's device controllers as
Deferred chains over the protocol.

  - L{controller}: L{DevController}, xend's controller API;
  - L{manager}: the L{DeviceManager} (controllers per domain and class,
    per-device serialisation, one L{DriverDomainClient} per driver domain);
  - L{client}: L{DriverDomainClient}, the requests written to a driver
    domain's C{backendctrl/} and their results, C{populateFrontend};
  - L{restart}, L{reconnect}: moving a driver domain's devices to another;
  - L{reaper}: tearing down what dead guests left behind;
  - L{pauser}: pausing data paths through a driver domain's agent.

The device classes themselves are L{xenddev.controllers}; nothing here
imports them (the daemon's wiring hands the class map to the manager).
"""
