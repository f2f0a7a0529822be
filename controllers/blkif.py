# -*- test-case-name: tests.test_controllers,tests.test_inputchecks -*-
"""
C{BlkifController}: virtual block devices (class C{vbd}).

A configuration is either xl's disk specification, C{{"spec":
"vhd:/srv/a.vhd,xvdb,w"}}, or xend's triple C{{"uname": "phy:/dev/sda",
"dev": "xvda", "mode": "w"}}; C{backend} names the driver domain (default
0). The device id is the vdev's number (xvdb = 51728).

The toolstack does not pick the backend kind: it sends the driver domain a
target (C{type} phy|file, C{params}, C{format}, C{mode}, C{devtype},
C{script}) and the driver domain's kinds decide (blkback for phy and raw
files; tapdisk2 and qemu with the blktap work), as seed 000 intends. The
seed-003 rules are still applied here to refuse what no backend can serve.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar

from twisted.internet.defer import Deferred

from xenddev.diskspec import (
    DiskError,
    DiskSpec,
    VdevError,
    chooseBackend,
    defaultStatTarget,
    numberToVdev,
    parseDiskSpec,
    parseXendDisk,
    vdevToNumber,
)
from xenddev.toolstack.activation import MODES, Claim
from xenddev.toolstack.controller import DevController, DeviceConfigError, DeviceDetails

KNOWN_KEYS = frozenset({"spec", "uname", "dev", "mode", "backend"})


class NotACdromError(DeviceConfigError):
    """
    A medium change (C{cd-insert}, C{cd-eject}) asked of a drive that is
    not a cdrom, or a cdrom drive reconfigured as something else: only a
    cdrom's medium can be changed (xend's rule). Refused before anything
    is written.
    """

    code = "not-a-cdrom"


def diskSpecFromConfig(config: Mapping[str, Any]) -> DiskSpec:
    """Parse either form of configuration (DeviceConfigError on any problem)."""
    unknown = set(config) - KNOWN_KEYS
    if unknown:
        raise DeviceConfigError(f"unknown vbd configuration key(s): {', '.join(sorted(unknown))}")
    try:
        if "spec" in config:
            if {"uname", "dev", "mode"} & set(config):
                raise DeviceConfigError("give either spec or uname/dev/mode, not both")
            return parseDiskSpec(str(config["spec"]))
        if "dev" not in config:
            raise DeviceConfigError("a vbd needs spec, or uname/dev/mode")
        return parseXendDisk(
            config.get("uname"), str(config["dev"]), str(config.get("mode") or "r")
        )
    except DiskError as e:
        raise DeviceConfigError(str(e)) from None


class BlkifController(DevController):
    """Virtual block devices (class C{vbd})."""

    deviceClass: ClassVar[str] = "vbd"
    changesMedium: ClassVar[bool] = True
    #: xm sends tap:* unames as class tap (or tap2): taken here when no
    #: blktap controller is served.
    alsoTakes: ClassVar[tuple[str, ...]] = ("tap", "tap2")

    #: Classifies a target path in the toolstack's domain (injected in tests).
    statTarget: Callable[[str], str] = staticmethod(defaultStatTarget)

    @classmethod
    def devidFromConfig(cls, config: Mapping[str, str]) -> int | str | None:
        """The vdev of xend's C{dev} (C{xvdc:cdrom}, C{ioemu:hdc}), if given."""
        dev = config.get("dev")
        if not dev:
            return None
        name = dev.removeprefix("ioemu:").split(":", 1)[0]
        try:
            return vdevToNumber(name)
        except VdevError as e:
            raise DeviceConfigError(f"invalid dev {dev!r}: {e}") from None

    @classmethod
    def deviceName(cls, devid: int) -> str | None:
        """The vdev (C{xvdb}) of a device number, if it has one."""
        try:
            return numberToVdev(devid)
        except (ValueError, VdevError):
            return None

    @classmethod
    def listingFacts(cls, devid: int) -> dict[str, str]:
        """A disk's C{vdev}."""
        name = cls.deviceName(devid)
        return {} if name is None else {"vdev": name}

    def getDeviceDetails(self, config: Mapping[str, Any]) -> DeviceDetails:
        """Validate a disk configuration into a target and frontend keys."""
        spec = diskSpecFromConfig(config)
        try:
            devid = vdevToNumber(spec.vdev)
        except VdevError as e:
            raise DeviceConfigError(str(e)) from None
        backend = backendDomid(config, spec)
        local = backend == 0
        try:
            # Refuses what no backend can serve (e.g. vhd with backendtype=phy).
            choice = chooseBackend(
                spec, statTarget=self.statTarget if local else (lambda path: "file")
            )
        except DiskError as e:
            raise DeviceConfigError(str(e)) from None
        kind = "phy" if choice.kind == "blkback" and self._isBlock(spec, local) else "file"
        if spec.isEmpty:
            kind = "empty"
        mode = "w!" if spec.sharedWrite else spec.access
        # What was checked is what is sent: a relative target is a path
        # under /dev/ (xl-disk-configuration(5)); the driver domain takes
        # absolute paths only (it answered EINVAL to target=loop0).
        path = spec.hostPath or ""
        target = {
            "type": kind,
            "params": path,
            "format": spec.format,
            "mode": mode,
            "devtype": spec.devtype,
        }
        if spec.script:
            target["script"] = spec.script
        uname = f"{'phy' if kind == 'phy' else 'file'}:{path}"
        recorded = recordedConfig(spec, uname, mode, backend, choice.kind)
        return DeviceDetails(devid, target, frontendKeys(spec, devid), backend, config=recorded)

    def activationClaim(self, details: DeviceDetails) -> Claim | None:
        """
        A disk claims its target's path (C{params}) in its mode: C{r}
        shared with readers, C{w} exclusive, C{w!} exempt (xend's shared
        write). An empty drive claims nothing. (The tap classes' targets
        have the same two keys.)
        """
        path = details.target.get("params")
        mode = MODES.get(details.target.get("mode", "r"))
        if not path or mode is None:
            return None
        return Claim(
            path,
            mode,
            self.domid,
            self.devicePath(details.devid),
            self.deviceLabel(details.devid, withClass=True),
            details.backendDomid,
        )

    def migrationConfig(self, recorded: Mapping[str, str]) -> dict[str, Any]:
        """
        The disk again from its record: xl's spec, so its format is kept
        (xend's triple has none), with its driver domain; xend's triple for
        C{w!}, which xl cannot say.
        """
        uname, dev = recorded.get("uname", ""), recorded.get("dev", "")
        mode, backend = recorded.get("mode", "r"), recorded.get("backend", "0")
        if mode == "w!":
            return {"uname": uname, "dev": dev, "mode": mode, "backend": backend}
        path = uname.split(":", 1)[1] if ":" in uname else uname
        vdev, _, devtype = dev.partition(":")
        parts = [f"vdev={vdev}", "access=" + ("ro" if mode == "r" else "rw")]
        if devtype == "cdrom":
            parts.append("devtype=cdrom")
        if path:
            parts += [f"format={recorded.get('format', 'raw')}", f"target={path}"]
        return {"spec": ", ".join(parts), "backend": backend}

    def checkReconfigure(
        self, devid: int, recorded: Mapping[str, str], details: DeviceDetails
    ) -> None:
        """xend's rule: only a cdrom's medium, same vdev, read-only."""
        device = f"Device {self.deviceLabel(devid)} of domain {self.domid}"
        if not recorded.get("dev", "").endswith(":cdrom"):
            raise NotACdromError(
                f"{device} is not a cdrom drive: only a cdrom's medium can be changed"
            )
        if details.frontend.get("device-type") != "cdrom":
            raise NotACdromError(
                f"{device} is a cdrom drive: it can only be given a new medium "
                "(devtype=cdrom), not made a disk"
            )

    def _isBlock(self, spec: DiskSpec, local: bool) -> bool:
        if "phy" in spec.legacyPrefixes or spec.backendType == "phy":
            return True
        path = spec.hostPath
        if not path:
            return False
        if local:
            return self.statTarget(path) == "block"
        return path.startswith("/dev/")

    def convertToDeviceNumber(self, devid: object) -> Deferred[int]:
        """Also accepts a vdev name: C{xvdb}, C{/dev/xvdb}, C{hda}."""
        if isinstance(devid, str) and not devid.rsplit("/", 1)[-1].isdigit():
            try:
                number = vdevToNumber(devid)
            except VdevError as e:
                raise DeviceConfigError(str(e)) from None
            d: Deferred[int] = Deferred()
            d.callback(number)
            return d
        return super().convertToDeviceNumber(devid)


