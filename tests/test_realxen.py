"""
The real-Xen lane: xenddev on a real Xen 4.17 hypervisor (booted in QEMU by
L{tests.support.realxen}), with the real C xenstored, real blkback and
netback in dom0, the real hotplug scripts and a real PV guest whose
blkfront and netfront report on its console what they see.

The daemon runs in dom0 as an operator would start it (C{twistd -n
xenddev}, no simulation: it finds the host's xenstored and a Xen host), and
the tests drive it with the C{xenddev} command-line client, its XML-RPC
socket and the embedding API, beside C{xl}. Each test checks what the guest
saw (disks appearing with the right size and mode, its writes read back
with O_DIRECT, its network), what is left in dom0 (loop devices,
interfaces, the image's bytes) and what is left in XenStore (the tree,
diffed).

One machine and one long-lived guest (C{g1}) serve the whole module; tests
that need a guest of their own make one.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Sequence
from typing import Any

import attrs
from twisted.trial.unittest import TestCase

from tests.support.realxen import (
    IMAGE_DIR,
    TEST_TIMEOUT,
    BackgroundProcess,
    CommandResult,
    Guest,
    RealXenHost,
    concurrently,
    realXenHost,
)
from tests.support.realxen.daemon import ROOT, SOCKET, XenddevInDom0, startXenddev
from tests.support.xenstoresuite import deferredTest


@attrs.define
class Lane:
    """The module's machine, daemon and long-lived guest."""

    host: RealXenHost
    daemon: XenddevInDom0
    guest: Guest


class _LaneState:
    lane: Lane | None = None


async def lane() -> Lane:
    """
    The machine (booted by the first caller), the xenddev daemon in dom0
    and guest C{g1}, made once for the module.
    """
    if _LaneState.lane is None:
        host = await realXenHost()

        async def readyGuest() -> Guest:
            guest = await host.createGuest("g1")
            await guest.waitConsole(r"GUEST: ready", timeout=180)
            return guest

        # g1 boots while the daemon starts (about 20 s each under TCG).
        daemon, guest = await concurrently(startXenddev(host), readyGuest())
        _LaneState.lane = Lane(host, daemon, guest)
    return _LaneState.lane


