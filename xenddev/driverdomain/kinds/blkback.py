# -*- test-case-name: tests.test_driverdomain_kinds -*-
"""
The C{blkback} driver-domain kind: a kernel block backend (blkback) fed by
the C{block} hotplug script, for C{phy} (a block device) and C{file} (an
image file, attached to a loop device by the script) targets.

Target keys (C{t/*}):

  - C{type}: C{phy}, C{file}, or C{empty} (a cdrom drive without medium)
    (required);
  - C{params}: the device or file path (required; empty for C{empty});
  - C{format}: must be C{raw} if given (blkback reads the bytes as they are),
    C{empty} for an empty drive;
  - C{mode}: C{r}, C{w} or C{w!} (default C{w});
  - C{devtype}: C{disk} or C{cdrom} (default C{disk});
  - C{script}: the hotplug script (default C{block}).

Preparation checks that the target exists in this (the driver) domain; the
backend directory is created at plug, with the keys xend and libxl write,
owned by the driver domain and readable by the guest.

A cdrom's medium can be changed (the C{change} request) while the drive is
unplugged, or plugged but empty: the completion rewrites the backend's
C{type} and C{params} (what xend's media change wrote, and what an HVM
guest's device model watches) and removes what the script wrote for an old
medium (C{physical-device}, C{physical-device-path}, C{node}: the script's
add does nothing while C{physical-device} exists), and the add script
attaches the new medium. A plugged drive holding a medium is refused
(C{EBUSY}): Linux's blkback serves the device it opened until it is unbound
("changing physical device (from 7:0 to 7:1) not supported" on real Xen), so
the toolstack unplugs the drive, changes the target and plugs it again
(L{xenddev.toolstack.controller.DevController.reconfigureDevice}). An empty drive
runs no script.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Mapping, Sequence

from twisted.internet.defer import Deferred
from zope.interface import implementer

from xenddev.diskspec import numberToVdev
from xenddev.driverdomain.kinds.base import (
    KernelBackendKind,
    KindContext,
    KindError,
    Outcome,
    PlugSpec,
    done,
)
from xenddev.interfaces import IDriverDomainKind, IMediumChanger
from xenddev.xenstore.paths import Perm

MODES = ("r", "w", "w!")
#: What the block script writes for a medium (its add is a no-op while
#: physical-device exists).
SCRIPT_OUTPUTS = ("physical-device", "physical-device-path", "node")
INIT_WAIT = "2"
#: Backend states past InitWait that a medium change returns to InitWait.
CONNECTING = ("3", "4")
DEVTYPES = ("disk", "cdrom")


@implementer(IDriverDomainKind, IMediumChanger)
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
        """C{phy} and C{file} targets, and empty cdrom drives."""
        if objectClass != "vdi":
            return False
        if target.get("type") == "empty":
            return target.get("format", "empty") == "empty"
        return target.get("type") in ("phy", "file") and target.get("format", "raw") == "raw"

    def _check(self, target: Mapping[str, str]) -> None:
        params = target.get("params", "")
        if target.get("mode", "w") not in MODES:
            raise KindError("EINVAL", f"mode must be one of {', '.join(MODES)}")
        if target.get("devtype", "disk") not in DEVTYPES:
            raise KindError("EINVAL", f"devtype must be one of {', '.join(DEVTYPES)}")
        if target.get("type") == "empty":
            if target.get("devtype") != "cdrom" or params:
                raise KindError("EINVAL", "only a cdrom drive may be empty (params empty)")
            return
        if not params.startswith("/"):
            raise KindError("EINVAL", f"params must be an absolute path, got {params!r}")
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
        rel, _ = self._backendFor(ctx, plug, "vbd")
        extra = {**_medium(ctx.target), "script": ctx.target.get("script", "block")}
        return done(blockBackend(ctx, plug, rel, extra))

    def change(
        self, ctx: KindContext, target: Mapping[str, str], plugs: Sequence[PlugSpec]
    ) -> Deferred[Outcome]:
        """Change a cdrom's medium (see the module docstring)."""
        if ctx.target.get("devtype") != "cdrom" or target.get("devtype") != "cdrom":
            raise KindError("EOPNOTSUPP", "only a cdrom drive's medium can be changed")
        if not self.accepts("vdi", target):
            raise KindError("ENODEV", "the blkback kind cannot serve the new medium")
        if target.get("mode", "w") != ctx.target.get("mode", "w"):
            raise KindError("EINVAL", "a medium change cannot change the mode")
        self._check(target)
        return Deferred.fromCoroutine(self._change(ctx, target, plugs))

    async def _change(
        self, ctx: KindContext, target: Mapping[str, str], plugs: Sequence[PlugSpec]
    ) -> Outcome:
        writes: dict[str, str] = {}
        removes: list[str] = []
        for plug in plugs:
            backend = plug.backend
            assert backend is not None
            if await ctx.xs.readOrNone(f"{backend}/physical-device") is not None:
                # blkback keeps serving the device it opened for as long as
                # it is bound ("changing physical device ... not
                # supported", real Xen): the toolstack unplugs the drive,
                # changes the target and plugs it again.
                raise KindError(
                    "EBUSY", "blkback cannot change the medium of a plugged drive in place"
                )
            writes.update({f"{backend}/{k}": v for k, v in _medium(target).items()})
            removes += [f"{backend}/{k}" for k in SCRIPT_OUTPUTS]
            if await ctx.xs.readOrNone(f"{backend}/state") in CONNECTING:
                writes[f"{backend}/state"] = INIT_WAIT
        return Outcome(writes=writes, removes=tuple(removes))

    def hotplugCommand(
        self, ctx: KindContext, plug: PlugSpec, action: str
    ) -> tuple[str, list[str], dict[str, str]] | None:
        """C{block add|remove} with libxl's environment; none for an empty drive."""
        from xenddev.driverdomain.hotplug import blockEnvironment

        assert plug.backend is not None
        if ctx.target.get("type") == "empty":
            return None
        script = ctx.target.get("script", "block")
        args, env = blockEnvironment(action, plug.backend, script)
        return script, args, env


