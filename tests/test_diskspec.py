"""
Tests for L{xenddev.diskspec}: xl's and xend's disk specifications, vdev
numbers, and the backend choice.

The expected values come from xl-disk-configuration(5), xen-vbd-interface(7),
seed 003 (the backend per format) and seed 001 (blktap1 fallback); the test
side computes drive letters with its own encoder so the round trips are not
tautological.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from typing import Any

import attrs
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from tests.support.profiles import examples
from xenddev.diskspec import (
    BACKEND_BLKBACK,
    BACKEND_BLKTAP1,
    BACKEND_QEMU,
    BACKEND_STANDALONE,
    BACKEND_TAPDISK2,
    DEFAULT_AVAILABLE,
    LEGACY_PREFIXES,
    MAX_DEVICE_NUMBER,
    BackendChoice,
    BackendUnavailable,
    DiskError,
    DiskSpec,
    DiskSpecError,
    VdevError,
    VirtualDevice,
    blktapDiskType,
    chooseBackend,
    decodeVdev,
    defaultStatTarget,
    numberToVdev,
    parseDiskSpec,
    parseXendDisk,
    vdevToNumber,
    xendDeviceClass,
)

PREFIX = "config parsing error in disk specification: "


def letters(index: int) -> str:
    """
    Independent bijective base-26 encoder for the tests (a=0, z=25, aa=26):
    the number of letters first, then the offset within that length.
    """
    length, first, span = 1, 0, 26
    while index >= first + span:
        first += span
        length += 1
        span *= 26
    offset = index - first
    out = ""
    for _ in range(length):
        out = chr(ord("a") + offset % 26) + out
        offset //= 26
    return out


def xvdNumber(disk: int, part: int) -> int:
    """The encoding of xen-vbd-interface(7) for an xvd disk, written out again."""
    if disk <= 15 and part <= 15:
        return 202 * 256 + disk * 16 + part
    return 2**28 + disk * 256 + part


def withoutPrefixes(spec: DiskSpec) -> DiskSpec:
    """C{spec} without its legacy prefixes and tap type (they do not round-trip)."""
    return attrs.evolve(spec, legacyPrefixes=(), tapType=None)


class SpecAssertions:
    """Helpers shared by the parser tests."""

    assertEqual: Callable[..., None]
    assertRaises: Callable[..., Any]

    def assertSpec(self, spec: DiskSpec, **expected: object) -> None:
        """Every field named in C{expected} has that value."""
        actual = {name: getattr(spec, name) for name in expected}
        self.assertEqual(actual, expected)

    def assertXlError(self, spec: str, expected: str) -> DiskSpecError:
        """Parsing C{spec} fails with exactly the message C{expected}."""
        error = self.assertRaises(DiskSpecError, parseDiskSpec, spec)
        self.assertEqual(str(error), expected)
        return error


DISK_DEFAULTS: dict[str, object] = dict(
    format="raw",
    access="w",
    sharedWrite=False,
    devtype="disk",
    backendDomain=None,
    backendType=None,
    script=None,
    directIoSafe=False,
    discard=None,
    trusted=None,
)


class DocumentationExamplesTests(SpecAssertions, SynchronousTestCase):
    """
    The examples of xl-disk-configuration(5) and seed 003, each with every
    field it determines.
    """

    VOLUME = [
        "/dev/vg/guest-volume,,hda",
        "/dev/vg/guest-volume,raw,hda,rw",
        "format=raw, vdev=hda, access=rw, target=/dev/vg/guest-volume",
        "raw:/dev/vg/guest-volume,hda,w",
    ]
    ISO = [
        "/root/image.iso,,hdc,cdrom",
        "/root/image.iso,,hdc,,cdrom",
        "/root/image.iso,raw,hdc,devtype=cdrom",
        "format=raw, vdev=hdc, access=ro, devtype=cdrom, target=/root/image.iso",
        "raw:/root/image.iso,hdc:cdrom,ro",
    ]

    def test_volumeExamples(self) -> None:
        """The four equivalent spellings of the guest volume on hda."""
        for text in self.VOLUME:
            spec = parseDiskSpec(text)
            self.assertSpec(
                spec, target="/dev/vg/guest-volume", vdev="hda", readOnly=False, **DISK_DEFAULTS
            )
            self.assertEqual(spec.devid, 768)
        self.assertEqual(len({withoutPrefixes(parseDiskSpec(t)) for t in self.VOLUME}), 1)

    def test_volumeDeprecatedPrefixRecorded(self) -> None:
        """Only the deprecated spelling records its C{raw:} prefix."""
        self.assertEqual(
            [parseDiskSpec(t).legacyPrefixes for t in self.VOLUME], [(), (), (), ("raw",)]
        )

    def test_isoExamples(self) -> None:
        """The five equivalent spellings of the ISO image as cdrom on hdc."""
        for text in self.ISO:
            spec = parseDiskSpec(text)
            self.assertSpec(
                spec,
                target="/root/image.iso",
                vdev="hdc",
                format="raw",
                access="r",
                readOnly=True,
                devtype="cdrom",
                isCdrom=True,
                isEmpty=False,
                script=None,
                backendType=None,
            )
            self.assertEqual(spec.devid, 5632)
        self.assertEqual(len({withoutPrefixes(parseDiskSpec(t)) for t in self.ISO}), 1)

    def test_domainConfigExample(self) -> None:
        """C{disk = [ '/dev/vg/guest-volume,,hda', '/root/image.iso,,hdc,cdrom' ]}."""
        first, second = (
            parseDiskSpec(t) for t in ["/dev/vg/guest-volume,,hda", "/root/image.iso,,hdc,cdrom"]
        )
        self.assertSpec(first, vdev="hda", devtype="disk", access="w")
        self.assertSpec(second, vdev="hdc", devtype="cdrom", access="r")

    def test_emptyCdromDeprecatedSyntax(self) -> None:
        """C{,hdc:cdrom,r} (xend's empty cdrom) is an empty drive."""
        spec = parseDiskSpec(",hdc:cdrom,r")
        self.assertSpec(
            spec,
            target=None,
            vdev="hdc",
            format="empty",
            access="r",
            devtype="cdrom",
            isEmpty=True,
            hostPath=None,
            legacyPrefixes=(),
        )

    def test_emptyCdromKeywordForms(self) -> None:
        """A cdrom without target, in the keyword forms, is an empty drive too."""
        for text in ["vdev=hdc,cdrom", "cdrom,vdev=hdc", ",,hdc,,cdrom", "vdev=hdc,devtype=cdrom"]:
            self.assertSpec(
                parseDiskSpec(text), target=None, format="empty", isEmpty=True, access="r"
            )

    def test_seed003Examples(self) -> None:
        """The example lines of the 2011 xl disk configuration text (seed 003)."""
        table: list[tuple[str, dict[str, object]]] = [
            ("vhd:/path/to/dev,hda,w", dict(target="/path/to/dev", format="vhd", vdev="hda")),
            (
                "/path/to/iso,hdc:cdrom,r",
                dict(target="/path/to/iso", format="raw", vdev="hdc", devtype="cdrom"),
            ),
            (
                "path/to/phy/dev,hda,w",
                dict(target="path/to/phy/dev", hostPath="/dev/path/to/phy/dev", access="w"),
            ),
            (
                "/dev/cdrom,hdc:cdrom,r",
                dict(target="/dev/cdrom", vdev="hdc", devtype="cdrom", access="r"),
            ),
            ("qcow:/path/to/file,hda,w", dict(format="qcow", vdev="hda", access="w")),
            ("qcow2:/path/to/file,hda,w", dict(format="qcow2", vdev="hda", access="w")),
            (
                "raw:/path/to/dev,hdc:cdrom,r",
                dict(format="raw", vdev="hdc", devtype="cdrom", access="r"),
            ),
        ]
        for text, expected in table:
            self.assertSpec(parseDiskSpec(text), **expected)

    def test_vbdInterfaceExamples(self) -> None:
        """The configuration-syntax table of xen-vbd-interface(7)."""
        table = {
            "d0": 51712,
            "d0p0": 51712,
            "xvda": 51712,
            "d1p2": 51712 + 16 + 2,
            "xvdb2": 51712 + 16 + 2,
            "d536p37": (1 << 28) | (536 << 8) | 37,
            "xvdtq37": (1 << 28) | (536 << 8) | 37,
            "sdb3": (8 << 8) | (1 << 4) | 3,
            "hdc2": (22 << 8) | 2,
        }
        for name, number in table.items():
            self.assertEqual((name, vdevToNumber(name)), (name, number))
            self.assertEqual(parseDiskSpec(f"/x,,{name}").devid, number)


class ParameterTests(SpecAssertions, SynchronousTestCase):
    """Keyword parameters, flags and positional parameters of the xl syntax."""

    def test_positionalOrder(self) -> None:
        """Bare parameters fill target, format, vdev, access in order."""
        self.assertSpec(
            parseDiskSpec("/img,qcow2,xvdb,ro"),
            target="/img",
            format="qcow2",
            vdev="xvdb",
            access="r",
        )

    def test_positionalSkipsNamed(self) -> None:
        """Positional parameters go to the parameters not given by name yet."""
        self.assertSpec(parseDiskSpec("vdev=xvda,/img,vhd,r"), format="vhd", access="r")
        self.assertSpec(parseDiskSpec("format=qed,/img,xvda"), format="qed", vdev="xvda")
        self.assertSpec(parseDiskSpec("access=ro,/img,,xvda"), access="r", vdev="xvda")

    def test_everyFormat(self) -> None:
        """The formats raw, qcow, qcow2, vhd, qed, positionally and by name."""
        for fmt in ["raw", "qcow", "qcow2", "vhd", "qed"]:
            self.assertEqual(parseDiskSpec(f"/img,{fmt},xvda").format, fmt)
            self.assertEqual(parseDiskSpec(f"format={fmt},vdev=xvda,target=/i").format, fmt)

    def test_defaultFormatIsRaw(self) -> None:
        """No format, or an empty one, means raw."""
        self.assertEqual(parseDiskSpec("/img,,xvda").format, "raw")
        self.assertEqual(parseDiskSpec("format=,vdev=xvda,target=/i").format, "raw")

    def test_everyAccess(self) -> None:
        """ro and r are read-only; rw and w read-write; empty is the default."""
        for value, access in [("ro", "r"), ("r", "r"), ("rw", "w"), ("w", "w"), ("", "w")]:
            self.assertEqual(parseDiskSpec(f"/img,,xvda,{value}").access, access)
            self.assertEqual(parseDiskSpec(f"access={value},vdev=xvda,target=/i").access, access)

    def test_cdromIsReadOnly(self) -> None:
        """A cdrom defaults to, and is forced to, read-only (as xl does)."""
        self.assertEqual(parseDiskSpec("/iso,,hdc,cdrom").access, "r")
        self.assertEqual(parseDiskSpec("/iso,,hdc,rw,cdrom").access, "r")

    def test_devtype(self) -> None:
        """devtype=cdrom, devtype=disk, the cdrom flag and the vdev:devtype suffix."""
        self.assertEqual(parseDiskSpec("/i,,hdc,devtype=cdrom").devtype, "cdrom")
        self.assertEqual(parseDiskSpec("/i,,hdc,devtype=disk").devtype, "disk")
        self.assertEqual(parseDiskSpec("/i,,hdc,devtype=").devtype, "disk")
        self.assertEqual(parseDiskSpec("cdrom,/i,,hdc").devtype, "cdrom")
        self.assertEqual(parseDiskSpec("/i,,hdc:cdrom").devtype, "cdrom")
        self.assertEqual(parseDiskSpec("/i,,hdc:disk").devtype, "disk")
        self.assertEqual(parseDiskSpec("/i,,hdc,cdrom,devtype=cdrom").devtype, "cdrom")

    def test_backendDomain(self) -> None:
        """backend= keeps a domain name or id as a string; empty means dom0."""
        self.assertEqual(parseDiskSpec("/i,,xvda,backend=storage").backendDomain, "storage")
        self.assertEqual(parseDiskSpec("/i,,xvda,backend=7").backendDomain, "7")
        self.assertIsNone(parseDiskSpec("/i,,xvda,backend=").backendDomain)

    def test_backendType(self) -> None:
        """backendtype= phy, tap, qdisk or standalone."""
        for value in ["phy", "tap", "qdisk", "standalone"]:
            self.assertEqual(parseDiskSpec(f"/i,,xvda,backendtype={value}").backendType, value)
        self.assertIsNone(parseDiskSpec("/i,,xvda,backendtype=").backendType)

    def test_script(self) -> None:
        """script= is kept as given."""
        self.assertEqual(parseDiskSpec("script=block-foo,/t,,xvda").script, "block-foo")
        self.assertEqual(parseDiskSpec("/t,,xvda,script=/usr/x").script, "/usr/x")

    def test_flags(self) -> None:
        """direct-io-safe, discard/no-discard, trusted/untrusted, colo/no-colo."""
        base = "/i,,xvda"
        self.assertSpec(parseDiskSpec(base), directIoSafe=False, discard=None, trusted=None)
        self.assertTrue(parseDiskSpec(base + ",direct-io-safe").directIoSafe)
        self.assertIs(parseDiskSpec(base + ",discard").discard, True)
        self.assertIs(parseDiskSpec(base + ",no-discard").discard, False)
        self.assertIs(parseDiskSpec(base + ",trusted").trusted, True)
        self.assertIs(parseDiskSpec(base + ",untrusted").trusted, False)
        self.assertIs(parseDiskSpec(base + ",colo").colo, True)
        self.assertIs(parseDiskSpec(base + ",no-colo").colo, False)

    def test_repeatedSameFlag(self) -> None:
        """Repeating a flag with the same meaning is harmless."""
        self.assertIs(parseDiskSpec("/i,,xvda,discard,discard").discard, True)
        self.assertEqual(parseDiskSpec("/i,,xvda,cdrom,cdrom").devtype, "cdrom")
        self.assertEqual(parseDiskSpec("/i,qcow,xvda,format=qcow").format, "qcow")

    def test_specificationAndGrants(self) -> None:
        """specification=xen|virtio and grant_usage=1|0."""
        spec = parseDiskSpec("/i,,xvda,specification=virtio,grant_usage=1")
        self.assertSpec(spec, specification="virtio", grantUsage=True)
        spec = parseDiskSpec("/i,,xvda,specification=xen,grant_usage=0")
        self.assertSpec(spec, specification="xen", grantUsage=False)

    def test_coloSettings(self) -> None:
        """The COLO parameters."""
        spec = parseDiskSpec(
            "/i,,xvda,colo,colo-host=h,colo-port=9000,colo-export=e,active-disk=/a,hidden-disk=/h"
        )
        self.assertSpec(
            spec,
            colo=True,
            coloHost="h",
            coloPort=9000,
            coloExport="e",
            activeDisk="/a",
            hiddenDisk="/h",
        )

    def test_targetSwallowsRest(self) -> None:
        """target= takes the rest, commas, colons, equals and trailing blanks included."""
        spec = parseDiskSpec("vdev=xvda,target=/a,b:c=d, e ")
        self.assertEqual(spec.target, "/a,b:c=d, e ")

    def test_targetDropsOneTrailingComma(self) -> None:
        """A single trailing comma after target= is dropped, as xl does."""
        self.assertEqual(parseDiskSpec("vdev=xvda,target=/a,").target, "/a")
        self.assertEqual(parseDiskSpec("vdev=xvda,target=/a,,").target, "/a,")

    def test_targetAfterEmptyPositionalTarget(self) -> None:
        """An empty positional target may be overwritten by target=."""
        self.assertEqual(parseDiskSpec(",,xvda,,target=/x").target, "/x")

    def test_emptyValuesOverwritable(self) -> None:
        """Empty values mean default and may be given again."""
        spec = parseDiskSpec("/i,,xvda,,format=qcow2,access=ro,vdev=,backend=,script=")
        self.assertSpec(spec, format="qcow2", access="r", vdev="xvda")
        self.assertEqual(parseDiskSpec("vdev=,/i,,ro,vdev=xvdb").vdev, "xvdb")
        self.assertEqual(parseDiskSpec("/i,,xvda,vdev=").vdev, "xvda")

    def test_leadingWhitespaceIgnored(self) -> None:
        """Whitespace before each parameter (space, tab, newline) is ignored."""
        spec = parseDiskSpec(" \t/i,\n qcow, xvda,\tro, cdrom")
        self.assertSpec(spec, target="/i", format="qcow", vdev="xvda", devtype="cdrom")

    def test_trailingWhitespaceBeforeComma(self) -> None:
        """Whitespace after a parameter, before its comma, is ignored."""
        self.assertSpec(parseDiskSpec("/i ,raw ,xvda ,rw "), target="/i", vdev="xvda")

    def test_trailingCommaAndBlanks(self) -> None:
        """A trailing comma or trailing blanks add no parameter."""
        self.assertSpec(parseDiskSpec("/i,,xvda,"), vdev="xvda", access="w")
        self.assertSpec(parseDiskSpec("/i,,xvda,w,"), access="w")
        self.assertSpec(parseDiskSpec("/i,,xvda,w,   "), access="w")

    def test_deprecatedSyntaxWithoutPrefix(self) -> None:
        """C{<target>,<vdev>[:<devtype>],<access>} is accepted without a prefix."""
        self.assertSpec(parseDiskSpec("/i,xvdb,r"), vdev="xvdb", format="raw", access="r")
        self.assertSpec(parseDiskSpec("/i,51712,w"), vdev="51712", access="w")
        self.assertSpec(parseDiskSpec("/i,hdc:cdrom"), vdev="hdc", devtype="cdrom")

    def test_devidAndHostPath(self) -> None:
        """C{devid} is the vdev number; C{hostPath} prepends /dev/ to a relative target."""
        spec = parseDiskSpec("vg/lv,,xvdb")
        self.assertEqual((spec.devid, spec.hostPath), (51728, "/dev/vg/lv"))
        self.assertEqual(parseDiskSpec("/abs,,xvdb").hostPath, "/abs")
        self.assertEqual(parseDiskSpec("iscsi:iqn.x:y,xvdb,w").hostPath, "iqn.x:y")


class DeprecatedPrefixTests(SpecAssertions, SynchronousTestCase):
    """The deprecated C{<prefix>:} forms."""

    def test_formatPrefixes(self) -> None:
        """raw:, qcow:, qcow2:, vhd: set the format."""
        for prefix in ["raw", "qcow", "qcow2", "vhd"]:
            spec = parseDiskSpec(f"{prefix}:/img,xvda,w")
            self.assertSpec(
                spec, format=prefix, target="/img", vdev="xvda", legacyPrefixes=(prefix,)
            )

    def test_scriptPrefixes(self) -> None:
        """iscsi:, nbd:, enbd:, drbd: become script=block-<x>; the rest is the target."""
        for prefix in ["iscsi", "nbd", "enbd", "drbd"]:
            spec = parseDiskSpec(f"{prefix}:res:1,xvda,w")
            self.assertSpec(
                spec,
                script=f"block-{prefix}",
                target="res:1",
                format="raw",
                legacyPrefixes=(prefix,),
            )

    def test_ignoredPrefixes(self) -> None:
        """tapdisk:, tap:, tap2:, aio:, ioemu:, file:, phy: are stripped and recorded."""
        for prefix in ["tapdisk", "tap", "tap2", "aio", "ioemu", "file", "phy"]:
            spec = parseDiskSpec(f"{prefix}:/img,xvda,w")
            self.assertSpec(
                spec,
                target="/img",
                format="raw",
                script=None,
                vdev="xvda",
                access="w",
                legacyPrefixes=(prefix,),
            )

    def test_prefixSetIsTheDocumentedOne(self) -> None:
        """The accepted prefixes are exactly the documented ones."""
        self.assertEqual(
            LEGACY_PREFIXES,
            {"raw", "qcow", "qcow2", "vhd", "iscsi", "nbd", "enbd", "drbd"}
            | {"tapdisk", "tap", "tap2", "aio", "ioemu", "file", "phy"},
        )

    def test_stacking(self) -> None:
        """Prefixes stack and are recorded in order; a type after tap: is the tap type."""
        table = {
            "tap:aio:/x": ("raw", ("tap", "aio"), "aio"),
            "tap:qcow:/x": ("qcow", ("tap", "qcow"), "qcow"),
            "tap:qcow2:/x": ("qcow2", ("tap", "qcow2"), "qcow2"),
            "tap2:tapdisk:vhd:/x": ("vhd", ("tap2", "tapdisk", "vhd"), "vhd"),
            "tap:tapdisk:aio:/x": ("raw", ("tap", "tapdisk", "aio"), "aio"),
            "tap:ioemu:/x": ("raw", ("tap", "ioemu"), "ioemu"),
            "file:raw:/x": ("raw", ("file", "raw"), None),
            "phy:file:tap:/x": ("raw", ("phy", "file", "tap"), None),
            "ioemu:vhd:/x": ("vhd", ("ioemu", "vhd"), None),
            "aio:tap:/x": ("raw", ("aio", "tap"), None),
            "tap:nbd:/x": ("raw", ("tap", "nbd"), None),
        }
        for prefix, (fmt, prefixes, tapType) in table.items():
            spec = parseDiskSpec(prefix + ",xvda,w")
            self.assertSpec(spec, target="/x", format=fmt, legacyPrefixes=prefixes, tapType=tapType)

    def test_prefixBeforeKeyword(self) -> None:
        """A prefix may precede a keyword parameter, target= included."""
        self.assertSpec(parseDiskSpec("vdev=xvda,tap:target=/a,b"), target="/a,b")
        self.assertSpec(parseDiskSpec("tap: aio:/x,xvda"), legacyPrefixes=("tap", "aio"))

    def test_prefixOnVdev(self) -> None:
        """xend's C{ioemu:hdc} vdev: the prefix is stripped there too."""
        spec = parseDiskSpec("/x,ioemu:hdc:cdrom,r")
        self.assertSpec(spec, vdev="hdc", devtype="cdrom", legacyPrefixes=("ioemu",))

    def test_prefixSkipsPositionalFormat(self) -> None:
        """After a prefix the positional format is skipped (old syntax)."""
        self.assertSpec(parseDiskSpec("phy:/dev/sda,xvda,r"), vdev="xvda", access="r")

    def test_colonTargetsAreNotPrefixes(self) -> None:
        """C{word:<alnum>} is not a prefix; C{word.x:} neither."""
        self.assertEqual(parseDiskSpec("host:1234,,xvda").target, "host:1234")
        self.assertEqual(parseDiskSpec("nbd:host:1234,xvda").target, "host:1234")
        self.assertEqual(parseDiskSpec("iqn.2001-04.com:x,,xvda").target, "iqn.2001-04.com:x")
        self.assertEqual(parseDiskSpec("Foo:/x,,xvda").target, "Foo:/x")

    def test_unknownPrefixes(self) -> None:
        """Any other C{word:} followed by a non-alphanumeric or the end is refused."""
        for text, token in [
            ("foo:/x,xvda,w", "foo:"),
            ("http://host/x,xvda,w", "http:"),
            ("tap:vmdk:/x,xvda,w", "vmdk:"),
            ("tap:sync:/x,xvda,w", "sync:"),
            ("x9:,xvda", "x9:"),
            ("/x,,hdc:", "hdc:"),
            ("qcow3:/x,xvda", "qcow3:"),
        ]:
            self.assertXlError(
                text, f"{PREFIX}unknown deprecated disk prefix: near `{token}' in `{text}'"
            )

    def test_emptyTargetAfterPrefix(self) -> None:
        """A prefix without target: an empty cdrom, or no target."""
        self.assertSpec(parseDiskSpec("phy:,hdc:cdrom,r"), isEmpty=True)
        self.assertXlError(
            "phy:,xvda,w",
            f"{PREFIX}no target specified (and device not removable) in `phy:,xvda,w'",
        )


class XlErrorTests(SpecAssertions, SynchronousTestCase):
    """Every error of the xl parser, with its exact text."""

    def test_str(self) -> None:
        """The message, token and spec are exposed; the text is xl's."""
        error = DiskSpecError("unknown parameter", "x=1", "spec")
        self.assertEqual(str(error), f"{PREFIX}unknown parameter: near `x=1' in `spec'")
        self.assertEqual(
            (error.message, error.token, error.spec), ("unknown parameter", "x=1", "spec")
        )
        self.assertIsInstance(error, ValueError)
        self.assertIsInstance(error, DiskError)
        self.assertEqual(str(DiskSpecError("m", None, "s")), f"{PREFIX}m in `s'")
        self.assertEqual(repr(error), "DiskSpecError('unknown parameter', 'x=1', 'spec')")

    def test_unknownParameter(self) -> None:
        """An unknown key."""
        self.assertXlError(
            "/x,,xvda,foo=bar", f"{PREFIX}unknown parameter: near `foo=bar' in `/x,,xvda,foo=bar'"
        )
        self.assertXlError(
            "cdrom=1,/x", f"{PREFIX}unknown parameter: near `cdrom=1' in `cdrom=1,/x'"
        )

    def test_badSyntax(self) -> None:
        """An C{=} in what is not a key is bad syntax."""
        self.assertXlError("/x=1,hda", f"{PREFIX}bad disk syntax: near `=1,hda' in `/x=1,hda'")
        self.assertXlError("=x", f"{PREFIX}bad disk syntax: near `=x' in `=x'")
        self.assertXlError("Vdev=x", f"{PREFIX}bad disk syntax: near `=x' in `Vdev=x'")

    def test_noVdev(self) -> None:
        """No vdev (xl's message has no C{near} part)."""
        for text in ["/x", "/x,raw", "/x,raw,", "/x,,,w", "target=/x", ""]:
            self.assertXlError(text, f"{PREFIX}no vdev specified in `{text}'")

    def test_noTarget(self) -> None:
        """No target for a device that is not a cdrom."""
        for text in ["vdev=xvda", ",,xvda", "vdev=xvda,target=", "phy:,xvda", " ,,xvda"]:
            self.assertXlError(
                text, f"{PREFIX}no target specified (and device not removable) in `{text}'"
            )

    def test_respecified(self) -> None:
        """Each parameter at most once (non-empty), with the new value as token."""
        table = [
            ("/x,,xvda,target=/y", "target", "/y"),
            ("/x,,xvda,vdev=xvdb", "vdev", "xvdb"),
            ("/x,qcow,xvda,format=raw", "format", "raw"),
            ("qcow2:/x,xvda,format=vhd", "format", "vhd"),
            ("/x,,xvda,r,access=w", "access", "w"),
            ("/x,,xvda,script=a,script=b", "script", "b"),
            ("iscsi:/x,xvda,script=b", "script", "b"),
            ("script=b,iscsi:/x,xvda", "script", "block-iscsi"),
            ("nbd:iscsi:/x,xvda", "script", "block-iscsi"),
            ("/x,,xvda,backend=a,backend=b", "backend", "b"),
            ("/x,,xvda,backendtype=phy,backendtype=tap", "backendtype", "tap"),
            ("/x,,xvda,specification=xen,specification=virtio", "specification", "virtio"),
            ("/x,,xvda,discard,no-discard", "discard", "no-discard"),
            ("/x,,xvda,untrusted,trusted", "trusted", "trusted"),
            ("/x,,xvda,colo,no-colo", "colo", "no-colo"),
            ("/x,,xvda,grant_usage=1,grant_usage=0", "grant_usage", "0"),
            ("/x,,xvda,cdrom,devtype=disk", "devtype", "devtype=disk"),
            ("/x,,xvda:disk,cdrom", "devtype", "cdrom"),
            ("/x,,xvda,colo-host=a,colo-host=b", "colo-host", "b"),
            ("/x,,xvda,colo-port=1,colo-port=2", "colo-port", "2"),
            ("/x,,xvda,colo-export=a,colo-export=b", "colo-export", "b"),
            ("/x,,xvda,active-disk=a,active-disk=b", "active-disk", "b"),
            ("/x,,xvda,hidden-disk=a,hidden-disk=b", "hidden-disk", "b"),
        ]
        for text, name, token in table:
            self.assertXlError(text, f"{PREFIX}{name} respecified: near `{token}' in `{text}'")

    def test_unknownValues(self) -> None:
        """Bad values of the enumerated parameters."""
        table = [
            ("/x,qcow3,xvda", "format", "qcow3"),
            ("/x,,xvda,format=vmdk", "format", "vmdk"),
            ("/x,,xvda,rx", "access", "rx"),
            ("/x,,xvda,access=w!", "access", "w!"),
            ("/x,,xvda,devtype=floppy", "type", "devtype=floppy"),
            ("/x,,xvda,backendtype=qemu", "backendtype", "qemu"),
            ("/x,,xvda,specification=scsi", "specification", "scsi"),
            ("/x,,xvda,grant_usage=2", "grant_usage", "2"),
            ("/x,,xvda,colo-port=0", "colo_port", "0"),
            ("/x,,xvda,colo-port=http", "colo_port", "http"),
            ("/x,,xvda,colo-port=65536", "colo_port", "65536"),
        ]
        for text, name, token in table:
            self.assertXlError(
                text, f"{PREFIX}unknown value for {name}: near `{token}' in `{text}'"
            )

    def test_unknownDeprecatedType(self) -> None:
        """C{<vdev>:<devtype>} with another devtype."""
        self.assertXlError(
            "/x,,hdc:floppy", f"{PREFIX}unknown deprecated type: near `floppy' in `/x,,hdc:floppy'"
        )
        self.assertXlError(
            "/x,hdc:floppy,r",
            f"{PREFIX}unknown deprecated type: near `floppy' in `/x,hdc:floppy,r'",
        )

    def test_tooManyPositional(self) -> None:
        """A fifth positional parameter."""
        self.assertXlError(
            "/x,raw,xvda,w,z",
            f"{PREFIX}too many positional parameters: near `z' in `/x,raw,xvda,w,z'",
        )
        self.assertXlError(
            "phy:/x,xvda,w,raw",
            f"{PREFIX}too many positional parameters: near `raw' in `phy:/x,xvda,w,raw'",
        )

    def test_emptyFormatMisuse(self) -> None:
        """format=empty is only an empty cdrom's."""
        self.assertXlError(
            "/x,empty,hdc,cdrom",
            f"{PREFIX}format empty is only valid for an empty cdrom: "
            "near `empty' in `/x,empty,hdc,cdrom'",
        )
        self.assertSpec(parseDiskSpec("format=empty,vdev=hdc,cdrom"), isEmpty=True)

    def test_invalidVdev(self) -> None:
        """The vdev is validated, with the reason in the message."""
        self.assertXlError(
            "/x,,hde",
            f"{PREFIX}invalid vdev: hd disk index of 'hde' exceeds 3, hdd being the last: "
            "near `hde' in `/x,,hde'",
        )
        self.assertXlError(
            "/x,,xvda0",
            f"{PREFIX}invalid vdev: partition number '0' in 'xvda0' has a leading zero: "
            "near `xvda0' in `/x,,xvda0'",
        )
        self.assertXlError(
            "/x,raw,floppy",
            f"{PREFIX}invalid vdev: unrecognised vdev 'floppy' (expected xvd*, hd*, sd*, "
            "d<N>p<M> or a number): near `floppy' in `/x,raw,floppy'",
        )

    def test_formatSlotNotVdev(self) -> None:
        """Something neither a format nor a vdev in the format slot is a bad format."""
        self.assertXlError(
            "/x,hdz,w", f"{PREFIX}unknown value for format: near `hdz' in `/x,hdz,w'"
        )
        self.assertXlError(
            "/x,foo:cdrom,w",
            f"{PREFIX}unknown value for format: near `foo:cdrom' in `/x,foo:cdrom,w'",
        )

    def test_notAString(self) -> None:
        """A non-string is refused with a DiskSpecError too."""
        self.assertRaises(DiskSpecError, parseDiskSpec, None)
        self.assertRaises(DiskSpecError, parseDiskSpec, b"/x,,xvda")


class XendFormTests(SpecAssertions, SynchronousTestCase):
    """xend's C{uname}, C{dev}, C{mode} triples."""

    def test_phy(self) -> None:
        """C{phy:} is raw; a name without C{/} gets C{/dev/}."""
        self.assertSpec(
            parseXendDisk("phy:/dev/sda", "xvda", "w"),
            target="/dev/sda",
            format="raw",
            vdev="xvda",
            access="w",
            legacyPrefixes=("phy",),
        )
        self.assertEqual(parseXendDisk("phy:vg/lv", "xvda", "r").target, "/dev/vg/lv")

    def test_file(self) -> None:
        """C{file:} is a raw image."""
        self.assertSpec(
            parseXendDisk("file:/img", "hda", "w"),
            target="/img",
            format="raw",
            legacyPrefixes=("file",),
        )

    def test_tap(self) -> None:
        """C{tap:<type>:} and C{tap2:[tapdisk:]<type>:} with their formats."""
        table = {
            "tap:aio:/img": ("raw", ("tap", "aio")),
            "tap:sync:/img": ("raw", ("tap", "sync")),
            "tap:ram:/img": ("raw", ("tap", "ram")),
            "tap:ioemu:/img": ("raw", ("tap", "ioemu")),
            "tap:qcow:/img": ("qcow", ("tap", "qcow")),
            "tap:qcow2:/img": ("qcow2", ("tap", "qcow2")),
            "tap:vmdk:/img": ("vmdk", ("tap", "vmdk")),
            "tap:vhd:/img": ("vhd", ("tap", "vhd")),
            "tap2:vhd:/img": ("vhd", ("tap2", "vhd")),
            "tap2:tapdisk:vhd:/img": ("vhd", ("tap2", "tapdisk", "vhd")),
            "tap:tapdisk:aio:/img": ("raw", ("tap", "tapdisk", "aio")),
        }
        for uname, (fmt, prefixes) in table.items():
            self.assertSpec(
                parseXendDisk(uname, "xvda", "w"),
                target="/img",
                format=fmt,
                legacyPrefixes=prefixes,
                tapType=prefixes[-1],
            )
        self.assertEqual(
            parseXendDisk("tap:remus:host:9000|aio:/img", "xvda", "w").target,
            "host:9000|aio:/img",
        )

    def test_scripts(self) -> None:
        """iscsi:, nbd:, enbd:, drbd: (and extra types) use block-<type>."""
        for typ in ["iscsi", "nbd", "enbd", "drbd"]:
            self.assertSpec(
                parseXendDisk(f"{typ}:res", "xvda", "w"),
                script=f"block-{typ}",
                target="res",
                legacyPrefixes=(typ,),
            )
        spec = parseXendDisk("crypt:/x", "xvda", "w", extraScriptTypes=["crypt"])
        self.assertEqual(spec.script, "block-crypt")

    def test_modes(self) -> None:
        """r, w, w! (shared write) and the empty default r."""
        table = {"r": ("r", False), "w": ("w", False), "w!": ("w", True), "": ("r", False)}
        for mode, (access, shared) in table.items():
            self.assertSpec(
                parseXendDisk("phy:/dev/sda", "xvda", mode), access=access, sharedWrite=shared
            )
        self.assertSpec(parseXendDisk("phy:/dev/sda", "xvda"), access="r")

    def test_devForms(self) -> None:
        """C{hda:cdrom}, C{ioemu:hdc}, C{/dev/xvdb}, C{xvda:disk}, numbers."""
        spec = parseXendDisk("file:/iso", "hdc:cdrom", "r")
        self.assertSpec(spec, vdev="hdc", devtype="cdrom", access="r")
        spec = parseXendDisk("file:/img", "ioemu:hdc", "w")
        self.assertSpec(spec, vdev="hdc", devtype="disk", legacyPrefixes=("file", "ioemu"))
        self.assertSpec(parseXendDisk("file:/i", "ioemu:hdc:cdrom", "r"), devtype="cdrom")
        self.assertEqual(parseXendDisk("file:/img", "/dev/xvdb", "w").vdev, "xvdb")
        self.assertEqual(parseXendDisk("file:/img", "xvda:disk", "w").devtype, "disk")
        self.assertEqual(parseXendDisk("file:/img", "51728", "w").devid, 51728)

    def test_cdrom(self) -> None:
        """A cdrom is read-only; without uname it is an empty drive."""
        self.assertSpec(parseXendDisk("", "hdc:cdrom", "r"), isEmpty=True, format="empty")
        self.assertSpec(parseXendDisk(None, "hdc:cdrom", "r"), isEmpty=True, target=None)
        self.assertSpec(parseXendDisk("phy:", "hdc:cdrom", "r"), isEmpty=True)
        self.assertSpec(
            parseXendDisk("file:/iso", "hdc:cdrom", "w!"), access="r", sharedWrite=False
        )

    def test_backendDomain(self) -> None:
        """C{backend=} sets the backend domain."""
        self.assertEqual(parseXendDisk("phy:/d", "xvda", "w", backend="dd").backendDomain, "dd")

    def test_errors(self) -> None:
        """Every xend error, exactly."""

        def check(uname: str, dev: str, mode: str, message: str) -> None:
            error = self.assertRaises(DiskSpecError, parseXendDisk, uname, dev, mode)
            self.assertEqual(str(error), f"{PREFIX}{message} in `{uname},{dev},{mode}'")

        check("phy:/d", "hdc:floppy", "r", "unknown deprecated type: near `floppy'")
        check("phy:/d", "", "r", "no vdev specified")
        check("phy:/d", "ioemu:", "r", "no vdev specified")
        check(
            "phy:/d",
            "sdq",
            "r",
            "invalid vdev: sd disk index of 'sdq' exceeds 15, sdp being the last: near `sdq'",
        )
        check("phy:/d", "xvda", "rw", "unknown value for access: near `rw'")
        check("phy:/d", "xvda", "w!!", "unknown value for access: near `w!!'")
        check("/dev/sda", "xvda", "w", "missing block device type: near `/dev/sda'")
        check("foo:/x", "xvda", "w", "unknown block device type: near `foo'")
        check("tap:foo:/x", "xvda", "w", "unknown blktap disk type: near `foo'")
        check("tap:tapdisk:foo:/x", "xvda", "w", "unknown blktap disk type: near `foo'")
        check("tap:/x", "xvda", "w", "missing blktap disk type: near `/x'")
        check("", "xvda", "w", "no target specified (and device not removable)")
        check("phy:", "xvda", "w", "no target specified (and device not removable)")
        check("tap:aio", "xvda", "w", "no target specified (and device not removable)")


class VdevTests(SynchronousTestCase):
    """vdev names and numbers (xen-vbd-interface(7))."""

    def test_briefExamples(self) -> None:
        """xvda 51712, xvdb 51728, xvdq 268439552, hda 768, hdc 5632, sda 2048."""
        table = {
            "xvda": 51712,
            "xvdb": 51728,
            "xvdq": 268439552,
            "hda": 768,
            "hdc": 5632,
            "sda": 2048,
        }
        for name, number in table.items():
            self.assertEqual((name, vdevToNumber(name)), (name, number))
            self.assertEqual((number, numberToVdev(number)), (number, name))

    def test_letters(self) -> None:
        """Drive letters are bijective base 26: a=0, z=25, aa=26, zz=701, aaa=702."""
        for name, disk in [("a", 0), ("z", 25), ("aa", 26), ("az", 51), ("ba", 52)]:
            self.assertEqual(decodeVdev("xvd" + name).disk, disk)
        self.assertEqual(decodeVdev("xvdzz").disk, 701)
        self.assertEqual(decodeVdev("xvdaaa").disk, 702)

    def test_decode(self) -> None:
        """decodeVdev gives kind, disk, partition and number."""
        self.assertEqual(decodeVdev("xvdb2"), VirtualDevice("xvd", 1, 2, 51712 + 18))
        self.assertEqual(decodeVdev("d1p2"), VirtualDevice("xvd", 1, 2, 51712 + 18))
        self.assertEqual(decodeVdev("hdd63"), VirtualDevice("hd", 3, 63, 5632 + 64 + 63))
        self.assertEqual(decodeVdev("sdp15"), VirtualDevice("sd", 15, 15, 2048 + 255))
        self.assertEqual(decodeVdev("1234"), VirtualDevice("number", None, None, 1234))

    def test_devPrefix(self) -> None:
        """A /dev/ prefix is accepted."""
        self.assertEqual(vdevToNumber("/dev/xvdb"), 51728)
        self.assertEqual(vdevToNumber("/dev/51712"), 51712)

    def test_xvdShortFormLimits(self) -> None:
        """202<<8 up to disk 15 and partition 15; beyond, the 1<<28 form."""
        self.assertEqual(vdevToNumber("xvdo"), (202 << 8) | (14 << 4))
        self.assertEqual(vdevToNumber("xvdp"), (202 << 8) | (15 << 4))
        self.assertEqual(vdevToNumber("xvdq"), (1 << 28) | (16 << 8))
        self.assertEqual(vdevToNumber("xvda14"), (202 << 8) | 14)
        self.assertEqual(vdevToNumber("xvda15"), (202 << 8) | 15)
        self.assertEqual(vdevToNumber("xvda16"), (1 << 28) | 16)
        self.assertEqual(vdevToNumber("xvdp15"), (202 << 8) | 255)
        self.assertEqual(vdevToNumber("xvdp16"), (1 << 28) | (15 << 8) | 16)

    def test_xvdDiskLimit(self) -> None:
        """xvd disks up to (1<<20)-1."""
        last = (1 << 20) - 1
        self.assertEqual(vdevToNumber("xvd" + letters(last - 1)), (1 << 28) | ((last - 1) << 8))
        self.assertEqual(vdevToNumber("xvd" + letters(last)), (1 << 28) | (last << 8))
        name = "xvd" + letters(last + 1)
        error = self.assertRaises(VdevError, vdevToNumber, name)
        self.assertEqual(
            str(error),
            f"xvd disk index of {name!r} exceeds 1048575, xvd{letters(last)} being the last",
        )
        self.assertEqual(letters(last), "bgqcv")

    def test_xvdPartitionLimit(self) -> None:
        """xvd partitions up to 255."""
        self.assertEqual(vdevToNumber("xvda254"), (1 << 28) | 254)
        self.assertEqual(vdevToNumber("xvda255"), (1 << 28) | 255)
        error = self.assertRaises(VdevError, vdevToNumber, "xvda256")
        self.assertEqual(str(error), "partition number 256 in 'xvda256' exceeds 255")

    def test_dFormLimits(self) -> None:
        """d<N>p<M>: N up to (1<<20)-1, M up to 255."""
        self.assertEqual(vdevToNumber("d1048574"), (1 << 28) | (1048574 << 8))
        self.assertEqual(vdevToNumber("d1048575p255"), (1 << 28) | (1048575 << 8) | 255)
        self.assertEqual(
            str(self.assertRaises(VdevError, vdevToNumber, "d1048576")),
            "disk number 1048576 in 'd1048576' exceeds 1048575",
        )
        self.assertEqual(vdevToNumber("d0p254"), (1 << 28) | 254)
        self.assertEqual(
            str(self.assertRaises(VdevError, vdevToNumber, "d0p256")),
            "partition number 256 in 'd0p256' exceeds 255",
        )
        self.assertEqual(vdevToNumber("d15p15"), (202 << 8) | 255)
        self.assertEqual(vdevToNumber("d16"), (1 << 28) | (16 << 8))

    def test_hdLimits(self) -> None:
        """hd a-b on major 3, c-d on major 22; disks up to d, partitions up to 63."""
        self.assertEqual(vdevToNumber("hdb"), (3 << 8) | 64)
        self.assertEqual(vdevToNumber("hdc"), 22 << 8)
        self.assertEqual(vdevToNumber("hdd"), (22 << 8) | 64)
        self.assertEqual(
            str(self.assertRaises(VdevError, vdevToNumber, "hde")),
            "hd disk index of 'hde' exceeds 3, hdd being the last",
        )
        self.assertEqual(vdevToNumber("hda62"), (3 << 8) | 62)
        self.assertEqual(vdevToNumber("hda63"), (3 << 8) | 63)
        self.assertEqual(
            str(self.assertRaises(VdevError, vdevToNumber, "hda64")),
            "partition number 64 in 'hda64' exceeds 63",
        )
        self.assertEqual(vdevToNumber("hdd63"), (22 << 8) | 127)

    def test_sdLimits(self) -> None:
        """sd a-p with partitions up to 15 only (beyond is deprecated Linux)."""
        self.assertEqual(vdevToNumber("sdo"), (8 << 8) | (14 << 4))
        self.assertEqual(vdevToNumber("sdp"), (8 << 8) | (15 << 4))
        self.assertEqual(
            str(self.assertRaises(VdevError, vdevToNumber, "sdq")),
            "sd disk index of 'sdq' exceeds 15, sdp being the last",
        )
        self.assertEqual(vdevToNumber("sda14"), (8 << 8) | 14)
        self.assertEqual(vdevToNumber("sda15"), (8 << 8) | 15)
        self.assertEqual(
            str(self.assertRaises(VdevError, vdevToNumber, "sda16")),
            "partition number 16 in 'sda16' exceeds 15",
        )
        self.assertRaises(VdevError, vdevToNumber, "sdaa")

    def test_leadingZeros(self) -> None:
        """Partition (and d-form) numbers with a leading zero are refused; d0p0 is fine."""
        for name in ["xvda0", "xvda01", "hda0", "sda05", "d01", "d0p01", "d0p00", "d00"]:
            error = self.assertRaises(VdevError, vdevToNumber, name)
            self.assertIn("leading zero", str(error))
        self.assertEqual(vdevToNumber("d0p0"), 51712)
        self.assertEqual(vdevToNumber("d0"), 51712)

    def test_bareNumbers(self) -> None:
        """Decimal, 0x hex and 0 octal numbers pass through, up to 2**31-1."""
        self.assertEqual(vdevToNumber("0"), 0)
        self.assertEqual(vdevToNumber("51712"), 51712)
        self.assertEqual(vdevToNumber("0xca00"), 51712)
        self.assertEqual(vdevToNumber("0XCA00"), 51712)
        self.assertEqual(vdevToNumber("0145000"), 51712)
        self.assertEqual(vdevToNumber("00"), 0)
        self.assertEqual(vdevToNumber(str(MAX_DEVICE_NUMBER - 1)), 2**31 - 2)
        self.assertEqual(vdevToNumber(str(MAX_DEVICE_NUMBER)), 2**31 - 1)
        self.assertEqual(vdevToNumber("0x7fffffff"), 2**31 - 1)
        self.assertEqual(
            str(self.assertRaises(VdevError, vdevToNumber, "2147483648")),
            "device number 2147483648 exceeds 2147483647",
        )
        self.assertRaises(VdevError, vdevToNumber, "0x80000000")
        self.assertRaises(VdevError, vdevToNumber, "9" * 5000)

    def test_unrecognised(self) -> None:
        """Anything else is unrecognised, named in the message."""
        for name in [
            "",
            "xvd",
            "hd",
            "XVDA",
            "xvdA",
            "xvda-1",
            "xvda 1",
            "vda",
            "-1",
            "+5",
            " 5",
            "08",
            "0x",
            "d",
            "dp1",
            "d1p",
            "xvda\n",
            "xvd\u0663",
            "\u0663",
        ]:
            error = self.assertRaises(VdevError, vdevToNumber, name)
            self.assertIsInstance(error, ValueError)
        self.assertEqual(
            str(self.assertRaises(VdevError, vdevToNumber, "vda")),
            "unrecognised vdev 'vda' (expected xvd*, hd*, sd*, d<N>p<M> or a number)",
        )
        self.assertRaises(VdevError, vdevToNumber, 5)

    def test_numberToVdevLimits(self) -> None:
        """numberToVdev takes 0..2**31-1 only."""
        self.assertEqual(numberToVdev(0), "0")
        self.assertEqual(numberToVdev(MAX_DEVICE_NUMBER), str(MAX_DEVICE_NUMBER))
        self.assertEqual(
            str(self.assertRaises(VdevError, numberToVdev, MAX_DEVICE_NUMBER + 1)),
            "device number 2147483648 outside 0..2147483647",
        )
        self.assertRaises(VdevError, numberToVdev, -1)
        self.assertRaises(VdevError, numberToVdev, True)
        self.assertRaises(VdevError, numberToVdev, "51712")
        self.assertRaises(VdevError, numberToVdev, 51712, "sd")

    def test_numberToVdevCanonical(self) -> None:
        """Canonical names: short xvd form preferred; hd, sd; others in decimal."""
        table = {
            51712: "xvda",
            51712 + 255: "xvdp15",
            (1 << 28) | (16 << 8): "xvdq",
            (1 << 28) | 16: "xvda16",
            (1 << 28): "268435456",  # the long form of xvda is not xvda's number
            (1 << 28) | (15 << 8) | 15: str((1 << 28) | (15 << 8) | 15),
            (1 << 28) | ((2**20 - 1) << 8) | 255: "xvdbgqcv255",
            768 + 63: "hda63",
            768 + 64: "hdb",
            5632 + 127: "hdd63",
            2048 + 255: "sdp15",
            5: "5",
            (8 << 8) - 1: "2047",
            2 << 28: str(2 << 28),
            65 << 8: str(65 << 8),
        }
        for number, name in table.items():
            self.assertEqual((number, numberToVdev(number)), (number, name))

    def test_numberToVdevDStyle(self) -> None:
        """style="d" names xvd numbers d<N>[p<M>]."""
        self.assertEqual(numberToVdev(51712, "d"), "d0")
        self.assertEqual(numberToVdev(51712 + 18, "d"), "d1p2")
        self.assertEqual(numberToVdev((1 << 28) | (536 << 8) | 37, "d"), "d536p37")
        self.assertEqual(numberToVdev(768, "d"), "hda")

    @settings(max_examples=examples(2000), deadline=None)
    @given(st.integers(min_value=0, max_value=MAX_DEVICE_NUMBER), st.sampled_from(["xvd", "d"]))
    def test_numberRoundTrip(self, number: int, style: str) -> None:
        """number -> name -> number over the whole valid space."""
        self.assertEqual(vdevToNumber(numberToVdev(number, style)), number)

    @settings(max_examples=examples(2000), deadline=None)
    @given(
        st.one_of(
            st.integers(51712 - 4, 51712 + 260),
            st.integers(768 - 4, 768 + 132),
            st.integers(5632 - 4, 5632 + 132),
            st.integers(2048 - 4, 2048 + 260),
            st.integers((1 << 28) - 4, (1 << 28) + 8192),
            st.integers((2 << 28) - 8192, (2 << 28) + 4),
        ),
        st.sampled_from(["xvd", "d"]),
    )
    def test_numberRoundTripEncodedRanges(self, number: int, style: str) -> None:
        """number -> name -> number around and inside every encoded range."""
        name = numberToVdev(number, style)
        self.assertEqual(vdevToNumber(name), number)
        if name.isdigit():
            self.assertEqual(name, str(number))

    @settings(max_examples=examples(1000), deadline=None)
    @given(
        st.sampled_from(["xvd", "xvdLong", "hd", "sd"]).flatmap(
            lambda kind: st.tuples(
                st.just(kind),
                st.integers(0, {"xvd": 15, "xvdLong": 2**20 - 1, "hd": 3, "sd": 15}[kind]),
                st.integers(0, {"xvd": 15, "xvdLong": 255, "hd": 63, "sd": 15}[kind]),
            )
        )
    )
    def test_encodingRoundTrip(self, drive: tuple[str, int, int]) -> None:
        """name -> number -> name for canonical names, numbers checked independently."""
        kind, disk, part = drive
        prefix = "xvd" if kind == "xvdLong" else kind
        name = prefix + letters(disk) + (str(part) if part else "")
        if kind.startswith("xvd"):
            expected = xvdNumber(disk, part)
        elif kind == "sd":
            expected = 8 * 256 + disk * 16 + part
        else:
            expected = (3 * 256 if disk < 2 else 22 * 256) + (disk % 2) * 64 + part
        self.assertEqual(vdevToNumber(name), expected)
        self.assertEqual(numberToVdev(expected), name)
        self.assertEqual(decodeVdev(name).disk, disk)

    @settings(max_examples=examples(1000), deadline=None)
    @given(st.integers(0, 2**20 - 1), st.integers(0, 255))
    def test_dFormRoundTrip(self, disk: int, part: int) -> None:
        """d<N>p<M> names the same number as its xvd letters."""
        number = vdevToNumber(f"d{disk}p{part}")
        self.assertEqual(number, xvdNumber(disk, part))
        self.assertEqual(vdevToNumber(numberToVdev(number, "d")), number)

    @settings(max_examples=examples(1000), deadline=None)
    @given(
        st.one_of(
            st.text(),
            st.text(alphabet="xvdhsap0123456789/ex", max_size=12),
            st.from_regex(r"(/dev/)?(xvd|hd|sd|d)[a-z0-9p]{0,8}", fullmatch=True),
        )
    )
    def test_vdevFuzz(self, name: str) -> None:
        """vdevToNumber raises only VdevError, and returns numbers in range."""
        try:
            number = vdevToNumber(name)
        except VdevError:
            return
        self.assertTrue(0 <= number <= MAX_DEVICE_NUMBER)


FRAGMENTS = [
    "",
    " ",
    "\t",
    ",",
    ",,",
    ":",
    "=",
    "target=",
    "format=",
    "vdev=",
    "access=",
    "devtype=",
    "backend=",
    "backendtype=",
    "script=",
    "colo-port=",
    "grant_usage=",
    "specification=",
    "tap:",
    "tap2:",
    "aio:",
    "phy:",
    "iscsi:",
    "raw:",
    "qcow2:",
    "foo:",
    "cdrom",
    "discard",
    "no-discard",
    "trusted",
    "direct-io-safe",
    "hda",
    "hdc",
    "xvda",
    "xvdq",
    "sdq",
    "d1p2",
    "51712",
    "/dev/sda",
    "/img",
    "raw",
    "qcow",
    "vhd",
    "empty",
    "r",
    "w",
    "ro",
    "rw",
    "phy",
    "tap",
    "qdisk",
    "virtio",
    "1",
    "0",
    "disk",
]


class FuzzTests(SynchronousTestCase):
    """Nothing but the typed errors escapes the parsers."""

    def checkXl(self, text: str) -> None:
        """Parse; on success the result must be coherent and round-trip through toXl."""
        try:
            spec = parseDiskSpec(text)
        except DiskSpecError as e:
            self.assertEqual(e.spec, text)
            self.assertTrue(str(e).startswith(PREFIX))
            return
        self.assertIsInstance(spec.devid, int)
        self.assertTrue(spec.target or spec.isEmpty)
        try:
            rendered = spec.toXl()
        except ValueError:
            return
        self.assertEqual(parseDiskSpec(rendered), withoutPrefixes(spec))

    @settings(max_examples=examples(1000), deadline=None)
    @given(st.text())
    def test_anyText(self, text: str) -> None:
        """Arbitrary text."""
        self.checkXl(text)

    @settings(max_examples=examples(2000), deadline=None)
    @given(st.text(alphabet=",:= \tabcdhwrxv/0123456789!-", max_size=30))
    def test_punctuationHeavy(self, text: str) -> None:
        """Commas, colons and equals signs among vdev-ish letters."""
        self.checkXl(text)

    @settings(max_examples=examples(3000), deadline=None)
    @given(st.lists(st.sampled_from(FRAGMENTS), max_size=14).map("".join))
    def test_fragments(self, text: str) -> None:
        """Concatenations of keys, prefixes, flags and values."""
        self.checkXl(text)

    @settings(max_examples=examples(1000), deadline=None)
    @given(
        st.lists(st.sampled_from(FRAGMENTS), max_size=5).map("".join),
        st.lists(st.sampled_from([*FRAGMENTS, "ioemu:", ":cdrom"]), max_size=4).map("".join),
        st.sampled_from(["", "r", "w", "w!", "rw", "x"]),
    )
    def test_xendFragments(self, uname: str, dev: str, mode: str) -> None:
        """parseXendDisk raises only DiskSpecError."""
        try:
            spec = parseXendDisk(uname, dev, mode)
        except DiskSpecError:
            return
        self.assertIsInstance(spec.devid, int)

    @settings(max_examples=examples(500), deadline=None)
    @given(st.text(), st.text(), st.text())
    def test_xendAnyText(self, uname: str, dev: str, mode: str) -> None:
        """parseXendDisk on arbitrary text raises only DiskSpecError."""
        try:
            parseXendDisk(uname, dev, mode)
        except DiskSpecError:
            pass


VALUE = st.text(alphabet="abcXYZ019-_./:=", min_size=1, max_size=8)


@st.composite
def diskSpecs(draw: st.DrawFn) -> DiskSpec:
    """DiskSpecs that xl can express."""
    cdrom = draw(st.booleans())
    target = draw(st.one_of(st.none(), st.text(min_size=1, max_size=10))) if cdrom else None
    if not cdrom:
        target = draw(st.text(min_size=1, max_size=10))
    if target is not None and target.endswith(","):
        target = target[:-1] + "x"
    empty = cdrom and not target
    return DiskSpec(
        vdev=draw(st.sampled_from(["xvda", "hdc", "sdb3", "d5p7", "51712", "xvdaa255"])),
        target=target or None,
        format="empty" if empty else draw(st.sampled_from(["raw", "qcow", "qcow2", "vhd", "qed"])),
        access="r" if cdrom else draw(st.sampled_from(["r", "w"])),
        devtype="cdrom" if cdrom else "disk",
        backendDomain=draw(st.one_of(st.none(), VALUE)),
        backendType=draw(st.sampled_from([None, "phy", "tap", "qdisk", "standalone"])),
        script=draw(st.one_of(st.none(), VALUE)),
        directIoSafe=draw(st.booleans()),
        discard=draw(st.sampled_from([None, True, False])),
        trusted=draw(st.sampled_from([None, True, False])),
        specification=draw(st.sampled_from([None, "xen", "virtio"])),
        grantUsage=draw(st.sampled_from([None, True, False])),
        colo=draw(st.sampled_from([None, True, False])),
        coloHost=draw(st.one_of(st.none(), VALUE)),
        coloPort=draw(st.one_of(st.none(), st.integers(1, 65535))),
        coloExport=draw(st.one_of(st.none(), VALUE)),
        activeDisk=draw(st.one_of(st.none(), VALUE)),
        hiddenDisk=draw(st.one_of(st.none(), VALUE)),
    )


class DiskSpecValueTests(SynchronousTestCase):
    """The L{DiskSpec} value type."""

    def test_frozen(self) -> None:
        """DiskSpec is immutable and hashable."""
        spec = parseDiskSpec("/x,,xvda")
        self.assertRaises(attrs.exceptions.FrozenInstanceError, setattr, spec, "vdev", "xvdb")
        self.assertEqual(hash(spec), hash(parseDiskSpec("/x,,xvda")))

    def test_readOnly(self) -> None:
        """readOnly follows access."""
        self.assertTrue(parseDiskSpec("/x,,xvda,r").readOnly)
        self.assertFalse(parseDiskSpec("/x,,xvda,w").readOnly)

    def test_validation(self) -> None:
        """Invalid combinations cannot be built."""
        self.assertRaises(ValueError, DiskSpec, vdev="xvda", target="/x", format="iso")
        self.assertRaises(ValueError, DiskSpec, vdev="xvda", target="/x", access="rw")
        self.assertRaises(ValueError, DiskSpec, vdev="xvda", target="/x", devtype="floppy")
        self.assertRaises(ValueError, DiskSpec, vdev="xvda", target="/x", backendType="qemu")
        self.assertRaises(ValueError, DiskSpec, vdev="xvda", target="/x", specification="v")
        self.assertRaises(
            ValueError, DiskSpec, vdev="xvda", target="/x", access="r", sharedWrite=True
        )
        self.assertRaises(ValueError, DiskSpec, vdev="hdc", target="/x", devtype="cdrom")
        self.assertRaises(
            ValueError, DiskSpec, vdev="hdc", devtype="cdrom", access="r", format="raw"
        )
        self.assertRaises(ValueError, DiskSpec, vdev="xvda", target="/x", format="empty")
        self.assertRaises(TypeError, DiskSpec, vdev=None, target="/x")

    def test_toXl(self) -> None:
        """toXl writes the keyword form with target= last."""
        spec = parseDiskSpec("tap:qcow2:/a,xvdb,r,untrusted")
        self.assertEqual(spec.toXl(), "vdev=xvdb,format=qcow2,access=ro,untrusted,target=/a")

    def test_toXlRefusals(self) -> None:
        """What xl cannot express raises ValueError."""
        self.assertRaises(ValueError, parseXendDisk("phy:/d", "xvda", "w!").toXl)
        self.assertRaises(ValueError, parseXendDisk("tap:vmdk:/d", "xvda", "w").toXl)
        self.assertRaises(ValueError, DiskSpec(vdev="xvda", target="/a,").toXl)
        self.assertRaises(ValueError, DiskSpec(vdev="xvda", target="/a", script="s ").toXl)
        self.assertRaises(ValueError, DiskSpec(vdev="xvda", target="/a", script="a,b").toXl)

    @settings(max_examples=examples(500), deadline=None)
    @given(diskSpecs())
    def test_toXlRoundTrip(self, spec: DiskSpec) -> None:
        """parseDiskSpec(spec.toXl()) == spec."""
        self.assertEqual(parseDiskSpec(spec.toXl()), spec)


def fakeStat(kinds: dict[str, str]) -> Callable[[str], str]:
    """A statTarget answering from C{kinds} (default: missing)."""
    return lambda path: kinds.get(path, "missing")


def noStat(path: str) -> str:
    """A statTarget that must not be called."""
    raise AssertionError(f"statTarget called for {path}")


STAT = fakeStat({"/dev/sda": "block", "/img": "file", "/dev/vg/lv": "block", "/dir": "other"})
ALL = DEFAULT_AVAILABLE | {BACKEND_BLKTAP1, BACKEND_STANDALONE}


class BackendChoiceTests(SynchronousTestCase):
    """The backend choice (seed 003, seed 001, the explicit backendtype)."""

    def choose(
        self, spec: DiskSpec | str, available: Any = DEFAULT_AVAILABLE, statTarget: Any = STAT
    ) -> str:
        """The chosen kind for an xl spec string or a DiskSpec."""
        if isinstance(spec, str):
            spec = parseDiskSpec(spec)
        choice = chooseBackend(spec, available, statTarget)
        self.assertIsInstance(choice, BackendChoice)
        self.assertTrue(choice.reason)
        return choice.kind

    def unavailable(
        self, spec: DiskSpec | str, available: Any = DEFAULT_AVAILABLE
    ) -> BackendUnavailable:
        """chooseBackend fails with BackendUnavailable."""
        if isinstance(spec, str):
            spec = parseDiskSpec(spec)
        error = self.assertRaises(BackendUnavailable, chooseBackend, spec, available, STAT)
        self.assertIsInstance(error, DiskError)
        self.assertIs(error.spec, spec)
        return error

    def test_phy(self) -> None:
        """phy: is always blkback, whatever the target; an error without blkback."""
        self.assertEqual(self.choose("phy:/dev/sda,xvda,w"), BACKEND_BLKBACK)
        self.assertEqual(self.choose("phy:/img,xvda,w"), BACKEND_BLKBACK)
        self.assertEqual(self.choose(parseXendDisk("phy:sda", "xvda", "w")), BACKEND_BLKBACK)
        error = self.unavailable("phy:/dev/sda,xvda,w", {BACKEND_QEMU, BACKEND_TAPDISK2})
        self.assertEqual(
            str(error),
            "disk vdev=xvda: a phy: disk is always served by blkback, but blkback is not available",
        )
        self.assertEqual(error.kind, BACKEND_BLKBACK)

    def test_rawBlockDevice(self) -> None:
        """A raw block device: blkback, then qemu, then tapdisk2."""
        self.assertEqual(self.choose("/dev/sda,,xvda"), BACKEND_BLKBACK)
        self.assertEqual(self.choose("vg/lv,,xvda"), BACKEND_BLKBACK)
        self.assertEqual(
            self.choose("/dev/sda,,xvda", {BACKEND_QEMU, BACKEND_TAPDISK2}), BACKEND_QEMU
        )
        self.assertEqual(self.choose("/dev/sda,,xvda", {BACKEND_TAPDISK2}), BACKEND_TAPDISK2)
        error = self.unavailable("/dev/sda,,xvda", set())
        self.assertEqual(
            str(error),
            "disk vdev=xvda: no backend for a raw block device "
            "(blkback, qemu, tapdisk2 all unavailable)",
        )

    def test_rawFile(self) -> None:
        """A raw file: tapdisk2, else the qemu fallback, else blkback (loop)."""
        self.assertEqual(self.choose("/img,,xvda"), BACKEND_TAPDISK2)
        self.assertEqual(self.choose("file:/img,xvda,w"), BACKEND_TAPDISK2)
        self.assertEqual(self.choose("/img,,xvda", {BACKEND_QEMU, BACKEND_BLKBACK}), BACKEND_QEMU)
        self.assertEqual(self.choose("/img,,xvda", {BACKEND_BLKBACK}), BACKEND_BLKBACK)
        self.unavailable("/img,,xvda", {BACKEND_BLKTAP1})
        choice = chooseBackend(parseDiskSpec("/img,,xvda"), {BACKEND_QEMU}, STAT)
        self.assertEqual(choice.reason, "raw file: tapdisk2 unavailable, qemu fallback")

    def test_vhd(self) -> None:
        """vhd: tapdisk2 only; a clear error without it."""
        self.assertEqual(self.choose("vhd:/img,xvda,w"), BACKEND_TAPDISK2)
        self.assertEqual(self.choose("/img,vhd,xvda"), BACKEND_TAPDISK2)
        self.assertEqual(self.choose(parseXendDisk("tap2:vhd:/img", "xvda", "w")), BACKEND_TAPDISK2)
        error = self.unavailable("/img,vhd,xvda", {BACKEND_QEMU, BACKEND_BLKBACK})
        self.assertEqual(
            str(error),
            "disk vdev=xvda: vhd is served by tapdisk2 only (qemu does not support vhd), "
            "but tapdisk2 is not available",
        )
        self.assertEqual(error.kind, BACKEND_TAPDISK2)

    def test_qemuFormats(self) -> None:
        """qcow, qcow2, qed: qemu; an error without it."""
        for fmt in ["qcow", "qcow2", "qed"]:
            self.assertEqual(self.choose(f"/img,{fmt},xvda"), BACKEND_QEMU)
            self.assertEqual(self.choose(f"tap:/img,xvda,format={fmt}"), BACKEND_QEMU)
            error = self.unavailable(f"/img,{fmt},xvda", {BACKEND_TAPDISK2, BACKEND_BLKBACK})
            self.assertEqual(error.kind, BACKEND_QEMU)

    def test_explicitBackendType(self) -> None:
        """backendtype is honoured regardless of the target."""
        self.assertEqual(self.choose("/img,,xvda,backendtype=phy"), BACKEND_BLKBACK)
        self.assertEqual(self.choose("/dev/sda,,xvda,backendtype=tap"), BACKEND_TAPDISK2)
        self.assertEqual(self.choose("/dev/sda,,xvda,backendtype=qdisk"), BACKEND_QEMU)
        self.assertEqual(self.choose("/img,vhd,xvda,backendtype=tap"), BACKEND_TAPDISK2)
        self.assertEqual(self.choose("/img,qcow2,xvda,backendtype=qdisk"), BACKEND_QEMU)
        self.assertEqual(
            self.choose("/nonexistent,,xvda,backendtype=phy", statTarget=noStat), BACKEND_BLKBACK
        )

    def test_explicitBackendTypeUnsuitable(self) -> None:
        """backendtype that cannot serve the format, or is unavailable."""
        table = [
            ("/img,qcow2,xvda,backendtype=phy", "backendtype phy cannot serve format qcow2"),
            ("/img,qcow,xvda,backendtype=tap", "backendtype tap cannot serve format qcow"),
            ("/img,vhd,xvda,backendtype=qdisk", "backendtype qdisk cannot serve format vhd"),
        ]
        for text, message in table:
            self.assertEqual(str(self.unavailable(text)), f"disk vdev=xvda: {message}")
        error = self.unavailable("/img,,xvda,backendtype=tap", {BACKEND_QEMU})
        self.assertEqual(
            str(error),
            "disk vdev=xvda: backendtype=tap requested, but tapdisk2 is not available",
        )

    def test_standalone(self) -> None:
        """specification=virtio uses the standalone backend, raw only."""
        self.assertEqual(self.choose("/img,,xvda,specification=virtio", ALL), BACKEND_STANDALONE)
        self.assertEqual(
            self.choose("/img,,xvda,specification=virtio,backendtype=standalone", ALL),
            BACKEND_STANDALONE,
        )
        self.unavailable("/img,,xvda,specification=virtio")
        self.unavailable("/img,,xvda,specification=virtio,backendtype=phy", ALL)
        self.unavailable("/img,qcow2,xvda,specification=virtio", ALL)
        error = self.unavailable("/img,,xvda,backendtype=standalone", ALL)
        self.assertEqual(
            str(error), "disk vdev=xvda: backendtype standalone needs specification=virtio"
        )

    def test_emptyCdrom(self) -> None:
        """An empty cdrom: qemu only; no other backendtype."""
        for spec in [parseDiskSpec(",hdc:cdrom,r"), parseXendDisk("", "hdc:cdrom", "r")]:
            self.assertEqual(self.choose(spec, statTarget=noStat), BACKEND_QEMU)
            error = self.unavailable(spec, {BACKEND_BLKBACK, BACKEND_TAPDISK2})
            self.assertEqual(
                str(error),
                "disk vdev=hdc: an empty cdrom drive is served by qemu only, "
                "but qemu is not available",
            )
        self.assertEqual(self.choose("vdev=hdc,cdrom,backendtype=qdisk"), BACKEND_QEMU)
        error = self.unavailable("vdev=hdc,cdrom,backendtype=phy")
        self.assertEqual(
            str(error), "disk vdev=hdc: backendtype phy cannot serve an empty cdrom drive"
        )

    def test_cdromWithMedium(self) -> None:
        """A cdrom with a medium follows the ordinary rules."""
        self.assertEqual(self.choose("/img,,hdc,cdrom"), BACKEND_TAPDISK2)
        self.assertEqual(self.choose("/dev/sda,,hdc,cdrom"), BACKEND_BLKBACK)
        self.assertEqual(self.choose("/img,,hdc,cdrom", {BACKEND_QEMU}), BACKEND_QEMU)

    def test_script(self) -> None:
        """A script provides a block device for blkback; the target is not stat'ed."""
        for text in ["iscsi:iqn.x:1,xvda,w", "nbd:host:1234,xvda,w", "/t,,xvda,script=block-x"]:
            self.assertEqual(self.choose(text, statTarget=noStat), BACKEND_BLKBACK)
        self.assertEqual(
            self.choose(parseXendDisk("drbd:res", "xvda", "w"), statTarget=noStat), BACKEND_BLKBACK
        )
        self.unavailable("iscsi:iqn.x:1,xvda,w", {BACKEND_QEMU})
        self.unavailable("/t,qcow2,xvda,script=block-x")

    def test_driverDomain(self) -> None:
        """A raw disk in a driver domain: blkback without a local stat; dom0 stats."""
        self.assertEqual(self.choose("/img,,xvda,backend=dd", statTarget=noStat), BACKEND_BLKBACK)
        self.assertEqual(self.choose("/img,,xvda,backend=0"), BACKEND_TAPDISK2)
        self.assertEqual(self.choose("/img,,xvda,backend=Domain-0"), BACKEND_TAPDISK2)
        self.assertEqual(
            self.choose("/img,vhd,xvda,backend=dd", statTarget=noStat), BACKEND_TAPDISK2
        )

    def test_targetProblems(self) -> None:
        """A missing target, or one neither a block device nor a file."""
        self.assertEqual(
            str(self.unavailable("/missing,,xvda")),
            "disk vdev=xvda: target /missing does not exist",
        )
        self.assertEqual(
            str(self.unavailable("/dir,,xvda")),
            "disk vdev=xvda: target /dir is neither a block device nor a regular file",
        )

    def test_statGetsHostPath(self) -> None:
        """statTarget receives the path with /dev/ prepended to a relative target."""
        seen: list[str] = []

        def record(path: str) -> str:
            seen.append(path)
            return "block"

        chooseBackend(parseDiskSpec("vg/lv,,xvda"), DEFAULT_AVAILABLE, record)
        self.assertEqual(seen, ["/dev/vg/lv"])

    def test_availablePredicate(self) -> None:
        """available may be a predicate."""
        self.assertEqual(self.choose("/img,,xvda", lambda kind: kind == BACKEND_QEMU), BACKEND_QEMU)

    def test_tapPrefixes(self) -> None:
        """tap:/tap2: on a raw disk prefer tapdisk2, even for a block device."""
        self.assertEqual(self.choose("tap:aio:/dev/sda,xvda,w"), BACKEND_TAPDISK2)
        self.assertEqual(self.choose("tap2:/dev/sda,xvda,w"), BACKEND_TAPDISK2)
        self.assertEqual(self.choose("tap:aio:/dev/sda,xvda,w", {BACKEND_BLKBACK}), BACKEND_BLKBACK)
        self.assertEqual(
            self.choose(parseXendDisk("tap:aio:/img", "xvda", "w"), {BACKEND_QEMU}), BACKEND_QEMU
        )

    def test_blktap1Fallback(self) -> None:
        """Seed 001: tap: with ioemu/qcow2/vmdk/sync, or without tapdisk2, uses blktap1."""
        for typ in ["ioemu", "qcow2", "vmdk", "sync"]:
            spec = parseXendDisk(f"tap:{typ}:/img", "xvda", "w")
            self.assertEqual((typ, self.choose(spec, ALL)), (typ, BACKEND_BLKTAP1))
            spec = parseXendDisk(f"tap:tapdisk:{typ}:/img", "xvda", "w")
            self.assertEqual((typ, self.choose(spec, ALL)), (typ, BACKEND_BLKTAP1))
        for typ in ["aio", "ram", "qcow", "vhd", "remus"]:
            spec = parseXendDisk(f"tap:{typ}:/img", "xvda", "w")
            self.assertNotEqual(self.choose(spec, ALL), BACKEND_BLKTAP1)
            self.assertEqual(self.choose(spec, ALL - {BACKEND_TAPDISK2}), BACKEND_BLKTAP1)
        choice = chooseBackend(parseXendDisk("tap:qcow2:/img", "xvda", "w"), ALL, STAT)
        self.assertEqual(choice.reason, "tap:qcow2 with a blktap1-only type: deprecated blktap1")

    def test_blktap1NotAvailable(self) -> None:
        """Without blktap1 the format rules apply; tap2: never falls back."""
        self.assertEqual(self.choose(parseXendDisk("tap:qcow2:/img", "xvda", "w")), BACKEND_QEMU)
        self.assertEqual(self.choose(parseXendDisk("tap:vmdk:/img", "xvda", "w")), BACKEND_QEMU)
        self.assertEqual(self.choose(parseXendDisk("tap:sync:/img", "xvda", "w")), BACKEND_TAPDISK2)
        self.assertEqual(
            self.choose(
                parseXendDisk("tap2:tapdisk:aio:/img", "xvda", "w"), ALL - {BACKEND_TAPDISK2}
            ),
            BACKEND_QEMU,
        )
        self.unavailable(parseXendDisk("tap:vmdk:/img", "xvda", "w"), {BACKEND_TAPDISK2})

    def test_blktapDiskType(self) -> None:
        """The blktap type after tap:/tap2: (and tapdisk:), else from the format."""
        table = {
            "tap:aio:/x,xvda": "aio",
            "tap:qcow2:/x,xvda": "qcow2",
            "tap2:tapdisk:vhd:/x,xvda": "vhd",
            "tap:/x,xvda": "aio",
            "/x,qcow,xvda": None,
            "aio:/x,xvda": None,
            "phy:/x,xvda": None,
            "tap:ioemu:/x,xvda": "ioemu",
            "tap: tapdisk: qcow2:/x,xvda": "qcow2",
            "tap:/x,ioemu:xvda": "aio",
            "ioemu:/x,tap:xvda": "aio",
            "aio:tap:/x,xvda": "aio",
        }
        for text, expected in table.items():
            self.assertEqual((text, blktapDiskType(parseDiskSpec(text))), (text, expected))
        self.assertEqual(blktapDiskType(parseDiskSpec("tap:/x,xvda,format=qcow")), "qcow")
        self.assertEqual(blktapDiskType(parseDiskSpec("tap:/x,xvda,format=qed")), None)
        self.assertEqual(blktapDiskType(parseXendDisk("tap:vmdk:/x", "xvda", "w")), "vmdk")
        self.assertEqual(blktapDiskType(parseXendDisk("tap:aio:/x", "ioemu:hda", "w")), "aio")

    def test_xendDeviceClass(self) -> None:
        """vbd, tap2 for tap:/tap2: unames, tap when blktap1 serves the disk."""
        spec = parseXendDisk("tap:qcow2:/img", "xvda", "w")
        self.assertEqual(xendDeviceClass(spec), "tap2")
        self.assertEqual(xendDeviceClass(spec, chooseBackend(spec, ALL, STAT)), "tap")
        self.assertEqual(
            xendDeviceClass(spec, chooseBackend(spec, DEFAULT_AVAILABLE, STAT)), "tap2"
        )
        self.assertEqual(xendDeviceClass(parseXendDisk("tap2:vhd:/i", "xvda", "w")), "tap2")
        self.assertEqual(xendDeviceClass(parseXendDisk("phy:/d", "xvda", "w")), "vbd")
        self.assertEqual(xendDeviceClass(parseDiskSpec("/img,,xvda")), "vbd")

    def test_defaultStatTarget(self) -> None:
        """The default classifies files, directories, missing paths, block devices."""
        path = self.mktemp()
        self.assertEqual(defaultStatTarget(path), "missing")
        with open(path, "w"):
            pass
        self.assertEqual(defaultStatTarget(path), "file")
        self.assertEqual(defaultStatTarget(os.path.dirname(os.path.abspath(path))), "other")
        self.assertEqual(defaultStatTarget("bad\0path"), "missing")
        for candidate in ("/dev/loop0", "/dev/sda", "/dev/vda", "/dev/ram0"):
            if os.path.exists(candidate) and stat.S_ISBLK(os.stat(candidate).st_mode):
                self.assertEqual(defaultStatTarget(candidate), "block")
