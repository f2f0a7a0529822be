"""
The real-Xen lane: a real driver domain (issue 11).

A second PV domain, created with C{driver_domain=1}, runs the xenddev agent
(C{python -m xenddev.driverdomain.run}) with blkback, netback and the real
hotplug scripts inside it, and serves a guest's disk and vif through seed
000's protocol, driven by the xenddev daemon in dom0. Then the driver domain
is crashed and the restart operation moves the devices to its replacement
(seed 000's restart thread), built beside it ahead of time to save a boot's
wait; the guest's Linux frontends stay stalled (docs/protocol.md,
"Driver-domain restart", says why).

How Python gets into the driver domain: in its initramfs, which holds the
files of this machine the agent and the hotplug scripts need, at the same
paths (this checkout's virtualenv interpreter, the modules the agent
imports, the checkout's C{xenddev}, bash and the scripts' programs:
L{tests.support.realxen.agentroot}, C{files/dd-init}). dom0's root over
Xen's PV 9pfs works but is far too slow under TCG (see agentroot); 9pfs
(C{p9}, served by the device model libxl starts in dom0,
C{qemu-system-xen}) carries only the disk images: a writable folder of
dom0 that a driver domain and its replacement share.
"""

from __future__ import annotations

import os
import re
import time

from twisted.trial.unittest import TestCase

from tests.support.realxen import TEST_TIMEOUT, Guest, RealXenHost, concurrently, realXenHost
from tests.support.realxen.daemon import ROOT, VENV_BIN, startXenddev
from tests.support.realxen.vm import sleep
from tests.support.xenstoresuite import deferredTest

#: The images share: a folder of dom0 (tmpfs) seen at the same path in the
#: driver domains.
IMAGES = "/var/lib/realxen/dd"

#: The driver domain's bridge and address (files/dd-setup.sh); the guest's.
DD_IP = "169.254.98.1"
GUEST_IP = "169.254.98.2"

#: Set to 1 to have xenstored trace every request into the run folder's
#: share/xs-trace.log (what the agent in the driver domain sent).
TRACE_ENV = "XENDDEV_DD_TRACE"

#: How long one C{xl create} may take here: xl creates one domain at a
#: time, so three created at once wait for each other (20-25 s each when
#: the machine is quiet).
CREATE_TIMEOUT = 400

#: The restart operation's module (run in dom0).
RESTART = "xenddev.toolstack.restart"

_BEAT = re.compile(r"^beat (\d+) disk=(\w+) net=(\w+)$")


def driverDomainConfig() -> dict[str, str]:
    """The C{xl} config lines that make a driver domain of the lane's kind."""
    shares = [f"tag=images,security_model=none,path={IMAGES}"]
    return {
        "driver_domain": "1",
        "p9": "[ " + ", ".join(f'"{s}"' for s in shares) + " ]",
        "on_crash": '"preserve"',
    }


async def startDriverDomain(host: RealXenHost, name: str) -> tuple[Guest, float]:
    """
    Create driver domain C{name} and wait until its agent is up (waiting
    for its control area).

    @return: the domain, and seconds from C{xl create} to the agent being up.
    """
    started = time.monotonic()
    extra = " ".join(
        [
            f"xenddev.python={VENV_BIN}/python",
            f"xenddev.checkout={ROOT}",
            f"xenddev.images={IMAGES}",
        ]
    )
    dd = await host.createGuest(
        name,
        memory=384,
        ramdisk=str(host.images.ddInitrd),
        extra=extra,
        config=driverDomainConfig(),
        timeout=CREATE_TIMEOUT,
    )
    # The agent waits until the toolstack makes its control area, which
    # the daemon does with its first request to the driver domain.
    await dd.waitConsole(r"agent for domain \d+ waiting for its control area", timeout=240)
    return dd, time.monotonic() - started


def beats(guest: Guest) -> list[tuple[int, str, str]]:
    """The guest's heartbeat reports so far: (number, disk, net)."""
    found = []
    for line in guest.reports():
        match = _BEAT.match(line)
        if match is not None:
            found.append((int(match.group(1)), match.group(2), match.group(3)))
    return found


async def waitBeat(guest: Guest, after: int, timeout: float = 180) -> tuple[int, str, str]:
    """Wait for a heartbeat numbered above C{after} with disk and net OK."""
    started = time.monotonic()
    while True:
        good = [b for b in beats(guest) if b[0] > after and b[1:] == ("OK", "OK")]
        if good:
            return good[0]
        if time.monotonic() - started > timeout:
            raise AssertionError(
                f"no good heartbeat after {after} within {timeout:.0f}s:\n"
                + "\n".join(guest.reports()[-20:])
            )
        await sleep(guest.host._reactor, 0.5)