def blockBackend(
    ctx: KindContext, plug: PlugSpec, relative: str, extra: Mapping[str, str]
) -> Outcome:
    """
    A blkback backend directory for C{plug} (blkback's own, or tap's on a
    tapdisk node): owned by the driver domain, readable by the guest, with
    the keys xend and libxl write for every vbd, and C{extra} (C{type},
    C{params}, ...).

    C{frontend} is left to the toolstack, which writes it in the
    transaction that creates the frontend (seed 000's "<backend>/frontend =
    <frontend> unless already set"): Linux binds a backend only on a change
    of its directory made while the frontend exists, so a backend complete
    before its frontend would never be probed (docs/protocol.md).
    """
    target = ctx.target
    dd, domu = ctx.driverDomid, plug.device.frontendDomid
    backend = ctx.paths.absolute(relative)
    values = {
        "frontend-id": str(domu),
        "online": "1",
        "state": "1",
        "removable": "1" if target.get("devtype") == "cdrom" else "0",
        "bootable": "1",
        # "w!" reaches the block script, whose canonicalise_mode turns it
        # into "skip the sharing check" (xend's forced shared write).
        "mode": target.get("mode", "w"),
        "device-type": target.get("devtype", "disk"),
        # blkback names its I/O threads after "dev" once connected; without
        # it the backend says Connected but never serves a request (seen on
        # real Xen: "get blkback dev name", error 2, and a hung guest).
        "dev": numberToVdev(plug.device.devid),
        **extra,
    }
    return Outcome(
        backend=relative,
        mkdirs={backend: [Perm("n", dd), Perm("r", domu)]},
        writes={f"{backend}/{k}": v for k, v in values.items()},
    )


def _medium(target: Mapping[str, str]) -> dict[str, str]:
    """The backend's C{type} and C{params} for a target (an empty drive: phy, "")."""
    if target.get("type") == "empty":
        return {"type": "phy", "params": ""}
    return {"type": target["type"], "params": target["params"]}