class LaneTestCase(TestCase):
    """What the lane's tests share."""

    timeout = TEST_TIMEOUT

    async def setUpLane(self) -> Lane:
        """The lane; C{self.host}, C{self.guest} set."""
        self.lane = await lane()
        self.host = self.lane.host
        self.guest = self.lane.guest
        return self.lane

    async def xenddev(self, *args: str, timeout: float = 180) -> CommandResult:
        """Run the C{xenddev} client in dom0 (any exit status)."""
        return await self.lane.daemon.run(*args, timeout=timeout)

    async def ok(self, *args: str, timeout: float = 180) -> str:
        """Run the C{xenddev} client in dom0; it must succeed; its stdout."""
        result = await self.xenddev(*args, timeout=timeout)
        self.assertEqual(result.rc, 0, f"xenddev {' '.join(args)}: {result}\n{self.daemonLog()}")
        return result.stdout

    async def sh(self, script: str, timeout: float = 120) -> str:
        """A shell snippet in dom0 (explicitly C{sh -c}); must succeed; its stdout."""
        result = await self.host.run(["sh", "-c", script], timeout=timeout)
        self.assertEqual(result.rc, 0, f"{script}: {result}")
        return result.stdout

    def daemonLog(self, lines: int = 60) -> str:
        """The end of the daemon's log, for failure messages."""
        return "daemon log:\n" + self.lane.daemon.log(lines)

    async def image(self, name: str, megabytes: int = 16, header: str | None = None) -> str:
        """A raw image in dom0 (tmpfs) starting with C{header} (default its name)."""
        path = f"{IMAGE_DIR}/{name}"
        head = header if header is not None else f"XENDDEV-IMAGE-{name}"
        await self.sh(
            f"rm -f {path} && truncate -s {megabytes}M {path} && "
            f"printf %s {head} | dd of={path} conv=notrunc 2>/dev/null"
        )
        return path

    async def sector(self, path: str, n: int) -> str:
        """Sector C{n} of an image or device in dom0, NULs stripped."""
        out = await self.sh(f"dd if={path} bs=512 skip={n} count=1 2>/dev/null | tr -d '\\000'")
        return out

    async def loopsFor(self, path: str) -> list[str]:
        """The loop devices backed by C{path} in dom0."""
        out = await self.sh(f"losetup -j {path} | cut -d: -f1")
        return out.split()

    async def tree(self) -> dict[str, str]:
        """The whole XenStore tree as C{path -> value} (xenstore-ls -f)."""
        result = await self.host.check(["xenstore-ls", "-f", "/"], timeout=60)
        tree = {}
        for line in result.stdout.splitlines():
            path, sep, value = line.partition(" = ")
            if sep:
                tree[path] = value.strip('"')
        return tree

    def assertSameTree(self, before: dict[str, str], after: dict[str, str]) -> None:
        """
        No node added or removed between two dumps, and no value changed
        outside what moves by itself (xenstored's own records, the guests'
        and dom0's memory and console bookkeeping).
        """
        volatile = re.compile(
            r"^/tool/|^/local/domain/[0-9]+/(memory|control|console|data|device-misc)/"
        )
        added = sorted(p for p in after.keys() - before.keys() if not volatile.search(p))
        removed = sorted(p for p in before.keys() - after.keys() if not volatile.search(p))
        changed = sorted(
            p
            for p in before.keys() & after.keys()
            if before[p] != after[p] and not volatile.search(p)
        )
        self.assertEqual((added, removed, changed), ([], [], []))

    async def waitReport(self, mark: int, pattern: str, timeout: float = 120) -> str:
        """
        Wait for a report line of g1 matching C{pattern} among those after
        the first C{mark} (see L{Guest.reports}); return it.
        """
        regex = re.compile(pattern)
        for _ in range(int(timeout / 0.5)):
            for line in self.guest.reports()[mark:]:
                if regex.search(line):
                    return line
            await _sleep(0.5)
        self.fail(f"{pattern!r} not reported after line {mark}: {self.guest.reports()}")

    async def backendValues(self, devid: int, *keys: str, devclass: str = "vbd") -> list[str]:
        """Values in g1's backend directory for C{devid} (xenstore-read)."""
        base = f"/local/domain/0/backend/{devclass}/{self.guest.domid}/{devid}"
        result = await self.host.check(["xenstore-read", *(f"{base}/{k}" for k in keys)])
        return result.stdout.splitlines()

    async def attachDisk(self, spec: str, vdev: str) -> None:
        """
        block-attach to g1 and wait for the guest to see the disk; a test
        that fails before L{detachDisk} leaves no disk to the next ones.
        """
        attached = getattr(self, "_attached", set())
        self._attached = attached
        self.addCleanup(self._forceDetach, vdev)
        await self.ok("block-attach", self.guest.name, spec)
        attached.add(vdev)
        await self.guest.waitConsole(rf"GUEST: disk {vdev} appeared", timeout=120)

    async def _forceDetach(self, vdev: str) -> None:
        if vdev in self._attached:
            await self.xenddev("block-detach", "--force", self.guest.name, vdev)

    async def detachDisk(self, vdev: str) -> None:
        """block-detach from g1 and wait for the guest to see it go."""
        self.assertEqual(await self.ok("block-detach", self.guest.name, vdev), "")
        self._attached.discard(vdev)
        await self.guest.waitConsole(rf"GUEST: disk {vdev} disappeared", timeout=120)


def _row(table: str, devid: int) -> Sequence[str] | None:
    """The row of a block-list table for C{devid}, split."""
    for line in table.splitlines()[1:]:
        cells = line.split()
        if cells and cells[0] == str(devid):
            return cells
    return None


