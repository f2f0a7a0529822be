"""
Issue 13, finding 9 (input checks and messages): each check is refused with
a typed error before anything is written (the tests diff the whole tree),
seen from the device manager, XML-RPC (its fault code) and the CLI (its exit
code and a one-line message naming the bad field or device), over the C
xenstored and the embedded one:

  1. a relative xl target is sent as the path it was checked as
     (C{target=loop0} is C{/dev/loop0}; the agent refused C{loop0});
  2. a vif C{rate} beyond 64 bits is refused, naming C{rate};
  3. a vif C{type} other than xl's and an C{ip} that is no address are
     refused, naming the field;
  4. dom0 exists: its devices (xl's) are listed, and an attach says that
     xenddev attaches devices to guests only;
  5. C{cd-insert} on a disk says the device is not a cdrom drive;
  6. messages about a disk name its vdev beside its number.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Callable
from typing import Any

from hypothesis import assume, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.support.fixtures import EmbeddedXenstoredFixture, RealXenstoredFixture
from tests.support.host import startDriverDomain
from tests.support.profiles import examples
from tests.test_cli import CLIClientMixin
from tests.test_diskspec import diskSpecs
from tests.test_xmlrpc import GUEST, DeviceServiceFixture
from xenddev.cli import EXIT_BAD_CONFIG, EXIT_NO_DEVICE, EXIT_NO_DOMAIN
from xenddev.controllers.blkif import BlkifController, NotACdromError
from xenddev.controllers.blktap import Blktap2Controller, BlktapController
from xenddev.controllers.vif import RATE_MAX, VifController, parseIps, parseRate
from xenddev.diskspec import DiskSpec
from xenddev.driverdomain.kinds.blkback import BlkbackKind
from xenddev.driverdomain.kinds.netback import NetbackKind
from xenddev.errors import FaultCode
from xenddev.toolstack.controller import (
    DeviceConfigError,
    DeviceNotFoundError,
    DomainInfo,
    NotAGuestError,
)

#: A block device name that exists in no /dev: driver domain 3's blkback
#: is told it does (see L{blockDeviceStat}).
RELATIVE_DISK = "xenddev-relative-disk"
#: The netback kind's own check of C{ip} (what the agent would refuse).
AGENT_IPS = re.compile(r"[0-9a-fA-F.:/ ]{1,256}\Z")


def blockDeviceStat(name: str) -> Callable[[str], os.stat_result]:
    """An C{os.stat} for which C{/dev/<name>} is a block device."""
    fake = os.stat_result((stat.S_IFBLK | 0o600, 0, 0, 1, 0, 0, 0, 0, 0, 0))

    def statPath(path: str) -> os.stat_result:
        return fake if path == f"/dev/{name}" else os.stat(path)

    return statPath


def guestController(cls: type[Any]) -> Any:
    """A controller of class C{cls} for guest 5 that only parses (no store)."""
    return cls(None, DomainInfo(GUEST, "/vm/x"))


class RelativeTargetTests(SynchronousTestCase):
    """Finding 9.1: what the toolstack checked is what it sends."""

    def test_relativeTargetSentAsChecked(self) -> None:
        """
        C{target=loop0} is checked as C{/dev/loop0} and sent (and recorded)
        as C{/dev/loop0}, locally and to a remote driver domain.
        """
        ctrl = guestController(BlkifController)
        looked: list[str] = []

        def statTarget(path: str) -> str:
            looked.append(path)
            return "block" if path == "/dev/loop0" else "missing"

        ctrl.statTarget = statTarget
        for extra, params in (("", "/dev/loop0"), (",backend=3", "/dev/loop0")):
            details = ctrl.getDeviceDetails(
                {"spec": f"format=raw,vdev=xvdb,access=r{extra},target=loop0"}
            )
            self.assertEqual((details.target["type"], details.target["params"]), ("phy", params))
            self.assertEqual(details.config["uname"], f"phy:{params}")
        self.assertEqual(set(looked), {"/dev/loop0"})

    def test_blktapRelativeTarget(self) -> None:
        """A tap disk's relative target is sent under /dev/ too (both blktap classes)."""
        for cls in (BlktapController, Blktap2Controller):
            details = guestController(cls).getDeviceDetails(
                {"uname": "tap:aio:vg/lv", "dev": "xvdb", "mode": "w"}
            )
            self.assertEqual(details.target["params"], "/dev/vg/lv", cls)
            self.assertEqual(details.config["tapdisk-params"], "aio:/dev/vg/lv", cls)

    @settings(max_examples=examples(500), deadline=None)
    @given(diskSpecs(), st.sampled_from(["block", "file"]))
    def test_sentIsChecked(self, spec: DiskSpec, kind: str) -> None:
        """
        For any disk the vbd class accepts, the target it sends is the path
        it looked at (L{DiskSpec.hostPath}), and it looked at no other.
        """
        try:
            text = spec.toXl()
        except ValueError:
            assume(False)
        ctrl = guestController(BlkifController)
        looked: list[str] = []

        def statTarget(path: str) -> str:
            looked.append(path)
            return kind

        ctrl.statTarget = statTarget
        try:
            details = ctrl.getDeviceDetails({"spec": text})
        except DeviceConfigError:
            assume(False)
        self.assertEqual(details.target["params"], spec.hostPath or "")
        self.assertLessEqual(set(looked), {spec.hostPath})


