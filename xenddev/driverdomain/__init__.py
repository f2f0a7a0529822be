"""
The driver-domain side of seed 000: the agent that executes the toolstack's
requests in a driver domain, and everything only that side does.

  - L{agent}: L{BackendCtrlAgent}, composing the three below;
  - L{executor}: a request performed through a kind, by its rule in
    L{xenddev.backendctrl.requests};
  - L{completion}: the completion transaction, retried until a deadline;
  - L{hotplugdispatch}: the hotplug scripts of the devices the agent made;
  - L{objects}, L{jobs}: the agent's records and what it knows of its
    objects; jobs serialised per object or device;
  - L{kinds}: the driver-domain kinds (blkback, netback, tap, qemu);
  - L{hotplug}, L{hotplugblock}, L{loopctl}: running hotplug scripts (only
    this side runs them) and the built-in C{block} script;
  - L{nbd}: kernel NBD devices for the qemu kind;
  - L{run}: C{python -m xenddev.driverdomain.run}, the agent as a process.

The protocol's vocabulary is L{xenddev.backendctrl}; nothing here imports
the toolstack side (L{xenddev.toolstack}).
"""
