# -*- test-case-name: tests.test_driverdomain_agent -*-
"""
The C{blkback} driver-domain kind: a kernel block backend (blkback) fed by
the C{block} hotplug script, for C{phy} (a block device) and C{file} (an
image file, attached to a loop device by the script) targets.

Target keys (C{t/*}):

  - C{type}: C{phy} or C{file} (required);
  - C{params}: the device or file path (required);
  - C{format}: must be C{raw} if given (blkback reads the bytes as they are);
  - C{mode}: C{r}, C{w} or C{w!} (default C{w});
  - C{devtype}: C{disk} or C{cdrom} (default C{disk});
  - C{script}: the hotplug script (default C{block}).

Preparation checks that the target exists in this (the driver) domain; the
backend directory is created at plug, with the keys xend and libxl write,
owned by the driver domain and readable by the guest.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Mapping

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

MODES = ("r", "w", "w!")
DEVTYPES = ("disk", "cdrom")


@implementer(IDriverDomainKind)
class BlkbackKind(KernelBackendKind):
    """
    Serves C{phy} and C{file} targets with blkback and the C{block} script.

    @param stat: how to look at a target path (injected for unit tests).
    """

    name = "blkback"
    objectClasses = ("vdi",)

    def __init__(self, stat: Callable[[str], os.stat_result] = os.stat) -> None:
        self._stat = stat

    def accepts(self, objectClass: str, target: Mapping[str, str]) -> bool:
        """C{phy} and C{file} targets."""
        return (
            objectClass == "vdi"
            and target.get("type") in ("phy", "file")
            and target.get("format", "raw") == "raw"
        )

    def _check(self, target: Mapping[str, str]) -> None:
        params = target.get("params", "")
        if not params.startswith("/"):
            raise KindError("EINVAL", f"params must be an absolute path, got {params!r}")
        if target.get("mode", "w") not in MODES:
            raise KindError("EINVAL", f"mode must be one of {', '.join(MODES)}")
        if target.get("devtype", "disk") not in DEVTYPES:
            raise KindError("EINVAL", f"devtype must be one of {', '.join(DEVTYPES)}")
        try:
            st = self._stat(params)
        except FileNotFoundError:
            raise KindError("ENOENT", f"{params} does not exist in the driver domain") from None
        except OSError as e:
            raise KindError("EIO", f"cannot stat {params}: {e.strerror}") from None
        if target["type"] == "phy" and not stat.S_ISBLK(st.st_mode):
            raise KindError("ENODEV", f"{params} is not a block device")
        if target["type"] == "file" and not stat.S_ISREG(st.st_mode):
            raise KindError("EINVAL", f"{params} is not a regular file")

    def prepare(self, ctx: KindContext) -> Deferred[Outcome]:
        """Check the target exists and has the right type."""
        self._check(ctx.target)
        return done()

    def plug(self, ctx: KindContext, plug: PlugSpec) -> Deferred[Outcome]:
        """Create C{backend/vbd/<domu>/<devid>} for the frontend."""
        target = ctx.target
        dd, domu = ctx.driverDomid, plug.device.frontendDomid
        rel, backend = self._backendFor(ctx, plug, "vbd")
        mode = target.get("mode", "w")
        values = {
            "frontend": plug.frontend,
            "frontend-id": str(domu),
            "online": "1",
            "state": "1",
            "removable": "1" if target.get("devtype") == "cdrom" else "0",
            "bootable": "1",
            "type": target["type"],
            "params": target["params"],
            # "w!" reaches the block script, whose canonicalise_mode turns it
            # into "skip the sharing check" (xend's forced shared write).
            "mode": mode,
            "device-type": target.get("devtype", "disk"),
            "script": target.get("script", "block"),
        }
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
        """C{block add|remove} with libxl's environment."""
        from xenddev.hotplug import blockEnvironment

        assert plug.backend is not None
        script = ctx.target.get("script", "block")
        args, env = blockEnvironment(action, plug.backend, script)
        return script, args, env
