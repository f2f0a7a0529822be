# -*- test-case-name: tests.test_controllers,tests.test_inputchecks -*-
"""
C{VifController}: network interfaces (class C{vif}), served through the
C{vif} objects of the backendctrl protocol (the C{netback} kind).

Configuration keys (xend's names): C{mac} (generated if absent: 00:16:3e
then three random bytes, the first below 0x80), C{bridge}, C{script}
(default C{vif-bridge}), C{ip} (one or more IPv4/IPv6 addresses, each with
an optional C{/prefix}, separated by spaces, as xl takes them), C{vifname},
C{model}, C{rate} (xend's grammar, e.g. C{10Mb/s} or C{1MB/s@20ms}, stored
as C{bytes,usecs}; at most 2**64-1 bytes per second and per interval),
C{backend} (the driver domain, default 0), C{devid} (default: the lowest
free), C{type} (xl's: C{vif}, or C{ioemu}/C{vif_ioemu} for an emulated
card beside the PV one; recorded, the backend is a PV vif either way).
"""

from __future__ import annotations

import ipaddress
import random
import re
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import attrs
from twisted.internet.defer import Deferred

from xenddev.backendctrl.protocol import VIF, ObjectClass
from xenddev.interfaces import ITransaction
from xenddev.toolstack.client import PlugResult
from xenddev.toolstack.controller import (
    DevController,
    DeviceConfigError,
    DeviceDetails,
    DeviceNotFoundError,
)
from xenddev.xenstore.paths import Perm

_MAC = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}\Z")
_IFNAME = re.compile(r"[A-Za-z0-9_.-]{1,15}\Z")
_RATE = re.compile(r"([0-9]+)([kKMG]?)([Bb])/s(?:@([0-9]+)([mu]?)s)?\Z")
_MODEL = re.compile(r"[A-Za-z0-9_-]{1,32}\Z")
#: xend's default rate-limit interval.
DEFAULT_RATE_INTERVAL_US = 50000
#: The backend's rate is two counts netback reads as unsigned longs; xl
#: refuses a rate beyond 64 bits too.
RATE_MAX = 2**64 - 1
#: Digits enough for any rate up to RATE_MAX in any unit; bounds int() on
#: hostile input (a 5000-digit number is refused, not converted).
_RATE_DIGITS = 24
#: The most the driver domain's netback kind takes in C{ip}.
IPS_MAX_LENGTH = 256
#: xl's vif types (C{type=}), and libxl's names for them.
VIF_TYPES = {"vif": "vif", "ioemu": "vif_ioemu", "vif_ioemu": "vif_ioemu"}
KNOWN_KEYS = frozenset(
    {"mac", "bridge", "script", "ip", "vifname", "model", "rate", "backend", "devid", "type"}
)


def randomMac(randbyte: Callable[[], int] = lambda: random.randrange(256)) -> str:
    """A MAC in Xen's OUI 00:16:3e; the first random byte is below 0x80 (xend)."""
    a, b, c = randbyte() & 0x7F, randbyte(), randbyte()
    return f"00:16:3e:{a:02x}:{b:02x}:{c:02x}"


def _shown(text: str, limit: int = 40) -> str:
    """A value for a message: quoted, cut short if long (hostile input can be)."""
    return repr(text) if len(text) <= limit else repr(text[:limit]) + "..."


def parseRate(text: str) -> str:
    """
    xend's rate grammar to its stored form C{"<bytes per interval>,<usecs>"}:
    C{10Mb/s} → C{"62500,50000"}.

    @raise DeviceConfigError: naming the bad value.
    """
    m = _RATE.match(text.strip())
    if m is None:
        raise DeviceConfigError(
            f"invalid rate {_shown(text)}: expected <number>[k|M|G]<B|b>/s[@<number>[m|u]s]"
        )
    number, prefix, unit, interval, intervalUnit = m.groups()
    tooBig = DeviceConfigError(
        f"invalid rate {_shown(text)}: beyond {RATE_MAX} bytes per second or per interval"
    )
    if len(number) > _RATE_DIGITS:
        raise tooBig
    if interval is not None and len(interval) > _RATE_DIGITS:
        raise DeviceConfigError(f"invalid rate {_shown(text)}: interval out of range")
    bytesPerSec = int(number) * {"": 1, "k": 1000, "K": 1000, "M": 10**6, "G": 10**9}[prefix]
    if unit == "b":
        bytesPerSec //= 8
    usecs = DEFAULT_RATE_INTERVAL_US
    if interval is not None:
        usecs = int(interval) * {"": 1000000, "m": 1000, "u": 1}[intervalUnit]
    if usecs <= 0 or usecs > 10**9:
        raise DeviceConfigError(f"invalid rate {_shown(text)}: interval out of range")
    perInterval = bytesPerSec * usecs // 1000000
    if bytesPerSec > RATE_MAX or perInterval > RATE_MAX:
        raise tooBig
    if perInterval <= 0:
        raise DeviceConfigError(f"invalid rate {_shown(text)}: less than one byte per interval")
    return f"{perInterval},{usecs}"


def parseIps(text: str) -> str:
    """
    A vif's C{ip}: one or more IPv4 or IPv6 addresses, each with an
    optional C{/prefix}, separated by spaces (xl passes the list to the
    vif-route and vif-nat scripts, which take each as an address or a
    route). Returned with single spaces.

    @raise DeviceConfigError: naming the field and the bad address.
    """
    words = text.split()
    if not words:
        raise DeviceConfigError(f"invalid ip {_shown(text)}: no address")
    for word in words:
        try:
            # A zone (fe80::1%eth0) names an interface of this host, not
            # the guest's; the scripts cannot use it.
            if "%" in word:
                raise ValueError(word)
            ipaddress.ip_interface(word)
        except ValueError:
            raise DeviceConfigError(
                f"invalid ip {_shown(text)}: {_shown(word)} is not an IPv4 or IPv6 address "
                "(with an optional /prefix)"
            ) from None
    joined = " ".join(words)
    if len(joined) > IPS_MAX_LENGTH:
        raise DeviceConfigError(
            f"invalid ip {_shown(text)}: longer than {IPS_MAX_LENGTH} characters"
        )
    return joined


