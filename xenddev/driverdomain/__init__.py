"""
The toolstack ⇄ driver-domain control protocol (seed 000), both sides.

L{xenddev.driverdomain.client.DriverDomainClient} is the toolstack side: it
writes requests under C{/local/domain/<dd>/backendctrl/} and waits for
results. L{xenddev.driverdomain.agent.BackendCtrlAgent} runs in the driver
domain: it executes requests through pluggable driver-domain kinds and
dispatches hotplug scripts. The protocol itself is written down in
C{docs/protocol.md}.
"""