class BlockDeviceTests(LaneTestCase):
    """vbds through blkback and the real C{block} script."""

    @deferredTest
    async def test_rawFile(self) -> None:
        """
        A raw file, read-write: the guest sees it with the image's size and
        first bytes, its write is read back with O_DIRECT; block-list shows
        it connected; after detach the guest's bytes are in the image, no
        loop device and no XenStore node is left.
        """
        await self.setUpLane()
        path = await self.image("raw-rw.img", 32)
        before = await self.tree()
        await self.attachDisk(f"format=raw,vdev=xvdc,access=rw,target={path}", "xvdc")
        line = await self.guest.waitConsole(r"GUEST: disk xvdc appeared (.*)$")
        self.assertIn(f"sectors={32 * 2048} ro=0", line.group(1))
        self.assertIn("head='XENDDEV-IMAGE-raw-rw.img", line.group(1))
        await self.guest.waitConsole(r"GUEST: disk xvdc wrote\+readback 'XENDDEV-GUEST-xvdc'")
        row = _row(await self.ok("block-list", self.guest.name), 51744)
        self.assertIsNotNone(row)
        assert row is not None
        self.assertEqual(row[1:4], ["0", str(self.guest.domid), "4"])
        self.assertEqual(len(await self.loopsFor(path)), 1)
        await self.detachDisk("xvdc")
        self.assertEqual(await self.sector(path, 1), "XENDDEV-GUEST-xvdc")
        self.assertEqual(await self.loopsFor(path), [])
        self.assertSameTree(before, await self.tree())

    @deferredTest
    async def test_readOnly(self) -> None:
        """
        access=ro: the guest sees a read-only disk and its write is refused;
        the image is unchanged after detach.
        """
        await self.setUpLane()
        path = await self.image("raw-ro.img", 8)
        await self.attachDisk(f"format=raw,vdev=xvdd,access=ro,target={path}", "xvdd")
        line = await self.guest.waitConsole(r"GUEST: disk xvdd appeared (.*)$")
        self.assertIn("ro=1", line.group(1))
        await self.guest.waitConsole(r"GUEST: disk xvdd write refused \(read-only\)")
        (mode,) = await self.backendValues(51760, "mode")
        self.assertEqual(mode, "r")
        await self.detachDisk("xvdd")
        self.assertEqual(await self.sector(path, 1), "")
        self.assertEqual(await self.loopsFor(path), [])

    @deferredTest
    async def test_phyDevice(self) -> None:
        """
        A block device (phy:, a loop device the test made): served as is,
        the guest's write lands on the device; the device stays after
        detach (it was not ours to remove).
        """
        await self.setUpLane()
        path = await self.image("phy.img", 8)
        loop = (await self.sh(f"losetup -f --show {path}")).strip()
        self.addCleanup(self.host.run, ["losetup", "-d", loop])
        await self.attachDisk(f"phy:{loop},xvde,w", "xvde")
        await self.guest.waitConsole(r"GUEST: disk xvde wrote\+readback 'XENDDEV-GUEST-xvde'")
        (params,) = await self.backendValues(51776, "params")
        self.assertEqual(params, loop)
        await self.detachDisk("xvde")
        self.assertEqual(await self.sector(loop, 1), "XENDDEV-GUEST-xvde")
        self.assertEqual(await self.loopsFor(path), [loop])

    @deferredTest
    async def test_qcow2(self) -> None:
        """
        A qcow2 image with the default configuration (kinds C{auto}: the
        start-up log names qemu): served by C{qemu-storage-daemon} through
        the kernel's NBD client and blkback. The guest sees the virtual
        size and the image's first bytes, its write is read back; after
        detach its bytes are in the qcow2 image, no nbd device is
        connected, no daemon runs, no XenStore node is left.
        """
        await self.setUpLane()
        path = f"{IMAGE_DIR}/disk.qcow2"
        await self.sh(
            f"rm -f {path} && qemu-img create -q -f qcow2 {path} 24M && "
            f"qemu-io -f qcow2 -c 'write -P 0x51 0 512' {path} >/dev/null"
        )
        self.assertRegex(self.lane.daemon.log(400), r"kinds [a-z,]*qemu")
        before = await self.tree()
        await self.attachDisk(f"format=qcow2,vdev=xvdf,access=rw,target={path}", "xvdf")
        line = await self.guest.waitConsole(r"GUEST: disk xvdf appeared (.*)$")
        self.assertIn(f"sectors={24 * 2048} ro=0", line.group(1))
        self.assertIn("head='QQQQQQQQ", line.group(1))
        await self.guest.waitConsole(r"GUEST: disk xvdf wrote\+readback 'XENDDEV-GUEST-xvdf'")
        (kind, params) = await self.backendValues(51792, "type", "params")
        self.assertEqual(kind, "phy")
        self.assertRegex(params, r"^/dev/nbd[0-9]+$")
        await self.sh(f"test -e /sys/block/{params[5:]}/pid")
        await self.detachDisk("xvdf")
        raw = f"{IMAGE_DIR}/disk-qcow2.raw"
        await self.sh(f"qemu-img convert -O raw {path} {raw}")
        self.addCleanup(self.host.run, ["rm", "-f", raw])
        self.assertEqual(await self.sector(raw, 1), "XENDDEV-GUEST-xvdf")
        self.assertEqual(await self.sh("ls /sys/block/nbd*/pid 2>/dev/null || true"), "")
        running = await self.host.run(["pidof", "qemu-storage-daemon"])
        self.assertNotEqual(running.rc, 0, running)
        self.assertSameTree(before, await self.tree())

    @deferredTest
    async def test_cdromMedia(self) -> None:
        """
        A cdrom drive: cd-insert of another medium, cd-eject and cd-insert
        again, each seen by the guest (the disk leaves and comes back with
        the new medium's bytes, none while empty); after detach no loop
        device is left for either medium.
        """
        await self.setUpLane()
        first = await self.image("cd-one.iso", 8, "MEDIUM-ONE")
        second = await self.image("cd-two.iso", 8, "MEDIUM-TWO")
        name = self.guest.name
        await self.attachDisk(f"{first},raw,xvdl:cdrom,r", "xvdl")
        await self.guest.waitConsole(r"GUEST: disk xvdl appeared .* ro=1 .*head='MEDIUM-ONE'")
        mark = len(self.guest.reports())
        self.assertEqual(await self.ok("cd-insert", name, "xvdl", f"raw:{second}"), "")
        await self.waitReport(mark, r"disk xvdl disappeared")
        await self.waitReport(mark, r"disk xvdl appeared .*head='MEDIUM-TWO'")
        self.assertEqual(await self.loopsFor(first), [])
        self.assertEqual(len(await self.loopsFor(second)), 1)
        mark = len(self.guest.reports())
        self.assertEqual(await self.ok("cd-eject", name, "xvdl"), "")
        await self.waitReport(mark, r"disk xvdl disappeared")
        self.assertEqual(await self.loopsFor(second), [])
        mark = len(self.guest.reports())
        self.assertEqual(await self.ok("cd-insert", name, "xvdl", f"raw:{first}"), "")
        await self.waitReport(mark, r"disk xvdl appeared .*head='MEDIUM-ONE'")
        await self.detachDisk("xvdl")
        self.assertEqual(await self.loopsFor(first) + await self.loopsFor(second), [])