def vifType(text: str) -> str:
    """
    xl's C{type}: C{vif}, or C{ioemu} (libxl's C{vif_ioemu}), as libxl
    names it.

    @raise DeviceConfigError: naming the field and the values it takes.
    """
    kind = VIF_TYPES.get(text)
    if kind is None:
        raise DeviceConfigError(
            f"invalid type {_shown(text)}: expected {', '.join(sorted(VIF_TYPES))}"
        )
    return kind


class VifController(DevController):
    """Network interfaces (class C{vif})."""

    deviceClass: ClassVar[str] = "vif"
    objectClass: ClassVar[ObjectClass] = VIF
    #: A listing reports both rings (xl network-list's tx-/rx-ring-ref).
    listedFrontendKeys: ClassVar[tuple[str, ...]] = ("tx-ring-ref", "rx-ring-ref")

    randbyte: Callable[[], int] = staticmethod(lambda: random.randrange(256))

    def getDeviceDetails(self, config: Mapping[str, Any]) -> DeviceDetails:
        """Validate a vif configuration (every field named when bad)."""
        unknown = set(config) - KNOWN_KEYS
        if unknown:
            raise DeviceConfigError(
                f"unknown vif configuration key(s): {', '.join(sorted(unknown))}"
            )
        mac = str(config.get("mac") or randomMac(self.randbyte)).lower()
        if not _MAC.match(mac):
            raise DeviceConfigError(
                f"invalid mac {config.get('mac')!r}: expected xx:xx:xx:xx:xx:xx"
            )
        if int(mac[:2], 16) & 1:
            raise DeviceConfigError(f"invalid mac {mac}: a multicast address")
        target = {"mac": mac, "script": str(config.get("script") or "vif-bridge")}
        if "/" in target["script"] or target["script"] in (".", ".."):
            raise DeviceConfigError(
                f"invalid script {target['script']!r}: a name in the script directory"
            )
        for key, pattern in (
            ("bridge", _IFNAME),
            ("vifname", _IFNAME),
            ("model", _MODEL),
        ):
            value = config.get(key)
            if value is not None and value != "":
                if not pattern.match(str(value)):
                    raise DeviceConfigError(f"invalid {key} {value!r}")
                target[key] = str(value)
        ip, typ = config.get("ip"), config.get("type")
        if ip is not None and ip != "":
            target["ip"] = parseIps(str(ip))
        if config.get("rate"):
            target["rate"] = parseRate(str(config["rate"]))
        kind = vifType(str(typ)) if typ is not None and typ != "" else None
        backend = _int(config.get("backend", 0), "backend")
        devid = _int(config.get("devid", -1), "devid")
        if devid < -1 or devid > 0xFFFF:
            raise DeviceConfigError(f"invalid devid {devid}: 0..65535")
        model = target.pop("model", None)
        frontend = {"mac": mac, "handle": str(devid)}
        recorded = {**target, "backend": str(backend)}
        if model is not None:
            recorded["model"] = model
        if kind is not None:
            recorded["type"] = kind
        return DeviceDetails(devid, target, frontend, backend, config=recorded)

    async def _writeFrontend(
        self, tx: ITransaction, details: DeviceDetails, plug: PlugResult, backendReady: bool
    ) -> None:
        await super()._writeFrontend(tx, details, plug, backendReady)
        # The vif hotplug script writes the bridge's MTU into the frontend
        # (<frontend>/mtu, xen-network-common.sh's set_mtu). In dom0 it is
        # privileged; in a driver domain it may only write what it is
        # granted: real xenstored refused it and the vif failed.
        mtu = f"{plug.frontendPath}/mtu"
        await tx.write(mtu, "")
        await tx.setPerms(mtu, [Perm("n", self.domid), Perm("b", plug.driverDomid)])

    @classmethod
    def devidFromConfig(cls, config: Mapping[str, str]) -> int | str | None:
        """The C{devid} of the configuration, else its C{mac} (looked up)."""
        for key in ("devid", "mac"):
            if config.get(key):
                return config[key]
        return None

    def listingHandle(self, devid: int) -> int:
        """xl network-list's C{handle} column is the device id."""
        return devid

    def convertToDeviceNumber(self, devid: object) -> Deferred[int]:
        """Also accepts a MAC address, looked up in the records."""
        if isinstance(devid, str) and _MAC.match(devid.lower()):
            mac = devid.lower()

            async def find() -> int:
                for number in await self.deviceIDs():
                    cfg = await self.getDeviceConfiguration(number)
                    if cfg.get("mac") == mac:
                        return number
                raise DeviceNotFoundError(f"no vif with mac {mac}")

            return Deferred.fromCoroutine(find())
        return super().convertToDeviceNumber(devid)

    def withDevid(self, details: DeviceDetails, devid: int) -> DeviceDetails:
        """The frontend's C{handle} is the device id."""
        return attrs.evolve(
            details, devid=devid, frontend={**details.frontend, "handle": str(devid)}
        )


def _int(value: object, field: str) -> int:
    if isinstance(value, bool):
        raise DeviceConfigError(f"invalid {field} {value!r}")
    try:
        return int(str(value), 10)
    except ValueError:
        raise DeviceConfigError(f"invalid {field} {value!r}: not an integer") from None