class DriverDomainTests(TestCase):
    """A guest's disk and vif served by a real driver domain, and moved."""

    timeout = TEST_TIMEOUT

    async def read(self, host: RealXenHost, path: str) -> str | None:
        """A XenStore node's value in dom0, or None."""
        result = await host.run(["xenstore-read", path])
        return result.stdout.strip() if result.rc == 0 else None

    @deferredTest
    async def test_driverDomainRestart(self) -> None:
        """
        A driver domain serves a raw disk (blkback, C{block} script, a loop
        device on the images share) and a vif (netback, C{vif-bridge} onto
        its own bridge) to a guest, which writes, reads back and pings the
        driver domain every 2 s. The driver domain crashes (C{xl sysrq c},
        kept by C{on_crash=preserve}), and the restart operation moves both
        objects to a second driver domain (booted beside the first): its
        backends wait for the frontends with their hotplug scripts run, the
        frontends point at them and are readable by it, and the guest saw
        its devices stall, not go. (Its I/O does not resume: see the comment below.)
        """
        host = await realXenHost()
        await host.check(["mkdir", "-p", IMAGES])
        await host.check(["truncate", "-s", "32M", f"{IMAGES}/g.img"])
        cleanups: list[str] = []

        async def destroyAll() -> None:
            for name in reversed(cleanups):
                await host.run(["xl", "destroy", name], timeout=120)

        self.addCleanup(destroyAll)
        cleanups.extend(["xdd1", "xdd2", "gdd"])  # destroyed the other way round

        async def readyGuest() -> Guest:
            guest = await host.createGuest(
                "gdd",
                ip=GUEST_IP,
                extra=f"xenddev.peer={DD_IP} xenddev.heartbeat=xvdb",
                timeout=CREATE_TIMEOUT,
            )
            await guest.waitConsole(r"GUEST: ready", timeout=180)
            return guest

        # Both driver domains and the guest boot at once (each boot takes
        # 30-70 s under TCG, on one of the machine's two virtual CPUs); the
        # second driver domain waits unused, its agent idle until the
        # restart gives it its control area, as a spare would.
        (dd1, dd1Seconds), (dd2, dd2Seconds), guest, daemon = await concurrently(
            startDriverDomain(host, "xdd1"),
            startDriverDomain(host, "xdd2"),
            readyGuest(),
            startXenddev(host),  # the lane's, if running
        )
        if os.environ.get(TRACE_ENV):
            await host.run(["xenstore-control", "logfile", f"{host.shareInDom0}/xs-trace.log"])
        assert dd1.domid is not None and dd2.domid is not None and guest.domid is not None
        # target= comes last in an xl disk spec: it takes the rest.
        spec = f"format=raw,vdev=xvdb,access=rw,backend={dd1.domid},target={IMAGES}/g.img"
        attached = await daemon.run("block-attach", str(guest.domid), spec)
        self.assertEqual(attached.rc, 0, attached.describe())
        mac = "00:16:3e:5e:dd:01"
        attached = await daemon.run(
            "network-attach", str(guest.domid), "bridge=ddbr0", f"mac={mac}", f"backend={dd1.domid}"
        )
        self.assertEqual(attached.rc, 0, attached.describe() + daemon.log())
        await guest.waitConsole(rf"GUEST: ping {DD_IP} OK", timeout=120)
        first = await waitBeat(guest, 0)

        # Then the driver domain dies; on_crash=preserve keeps its XenStore
        # home (xl destroy would remove it, and seed 000's records with it).
        await host.check(["xl", "sysrq", "xdd1", "c"])
        crashed = time.monotonic()
        while True:
            listed = await host.check(["xl", "list", "xdd1"])
            if "c" in listed.stdout.splitlines()[-1].split()[4]:  # State: crashed
                break
            self.assertLess(time.monotonic() - crashed, 60, listed.stdout)
            await sleep(host._reactor, 1)

        moved = await host.run(
            [f"{VENV_BIN}/python", "-m", RESTART, str(dd1.domid), str(dd2.domid)],
            cwd=ROOT,
            timeout=300,
        )
        self.assertEqual(moved.rc, 0, moved.describe())
        print(
            f"\ndriver domain: first up in {dd1Seconds:.1f}s, second in {dd2Seconds:.1f}s;"
            f" first beat {first[0]}; restart {moved.seconds:.1f}s\n{moved.stdout}"
        )
        # The objects now live in the new driver domain: its kernel backends
        # wait for the frontends (InitWait) with their hotplug scripts run,
        # and the frontends point at them, readable by it.
        for cls, devid in (("vbd", 51728), ("vif", 0)):
            front = f"/local/domain/{guest.domid}/device/{cls}/{devid}"
            back = f"/local/domain/{dd2.domid}/backend/{cls}/{guest.domid}/{devid}"
            self.assertEqual(await self.read(host, f"{front}/backend"), back)
            self.assertEqual(await self.read(host, f"{front}/backend-id"), str(dd2.domid))
            for _ in range(120):
                if await self.read(host, f"{back}/hotplug-status") == "connected":
                    break
                await sleep(host._reactor, 1)
            self.assertEqual(await self.read(host, f"{back}/hotplug-status"), "connected")
            self.assertEqual(await self.read(host, f"{back}/state"), "2")
            perms = await host.check(["xenstore-ls", "-p", front])
            self.assertIn(f"r{dd2.domid}", perms.stdout)
        # Linux's frontends stay stalled on the dead backend: they re-read
        # <frontend>/backend only on a resume, and neither a resume the
        # toolstack can give (a slow resume panics Linux 6.1) nor one the
        # guest can take with I/O stuck (its processes cannot be frozen)
        # is available (docs/protocol.md, "Driver-domain restart").
        reports = guest.reports()
        self.assertNotIn("disk xvdb disappeared", reports)  # stalled, not gone
        self.assertEqual([r for r in reports if r.startswith("disk xvdb appeared")][1:], [])
        self.assertNotIn("eth0 gone", reports)