class NetworkTests(LaneTestCase):
    """vifs through netback and the real C{vif-bridge} script."""

    @deferredTest
    async def test_vifOnBridge(self) -> None:
        """
        network-attach on xenbr0: the guest's netfront brings eth0 up with
        our MAC, pings dom0, and dom0 pings it; the backend interface is on
        the bridge. network-detach removes the interface and the guest sees
        eth0 go; nothing is left in XenStore.
        """
        await self.setUpLane()
        before = await self.tree()
        mac = "00:16:3e:5e:00:01"
        out = await self.ok("network-attach", self.guest.name, "bridge=xenbr0", f"mac={mac}")
        self.assertEqual(out, "")
        await self.guest.waitConsole(rf"GUEST: eth0 up mac={mac} ip={self.guest.ip}")
        await self.guest.waitConsole(r"GUEST: ping 169.254.99.1 OK", timeout=120)
        pinged = await self.host.run(["busybox", "ping", "-c", "3", "-W", "2", self.guest.ip])
        self.assertEqual(pinged.rc, 0, pinged)
        vif = f"vif{self.guest.domid}.0"
        await self.sh(f"test -e /sys/class/net/xenbr0/brif/{vif}")
        rows = json.loads(await self.ok("--json", "network-list", self.guest.name))
        self.assertEqual([(r["devid"], r["mac"], r["state"]) for r in rows], [(0, mac, 4)])
        self.assertEqual(await self.ok("network-detach", self.guest.name, "0"), "")
        await self.guest.waitConsole(r"GUEST: eth0 gone", timeout=120)
        gone = await self.host.run(["ip", "link", "show", vif])
        self.assertNotEqual(gone.rc, 0, gone)
        self.assertSameTree(before, await self.tree())


