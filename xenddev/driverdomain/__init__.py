"""
The driver-domain side of seed 000: the agent that executes the toolstack's
requests in a driver domain, and everything only that side does.

  - L{agent}: L{BackendCtrlAgent};
  - L{kinds}: the driver-domain kinds (blkback, netback, tap, qemu);
  - L{hotplug}, L{hotplugblock}, L{loopctl}: running hotplug scripts (only
    this side runs them) and the built-in C{block} script;
  - L{nbd}: kernel NBD devices for the qemu kind;
  - L{run}: C{python -m xenddev.driverdomain.run}, the agent as a process.

The protocol's vocabulary is L{xenddev.backendctrl}; nothing here imports
the toolstack side (L{xenddev.toolstack}).
"""