class VifFieldTests(SynchronousTestCase):
    """Findings 9.2 and 9.3: a vif's rate, type and ip, each refused naming the field."""

    def test_rateBeyond64Bits(self) -> None:
        """
        2**64-1 bytes per second is the most; beyond, per second or per
        interval, or a number too long to read, is refused naming rate.
        """
        self.assertEqual(parseRate(f"{RATE_MAX}B/s@1s"), f"{RATE_MAX},1000000")
        for text in (
            f"{RATE_MAX + 1}B/s",
            "99999999999999999999999B/s",
            f"{RATE_MAX}B/s@2s",
            "1" + "0" * 5000 + "B/s",
            "1B/s@" + "9" * 5000 + "s",
        ):
            e = self.assertRaises(DeviceConfigError, parseRate, text)
            self.assertTrue(str(e).startswith("invalid rate '"), str(e))
            self.assertLess(len(str(e)), 200)

    def test_typeAndIpAccepted(self) -> None:
        """
        type is xl's (vif, ioemu, libxl's vif_ioemu), recorded as libxl
        names it; ip is one or more addresses (a /prefix allowed), sent
        with single spaces. (What is refused: tests.test_controllers'
        test_vifConfigErrors, and test_vifFieldsRefused below.)
        """
        ctrl = guestController(VifController)
        details = ctrl.getDeviceDetails({"type": "ioemu", "ip": "10.0.0.1  fe80::1/64"})
        self.assertEqual(details.config["type"], "vif_ioemu")
        self.assertEqual(details.target["ip"], "10.0.0.1 fe80::1/64")
        self.assertEqual(ctrl.getDeviceDetails({"type": "vif"}).config["type"], "vif")
        self.assertEqual(ctrl.getDeviceDetails({"type": "vif_ioemu"}).config["type"], "vif_ioemu")

    @settings(max_examples=examples(500), deadline=None)
    @given(st.text(alphabet="0123456789abcdefABCDEF.:/% \t", max_size=60))
    def test_ipsTheAgentTakes(self, text: str) -> None:
        """Whatever parseIps accepts, the driver domain's netback kind accepts too."""
        try:
            ips = parseIps(text)
        except DeviceConfigError:
            return
        self.assertTrue(AGENT_IPS.match(ips), ips)

    @settings(max_examples=examples(500), deadline=None)
    @given(st.from_regex(r"\A[0-9]{1,30}[kKMG]?[Bb]/s(@[0-9]{1,12}[mu]?s)?\Z", fullmatch=True))
    def test_rateFitsTheBackend(self, text: str) -> None:
        """Any rate parseRate accepts is two counts netback reads as 64-bit numbers."""
        try:
            stored = parseRate(text)
        except DeviceConfigError:
            return
        perInterval, usecs = (int(n) for n in stored.split(","))
        self.assertTrue(0 < perInterval <= RATE_MAX and 0 < usecs <= 10**9, stored)


class DeviceLabelTests(SynchronousTestCase):
    """Finding 9.6: how messages name a device."""

    def test_labels(self) -> None:
        """A disk by its vdev and number; a vif (no name) by its id."""
        self.assertEqual(BlkifController.deviceLabel(268439552), "xvdq (268439552)")
        self.assertEqual(BlkifController.deviceLabel(51728, withClass=True), "xvdb (vbd 51728)")
        self.assertEqual(BlktapController.deviceLabel(5632, withClass=True), "hdc (tap 5632)")
        self.assertEqual(VifController.deviceLabel(0), "0")
        self.assertEqual(VifController.deviceLabel(2, withClass=True), "2 (vif)")
        # A number without a name of its own (the long form of xvdb).
        self.assertEqual(BlkifController.deviceLabel((1 << 28) | (1 << 8)), "268435712")