#: Run in dom0 with the checkout's interpreter: xend's XML-RPC methods over
#: the daemon's socket (what a legacy client sends). It attaches, prints a
#: JSON line, waits for the marker file, detaches and prints another.
XEND_CLIENT = """\
import json, os, sys, time
from xenddev.cli import serverProxy
rpc = serverProxy(sys.argv[1])
dom, path, marker = sys.argv[2], sys.argv[3], sys.argv[4]
created = rpc.xend.domain.device_create(
    dom, ["vbd", ["uname", "file:" + path], ["dev", "xvdf"], ["mode", "w"]])
sxprs = rpc.xend.domain.getDeviceSxprs(dom, "vbd")
print(json.dumps({"created": created, "devids": [s[0] for s in sxprs]}), flush=True)
while not os.path.exists(marker):
    time.sleep(0.2)
print(json.dumps({"destroyed": rpc.xend.domain.destroyDevice(dom, "vbd", "xvdf")}), flush=True)
"""

#: Run in dom0: the blocking embedding API of a threaded toolstack, beside
#: the daemon (whose agent serves dom0, so the embedded one runs none);
#: the same two steps.
EMBED_CLIENT = """\
import json, os, sys, time
from xenddev.config import Config, DriverDomainConfig, TimeoutsConfig
from xenddev.embed import EmbeddedToolstack
cfg = Config(driver_domain=DriverDomainConfig(enabled=False),
             timeouts=TimeoutsConfig(create=90, destroy=60, request=90))
xd = EmbeddedToolstack.start(cfg, timeout=180)
domid, path, marker = int(sys.argv[1]), sys.argv[2], sys.argv[3]
devid = xd.createDevice(domid, "vbd", {"spec": "format=raw,vdev=xvdg,access=rw,target=" + path})
rows = [r.devid for r in xd.listDevices(domid, "vbd")]
print(json.dumps({"devid": devid, "rows": rows}), flush=True)
while not os.path.exists(marker):
    time.sleep(0.2)
xd.destroyDevice(domid, "vbd", devid)
xd.close()
print(json.dumps({"destroyed": devid}), flush=True)
"""


class InterfacesTests(LaneTestCase):
    """xend's XML-RPC path and the embedding API, once each, on real Xen."""

    async def twoSteps(
        self, name: str, script: str, *args: str
    ) -> tuple[dict[str, Any], BackgroundProcess, Any]:
        """
        Start a two-step client script in dom0 (see L{XEND_CLIENT}); return
        its first JSON line, the process, and the marker to create for the
        second step.
        """
        source = self.host.sharePath / f"{name}.py"
        source.write_text(script)
        marker = self.host.sharePath / f"{name}.go"
        marker.unlink(missing_ok=True)
        proc = await self.host.spawn(
            [sys.executable, self.host.inDom0(source), *args, self.host.inDom0(marker)], cwd=ROOT
        )
        lines = await self.jsonLines(proc, 1)
        return lines[0], proc, marker

    async def jsonLines(self, proc: BackgroundProcess, n: int) -> list[dict[str, Any]]:
        """Wait for C{n} JSON lines on a background process's stdout."""
        for _ in range(int(300 / 0.5)):
            lines = [line for line in proc.stdout().splitlines() if line.startswith("{")]
            if len(lines) >= n:
                return [json.loads(line) for line in lines[:n]]
            if not self.host.alive:
                break
            await _sleep(0.5)
        self.fail(f"no {n} JSON lines from {proc.argv}: {proc.stdout()}\n{proc.stderr()}")

    @deferredTest
    async def test_xendXmlRpc(self) -> None:
        """
        xend.domain.device_create with an SXP vbd (file: uname), seen by the
        guest and by getDeviceSxprs; destroyDevice removes it.
        """
        await self.setUpLane()
        path = await self.image("xend.img", 8)
        first, proc, marker = await self.twoSteps(
            "xend", XEND_CLIENT, SOCKET, self.guest.name, path
        )
        self.assertEqual(first["created"], ["vbd", ["dom", self.guest.domid, "id", 51792]])
        self.assertIn(51792, first["devids"])
        await self.guest.waitConsole(r"GUEST: disk xvdf wrote\+readback 'XENDDEV-GUEST-xvdf'")
        marker.write_text("go")
        second = (await self.jsonLines(proc, 2))[1]
        self.assertEqual(second, {"destroyed": True})
        await self.guest.waitConsole(r"GUEST: disk xvdf disappeared")
        self.assertEqual(await self.loopsFor(path), [])

    @deferredTest
    async def test_embeddingApi(self) -> None:
        """
        EmbeddedToolstack (blocking calls from a plain Python program)
        attaches a disk the guest uses and detaches it.
        """
        await self.setUpLane()
        path = await self.image("embed.img", 8)
        first, proc, marker = await self.twoSteps(
            "embed", EMBED_CLIENT, str(self.guest.domid), path
        )
        self.assertEqual(first["devid"], 51808)
        self.assertIn(51808, first["rows"])
        await self.guest.waitConsole(r"GUEST: disk xvdg wrote\+readback 'XENDDEV-GUEST-xvdg'")
        marker.write_text("go")
        self.assertEqual((await self.jsonLines(proc, 2))[1], {"destroyed": 51808})
        await self.guest.waitConsole(r"GUEST: disk xvdg disappeared")
        self.assertEqual(await self.sector(path, 1), "XENDDEV-GUEST-xvdg")
        self.assertEqual(await self.loopsFor(path), [])


