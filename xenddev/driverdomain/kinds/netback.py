# -*- test-case-name: tests.test_driverdomain_kinds -*-
"""
The C{netback} driver-domain kind: a kernel network backend (netback) whose
host side (C{vif<domu>.<devid>}) is attached by a hotplug script
(C{vif-bridge} by default). It serves the C{vif} object class, our extension
of seed 000 to network interfaces (docs/protocol.md).

Target keys (C{t/*}):

  - C{mac}: the guest MAC address (required);
  - C{bridge}: the bridge to join (for vif-bridge);
  - C{script}: the hotplug script (default C{vif-bridge});
  - C{rate}: a rate limit as xl writes it (e.g. C{10000000,50000});
  - C{ip}: addresses for vif-route/vif-nat;
  - C{vifname}: a name for the host interface.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from twisted.internet.defer import Deferred
from zope.interface import implementer

from xenddev.driverdomain.kinds.base import (
    KernelBackendKind,
    KindContext,
    KindError,
    Outcome,
    PlugSpec,
    done,
)
from xenddev.interfaces import IDriverDomainKind
from xenddev.xenstore.paths import Perm

_MAC = re.compile(r"[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}\Z")
_IFNAME = re.compile(r"[A-Za-z0-9_.-]{1,15}\Z")
_RATE = re.compile(r"[0-9]+(,[0-9]+)?\Z")
_IPS = re.compile(r"[0-9a-fA-F.:/ ]{1,256}\Z")


@implementer(IDriverDomainKind)
class NetbackKind(KernelBackendKind):
    """Serves vifs with netback and a vif hotplug script."""

    name = "netback"
    objectClasses = ("vif",)

    def accepts(self, objectClass: str, target: Mapping[str, str]) -> bool:
        """Every vif target (validated at prepare)."""
        return objectClass == "vif"

    def prepare(self, ctx: KindContext) -> Deferred[Outcome]:
        """Validate the target (MAC, names, rate)."""
        t = ctx.target
        if not _MAC.match(t.get("mac", "")):
            raise KindError("EINVAL", f"mac must look like 00:16:3e:00:00:01, got {t.get('mac')!r}")
        for key in ("bridge", "vifname"):
            if key in t and not _IFNAME.match(t[key]):
                raise KindError("EINVAL", f"{key} {t[key]!r} is not an interface name")
        if "rate" in t and not _RATE.match(t["rate"]):
            raise KindError("EINVAL", f"rate {t['rate']!r} is not <bytes>[,<usecs>]")
        if "ip" in t and not _IPS.match(t["ip"]):
            raise KindError("EINVAL", f"ip {t['ip']!r} is not a list of addresses")
        return done()

    def plug(self, ctx: KindContext, plug: PlugSpec) -> Deferred[Outcome]:
        """Create C{backend/vif/<domu>/<devid>} for the frontend."""
        t = ctx.target
        dd, domu = ctx.driverDomid, plug.device.frontendDomid
        rel, backend = self._backendFor(ctx, plug, "vif")
        values = {
            "frontend-id": str(domu),
            "online": "1",
            "state": "1",
            "handle": str(plug.device.devid),
            "mac": t["mac"],
            "script": t.get("script", "vif-bridge"),
            "type": "vif",
        }
        for key in ("bridge", "rate", "ip", "vifname"):
            if key in t:
                values[key] = t[key]
        return done(
            Outcome(
                backend=rel,
                mkdirs={backend: [Perm("n", dd), Perm("r", domu)]},
                writes={f"{backend}/{k}": v for k, v in values.items()},
            )
        )

    def hotplugCommand(
        self, ctx: KindContext, plug: PlugSpec, action: str
    ) -> tuple[str, list[str], dict[str, str]] | None:
        """C{vif-bridge online|offline type_if=vif} with libxl's environment."""
        from xenddev.driverdomain.hotplug import vifEnvironment

        assert plug.backend is not None
        script = ctx.target.get("script", "vif-bridge")
        args, env = vifEnvironment(action, plug.backend, ctx.target.get("vifname"), script=script)
        return script, args, env
