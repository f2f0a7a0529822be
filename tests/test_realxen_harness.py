"""
Self-tests of L{tests.support.realxen}: Xen 4.17 and dom0 boot in QEMU once
for the module, commands run in dom0 through the channel (exit status,
output, failures, timeouts, concurrency, background processes), and a PV
guest with a disk and a vif works end to end.
"""

from __future__ import annotations

import os
import re
import time
import uuid

from twisted.internet.defer import Deferred, gatherResults
from twisted.trial.unittest import TestCase

from tests.support.realxen import (
    DOM0_IP,
    IMAGE_DIR,
    TEST_TIMEOUT,
    CommandFailed,
    RealXenHost,
    realXenHost,
)
from tests.support.xenstoresuite import deferredTest


class RealXenHostTests(TestCase):
    """
    Tests for L{RealXenHost} and its command channel.
    """

    timeout = TEST_TIMEOUT

    async def host(self) -> RealXenHost:
        """
        The module's machine (booted by the first test that asks).
        """
        return await realXenHost()

    @deferredTest
    async def test_boot(self) -> None:
        """
        dom0 runs the unpacked kernel as Xen's control domain, with the
        toolstack up: C{xl info} names Xen 4.17 and C{xl list} dom0.
        """
        host = await self.host()
        self.assertGreater(host.bootSeconds, 0)
        self.assertEqual(host.readyInfo["setupFailures"], [])
        uname = await host.check(["uname", "-r"])
        self.assertEqual(uname.stdout, host.images.kver + "\n")
        caps = await host.check(["cat", "/proc/xen/capabilities"])
        self.assertEqual(caps.stdout.strip(), "control_d")
        info = await host.check(["xl", "info"])
        self.assertRegex(info.stdout, r"(?m)^xen_version\s+: 4\.17\.")
        self.assertIn("bootscrub=0", info.stdout)
        listing = await host.check(["xl", "list"])
        self.assertRegex(listing.stdout, r"(?m)^Domain-0\s+0\s")

    @deferredTest
    async def test_result(self) -> None:
        """
        A command's exit status, standard output and standard error come back
        separately, with how long it ran.
        """
        host = await self.host()
        result = await host.run(["sh", "-c", "echo out; echo err >&2; exit 0"])
        self.assertEqual(
            (result.rc, result.stdout, result.stderr, result.timedout),
            (0, "out\n", "err\n", False),
        )
        self.assertEqual(result.argv, ("sh", "-c", "echo out; echo err >&2; exit 0"))
        self.assertGreaterEqual(result.seconds, 0)
        self.assertLess(result.seconds, 30)

    @deferredTest
    async def test_failingCommand(self) -> None:
        """
        A failing command's status comes back from C{run}; C{check} raises
        L{CommandFailed} with the output in its message; a program that does
        not exist gives 127.
        """
        host = await self.host()
        argv = ["sh", "-c", "echo partial; echo oops >&2; exit 7"]
        result = await host.run(argv)
        self.assertEqual((result.rc, result.stdout, result.stderr), (7, "partial\n", "oops\n"))
        with self.assertRaises(CommandFailed) as raised:
            await host.check(argv)
        self.assertEqual(raised.exception.result.rc, 7)
        self.assertIn("exited with 7", str(raised.exception))
        self.assertIn("oops", str(raised.exception))
        missing = await host.run(["/no/such/program"])
        self.assertEqual(missing.rc, 127)
        self.assertIn("/no/such/program", missing.stderr)

    @deferredTest
    async def test_timeout(self) -> None:
        """
        A command outliving its timeout is killed with its whole process
        group; the output it wrote before is kept.
        """
        host = await self.host()
        result = await host.run(["sh", "-c", "sleep 3031 & echo $!; wait"], timeout=2)
        self.assertTrue(result.timedout)
        self.assertEqual(result.rc, -9)
        self.assertGreaterEqual(result.seconds, 2)
        self.assertLess(result.seconds, 30)
        child = result.stdout.strip()
        self.assertRegex(child, r"^\d+$")
        alive = await host.run(["kill", "-0", child])
        self.assertNotEqual(alive.rc, 0, "the command's child survived its timeout")

    @deferredTest
    async def test_environmentDirectoryInput(self) -> None:
        """
        A command gets the environment variables, working directory and
        standard input it is given; dom0's own environment stays under them.
        """
        host = await self.host()
        result = await host.check(
            ["sh", "-c", 'echo "$XENDDEV_TEST|$HOME"; pwd; cat'],
            env={"XENDDEV_TEST": "yes"},
            cwd=host.shareInDom0,
            stdin="line one\nline two\n",
        )
        self.assertEqual(result.stdout, f"yes|/root\n{host.shareInDom0}\nline one\nline two\n")

    @deferredTest
    async def test_concurrent(self) -> None:
        """
        Requests run at once: eight commands that each wait until all eight
        have started (a barrier of files in the share) all end, each with
        its own output. Served one after the other, the first would give up
        after a minute (status 9).
        """
        host = await self.host()
        barrier = host.sharePath / f"barrier-{uuid.uuid4().hex[:8]}"
        barrier.mkdir()
        script = (
            'touch "$1/$2"; i=0; while set -- "$1" "$2" "$1"/*; [ $# -lt 10 ]; do'
            " i=$((i + 1)); [ $i -le 600 ] || exit 9; sleep 0.1; done;"
            ' echo "$2"; echo "e$2" >&2'
        )
        results = await gatherResults(
            [
                Deferred.fromCoroutine(
                    host.run(["sh", "-c", script, "sh", host.inDom0(barrier), str(n)])
                )
                for n in range(8)
            ]
        )
        self.assertEqual(
            [(r.rc, r.stdout, r.stderr) for r in results],
            [(0, f"{n}\n", f"e{n}\n") for n in range(8)],
        )
        self.assertEqual(sorted(os.listdir(barrier)), [str(n) for n in range(8)])

    @deferredTest
    async def test_background(self) -> None:
        """
        A background process runs while other requests are served; its
        output can be read meanwhile; a signal ends it and its status says
        so; signalling it once it is gone fails.
        """
        host = await self.host()
        proc = await host.spawn(["sh", "-c", "echo started; echo warm >&2; exec sleep 1000"])
        self.assertGreater(proc.pid, 1)
        deadline = time.monotonic() + 60
        while "started" not in proc.stdout() and time.monotonic() < deadline:
            await host.run(["true"])
        self.assertEqual(proc.stdout(), "started\n")
        self.assertEqual(proc.stderr(), "warm\n")
        ps = await host.check(["cat", f"/proc/{proc.pid}/cmdline"])
        self.assertEqual(ps.stdout.split("\0")[:2], ["sleep", "1000"])
        self.assertFalse(proc.ended())
        await proc.signal(15)
        result = await proc.wait(timeout=60)
        self.assertEqual(result.rc, -15)
        self.assertTrue(proc.ended())
        with self.assertRaises(CommandFailed):
            await proc.signal(15)

    @deferredTest
    async def test_share(self) -> None:
        """
        A file put into the share here is read in dom0, and one written in
        dom0 is read here, at once.
        """
        host = await self.host()
        name = f"t-{uuid.uuid4().hex[:8]}"
        (host.sharePath / f"{name}.in").write_text("from the host\n")
        result = await host.check(
            ["sh", "-c", f"cat {name}.in; echo from dom0 > {name}.out"], cwd=host.shareInDom0
        )
        self.assertEqual(result.stdout, "from the host\n")
        self.assertEqual((host.sharePath / f"{name}.out").read_text(), "from dom0\n")
        self.assertEqual(host.inDom0(host.sharePath / name), f"{host.shareInDom0}/{name}")