def frontendKeys(spec: DiskSpec, devid: int) -> dict[str, str]:
    """The frontend keys of a disk (besides backend, backend-id, state)."""
    return {
        "virtual-device": str(devid),
        "device-type": spec.devtype,
        "trusted": "0" if spec.trusted is False else "1",
    }


def recordedConfig(
    spec: DiskSpec, uname: str, mode: str, backend: int, backendKind: str
) -> dict[str, str]:
    """What a disk's record keeps of its configuration (xend's dev/uname/mode)."""
    return {
        "dev": spec.vdev + (":cdrom" if spec.isCdrom else ""),
        "uname": uname,
        "mode": mode,
        "format": spec.format,
        "backend": str(backend),
        "backend-kind": backendKind,
    }


def backendDomid(config: Mapping[str, Any], spec: DiskSpec) -> int:
    """
    The driver domain a disk's config names (C{backend}, else the spec's,
    else dom0).

    @raise DeviceConfigError: if it is not a driver domain's id.
    """
    value = config.get("backend", spec.backendDomain if spec.backendDomain else 0)
    text = str(value)
    if not text.isascii() or not text.isdigit() or int(text) > 0x7FEF:
        raise DeviceConfigError(
            f"invalid backend {value!r}: a driver domain id (domain names are not resolved here)"
        )
    return int(text)