class GuestLifecycleTests(LaneTestCase):
    """Guests that go away with devices attached, and xl beside xenddev."""

    @deferredTest
    async def test_guestDestroyedWithDevices(self) -> None:
        """
        A guest destroyed by xl while xenddev's disk is attached: the daemon
        releases the device by itself (remove script run: no loop device),
        and nothing of it is left in XenStore.
        """
        lane = await self.setUpLane()
        path = await self.image("doomed.img", 8)
        before = await self.tree()
        guest = await self.host.createGuest("doomed")
        await guest.waitConsole(r"GUEST: ready", timeout=180)
        await self.ok("block-attach", "doomed", f"format=raw,vdev=xvdb,access=rw,target={path}")
        await guest.waitConsole(r"GUEST: disk xvdb wrote\+readback")
        self.assertEqual(len(await self.loopsFor(path)), 1)
        await guest.destroy()
        for _ in range(240):
            if not await self.loopsFor(path):
                break
            await _sleep(0.5)
        self.assertEqual(await self.loopsFor(path), [], self.daemonLog())
        after = await self.tree()
        domid = guest.domid
        leftovers = [p for p in after if f"/{domid}/" in p or f"-{domid}-" in p]
        self.assertEqual(leftovers, [], self.daemonLog())
        self.assertSameTree(before, after)
        self.assertIn("is gone: releasing it", lane.daemon.log(400))

    @deferredTest
    async def test_xlSideBySide(self) -> None:
        """
        A disk xl attached and one xenddev attached to the same guest: each
        toolstack lists and detaches its own without disturbing the other;
        xenddev's block-list shows xl's disk as xl shows it (marked libxl).
        """
        await self.setUpLane()
        xlImage = await self.image("xl.img", 8)
        ours = await self.image("ours.img", 8)
        name = self.guest.name
        self.addCleanup(self.host.run, ["xl", "block-detach", name, "xvdh"], timeout=180)
        await self.host.check(
            ["xl", "block-attach", name, f"format=raw,vdev=xvdh,access=rw,target={xlImage}"],
            timeout=180,
        )
        await self.guest.waitConsole(r"GUEST: disk xvdh wrote\+readback")
        await self.attachDisk(f"format=raw,vdev=xvdi,access=rw,target={ours}", "xvdi")
        rows = json.loads(await self.ok("--json", "block-list", name))
        byDevid = {r["devid"]: r for r in rows}
        self.assertEqual(byDevid[51824]["toolstack"], "libxl")
        self.assertEqual(byDevid[51840]["toolstack"], "xenddev")
        xlTable = (await self.host.check(["xl", "block-list", name])).stdout
        xlRow = _row(xlTable, 51824)
        assert xlRow is not None
        ourRow = _row(await self.ok("block-list", name), 51824)
        self.assertEqual(ourRow, xlRow)
        # Each detaches its own; the other's disk stays in use.
        await self.detachDisk("xvdi")
        self.assertIsNotNone(
            _row((await self.host.check(["xl", "block-list", name])).stdout, 51824)
        )
        await self.host.check(["xl", "block-detach", name, "xvdh"], timeout=180)
        await self.guest.waitConsole(r"GUEST: disk xvdh disappeared")
        self.assertEqual(await self.sector(xlImage, 1), "XENDDEV-GUEST-xvdh")
        self.assertEqual(await self.sector(ours, 1), "XENDDEV-GUEST-xvdi")
        self.assertEqual(await self.loopsFor(xlImage) + await self.loopsFor(ours), [])

    @deferredTest
    async def test_keysComparedWithLibxl(self) -> None:
        """
        The XenStore keys of a raw-file disk made by xenddev and by xl on the
        same guest, side by side (printed); every difference is one written
        down in docs/protocol.md (L{DOCUMENTED_KEY_DIFFERENCES}).
        """
        await self.setUpLane()
        xlImage = await self.image("keys-xl.img", 8)
        ours = await self.image("keys-ours.img", 8)
        name, domid = self.guest.name, self.guest.domid
        await self.host.check(
            ["xl", "block-attach", name, f"format=raw,vdev=xvdj,access=rw,target={xlImage}"],
            timeout=180,
        )
        await self.attachDisk(f"format=raw,vdev=xvdk,access=rw,target={ours}", "xvdk")
        await self.guest.waitConsole(r"GUEST: disk xvdj wrote\+readback")
        await self.guest.waitConsole(r"GUEST: disk xvdk wrote\+readback")
        try:
            theirs = await self.deviceKeys(domid, 51856, "xvdj", xlImage)
            mine = await self.deviceKeys(domid, 51872, "xvdk", ours)
        finally:
            await self.host.run(["xl", "block-detach", name, "xvdj"], timeout=180)
            await self.detachDisk("xvdk")
        differences = sorted(
            (key, theirs.get(key), mine.get(key))
            for key in theirs.keys() | mine.keys()
            if theirs.get(key) != mine.get(key)
        )
        print("\nkey                                 libxl                xenddev")
        for key, a, b in differences:
            print(f"{key:<35} {a!s:<20} {b!s}")
        self.assertEqual({key for key, _, _ in differences}, set(DOCUMENTED_KEY_DIFFERENCES))

    async def deviceKeys(self, domid: int, devid: int, vdev: str, image: str) -> dict[str, str]:
        """
        A disk's backend and frontend keys (C{backend/KEY}, C{frontend/KEY})
        with its own numbers, names and paths replaced by placeholders, so
        two disks can be compared.
        """
        back = f"/local/domain/0/backend/vbd/{domid}/{devid}"
        front = f"/local/domain/{domid}/device/vbd/{devid}"
        keys: dict[str, str] = {}
        for prefix, base in (("backend", back), ("frontend", front)):
            listing = (await self.host.check(["xenstore-ls", "-f", base])).stdout
            for line in listing.splitlines():
                path, sep, value = line.partition(" = ")
                if not sep:
                    continue
                value = value.strip('"')
                for old, new in ((back, "<backend>"), (front, "<frontend>"), (image, "<image>")):
                    value = value.replace(old, new)
                value = {str(devid): "<devid>", vdev: "<vdev>"}.get(value, value)
                keys[prefix + path[len(base) :]] = value
        for volatile in (
            "frontend/ring-ref",
            "frontend/event-channel",
            "backend/node",
            "backend/physical-device",
            "backend/physical-device-path",
        ):
            if volatile in keys:
                keys[volatile] = "<varies>"
        return keys


#: The backend/frontend keys whose presence or value differ between a raw-file
#: disk made by xl and one made by xenddev, each explained in docs/protocol.md
#: ("Compared with libxl").
DOCUMENTED_KEY_DIFFERENCES: tuple[str, ...] = (
    "backend/discard-enable",
    "backend/script",
    "backend/specification",
    "backend/type",
)


async def _sleep(seconds: float) -> None:
    """Wait on the reactor."""
    from twisted.internet import reactor
    from twisted.internet.task import deferLater

    await deferLater(reactor, seconds, lambda: None)
