# -*- test-case-name: tests.test_diskspec -*-
"""
Disk specifications: xl's C{DISKSPEC} strings, xend's C{uname}/C{dev}/C{mode}
triples, virtual device names and numbers, and the choice of a block backend.

Everything here is pure (no I/O except the default L{defaultStatTarget}, which
callers replace in tests) and needs no reactor.

Sources of the facts (our own code; nothing is copied):

  - C{xl-disk-configuration(5)}: the grammar, defaults, deprecated prefixes
    and the error form C{config parsing error in disk specification: <msg>:
    near `<tok>' in `<spec>'} (the C{near} part is absent when no token is at
    fault, as in xl's C{no vdev specified}).
  - C{xen-vbd-interface(7)}: the vdev encodings and their limits.
  - Seed 003 (the xl disk configuration text of 2011): the backend per format.
  - Seed 001 and xend's controllers: C{tap:}/C{tap2:} device classes and the
    fallback to the deprecated blktap1 driver.

Decisions where the documents are silent or where xl's parser disagrees with
its own manual (the manual wins unless noted):

  1. Every parameter may be given once.  A second non-empty value is an error
     (C{"<name> respecified"}); an empty value means "default": it may be
     overwritten and never conflicts, whatever the order.  A parameter given
     by name, even empty, leaves the positional sequence.  Enumerated values
     and flags may be repeated with the I{same} value (as xl's parser
     allows), but a contradiction (C{discard,no-discard},
     C{cdrom,devtype=disk}, C{access=r,access=w}) is C{respecified}.  xl lets
     the last flag win and never checks C{access}; we refuse.
  2. Whitespace (space, tab, newline) before a parameter is ignored (manual);
     whitespace after a parameter and before the next comma is ignored too,
     except in C{target=} which keeps everything.  A single trailing comma
     after C{target=...} is dropped, as xl does.
  3. The deprecated positional syntax C{<target>,<vdev>[:<devtype>],<access>}
     is recognised even without a prefix when the second positional parameter
     is not a format but is a valid vdev (C{/img,hda,w}, C{/iso,hdc:cdrom,r});
     xl rejects those with C{unknown value for format} although its manual and
     seed 003 document them.  The empty cdrom C{,hdc:cdrom,r} is the special
     case the manual lists.
  4. Deprecated prefixes are recognised at the start of any parameter (as in
     xl) and may be stacked.  A lowercase word followed by C{:} and then by
     the end or a character other than C{[a-z0-9]} is an unknown prefix.
  5. An empty target (C{,,hda}) counts as no target: only a cdrom may lack one
     (xl accepts the empty string and fails later in libxl).
  6. A cdrom is always read-only (xl forces it even over C{access=rw}); a
     cdrom without target is an empty drive with format C{empty}.
  7. The vdev is validated while parsing (L{vdevToNumber}); xl defers that to
     libxl.  C{format=empty} is accepted (xl does) but only for an empty cdrom.
  8. vdev numbers: a bare number may be decimal, C{0x} hexadecimal or C{0}
     octal (xen-vbd-interface(7)), at most C{2**31 - 1}.  A letter-form
     partition may not start with C{0} (so C{xvda0} is refused, as libxl
     does); in the C{d<N>p<M>} form C{p0} is allowed (the manual's C{d0p0})
     but C{01} is not; C{d<N>} alone means partition 0 (the manual's C{d0}).
     sd is limited to disks a-p and partitions 0-15, hd to disks a-d and
     partitions 0-63; the Linux-specific encodings beyond are deprecated by
     the spec and refused.  A C{/dev/} prefix is accepted.
  9. Backend choice: see L{chooseBackend}.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Callable, Collection, Iterable
from typing import Any, Final

import attrs

from xenddev.errors import FaultCode, XenddevError

__all__ = [
    "BACKEND_BLKBACK",
    "BACKEND_BLKTAP1",
    "BACKEND_QEMU",
    "BACKEND_STANDALONE",
    "BACKEND_TAPDISK2",
    "BLKTAP1_ONLY_TYPES",
    "BLKTAP2_TYPES",
    "BLKTAP_TYPES",
    "DEFAULT_AVAILABLE",
    "FORMATS",
    "LEGACY_PREFIXES",
    "MAX_DEVICE_NUMBER",
    "BackendChoice",
    "BackendUnavailable",
    "DiskError",
    "DiskSpec",
    "DiskSpecError",
    "VdevError",
    "VirtualDevice",
    "blktapDiskType",
    "chooseBackend",
    "decodeVdev",
    "defaultStatTarget",
    "numberToVdev",
    "parseDiskSpec",
    "parseXendDisk",
    "vdevToNumber",
    "xendDeviceClass",
]


# ---------------------------------------------------------------------------
# Errors


class DiskError(XenddevError, ValueError):
    """
    Base of the disk configuration errors (L{DiskSpecError},
    L{BackendUnavailable}).

    @ivar message: the problem, without context.
    """

    faultCode = FaultCode.BAD_CONFIG

    message: str

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class DiskSpecError(DiskError):
    """
    A disk specification could not be parsed.

    C{str()} is exactly xl's form::

        config parsing error in disk specification: <msg>: near `<tok>' in `<spec>'

    without the C{: near `<tok>'} part when no token is at fault.

    @ivar message: xl's message (C{"unknown parameter"}, C{"vdev respecified"}...).
    @ivar token: the offending piece of text, or L{None}.
    @ivar spec: the whole specification.
    """

    token: str | None
    spec: str

    def __init__(self, message: str, token: str | None, spec: str) -> None:
        super().__init__(message)
        self.token = token
        self.spec = spec

    def __str__(self) -> str:
        near = "" if self.token is None else f": near `{self.token}'"
        return f"config parsing error in disk specification: {self.message}{near} in `{self.spec}'"

    def __repr__(self) -> str:
        return f"DiskSpecError({self.message!r}, {self.token!r}, {self.spec!r})"


class VdevError(XenddevError, ValueError):
    """
    A virtual device name or number is invalid or beyond a documented limit.
    The message names the problem.
    """

    faultCode = FaultCode.BAD_CONFIG


class BackendUnavailable(DiskError):
    """
    No available backend can serve a disk, or an explicitly requested backend
    cannot serve it.

    @ivar spec: the disk.
    @ivar kind: the backend that would have been needed, or L{None} when
        nothing could serve the disk at all.
    """

    spec: DiskSpec
    kind: str | None

    def __init__(self, message: str, spec: DiskSpec, kind: str | None = None) -> None:
        super().__init__(message)
        self.spec = spec
        self.kind = kind

    def __str__(self) -> str:
        return f"disk vdev={self.spec.vdev}: {self.message}"


# ---------------------------------------------------------------------------
# Constants

FORMATS: Final = frozenset({"raw", "qcow", "qcow2", "vhd", "qed", "empty", "vmdk"})
"""Every value of L{DiskSpec.format}; C{vmdk} only comes from xend's C{tap:vmdk:}."""

XL_FORMATS: Final = frozenset({"raw", "qcow", "qcow2", "vhd", "qed", "empty"})
"""The formats xl's C{format=} accepts."""

BACKEND_TYPES: Final = frozenset({"phy", "tap", "qdisk", "standalone"})
SPECIFICATIONS: Final = frozenset({"xen", "virtio"})

FORMAT_PREFIXES: Final = frozenset({"raw", "qcow", "qcow2", "vhd"})
SCRIPT_PREFIXES: Final = frozenset({"iscsi", "nbd", "enbd", "drbd"})
IGNORED_PREFIXES: Final = frozenset({"tapdisk", "tap", "tap2", "aio", "ioemu", "file", "phy"})
LEGACY_PREFIXES: Final = FORMAT_PREFIXES | SCRIPT_PREFIXES | IGNORED_PREFIXES
"""The deprecated C{<word>:} prefixes xl accepts."""

BLKTAP_TYPES: Final = frozenset(
    {"aio", "sync", "vmdk", "ram", "qcow", "qcow2", "ioemu", "vhd", "remus"}
)
"""blktap driver types accepted after xend's C{tap:}/C{tap2:}."""
BLKTAP2_TYPES: Final = frozenset({"aio", "ram", "qcow", "vhd", "remus"})
"""Types tapdisk2 (blktap2) serves."""
BLKTAP1_ONLY_TYPES: Final = BLKTAP_TYPES - BLKTAP2_TYPES
"""Types that need the deprecated blktap1 driver (seed 001: ioemu qcow2 vmdk sync)."""

XEND_SCRIPT_TYPES: Final = SCRIPT_PREFIXES
"""xend C{uname} types served by a C{block-<type>} script."""

BACKEND_BLKBACK: Final = "blkback"
BACKEND_TAPDISK2: Final = "tapdisk2"
BACKEND_QEMU: Final = "qemu"
BACKEND_BLKTAP1: Final = "blktap1"
BACKEND_STANDALONE: Final = "standalone"
DEFAULT_AVAILABLE: Final = frozenset({BACKEND_BLKBACK, BACKEND_TAPDISK2, BACKEND_QEMU})

_TAP_FORMATS: Final = {"qcow": "qcow", "qcow2": "qcow2", "vhd": "vhd", "vmdk": "vmdk"}
_LOCAL_DOMAINS: Final = frozenset({"0", "Domain-0"})

# ---------------------------------------------------------------------------
# Virtual devices

MAX_DEVICE_NUMBER: Final = (1 << 31) - 1
"""The largest bare number accepted as a vdev (libxl's C{INT_MAX})."""

XVD_MAX_DISK: Final = (1 << 20) - 1
XVD_MAX_PARTITION: Final = 255
XVD_SHORT_MAX: Final = 15
HD_MAX_DISK: Final = 3
HD_MAX_PARTITION: Final = 63
SD_MAX_DISK: Final = 15
SD_MAX_PARTITION: Final = 15

_XVD_SHORT_BASE: Final = 202 << 8
_XVD_LONG_BASE: Final = 1 << 28
_SD_BASE: Final = 8 << 8
_HD_BASE_LOW: Final = 3 << 8
_HD_BASE_HIGH: Final = 22 << 8

_LIMITS: Final = {
    "xvd": (XVD_MAX_DISK, XVD_MAX_PARTITION),
    "hd": (HD_MAX_DISK, HD_MAX_PARTITION),
    "sd": (SD_MAX_DISK, SD_MAX_PARTITION),
}

_NAME_RE: Final = re.compile(r"(xvd|hd|sd)([a-z]+)([0-9]*)")
_DFORM_RE: Final = re.compile(r"d([0-9]+)(?:p([0-9]+))?")
_NUMBER_RE: Final = re.compile(r"0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*")
_MAX_DIGITS: Final = 12  # more digits than any limit; guards int() against huge strings


@attrs.frozen
class VirtualDevice:
    """
    A decoded vdev.

    @ivar kind: C{"xvd"} (also for the C{d<N>p<M>} form), C{"hd"}, C{"sd"}, or
        C{"number"} for a bare number.
    @ivar disk: the disk index (L{None} for a bare number).
    @ivar partition: the partition, 0 for the whole disk (L{None} for a bare
        number).
    @ivar number: the C{virtual-device} value written to XenStore.
    """

    kind: str
    disk: int | None
    partition: int | None
    number: int


def _decodeLetters(name: str, kind: str, letters: str, maxDisk: int) -> int:
    """
    Decode bijective base-26 drive letters (a=0 ... z=25, aa=26).

    @raise VdevError: beyond C{maxDisk}.
    """
    index = -1
    for char in letters:
        index = (index + 1) * 26 + (ord(char) - ord("a"))
        if index > maxDisk:
            raise VdevError(
                f"{kind} disk index of {name!r} exceeds {maxDisk}, "
                f"{kind}{_encodeLetters(maxDisk)} being the last"
            )
    return index


def _encodeLetters(index: int) -> str:
    """The bijective base-26 letters for a disk index (0 -> a, 26 -> aa)."""
    letters = []
    index += 1
    while index > 0:
        index, rest = divmod(index - 1, 26)
        letters.append(chr(ord("a") + rest))
    return "".join(reversed(letters))


def _decimal(name: str, what: str, digits: str, limit: int, allowZero: bool) -> int:
    """
    Decode a partition or disk number written in decimal.

    @param allowZero: whether a lone C{"0"} is acceptable.
    @raise VdevError: leading zero, or beyond C{limit}.
    """
    if digits.startswith("0") and (len(digits) > 1 or not allowZero):
        raise VdevError(f"{what} number {digits!r} in {name!r} has a leading zero")
    if len(digits) > _MAX_DIGITS or int(digits) > limit:
        raise VdevError(f"{what} number {digits} in {name!r} exceeds {limit}")
    return int(digits)


def _xvdNumber(disk: int, partition: int) -> int:
    if disk <= XVD_SHORT_MAX and partition <= XVD_SHORT_MAX:
        return _XVD_SHORT_BASE | (disk << 4) | partition
    return _XVD_LONG_BASE | (disk << 8) | partition


def decodeVdev(name: str) -> VirtualDevice:
    """
    Decode a vdev: C{xvd<letters>[<part>]}, C{hd...}, C{sd...},
    C{d<N>[p<M>]}, or a bare number (decimal, C{0x} hex, C{0} octal); an
    optional C{/dev/} prefix is ignored.

    @raise VdevError: unrecognised, or beyond a limit of xen-vbd-interface(7).
    """
    if not isinstance(name, str):
        raise VdevError(f"vdev must be a string, not {type(name).__name__}")
    text = name[5:] if name.startswith("/dev/") else name
    if not text:
        raise VdevError(f"empty vdev {name!r}")
    match = _NAME_RE.fullmatch(text)
    if match is not None:
        kind, letters, digits = match.groups()
        maxDisk, maxPartition = _LIMITS[kind]
        disk = _decodeLetters(name, kind, letters, maxDisk)
        partition = _decimal(name, "partition", digits, maxPartition, False) if digits else 0
        if kind == "xvd":
            number = _xvdNumber(disk, partition)
        elif kind == "sd":
            number = _SD_BASE | (disk << 4) | partition
        elif disk < 2:
            number = _HD_BASE_LOW | (disk << 6) | partition
        else:
            number = _HD_BASE_HIGH | ((disk - 2) << 6) | partition
        return VirtualDevice(kind, disk, partition, number)
    match = _DFORM_RE.fullmatch(text)
    if match is not None:
        diskDigits, partDigits = match.groups()
        disk = _decimal(name, "disk", diskDigits, XVD_MAX_DISK, True)
        partition = 0
        if partDigits is not None:
            partition = _decimal(name, "partition", partDigits, XVD_MAX_PARTITION, True)
        return VirtualDevice("xvd", disk, partition, _xvdNumber(disk, partition))
    if _NUMBER_RE.fullmatch(text):
        if len(text) > 2 * _MAX_DIGITS:
            raise VdevError(f"device number {text!r} exceeds {MAX_DEVICE_NUMBER}")
        number = int(text, 0) if not text.startswith("0") or len(text) == 1 else _prefixed(text)
        if number > MAX_DEVICE_NUMBER:
            raise VdevError(f"device number {text} exceeds {MAX_DEVICE_NUMBER}")
        return VirtualDevice("number", None, None, number)
    raise VdevError(f"unrecognised vdev {name!r} (expected xvd*, hd*, sd*, d<N>p<M> or a number)")


def _prefixed(text: str) -> int:
    """Decode C{0x...} (hex) or C{0...} (octal)."""
    if text[1] in "xX":
        return int(text[2:], 16)
    return int(text[1:], 8)


def vdevToNumber(name: str) -> int:
    """
    The C{virtual-device} number of a vdev, e.g. C{xvda} -> 51712,
    C{xvdq} -> 268439552, C{hdc} -> 5632, C{sda} -> 2048.

    @raise VdevError: see L{decodeVdev}.
    """
    return decodeVdev(name).number


def numberToVdev(n: int, style: str = "xvd") -> str:
    """
    The canonical name of a C{virtual-device} number: the inverse of
    L{vdevToNumber} for every number it accepts.

    Numbers of the xvd encodings are named C{xvd<letters>[<part>]} (or
    C{d<N>[p<M>]} with C{style="d"}); hd and sd numbers C{hd...}/C{sd...};
    any other number, including the 1<<28 form of a disk and partition that
    fit the short 202<<8 form, is written in decimal.

    @raise VdevError: not an integer, negative, beyond L{MAX_DEVICE_NUMBER},
        or an unknown C{style}.
    """
    if style not in ("xvd", "d"):
        raise VdevError(f"unknown vdev naming style {style!r} (expected 'xvd' or 'd')")
    if not isinstance(n, int) or isinstance(n, bool):
        raise VdevError(f"device number must be an int, not {type(n).__name__}")
    if n < 0 or n > MAX_DEVICE_NUMBER:
        raise VdevError(f"device number {n} outside 0..{MAX_DEVICE_NUMBER}")
    if _XVD_SHORT_BASE <= n < _XVD_SHORT_BASE + 256:
        return _xvdName((n >> 4) & 0xF, n & 0xF, style)
    if _XVD_LONG_BASE <= n < 2 * _XVD_LONG_BASE:
        disk, partition = (n >> 8) & XVD_MAX_DISK, n & 0xFF
        if disk <= XVD_SHORT_MAX and partition <= XVD_SHORT_MAX:
            return str(n)
        return _xvdName(disk, partition, style)
    if _SD_BASE <= n < _SD_BASE + 256:
        return _letterName("sd", (n >> 4) & 0xF, n & 0xF)
    if _HD_BASE_LOW <= n < _HD_BASE_LOW + 128:
        return _letterName("hd", (n >> 6) & 1, n & 63)
    if _HD_BASE_HIGH <= n < _HD_BASE_HIGH + 128:
        return _letterName("hd", 2 + ((n >> 6) & 1), n & 63)
    return str(n)


def _letterName(prefix: str, disk: int, partition: int) -> str:
    return prefix + _encodeLetters(disk) + (str(partition) if partition else "")


def _xvdName(disk: int, partition: int, style: str) -> str:
    if style == "d":
        return f"d{disk}" + (f"p{partition}" if partition else "")
    return _letterName("xvd", disk, partition)


# ---------------------------------------------------------------------------
# The disk specification value


def _oneOf(allowed: Collection[str | None]) -> Callable[[Any, Any, Any], None]:
    """An attrs validator: the value must be one of C{allowed}."""

    def check(instance: object, attribute: Any, value: object) -> None:
        if value not in allowed:
            raise ValueError(
                f"{attribute.name} must be one of {sorted(map(str, allowed))}: {value!r}"
            )

    return check


def _prefixTuple(prefixes: Iterable[str]) -> tuple[str, ...]:
    """Converter for L{DiskSpec.legacyPrefixes}."""
    return tuple(prefixes)


@attrs.frozen(kw_only=True)
class DiskSpec:
    """
    A parsed disk specification (xl's or xend's).

    @ivar vdev: the virtual device as written (see L{vdevToNumber}).
    @ivar target: the block device, image file or script argument; L{None}
        for an empty cdrom drive.
    @ivar format: C{raw}, C{qcow}, C{qcow2}, C{vhd}, C{qed}, C{empty} (an
        empty cdrom) or C{vmdk} (xend's C{tap:vmdk:} only).
    @ivar access: C{"r"} or C{"w"}.
    @ivar sharedWrite: xend's C{w!}: writable and exempt from the sharing check.
    @ivar devtype: C{"disk"} or C{"cdrom"}.
    @ivar backendDomain: the backend domain's name or id as given, L{None}
        for the default (dom0).
    @ivar backendType: C{phy}, C{tap}, C{qdisk}, C{standalone} or L{None}
        (choose automatically, see L{chooseBackend}).
    @ivar script: the hotplug script (C{block-iscsi} for C{iscsi:}).
    @ivar directIoSafe: C{direct-io-safe} was given.
    @ivar discard: C{discard} (True), C{no-discard} (False) or default (None).
    @ivar trusted: C{trusted} (True), C{untrusted} (False) or default (None).
    @ivar specification: C{xen}, C{virtio} or default (None).
    @ivar grantUsage: C{grant_usage=1|0} or default (None).
    @ivar colo: C{colo}/C{no-colo} or default (None); and the COLO settings.
    @ivar legacyPrefixes: the deprecated prefixes seen, in order, without
        their colon (C{("tap2", "tapdisk", "vhd")}); for xend's form also the
        C{uname} type, the blktap type and C{ioemu} from C{dev}.
    @ivar tapType: the blktap driver type written right after C{tap:} or
        C{tap2:} (and an optional C{tapdisk:}) in the same parameter, e.g.
        C{aio} for C{tap:aio:/x}; L{None} otherwise.  See L{blktapDiskType}.
    """

    vdev: str = attrs.field(validator=attrs.validators.instance_of(str))
    target: str | None = None
    format: str = attrs.field(default="raw", validator=_oneOf(FORMATS))
    access: str = attrs.field(default="w", validator=_oneOf({"r", "w"}))
    sharedWrite: bool = False
    devtype: str = attrs.field(default="disk", validator=_oneOf({"disk", "cdrom"}))
    backendDomain: str | None = None
    backendType: str | None = attrs.field(default=None, validator=_oneOf({None, *BACKEND_TYPES}))
    script: str | None = None
    directIoSafe: bool = False
    discard: bool | None = None
    trusted: bool | None = None
    specification: str | None = attrs.field(default=None, validator=_oneOf({None, *SPECIFICATIONS}))
    grantUsage: bool | None = None
    colo: bool | None = None
    coloHost: str | None = None
    coloPort: int | None = None
    coloExport: str | None = None
    activeDisk: str | None = None
    hiddenDisk: str | None = None
    legacyPrefixes: tuple[str, ...] = attrs.field(default=(), converter=_prefixTuple)
    tapType: str | None = attrs.field(default=None, validator=_oneOf({None, *BLKTAP_TYPES}))

    def __attrs_post_init__(self) -> None:
        if self.sharedWrite and self.access != "w":
            raise ValueError("sharedWrite (w!) needs access 'w'")
        if self.isCdrom and self.access != "r":
            raise ValueError("a cdrom is read-only")
        if (self.format == "empty") != self.isEmpty:
            raise ValueError("format 'empty' is exactly an empty cdrom drive")

    @property
    def readOnly(self) -> bool:
        """Whether the guest gets the disk read-only."""
        return self.access == "r"

    @property
    def isCdrom(self) -> bool:
        """Whether this is a (removable) cdrom drive."""
        return self.devtype == "cdrom"

    @property
    def isEmpty(self) -> bool:
        """Whether this is a cdrom drive without medium."""
        return self.isCdrom and not self.target

    @property
    def devid(self) -> int:
        """
        The C{virtual-device} number (the device id in XenStore paths).

        @raise VdevError: for a vdev L{parseDiskSpec} would have refused.
        """
        return vdevToNumber(self.vdev)

    @property
    def hostPath(self) -> str | None:
        """
        The target as a path in the backend domain: C{/dev/} is prepended to a
        relative target (xl-disk-configuration(5)).  A script's target is not
        a path and is returned unchanged; L{None} when there is no target.
        """
        if not self.target:
            return None
        if self.script is not None or self.target.startswith("/"):
            return self.target
        return "/dev/" + self.target

    def toXl(self) -> str:
        """
        This disk in xl's keyword syntax (C{target=} last), such that
        C{parseDiskSpec(spec.toXl())} equals this spec without its
        L{legacyPrefixes} and L{tapType}.

        @raise ValueError: for what xl cannot express: C{w!}, format C{vmdk},
            a value with a comma or surrounding whitespace, a target ending
            in a comma.
        """
        if self.sharedWrite:
            raise ValueError("xl has no shared-write (w!) access")
        if self.format not in XL_FORMATS:
            raise ValueError(f"xl has no format {self.format}")
        parts = [f"vdev={self.vdev}"]
        if self.format != "empty":
            parts.append(f"format={self.format}")
        parts.append("access=" + ("ro" if self.readOnly else "rw"))
        if self.isCdrom:
            parts.append("devtype=cdrom")
        strings = [
            ("backend", self.backendDomain),
            ("backendtype", self.backendType),
            ("script", self.script),
            ("specification", self.specification),
            ("colo-host", self.coloHost),
            ("colo-export", self.coloExport),
            ("active-disk", self.activeDisk),
            ("hidden-disk", self.hiddenDisk),
        ]
        if self.coloPort is not None:
            strings.append(("colo-port", str(self.coloPort)))
        if self.grantUsage is not None:
            strings.append(("grant_usage", "1" if self.grantUsage else "0"))
        for key, value in strings:
            if value is not None:
                parts.append(f"{key}={value}")
        if self.directIoSafe:
            parts.append("direct-io-safe")
        for flag, (yes, no) in (
            (self.discard, ("discard", "no-discard")),
            (self.trusted, ("trusted", "untrusted")),
            (self.colo, ("colo", "no-colo")),
        ):
            if flag is not None:
                parts.append(yes if flag else no)
        for part in parts:
            value = part.partition("=")[2] if "=" in part else part
            if not value or "," in value or value != value.rstrip(_WS):
                raise ValueError(f"xl cannot express the parameter {part!r}")
        if self.target:
            if self.target.endswith(","):
                raise ValueError("xl cannot express a target ending in a comma")
            parts.append(f"target={self.target}")
        return ",".join(parts)


# ---------------------------------------------------------------------------
# xl's syntax

_WS: Final = " \t\n"
_LOWER: Final = frozenset("abcdefghijklmnopqrstuvwxyz")
_ALNUM: Final = _LOWER | frozenset("0123456789")
_KEY_RE: Final = re.compile(r"[a-z][-a-z0-9_]*")
_POSITIONAL: Final = ("target", "format", "vdev", "access")
_ACCESS: Final = {"r": "r", "ro": "r", "w": "w", "rw": "w"}
_FLAGS: Final = {
    "cdrom": ("devtype", "cdrom"),
    "direct-io-safe": ("directIoSafe", True),
    "discard": ("discard", True),
    "no-discard": ("discard", False),
    "trusted": ("trusted", True),
    "untrusted": ("trusted", False),
    "colo": ("colo", True),
    "no-colo": ("colo", False),
}
_STRING_KEYS: Final = frozenset(
    {"vdev", "backend", "script", "colo-host", "colo-export", "active-disk", "hidden-disk"}
)
_ENUM_KEYS: Final = {
    "backendtype": BACKEND_TYPES,
    "specification": SPECIFICATIONS,
}


class _XlParser:
    """
    One parse of an xl C{DISKSPEC}.  Values are kept by parameter name in
    L{values} (enumerations already canonical; strings possibly empty);
    L{mentioned} holds every parameter given at all (even empty), which
    removes it from the positional sequence.
    """

    def __init__(self, spec: str) -> None:
        self.spec = spec
        self.values: dict[str, object] = {}
        self.mentioned: set[str] = set()
        self.prefixes: list[str] = []
        self.chain: list[str] = []
        self.tapType: str | None = None
        self.deprecatedSyntax = False

    def error(self, message: str, token: str | None) -> DiskSpecError:
        """An error about C{token} in this spec."""
        return DiskSpecError(message, token, self.spec)

    # -- setters ------------------------------------------------------------

    def setString(self, name: str, value: str) -> None:
        """
        A string parameter: a second non-empty value is an error; an empty
        value (the default) never conflicts.
        """
        self.mentioned.add(name)
        if not value:
            self.values.setdefault(name, "")
            return
        if self.values.get(name):
            raise self.error(f"{name} respecified", value)
        self.values[name] = value

    def setEnum(self, name: str, value: object, token: str) -> None:
        """
        An enumerated parameter or flag (L{None} = empty = default): the same
        value again is fine, a different one is an error.
        """
        self.mentioned.add(name)
        if value is None:
            return
        current = self.values.get(name)
        if current is not None and current != value:
            raise self.error(f"{name} respecified", token)
        self.values[name] = value

    def setFormat(self, value: str) -> None:
        """C{format}: one of L{XL_FORMATS}, or empty."""
        if value and value not in XL_FORMATS:
            raise self.error("unknown value for format", value)
        self.setEnum("format", value or None, value)

    def setAccess(self, value: str) -> None:
        """C{access}: C{ro}, C{r}, C{rw}, C{w}, or empty."""
        if value and value not in _ACCESS:
            raise self.error("unknown value for access", value)
        self.setEnum("access", _ACCESS.get(value), value)

    def setVdevAndDevtype(self, token: str) -> None:
        """A positional vdev, possibly C{<vdev>:<devtype>} (deprecated)."""
        vdev, colon, devtype = token.rpartition(":")
        if not colon:
            self.setString("vdev", token)
            return
        self.setString("vdev", vdev)
        if devtype not in ("cdrom", "disk"):
            raise self.error("unknown deprecated type", devtype)
        self.setEnum("devtype", devtype, token)

    # -- keys, flags, prefixes, positionals ----------------------------------

    def keyword(self, key: str, value: str, token: str) -> bool:
        """Handle C{key=value}; False if the key is unknown."""
        if key == "format":
            self.setFormat(value)
        elif key == "access":
            self.setAccess(value)
        elif key == "devtype":
            if value and value not in ("cdrom", "disk"):
                raise self.error("unknown value for type", token)
            self.setEnum("devtype", value or None, token)
        elif key in _STRING_KEYS:
            self.setString(key, value)
        elif key in _ENUM_KEYS:
            if value and value not in _ENUM_KEYS[key]:
                raise self.error(f"unknown value for {key}", value)
            self.setEnum(key, value or None, value)
        elif key == "grant_usage":
            if value not in ("", "0", "1"):
                raise self.error("unknown value for grant_usage", value)
            self.setEnum(key, None if not value else value == "1", value)
        elif key == "colo-port":
            port = int(value) if value.isascii() and value.isdigit() and len(value) < 6 else 0
            if value and not 0 < port < 65536:
                raise self.error("unknown value for colo_port", value)
            self.setEnum(key, port or None, value)
        else:
            return False
        return True

    def prefix(self, word: str) -> None:
        """Apply the deprecated prefix C{<word>:}."""
        self.prefixes.append(word)
        self.chain.append(word)
        if self.tapType is None and word in BLKTAP_TYPES:
            before = [p for p in self.chain[:-1] if p != "tapdisk"]
            if before and before[-1] in ("tap", "tap2"):
                self.tapType = word
        self.deprecatedSyntax = True
        if word in FORMAT_PREFIXES:
            self.setEnum("format", word, word)
        elif word in SCRIPT_PREFIXES:
            self.setString("script", "block-" + word)

    def positional(self, token: str) -> None:
        """Assign C{token} to the first positional parameter not yet given."""
        for slot in _POSITIONAL:
            if slot in self.mentioned or (slot == "format" and self.deprecatedSyntax):
                continue
            break
        else:
            raise self.error("too many positional parameters", token)
        if slot == "target":
            self.setString("target", token)
        elif slot == "format":
            if token not in XL_FORMATS and _isVdevLike(token):
                # The deprecated <target>,<vdev>[:<devtype>],<access> syntax.
                self.deprecatedSyntax = True
                self.setVdevAndDevtype(token)
            else:
                self.setFormat(token)
        elif slot == "vdev":
            self.setVdevAndDevtype(token)
        else:
            self.setAccess(token)

    def parameter(self, start: int, end: int) -> None:
        """Handle the parameter C{spec[start:end]} (no comma, no leading space)."""
        token = self.spec[start:end].rstrip(_WS)
        key, equals, value = token.partition("=")
        if equals:
            if self.keyword(key, value, token):
                return
            if _KEY_RE.fullmatch(key):
                raise self.error("unknown parameter", token)
            raise self.error("bad disk syntax", self.spec[start + len(key) :])
        flag = _FLAGS.get(token)
        if flag is not None:
            self.setEnum(flag[0], flag[1], token)
        else:
            self.positional(token)

    def prefixAt(self, pos: int) -> int | None:
        """
        If a deprecated prefix starts at C{pos}, apply it and return the
        position after its colon.

        @raise DiskSpecError: an unknown prefix.
        """
        spec = self.spec
        if pos >= len(spec) or spec[pos] not in _LOWER:
            return None
        end = pos + 1
        while end < len(spec) and spec[end] in _ALNUM:
            end += 1
        if end >= len(spec) or spec[end] != ":":
            return None
        word = spec[pos:end]
        if word in LEGACY_PREFIXES:
            self.prefix(word)
            return end + 1
        if end + 1 == len(spec) or spec[end + 1] not in _ALNUM:
            raise self.error("unknown deprecated disk prefix", spec[pos : end + 1])
        return None

    # -- driver ----------------------------------------------------------------

    def parse(self) -> DiskSpec:
        spec = self.spec
        pos = 0
        while pos < len(spec):
            while pos < len(spec) and spec[pos] in _WS:
                pos += 1
            if pos >= len(spec):
                break
            afterPrefix = self.prefixAt(pos)
            if afterPrefix is not None:
                pos = afterPrefix
                continue
            if spec.startswith("target=", pos):
                value = spec[pos + len("target=") :]
                self.setString("target", value[:-1] if value.endswith(",") else value)
                break
            comma = spec.find(",", pos)
            end = len(spec) if comma < 0 else comma
            self.parameter(pos, end)
            self.chain = []
            pos = end + 1
        return self.finish()

    def finish(self) -> DiskSpec:
        values = self.values
        vdev = str(values.get("vdev") or "")
        target = str(values.get("target") or "") or None
        devtype = str(values.get("devtype") or "disk")
        fmt = str(values.get("format") or "raw")
        cdrom = devtype == "cdrom"
        if not vdev:
            raise self.error("no vdev specified", None)
        if target is None and not cdrom:
            raise self.error("no target specified (and device not removable)", None)
        if fmt == "empty" and target is not None:
            raise self.error("format empty is only valid for an empty cdrom", "empty")
        try:
            vdevToNumber(vdev)
        except VdevError as e:
            raise self.error(f"invalid vdev: {e}", vdev) from e
        if cdrom and target is None:
            fmt = "empty"

        def opt(name: str) -> str | None:
            value = values.get(name)
            return str(value) if value else None

        def tri(name: str) -> bool | None:
            value = values.get(name)
            return None if value is None else bool(value)

        port = values.get("colo-port")
        return DiskSpec(
            vdev=vdev,
            target=target,
            format=fmt,
            access="r" if cdrom else str(values.get("access") or "w"),
            devtype=devtype,
            backendDomain=opt("backend"),
            backendType=opt("backendtype"),
            script=opt("script"),
            directIoSafe=bool(values.get("directIoSafe")),
            discard=tri("discard"),
            trusted=tri("trusted"),
            specification=opt("specification"),
            grantUsage=tri("grant_usage"),
            colo=tri("colo"),
            coloHost=opt("colo-host"),
            coloPort=port if isinstance(port, int) else None,
            coloExport=opt("colo-export"),
            activeDisk=opt("active-disk"),
            hiddenDisk=opt("hidden-disk"),
            legacyPrefixes=tuple(self.prefixes),
            tapType=self.tapType,
        )


def _isVdevLike(token: str) -> bool:
    """Whether C{token} is a valid vdev, or C{<valid vdev>:<anything>}."""
    vdev, colon, _ = token.rpartition(":")
    try:
        vdevToNumber(vdev if colon else token)
    except VdevError:
        return False
    return True


def parseDiskSpec(spec: str) -> DiskSpec:
    """
    Parse an xl C{DISKSPEC}::

        [<key>=<value>|<flag>,]*,[<target>,[<format>,[<vdev>,[<access>]]]],
          [<key>=<value>|<flag>,]*[target=<target>]

    and the deprecated C{[<format>:][<target>],<vdev>[:<devtype>],<access>}
    with its prefixes (see the module docstring for the decisions).

    @raise DiskSpecError: the only exception this raises for any string.
    """
    if not isinstance(spec, str):
        raise DiskSpecError("disk specification must be a string", None, repr(spec))
    return _XlParser(spec).parse()


# ---------------------------------------------------------------------------
# xend's syntax


def parseXendDisk(
    uname: str | None,
    dev: str,
    mode: str = "r",
    *,
    backend: str | None = None,
    extraScriptTypes: Iterable[str] = (),
) -> DiskSpec:
    """
    Parse xend's disk triple (C{xm block-attach <dom> <uname> <dev> <mode>}).

      - C{uname}: C{phy:<dev>} (C{/dev/} prepended to a name without C{/}),
        C{file:<path>}, C{tap:[tapdisk:]<type>:<path>} or C{tap2:...} with a
        blktap type (L{BLKTAP_TYPES}; C{qcow}/C{qcow2}/C{vhd}/C{vmdk} set the
        format), C{iscsi:}/C{nbd:}/C{enbd:}/C{drbd:} (or one of
        C{extraScriptTypes}) for a C{block-<type>} script; empty or L{None}
        only for a cdrom (an empty drive).
      - C{dev}: C{[ioemu:]<vdev>[:disk|:cdrom]}, C{/dev/} accepted.
      - C{mode}: C{r} (default when empty), C{w}, C{w!} (shared write).

    The errors are L{DiskSpecError}s whose C{spec} is C{"<uname>,<dev>,<mode>"}.
    """
    specText = f"{uname or ''},{dev},{mode}"

    def error(message: str, token: str | None) -> DiskSpecError:
        return DiskSpecError(message, token, specText)

    prefixes: list[str] = []
    name = dev
    ioemu = name.startswith("ioemu:")
    if ioemu:
        name = name[len("ioemu:") :]
    name, colon, devtype = name.partition(":")
    if not colon:
        devtype = "disk"
    elif devtype not in ("disk", "cdrom"):
        raise error("unknown deprecated type", devtype)
    if name.startswith("/dev/"):
        name = name[len("/dev/") :]
    if not name:
        raise error("no vdev specified", None)
    try:
        vdevToNumber(name)
    except VdevError as e:
        raise error(f"invalid vdev: {e}", name) from e

    if mode not in ("", "r", "w", "w!"):
        raise error("unknown value for access", mode)
    access = "w" if mode.startswith("w") else "r"
    shared = mode == "w!"

    target: str | None = None
    fmt = "raw"
    script: str | None = None
    tapType: str | None = None
    if uname:
        typ, colon, params = uname.partition(":")
        if not colon:
            raise error("missing block device type", uname)
        prefixes.append(typ)
        if typ == "phy":
            target = params if not params or params.startswith("/") else "/dev/" + params
        elif typ == "file":
            target = params
        elif typ in ("tap", "tap2"):
            word, colon, rest = params.partition(":")
            if word == "tapdisk" and colon:
                prefixes.append(word)
                word, colon, rest = rest.partition(":")
            if word not in BLKTAP_TYPES:
                if colon:
                    raise error("unknown blktap disk type", word)
                raise error("missing blktap disk type", params)
            prefixes.append(word)
            tapType = word
            fmt = _TAP_FORMATS.get(word, "raw")
            target = rest
        elif typ in XEND_SCRIPT_TYPES or typ in set(extraScriptTypes):
            script = "block-" + typ
            target = params
        else:
            raise error("unknown block device type", typ)
    if ioemu:
        prefixes.append("ioemu")
    if devtype == "cdrom":
        access, shared = "r", False
        if not target:
            target, fmt = None, "empty"
    elif not target:
        raise error("no target specified (and device not removable)", None)
    return DiskSpec(
        vdev=name,
        target=target,
        format=fmt,
        access=access,
        sharedWrite=shared,
        devtype=devtype,
        backendDomain=backend or None,
        script=script,
        legacyPrefixes=tuple(prefixes),
        tapType=tapType,
    )


# ---------------------------------------------------------------------------
# Backend choice


@attrs.frozen
class BackendChoice:
    """
    The backend chosen for a disk.

    @ivar kind: L{BACKEND_BLKBACK}, L{BACKEND_TAPDISK2}, L{BACKEND_QEMU},
        L{BACKEND_BLKTAP1} or L{BACKEND_STANDALONE}.
    @ivar reason: why, for logs and error messages.
    """

    kind: str
    reason: str


_SERVES: Final = {
    BACKEND_BLKBACK: frozenset({"raw"}),
    BACKEND_TAPDISK2: frozenset({"raw", "vhd"}),
    BACKEND_QEMU: frozenset({"raw", "qcow", "qcow2", "qed", "vmdk"}),
    BACKEND_STANDALONE: frozenset({"raw"}),
    BACKEND_BLKTAP1: frozenset({"raw", "qcow", "qcow2", "vmdk"}),
}
_BACKEND_OF_TYPE: Final = {
    "phy": BACKEND_BLKBACK,
    "tap": BACKEND_TAPDISK2,
    "qdisk": BACKEND_QEMU,
    "standalone": BACKEND_STANDALONE,
}


def defaultStatTarget(path: str) -> str:
    """
    Classify a path in this domain: C{"block"}, C{"file"}, C{"other"} or
    C{"missing"} (also when it cannot be stat'ed).  Blocking; tests and
    reactor code inject their own.
    """
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return "missing"
    if stat.S_ISBLK(mode):
        return "block"
    if stat.S_ISREG(mode):
        return "file"
    return "other"


def _tapPrefix(spec: DiskSpec) -> str | None:
    """The first of C{tap}/C{tap2} among the legacy prefixes."""
    for prefix in spec.legacyPrefixes:
        if prefix in ("tap", "tap2"):
            return prefix
    return None


def blktapDiskType(spec: DiskSpec) -> str | None:
    """
    The blktap driver type of a C{tap:}/C{tap2:} disk: L{DiskSpec.tapType}
    (the type written after the prefix, e.g. C{aio} for C{tap:aio:/x}, C{vhd}
    for C{tap2:tapdisk:vhd:/x}), otherwise derived from the format (C{raw} ->
    C{aio}, C{qcow}, C{qcow2}, C{vhd}, C{vmdk}).  L{None} for a disk without
    such a prefix, or a format no blktap driver serves.
    """
    if _tapPrefix(spec) is None:
        return None
    if spec.tapType is not None:
        return spec.tapType
    if spec.format == "raw":
        return "aio"
    return spec.format if spec.format in BLKTAP_TYPES else None


def xendDeviceClass(spec: DiskSpec, choice: BackendChoice | None = None) -> str:
    """
    xend's device class for a disk: C{tap} when served by blktap1, C{tap2}
    for a C{tap:}/C{tap2:} disk otherwise (seed 001: xm maps C{tap:} unames to
    the C{tap2} class), else C{vbd}.
    """
    if choice is not None and choice.kind == BACKEND_BLKTAP1:
        return "tap"
    if _tapPrefix(spec) is not None:
        return "tap2"
    return "vbd"


def chooseBackend(
    spec: DiskSpec,
    available: Callable[[str], bool] | Collection[str] = DEFAULT_AVAILABLE,
    statTarget: Callable[[str], str] = defaultStatTarget,
) -> BackendChoice:
    """
    Choose the backend for a disk, in this order:

      1. C{specification=virtio}: the C{standalone} backend, raw only.
      2. An empty cdrom: qemu (qdisk), the only backend with a drive without
         medium (HVM-style); C{backendtype} other than C{qdisk} is an error.
         A cdrom with a medium follows the rules below like any disk (xend
         changed media through blkback too).
      3. An explicit C{backendtype}: phy -> blkback, tap -> tapdisk2, qdisk ->
         qemu, standalone -> standalone; an error if it cannot serve the
         format (blkback/standalone: raw; tapdisk2: raw, vhd; qemu: not vhd).
      4. A C{script} (C{iscsi:}, C{script=}...): blkback on the device the
         script provides; raw only.
      5. xend's C{tap:} (not C{tap2:}) with a blktap1-only type (C{ioemu},
         C{qcow2}, C{vmdk}, C{sync}), or any blktap type when tapdisk2 is
         missing: blktap1, if C{"blktap1"} is available (seed 001).
      6. By format (seed 003): vhd -> tapdisk2 only (qemu cannot); qcow,
         qcow2, qed, vmdk -> qemu only.
      7. Raw: a C{phy:} prefix -> blkback, always; a C{tap:}/C{tap2:} prefix ->
         tapdisk2 if available; a non-local backend domain -> blkback without
         looking at the target (it lives in the driver domain); otherwise
         C{statTarget(hostPath)}: a block device -> blkback, then qemu, then
         tapdisk2; a regular file -> tapdisk2, then the qemu fallback, then
         blkback (loop device via the C{block} script); missing or anything
         else -> error.

    @param available: the backends this host (or the backend domain) offers,
        as a collection of names or a predicate.
    @param statTarget: classifies a path: C{"block"}, C{"file"}, C{"other"} or
        C{"missing"} (L{defaultStatTarget}).
    @raise BackendUnavailable: nothing suitable is available, or an explicit
        request cannot be honoured.
    """
    have: Callable[[str], bool] = available if callable(available) else available.__contains__
    fmt = spec.format

    def need(kind: str, reason: str) -> BackendChoice:
        if have(kind):
            return BackendChoice(kind, reason)
        raise BackendUnavailable(f"{reason}, but {kind} is not available", spec, kind)

    def unsuitable(message: str, kind: str | None = None) -> BackendUnavailable:
        return BackendUnavailable(message, spec, kind)

    if spec.specification == "virtio":
        if spec.backendType not in (None, "standalone"):
            raise unsuitable(
                f"backendtype {spec.backendType} does not support specification virtio"
            )
        if fmt != "raw":
            raise unsuitable(
                f"the standalone backend cannot serve format {fmt}", BACKEND_STANDALONE
            )
        return need(BACKEND_STANDALONE, "specification virtio needs the standalone backend")
    if spec.backendType == "standalone":
        raise unsuitable("backendtype standalone needs specification=virtio", BACKEND_STANDALONE)

    if spec.isEmpty:
        if spec.backendType not in (None, "qdisk"):
            raise unsuitable(f"backendtype {spec.backendType} cannot serve an empty cdrom drive")
        return need(BACKEND_QEMU, "an empty cdrom drive is served by qemu only")

    if spec.backendType is not None:
        kind = _BACKEND_OF_TYPE[spec.backendType]
        if fmt not in _SERVES[kind]:
            raise unsuitable(f"backendtype {spec.backendType} cannot serve format {fmt}", kind)
        return need(kind, f"backendtype={spec.backendType} requested")

    if spec.script is not None:
        if fmt != "raw":
            raise unsuitable(f"script {spec.script} provides a raw device, not {fmt}")
        return need(BACKEND_BLKBACK, f"script {spec.script} provides a block device")

    tapPrefix = _tapPrefix(spec)
    tapType = blktapDiskType(spec)
    if (
        tapPrefix == "tap"
        and tapType is not None
        and (tapType not in BLKTAP2_TYPES or not have(BACKEND_TAPDISK2))
        and have(BACKEND_BLKTAP1)
    ):
        why = "a blktap1-only type" if tapType not in BLKTAP2_TYPES else "tapdisk2 is missing"
        return BackendChoice(BACKEND_BLKTAP1, f"tap:{tapType} with {why}: deprecated blktap1")

    if fmt == "vhd":
        return need(BACKEND_TAPDISK2, "vhd is served by tapdisk2 only (qemu does not support vhd)")
    if fmt != "raw":
        return need(BACKEND_QEMU, f"{fmt} is served by qemu only (tapdisk2 does not support it)")

    if "phy" in spec.legacyPrefixes:
        return need(BACKEND_BLKBACK, "a phy: disk is always served by blkback")
    if tapPrefix is not None and have(BACKEND_TAPDISK2):
        return BackendChoice(BACKEND_TAPDISK2, f"{tapPrefix}: prefix on a raw disk")
    if spec.backendDomain is not None and spec.backendDomain not in _LOCAL_DOMAINS:
        return need(
            BACKEND_BLKBACK,
            f"raw disk in driver domain {spec.backendDomain} (target not checked here)",
        )

    path = spec.hostPath or ""
    kind = statTarget(path)
    if kind == "block":
        order = (BACKEND_BLKBACK, BACKEND_QEMU, BACKEND_TAPDISK2)
        what = "raw block device"
    elif kind == "file":
        order = (BACKEND_TAPDISK2, BACKEND_QEMU, BACKEND_BLKBACK)
        what = "raw file"
    elif kind == "missing":
        raise unsuitable(f"target {path} does not exist")
    else:
        raise unsuitable(f"target {path} is neither a block device nor a regular file")
    for index, candidate in enumerate(order):
        if have(candidate):
            if index == 0:
                return BackendChoice(candidate, f"{what}: {candidate}")
            missing = ", ".join(order[:index])
            return BackendChoice(candidate, f"{what}: {missing} unavailable, {candidate} fallback")
    raise unsuitable(f"no backend for a {what} ({', '.join(order)} all unavailable)")
