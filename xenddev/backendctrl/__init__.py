"""
Seed 000's shared vocabulary: what the toolstack and the driver-domain agent
both read, and nothing that only one side does.

  - L{protocol}: object classes, control paths, request names and states,
    the Xen errno table, name and target validation;
  - L{requests}: the requests as one table (accepted states, state after,
    effects, plugs, kind methods, hotplug), their parsing and the shared
    preconditions;
  - L{errors}: the protocol's errors (a result errno, a name, a message);
  - L{records}: the layout of the agent's private records that both sides
    read (the data-path registry, quiesce holds).

The toolstack side is L{xenddev.toolstack}, the driver-domain side
L{xenddev.driverdomain}; neither imports the other.
"""