class RealXenGuestTests(TestCase):
    """
    A PV guest made with C{xl create} on the real machine.
    """

    timeout = TEST_TIMEOUT

    @deferredTest
    async def test_guestDiskAndNetwork(self) -> None:
        """
        A PV guest with a raw disk and a vif: its console reports the disk
        (size, flags, the image's first bytes) and a write read back with
        O_DIRECT, which lands in the image; it pings dom0 and dom0 pings it;
        C{xl destroy} removes it.
        """
        host = await realXenHost()
        image = f"{IMAGE_DIR}/harness-g1.img"
        await host.check(
            [
                "sh",
                "-c",
                f"truncate -s 32M {image} && printf XENDDEV-DISK-g1 | dd of={image} conv=notrunc",
            ]
        )
        mac = "00:16:3e:00:00:02"
        guest = await host.createGuest(
            "harness-g1",
            disks=[f"format=raw,vdev=xvdb,access=rw,target={image}"],
            vifs=[f"bridge=xenbr0,mac={mac}"],
            memory=256,
        )
        self.addCleanup(self.destroyLeftover, host, "harness-g1")
        self.assertIsNotNone(guest.domid)
        listing = await host.check(["xl", "list"])
        self.assertRegex(listing.stdout, rf"(?m)^harness-g1\s+{guest.domid}\s")

        ready = await guest.waitConsole(r"^GUEST: ready ip=(\S+)", timeout=180)
        self.assertEqual(ready.group(1), guest.ip)
        appeared = await guest.waitConsole(r"^GUEST: disk xvdb appeared (.*)$", timeout=60)
        self.assertEqual(
            appeared.group(1).rstrip("\r"),
            "sectors=65536 ro=0 removable=0 head='XENDDEV-DISK-g1'",
        )
        readback = await guest.waitConsole(r"^GUEST: disk xvdb wrote\+readback '(.*)'", timeout=60)
        self.assertEqual(readback.group(1), "XENDDEV-GUEST-xvdb")

        up = await guest.waitConsole(r"^GUEST: eth0 up mac=(\S+) ip=(\S+)", timeout=60)
        self.assertEqual(up.groups(), (mac, guest.ip))
        ping = await guest.waitConsole(rf"^GUEST: ping {re.escape(DOM0_IP)} (OK|FAILED)", 90)
        self.assertEqual(ping.group(1), "OK", guest.console())
        fromDom0 = await host.run(["busybox", "ping", "-c", "3", "-W", "2", guest.ip], timeout=60)
        self.assertEqual(fromDom0.rc, 0, fromDom0.describe())
        self.assertIn("3 packets received", fromDom0.stdout)

        await guest.destroy()
        listing = await host.check(["xl", "list"])
        self.assertNotIn("harness-g1", listing.stdout)
        written = await host.check(
            ["sh", "-c", f"dd if={image} bs=512 skip=1 count=1 2>/dev/null | tr -d '\\000'"]
        )
        self.assertEqual(written.stdout, "XENDDEV-GUEST-xvdb")
        self.assertIn(f"ready ip={guest.ip}", guest.reports())
        self.assertEqual(os.path.basename(str(guest.consolePath)), "guest-harness-g1.log")

    async def destroyLeftover(self, host: RealXenHost, name: str) -> None:
        """
        Destroy guest C{name} if a failed test left it running.
        """
        if name in host.guests and host.alive:
            await host.run(["xl", "destroy", name], timeout=120)
