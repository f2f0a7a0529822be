# -*- test-case-name: tests.test_recovery -*-
"""
Recovery at start: every device operation a killed daemon left half-done
is finished or rolled back from what XenStore holds (issue 13, finding 4).

A daemon killed with C{kill -9} in the middle of a C{createDevice} or a
C{destroyDevice} leaves the chain's steps written so far: a record in
C{/vm/<uuid>/device/<class>/<devid>} (always the first write of a creation,
the last thing a destruction removes), perhaps an object in the driver
domain, a plug, a frontend, a pending request. Its caller got no answer
(its connection died with the daemon), so either outcome is honest; the
one that needs no guess is the one a failed operation has: **a device
whose creation did not reach its last step is destroyed**, with the
destruction's own chain, which takes an object down from whatever state it
is in (waiting out a pending request first). A half-done destruction looks
the same way and is finished by the same step.

A device counts as made when every step of the creation is visible:

  1. the record names its backend (written with the frontend);
  2. the frontend directory exists;
  3. its object is C{active} with no request pending;
  4. the backend's C{hotplug-status} says connected.

A request still pending when recovery starts is waited for first (up to
the request timeout): the agent finishes its journal after a restart too.
Devices whose guest is gone are the reaper's (L{xenddev.toolstack.reaper}).
"""

from __future__ import annotations

import attrs
from twisted.internet.defer import gatherResults
from twisted.logger import Logger

from xenddev.backendctrl.protocol import ACTIVE
from xenddev.toolstack.controller import DevController
from xenddev.toolstack.manager import DeviceManager
from xenddev.xenbus import HotplugStatus, classifyHotplugStatus
from xenddev.xenstore.errors import XenStoreTimeout

log = Logger()


@attrs.frozen
class Recovered:
    """One device recovery rolled back (or found made)."""

    domid: int
    devclass: str
    devid: int
    #: Why it was not made (the first missing step), or None if it was.
    missing: str | None


async def recoverDevices(manager: DeviceManager, requestTimeout: float) -> list[Recovered]:
    """
    Judge every device in the toolstack's records of every live domain;
    destroy those whose creation (or destruction) was cut short. Fires with
    what was found, made devices included. Runs before the daemon takes
    requests, so nothing else works on these devices meanwhile.
    """
    found: list[Recovered] = []
    for domid in await _liveDomains(manager):
        for devclass in sorted(manager.controllerClasses):
            ctrl = await manager.controller(domid, devclass)
            for devid in await ctrl.deviceIDs():
                missing = await _missingStep(manager, ctrl, devid, requestTimeout)
                found.append(Recovered(domid, devclass, devid, missing))
                if missing is None:
                    continue
                log.warn(
                    "Recovery: {cls} {devid} of domain {domid} was left half-done "
                    "({missing}); rolling it back",
                    cls=devclass,
                    devid=devid,
                    domid=domid,
                    missing=missing,
                )
                await manager.destroyDevice(domid, devclass, devid, force=True)
    return found


async def _liveDomains(manager: DeviceManager) -> list[int]:
    """Domains with a home and a vm path (a guest the toolstack may have records for)."""
    names = await manager.xs.ls("/local/domain", missingOk=True)
    domids = sorted(int(n) for n in names if n.isascii() and n.isdigit())
    vms = await gatherResults(
        [manager.xs.readOrNone(f"/local/domain/{d}/vm") for d in domids], consumeErrors=True
    )
    return [d for d, vm in zip(domids, vms, strict=True) if vm is not None]


async def _missingStep(
    manager: DeviceManager, ctrl: DevController, devid: int, requestTimeout: float
) -> str | None:
    """The first step of the creation chain not visible in XenStore, or None."""
    backend, vdi, backendId = await ctrl.readVm(devid, "backend", "vdi", "backend-id")
    if vdi is None or backendId is None or not backendId.isdigit():
        return "record incomplete"
    if backend is None:
        return "no backend in the record"
    if not await manager.xs.exists(ctrl.frontendPath(devid)):
        return "no frontend"
    paths = manager.driverDomain(int(backendId)).paths(vdi, ctrl.objectClass)
    try:
        await manager.xs.waitFor(paths.request, lambda v: v is None, requestTimeout)
    except XenStoreTimeout:
        return "a request is still pending"
    state, status = await gatherResults(
        [manager.xs.readOrNone(paths.state), manager.xs.readOrNone(f"{backend}/hotplug-status")],
        consumeErrors=True,
    )
    if state != ACTIVE:
        return f"object state {state or 'missing'}"
    if classifyHotplugStatus(status) is not HotplugStatus.Connected:
        return f"hotplug-status {status or 'missing'}"
    return None