class InputCheckSuite(CLIClientMixin, DeviceServiceFixture):
    """End to end; mixed with a server fixture and TestCase."""

    async def assertRefused(
        self, argv: list[str], exitCode: int, words: str, method: str, *args: Any
    ) -> None:
        """
        The CLI command exits C{exitCode} with one line holding C{words};
        the XML-RPC call is refused with the matching fault and the same
        words; neither leaves a trace in the tree.
        """
        before = await self.tree()
        code, out, err = await self.cli(*argv)
        self.assertEqual((code, out), (exitCode, ""), err)
        self.assertEqual(err.count("\n"), 1, err)
        self.assertIn(words, err)
        self.assertNotIn("{", err)
        fault = {
            EXIT_BAD_CONFIG: FaultCode.BAD_CONFIG,
            EXIT_NO_DEVICE: FaultCode.NO_SUCH_DEVICE,
            EXIT_NO_DOMAIN: FaultCode.INVALID_DOMAIN,
        }[exitCode]
        f = await self.assertFault(fault, method, *args)
        self.assertIn(words, f.faultString)
        await self.assertTreeIs(before)

    async def test_relativeTargetAttaches(self) -> None:
        """
        A disk with a relative target in a remote driver domain attaches:
        the driver domain is sent /dev/<target> (it refused the relative
        path with EINVAL); the detach leaves the tree as it was.
        """
        await startDriverDomain(
            self, self.xs, 3, [BlkbackKind(stat=blockDeviceStat(RELATIVE_DISK)), NetbackKind()]
        )
        before = await self.tree()
        spec = f"format=raw,vdev=xvdb,access=r,backend=3,target={RELATIVE_DISK}"
        await self.call("device.attach", GUEST, "vbd", {"spec": spec})
        await self.connected("vbd", 51728)
        backend = f"/local/domain/3/backend/vbd/{GUEST}/51728"
        self.assertEqual(await self.xs.read(f"{backend}/params"), f"/dev/{RELATIVE_DISK}")
        await self.call("device.detach", GUEST, "vbd", "xvdb")
        await self.assertTreeIs(before)

    async def test_vifFieldsRefused(self) -> None:
        """
        A rate beyond 64 bits, a type xl does not know and an ip that is no
        address: fault 10 and exit 4, naming the field; nothing written.
        """
        for setting, words in (
            (f"rate={RATE_MAX + 1}B/s", f"invalid rate '{RATE_MAX + 1}B/s'"),
            ("type=junk", "invalid type 'junk'"),
            ("ip=999.1.1.1", "invalid ip '999.1.1.1'"),
        ):
            key, _, value = setting.partition("=")
            await self.assertRefused(
                ["network-attach", str(GUEST), setting],
                EXIT_BAD_CONFIG,
                words,
                "device.attach",
                GUEST,
                "vif",
                {key: value},
            )

    async def test_vifFieldsWritten(self) -> None:
        """Good addresses reach the backend with single spaces; the type is recorded."""
        before = await self.tree()
        await self.ok("network-attach", str(GUEST), "ip=10.0.0.1  fe80::1", "type=ioemu")
        await self.connected("vif", 0)
        backend = f"/local/domain/0/backend/vif/{GUEST}/0"
        self.assertEqual(await self.xs.read(f"{backend}/ip"), "10.0.0.1 fe80::1")
        ctrl = await self.manager.controller(GUEST, "vif")
        self.assertEqual((await ctrl.getDeviceConfiguration(0))["type"], "vif_ioemu")
        await self.ok("network-detach", str(GUEST), "0")
        await self.assertTreeIs(before)

    async def test_dom0Exists(self) -> None:
        """
        Domain-0 (its home has no vm): its devices are listed (xl's, none
        of ours), by id or by name; an attach is refused saying devices are
        not attached to dom0 (fault 3, exit 3), with nothing written.
        """
        await self.xs.write("/local/domain/0/name", "Domain-0")
        self.assertEqual(await self.call("device.list", 0), [])
        self.assertEqual((await self.ok("block-list", "Domain-0")).splitlines()[1:], [])
        self.assertEqual(await self.call("xend.domain.getBlockDeviceClass", 0, "xvda"), None)
        self.assertTrue(await self.call("xend.domain.waitForDevices", 0))
        # A disk xl attached to dom0 (libxl's record, its frontend).
        await self.xs.write(
            "/libxl/0/device/vbd/51712/backend", "/local/domain/0/backend/vbd/0/51712"
        )
        await self.xs.write("/local/domain/0/device/vbd/51712/state", "4")
        (row,) = await self.call("device.list", "Domain-0", "vbd")
        self.assertEqual(
            (row["devid"], row["vdev"], row["toolstack"], row["state"]),
            (51712, "xvda", "libxl", 4),
        )
        e = await self.assertFails(
            self.manager.createDevice(0, "vbd", {"spec": "/x,raw,xvdb,r"}), NotAGuestError
        )
        self.assertEqual(
            str(e),
            "Domain 0 (Domain-0) is dom0: xenddev attaches devices to guests only, not to dom0",
        )
        await self.assertRefused(
            ["block-attach", "0", f"{self.image()},raw,xvdb,r"],
            EXIT_NO_DOMAIN,
            "is dom0: xenddev attaches devices to guests only",
            "device.attach",
            "Domain-0",
            "vbd",
            {"spec": f"{self.image()},raw,xvdb,r"},
        )

    async def test_cdInsertOnADisk(self) -> None:
        """
        cd-insert and cd-eject on a disk: the device is named and said not
        to be a cdrom drive (no internal dict), fault 10, exit 4; a cdrom
        drive cannot be made a disk either.
        """
        img = self.image()
        await self.ok("block-attach", str(GUEST), f"{img},raw,xvdb,r")
        await self.ok("block-attach", str(GUEST), f"{img},raw,hdc,devtype=cdrom")
        await self.connected("vbd", 51728)
        await self.connected("vbd", 5632)
        words = f"Device xvdb (51728) of domain {GUEST} is not a cdrom drive"
        spec = {"spec": f"{img},xvdb:cdrom,r"}
        await self.assertRefused(
            ["cd-insert", str(GUEST), "xvdb", img],
            EXIT_BAD_CONFIG,
            words,
            "device.configure",
            GUEST,
            "vbd",
            "xvdb",
            spec,
        )
        await self.assertRefused(
            ["cd-eject", str(GUEST), "xvdb"],
            EXIT_BAD_CONFIG,
            words,
            "xend.domain.device_configure",
            GUEST,
            ["vbd", ["uname", ""], ["dev", "xvdb:cdrom"], ["mode", "r"]],
        )
        e = await self.assertFails(
            self.manager.reconfigureDevice(GUEST, "vbd", "hdc", {"spec": f"{img},raw,hdc,r"}),
            NotACdromError,
        )
        self.assertIn(f"Device hdc (5632) of domain {GUEST} is a cdrom drive", str(e))
        await self.ok("block-detach", str(GUEST), "hdc")
        await self.ok("block-detach", str(GUEST), "xvdb")

    async def test_vdevInMessages(self) -> None:
        """
        A disk that is not there is named by its vdev and number
        (C{Device xvdq (268439552) not connected}), whichever way it was
        named: fault 11, exit 5.
        """
        for name in ("xvdq", "268439552"):
            await self.assertRefused(
                ["block-detach", str(GUEST), name],
                EXIT_NO_DEVICE,
                "Device xvdq (268439552) not connected",
                "device.detach",
                GUEST,
                "vbd",
                name,
            )
        await self.assertRefused(
            ["cd-insert", str(GUEST), "xvdq", self.image()],
            EXIT_NO_DEVICE,
            "Device xvdq (268439552) not connected",
            "device.configure",
            GUEST,
            "vbd",
            "xvdq",
            {"spec": f"{self.image()},xvdq:cdrom,r"},
        )
        e = await self.assertFails(
            self.manager.destroyDevice(GUEST, "vbd", "hdc"), DeviceNotFoundError
        )
        self.assertEqual(str(e), "Device hdc (5632) not connected")


class RealXenstoredInputCheckTests(InputCheckSuite, RealXenstoredFixture, TestCase):  # type: ignore[misc]
    """Finding 9 over the C xenstored."""


class EmbeddedXenstoredInputCheckTests(InputCheckSuite, EmbeddedXenstoredFixture, TestCase):  # type: ignore[misc]
    """Finding 9 over the embedded xenstored."""
